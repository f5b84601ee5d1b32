//! WebSocket sessions (PROTOCOL.md §4.1, §6): a device's live sync session on
//! `GET /devices/{id}/kv`, and an app's event stream on `GET /events/websocket`.
//!
//! A sync session sends the watch's messages as text frames (a `reload` or `resume` first, then
//! every change), hands the device's frames to the gate (the confirmation arrives as the change
//! itself, with its authoritative rev), answers frames that cannot be applied with an `error`
//! frame and stays open. Both kinds ping every idle interval and close a peer silent for twice
//! that.
//!
//! Close codes: 1001 server shutting down, 1002 a WebSocket protocol violation (unmasked or
//! reserved-bit frames, reserved opcodes, fragmented control frames, stray continuations), 1007
//! a text message that is not UTF-8, 1009 a frame or message over the size limit, 1011 server
//! failure, 4001 key rotated, 4002 device deleted, 4003 API key revoked, 4004 access changed
//! (reconnect to be checked again), 4008 silent too long, 4009 (events) too far behind.

use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use ddp_protocol::Rev;
use ddp_protocol::sync::ServerMessage;
use ddp_store::StoreRef;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, Interval};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use super::upgrade::{Socket, Upgrade};
use crate::app::App;
use crate::auth::Authenticated;
use crate::error::Result;
use crate::events::{EventDelivery, ListenerGuard};
use crate::json::Json;
use crate::kv::{Refused, Transport};
use crate::sessions::{CloseReason, Session, Signal};

/// How long one send to a peer may take before the session is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages longer than this go out in fragments of this size, each flushed before the next, so
/// a session's write buffer never holds more than this (its capacity never shrinks).
const FRAGMENT: usize = 2048;
/// Largest message an event stream accepts from its app (it only ever needs control frames).
const EVENT_STREAM_MAX_MESSAGE: usize = 64 * 1024;

fn socket_config(app: &App, max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(app.config.sessions.ws_read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Opens a sync session of `auth` on `store` through the gate (which refuses with the HTTP
/// error before the upgrade), then upgrades. With `commands`, the device's own session also
/// carries its commands (`{"action":"command","command":{"action","parameters"}}`).
pub(crate) async fn accept(
    app: std::sync::Arc<App>,
    upgrade: Upgrade,
    auth: Authenticated,
    store: StoreRef,
    since: Option<Rev>,
    commands: bool,
    batches: bool,
) -> Result<Response> {
    let session = app.kv.open_sync(auth, Transport::WebSocket, store, commands).await?;
    let config = socket_config(&app, app.kv.limits().max_body_bytes);
    Ok(upgrade.accept(config, move |socket| sync_session(app, socket, session, since, batches)))
}

/// Upgrades to a device's command socket, for a session the gate opened.
pub(crate) fn accept_commands(app: std::sync::Arc<App>, upgrade: Upgrade, session: Session) -> Response {
    let config = socket_config(&app, EVENT_STREAM_MAX_MESSAGE);
    upgrade.accept(config, move |socket| command_session(app, socket, session))
}

/// Upgrades to an app's event stream, for a session the gate opened.
pub(crate) fn accept_events(
    app: std::sync::Arc<App>,
    upgrade: Upgrade,
    session: Session,
    listener: ListenerGuard,
) -> Response {
    let config = socket_config(&app, EVENT_STREAM_MAX_MESSAGE);
    upgrade.accept(config, move |socket| event_session(app, socket, session, listener))
}

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason) }))
}

fn close_for(reason: CloseReason) -> Message {
    close_frame(reason.ws_code(), reason.message())
}

fn shutting_down() -> Message {
    close_frame(1001, "the server is shutting down")
}

fn server_failed() -> Message {
    close_frame(1011, "the server failed; reconnect")
}

/// The close frame RFC 6455 prescribes for a peer's violation, or `None` when the connection
/// just ended (reset, closed) and there is no one to tell.
fn violation(e: &tungstenite::Error) -> Option<Message> {
    match e {
        tungstenite::Error::Protocol(p) => Some(close_frame(1002, &format!("protocol error: {p}"))),
        tungstenite::Error::Utf8(_) => Some(close_frame(1007, "a text message is not valid UTF-8")),
        tungstenite::Error::Capacity(c) => Some(close_frame(1009, &format!("too big: {c}"))),
        _ => None,
    }
}

