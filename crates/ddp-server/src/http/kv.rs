//! `/devices/{id}/kv…` and `/homes/{id}/kv…` (PROTOCOL.md §3).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Path, Query, State};
use axum::http::header::{ETAG, IF_MATCH, IF_NONE_MATCH};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ddp_protocol::batch::Op;
use ddp_protocol::{DeviceId, HomeId, Reason, Rev, Timestamp, Value, ValueError};
use ddp_store::{Condition, StoreRef};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::progress::{Wait, Waited, WrittenJson, wait_param, waited};
use super::{Body, Caller};
use crate::app::App;
use crate::error::{Error, Result};
use crate::kv::{Transport, parse_key};

/// The store (and key) named by a kv route's path.
pub(crate) struct KvPath {
    store: StoreRef,
    key: Option<String>,
}

impl FromRequestParts<Arc<App>> for KvPath {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<KvPath> {
        let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, app).await?;
        let is_home = parts.extensions.get::<MatchedPath>().is_some_and(|p| p.as_str().starts_with("/homes/"));
        let id = params.remove("id").unwrap_or_default();
        let store = if is_home {
            StoreRef::Home(id.parse::<HomeId>().map_err(|e| Error::invalid_parameter(format!("home {e}")))?)
        } else {
            StoreRef::Device(id.parse::<DeviceId>().map_err(|e| Error::invalid_parameter(format!("device {e}")))?)
        };
        Ok(KvPath { store, key: params.remove("key") })
    }
}

/// One item as REST shows it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Item)]
pub(crate) struct ItemJson<'a> {
    key: &'a str,
    /// Any JSON value but `null`, exactly as written (numbers keep their text).
    #[schema(schema_with = super::openapi::any_value)]
    value: &'a Value,
    #[schema(value_type = String, format = DateTime)]
    modification_time: Timestamp,
}

fn etag(rev: Rev) -> HeaderValue {
    HeaderValue::from_str(&rev.etag()).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// Whether an `If-None-Match` header on a GET matches `rev` (then the answer is 304).
fn not_modified(headers: &HeaderMap, rev: Rev) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == "*" || parse_etag(tag) == Some(rev))
}

/// `"5"`, `W/"5"` or a bare `5`.
fn parse_etag(tag: &str) -> Option<Rev> {
    let tag = tag.trim();
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    let tag = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(tag);
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    tag.parse().ok().map(Rev)
}

