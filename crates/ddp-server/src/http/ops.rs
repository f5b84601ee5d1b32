//! `GET /healthz`, `GET /readyz`, `GET /metrics` (PROTOCOL.md §7). No token needed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use crate::app::App;
use crate::error::{Error, Result};

/// The process is up.
pub(crate) async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Storage answers and the server is not shutting down.
pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Result<Response> {
    if app.shutdown.is_cancelled() {
        return Err(Error::unavailable("the server is shutting down"));
    }
    if let Err(e) = app.store.ping().await {
        tracing::warn!(error = %e, "readiness check: storage does not answer");
        return Err(Error::unavailable("storage is not reachable"));
    }
    Ok(Json(serde_json::json!({ "status": "ready" })).into_response())
}

/// Prometheus text format.
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}
