//! The WebSocket handshake (RFC 6455 §4.2), done here rather than by axum so the session owns a
//! tokio-tungstenite stream and can send raw frames: large messages go out as fragments, which
//! keeps the library's write buffer — whose capacity never shrinks — at one fragment per session.

use std::future::Future;

use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::error::Error;

/// A server-side WebSocket.
pub(crate) type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A checked request to upgrade to a WebSocket.
pub(crate) struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
    offered: Vec<String>,
    protocol: Option<&'static str>,
}

fn header_has(headers: &HeaderMap, name: axum::http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Upgrade {
    /// `None` when the request does not ask for a WebSocket; `400 INVALID_PARAMETER` when it asks
    /// but the handshake is malformed.
    pub(crate) fn from_parts(parts: &mut Parts) -> Result<Option<Upgrade>, Error> {
        if !header_has(&parts.headers, UPGRADE, "websocket") {
            return Ok(None);
        }
        let bad = |why: &str| Err(Error::invalid_parameter(format!("bad WebSocket upgrade request: {why}")));
        if parts.method != Method::GET || parts.version != Version::HTTP_11 {
            return bad("it must be an HTTP/1.1 GET");
        }
        if !header_has(&parts.headers, CONNECTION, "upgrade") {
            return bad("`Connection: upgrade` is missing");
        }
        if parts.headers.get(SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
            return bad("`Sec-WebSocket-Version: 13` is missing");
        }
        let Some(key) = parts.headers.get(SEC_WEBSOCKET_KEY) else { return bad("`Sec-WebSocket-Key` is missing") };
        let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
            return bad("`Sec-WebSocket-Key` is not usable");
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return bad("the connection cannot be upgraded");
        };
        let offered = parts
            .headers
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        Ok(Some(Upgrade { accept, on_upgrade, offered, protocol: None }))
    }

    /// The subprotocols the client offered (`Sec-WebSocket-Protocol`, as sent).
    pub(crate) fn offered(&self) -> impl Iterator<Item = &str> {
        self.offered.iter().map(String::as_str)
    }

    /// Answers with this subprotocol (one the client offered).
    pub(crate) fn with_protocol(mut self, protocol: Option<&'static str>) -> Upgrade {
        self.protocol = protocol;
        self
    }

    /// Answers `101 Switching Protocols` and runs `session` on the socket once it is upgraded.
    pub(crate) fn accept<F, Fut>(self, config: WebSocketConfig, session: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Upgrade { accept, on_upgrade, protocol, .. } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let socket =
                        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                    session(socket).await;
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let mut response = (
            StatusCode::SWITCHING_PROTOCOLS,
            [(CONNECTION, HeaderValue::from_static("upgrade")), (UPGRADE, HeaderValue::from_static("websocket"))],
            [(SEC_WEBSOCKET_ACCEPT, accept)],
        )
            .into_response();
        if let Some(p) = protocol {
            response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        }
        response
    }
}
