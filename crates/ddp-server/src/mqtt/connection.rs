//! One MQTT connection: reads packets, lets the [`Session`] decide, and carries out its actions
//! through the gate ([`Kv`](crate::kv::Kv)) — the device's session is opened there at CONNECT,
//! its watch started there at SUBSCRIBE, its publishes applied there — like every transport.
//!
//! Rate limits are the gate's; this is how MQTT answers a refusal. MQTT 5: a QoS 1 publish gets
//! PUBACK `0x97` (quota exceeded) and is not applied; a QoS 0 one is dropped (and counted).
//! MQTT 3.1.1 has no negative acknowledgement, so a publish over the rate is **held**, with the
//! publishes after it, and applied (and acknowledged) as soon as the rate allows — the connection
//! keeps reading, delivering and answering meanwhile. A client that keeps sending far beyond its
//! rate (more than [`MAX_HELD`] publishes waiting) has its QoS 0 publishes dropped, and a QoS 1
//! one then ends the connection without PUBACK (the client sends it again when it reconnects).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ddp_protocol::{DeviceId, Reason};
use futures_util::{SinkExt, StreamExt};
use rmqtt_codec::{MqttCodec, MqttPacket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::session::{Action, AuthOutcome, Session, WriteOutcome};
use super::wire::{self, DisconnectReason, Outbound, Version};
use crate::app::App;
use crate::hub::Delivery;
use crate::json::Json;
use crate::kv::Transport;
use crate::listener::Conn;
use crate::sessions::{Session as Live, Signal};
use crate::watch::Watch;

/// The read buffer starts this small; an idle session holds little more.
const BUFFER: usize = 256;
/// A read buffer grown past this by a large packet is given back once empty.
const BUFFER_KEEP: usize = 4096;
/// How long one send to a peer may take before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Most MQTT 3.1.1 publishes held back by the device's rate.
const MAX_HELD: usize = 256;

type Io<S> = Framed<S, MqttCodec>;

enum Input {
    Packet(Option<Result<(MqttPacket, u32), rmqtt_codec::error::DecodeError>>),
    Delivery(Delivery),
    Silent,
    Signal(Signal),
    Retry,
    Shutdown,
}

/// Why a connection ended early (the reason is already logged).
struct Ended;

/// What a device published: a frame for its store, or an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Frame,
    Event,
}

/// A publish to apply (or held until the device's rate allows it).
struct Publish {
    kind: Kind,
    payload: Bytes,
    ack: Option<u16>,
}

struct Connection<S> {
    app: Arc<App>,
    io: Io<S>,
    session: Session,
    peer: SocketAddr,
    live: Option<Live>,
    watch: Option<Watch>,
    /// MQTT 3.1.1 publishes held back by the rate, in the order they came.
    held: VecDeque<Publish>,
    retry_at: Option<Instant>,
}

/// Serves one connection until it ends. Until its CONNECT is accepted it may be shed at the
/// connection cap ([`Conn`]).
pub(crate) async fn serve<S>(app: Arc<App>, stream: S, peer: SocketAddr, conn: Arc<Conn>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::select! {
        () = serve_admitted(app, stream, peer, &conn) => {}
        () = shed(&conn) => tracing::debug!(%peer, "mqtt connection shed at the connection cap before it authenticated"),
    }
}

/// Completes when `conn` is shed (it can be only before it authenticates).
async fn shed(conn: &Conn) {
    conn.shed_now().await;
}

