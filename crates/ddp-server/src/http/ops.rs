//! `GET /healthz`, `GET /readyz`, `GET /metrics` (PROTOCOL.md §7). No token needed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use ddp_protocol::Reason;

use crate::app::App;
use crate::error::{Error, Result};

/// The process is up.
pub async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Storage answers and the server is not shutting down.
pub async fn readyz(State(app): State<Arc<App>>) -> Result<Response> {
    if app.shutdown.is_cancelled() {
        return Err(Error::new(Reason::Unavailable, "the server is shutting down").with_retry_after(1));
    }
    if let Err(e) = app.store.ping().await {
        tracing::warn!(error = %e, "readiness check: storage does not answer");
        return Err(Error::new(Reason::Unavailable, "storage is not reachable").with_retry_after(1));
    }
    Ok(Json(serde_json::json!({ "status": "ready" })).into_response())
}

/// Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}
