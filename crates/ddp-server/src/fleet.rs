//! Fleet queries and jobs (PROTOCOL.md §12): which devices a selection names, and the job
//! runner that writes them.
//!
//! A selection is the filters of `GET /devices` (query parameters) or a job's `select` object;
//! both parse into a [`Selection`]. Storage answers everything but `isConnected` from its
//! indexes ([`ddp_store::fleet`]); `isConnected` is known to the session registry, so pages are
//! read in id order and filtered here.
//!
//! Each node runs one job [`runner`]: it claims a chunk of unwritten devices of a running job
//! from storage (a lease; on PostgreSQL other nodes skip them), writes each through the gate —
//! the same write path as every other write, with the rights of the job's creator, so a scoped
//! key's job touches only devices it can see — and records failures. Storage records each
//! device's write as the job's in the write's own transaction, so a device is written once
//! however claims, crashes and restarts interleave. A job's selection is fixed when it is
//! created.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ddp_protocol::batch::Op;
use ddp_protocol::fleet::Where;
use ddp_protocol::{DeviceId, HomeId, Timestamp};
use ddp_store::{ClaimOutcome, DeviceQuery, DeviceRecord, JobClaim, StoreError};
use futures_util::StreamExt;
use serde_json::{Map, Value as Json};

use crate::app::App;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::http::json_id;

/// Most devices a page of `GET /devices` holds.
pub(crate) const MAX_LIMIT: usize = 1000;
/// Devices a page holds when `limit` is not given.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// Most devices one job may select.
pub(crate) const MAX_JOB_DEVICES: usize = 1_000_000;
/// Most ids a selection may name.
pub(crate) const MAX_SELECT_IDS: usize = 10_000;
/// Devices a runner claims at once (a rated job: a second's worth, at most this).
const CLAIM_MAX: usize = 500;
/// How long a claim keeps other nodes off its devices.
const LEASE_MS: i64 = 60_000;
/// Job writes a runner has in flight at once: enough for group commit to batch them (a job over
/// 100,000 devices writes about 15,000 a second on the embedded store), few enough that other
/// clients' writes still find room (with 64, their p99 rose about 4×; with 8, about 2×).
const IN_FLIGHT: usize = 8;
/// How often an idle runner looks for jobs created on other nodes.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Which devices: every filter combined with AND (an empty selection is every device).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Selection {
    /// Everything storage filters on (its `scope`, `after` and `limit` are set per call).
    pub(crate) query: DeviceQuery,
    /// `isConnected`.
    pub(crate) is_connected: Option<bool>,
    /// `"all": true` in a job's selection.
    pub(crate) all: bool,
}

impl Selection {
    /// Whether it names no filter at all.
    pub(crate) fn is_everything(&self) -> bool {
        let q = &self.query;
        q.home.is_none()
            && q.device_class.is_none()
            && q.tag.is_none()
            && q.wheres.is_empty()
            && q.behind.is_none()
            && q.ids.is_none()
            && self.is_connected.is_none()
    }

    /// Reads one filter given as a query parameter (`name=value`); false for a name that is
    /// not a filter.
    pub(crate) fn set_param(&mut self, name: &str, value: &str) -> Result<bool> {
        match name {
            "homeId" => once(&mut self.query.home, name, parse_id(name, value)?)?,
            "deviceClass" => once(&mut self.query.device_class, name, value.to_owned())?,
            "tag" => once(&mut self.query.tag, name, value.to_owned())?,
            "isConnected" => once(&mut self.is_connected, name, parse_bool(name, value)?)?,
            "behind" => once(&mut self.query.behind, name, parse_bool(name, value)?)?,
            "where" => self.query.wheres.push(Where::parse(value).map_err(Error::invalid_parameter)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A job's `select` object: the filters by their query names (`where` an array of
    /// conditions), or `ids`, or `"all": true`.
    pub(crate) fn from_json(select: &Json) -> Result<Selection> {
        const FIELDS: &[&str] = &["homeId", "deviceClass", "tag", "isConnected", "where", "behind", "ids", "all"];
        let Json::Object(map) = select else {
            return Err(Error::invalid_parameter("\"select\" must be an object of filters"));
        };
        if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(Error::invalid_parameter(format!(
                "select: unknown filter {unknown:?}; filters: {}",
                FIELDS.join(", ")
            )));
        }
        let mut s = Selection::default();
        let field = |name: &str| map.get(name).filter(|v| !v.is_null());
        if let Some(v) = field("homeId") {
            s.query.home = Some(json_id("select.homeId", v)?);
        }
        s.query.device_class = json_string(map, "deviceClass")?;
        s.query.tag = json_string(map, "tag")?;
        s.is_connected = json_bool(map, "isConnected")?;
        s.query.behind = json_bool(map, "behind")?;
        if let Some(v) = field("where") {
            let Json::Array(conditions) = v else {
                return Err(Error::invalid_parameter("select.where must be an array of conditions like \"fw<2.1\""));
            };
            for c in conditions {
                let Json::String(c) = c else {
                    return Err(Error::invalid_parameter(format!("select.where holds {c}, not a condition string")));
                };
                s.query.wheres.push(Where::parse(c).map_err(Error::invalid_parameter)?);
            }
        }
        if let Some(v) = field("ids") {
            let Json::Array(ids) = v else {
                return Err(Error::invalid_parameter("select.ids must be an array of device ids"));
            };
            if ids.is_empty() {
                return Err(Error::invalid_parameter("select.ids must name at least one device"));
            }
            if ids.len() > MAX_SELECT_IDS {
                return Err(Error::invalid_parameter(format!(
                    "select.ids names more than {MAX_SELECT_IDS} devices; select by filters instead"
                )));
            }
            s.query.ids = Some(ids.iter().map(|v| json_id("select.ids", v)).collect::<Result<_>>()?);
        }
        match json_bool(map, "all")? {
            Some(true) => s.all = true,
            Some(false) => return Err(Error::invalid_parameter("select.all may only be true (every device)")),
            None => {}
        }
        Ok(s)
    }
}

fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(Error::invalid_parameter(format!("{name} is given twice")));
    }
    *slot = Some(value);
    Ok(())
}