/// The precondition of a PUT (`create_only_allowed`) or DELETE (PROTOCOL.md §3.2).
fn condition(headers: &HeaderMap, create_only_allowed: bool) -> Result<Condition> {
    let text = |name| -> Result<Option<String>> {
        let values: Vec<&str> = headers
            .get_all(&name)
            .iter()
            .map(|v| v.to_str().map_err(|_| Error::invalid_parameter(format!("{name} is not readable text"))))
            .collect::<Result<_>>()?;
        Ok(if values.is_empty() { None } else { Some(values.join(",")) })
    };
    match (text(IF_MATCH)?, text(IF_NONE_MATCH)?) {
        (None, None) => Ok(Condition::None),
        (Some(_), Some(_)) => Err(Error::invalid_parameter("send either If-Match or If-None-Match, not both")),
        (Some(m), None) if m.trim() == "*" => Ok(Condition::Exists),
        (Some(m), None) => {
            let revs = m
                .split(',')
                .map(|t| {
                    parse_etag(t).ok_or_else(|| {
                        Error::invalid_parameter(format!("If-Match must hold revs like \"5\", got {t:?}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Condition::RevIn(revs))
        }
        (None, Some(n)) if n.trim() == "*" && create_only_allowed => Ok(Condition::Absent),
        (None, Some(_)) if create_only_allowed => {
            Err(Error::invalid_parameter("a write accepts only If-None-Match: *"))
        }
        (None, Some(_)) => Err(Error::invalid_parameter("DELETE does not take If-None-Match")),
    }
}

/// `GET /devices/{id}/kv`: a WebSocket sync session when the request asks for an upgrade
/// (token in the header or `?authToken=`, optional `?sinceRev=N`), else the list.
pub(crate) async fn list_or_watch(State(app): State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
    let (mut parts, _body) = request.into_parts();
    let path = KvPath::from_request_parts(&mut parts, &app).await?;
    let Query(query) = Query::<HashMap<String, String>>::from_request_parts(&mut parts, &app).await?;
    match super::upgrade::Upgrade::from_parts(&mut parts)? {
        Some(upgrade) => {
            let auth = super::authenticate(&app, &parts, query.get("authToken").map(String::as_str)).await?;
            let since = query
                .get("sinceRev")
                .map(|s| {
                    s.parse::<u64>()
                        .map(Rev)
                        .map_err(|_| Error::invalid_parameter(format!("sinceRev must be a rev, got {s:?}")))
                })
                .transpose()?;
            let flag = |name: &str| match query.get(name).map(String::as_str) {
                None | Some("0" | "false") => Ok(false),
                Some("1" | "true") => Ok(true),
                Some(other) => Err(Error::invalid_parameter(format!("{name} must be 1 or 0, got {other:?}"))),
            };
            let (commands, batches) = (flag("commands")?, flag("batches")?);
            super::ws::accept(app, upgrade, auth, path.store, since, commands, batches).await
        }
        None => {
            let auth = super::authenticate(&app, &parts, None).await?;
            list_store(&app, &auth.principal, path, &query, &parts.headers).await
        }
    }
}

/// `GET /homes/{id}/kv[?keyPrefix=p]` (a home's store has no sync session).
pub(crate) async fn list(State(app): State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
    let (mut parts, _body) = request.into_parts();
    let path = KvPath::from_request_parts(&mut parts, &app).await?;
    let Query(query) = Query::<HashMap<String, String>>::from_request_parts(&mut parts, &app).await?;
    let auth = super::authenticate(&app, &parts, None).await?;
    list_store(&app, &auth.principal, path, &query, &parts.headers).await
}

async fn list_store(
    app: &App,
    who: &crate::auth::Principal,
    path: KvPath,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Response> {
    let snapshot = app.kv.snapshot(who, path.store, query.get("keyPrefix").map(String::as_str)).await?;
    if not_modified(headers, snapshot.rev) {
        return Ok((StatusCode::NOT_MODIFIED, [(ETAG, etag(snapshot.rev))]).into_response());
    }
    let items: Vec<ItemJson<'_>> = snapshot
        .items
        .iter()
        .map(|i| ItemJson { key: i.key.as_str(), value: &i.value, modification_time: i.modified })
        .collect();
    Ok(([(ETAG, etag(snapshot.rev))], axum::Json(items)).into_response())
}

/// `GET …/kv/{key}`
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    path: KvPath,
    headers: HeaderMap,
) -> Result<Response> {
    let key = parse_key(path.key.as_deref().unwrap_or_default())?;
    let item = app.kv.get(&who, path.store, key).await?;
    if not_modified(&headers, item.rev) {
        return Ok((StatusCode::NOT_MODIFIED, [(ETAG, etag(item.rev))]).into_response());
    }
    let body = ItemJson { key: item.key.as_str(), value: &item.value, modification_time: item.modified };
    Ok(([(ETAG, etag(item.rev))], axum::Json(body)).into_response())
}

/// `PUT …/kv/{key}`
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = NewValue)]
struct PutBody<'a> {
    /// Any JSON value but `null`.
    #[serde(borrow)]
    #[schema(schema_with = super::openapi::any_value, required)]
    value: Option<&'a RawValue>,
}

/// Parses a body that must be a JSON object of `shape` (named in errors, e.g.
/// `{"value": <json>}`). serde would also take a JSON array for a struct; the contract wants an
/// object. Nesting too deep is `INVALID_VALUE`, anything else unreadable `INVALID_JSON`.
pub(super) fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8], shape: &str) -> Result<T> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::invalid_json(format!("the body must be a JSON object {shape}")));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            Error::new(Reason::InvalidValue, ValueError::TooDeep.to_string())
        } else {
            Error::invalid_json(format!("the body must be a JSON object {shape}: {e}"))
        }
    })
}

/// Parses `{"value": <json>}`.
fn parse_put_body(body: &[u8]) -> Result<Value> {
    let parsed: PutBody<'_> = parse_object(body, "{\"value\": <json>}")?;
    let raw =
        parsed.value.ok_or_else(|| Error::new(Reason::InvalidValue, "the body has no \"value\", or it is null"))?;
    Value::from_raw(raw).map_err(|e| Error::new(Reason::InvalidValue, e.to_string()))
}

