//! The web console (PROTOCOL.md §13): static files compiled into the binary, served at
//! `/console/`. No token is needed for the files themselves; the console signs in with a key
//! and uses only the public API, like any other app. `ddp.js` is the project's JavaScript
//! client, the very file the client's own tests run against.
//!
//! Every file is sent with `Cache-Control: no-cache` (a browser revalidates, so an upgraded
//! server is never paired with yesterday's script), `X-Content-Type-Options: nosniff` and a
//! strict Content-Security-Policy: scripts, styles and connections only from this origin (plus
//! its WebSockets), nothing inline, no frames.

use std::sync::Arc;

use axum::Router;
use axum::http::HeaderValue;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::app::App;

const INDEX_HTML: &str = include_str!("../../console/index.html");
const CONSOLE_JS: &str = include_str!("../../console/console.js");
const CONSOLE_CSS: &str = include_str!("../../console/console.css");
const DDP_JS: &str = include_str!("../../../../clients/js/src/ddp.js");

/// The policy of every console file. `connect-src` names `ws:`/`wss:` besides `'self'` because
/// older browsers do not count the page's own WebSocket origin as `'self'`.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The console's routes; merged into the API router.
pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(|| async { file(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/console/index.html", get(|| async { file(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/console/console.js", get(|| async { file(CONSOLE_JS, "text/javascript; charset=utf-8") }))
        .route("/console/console.css", get(|| async { file(CONSOLE_CSS, "text/css; charset=utf-8") }))
        .route("/console/ddp.js", get(|| async { file(DDP_JS, "text/javascript; charset=utf-8") }))
}

fn file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        body,
    )
        .into_response()
}
