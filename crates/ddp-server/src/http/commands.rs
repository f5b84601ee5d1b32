//! `PUT /devices/{id}/command` (an app sends a device a command) and `GET /devices/{id}/command`
//! (MODE's command socket, where the device receives them) — PROTOCOL.md §8.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use ddp_protocol::DeviceId;

use super::openapi::{CommandBody, Errors};
use super::upgrade::Upgrade;
use super::{Body, Caller};
use crate::app::App;
use crate::error::{Error, Result};

fn device_id(text: &str) -> Result<DeviceId> {
    text.parse().map_err(|e| Error::invalid_parameter(format!("device {e}")))
}

/// `PUT /devices/{id}/command` with `{"action","parameters"?}`: `204` once handed to every node;
/// `409 DEVICE_OFFLINE` when the device has no live session.
#[utoipa::path(put, path = "/devices/{id}/command", tag = "devices", operation_id = "send_command", params(("id" = u64, Path, description = "The device id", minimum = 1)),
    request_body = CommandBody, security(("ModeCloud" = [])),
    responses((status = 204, description = "Handed to every node; the device's live sessions get it"), Errors))]
pub(crate) async fn send(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<StatusCode> {
    app.kv.send_command(&who, device_id(&id)?, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /devices/{id}/command` upgraded to a WebSocket, with the device's own key in the
/// `Authorization` header or `?authToken=`: one text frame `{"action","parameters"}` per command.
#[utoipa::path(get, path = "/devices/{id}/command", tag = "streams", operation_id = "command_socket",
    params(("id" = u64, Path, description = "The device id", minimum = 1), ("authToken" = Option<String>, Query, description = "The device's key")),
    security(("ModeCloud" = [])),
    responses((status = 101, description = "A WebSocket: one text frame `{\"action\",\"parameters\"}` per command"), Errors))]
pub(crate) async fn socket(State(app): State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
    let (mut parts, _body) = request.into_parts();
    let Path(id) = Path::<String>::from_request_parts(&mut parts, &app).await?;
    let device = device_id(&id)?;
    let Query(query) = Query::<Vec<(String, String)>>::from_request_parts(&mut parts, &app).await?;
    let token = query.iter().find(|(k, _)| k == "authToken").map(|(_, v)| v.as_str());
    let auth = super::authenticate(&app, &parts, token).await?;
    let Some(upgrade) = Upgrade::from_parts(&mut parts)? else {
        return Err(Error::invalid_parameter(
            "this is the device's command socket: send a WebSocket upgrade request (commands are sent with PUT)",
        ));
    };
    let session = app.kv.open_commands(auth, device).await?;
    Ok(super::ws::accept_commands(app, upgrade, session))
}