/// `PUT …/kv/{key}` with `{"value": <json>}`; `?wait=` waits for the device (PROTOCOL.md §10).
pub(crate) async fn put(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    path: KvPath,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response> {
    let key = parse_key(path.key.as_deref().unwrap_or_default())?;
    let condition = condition(&headers, true)?;
    let wait = wait_param(&query, path.store)?;
    let value = parse_put_body(&body)?;
    let change = app.kv.set(&who, Transport::Rest, path.store, key, value, condition).await?;
    written(&app, change.rev, wait).await
}

/// `DELETE …/kv/{key}`; `?wait=` waits for the device (PROTOCOL.md §10).
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    path: KvPath,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response> {
    let key = parse_key(path.key.as_deref().unwrap_or_default())?;
    let condition = condition(&headers, false)?;
    let wait = wait_param(&query, path.store)?;
    let change = app.kv.delete(&who, Transport::Rest, path.store, key, condition).await?;
    written(&app, change.rev, wait).await
}

/// `If-Match: "<store rev>"` on a batch: the whole batch is conditional on the store's rev.
fn store_condition(headers: &HeaderMap) -> Result<Option<Rev>> {
    if headers.contains_key(IF_NONE_MATCH) {
        return Err(Error::invalid_parameter("a batch takes If-Match: \"<store rev>\", not If-None-Match"));
    }
    let values: Vec<&str> = headers
        .get_all(IF_MATCH)
        .iter()
        .map(|v| v.to_str().map_err(|_| Error::invalid_parameter("If-Match is not readable text")))
        .collect::<Result<_>>()?;
    match values.as_slice() {
        [] => Ok(None),
        [one] => parse_etag(one).map(Some).ok_or_else(|| {
            Error::invalid_parameter(format!("If-Match on a batch is one store rev like \"5\", got {one:?}"))
        }),
        _ => Err(Error::invalid_parameter("If-Match on a batch is one store rev")),
    }
}

/// `PATCH …/kv`
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(as = Batch)]
struct PatchBody<'a> {
    /// 1–100 ops (`--max-batch-ops`), applied in order, all or none.
    #[serde(borrow)]
    #[schema(value_type = Vec<super::openapi::BatchOp>, required, min_items = 1)]
    ops: Option<&'a RawValue>,
}

/// One change of a batch, as its answer lists it.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = BatchResult)]
pub(crate) struct ResultJson<'a> {
    key: &'a str,
    #[schema(value_type = u64)]
    rev: Rev,
}

/// The answer to a batch: its last rev and each change's.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = BatchAnswer)]
pub(crate) struct BatchJson<'a> {
    /// The rev of the batch's last change (the store's new rev).
    #[schema(value_type = u64)]
    rev: Rev,
    results: Vec<ResultJson<'a>>,
    /// With `?wait=`: how far the device got.
    #[serde(flatten)]
    waited: Waited,
}

