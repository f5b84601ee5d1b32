//! `GET /devices/{id}/kv` upgraded to a WebSocket: a device's live sync session (PROTOCOL.md §4.1).
//!
//! The session sends the watch's messages as text frames (a `reload` or `resume` first, then
//! every change), applies the device's `set`/`delete` frames through the one write path (the
//! confirmation arrives as the change itself, with its authoritative rev), answers bad frames with
//! an `error` frame and stays open. It pings every idle interval and closes a peer silent for
//! twice that. Close codes: 1001 server shutting down, 4001 key rotated, 4002 device deleted,
//! 4003 API key revoked, 4004 access changed (reconnect to re-check), 4008 silent too long,
//! 1011 server failure.

use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use ddp_protocol::sync::{DeviceRequest, ServerMessage};
use ddp_protocol::{Reason, Rev};
use ddp_store::{Condition, StoreRef};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::upgrade::{Socket, Upgrade};
use crate::app::App;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::events::{EventClose, EventDelivery};
use crate::hub::{CloseReason, Delivery};
use crate::kv::Transport;
use crate::sessions::SessionTicket;
use crate::watch::{Step, Watch};

/// How long one send to a peer may take before the session is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages longer than this go out in fragments of this size, each flushed before the next, so
/// a session's write buffer never holds more than this (its capacity never shrinks).
const FRAGMENT: usize = 2048;

/// Accepts the upgrade once the caller is known to be allowed to watch `store`.
pub async fn accept(
    app: Arc<App>,
    upgrade: Upgrade,
    who: Principal,
    store: StoreRef,
    since: Option<Rev>,
) -> Result<Response> {
    app.kv.authorize(&who, store, false).await?;
    if let (Principal::Admin, StoreRef::Device(d)) = (&who, store) {
        app.store.device(d).await?; // 404 now, not a closed session later
    }
    let ticket = app.sessions.open(&who, Transport::WebSocket).await?;
    let limits = app.config.sessions;
    let max_message = app.kv.limits().max_body_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.ws_read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    Ok(upgrade.accept(config, move |socket| session(app, socket, who, store, since, ticket)))
}

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason) }))
}

fn close_for(reason: CloseReason) -> Message {
    let code = match reason {
        CloseReason::ShuttingDown => 1001,
        CloseReason::KeyRotated => 4001,
        CloseReason::DeviceDeleted => 4002,
        CloseReason::KeyRevoked => 4003,
        CloseReason::AccessChanged => 4004,
    };
    close_frame(code, reason.message())
}

async fn send_all(socket: &mut Socket, messages: Vec<Utf8Bytes>) -> std::result::Result<(), ()> {
    if messages.is_empty() {
        return Ok(());
    }
    let n = messages.len() as u64;
    let sent = tokio::time::timeout(SEND_TIMEOUT, async {
        let mut pending = 0usize;
        for m in messages {
            if m.len() > FRAGMENT {
                if pending > 0 {
                    socket.flush().await?;
                    pending = 0;
                }
                send_fragmented(socket, m).await?;
                continue;
            }
            if pending + m.len() > FRAGMENT {
                socket.flush().await?;
                pending = 0;
            }
            pending += m.len();
            socket.feed(Message::Text(m)).await?;
        }
        socket.flush().await
    })
    .await;
    match sent {
        Ok(Ok(())) => {
            metrics::counter!("ddp_sync_messages_sent_total", "transport" => "websocket").increment(n);
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "websocket send failed");
            Err(())
        }
        Err(_) => {
            tracing::info!("websocket peer too slow to receive for {SEND_TIMEOUT:?}; closing the session");
            Err(())
        }
    }
}

/// Sends one text message as a first frame and continuation frames of at most [`FRAGMENT`]
/// bytes (cut on character boundaries), flushing each.
async fn send_fragmented(
    socket: &mut Socket,
    text: Utf8Bytes,
) -> std::result::Result<(), tokio_tungstenite::tungstenite::Error> {
    let s = text.as_str();
    let bytes = Bytes::from(text.clone());
    let mut start = 0;
    let mut opcode = OpCode::Data(Data::Text);
    while start < s.len() {
        let mut end = (start + FRAGMENT).min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let last = end == s.len();
        socket.send(Message::Frame(Frame::message(bytes.slice(start..end), opcode, last))).await?;
        opcode = OpCode::Data(Data::Continue);
        start = end;
    }
    Ok(())
}

