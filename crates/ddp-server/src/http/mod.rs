//! The REST API (PROTOCOL.md §3, §5, §7) on axum.
//!
//! Handlers are thin: extractors authenticate ([`Caller`]) and read bounded bodies ([`Body`]);
//! handlers parse into domain types and call the gate, [`Kv`](crate::kv::Kv) (the admin API,
//! admin key only, calls the store); every error is an [`Error`] rendered as
//! `{"reason","message","data"?}`. axum's own rejections (bad paths, unknown routes, wrong
//! methods) are turned into the same shape.

mod admin;
mod commands;
mod console;
mod events;
mod fleet;
mod kv;
mod mqtt;
mod openapi;
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
use axum::routing::get;
use bytes::Bytes;
use ddp_protocol::Reason;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;
use crate::auth::{Authenticated, Principal, token_from_header};
use crate::error::Error;

/// The documented API: every route with its OpenAPI operation, from the handlers' annotations
/// (see [`openapi`]).
fn api() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(kv::device::list, kv::device::batch))
        .routes(routes!(kv::device::get, kv::device::put, kv::device::delete, kv::device::merge))
        .routes(routes!(kv::home::list, kv::home::batch))
        .routes(routes!(kv::home::get, kv::home::put, kv::home::delete, kv::home::merge))
        .routes(routes!(admin::create_home, admin::list_homes))
        .routes(routes!(admin::get_home, admin::delete_home))
        .routes(routes!(admin::create_device, fleet::list_devices))
        .routes(routes!(admin::get_device, admin::update_device, admin::delete_device))
        .routes(routes!(admin::rotate_device_key))
        .routes(routes!(admin::create_api_key, admin::list_api_keys))
        .routes(routes!(admin::delete_api_key))
        .routes(routes!(fleet::create_job, fleet::list_jobs))
        .routes(routes!(fleet::get_job, fleet::cancel_job))
        .routes(routes!(progress::get))
        .routes(routes!(commands::send, commands::socket))
        .routes(routes!(events::raise))
        .routes(routes!(events::stream))
        .routes(routes!(events::user_session))
        .routes(routes!(mqtt::upgrade))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
}

/// The OpenAPI document of [`api`] (served at `GET /openapi.json`).
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    openapi::finish(api().into_openapi())
}

/// The router of the whole HTTP API.
pub(crate) fn router(app: Arc<App>) -> Router {
    // `…/kv/` with an empty key: INVALID_KEY, as for any other bad key (not a route of its own
    // in the document).
    let empty_key = || get(kv::empty_key).put(kv::empty_key).delete(kv::empty_key).patch(kv::empty_key);
    let cors = cors(&app.config.cors_origins);
    let (documented, _) = api().split_for_parts();
    let router = documented
        .merge(console::routes())
        .route("/devices/{id}/kv/", empty_key())
        .route("/homes/{id}/kv/", empty_key())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(track));
    // Outermost, so that preflights are answered before routing and every answer (errors
    // included) carries the headers.
    match cors {
        Some(cors) => router.layer(cors).with_state(app),
        None => router.with_state(app),
    }
}

/// CORS for `--cors-origin` (PROTOCOL.md §13): `None` when no origin is configured. A listed
/// origin is echoed back as itself (with `Vary: Origin`); `*` answers `*`. The request headers
/// are named one by one: a wildcard does not cover `Authorization` in browsers.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD, Method::PUT, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::IF_MATCH, header::IF_NONE_MATCH, header::CONTENT_TYPE])
            .expose_headers([header::ETAG, header::LINK, header::RETRY_AFTER, header::LOCATION])
            .max_age(std::time::Duration::from_secs(600)),
    )
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
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after_secs();
        let body = openapi::ErrorBody { reason: self.reason, message: self.message, data: self.data };
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