/// `PATCH …/kv` with `{"ops":[…]}` (PROTOCOL.md §11): every op or none, consecutive revs;
/// `200 {"rev","results":[{"key","rev"}…]}` with the store's new rev as `ETag`. `If-Match` makes
/// it conditional on the store's rev; `?wait=` waits for the device (§10).
pub(crate) async fn patch_store(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    path: KvPath,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response> {
    let store_rev = store_condition(&headers)?;
    let wait = wait_param(&query, path.store)?;
    let parsed: PatchBody<'_> = parse_object(&body, "{\"ops\": [op, …]}")?;
    let ops = parsed.ops.ok_or_else(|| Error::invalid_parameter("the body has no \"ops\""))?;
    // The op count is checked by the gate, as for a device's batch frame.
    let ops = Op::parse_list(ops)?;
    let changes = app.kv.batch(&who, Transport::Rest, path.store, ops, store_rev).await?;
    let rev = changes.last().map_or(Rev::ZERO, |c| c.rev);
    let results = changes.iter().map(|c| ResultJson { key: c.key.as_str(), rev: c.rev }).collect();
    let waited = match wait {
        Some(wait) => waited(&app, wait, rev).await,
        None => Waited::default(),
    };
    Ok(([(ETAG, etag(rev))], axum::Json(BatchJson { rev, results, waited })).into_response())
}

/// `PATCH …/kv/{key}` with `Content-Type: application/merge-patch+json`: RFC 7396 merge of the
/// body (an object) into the key's value; answered like a PUT.
pub(crate) async fn patch_key(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    path: KvPath,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response> {
    let key = parse_key(path.key.as_deref().unwrap_or_default())?;
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/merge-patch+json") {
        return Err(Error::invalid_parameter(format!(
            "PATCH of a key takes Content-Type: application/merge-patch+json (RFC 7396), got {content_type:?}"
        )));
    }
    let condition = condition(&headers, true)?;
    let wait = wait_param(&query, path.store)?;
    let text = std::str::from_utf8(&body).map_err(|_| Error::invalid_json("the body is not UTF-8"))?;
    let patch = Value::parse(text).map_err(|e| match e {
        ValueError::Invalid(m) => Error::invalid_json(format!("the merge patch is not JSON: {m}")),
        other => Error::new(Reason::InvalidValue, other.to_string()),
    })?;
    let change = app.kv.merge(&who, Transport::Rest, path.store, key, patch, condition).await?;
    written(&app, change.rev, wait).await
}

/// The answer to a committed write: `204` with its `ETag`, or after the wait it asked for
/// `200 {"rev","applied","appliedRev"}` (or `…delivered…`).
async fn written(app: &App, rev: Rev, wait: Option<Wait>) -> Result<Response> {
    match wait {
        None => Ok((StatusCode::NO_CONTENT, [(ETAG, etag(rev))]).into_response()),
        Some(wait) => {
            let answer = WrittenJson::new(rev, waited(app, wait, rev).await);
            Ok(([(ETAG, etag(rev))], axum::Json(answer)).into_response())
        }
    }
}

/// `…/kv/` with an empty key.
pub(crate) async fn empty_key(Caller(_who): Caller) -> Error {
    Error::new(Reason::InvalidKey, "key must not be empty")
}

/// The documented routes of one kind of store, `device` or `home`: the handlers above serve
/// both (the matched path tells which), and these thin wrappers give each path its operation in
/// the OpenAPI document. `$lister` answers `GET $kv`; `$id` describes its `{id}`.
macro_rules! store_routes {
    ($module:ident, $lister:ident, $tag:tt, $kv:tt, $key:tt, $id:tt) => {
        /// The documented routes of one kind of store (see `store_routes!`).
        pub(crate) mod $module {
            use super::*;
            use crate::http::openapi::{Errors, IfMatch, KeyParam, Preconditions, WaitQuery};

            /// Every key, or those under `keyPrefix`. `If-None-Match` with the store's rev: `304`.
            #[utoipa::path(get, path = $kv, tag = $tag, operation_id = concat!(stringify!($module), "List"), security(("ModeCloud" = [])),
                params(("id" = u64, Path, description = $id, minimum = 1),
                    ("keyPrefix" = Option<String>, Query, description = "Only keys starting with it"),
                    ("If-None-Match" = Option<String>, Header, description = "A store rev (`\"5\"`): 304 if unchanged")),
                responses((status = 200, body = Vec<ItemJson>,
                        headers(("ETag" = String, description = "The store's rev, `\"<rev>\"`"))),
                    (status = 304, description = "Not modified since the rev in If-None-Match"), Errors))]
            pub(crate) async fn list(app: State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
                super::$lister(app, request).await
            }

            /// An atomic batch (PROTOCOL.md §11): every op or none, consecutive revs.
            #[utoipa::path(patch, path = $kv, tag = $tag, operation_id = concat!(stringify!($module), "Batch"), security(("ModeCloud" = [])),
                params(("id" = u64, Path, description = $id, minimum = 1),
                    ("If-Match" = Option<String>, Header, description = "The store's rev (`\"5\"`): all or nothing if it still is"),
                    WaitQuery),
                request_body = PatchBody,
                responses((status = 200, body = BatchJson,
                        headers(("ETag" = String, description = "The batch's last rev"))), Errors))]
            pub(crate) async fn batch(
                app: State<Arc<App>>,
                caller: Caller,
                path: KvPath,
                query: Query<HashMap<String, String>>,
                headers: HeaderMap,
                body: Body,
            ) -> Result<Response> {
                super::patch_store(app, caller, path, query, headers, body).await
            }

            /// One key's value.
            #[utoipa::path(get, path = $key, tag = $tag, operation_id = concat!(stringify!($module), "Get"), security(("ModeCloud" = [])),
                params(("id" = u64, Path, description = $id, minimum = 1),
                    KeyParam,
                    ("If-None-Match" = Option<String>, Header, description = "The item's rev (`\"5\"`): 304 if unchanged")),
                responses((status = 200, body = ItemJson,
                        headers(("ETag" = String, description = "The item's rev, `\"<rev>\"`"))),
                    (status = 304, description = "Not modified since the rev in If-None-Match"), Errors))]
            pub(crate) async fn get(app: State<Arc<App>>, caller: Caller, path: KvPath, headers: HeaderMap) -> Result<Response> {
                super::get(app, caller, path, headers).await
            }

            /// Sets a key. `If-Match: "<rev>"` (or `*`) or `If-None-Match: *` make it conditional (§3.2).
            #[utoipa::path(put, path = $key, tag = $tag, operation_id = concat!(stringify!($module), "Set"), security(("ModeCloud" = [])),
                params(("id" = u64, Path, description = $id, minimum = 1),
                    KeyParam,
                    Preconditions, WaitQuery),
                request_body = PutBody,
                responses((status = 204, description = "Written", headers(("ETag" = String, description = "The write's rev"))),
                    (status = 200, description = "Written, after the wait it asked for", body = WrittenJson,
                        headers(("ETag" = String, description = "The write's rev"))), Errors))]
            pub(crate) async fn put(
                app: State<Arc<App>>,
                caller: Caller,
                path: KvPath,
                query: Query<HashMap<String, String>>,
                headers: HeaderMap,
                body: Body,
            ) -> Result<Response> {
                super::put(app, caller, path, query, headers, body).await
            }

            /// Deletes a key. `If-Match: "<rev>"` (or `*`) makes it conditional.
            #[utoipa::path(delete, path = $key, tag = $tag, operation_id = concat!(stringify!($module), "Delete"), security(("ModeCloud" = [])),
                params(("id" = u64, Path, description = $id, minimum = 1),
                    KeyParam,
                    IfMatch, WaitQuery),
                responses((status = 204, description = "Deleted", headers(("ETag" = String, description = "The delete's rev"))),
                    (status = 200, description = "Deleted, after the wait it asked for", body = WrittenJson,
                        headers(("ETag" = String, description = "The delete's rev"))), Errors))]
            pub(crate) async fn delete(
                app: State<Arc<App>>,
                caller: Caller,
                path: KvPath,
                query: Query<HashMap<String, String>>,
                headers: HeaderMap,
            ) -> Result<Response> {
                super::delete(app, caller, path, query, headers).await
            }

            /// RFC 7396 JSON merge patch of the key's value (§11).
            #[utoipa::path(patch, path = $key, tag = $tag, operation_id = concat!(stringify!($module), "Merge"), security(("ModeCloud" = [])),
                params(("id" = u64, Path, description = $id, minimum = 1),
                    KeyParam,
                    Preconditions, WaitQuery),
                request_body(content = Object, content_type = "application/merge-patch+json",
                    description = "The merge patch: an object; members set to null are removed"),
                responses((status = 204, description = "Merged", headers(("ETag" = String, description = "The write's rev"))),
                    (status = 200, description = "Merged, after the wait it asked for", body = WrittenJson,
                        headers(("ETag" = String, description = "The write's rev"))), Errors))]
            pub(crate) async fn merge(
                app: State<Arc<App>>,
                caller: Caller,
                path: KvPath,
                query: Query<HashMap<String, String>>,
                headers: HeaderMap,
                body: Body,
            ) -> Result<Response> {
                super::patch_key(app, caller, path, query, headers, body).await
            }
        }
    };
}

