//! The background task: connects, keeps the mirror in sync, sends writes and matches their
//! confirmations, and reconnects with capped exponential backoff and jitter.
//!
//! A write is confirmed by the server's own change message for it — same key, same value (for a
//! delete, same key) — which carries the authoritative rev; over WebSocket an `error` frame for
//! the key refuses it, over MQTT 5 a PUBACK with a failure reason does. Writes made while offline
//! wait for the next session; writes in flight when a session drops fail with
//! [`ErrorKind::ConnectionLost`] (they may or may not have been applied; the mirror will show).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ddp_protocol::sync::{DeviceRequest, ServerMessage};
use ddp_protocol::{DeviceId, Reason, Rev};
use futures_util::{SinkExt, StreamExt};
use rand::RngExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use url::Url;

use crate::client::{Shared, Update};
use crate::error::{Error, ErrorKind, Result};
use crate::persist;

type Reply = oneshot::Sender<Result<Rev>>;

/// A request from a [`Client`](crate::Client) handle.
pub(crate) enum Job {
    Write { request: DeviceRequest, reply: Reply },
    Close(oneshot::Sender<()>),
}

/// Where and how to connect.
pub(crate) enum Target {
    Ws { url: Url, key: String },
    Mqtt { host: String, port: u16, device: DeviceId, key: String, tls: Option<rumqttc::Transport> },
}

impl Target {
    pub(crate) fn parse(text: &str, device: DeviceId, key: &str, ca_pem: Option<&[u8]>) -> Result<Target> {
        let bad = |why: &str| Error::new(ErrorKind::InvalidArgument, format!("{text:?}: {why}"));
        let url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let host = url.host_str().ok_or_else(|| bad("the URL has no host"))?.to_owned();
        match url.scheme() {
            "ws" | "wss" => {
                let mut url = url.clone();
                let base = url.path().trim_end_matches('/').to_owned();
                url.set_path(&format!("{base}/devices/{device}/kv"));
                url.set_query(None);
                Ok(Target::Ws { url, key: key.to_owned() })
            }
            "mqtt" | "mqtts" => {
                let tls = url.scheme() == "mqtts";
                let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
                let tls = tls.then(|| match ca_pem {
                    Some(ca) => rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple {
                        ca: ca.to_vec(),
                        alpn: None,
                        client_auth: None,
                    }),
                    None => rumqttc::Transport::tls_with_default_config(),
                });
                Ok(Target::Mqtt { host, port, device, key: key.to_owned(), tls })
            }
            other => Err(bad(&format!("unknown scheme {other:?}: use ws://, wss://, mqtt:// or mqtts://"))),
        }
    }
}

/// Reconnection delays: exponential, capped, with jitter.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new((min, max): (Duration, Duration)) -> Backoff {
        Backoff { min, max, next: min }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay: a random time between half and all of the current step.
    fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

struct InFlight {
    request: DeviceRequest,
    reply: Reply,
    /// MQTT: the packet id of its PUBLISH, once sent.
    packet_id: Option<u16>,
}

enum Ended {
    Closed(Option<oneshot::Sender<()>>),
    Dropped(String),
}

pub(crate) struct Task {
    shared: Arc<Shared>,
    target: Target,
    commands: mpsc::Receiver<Job>,
    persist: Option<PathBuf>,
    backoff: Backoff,
    /// The largest message taken from the server (announced over MQTT 5).
    max_message: usize,
    queued: VecDeque<(DeviceRequest, Reply)>,
    in_flight: VecDeque<InFlight>,
    dirty: bool,
    /// Whether applied changes are acknowledged.
    acks: bool,
    /// The rev acknowledged in this session.
    acked: Rev,
    last_ack: Option<Instant>,
    /// The rev of the mirror last saved, and when.
    saved: Rev,
    last_save: Option<Instant>,
}

/// How often a changed mirror is saved.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// The least time between two acknowledgements when the mirror is not persisted.
const ACK_EVERY: Duration = Duration::from_millis(250);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

enum Input<M> {
    Message(M),
    Job(Option<Job>),
    Save,
    Ack,
}