/// A text frame holding `json`, sent without copying or re-validating it.
fn text_frame(bytes: Bytes, fin: bool, first: bool) -> Message {
    let opcode = if first { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
    Message::Frame(Frame::message(bytes, opcode, fin))
}

async fn send_all(socket: &mut Socket, messages: Vec<Json>) -> std::result::Result<(), ()> {
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
                send_fragmented(socket, m.bytes()).await?;
                continue;
            }
            if pending + m.len() > FRAGMENT {
                socket.flush().await?;
                pending = 0;
            }
            pending += m.len();
            socket.feed(text_frame(m.bytes(), true, true)).await?;
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
/// bytes, cut on character boundaries (RFC 6455 allows splitting one, but not every client
/// takes it), flushing each.
async fn send_fragmented(socket: &mut Socket, bytes: Bytes) -> std::result::Result<(), tungstenite::Error> {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    let mut start = 0;
    while start < bytes.len() {
        let mut end = (start + FRAGMENT).min(bytes.len());
        while end < bytes.len() && end > start + 1 && is_continuation(bytes[end]) {
            end -= 1;
        }
        socket.send(text_frame(bytes.slice(start..end), end == bytes.len(), start == 0)).await?;
        start = end;
    }
    Ok(())
}

/// Pings every idle interval; a peer silent for twice that is closed (4008).
struct Keepalive {
    tick: Interval,
    heard: Instant,
    idle: Duration,
}

impl Keepalive {
    fn new(idle: Duration) -> Keepalive {
        Keepalive { tick: tokio::time::interval_at(Instant::now() + idle, idle), heard: Instant::now(), idle }
    }

    fn heard(&mut self) {
        self.heard = Instant::now();
    }

    /// On a tick: pings the peer. `Err` ends the session, with the close frame for a peer
    /// silent too long, or none when the ping could not be sent.
    async fn ping(&self, socket: &mut Socket) -> std::result::Result<(), Option<Message>> {
        if self.heard.elapsed() >= self.idle * 2 {
            return Err(Some(close_frame(4008, "no traffic from the client for twice the idle interval")));
        }
        socket.send(Message::Ping(Bytes::new())).await.map_err(|_| None)
    }
}

/// Sends `frame` (a close frame), waiting at most a second.
async fn send_close(socket: &mut Socket, frame: Message) {
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), socket.send(frame))).await;
}

/// Completes a close the peer started (RFC 6455 §5.5.1): tungstenite queued the echoing Close
/// frame when it read the peer's, and a flush sends it, waiting at most a second. Without it
/// browsers see the session end uncleanly (1006).
async fn answer_close(socket: &mut Socket) {
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), socket.flush())).await;
}

enum Input {
    Delivery(crate::hub::Delivery),
    Frame(Option<std::result::Result<Message, tungstenite::Error>>),
    Tick,
    Signal(Signal),
    Shutdown,
}

