//! The REST API (PROTOCOL.md §3, §5, §7) on axum.
//!
//! Handlers are thin: extractors authenticate ([`Caller`]) and read bounded bodies ([`Body`]);
//! handlers parse into domain types and call the gate, [`Kv`](crate::kv::Kv) (the admin API,
//! admin key only, calls the store); every error is an [`Error`] rendered as
//! `{"reason","message","data"?}`. axum's own rejections (bad paths, unknown routes, wrong
//! methods) are turned into the same shape.

mod admin;
mod commands;
mod events;
mod fleet;
mod kv;
mod mqtt;
mod ops;
mod progress;
mod serve;
mod upgrade;
mod ws;

pub(crate) use admin::json_id;
pub(crate) use serve::accept_loop;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use ddp_protocol::Reason;

use crate::app::App;
use crate::auth::{Authenticated, Principal, token_from_header};
use crate::error::Error;

/// The router of the whole HTTP API.
pub(crate) fn router(app: Arc<App>) -> Router {
    let kv_routes = |prefix: &str| {
        Router::new()
            .route(
                &format!("{prefix}/kv/"),
                get(kv::empty_key).put(kv::empty_key).delete(kv::empty_key).patch(kv::empty_key),
            )
            .route(&format!("{prefix}/kv/{{*key}}"), get(kv::get).put(kv::put).delete(kv::delete).patch(kv::patch_key))
    };
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/homes", post(admin::create_home).get(admin::list_homes))
        .route("/homes/{id}", get(admin::get_home).delete(admin::delete_home))
        .route("/devices", post(admin::create_device).get(fleet::list_devices))
        .route("/devices/{id}", get(admin::get_device).patch(admin::update_device).delete(admin::delete_device))
        .route("/devices/{id}/apiKey", post(admin::rotate_device_key))
        .route("/devices/{id}/sync", get(progress::get))
        .route("/jobs", post(fleet::create_job).get(fleet::list_jobs))
        .route("/jobs/{id}", get(fleet::get_job).delete(fleet::cancel_job))
        .route("/apiKeys", post(admin::create_api_key).get(admin::list_api_keys))
        .route("/apiKeys/{id}", axum::routing::delete(admin::delete_api_key))
        .route("/devices/{id}/event", axum::routing::put(events::raise))
        .route("/events/websocket", get(events::stream))
        .route("/userSession/websocket", get(events::stream))
        .route("/mqtt", get(mqtt::upgrade))
        .route("/devices/{id}/command", axum::routing::put(commands::send).get(commands::socket))
        .route("/devices/{id}/kv", get(kv::list_or_watch).patch(kv::patch_store))
        .route("/homes/{id}/kv", get(kv::list).patch(kv::patch_store))
        .merge(kv_routes("/devices/{id}"))
        .merge(kv_routes("/homes/{id}"))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track))
        .with_state(app)
}

async fn not_found(req: Request) -> Error {
    Error::new(Reason::NotFound, format!("no such endpoint: {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> Error {
    Error::new(Reason::MethodNotAllowed, format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

/// The method as a metrics label: one of a fixed set, so no client can add label sets.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Counts every request by method, route and status, and times it. Every label comes from a
/// fixed set: the route templates of the router (or `unmatched`), the methods above, and the
/// status codes the server answers with.
async fn track(req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    tracing::debug!(method, %route, status, micros = elapsed.as_micros() as u64, "request");
    metrics::histogram!("ddp_http_request_seconds", "method" => method, "route" => route.clone())
        .record(elapsed.as_secs_f64());
    metrics::counter!("ddp_http_requests_total", "method" => method, "route" => route, "status" => status.to_string())
        .increment(1);
    response
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        #[derive(serde::Serialize)]
        struct ErrorBody {
            reason: Reason,
            message: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<serde_json::Value>,
        }
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after_secs();
        let body = ErrorBody { reason: self.reason, message: self.message, data: self.data };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<PathRejection> for Error {
    fn from(r: PathRejection) -> Error {
        Error::invalid_parameter(format!("bad path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for Error {
    fn from(r: QueryRejection) -> Error {
        Error::invalid_parameter(format!("bad query string: {}", r.body_text()))
    }
}

/// The authenticated caller of a request, from `Authorization: ModeCloud <token>` (or `Bearer`).
/// Rate limits are the gate's: it counts each request it serves.
pub(crate) struct Caller(pub(crate) Principal);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, Error> {
        authenticate(app, parts, None).await.map(|auth| Caller(auth.principal))
    }
}

/// The caller of a request: from the `Authorization` header, or (WebSocket endpoints only,
/// since browsers cannot set headers there) from `?authToken=`. A connection that carried a
/// valid credential is no longer shed at the connection cap.
pub(crate) async fn authenticate(app: &App, parts: &Parts, query_token: Option<&str>) -> Result<Authenticated, Error> {
    let auth = authenticate_headers(app, &parts.headers, query_token).await?;
    if let Some(conn) = parts.extensions.get::<serve::ConnHandle>() {
        conn.authenticated();
    }
    Ok(auth)
}

async fn authenticate_headers(
    app: &App,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Authenticated, Error> {
    let token = match (headers.get(AUTHORIZATION), query_token) {
        (Some(header), _) => token_from_header(
            header.to_str().map_err(|_| Error::unauthenticated("the Authorization header is not readable text"))?,
        )?,
        (None, Some(token)) if !token.is_empty() => token,
        (None, _) => {
            return Err(Error::unauthenticated(
                "missing the Authorization header: send `Authorization: ModeCloud <token>`",
            ));
        }
    };
    app.kv.authenticate(token).await
}

/// A caller holding the admin key; anyone else gets 403 before the body is read.
pub(crate) struct AdminCaller;

impl FromRequestParts<Arc<App>> for AdminCaller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<AdminCaller, Error> {
        let Caller(principal) = Caller::from_request_parts(parts, app).await?;
        principal.require_admin()?;
        Ok(AdminCaller)
    }
}

/// A request body of at most the configured size (`413 PAYLOAD_TOO_LARGE` beyond).
pub(crate) struct Body(pub(crate) Bytes);

impl FromRequest<Arc<App>> for Body {
    type Rejection = Error;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Body, Error> {
        let limit = app.kv.limits().max_body_bytes;
        let too_large = || {
            Error::new(Reason::PayloadTooLarge, format!("the request body is over the limit of {limit} bytes"))
                .with_data(serde_json::json!({ "limit": limit }))
        };
        let declared =
            req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let read = axum::body::to_bytes(req.into_body(), limit);
        match serve::within_body_timeout(app.config.http.body_timeout, read).await? {
            Ok(bytes) => Ok(Body(bytes)),
            Err(e) if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) => {
                Err(too_large())
            }
            Err(e) => Err(Error::invalid_json(format!("could not read the request body: {e}"))),
        }
    }
}
