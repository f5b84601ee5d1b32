//! Fleet queries and jobs over REST (PROTOCOL.md §12): `GET /devices` with filters and pages,
//! and `POST/GET/DELETE /jobs`. The admin sees everything; a project key lists the devices of
//! the homes it sees, and sees (and cancels) the jobs it created.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{LINK, LOCATION};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ddp_protocol::batch::Op;
use ddp_protocol::{DeviceId, JobId, Reason, Timestamp};
use ddp_store::{JobRecord, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::admin::{DeviceJson, Live};
use super::kv::parse_object;
use super::openapi::Errors;
use super::{Body, Caller};
use crate::app::App;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::fleet::{self, DEFAULT_LIMIT, MAX_LIMIT, Selection, parse_id};

/// `GET /devices[?homeId=&deviceClass=&tag=&isConnected=&where=…&behind=&limit=&after=]`: a
/// page of devices in id order, with `Link: <…>; rel="next"` when more remain.
#[utoipa::path(get, path = "/devices", tag = "fleet", security(("ModeCloud" = [])),
    params(("homeId" = Option<u64>, Query, description = "Devices of this home", minimum = 1),
        ("deviceClass" = Option<String>, Query), ("tag" = Option<String>, Query),
        ("isConnected" = Option<bool>, Query, description = "With (or without) a live session"),
        ("where" = Option<Vec<String>>, Query, explode = true,
            description = "`<key><op><JSON literal>` (op: = != < <= > >=), `<key>` (exists) or `!<key>` (absent); repeatable"),
        ("behind" = Option<bool>, Query, description = "appliedRev below the store's rev (or not)"),
        ("limit" = Option<u32>, Query, description = "1–1000, default 100", minimum = 1, maximum = 1000),
        ("after" = Option<u64>, Query, description = "The last device id of the previous page", minimum = 1)),
    responses((status = 200, body = Vec<DeviceJson>,
        headers(("Link" = String, description = "`</devices?…&after=<last id>>; rel=\"next\"` when more remain"))), Errors))]
pub(crate) async fn list_devices(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    if let Principal::Device(_) = who {
        return Err(Error::denied("a device may only read its own record"));
    }
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()).into_owned().collect();
    let mut selection = Selection::default();
    let (mut limit, mut after) = (None, None);
    for (name, value) in &pairs {
        match name.as_str() {
            "limit" => {
                let n = value.parse::<usize>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                    Error::invalid_parameter(format!(
                        "limit must be a whole number from 1 to {MAX_LIMIT}, got {value:?}"
                    ))
                })?;
                if limit.replace(n).is_some() {
                    return Err(Error::invalid_parameter("limit is given twice"));
                }
            }
            "after" => {
                if after.replace(parse_id::<DeviceId>("after", value)?).is_some() {
                    return Err(Error::invalid_parameter("after is given twice"));
                }
            }
            _ => {
                if !selection.set_param(name, value)? {
                    return Err(Error::invalid_parameter(format!(
                        "unknown parameter {name:?}; filters: homeId, deviceClass, tag, isConnected, where, behind; \
                         paging: limit, after"
                    )));
                }
            }
        }
    }
    let (devices, more) = fleet::find(&app, &who, &selection, after, limit.unwrap_or(DEFAULT_LIMIT)).await?;
    let live = Live::of(&app, &devices).await?;
    let mut response = Json(devices.iter().map(|d| live.json(d)).collect::<Vec<_>>()).into_response();
    if let (true, Some(last)) = (more, devices.last()) {
        let mut next = form_urlencoded::Serializer::new(String::new());
        for (name, value) in pairs.iter().filter(|(n, _)| n != "after") {
            next.append_pair(name, value);
        }
        next.append_pair("after", &last.id.to_string());
        if let Ok(link) = HeaderValue::from_str(&format!("</devices?{}>; rel=\"next\"", next.finish())) {
            response.headers_mut().insert(LINK, link);
        }
    }
    Ok(response)
}

/// A device a job could not write, and why.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = JobError)]
pub(crate) struct JobError<'a> {
    #[schema(value_type = u64)]
    device_id: DeviceId,
    /// `"<REASON>: <message>"`
    reason: &'a str,
}

/// A job and its progress.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Job)]
pub(crate) struct JobJson<'a> {
    #[schema(value_type = u64)]
    id: JobId,
    /// `running`, `done` or `cancelled`.
    state: &'static str,
    /// The selection, as given.
    #[schema(value_type = Object)]
    select: &'a RawValue,
    /// The ops, as given.
    #[schema(value_type = Vec<Object>)]
    ops: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<f64>,
    selected: u64,
    written: u64,
    failed: u64,
    delivered: u64,
    applied: u64,
    errors: Vec<JobError<'a>>,
    #[schema(value_type = String, format = DateTime)]
    creation_time: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    end_time: Option<Timestamp>,
}

fn raw(text: &str) -> &RawValue {
    serde_json::from_str(text).unwrap_or_else(|_| empty_object())
}

fn empty_object() -> &'static RawValue {
    static EMPTY: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| unreachable!("{{}} is JSON")))
}

fn job_json(job: &JobRecord) -> JobJson<'_> {
    JobJson {
        id: job.id,
        state: job.state.as_str(),
        select: raw(&job.select),
        ops: raw(&job.ops),
        rate: job.rate,
        selected: job.selected,
        written: job.written,
        failed: job.failed,
        delivered: job.delivered,
        applied: job.applied,
        errors: job.errors.iter().map(|(device_id, reason)| JobError { device_id: *device_id, reason }).collect(),
        creation_time: job.created,
        end_time: job.ended,
    }
}