store_routes!(device, list_or_watch, "stores", "/devices/{id}/kv", "/devices/{id}/kv/{*key}", "The device id");
store_routes!(home, list, "stores", "/homes/{id}/kv", "/homes/{id}/kv/{*key}", "The home id");

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn preconditions_parse() {
        assert_eq!(condition(&headers(&[]), true), Ok(Condition::None));
        assert_eq!(condition(&headers(&[("if-match", "\"3\"")]), true), Ok(Condition::RevIn(vec![Rev(3)])));
        assert_eq!(
            condition(&headers(&[("if-match", "\"3\", W/\"4\"")]), true),
            Ok(Condition::RevIn(vec![Rev(3), Rev(4)]))
        );
        assert_eq!(condition(&headers(&[("if-match", "*")]), false), Ok(Condition::Exists));
        assert_eq!(condition(&headers(&[("if-none-match", "*")]), true), Ok(Condition::Absent));
        for bad in
            [&[("if-none-match", "*")][..], &[("if-match", "\"x\"")], &[("if-match", "1"), ("if-none-match", "*")]]
        {
            assert!(condition(&headers(bad), false).is_err(), "{bad:?}");
        }
        assert!(condition(&headers(&[("if-none-match", "\"3\"")]), true).is_err());
    }

    #[test]
    fn put_bodies_parse() {
        assert_eq!(parse_put_body(br#"{"value": 1.10}"#).map(|v| v.as_json().to_owned()), Ok("1.10".to_owned()));
        let reason = |b: &[u8]| parse_put_body(b).err().map(|e| e.reason);
        assert_eq!(reason(b"{"), Some(Reason::InvalidJson));
        assert_eq!(reason(b"[1]"), Some(Reason::InvalidJson));
        assert_eq!(reason(b"{}"), Some(Reason::InvalidValue));
        assert_eq!(reason(br#"{"value":null}"#), Some(Reason::InvalidValue));
        let deep = format!("{{\"value\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        assert_eq!(reason(deep.as_bytes()), Some(Reason::InvalidValue));
    }
}