/// The frame a sync session opened with `?commands=1` carries a command in.
fn command_frame(command: &Json) -> Json {
    let command = String::from_utf8_lossy(&command.bytes()).into_owned();
    Json::from_serialized(format!(r#"{{"action":"command","command":{command}}}"#))
}

async fn sync_session(
    app: std::sync::Arc<App>,
    mut socket: Socket,
    session: Session,
    since: Option<Rev>,
    batches: bool,
) {
    let store = session.purpose().store();
    let who = session.principal().clone();
    // The rarely taken paths are boxed: an idle session's future holds only what waiting needs.
    let (mut watch, first) = match Box::pin(app.kv.watch(&session, since, batches)).await {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!(?store, %who, error = %e, "cannot start a sync session");
            send_close(&mut socket, server_failed()).await;
            return;
        }
    };
    tracing::debug!(?store, %who, "websocket session opened");
    if Box::pin(send_all(&mut socket, first)).await.is_err() {
        return;
    }
    watch.sent();
    let mut keepalive = Keepalive::new(app.config.sessions.idle);
    let close = loop {
        let input = tokio::select! {
            d = watch.recv() => Input::Delivery(d),
            m = socket.next() => Input::Frame(m),
            _ = keepalive.tick.tick() => Input::Tick,
            signal = session.signal() => Input::Signal(signal),
            () = app.shutdown.cancelled() => Input::Shutdown,
        };
        match input {
            Input::Delivery(delivery) => match Box::pin(watch.process(delivery)).await {
                Ok(messages) => {
                    if Box::pin(send_all(&mut socket, messages)).await.is_err() {
                        break None;
                    }
                    watch.sent();
                }
                Err(e) => {
                    tracing::warn!(?store, error = %e, "sync session failed");
                    break Some(server_failed());
                }
            },
            Input::Frame(None) => break None,
            Input::Frame(Some(Err(e))) => {
                tracing::debug!(?store, error = %e, "websocket read failed");
                break violation(&e);
            }
            Input::Frame(Some(Ok(message))) => {
                keepalive.heard();
                let reply = match message {
                    Message::Text(text) => Box::pin(handle_frame(&app, &session, text.as_bytes())).await,
                    Message::Binary(_) => error_frame(Refused {
                        error: crate::error::Error::invalid_json("send sync messages as JSON text frames"),
                        key: None,
                        index: None,
                    }),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
                    Message::Close(_) => {
                        answer_close(&mut socket).await;
                        break None;
                    }
                };
                match reply {
                    Ok(Some(reply)) => {
                        if Box::pin(send_all(&mut socket, vec![reply])).await.is_err() {
                            break None;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => break Some(server_failed()),
                }
            }
            Input::Tick => {
                if let Err(close) = keepalive.ping(&mut socket).await {
                    break close;
                }
            }
            Input::Signal(Signal::Commands(commands)) => {
                let frames = commands.iter().map(command_frame).collect();
                if Box::pin(send_all(&mut socket, frames)).await.is_err() {
                    break None;
                }
            }
            Input::Signal(Signal::Closed(reason)) => break Some(close_for(reason)),
            Input::Shutdown => break Some(shutting_down()),
        }
    };
    if let Some(frame) = close {
        send_close(&mut socket, frame).await;
    }
    tracing::debug!(?store, %who, last_rev = %watch.last_rev(), "websocket session closed");
}

/// The `error` frame reporting a refused frame.
fn error_frame(refused: Refused) -> Result<Option<Json>> {
    let Refused { error, key, index } = refused;
    Json::encode(&ServerMessage::Error { reason: error.reason, message: error.message, key, index }).map(Some)
}

/// Hands a device frame to the gate; returns the `error` frame to send when it was not applied.
async fn handle_frame(app: &App, session: &Session, frame: &[u8]) -> Result<Option<Json>> {
    match app.kv.device_frame(session, frame).await {
        Ok(()) => Ok(None),
        Err(refused) => error_frame(refused),
    }
}

enum EventInput {
    Delivery(EventDelivery),
    Frame(Option<std::result::Result<Message, tungstenite::Error>>),
    Tick,
    Signal(Signal),
    Shutdown,
}

/// An app's event stream: one text frame per event.
async fn event_session(app: std::sync::Arc<App>, mut socket: Socket, session: Session, listener: ListenerGuard) {
    let who = session.principal().clone();
    tracing::debug!(%who, "event stream opened");
    let mut keepalive = Keepalive::new(app.config.sessions.idle);
    let close = loop {
        let input = tokio::select! {
            d = listener.recv() => EventInput::Delivery(d),
            m = socket.next() => EventInput::Frame(m),
            _ = keepalive.tick.tick() => EventInput::Tick,
            signal = session.signal() => EventInput::Signal(signal),
            () = app.shutdown.cancelled() => EventInput::Shutdown,
        };
        match input {
            EventInput::Delivery(EventDelivery::Events(frames)) => {
                let messages: Vec<Json> = frames.iter().map(|f| f.json.clone()).collect();
                if Box::pin(send_all(&mut socket, messages)).await.is_err() {
                    break None;
                }
            }
            EventInput::Delivery(EventDelivery::TooSlow) => {
                let why = "too far behind: events are not stored, reconnect and re-read the stores";
                tracing::info!(%who, why, "closing event stream");
                break Some(close_frame(4009, why));
            }
            EventInput::Frame(Some(Ok(Message::Close(_)))) => {
                answer_close(&mut socket).await;
                break None;
            }
            EventInput::Frame(None) => break None,
            EventInput::Frame(Some(Err(e))) => break violation(&e),
            EventInput::Frame(Some(Ok(_))) => keepalive.heard(), // the stream is one-way
            EventInput::Tick => {
                if let Err(close) = keepalive.ping(&mut socket).await {
                    break close;
                }
            }
            EventInput::Signal(Signal::Closed(reason)) => break Some(close_for(reason)),
            EventInput::Signal(Signal::Commands(_)) => {} // an app's stream takes no commands
            EventInput::Shutdown => break Some(shutting_down()),
        }
    };
    if let Some(frame) = close {
        send_close(&mut socket, frame).await;
    }
    tracing::debug!(%who, "event stream closed");
}

enum CommandInput {
    Frame(Option<std::result::Result<Message, tungstenite::Error>>),
    Tick,
    Signal(Signal),
    Shutdown,
}

/// A device's command socket: one text frame `{"action","parameters"}` per command, in the
/// order sent. What the device sends is ignored (pings are answered).
async fn command_session(app: std::sync::Arc<App>, mut socket: Socket, session: Session) {
    let who = session.principal().clone();
    tracing::debug!(%who, "command socket opened");
    let mut keepalive = Keepalive::new(app.config.sessions.idle);
    let close = loop {
        let input = tokio::select! {
            signal = session.signal() => CommandInput::Signal(signal),
            m = socket.next() => CommandInput::Frame(m),
            _ = keepalive.tick.tick() => CommandInput::Tick,
            () = app.shutdown.cancelled() => CommandInput::Shutdown,
        };
        match input {
            CommandInput::Signal(Signal::Commands(commands)) => {
                if Box::pin(send_all(&mut socket, commands.into_iter().collect())).await.is_err() {
                    break None;
                }
            }
            CommandInput::Signal(Signal::Closed(reason)) => break Some(close_for(reason)),
            CommandInput::Frame(Some(Ok(Message::Close(_)))) => {
                answer_close(&mut socket).await;
                break None;
            }
            CommandInput::Frame(None) => break None,
            CommandInput::Frame(Some(Err(e))) => break violation(&e),
            CommandInput::Frame(Some(Ok(_))) => keepalive.heard(),
            CommandInput::Tick => {
                if let Err(close) = keepalive.ping(&mut socket).await {
                    break close;
                }
            }
            CommandInput::Shutdown => break Some(shutting_down()),
        }
    };
    if let Some(frame) = close {
        send_close(&mut socket, frame).await;
    }
    tracing::debug!(%who, "command socket closed");
}