pub(crate) fn parse_id<T: std::str::FromStr<Err = ddp_protocol::IdError>>(name: &str, text: &str) -> Result<T> {
    text.parse().map_err(|e| Error::invalid_parameter(format!("{name}: {e}")))
}

fn parse_bool(name: &str, text: &str) -> Result<bool> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::invalid_parameter(format!("{name} must be true or false, got {text:?}"))),
    }
}

fn json_string(map: &Map<String, Json>, name: &str) -> Result<Option<String>> {
    match map.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(Error::invalid_parameter(format!("select.{name} must be a string, got {v}"))),
    }
}

fn json_bool(map: &Map<String, Json>, name: &str) -> Result<Option<bool>> {
    match map.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Error::invalid_parameter(format!("select.{name} must be true or false, got {v}"))),
    }
}

/// The homes `who` may list devices of (`None`: all, and devices in no home).
fn scope_of(who: &Principal) -> Result<Option<Vec<HomeId>>> {
    match who {
        Principal::Admin => Ok(None),
        Principal::Project(k) => Ok(k.homes.clone()),
        Principal::Device(_) => Err(Error::denied("a device may only read its own record")),
    }
}

/// Checks that a `homeId` filter names a home that exists and that `who` sees.
async fn check_home(app: &App, who: &Principal, home: Option<HomeId>) -> Result<()> {
    if let Some(h) = home {
        if !who.sees_home(h) {
            return Err(Error::denied(format!("{who} may not see home {h}")));
        }
        app.store.home(h).await?;
    }
    Ok(())
}

/// One page of the devices `selection` names that `who` sees, after `after`: at most `limit`,
/// and whether more remain.
pub(crate) async fn find(
    app: &App,
    who: &Principal,
    selection: &Selection,
    after: Option<DeviceId>,
    limit: usize,
) -> Result<(Vec<DeviceRecord>, bool)> {
    check_home(app, who, selection.query.home).await?;
    let mut q = DeviceQuery { scope: scope_of(who)?, after, ..selection.query.clone() };
    let mut out = Vec::new();
    match selection.is_connected {
        None => {
            q.limit = limit + 1;
            out = app.store.find_devices(q).await?;
        }
        Some(wanted) => {
            q.limit = MAX_LIMIT;
            loop {
                let page = app.store.find_devices(q.clone()).await?;
                let Some(last) = page.last().map(|d| d.id) else { break };
                let full = page.len() == MAX_LIMIT;
                let connected: HashSet<DeviceId> =
                    app.store.connected(page.iter().map(|d| d.id).collect()).await?.into_iter().collect();
                out.extend(page.into_iter().filter(|d| connected.contains(&d.id) == wanted));
                if out.len() > limit || !full {
                    break;
                }
                q.after = Some(last);
            }
        }
    }
    let more = out.len() > limit;
    out.truncate(limit);
    Ok((out, more))
}

