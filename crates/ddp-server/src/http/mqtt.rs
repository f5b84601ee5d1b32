//! `GET /mqtt` upgraded to a WebSocket: MQTT over WebSocket on the HTTP listener (PROTOCOL.md
//! §9). The WebSocket is only the byte stream of the same MQTT connection as over TCP; the
//! client authenticates with its CONNECT, as over TCP, so the upgrade itself needs no token.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::openapi::Errors;
use super::serve::ConnHandle;
use super::upgrade::Upgrade;
use crate::app::App;
use crate::error::{Error, Result};

/// `GET /mqtt` with `Upgrade: websocket` (subprotocol `mqtt` selected when offered).
#[utoipa::path(get, path = "/mqtt", tag = "streams", operation_id = "mqtt_over_websocket",
    responses((status = 101, description = "A WebSocket carrying one MQTT 3.1.1 or 5 connection (subprotocol `mqtt`)"), Errors))]
pub(crate) async fn upgrade(State(app): State<Arc<App>>, request: axum::extract::Request) -> Result<Response> {
    let (mut parts, _body) = request.into_parts();
    let handle = parts
        .extensions
        .get::<ConnHandle>()
        .cloned()
        .ok_or_else(|| Error::internal("an HTTP request without its connection"))?;
    let Some(upgrade) = Upgrade::from_parts(&mut parts)? else {
        return Err(Error::invalid_parameter("this is MQTT over WebSocket: send a WebSocket upgrade request"));
    };
    let protocol = crate::mqtt::select_protocol(upgrade.offered());
    let config = crate::mqtt::socket_config(app.config.mqtt.max_packet);
    Ok(upgrade.with_protocol(protocol).accept(config, move |socket| async move {
        crate::mqtt::serve(app, crate::mqtt::WsBytes::new(socket), handle.peer(), handle.conn()).await;
    }))
}
