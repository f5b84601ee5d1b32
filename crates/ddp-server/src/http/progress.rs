//! Delivery and acknowledgement over REST (PROTOCOL.md §10): `GET /devices/{id}/sync`, the
//! `"sync"` member of device objects, and the `?wait=` of writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use ddp_protocol::{DeviceId, Rev, Timestamp};
use ddp_store::{DeviceSync, StoreRef};
use serde::Serialize;

use super::Caller;
use super::openapi::Errors;
use crate::app::App;
use crate::error::{Error, Result};
use crate::progress::Awaited;

/// How long a write waits for the device when `waitTimeout` is not given.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The longest `waitTimeout`, in seconds.
const MAX_WAIT_SECS: f64 = 60.0;

/// Where a device's sync stands, as REST shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = DeviceSync)]
pub(crate) struct SyncJson {
    /// The device store's rev.
    #[schema(value_type = u64)]
    rev: Rev,
    /// The highest rev sent to one of its sessions.
    #[schema(value_type = u64)]
    delivered_rev: Rev,
    /// The highest rev the device acknowledged (`{"action":"ack","rev"}`).
    #[schema(value_type = u64)]
    applied_rev: Rev,
    /// When `appliedRev` last advanced.
    #[schema(value_type = Option<String>, format = DateTime)]
    applied_time: Option<Timestamp>,
    /// A live session on some node.
    is_connected: bool,
}

impl SyncJson {
    pub(crate) fn new(sync: &DeviceSync, is_connected: bool) -> SyncJson {
        SyncJson {
            rev: sync.rev,
            delivered_rev: sync.progress.delivered,
            applied_rev: sync.progress.applied,
            applied_time: sync.progress.applied_at,
            is_connected,
        }
    }

    /// A device with no store rev and nothing delivered or applied (one just created).
    pub(crate) fn blank() -> SyncJson {
        SyncJson {
            rev: Rev::ZERO,
            delivered_rev: Rev::ZERO,
            applied_rev: Rev::ZERO,
            applied_time: None,
            is_connected: false,
        }
    }
}

/// `GET /devices/{id}/sync`: for the admin, project keys that may read the device, and the
/// device itself.
#[utoipa::path(get, path = "/devices/{id}/sync", tag = "devices", operation_id = "get_device_sync",
    params(("id" = u64, Path, description = "The device id", minimum = 1)), security(("ModeCloud" = [])),
    responses((status = 200, body = SyncJson), Errors))]
pub(crate) async fn get(State(app): State<Arc<App>>, Caller(who): Caller, Path(id): Path<String>) -> Result<Response> {
    let device: DeviceId = id.parse().map_err(|e| Error::invalid_parameter(format!("device {e}")))?;
    let (sync, connected) = app.kv.device_sync(&who, device).await?;
    Ok(axum::Json(SyncJson::new(&sync, connected)).into_response())
}

/// A write's `?wait=applied|delivered[&waitTimeout=S]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Wait {
    what: Awaited,
    timeout: Duration,
    device: DeviceId,
}

/// Reads `wait` and `waitTimeout` (before anything is written: a bad one writes nothing).
pub(crate) fn wait_param(query: &HashMap<String, String>, store: StoreRef) -> Result<Option<Wait>> {
    let what = match query.get("wait").map(String::as_str) {
        None if query.contains_key("waitTimeout") => {
            return Err(Error::invalid_parameter("waitTimeout goes with wait=applied or wait=delivered"));
        }
        None => return Ok(None),
        Some("applied") => Awaited::Applied,
        Some("delivered") => Awaited::Delivered,
        Some(other) => {
            return Err(Error::invalid_parameter(format!("wait must be \"applied\" or \"delivered\", got {other:?}")));
        }
    };
    let timeout = match query.get("waitTimeout") {
        None => DEFAULT_WAIT,
        Some(text) => {
            let seconds = text.parse::<f64>().ok().filter(|s| s.is_finite() && (0.0..=MAX_WAIT_SECS).contains(s));
            let seconds = seconds.ok_or_else(|| {
                Error::invalid_parameter(format!("waitTimeout must be seconds from 0 to {MAX_WAIT_SECS}, got {text:?}"))
            })?;
            Duration::from_secs_f64(seconds)
        }
    };
    let StoreRef::Device(device) = store else {
        return Err(Error::invalid_parameter("wait is for device stores: a home has no device to confirm a write"));
    };
    Ok(Some(Wait { what, timeout, device }))
}

/// What a write that waited for the device says of it: `"applied","appliedRev"` or
/// `"delivered","deliveredRev"`.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Waited {
    /// With `wait=applied`: the device acknowledged the write (or a later rev) in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    applied: Option<bool>,
    /// With `wait=applied`: the device's acknowledged rev when the wait ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    applied_rev: Option<Rev>,
    /// With `wait=delivered`: a session of the device was sent the write in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<bool>,
    /// With `wait=delivered`: the device's delivered rev when the wait ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    delivered_rev: Option<Rev>,
}

/// The answer to a single-key write that waited: `{"rev", …Waited}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = WaitedWrite)]
pub(crate) struct WrittenJson {
    /// The write's rev.
    #[schema(value_type = u64)]
    rev: Rev,
    #[serde(flatten)]
    waited: Waited,
}

impl WrittenJson {
    pub(crate) fn new(rev: Rev, waited: Waited) -> WrittenJson {
        WrittenJson { rev, waited }
    }
}

/// After a write committed at `rev`: waits as asked, and tells how far the device got.
pub(crate) async fn waited(app: &App, wait: Wait, rev: Rev) -> Waited {
    let reached = app.kv.await_progress(wait.device, wait.what, rev, wait.timeout, &app.shutdown).await;
    let (done, reached) = (Some(reached >= rev), Some(reached));
    match wait.what {
        Awaited::Applied => Waited { applied: done, applied_rev: reached, delivered: None, delivered_rev: None },
        Awaited::Delivered => Waited { applied: None, applied_rev: None, delivered: done, delivered_rev: reached },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn wait_parameters_parse_or_refuse() {
        let device = StoreRef::Device(DeviceId::new(3).expect("id"));
        let home = StoreRef::Home(ddp_protocol::HomeId::new(3).expect("id"));
        assert_eq!(wait_param(&query(&[]), device), Ok(None));
        let applied = wait_param(&query(&[("wait", "applied")]), device).expect("ok").expect("some");
        assert_eq!((applied.what, applied.timeout), (Awaited::Applied, DEFAULT_WAIT));
        let delivered = wait_param(&query(&[("wait", "delivered"), ("waitTimeout", "2.5")]), device);
        assert_eq!(
            delivered.expect("ok").map(|w| (w.what, w.timeout)),
            Some((Awaited::Delivered, Duration::from_millis(2500)))
        );
        assert!(wait_param(&query(&[("wait", "applied"), ("waitTimeout", "0")]), device).is_ok());
        assert!(wait_param(&query(&[("wait", "applied"), ("waitTimeout", "60")]), device).is_ok());
        for bad in [
            &[("wait", "seen")][..],
            &[("wait", "")],
            &[("wait", "applied"), ("waitTimeout", "61")],
            &[("wait", "applied"), ("waitTimeout", "-1")],
            &[("wait", "applied"), ("waitTimeout", "NaN")],
            &[("wait", "applied"), ("waitTimeout", "soon")],
            &[("waitTimeout", "5")],
        ] {
            assert!(wait_param(&query(bad), device).is_err(), "{bad:?}");
        }
        assert!(wait_param(&query(&[("wait", "applied")]), home).is_err(), "homes have no device");
    }
}