/// Every device `selection` names that `who` sees (a job's selection, fixed at its creation).
pub(crate) async fn select_all(app: &App, who: &Principal, selection: &Selection) -> Result<Vec<DeviceId>> {
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = find(app, who, selection, after, MAX_LIMIT).await?;
        ids.extend(page.iter().map(|d| d.id));
        if ids.len() > MAX_JOB_DEVICES {
            return Err(Error::invalid_parameter(format!(
                "the selection holds more than {MAX_JOB_DEVICES} devices; narrow it or split the job"
            )));
        }
        match page.last() {
            Some(last) if more => after = Some(last.id),
            _ => return Ok(ids),
        }
    }
}

// ---- the runner ----

/// Claims and writes job work until shutdown; `wake` is notified when a job is created here.
pub(crate) async fn runner(app: Arc<App>) {
    loop {
        if app.shutdown.is_cancelled() {
            return;
        }
        let pause = match app.store.claim_job_work(CLAIM_MAX, LEASE_MS, Timestamp::now()).await {
            Ok(ClaimOutcome::Claimed(claim)) => {
                metrics::gauge!("ddp_jobs_running").set(claim.running as f64);
                write_claim(&app, claim).await;
                continue;
            }
            Ok(ClaimOutcome::Wait { until, running }) => {
                metrics::gauge!("ddp_jobs_running").set(running as f64);
                let ms = until.millis().saturating_sub(Timestamp::now().millis()).clamp(20, 1_000);
                Duration::from_millis(u64::try_from(ms).unwrap_or(1_000))
            }
            Ok(ClaimOutcome::Idle) => {
                metrics::gauge!("ddp_jobs_running").set(0.0);
                IDLE_POLL
            }
            Err(StoreError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "claiming job work failed; trying again");
                IDLE_POLL
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = app.jobs_wake.notified() => {}
            () = app.shutdown.cancelled() => return,
        }
    }
}

/// The principal a job writes as: the admin, or its project key as it is now.
async fn creator(app: &App, claim: &JobClaim) -> Result<Option<Principal>> {
    let Some(id) = claim.api_key else { return Ok(Some(Principal::Admin)) };
    let keys = app.store.api_keys().await?;
    Ok(keys.into_iter().find(|k| k.id == id).map(|k| Principal::Project(Arc::new(k))))
}

/// Writes the claimed devices and records what failed.
async fn write_claim(app: &App, claim: JobClaim) {
    let job = claim.job;
    let who = match creator(app, &claim).await {
        Ok(Some(who)) => who,
        Ok(None) => {
            tracing::warn!(job = %job, "the job's API key was deleted; cancelling the job");
            if let Err(e) = app.store.cancel_job(job).await {
                tracing::warn!(job = %job, error = %e, "cancelling a job failed");
            }
            return;
        }
        Err(e) => {
            tracing::warn!(job = %job, error = %e, "reading a job's API key failed; its claim will be retried");
            return;
        }
    };
    let ops = serde_json::from_str::<&serde_json::value::RawValue>(&claim.ops)
        .map_err(|e| e.to_string())
        .and_then(|raw| Op::parse_list(raw).map_err(|e| e.message));
    let ops = match ops {
        Ok(ops) => ops,
        Err(e) => {
            tracing::error!(job = %job, error = %e, "a stored job's ops do not parse; failing its devices");
            let failed = claim.devices.iter().map(|d| (*d, format!("INTERNAL_ERROR: the job's ops: {e}"))).collect();
            let _ = app.store.job_results(job, failed).await;
            return;
        }
    };
    let writes = futures_util::stream::iter(claim.devices.iter().copied())
        .map(|device| {
            let (who, ops) = (&who, ops.clone());
            async move { (device, app.kv.job_batch(who, job, device, ops).await) }
        })
        .buffer_unordered(IN_FLIGHT);
    let results: Vec<(DeviceId, Result<Vec<ddp_store::Change>>)> = writes.collect().await;
    let mut failed = Vec::new();
    let (mut written, mut retried) = (0u64, 0u64);
    for (device, result) in results {
        match result {
            Ok(_) => written += 1,
            Err(e) if e.is_job_gone() => {} // cancelled, or written by an earlier claim
            // Storage trouble: the device stays unwritten; its lease runs out and it is claimed again.
            Err(e) if e.status() >= 500 => retried += 1,
            Err(e) => failed.push((device, format!("{}: {}", e.reason.as_str(), e.message))),
        }
    }
    metrics::counter!("ddp_job_devices_written_total").increment(written);
    metrics::counter!("ddp_job_devices_failed_total").increment(failed.len() as u64);
    if retried > 0 {
        tracing::warn!(job = %job, devices = retried, "job writes failed for storage reasons; they will be retried");
    }
    match app.store.job_results(job, failed).await {
        Ok(ddp_store::JobState::Done) => tracing::info!(job = %job, "job done"),
        Ok(_) => {}
        Err(e) => tracing::warn!(job = %job, error = %e, "recording a job's failures failed"),
    }
}
