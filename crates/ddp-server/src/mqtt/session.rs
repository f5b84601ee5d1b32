//! The rules of an MQTT session (PROTOCOL.md §4.2) as a state machine without IO.
//!
//! The connection driver feeds it every packet ([`Session::on_packet`]) and the outcome of each
//! asynchronous step it asked for ([`Session::on_authenticated`], [`Session::on_written`]); the
//! session answers with [`Action`]s to carry out, in order. Everything MQTT-specific the service
//! decides — CONNECT first, credentials, which topics a device may use, refusing retain, wills
//! and QoS 2, not applying a retransmitted QoS 1 publish twice, keep-alive — is decided here and
//! unit-tested without sockets.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use ddp_protocol::DeviceId;

use super::wire::{ConnAck, DisconnectReason, Inbound, Outbound, PubAckReason, Version};

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Action {
    /// Check that `key` is `device`'s key and admit the session; report with
    /// [`Session::on_authenticated`].
    Authenticate {
        /// The device named by the username.
        device: DeviceId,
        /// The password.
        key: Bytes,
    },
    /// Send a packet.
    Send(Outbound),
    /// Start (or restart) watching the device's store; its messages go to [`Session::kv_topic`].
    Watch,
    /// Stop watching.
    Unwatch,
    /// Start (`true`) or stop taking the device's commands; they go to [`Session::command_topic`].
    ListenCommands(bool),
    /// Hand a `/kv` publish's payload (a device frame) to the gate; report with
    /// [`Session::on_written`] (which acknowledges QoS 1).
    Write {
        /// The payload.
        payload: Bytes,
        /// The packet id to acknowledge, for QoS 1.
        ack: Option<u16>,
    },
    /// Raise a device event from an `/event` publish; then acknowledge `ack` with
    /// [`Session::on_written`].
    Event {
        /// The publish payload.
        payload: Bytes,
        /// The packet id to acknowledge, for QoS 1.
        ack: Option<u16>,
    },
    /// Close the connection (any packet before this is sent first).
    Close(&'static str),
}

/// The outcome of authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AuthOutcome {
    /// Admitted.
    Admitted,
    /// Unknown device or wrong key.
    BadCredentials,
    /// The device already holds its maximum of sessions.
    TooManySessions,
    /// The device connects more often than its rate allows.
    RateLimited,
    /// The server could not check.
    Unavailable,
}

/// The outcome of a write or event, for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteOutcome {
    /// Applied (durable).
    Applied,
    /// Refused: the payload or its key or value is not acceptable, or a limit was reached.
    Refused,
    /// Refused: over the device's rate (MQTT 5 only; a 3.1.1 write is held until it may pass).
    RateLimited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    Authenticating,
    Connected,
    Closed,
}

/// Packet ids of QoS 1 publishes applied lately, to recognise retransmissions.
const RECENT: usize = 64;

/// One MQTT connection's session state.
#[derive(Debug)]
pub(super) struct Session {
    version: Version,
    state: State,
    device: Option<DeviceId>,
    keep_alive: u16,
    client_max_packet: Option<u32>,
    kv_topic: ByteString,
    command_topic: ByteString,
    event_topic: String,
    recent: VecDeque<u16>,
}

fn close(version: Version, reason: DisconnectReason, why: &'static str) -> Vec<Action> {
    let mut actions = Vec::with_capacity(2);
    if version == Version::V5 {
        actions.push(Action::Send(Outbound::Disconnect(reason)));
    }
    actions.push(Action::Close(why));
    actions
}

impl Session {
    /// A session for a client speaking `version`, before its CONNECT.
    pub(super) fn new(version: Version) -> Session {
        Session {
            version,
            state: State::AwaitingConnect,
            device: None,
            keep_alive: 0,
            client_max_packet: None,
            kv_topic: ByteString::new(),
            command_topic: ByteString::new(),
            event_topic: String::new(),
            recent: VecDeque::new(),
        }
    }

    /// The protocol version.
    pub(super) fn version(&self) -> Version {
        self.version
    }

    /// The authenticated device.
    pub(super) fn device(&self) -> Option<DeviceId> {
        self.device.filter(|_| self.state == State::Connected)
    }

    /// `/devices/{id}/kv`, where sync messages are published.
    pub(super) fn kv_topic(&self) -> &ByteString {
        &self.kv_topic
    }