/// `POST /jobs`
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewJob)]
struct JobBody<'a> {
    /// Which devices: fixed when the job is created.
    #[schema(value_type = super::openapi::JobSelect, required)]
    select: Option<serde_json::Value>,
    /// The batch (PROTOCOL.md §11) each selected device's store gets.
    #[serde(borrow)]
    #[schema(value_type = Vec<super::openapi::BatchOp>, required, min_items = 1)]
    ops: Option<&'a RawValue>,
    /// Devices per second over all nodes (above 0, at most 1,000,000); absent: as fast as it goes.
    rate: Option<f64>,
}

/// Who may run jobs: the admin and `readWrite` project keys.
fn job_writer(who: &Principal) -> Result<()> {
    match who {
        Principal::Admin => Ok(()),
        Principal::Project(_) if who.may_write() => Ok(()),
        Principal::Project(_) => Err(Error::denied(format!("{who} is read-only; jobs need a readWrite key"))),
        Principal::Device(_) => Err(Error::denied("a device may not run jobs")),
    }
}

/// A job `who` may see: every job for the admin, its own for a project key.
async fn visible_job(app: &App, who: &Principal, id: &str) -> Result<JobRecord> {
    let id: JobId = parse_id("job", id)?;
    let job = match who {
        Principal::Device(_) => return Err(Error::denied("a device may not see jobs")),
        _ => app.store.job(id).await?,
    };
    match who {
        Principal::Project(k) if job.api_key != Some(k.id) => {
            Err(Error::new(Reason::NotFound, format!("job {id} does not exist")))
        }
        _ => Ok(job),
    }
}

/// `POST /jobs` `{"select": {…}, "ops": [op, …], "rate"?: devices per second}`: the devices
/// are selected now, once; the job writes the ops to each as one batch.
#[utoipa::path(post, path = "/jobs", tag = "fleet", security(("ModeCloud" = [])), request_body = JobBody,
    responses((status = 201, body = JobJson, headers(("Location" = String))), Errors))]
pub(crate) async fn create_job(State(app): State<Arc<App>>, Caller(who): Caller, Body(body): Body) -> Result<Response> {
    job_writer(&who)?;
    let body: JobBody<'_> = parse_object(&body, "{\"select\": {…}, \"ops\": [op, …], \"rate\"?: n}")?;
    let select = body.select.ok_or_else(|| {
        Error::invalid_parameter("the body has no \"select\"; select devices by filters, ids, or \"all\": true")
    })?;
    let selection = Selection::from_json(&select)?;
    if selection.is_everything() && !selection.all {
        return Err(Error::invalid_parameter(
            "the selection names no filter; to write every device you can see, say so: \"select\": {\"all\": true}",
        ));
    }
    let ops_raw = body.ops.ok_or_else(|| Error::invalid_parameter("the body has no \"ops\""))?;
    let ops = Op::parse_list(ops_raw)?;
    if ops.is_empty() {
        return Err(Error::invalid_parameter("\"ops\" must hold at least one op"));
    }
    app.kv.check_batch_len(ops.len())?;
    if let Some(rate) = body.rate
        && !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0)
    {
        return Err(Error::invalid_parameter(format!(
            "rate is devices per second: a number above 0 and at most 1000000, got {rate}"
        )));
    }
    let devices = fleet::select_all(&app, &who, &selection).await?;
    let api_key = match &who {
        Principal::Project(k) => Some(k.id),
        _ => None,
    };
    let new = NewJob {
        select: serde_json::to_string(&select).map_err(Error::internal)?,
        ops: ops_raw.get().to_owned(),
        rate: body.rate,
        api_key,
        devices,
    };
    let job = app.store.create_job(new).await?;
    app.jobs_wake.notify_one();
    tracing::info!(job = %job.id, selected = job.selected, rate = ?job.rate, by = %who, "job created");
    Ok((StatusCode::CREATED, [(LOCATION, format!("/jobs/{}", job.id))], Json(job_json(&job))).into_response())
}

/// `GET /jobs`: the jobs the caller may see, by id.
#[utoipa::path(get, path = "/jobs", tag = "fleet", security(("ModeCloud" = [])), responses((status = 200, body = Vec<JobJson>), Errors))]
pub(crate) async fn list_jobs(State(app): State<Arc<App>>, Caller(who): Caller) -> Result<Response> {
    let jobs = match &who {
        Principal::Admin => app.store.jobs(None).await?,
        Principal::Project(k) => app.store.jobs(Some(k.id)).await?,
        Principal::Device(_) => return Err(Error::denied("a device may not see jobs")),
    };
    Ok(Json(jobs.iter().map(job_json).collect::<Vec<_>>()).into_response())
}

/// `GET /jobs/{id}`: a job and its progress.
#[utoipa::path(get, path = "/jobs/{id}", tag = "fleet", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The job id", minimum = 1)),
    responses((status = 200, body = JobJson), Errors))]
pub(crate) async fn get_job(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let job = visible_job(&app, &who, &id).await?;
    Ok(Json(job_json(&job)).into_response())
}

/// `DELETE /jobs/{id}`: cancels what the job has not written yet; the job as it ends.
#[utoipa::path(delete, path = "/jobs/{id}", tag = "fleet", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The job id", minimum = 1)),
    responses((status = 200, description = "Cancelled (an ended job stays as it was)", body = JobJson), Errors))]
pub(crate) async fn cancel_job(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    job_writer(&who)?;
    let job = visible_job(&app, &who, &id).await?;
    let job = app.store.cancel_job(job.id).await?;
    tracing::info!(job = %job.id, written = job.written, by = %who, "job cancelled");
    Ok(Json(job_json(&job)).into_response())
}