enum Input {
    Delivery(Delivery),
    Frame(Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Tick,
    Shutdown,
}

async fn session(
    app: Arc<App>,
    mut socket: Socket,
    who: Principal,
    store: StoreRef,
    since: Option<Rev>,
    ticket: SessionTicket,
) {
    let _ticket = ticket;
    // The rarely taken paths are boxed: an idle session's future holds only what waiting needs.
    let (mut watch, first) = match Box::pin(Watch::start(app.store.clone(), &app.hub, store, who.clone(), since)).await
    {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!(%store, who = %who, error = %e, "cannot start a sync session");
            let _ = socket.send(close_frame(1011, "the server could not read the store")).await;
            return;
        }
    };
    tracing::debug!(%store, who = %who, "websocket session opened");
    if Box::pin(send_all(&mut socket, first)).await.is_err() {
        return;
    }
    let idle = app.config.sessions.idle;
    let mut tick = tokio::time::interval_at(Instant::now() + idle, idle);
    let mut heard = Instant::now();
    let close = loop {
        let input = tokio::select! {
            d = watch.recv() => Input::Delivery(d),
            m = socket.next() => Input::Frame(m),
            _ = tick.tick() => Input::Tick,
            () = app.shutdown.cancelled() => Input::Shutdown,
        };
        match input {
            Input::Delivery(delivery) => match Box::pin(watch.process(delivery)).await {
                Ok(Step::Send(messages)) => {
                    if Box::pin(send_all(&mut socket, messages)).await.is_err() {
                        break None;
                    }
                }
                Ok(Step::Close(reason)) => break Some(close_for(reason)),
                Err(e) => {
                    tracing::warn!(%store, error = %e, "sync session failed");
                    break Some(close_frame(1011, "the server could not read the store"));
                }
            },
            Input::Frame(None) => break None,
            Input::Frame(Some(Err(e))) => {
                tracing::debug!(%store, error = %e, "websocket read failed");
                break None;
            }
            Input::Frame(Some(Ok(message))) => {
                heard = Instant::now();
                let reply = match message {
                    Message::Text(text) => Box::pin(handle_frame(&app, &who, store, text.as_str())).await,
                    Message::Binary(_) => {
                        Some(error_frame(Reason::InvalidJson, "send sync messages as JSON text frames", None))
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
                    Message::Close(_) => break None,
                };
                if let Some(reply) = reply
                    && Box::pin(send_all(&mut socket, vec![reply])).await.is_err()
                {
                    break None;
                }
            }
            Input::Tick => {
                if heard.elapsed() >= idle * 2 {
                    break Some(close_frame(4008, "no traffic from the client for twice the idle interval"));
                }
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
            Input::Shutdown => break Some(close_for(CloseReason::ShuttingDown)),
        }
    };
    if let Some(frame) = close {
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), socket.send(frame))).await;
    }
    tracing::debug!(%store, who = %who, last_rev = %watch.last_rev(), "websocket session closed");
}

fn error_frame(reason: Reason, message: &str, key: Option<String>) -> Utf8Bytes {
    let message = ServerMessage::Error { reason, message: message.to_owned(), key };
    Utf8Bytes::from(serde_json::to_string(&message).unwrap_or_default())
}

/// Applies a device frame; returns the `error` frame to send when it could not be applied.
async fn handle_frame(app: &App, who: &Principal, store: StoreRef, text: &str) -> Option<Utf8Bytes> {
    let request = match DeviceRequest::parse(text.as_bytes()) {
        Ok(r) => r,
        Err(e) => return Some(error_frame(e.reason, &e.message, e.key)),
    };
    let key = request.key().as_str().to_owned();
    let applied: Result<()> = async {
        app.limiter.check(who)?;
        match request {
            DeviceRequest::Set { key, value } => {
                app.kv.set(who, Transport::WebSocket, store, key, value, Condition::None).await?;
            }
            DeviceRequest::Delete { key } => {
                app.kv.delete(who, Transport::WebSocket, store, key, Condition::None).await?;
            }
        }
        Ok(())
    }
    .await;
    applied.err().map(|e: Error| error_frame(e.reason, &e.message, Some(key)))
}

/// Accepts an app's event stream of `homes` (`None`: every home).
pub fn accept_events(
    app: Arc<App>,
    upgrade: Upgrade,
    who: Principal,
    homes: Option<Vec<ddp_protocol::HomeId>>,
) -> Response {
    let config = WebSocketConfig::default()
        .read_buffer_size(app.config.sessions.ws_read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    upgrade.accept(config, move |socket| event_session(app, socket, who, homes))
}

enum EventInput {
    Delivery(EventDelivery),
    Frame(Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Tick,
    Shutdown,
}

/// An app's event stream: one text frame per event. Close codes: 4009 too far behind, 4003 key
/// revoked, 4008 silent too long, 1001 shutdown.
async fn event_session(app: Arc<App>, mut socket: Socket, who: Principal, homes: Option<Vec<ddp_protocol::HomeId>>) {
    let listener = app.events.listen(who.clone(), homes);
    tracing::debug!(who = %who, "event stream opened");
    let idle = app.config.sessions.idle;
    let mut tick = tokio::time::interval_at(Instant::now() + idle, idle);
    let mut heard = Instant::now();
    let close = loop {
        let input = tokio::select! {
            d = listener.recv() => EventInput::Delivery(d),
            m = socket.next() => EventInput::Frame(m),
            _ = tick.tick() => EventInput::Tick,
            () = app.shutdown.cancelled() => EventInput::Shutdown,
        };
        match input {
            EventInput::Delivery(EventDelivery::Events(frames)) => {
                let messages: Vec<Utf8Bytes> = frames.iter().map(|f| f.json.clone()).collect();
                if Box::pin(send_all(&mut socket, messages)).await.is_err() {
                    break None;
                }
            }
            EventInput::Delivery(EventDelivery::Closed(reason)) => {
                tracing::info!(who = %who, why = reason.message(), "closing event stream");
                let code = match reason {
                    EventClose::TooSlow => 4009,
                    EventClose::KeyRevoked => 4003,
                };
                break Some(close_frame(code, reason.message()));
            }
            EventInput::Frame(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break None,
            EventInput::Frame(Some(Ok(_))) => heard = Instant::now(), // the stream is one-way
            EventInput::Tick => {
                if heard.elapsed() >= idle * 2 {
                    break Some(close_frame(4008, "no traffic from the client for twice the idle interval"));
                }
                if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
            EventInput::Shutdown => break Some(close_for(CloseReason::ShuttingDown)),
        }
    };
    if let Some(frame) = close {
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), socket.send(frame))).await;
    }
    tracing::debug!(who = %who, "event stream closed");
}