    /// `/devices/{id}/command`, where commands are published.
    pub(super) fn command_topic(&self) -> &ByteString {
        &self.command_topic
    }

    /// The largest packet the client said it accepts (MQTT 5), if it said.
    pub(super) fn client_max_packet(&self) -> Option<u32> {
        self.client_max_packet
    }

    /// How long the client may stay silent: 1.5 × its keep-alive; `None` for keep-alive 0.
    pub(super) fn silence_limit(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    /// Handles a packet from the client.
    pub(super) fn on_packet(&mut self, packet: Inbound) -> Vec<Action> {
        match self.state {
            State::AwaitingConnect => self.on_connect(packet),
            State::Authenticating | State::Closed => {
                self.state = State::Closed;
                vec![Action::Close("a packet arrived while the connection was not open")]
            }
            State::Connected => self.on_connected(packet),
        }
    }

    fn on_connect(&mut self, packet: Inbound) -> Vec<Action> {
        let Inbound::Connect(connect) = packet else {
            self.state = State::Closed;
            return vec![Action::Close("the first packet must be CONNECT")];
        };
        let refuse = |this: &mut Session, code, why| {
            this.state = State::Closed;
            vec![Action::Send(Outbound::ConnAck(code)), Action::Close(why)]
        };
        if connect.has_will {
            return refuse(self, ConnAck::NotAuthorized, "wills are not supported");
        }
        let device = connect.username.as_deref().and_then(|u| u.parse::<DeviceId>().ok());
        let (Some(device), Some(key)) = (device, connect.password) else {
            return refuse(self, ConnAck::BadCredentials, "the username must be a device id and the password its key");
        };
        self.device = Some(device);
        self.keep_alive = connect.keep_alive;
        self.client_max_packet = connect.max_packet;
        self.kv_topic = ByteString::from(format!("/devices/{device}/kv"));
        self.command_topic = ByteString::from(format!("/devices/{device}/command"));
        self.event_topic = format!("/devices/{device}/event");
        self.state = State::Authenticating;
        vec![Action::Authenticate { device, key }]
    }

    /// Handles the outcome of [`Action::Authenticate`].
    pub(super) fn on_authenticated(&mut self, outcome: AuthOutcome) -> Vec<Action> {
        if self.state != State::Authenticating {
            return vec![Action::Close("authentication finished out of turn")];
        }
        let (code, why) = match outcome {
            AuthOutcome::Admitted => {
                self.state = State::Connected;
                return vec![Action::Send(Outbound::ConnAck(ConnAck::Accepted))];
            }
            AuthOutcome::BadCredentials => (ConnAck::BadCredentials, "bad credentials"),
            AuthOutcome::TooManySessions => (ConnAck::TooManySessions, "the device has its maximum of sessions"),
            AuthOutcome::RateLimited => (ConnAck::RateLimited, "the device connects more often than its rate allows"),
            AuthOutcome::Unavailable => (ConnAck::ServerUnavailable, "the server could not check the credentials"),
        };
        self.state = State::Closed;
        vec![Action::Send(Outbound::ConnAck(code)), Action::Close(why)]
    }

    fn on_connected(&mut self, packet: Inbound) -> Vec<Action> {
        match packet {
            Inbound::Connect(_) => self.fail(DisconnectReason::ProtocolError, "a second CONNECT"),
            Inbound::Publish { topic, payload, qos, packet_id, dup, retain } => {
                if retain {
                    return self.fail(DisconnectReason::RetainNotSupported, "retained messages are not supported");
                }
                if qos > 1 {
                    return self.fail(DisconnectReason::QosNotSupported, "QoS 2 is not supported");
                }
                let ack = if qos == 1 { packet_id } else { None };
                if topic == self.kv_topic.as_ref() {
                    if let Some(id) = ack
                        && dup
                        && self.recent.contains(&id)
                    {
                        // A retransmission of a publish already applied: acknowledge again only.
                        return vec![Action::Send(Outbound::PubAck { packet_id: id, reason: PubAckReason::Success })];
                    }
                    vec![Action::Write { payload, ack }]
                } else if topic == self.event_topic.as_str() {
                    vec![Action::Event { payload, ack }]
                } else {
                    self.fail(DisconnectReason::NotAuthorized, "publish to a topic the device may not use")
                }
            }
            Inbound::Subscribe { packet_id, filters } => {
                let granted: Vec<bool> =
                    filters.iter().map(|f| *f == *self.kv_topic || *f == *self.command_topic).collect();
                let mut actions = vec![Action::Send(Outbound::SubAck { packet_id, granted })];
                if filters.iter().any(|f| *f == *self.command_topic) {
                    actions.push(Action::ListenCommands(true));
                }
                if filters.iter().any(|f| *f == *self.kv_topic) {
                    actions.push(Action::Watch);
                }
                actions
            }
            Inbound::Unsubscribe { packet_id, filters } => {
                let mut actions = Vec::with_capacity(3);
                if filters.iter().any(|f| *f == *self.kv_topic) {
                    actions.push(Action::Unwatch);
                }
                if filters.iter().any(|f| *f == *self.command_topic) {
                    actions.push(Action::ListenCommands(false));
                }
                actions.push(Action::Send(Outbound::UnsubAck { packet_id, count: filters.len() }));
                actions
            }
            Inbound::PingRequest => vec![Action::Send(Outbound::PingResponse)],
            Inbound::Disconnect => {
                self.state = State::Closed;
                vec![Action::Close("the client disconnected")]
            }
            Inbound::Ack => Vec::new(),
            Inbound::Unexpected(_) => self.fail(DisconnectReason::ProtocolError, "a packet a client may not send"),
            Inbound::Malformed(why) => self.fail(DisconnectReason::MalformedPacket, why),
        }
    }

    /// Handles the outcome of [`Action::Write`] or [`Action::Event`].
    pub(super) fn on_written(&mut self, ack: Option<u16>, outcome: WriteOutcome) -> Vec<Action> {
        let Some(id) = ack else { return Vec::new() };
        let reason = match outcome {
            WriteOutcome::Applied => {
                if self.recent.len() == RECENT {
                    self.recent.pop_front();
                }
                self.recent.push_back(id);
                PubAckReason::Success
            }
            WriteOutcome::Refused => PubAckReason::PayloadInvalid,
            WriteOutcome::RateLimited => PubAckReason::QuotaExceeded,
        };
        vec![Action::Send(Outbound::PubAck { packet_id: id, reason })]
    }

    fn fail(&mut self, reason: DisconnectReason, why: &'static str) -> Vec<Action> {
        self.state = State::Closed;
        close(self.version, reason, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::wire::Connect;

    fn connect(username: Option<&str>, password: Option<&str>) -> Inbound {
        Inbound::Connect(Connect {
            client_id: String::new(),
            username: username.map(str::to_owned),
            password: password.map(|p| Bytes::from(p.to_owned())),
            keep_alive: 0,
            has_will: false,
            max_packet: None,
        })
    }

    fn connected(version: Version) -> Session {
        let mut s = Session::new(version);
        let actions = s.on_packet(connect(Some("7"), Some("key")));
        let device = DeviceId::new(7).expect("id");
        assert_eq!(actions, vec![Action::Authenticate { device, key: Bytes::from_static(b"key") }]);
        assert_eq!(s.on_authenticated(AuthOutcome::Admitted), vec![Action::Send(Outbound::ConnAck(ConnAck::Accepted))]);
        s
    }

    fn publish(topic: &str, payload: &str, qos: u8, packet_id: Option<u16>, dup: bool) -> Inbound {
        Inbound::Publish {
            topic: topic.to_owned(),
            payload: Bytes::from(payload.to_owned()),
            qos,
            packet_id,
            dup,
            retain: false,
        }
    }

    #[test]
    fn connect_must_come_first() {
        let mut s = Session::new(Version::V3);
        assert_eq!(s.on_packet(Inbound::PingRequest), vec![Action::Close("the first packet must be CONNECT")]);
    }

    #[test]
    fn bad_usernames_and_missing_passwords_are_refused() {
        for (user, pass) in [(None, Some("k")), (Some("abc"), Some("k")), (Some("0"), Some("k")), (Some("7"), None)] {
            let mut s = Session::new(Version::V3);
            let actions = s.on_packet(connect(user, pass));
            assert_eq!(actions[0], Action::Send(Outbound::ConnAck(ConnAck::BadCredentials)), "{user:?} {pass:?}");
            assert!(matches!(actions[1], Action::Close(_)));
        }
    }

    #[test]
    fn wills_are_refused() {
        let mut s = Session::new(Version::V5);
        let Inbound::Connect(mut c) = connect(Some("7"), Some("k")) else { unreachable!() };
        c.has_will = true;
        let actions = s.on_packet(Inbound::Connect(c));
        assert_eq!(actions[0], Action::Send(Outbound::ConnAck(ConnAck::NotAuthorized)));
    }

    #[test]
    fn failed_authentication_answers_its_code_and_closes() {
        for (outcome, code) in [
            (AuthOutcome::BadCredentials, ConnAck::BadCredentials),
            (AuthOutcome::TooManySessions, ConnAck::TooManySessions),
            (AuthOutcome::Unavailable, ConnAck::ServerUnavailable),
        ] {
            let mut s = Session::new(Version::V3);
            s.on_packet(connect(Some("7"), Some("k")));
            let actions = s.on_authenticated(outcome);
            assert_eq!(actions[0], Action::Send(Outbound::ConnAck(code)));
            assert!(matches!(actions[1], Action::Close(_)));
            assert_eq!(s.device(), None);
        }
    }

    #[test]
    fn mode_sdk_subscription_gets_both_topics_then_the_watch() {
        let mut s = connected(Version::V3);
        let actions = s.on_packet(Inbound::Subscribe {
            packet_id: 1,
            filters: vec!["/devices/7/kv".into(), "/devices/7/command".into()],
        });
        assert_eq!(
            actions,
            vec![
                Action::Send(Outbound::SubAck { packet_id: 1, granted: vec![true, true] }),
                Action::ListenCommands(true),
                Action::Watch
            ]
        );
    }

    #[test]
    fn other_topics_and_wildcards_are_refused_per_filter() {
        let mut s = connected(Version::V3);
        let filters = vec![
            "/devices/8/kv".into(),
            "/devices/+/kv".into(),
            "#".into(),
            "devices/7/kv".into(),
            "/devices/7/kv".into(),
        ];
        let actions = s.on_packet(Inbound::Subscribe { packet_id: 2, filters });
        assert_eq!(
            actions[0],
            Action::Send(Outbound::SubAck { packet_id: 2, granted: vec![false, false, false, false, true] })
        );
    }

    #[test]
    fn publishes_become_writes_with_their_ack() {
        let mut s = connected(Version::V3);
        let actions = s.on_packet(publish(
            "/devices/7/kv",
            r#"{"action":"set","rev":0,"key":"k","value":1,"numItems":0,"items":null}"#,
            1,
            Some(5),
            false,
        ));
        let [Action::Write { payload, ack: Some(5) }] = actions.as_slice() else { panic!("{actions:?}") };
        assert!(payload.starts_with(br#"{"action":"set""#), "the payload goes to the gate as it is");
        assert_eq!(
            s.on_written(Some(5), WriteOutcome::Applied),
            vec![Action::Send(Outbound::PubAck { packet_id: 5, reason: PubAckReason::Success })]
        );
        let qos0 = s.on_packet(publish("/devices/7/kv", r#"{"action":"delete","key":"k"}"#, 0, None, false));
        assert!(matches!(qos0.as_slice(), [Action::Write { ack: None, .. }]));
    }

    #[test]
    fn a_retransmitted_publish_is_not_applied_twice() {
        let mut s = connected(Version::V3);
        let body = r#"{"action":"set","key":"k","value":1}"#;
        assert!(matches!(
            s.on_packet(publish("/devices/7/kv", body, 1, Some(9), false)).as_slice(),
            [Action::Write { .. }]
        ));
        s.on_written(Some(9), WriteOutcome::Applied);
        assert_eq!(
            s.on_packet(publish("/devices/7/kv", body, 1, Some(9), true)),
            vec![Action::Send(Outbound::PubAck { packet_id: 9, reason: PubAckReason::Success })],
            "DUP with a known id: acknowledged again, not applied"
        );
        assert!(
            matches!(s.on_packet(publish("/devices/7/kv", body, 1, Some(9), false)).as_slice(), [Action::Write { .. }]),
            "the same id without DUP is a new message (ids are reused after their PUBACK)"
        );
    }

    #[test]
    fn refusals_are_acknowledged_with_their_reason() {
        let mut s = connected(Version::V5);
        let actions = s.on_packet(publish("/devices/7/kv", "not json", 1, Some(3), false));
        assert!(matches!(actions.as_slice(), [Action::Write { ack: Some(3), .. }]));
        assert_eq!(
            s.on_written(Some(3), WriteOutcome::Refused),
            vec![Action::Send(Outbound::PubAck { packet_id: 3, reason: PubAckReason::PayloadInvalid })]
        );
        assert_eq!(
            s.on_written(Some(4), WriteOutcome::RateLimited),
            vec![Action::Send(Outbound::PubAck { packet_id: 4, reason: PubAckReason::QuotaExceeded })]
        );
        assert!(
            matches!(s.on_packet(publish("/devices/7/kv", "{}", 1, Some(3), true)).as_slice(), [Action::Write { .. }]),
            "a refused publish is not remembered as applied: its retransmission is tried again"
        );
    }

    #[test]
    fn malformed_packets_close_with_their_reason() {
        let mut v5 = connected(Version::V5);
        let actions = v5.on_packet(Inbound::Malformed("a PINGREQ with a remaining length"));
        assert_eq!(
            actions,
            vec![
                Action::Send(Outbound::Disconnect(DisconnectReason::MalformedPacket)),
                Action::Close("a PINGREQ with a remaining length")
            ]
        );
        let mut v3 = connected(Version::V3);
        assert!(matches!(v3.on_packet(Inbound::Malformed("x")).as_slice(), [Action::Close(_)]));
    }

    #[test]
    fn a_refused_connect_rate_answers_its_code() {
        let mut s = Session::new(Version::V5);
        s.on_packet(connect(Some("7"), Some("k")));
        let actions = s.on_authenticated(AuthOutcome::RateLimited);
        assert_eq!(actions[0], Action::Send(Outbound::ConnAck(ConnAck::RateLimited)));
    }

    #[test]
    fn retain_qos2_foreign_topics_and_second_connects_disconnect() {
        let cases: Vec<Inbound> = vec![
            Inbound::Publish {
                topic: "/devices/7/kv".into(),
                payload: Bytes::new(),
                qos: 0,
                packet_id: None,
                dup: false,
                retain: true,
            },
            publish("/devices/7/kv", "{}", 2, Some(1), false),
            publish("/devices/8/kv", "{}", 0, None, false),
            publish("/devices/7/command", "{}", 0, None, false),
            connect(Some("7"), Some("k")),
            Inbound::Unexpected("QoS 2 flow"),
        ];
        for packet in cases {
            let mut v3 = connected(Version::V3);
            let actions = v3.on_packet(packet.clone());
            assert!(matches!(actions.as_slice(), [Action::Close(_)]), "3.1.1 just closes: {packet:?} → {actions:?}");
            let mut v5 = connected(Version::V5);
            let actions = v5.on_packet(packet.clone());
            assert!(
                matches!(actions.as_slice(), [Action::Send(Outbound::Disconnect(_)), Action::Close(_)]),
                "5 says why: {packet:?}"
            );
            assert_eq!(
                v5.on_packet(Inbound::PingRequest),
                vec![Action::Close("a packet arrived while the connection was not open")]
            );
        }
    }

    #[test]
    fn events_pings_unsubscribes_and_keep_alive() {
        let mut s = Session::new(Version::V3);
        let Inbound::Connect(mut c) = connect(Some("7"), Some("k")) else { unreachable!() };
        c.keep_alive = 60;
        s.on_packet(Inbound::Connect(c));
        s.on_authenticated(AuthOutcome::Admitted);
        assert_eq!(s.silence_limit(), Some(Duration::from_secs(90)));
        assert!(matches!(
            s.on_packet(publish("/devices/7/event", "{}", 1, Some(2), false)).as_slice(),
            [Action::Event { ack: Some(2), .. }]
        ));
        assert_eq!(s.on_packet(Inbound::PingRequest), vec![Action::Send(Outbound::PingResponse)]);
        assert_eq!(
            s.on_packet(Inbound::Unsubscribe { packet_id: 4, filters: vec!["/devices/7/kv".into()] }),
            vec![Action::Unwatch, Action::Send(Outbound::UnsubAck { packet_id: 4, count: 1 })]
        );
        assert_eq!(connected(Version::V3).silence_limit(), None, "keep-alive 0: no limit (the MODE SDK's choice)");
    }
}
