//! `GET /healthz`, `GET /readyz`, `GET /metrics` (PROTOCOL.md §7), `GET /openapi.json` (§13).
//! No token needed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use super::openapi::{Errors, Status};
use crate::app::App;
use crate::error::{Error, Result};

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Status)))]
pub(crate) async fn healthz() -> Response {
    Json(Status { status: "ok" }).into_response()
}

/// Storage answers and the server is not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, body = Status), Errors))]
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Result<Response> {
    if app.shutdown.is_cancelled() {
        return Err(Error::unavailable("the server is shutting down"));
    }
    if let Err(e) = app.store.ping().await {
        tracing::warn!(error = %e, "readiness check: storage does not answer");
        return Err(Error::unavailable("storage is not reachable"));
    }
    Ok(Json(Status { status: "ready" }).into_response())
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

/// This document: OpenAPI 3.1, generated from the handlers' annotations and types.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "openapi_document",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object)))]
pub(crate) async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<bytes::Bytes> = std::sync::LazyLock::new(|| {
        let text = super::document().to_pretty_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the OpenAPI document does not serialise");
            String::from("{}")
        });
        bytes::Bytes::from(text)
    });
    ([(CONTENT_TYPE, "application/json")], DOCUMENT.clone()).into_response()
}
