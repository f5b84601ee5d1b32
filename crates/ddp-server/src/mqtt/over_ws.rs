//! MQTT over WebSocket (PROTOCOL.md §9): the WebSocket is only a byte stream under the same MQTT
//! connection as over TCP ([`serve`](super::connection::serve)) — same session rules, limits,
//! gate, write path and watch path.
//!
//! [`WsBytes`] turns a WebSocket into that byte stream: binary messages are read as bytes
//! whatever their boundaries (a message may hold several MQTT packets or part of one, as MODE's
//! Go SDK v4 and browsers' MQTT.js each send them), and what the connection writes goes out as
//! binary messages of at most [`CHUNK`] bytes, so the library's write buffer stays small. The
//! subprotocol `mqtt` (or `mqttv3.1`) is selected when the client offers it, and not required.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

/// Largest binary message the server sends; a longer write is split.
pub(crate) const CHUNK: usize = 256;

/// The subprotocol to answer with, from those a client offered (`Sec-WebSocket-Protocol`).
pub(crate) fn select_protocol<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    let offered: Vec<&str> = offered.into_iter().flat_map(|v| v.split(',')).map(str::trim).collect();
    ["mqtt", "mqttv3.1"].into_iter().find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
}

/// Read buffer of an MQTT-over-WebSocket session: what an idle one holds (a client's packets
/// are small; larger ones still fit).
const READ_BUFFER: usize = 256;

/// The WebSocket settings of an MQTT session: small buffers, messages up to the MQTT packet
/// limit.
pub(crate) fn socket_config(max_packet: usize) -> WebSocketConfig {
    let max_message = max_packet.saturating_add(16);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// A WebSocket read and written as a byte stream of binary messages.
pub(crate) struct WsBytes<S> {
    ws: WebSocketStream<S>,
    /// What is left of the binary message being read.
    read: Bytes,
}

impl<S> WsBytes<S> {
    pub(crate) fn new(ws: WebSocketStream<S>) -> WsBytes<S> {
        WsBytes { ws, read: Bytes::new() }
    }
}

fn other(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(buf.remaining());
                buf.put_slice(&self.read[..n]);
                self.read.advance(n);
                if self.read.is_empty() {
                    // An empty slice still holds the library's read buffer it was cut from: an
                    // idle session must not keep that alive.
                    self.read = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => self.read = bytes,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket travels in binary messages, not text",
                    )));
                }
                // Pings are answered by the library; the MQTT keep-alive is what counts.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())), // end of stream
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(other)?;
        let n = buf.len().min(CHUNK);
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).map_err(other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_is_selected_when_offered_and_not_required() {
        assert_eq!(select_protocol(["mqtt"]), Some("mqtt"));
        assert_eq!(select_protocol(["wamp, MQTT"]), Some("mqtt"));
        assert_eq!(select_protocol(["mqttv3.1"]), Some("mqttv3.1"));
        assert_eq!(select_protocol(["chat"]), None);
        assert_eq!(select_protocol([]), None);
    }
}