/// Completes at `at`; never without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Task {
    pub(crate) fn new(
        shared: Arc<Shared>,
        target: Target,
        commands: mpsc::Receiver<Job>,
        persist: Option<PathBuf>,
        backoff: (Duration, Duration),
        max_message: usize,
        acks: bool,
    ) -> Task {
        let saved = shared.mirror.read().map(|m| m.rev()).unwrap_or_default();
        Task {
            shared,
            target,
            commands,
            persist,
            backoff: Backoff::new(backoff),
            max_message,
            queued: VecDeque::new(),
            in_flight: VecDeque::new(),
            dirty: false,
            acks,
            acked: Rev::ZERO,
            last_ack: None,
            saved,
            last_save: None,
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            let ended = match &self.target {
                Target::Ws { .. } => self.ws().await,
                Target::Mqtt { .. } => self.mqtt().await,
            };
            for w in self.in_flight.drain(..) {
                let _ = w.reply.send(Err(Error::new(
                    ErrorKind::ConnectionLost,
                    "the connection dropped before the server confirmed the write; it may or may not be applied",
                )));
            }
            match ended {
                Ended::Closed(done) => {
                    self.save();
                    self.shared.status.send_modify(|s| s.connected = false);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Ended::Dropped(why) => {
                    tracing::info!(why, "device session ended; reconnecting");
                    self.shared.status.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(why);
                    });
                    let _ = self.shared.updates.send(Update::Disconnected);
                }
            }
            // Wait before reconnecting; keep taking writes (for the next session) and a close.
            let deadline = Instant::now() + self.backoff.next_delay();
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    command = self.commands.recv() => match command {
                        Some(Job::Write { request, reply }) => self.queued.push_back((request, reply)),
                        Some(Job::Close(done)) => {
                            self.save();
                            let _ = done.send(());
                            return;
                        }
                        None => {
                            self.save();
                            return;
                        }
                    },
                }
            }
        }
    }

    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let Some(path) = &self.persist else { return };
        let snapshot = match self.shared.mirror.read() {
            Ok(m) => m.clone(),
            Err(_) => return,
        };
        self.last_save = Some(Instant::now());
        match persist::save(path, &snapshot) {
            Ok(()) => {
                self.dirty = false;
                self.saved = snapshot.rev();
            }
            Err(e) => tracing::warn!(error = %e, "cannot persist the mirror"),
        }
    }

    /// When the next acknowledgement is due: none when everything held is acknowledged.
    fn ack_at(&self) -> Option<Instant> {
        if !self.acks {
            return None;
        }
        let rev = self.shared.mirror.read().map(|m| m.rev()).unwrap_or_default();
        if rev <= self.acked {
            return None;
        }
        let now = Instant::now();
        let (last, every) =
            if self.persist.is_some() { (self.last_save, SAVE_EVERY) } else { (self.last_ack, ACK_EVERY) };
        Some(last.map_or(now, |t| (t + every).max(now)))
    }

    /// The acknowledgement to send now, if any: the mirror's rev (once saved, when it is
    /// persisted).
    fn take_ack(&mut self) -> Option<String> {
        if self.persist.is_some() {
            self.save();
        }
        let rev = match self.persist {
            Some(_) => self.saved,
            None => self.shared.mirror.read().map(|m| m.rev()).unwrap_or_default(),
        };
        if rev <= self.acked {
            return None;
        }
        self.acked = rev;
        self.last_ack = Some(Instant::now());
        Some(DeviceRequest::Ack { rev }.to_frame())
    }

    /// Applies a message to the mirror, tells device code, and settles writes it confirms.
    fn on_message(&mut self, message: ServerMessage) {
        let changes = match self.shared.mirror.write() {
            Ok(mut m) => m.apply(&message),
            Err(_) => return,
        };
        let rev = self.shared.mirror.read().map(|m| m.rev()).unwrap_or_default();
        if !changes.is_empty() || rev != self.saved {
            self.dirty = true;
        }
        for c in changes {
            let _ = self.shared.updates.send(Update::Changed(c));
        }
        match message {
            ServerMessage::Command { command } => {
                let _ = self.shared.commands.send(command);
            }
            ServerMessage::Reload { rev, .. } => {
                self.synced(rev);
                // A reload (after falling behind) may stand in for confirmations.
                let settled: Vec<usize> = self
                    .in_flight
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| self.satisfied(&w.request))
                    .map(|(i, _)| i)
                    .collect();
                for i in settled.into_iter().rev() {
                    if let Some(w) = self.in_flight.remove(i) {
                        let _ = w.reply.send(Ok(rev));
                    }
                }
            }
            ServerMessage::Resume { .. } => {
                let rev = self.shared.mirror.read().map(|m| m.rev()).unwrap_or_default();
                self.synced(rev);
            }
            ServerMessage::Set { rev, key, value } => {
                self.settle(
                    |r| matches!(r, DeviceRequest::Set { key: k, value: v } if *k == key && *v == value),
                    Ok(rev),
                );
            }
            ServerMessage::Delete { rev, key } => {
                self.settle(|r| matches!(r, DeviceRequest::Delete { key: k } if *k == key), Ok(rev));
            }
            ServerMessage::Batch { rev, .. } => {
                let _ = self.shared.updates.send(Update::Batch { rev });
            }
            ServerMessage::Error { reason, message, key, .. } => {
                let error = Error::refused(reason, message);
                match key {
                    Some(key) => self.settle(|r| r.key().is_some_and(|k| k.as_str() == key), Err(error)),
                    // Writes always name their key: this refused an acknowledgement.
                    None => tracing::debug!(error = %error, "the server refused a frame that named no key"),
                }
            }
        }
    }

    fn satisfied(&self, request: &DeviceRequest) -> bool {
        let Ok(m) = self.shared.mirror.read() else { return false };
        match request {
            DeviceRequest::Set { key, value } => m.get(key.as_str()) == Some(value),
            DeviceRequest::Delete { key } => m.get(key.as_str()).is_none(),
            DeviceRequest::Ack { .. } | DeviceRequest::Batch { .. } => true,
        }
    }

    /// Settles the oldest in-flight write that `matches`.
    fn settle(&mut self, matches: impl Fn(&DeviceRequest) -> bool, result: Result<Rev>) {
        if let Some(i) = self.in_flight.iter().position(|w| matches(&w.request))
            && let Some(w) = self.in_flight.remove(i)
        {
            let _ = w.reply.send(result);
        }
    }

    fn synced(&mut self, rev: Rev) {
        self.backoff.reset();
        self.shared.status.send_modify(|s| {
            s.connected = true;
            s.synced = true;
            s.last_error = None;
        });
        let _ = self.shared.updates.send(Update::Synced { rev });
    }

    /// The next command, taking queued (offline) writes first.
    fn next_queued(&mut self) -> Option<Job> {
        self.queued.pop_front().map(|(request, reply)| Job::Write { request, reply })
    }

    // ---- WebSocket ----

    async fn ws(&mut self) -> Ended {
        let Target::Ws { url, key } = &self.target else { return Ended::Dropped("not a WebSocket target".into()) };
        let mut url = url.clone();
        let rev = self.shared.mirror.read().map(|m| m.rev()).unwrap_or_default();
        // Commands come on the sync session itself (PROTOCOL.md §8's extension), and each
        // atomic batch as one message (§11), applied at once.
        if rev > Rev::ZERO {
            url.set_query(Some(&format!("commands=1&batches=1&sinceRev={rev}")));
        } else {
            url.set_query(Some("commands=1&batches=1"));
        }
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return Ended::Dropped(format!("bad URL: {e}")),
        };
        match format!("ModeCloud {key}").parse() {
            Ok(v) => {
                request.headers_mut().insert("Authorization", v);
            }
            Err(_) => return Ended::Dropped("the key is not a valid header value".into()),
        }
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message));
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let mut ws = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                return Ended::Dropped(format!("the server refused the session: HTTP {}", resp.status()));
            }
            Ok(Err(e)) => return Ended::Dropped(format!("cannot connect: {e}")),
            Err(_) => return Ended::Dropped("connecting timed out".into()),
        };
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        self.acked = Rev::ZERO;
        loop {
            let ack_at = self.ack_at();
            let input = match self.next_queued() {
                Some(c) => Input::Job(Some(c)),
                None => tokio::select! {
                    m = ws.next() => Input::Message(m),
                    c = self.commands.recv() => Input::Job(c),
                    _ = save_tick.tick() => Input::Save,
                    () = until(ack_at) => Input::Ack,
                },
            };
            match input {
                Input::Message(Some(Ok(Message::Text(text)))) => {
                    match serde_json::from_str::<ServerMessage>(text.as_str()) {
                        Ok(message) => self.on_message(message),
                        Err(e) => tracing::warn!(error = %e, "unreadable message from the server"),
                    }
                }
                Input::Message(Some(Ok(Message::Close(frame)))) => {
                    return Ended::Dropped(match frame {
                        Some(f) => format!("the server closed the session ({}): {}", u16::from(f.code), f.reason),
                        None => "the server closed the session".into(),
                    });
                }
                Input::Message(Some(Ok(_))) => {}
                Input::Message(Some(Err(e))) => return Ended::Dropped(format!("connection error: {e}")),
                Input::Message(None) => return Ended::Dropped("the connection ended".into()),
                Input::Job(Some(Job::Write { request, reply })) => {
                    if reply.is_closed() {
                        continue; // the caller gave up
                    }
                    if let Err(e) = ws.send(Message::text(request.to_frame())).await {
                        let _ = reply.send(Err(Error::new(ErrorKind::ConnectionLost, format!("cannot send: {e}"))));
                        return Ended::Dropped(format!("send failed: {e}"));
                    }
                    self.in_flight.push_back(InFlight { request, reply, packet_id: None });
                }
                Input::Job(Some(Job::Close(done))) => {
                    let _ = ws.close(None).await;
                    return Ended::Closed(Some(done));
                }
                Input::Job(None) => {
                    let _ = ws.close(None).await;
                    return Ended::Closed(None);
                }
                Input::Save => self.save(),
                Input::Ack => {
                    if let Some(ack) = self.take_ack()
                        && let Err(e) = ws.send(Message::text(ack)).await
                    {
                        return Ended::Dropped(format!("send failed: {e}"));
                    }
                }
            }
        }
    }

    // ---- MQTT 5 ----

    async fn mqtt(&mut self) -> Ended {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
        let Target::Mqtt { host, port, device, key, tls } = &self.target else {
            return Ended::Dropped("not an MQTT target".into());
        };
        let topic = format!("/devices/{device}/kv");
        let command_topic = format!("/devices/{device}/command");
        let client_id = format!("ddp-device-{device}-{:08x}", rand::rng().random::<u32>());
        let mut options = rumqttc::v5::MqttOptions::new(client_id, host.clone(), *port);
        options.set_credentials(device.to_string(), key.clone());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_start(true);
        // Announced as the Maximum Packet Size: the server never sends a larger packet.
        options.set_max_packet_size(Some(u32::try_from(self.max_message).unwrap_or(u32::MAX)));
        if let Some(t) = tls {
            options.set_transport(t.clone());
        }
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 256);
        let mut save_tick = tokio::time::interval(SAVE_EVERY);
        let mut subscribed = false;
        self.acked = Rev::ZERO;
        loop {
            let queued = if subscribed { self.next_queued() } else { None };
            let ack_at = if subscribed { self.ack_at() } else { None };
            let input = match queued {
                Some(c) => Input::Job(Some(c)),
                None => tokio::select! {
                    e = tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(30), eventloop.poll()) => Input::Message(e),
                    c = self.commands.recv(), if subscribed => Input::Job(c),
                    _ = save_tick.tick() => Input::Save,
                    () = until(ack_at) => Input::Ack,
                },
            };
            match input {
                Input::Message(Err(_)) => return Ended::Dropped("the MQTT connection went silent".into()),
                Input::Message(Ok(Err(e))) => return Ended::Dropped(format!("MQTT: {e}")),
                Input::Message(Ok(Ok(rumqttc::v5::Event::Incoming(packet)))) => match packet {
                    Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                        // Both topics in one SUBSCRIBE, as MODE's SDKs do.
                        let filters = [&topic, &command_topic]
                            .map(|t| rumqttc::v5::mqttbytes::v5::Filter::new(t.clone(), QoS::AtMostOnce));
                        if let Err(e) = client.try_subscribe_many(filters) {
                            return Ended::Dropped(format!("cannot subscribe: {e}"));
                        }
                    }
                    Packet::ConnAck(ack) => {
                        return Ended::Dropped(format!("the server refused the connection: {:?}", ack.code));
                    }
                    Packet::SubAck(_) => subscribed = true,
                    Packet::Publish(p) if p.topic.as_ref() == topic.as_bytes() => {
                        match serde_json::from_slice::<ServerMessage>(&p.payload) {
                            Ok(message) => self.on_message(message),
                            Err(e) => tracing::warn!(error = %e, "unreadable message from the server"),
                        }
                    }
                    Packet::Publish(p) if p.topic.as_ref() == command_topic.as_bytes() => {
                        match serde_json::from_slice::<ddp_protocol::sync::Command>(&p.payload) {
                            Ok(command) => {
                                let _ = self.shared.commands.send(command);
                            }
                            Err(e) => tracing::warn!(error = %e, "unreadable command from the server"),
                        }
                    }
                    Packet::PubAck(ack) if ack.reason != PubAckReason::Success => {
                        let reason = match ack.reason {
                            PubAckReason::QuotaExceeded => Reason::RateLimitExceeded,
                            _ => Reason::InvalidParameter,
                        };
                        let error =
                            Error::refused(reason, format!("the server did not apply the write ({:?})", ack.reason));
                        let pkid = ack.pkid;
                        if let Some(i) = self.in_flight.iter().position(|w| w.packet_id == Some(pkid))
                            && let Some(w) = self.in_flight.remove(i)
                        {
                            let _ = w.reply.send(Err(error));
                        }
                    }
                    Packet::Disconnect(d) => {
                        return Ended::Dropped(format!("the server disconnected: {:?}", d.reason_code));
                    }
                    _ => {}
                },
                Input::Message(Ok(Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))))) => {
                    if let Some(w) = self.in_flight.iter_mut().find(|w| w.packet_id.is_none()) {
                        w.packet_id = Some(pkid);
                    }
                }
                Input::Message(Ok(Ok(_))) => {}
                Input::Job(Some(Job::Write { request, reply })) => {
                    if reply.is_closed() {
                        continue;
                    }
                    match client.try_publish(topic.clone(), QoS::AtLeastOnce, false, request.to_frame()) {
                        Ok(()) => self.in_flight.push_back(InFlight { request, reply, packet_id: None }),
                        Err(e) => {
                            let _ = reply
                                .send(Err(Error::new(ErrorKind::Timeout, format!("too many writes waiting: {e}"))));
                        }
                    }
                }
                Input::Job(Some(Job::Close(done))) => {
                    let _ = client.try_disconnect();
                    return Ended::Closed(Some(done));
                }
                Input::Job(None) => {
                    let _ = client.try_disconnect();
                    return Ended::Closed(None);
                }
                Input::Save => self.save(),
                Input::Ack => {
                    // QoS 0: a lost ack is made good by the next one, or by the next session's.
                    if let Some(ack) = self.take_ack()
                        && let Err(e) = client.try_publish(topic.clone(), QoS::AtMostOnce, false, ack)
                    {
                        tracing::debug!(error = %e, "cannot queue an acknowledgement");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_transport() {
        let d = DeviceId::new(7).expect("id");
        match Target::parse("ws://127.0.0.1:8080", d, "k", None) {
            Ok(Target::Ws { url, .. }) => assert_eq!(url.as_str(), "ws://127.0.0.1:8080/devices/7/kv"),
            _ => panic!("ws"),
        }
        match Target::parse("wss://example.com/ddp/", d, "k", None) {
            Ok(Target::Ws { url, .. }) => assert_eq!(url.as_str(), "wss://example.com/ddp/devices/7/kv"),
            _ => panic!("wss"),
        }
        assert!(matches!(
            Target::parse("mqtt://10.0.0.1", d, "k", None),
            Ok(Target::Mqtt { port: 1883, tls: None, .. })
        ));
        assert!(matches!(
            Target::parse("mqtts://broker", d, "k", None),
            Ok(Target::Mqtt { port: 8883, tls: Some(_), .. })
        ));
        for bad in ["http://x", "nonsense", "ws://"] {
            let err = Target::parse(bad, d, "k", None).err().map(|e| e.kind());
            assert_eq!(err, Some(ErrorKind::InvalidArgument), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new((Duration::from_millis(100), Duration::from_millis(800)));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in delays.iter().zip([100, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(step / 2) && *d <= Duration::from_millis(step),
                "{d:?} for step {step}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn frames_are_the_protocol_ones() {
        let set = DeviceRequest::Set {
            key: ddp_protocol::Key::new("k").expect("key"),
            value: ddp_protocol::Value::parse("1.10").expect("v"),
        };
        assert_eq!(set.to_frame(), r#"{"action":"set","key":"k","value":1.10}"#);
        assert_eq!(DeviceRequest::parse(set.to_frame().as_bytes()), Ok(set));
    }
}
