//! The MQTT listener: devices sync and write over MQTT 3.1.1 (and 5), as MODE devices do
//! (PROTOCOL.md §4.2).
//!
//! The server is itself the MQTT endpoint — it decides on CONNECT, SUBSCRIBE and PUBLISH — so it
//! terminates MQTT rather than bridging to a broker. A device subscribes to `/devices/{id}/kv`
//! and gets the same sync messages as over WebSocket, from the same hub and watch path; its
//! publishes go through the same write path, and a QoS 1 PUBACK means the change is durable.
//!
//! # Layout
//! - [`wire`]: the packet codec (rmqtt-codec) behind our own small packet enums.
//! - [`session`]: the session rules as a state machine without IO.
//! - [`connection`]: one connection: read, decide, act.
//! - [`over_ws`]: a WebSocket as the connection's byte stream (MQTT over WebSocket).
//! - this module: listeners (TCP, TLS, WebSocket) and their accept loops.

mod connection;
mod over_ws;
mod session;
mod wire;

pub(crate) use connection::serve;
pub(crate) use over_ws::{WsBytes, select_protocol, socket_config};

#[cfg(test)]
mod fuzz;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use crate::app::App;
use crate::listener::Door;
use crate::tls::TlsFiles;

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    // Devices may use keep-alive 0 (the MODE SDK does): let TCP notice peers that vanished.
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(120)).with_interval(Duration::from_secs(30));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// How long a client has to finish the WebSocket handshake of MQTT over WebSocket.
const WS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The handshake's answer: with the subprotocol `mqtt` when the client offered it.
// The error type is the library's (an HTTP response), not ours to make smaller.
#[allow(clippy::result_large_err)]
fn answer_protocol(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let offered = request.headers().get_all("sec-websocket-protocol").iter().filter_map(|v| v.to_str().ok());
    if let Some(p) = select_protocol(offered) {
        response.headers_mut().insert("sec-websocket-protocol", axum::http::HeaderValue::from_static(p));
    }
    Ok(response)
}

/// Accepts MQTT-over-WebSocket connections on a listener of their own (`--mqtt-ws-listen`), on
/// any path (MODE's Go SDK v4 connects to `/`), until shutdown.
pub(crate) async fn accept_ws_loop(app: Arc<App>, listener: TcpListener, door: Door) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = app.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "mqtt-ws accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(conn) = door.admit() else { continue };
        tune(&stream);
        let app = app.clone();
        tokio::spawn(async move {
            let config = socket_config(app.config.mqtt.max_packet);
            let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, answer_protocol, Some(config));
            let ws = tokio::select! {
                done = tokio::time::timeout(WS_HANDSHAKE_TIMEOUT, handshake) => done,
                () = conn.shed_now() => return,
            };
            match ws {
                Ok(Ok(ws)) => connection::serve(app, WsBytes::new(ws), peer, conn).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "mqtt-ws handshake failed"),
                Err(_) => tracing::debug!(%peer, "mqtt-ws handshake timed out"),
            }
        });
    }
}

/// Accepts connections on `listener` until shutdown, each admitted through `door` (the
/// connection cap) and run in its own task; over TLS with the certificate in force when each
/// connection arrives.
pub(crate) async fn accept_loop(app: Arc<App>, listener: TcpListener, door: Door, tls: Option<Arc<TlsFiles>>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = app.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "mqtt accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(conn) = door.admit() else { continue };
        tune(&stream);
        let app = app.clone();
        match tls.as_ref().map(|files| files.mqtt()) {
            None => {
                tokio::spawn(connection::serve(app, stream, peer, conn));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let tls = tokio::select! {
                        done = handshake => done,
                        () = conn.shed_now() => return,
                    };
                    match tls {
                        Ok(Ok(tls)) => connection::serve(app, tls, peer, conn).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "mqtt TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "mqtt TLS handshake timed out"),
                    }
                });
            }
        }
    }
}
