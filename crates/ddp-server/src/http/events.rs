//! `PUT /devices/{id}/event` (a device raises an event) and `GET /events/websocket` (an app
//! listens to its homes' events) — PROTOCOL.md §6.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use ddp_protocol::{DeviceId, HomeId};

use super::openapi::{Errors, EventBody};
use super::upgrade::Upgrade;
use super::{Body, Caller};
use crate::app::App;
use crate::error::{Error, Result};

/// `PUT /devices/{id}/event` with `{"eventType","eventData"}`: the device itself, the admin, or a
/// read-write project key that may see the device.
#[utoipa::path(put, path = "/devices/{id}/event", tag = "devices", operation_id = "raise_event", params(("id" = u64, Path, description = "The device id", minimum = 1)),
    request_body = EventBody, security(("ModeCloud" = [])),
    responses((status = 204, description = "Raised to the device's home"), Errors))]
pub(crate) async fn raise(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<StatusCode> {
    let device: DeviceId = id.parse().map_err(|e| Error::invalid_parameter(format!("device {e}")))?;
    app.kv.raise_event(&who, device, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /events/websocket[?homeId=…]`: every event of the homes the key may see, or of the listed
/// ones (repeat `homeId` or separate ids with commas).
#[utoipa::path(get, path = "/events/websocket", tag = "streams", operation_id = "event_stream",
    params(("homeId" = Option<String>, Query, description = "Home ids (repeat, or separate with commas); absent: every home the key sees"),
        ("authToken" = Option<String>, Query, description = "The token, for clients that cannot set headers")),
    security(("ModeCloud" = [])),
    responses((status = 101, description = "A WebSocket: one text frame per event (PROTOCOL.md §6)"), Errors))]
pub(crate) async fn stream(State(app): State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
    let (mut parts, _body) = request.into_parts();
    let Query(query) = Query::<Vec<(String, String)>>::from_request_parts(&mut parts, &app).await?;
    let token = query.iter().find(|(k, _)| k == "authToken").map(|(_, v)| v.as_str());
    let auth = super::authenticate(&app, &parts, token).await?;
    let mut requested: Vec<HomeId> = Vec::new();
    for (_, v) in query.iter().filter(|(k, _)| k == "homeId") {
        for id in v.split(',').filter(|s| !s.trim().is_empty()) {
            requested.push(id.trim().parse().map_err(|e| Error::invalid_parameter(format!("homeId {e}")))?);
        }
    }
    let Some(upgrade) = Upgrade::from_parts(&mut parts)? else {
        return Err(Error::invalid_parameter("this endpoint is a WebSocket: send an upgrade request"));
    };
    let (session, listener) = app.kv.open_events(auth, requested).await?;
    Ok(super::ws::accept_events(app, upgrade, session, listener))
}

/// `GET /userSession/websocket?authToken=…`: MODE's path of the same event stream (§9).
#[utoipa::path(get, path = "/userSession/websocket", tag = "streams",
    params(("homeId" = Option<String>, Query, description = "Home ids (repeat, or separate with commas)"),
        ("authToken" = Option<String>, Query, description = "The token")),
    security(("ModeCloud" = [])),
    responses((status = 101, description = "A WebSocket: one text frame per event"), Errors))]
pub(crate) async fn user_session(app: State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
    stream(app, request).await
}
