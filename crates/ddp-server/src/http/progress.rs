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
use crate::app::App;
use crate::error::{Error, Result};
use crate::progress::Awaited;

/// How long a write waits for the device when `waitTimeout` is not given.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// The longest `waitTimeout`, in seconds.
const MAX_WAIT_SECS: f64 = 60.0;

/// Where a device's sync stands, as REST shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SyncJson {
    rev: Rev,
    delivered_rev: Rev,
    applied_rev: Rev,
    applied_time: Option<Timestamp>,
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

/// After a write committed at `rev`: waits as asked, and gives the answer's body
/// `{"rev","applied","appliedRev"}` or `{"rev","delivered","deliveredRev"}`.
pub(crate) async fn waited(app: &App, wait: Wait, rev: Rev) -> serde_json::Value {
    let reached = app.kv.await_progress(wait.device, wait.what, rev, wait.timeout, &app.shutdown).await;
    match wait.what {
        Awaited::Applied => serde_json::json!({ "rev": rev, "applied": reached >= rev, "appliedRev": reached }),
        Awaited::Delivered => serde_json::json!({ "rev": rev, "delivered": reached >= rev, "deliveredRev": reached }),
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