async fn serve_admitted<S>(app: Arc<App>, stream: S, peer: SocketAddr, conn: &Conn)
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
        Ok(Some(Ok((packet, remaining)))) => wire::inbound(packet, remaining),
        Ok(Some(Err(e))) => {
            tracing::debug!(%peer, error = %e, "malformed CONNECT");
            return;
        }
        Ok(None) | Err(_) => return,
    };
    let mut connection = Connection {
        app,
        io,
        session: Session::new(version),
        peer,
        live: None,
        watch: None,
        held: VecDeque::new(),
        retry_at: None,
    };
    let actions = connection.session.on_packet(connect);
    if connection.run(actions).await.is_ok() {
        if connection.live.is_some() {
            conn.authenticated();
        }
        let _ = Box::pin(connection.serve()).await;
    }
    if let Some(device) = connection.session.device() {
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
            let retry_at = self.retry_at;
            let input = {
                let watch = self.watch.as_ref();
                let live = self.live.as_ref();
                tokio::select! {
                    p = self.io.next() => Input::Packet(p),
                    d = async { match watch { Some(w) => w.recv().await, None => std::future::pending().await } } => Input::Delivery(d),
                    () = async { match silence { Some(limit) => tokio::time::sleep_until(heard + limit).await, None => std::future::pending().await } } => Input::Silent,
                    s = async { match live { Some(l) => l.signal().await, None => std::future::pending().await } } => Input::Signal(s),
                    () = async { match retry_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => Input::Retry,
                    () = self.app.shutdown.cancelled() => Input::Shutdown,
                }
            };
            match input {
                Input::Packet(Some(Ok((packet, remaining)))) => {
                    heard = Instant::now();
                    self.trim_buffers();
                    let actions = self.session.on_packet(wire::inbound(packet, remaining));
                    Box::pin(self.run(actions)).await?;
                }
                Input::Packet(Some(Err(e))) => {
                    tracing::debug!(peer = %self.peer, error = %e, "malformed MQTT packet; closing");
                    let reason = if matches!(e, rmqtt_codec::error::DecodeError::MaxSizeExceeded { .. }) {
                        DisconnectReason::PacketTooLarge
                    } else {
                        DisconnectReason::MalformedPacket
                    };
                    return self.disconnect(reason).await;
                }
                Input::Packet(None) => return Ok(()),
                Input::Delivery(delivery) => {
                    let messages = match &mut self.watch {
                        Some(watch) => Box::pin(watch.process(delivery)).await,
                        None => continue,
                    };
                    match messages {
                        Ok(messages) => Box::pin(self.publish(messages)).await?,
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
                Input::Signal(Signal::Closed(reason)) => {
                    tracing::debug!(peer = %self.peer, why = reason.message(), "closing mqtt session");
                    return self.disconnect(DisconnectReason::AdministrativeAction).await;
                }
                Input::Signal(Signal::Commands(commands)) => Box::pin(self.commands(commands)).await?,
                Input::Retry => Box::pin(self.retry_held()).await?,
                Input::Shutdown => return self.disconnect(DisconnectReason::ShuttingDown).await,
            }
        }
    }

    /// Carries out the session's actions, in order, and any they lead to.
    async fn run(&mut self, actions: Vec<Action>) -> Result<(), Ended> {
        let mut queue: VecDeque<Action> = actions.into();
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
                    if self.live.is_none() {
                        continue;
                    }
                    self.flush().await?; // the SUBACK goes before the reload
                    let Some(live) = &self.live else { continue };
                    match self.app.kv.watch(live, None, false).await {
                        Ok((watch, first)) => {
                            self.watch = Some(watch);
                            self.publish(first).await?; // the reload, delivered once sent
                        }
                        Err(e) => {
                            tracing::warn!(peer = %self.peer, error = %e, "cannot start an mqtt sync session");
                            return self.disconnect(DisconnectReason::ServerError).await;
                        }
                    }
                }
                Action::Unwatch => self.watch = None,
                Action::ListenCommands(on) => {
                    if let Some(live) = &self.live {
                        live.listen_for_commands(on);
                    }
                }
                Action::Write { payload, ack } => {
                    self.take(Publish { kind: Kind::Frame, payload, ack }, &mut queue).await?;
                }
                Action::Event { payload, ack } => {
                    self.take(Publish { kind: Kind::Event, payload, ack }, &mut queue).await?;
                }
            }
        }
        self.flush().await
    }

    async fn authenticate(&mut self, device: DeviceId, key: &Bytes) -> AuthOutcome {
        let Ok(key) = std::str::from_utf8(key) else { return AuthOutcome::BadCredentials };
        match self.app.kv.open_device(device, key, Transport::Mqtt).await {
            Ok(live) => {
                self.live = Some(live);
                AuthOutcome::Admitted
            }
            Err(e) => match e.reason {
                Reason::UnauthenticatedClient => {
                    tracing::info!(%device, peer = %self.peer, "mqtt connect refused: bad credentials");
                    AuthOutcome::BadCredentials
                }
                Reason::TooManyConnections => AuthOutcome::TooManySessions,
                Reason::RateLimitExceeded => {
                    tracing::info!(%device, peer = %self.peer, "mqtt connect refused: over the device's rate");
                    AuthOutcome::RateLimited
                }
                _ => {
                    tracing::warn!(%device, error = %e, "mqtt connect: cannot open the session");
                    AuthOutcome::Unavailable
                }
            },
        }
    }

    /// Takes a publish: applies it now, or — while earlier ones are held back by the rate —
    /// holds it behind them, so a device's publishes are applied in the order it sent them.
    async fn take(&mut self, publish: Publish, queue: &mut VecDeque<Action>) -> Result<(), Ended> {
        if !self.held.is_empty() {
            return self.hold(publish);
        }
        self.apply(publish, queue).await
    }

    fn hold(&mut self, publish: Publish) -> Result<(), Ended> {
        if self.held.len() < MAX_HELD {
            self.held.push_back(publish);
            return Ok(());
        }
        if publish.ack.is_none() {
            metrics::counter!("ddp_mqtt_dropped_publishes_total").increment(1);
            tracing::info!(peer = %self.peer, "mqtt QoS 0 publish dropped: the device is far over its rate");
            return Ok(());
        }
        tracing::warn!(
            peer = %self.peer,
            held = MAX_HELD,
            "mqtt device publishes far over its rate; closing without PUBACK (it will resend)"
        );
        Err(Ended)
    }

    /// Applies a publish through the gate and queues its acknowledgement. A client error is
    /// refused (acknowledged, logged, counted); a server failure ends the connection without
    /// an acknowledgement, so a QoS 1 client sends it again.
    async fn apply(&mut self, publish: Publish, queue: &mut VecDeque<Action>) -> Result<(), Ended> {
        let Some(live) = &self.live else { return Err(Ended) };
        let result = match publish.kind {
            Kind::Frame => self.app.kv.device_frame(live, &publish.payload).await.map_err(|r| (r.error, r.key)),
            Kind::Event => self.app.kv.session_event(live, &publish.payload).await.map_err(|e| (e, None)),
        };
        let outcome = match result {
            Ok(()) => WriteOutcome::Applied,
            Err((e, _)) if e.reason == Reason::RateLimitExceeded => match self.session.version() {
                Version::V5 => {
                    metrics::counter!("ddp_mqtt_rejected_publishes_total").increment(1);
                    tracing::info!(peer = %self.peer, "mqtt publish refused: over the device's rate");
                    WriteOutcome::RateLimited
                }
                Version::V3 => {
                    let wait = e.retry_after.unwrap_or(Duration::from_secs(1));
                    self.retry_at = Some(Instant::now() + wait);
                    self.held.push_front(publish);
                    return Ok(());
                }
            },
            Err((e, _)) if e.status() >= 500 => {
                tracing::warn!(peer = %self.peer, error = %e, "mqtt publish failed; closing without PUBACK");
                return Err(Ended);
            }
            Err((e, key)) => {
                metrics::counter!("ddp_mqtt_rejected_publishes_total").increment(1);
                let what = if publish.kind == Kind::Event { "event" } else { "write" };
                tracing::info!(peer = %self.peer, key, reason = %e.reason, message = %e.message, "mqtt {what} refused");
                WriteOutcome::Refused
            }
        };
        queue.extend(self.session.on_written(publish.ack, outcome));
        Ok(())
    }

    /// Applies held publishes, in order, as far as the rate now allows.
    async fn retry_held(&mut self) -> Result<(), Ended> {
        self.retry_at = None;
        let mut queue = VecDeque::new();
        while self.retry_at.is_none()
            && let Some(publish) = self.held.pop_front()
        {
            self.apply(publish, &mut queue).await?;
        }
        self.run(queue.into()).await
    }

    /// Publishes sync messages on the kv topic; once they are flushed, the watch has delivered
    /// them (PROTOCOL.md §10). A message larger than the Maximum Packet Size
    /// the client announced is never sent: the connection ends with `0x95` (packet too large),
    /// since skipping it would leave a gap in the client's mirror.
    async fn publish(&mut self, messages: Vec<Json>) -> Result<(), Ended> {
        let n = messages.len() as u64;
        for m in messages {
            let topic = self.session.kv_topic().clone();
            if let Some(max) = self.session.client_max_packet() {
                let size = wire::publish_size(self.session.version(), &topic, m.len());
                if size > max as usize {
                    tracing::warn!(
                        peer = %self.peer,
                        size,
                        client_max = max,
                        "a sync message does not fit the client's Maximum Packet Size; disconnecting (0x95)"
                    );
                    return self.disconnect(DisconnectReason::PacketTooLarge).await;
                }
            }
            self.send(Outbound::Publish { topic, payload: m.bytes() }).await?;
        }
        self.flush().await?;
        if let Some(watch) = &self.watch {
            watch.sent();
        }
        metrics::counter!("ddp_sync_messages_sent_total", "transport" => "mqtt").increment(n);
        Ok(())
    }

    /// Publishes commands on the command topic (QoS 0). A command larger than the client's
    /// Maximum Packet Size is dropped (MQTT 5 says to discard what does not fit), and logged.
    async fn commands(&mut self, commands: std::collections::VecDeque<Json>) -> Result<(), Ended> {
        let topic = self.session.command_topic().clone();
        for command in commands {
            if let Some(max) = self.session.client_max_packet()
                && wire::publish_size(self.session.version(), &topic, command.len()) > max as usize
            {
                metrics::counter!("ddp_commands_dropped_total").increment(1);
                tracing::warn!(peer = %self.peer, size = command.len(), client_max = max, "a command does not fit the client's Maximum Packet Size; dropped");
                continue;
            }
            self.send(Outbound::Publish { topic: topic.clone(), payload: command.bytes() }).await?;
        }
        self.flush().await
    }

    async fn send(&mut self, packet: Outbound) -> Result<(), Ended> {
        let Some(packet) = wire::outbound(self.session.version(), packet, self.app_max_packet()) else {
            return Ok(());
        };
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

    fn app_max_packet(&self) -> u32 {
        u32::try_from(self.app.config.mqtt.max_packet).unwrap_or(u32::MAX)
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

    /// Gives back buffer memory once it is empty: the whole write buffer (the codec sizes the
    /// next one for its packet: an idle connection holds none), and a read buffer a large
    /// packet made grow.
    fn trim_buffers(&mut self) {
        if self.io.write_buffer().is_empty() && self.io.write_buffer().capacity() > 0 {
            *self.io.write_buffer_mut() = BytesMut::new();
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
