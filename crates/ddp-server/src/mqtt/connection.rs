//! One MQTT connection: reads packets, lets the [`Session`] decide, and carries out its actions
//! with the same parts every transport uses — the authenticator, the session registry, the one
//! write path ([`Kv`](crate::kv::Kv)) and the one watch path ([`Watch`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ddp_protocol::DeviceId;
use ddp_protocol::sync::DeviceRequest;
use ddp_store::{Condition, StoreRef};
use futures_util::{SinkExt, StreamExt};
use rmqtt_codec::{MqttCodec, MqttPacket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::session::{Action, AuthOutcome, Session, WriteOutcome};
use super::wire::{self, DisconnectReason, Outbound, Version};
use crate::app::App;
use crate::auth::Principal;
use crate::error::Error;
use crate::hub::{CloseReason, Delivery};
use crate::kv::Transport;
use crate::sessions::SessionTicket;
use crate::watch::{Step, Watch};

/// Buffers start this small; an idle session holds little more.
const BUFFER: usize = 512;
/// Buffers grown past this by a large packet are given back once empty.
const BUFFER_KEEP: usize = 4096;
/// How long one send to a peer may take before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

type Io<S> = Framed<S, MqttCodec>;

enum Input {
    Packet(Option<Result<(MqttPacket, u32), rmqtt_codec::error::DecodeError>>),
    Delivery(Delivery),
    Silent,
    Shutdown,
}

/// Why a connection ended early (the error is already logged).
struct Ended;

struct Connection<S> {
    app: Arc<App>,
    io: Io<S>,
    session: Session,
    peer: SocketAddr,
    max_packet: u32,
    watch: Option<Watch>,
    ticket: Option<SessionTicket>,
}

/// Serves one connection until it ends.
pub async fn serve<S>(app: Arc<App>, stream: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = app.config.mqtt.clone();
    let max_packet = u32::try_from(settings.max_packet).unwrap_or(u32::MAX);
    let mut io = Framed::with_capacity(stream, wire::sniffing_codec(), BUFFER);
    let deadline = Instant::now() + settings.connect_timeout;
    // The version sniffer reads the CONNECT's fixed header; then the real codec decodes it.
    let version = match tokio::time::timeout_at(deadline, io.next()).await {
        Ok(Some(Ok((packet, _)))) => match wire::version_of(&packet) {
            Some(v) => v,
            None => return,
        },
        Ok(Some(Err(e))) => {
            tracing::debug!(%peer, error = %e, "not an MQTT CONNECT");
            return;
        }
        Ok(None) => return,
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within {:?}", settings.connect_timeout);
            return;
        }
    };
    *io.codec_mut() = wire::codec(version, max_packet);
    let connect = match tokio::time::timeout_at(deadline, io.next()).await {
        Ok(Some(Ok((packet, _)))) => wire::inbound(packet),
        Ok(Some(Err(e))) => {
            tracing::debug!(%peer, error = %e, "malformed CONNECT");
            return;
        }
        Ok(None) | Err(_) => return,
    };
    let mut conn = Connection { app, io, session: Session::new(version), peer, max_packet, watch: None, ticket: None };
    let actions = conn.session.on_packet(connect);
    if conn.run(actions).await.is_ok() {
        let _ = Box::pin(conn.serve()).await;
    }
    if let Some(device) = conn.session.device() {
        tracing::debug!(%device, %peer, "mqtt session closed");
    }
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn serve(&mut self) -> Result<(), Ended> {
        if let Some(device) = self.session.device() {
            tracing::debug!(%device, peer = %self.peer, version = ?self.session.version(), "mqtt session opened");
        }
        let mut heard = Instant::now();
        loop {
            let silence = self.session.silence_limit();
            let input = {
                let watch = self.watch.as_ref();
                tokio::select! {
                    p = self.io.next() => Input::Packet(p),
                    d = async { match watch { Some(w) => w.recv().await, None => std::future::pending().await } } => Input::Delivery(d),
                    () = async { match silence { Some(limit) => tokio::time::sleep_until(heard + limit).await, None => std::future::pending().await } } => Input::Silent,
                    () = self.app.shutdown.cancelled() => Input::Shutdown,
                }
            };
            match input {
                Input::Packet(Some(Ok((packet, _)))) => {
                    heard = Instant::now();
                    self.trim_buffers();
                    let actions = self.session.on_packet(wire::inbound(packet));
                    Box::pin(self.run(actions)).await?;
                }
                Input::Packet(Some(Err(e))) => {
                    tracing::debug!(peer = %self.peer, error = %e, "malformed MQTT packet; closing");
                    let reason = if matches!(e, rmqtt_codec::error::DecodeError::MaxSizeExceeded { .. }) {
                        DisconnectReason::PacketTooLarge
                    } else {
                        DisconnectReason::ProtocolError
                    };
                    return self.disconnect(reason).await;
                }
                Input::Packet(None) => return Ok(()),
                Input::Delivery(delivery) => {
                    let step = match &mut self.watch {
                        Some(watch) => Box::pin(watch.process(delivery)).await,
                        None => continue,
                    };
                    match step {
                        Ok(Step::Send(messages)) => Box::pin(self.publish(messages)).await?,
                        Ok(Step::Close(reason)) => {
                            let code = if reason == CloseReason::ShuttingDown {
                                DisconnectReason::ShuttingDown
                            } else {
                                DisconnectReason::AdministrativeAction
                            };
                            tracing::info!(peer = %self.peer, why = reason.message(), "closing mqtt session");
                            return self.disconnect(code).await;
                        }
                        Err(e) => {
                            tracing::warn!(peer = %self.peer, error = %e, "mqtt sync failed");
                            return self.disconnect(DisconnectReason::ServerError).await;
                        }
                    }
                }
                Input::Silent => {
                    tracing::debug!(peer = %self.peer, "keep-alive ran out");
                    return self.disconnect(DisconnectReason::KeepAliveTimeout).await;
                }
                Input::Shutdown => return self.disconnect(DisconnectReason::ShuttingDown).await,
            }
        }
    }

    /// Carries out the session's actions, in order, and any they lead to.
    async fn run(&mut self, actions: Vec<Action>) -> Result<(), Ended> {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Send(packet) => self.send(packet).await?,
                Action::Close(why) => {
                    tracing::debug!(peer = %self.peer, why, "closing mqtt connection");
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.io.flush()).await;
                    return Err(Ended);
                }
                Action::Authenticate { device, key } => {
                    let outcome = self.authenticate(device, &key).await;
                    queue.extend(self.session.on_authenticated(outcome));
                }
                Action::Watch => {
                    let Some(device) = self.session.device() else { continue };
                    self.flush().await?; // the SUBACK goes before the reload
                    let started = Watch::start(
                        self.app.store.clone(),
                        &self.app.hub,
                        StoreRef::Device(device),
                        Principal::Device(device),
                        None,
                    )
                    .await;
                    match started {
                        Ok((watch, first)) => {
                            self.watch = Some(watch);
                            self.publish(first).await?;
                        }
                        Err(e) => {
                            tracing::warn!(%device, error = %e, "cannot start an mqtt sync session");
                            return self.disconnect(DisconnectReason::ServerError).await;
                        }
                    }
                }
                Action::Unwatch => self.watch = None,
                Action::Write { request, ack } => {
                    let outcome = self.write(request).await?;
                    queue.extend(self.session.on_written(ack, outcome));
                }
                Action::Event { payload, ack } => {
                    let outcome = self.event(payload).await?;
                    queue.extend(self.session.on_written(ack, outcome));
                }
                Action::Rejected(e) => {
                    metrics::counter!("ddp_mqtt_rejected_publishes_total").increment(1);
                    tracing::info!(peer = %self.peer, reason = %e.reason, message = %e.message, "mqtt publish not applied");
                }
            }
        }
        self.flush().await
    }

    async fn authenticate(&mut self, device: DeviceId, key: &Bytes) -> AuthOutcome {
        let Ok(key) = std::str::from_utf8(key) else { return AuthOutcome::BadCredentials };
        match self.app.auth.authenticate_device(device, key).await {
            Ok(()) => {}
            Err(e) if e.reason == ddp_protocol::Reason::UnauthenticatedClient => {
                tracing::info!(%device, peer = %self.peer, "mqtt connect refused: bad credentials");
                return AuthOutcome::BadCredentials;
            }
            Err(e) => {
                tracing::warn!(%device, error = %e, "mqtt connect: cannot check credentials");
                return AuthOutcome::Unavailable;
            }
        }
        match self.app.sessions.open(&Principal::Device(device), Transport::Mqtt).await {
            Ok(ticket) => {
                self.ticket = Some(ticket);
                AuthOutcome::Admitted
            }
            Err(e) if e.reason == ddp_protocol::Reason::TooManyConnections => AuthOutcome::TooManySessions,
            Err(e) => {
                tracing::warn!(%device, error = %e, "mqtt connect: cannot open the session");
                AuthOutcome::Unavailable
            }
        }
    }

    /// Applies a device write through the one write path. Client errors are refused (and
    /// logged); a server failure ends the connection without an acknowledgement, so a QoS 1
    /// client sends it again.
    async fn write(&mut self, request: DeviceRequest) -> Result<WriteOutcome, Ended> {
        let Some(device) = self.session.device() else { return Ok(WriteOutcome::Refused) };
        let who = Principal::Device(device);
        // MQTT has no "try later": over its rate, a device is slowed down instead of refused.
        while let Err(e) = self.app.limiter.check(&who) {
            tokio::time::sleep(Duration::from_secs(e.retry_after.unwrap_or(1))).await;
        }
        let store = StoreRef::Device(device);
        let key = request.key().clone();
        let result = match request {
            DeviceRequest::Set { key, value } => {
                self.app.kv.set(&who, Transport::Mqtt, store, key, value, Condition::None).await.map(|_| ())
            }
            DeviceRequest::Delete { key } => {
                self.app.kv.delete(&who, Transport::Mqtt, store, key, Condition::None).await.map(|_| ())
            }
        };
        self.outcome(result, "write", Some(&key))
    }

    /// Raises a device event through the one event path.
    async fn event(&mut self, payload: Bytes) -> Result<WriteOutcome, Ended> {
        let Some(device) = self.session.device() else { return Ok(WriteOutcome::Refused) };
        let result = self.app.events.raise(&Principal::Device(device), device, &payload).await;
        self.outcome(result, "event", None)
    }

    /// What a PUBLISH gets for `result`: applied, refused (the client's fault; it gets its
    /// PUBACK and the session stays), or the end of the session without PUBACK (our fault, so
    /// that a QoS 1 publish is sent again). `what` and `key` say what it was, for the log.
    fn outcome(
        &self,
        result: Result<(), Error>,
        what: &str,
        key: Option<&ddp_protocol::Key>,
    ) -> Result<WriteOutcome, Ended> {
        match result {
            Ok(()) => Ok(WriteOutcome::Applied),
            Err(e) if e.status() >= 500 => {
                tracing::warn!(peer = %self.peer, error = %e, "mqtt {what} failed; closing without PUBACK");
                Err(Ended)
            }
            Err(e) => {
                metrics::counter!("ddp_mqtt_rejected_publishes_total").increment(1);
                let key = key.map(ddp_protocol::Key::as_str);
                tracing::info!(peer = %self.peer, key, reason = %e.reason, message = %e.message, "mqtt {what} refused");
                Ok(WriteOutcome::Refused)
            }
        }
    }

    async fn publish(&mut self, messages: Vec<tokio_tungstenite::tungstenite::Utf8Bytes>) -> Result<(), Ended> {
        let n = messages.len() as u64;
        for m in messages {
            let packet = Outbound::Publish { topic: self.session.kv_topic().clone(), payload: Bytes::from(m) };
            self.send(packet).await?;
        }
        self.flush().await?;
        metrics::counter!("ddp_sync_messages_sent_total", "transport" => "mqtt").increment(n);
        Ok(())
    }

    async fn send(&mut self, packet: Outbound) -> Result<(), Ended> {
        let Some(packet) = wire::outbound(self.session.version(), packet, self.max_packet) else { return Ok(()) };
        match tokio::time::timeout(SEND_TIMEOUT, self.io.feed(packet)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "mqtt send failed");
                Err(Ended)
            }
            Err(_) => {
                tracing::info!(peer = %self.peer, "mqtt peer too slow to receive for {SEND_TIMEOUT:?}; closing");
                Err(Ended)
            }
        }
    }

    async fn flush(&mut self) -> Result<(), Ended> {
        match tokio::time::timeout(SEND_TIMEOUT, self.io.flush()).await {
            Ok(Ok(())) => {
                self.trim_buffers();
                Ok(())
            }
            _ => Err(Ended),
        }
    }

    /// Gives back buffer memory a large packet made the connection grow, once it is empty.
    fn trim_buffers(&mut self) {
        if self.io.write_buffer().is_empty() && self.io.write_buffer().capacity() > BUFFER_KEEP {
            *self.io.write_buffer_mut() = BytesMut::with_capacity(BUFFER);
        }
        if self.io.read_buffer().is_empty() && self.io.read_buffer().capacity() > BUFFER_KEEP {
            *self.io.read_buffer_mut() = BytesMut::with_capacity(BUFFER);
        }
    }

    /// Ends the connection, telling an MQTT 5 client why.
    async fn disconnect(&mut self, reason: DisconnectReason) -> Result<(), Ended> {
        if self.session.version() == Version::V5 {
            let _ = self.send(Outbound::Disconnect(reason)).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.io.flush()).await;
        }
        Err(Ended)
    }
}
