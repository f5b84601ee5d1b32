//! The MQTT wire format, through the rmqtt-codec crate. This is the only module that knows the
//! codec: it maps the codec's MQTT 3.1/3.1.1 and 5 packets to the few [`Inbound`] and
//! [`Outbound`] packets the session understands, so the codec can be replaced here alone.

use std::num::NonZeroU16;

use bytes::Bytes;
use bytestring::ByteString;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::{MqttCodec, MqttPacket, v3, v5};

/// The protocol version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    /// MQTT 3.1 or 3.1.1.
    V3,
    /// MQTT 5.
    V5,
}

/// What the session needs of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Connect {
    /// The client id (may be empty).
    pub client_id: String,
    /// The username: a device id, in decimal.
    pub username: Option<String>,
    /// The password: the device's API key.
    pub password: Option<Bytes>,
    /// Keep-alive in seconds; 0 means none.
    pub keep_alive: u16,
    /// Whether a will was given (refused).
    pub has_will: bool,
    /// MQTT 5: the largest packet the client accepts (its Maximum Packet Size); `None`: no limit
    /// announced (3.1.1 has no way to announce one).
    pub max_packet: Option<u32>,
}

/// A packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Inbound {
    /// CONNECT.
    Connect(Connect),
    /// PUBLISH.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload.
        payload: Bytes,
        /// QoS 0, 1 or 2.
        qos: u8,
        /// Packet id (QoS 1 and 2).
        packet_id: Option<u16>,
        /// A retransmission.
        dup: bool,
        /// Retain flag.
        retain: bool,
    },
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        packet_id: u16,
        /// Topic filters.
        filters: Vec<String>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        packet_id: u16,
        /// Topic filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingRequest,
    /// DISCONNECT.
    Disconnect,
    /// An acknowledgement of something we sent (we only send QoS 0, so ignored).
    Ack,
    /// Anything else a client may not send here (QoS 2 flow, AUTH, server-to-client packets).
    Unexpected(&'static str),
    /// A packet the codec read but that breaks the protocol's shape (e.g. a PINGREQ with a
    /// remaining length).
    Malformed(&'static str),
}

/// How a CONNECT is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnAck {
    /// Accepted.
    Accepted,
    /// Unknown device or wrong key.
    BadCredentials,
    /// Known, but not allowed (e.g. a will was given).
    NotAuthorized,
    /// The device already holds its maximum of sessions.
    TooManySessions,
    /// The device connects more often than its rate allows.
    RateLimited,
    /// The server could not check the credentials.
    ServerUnavailable,
}

/// How a QoS 1 PUBLISH is acknowledged (MQTT 5 says why; a 3.1.1 PUBACK is always plain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PubAckReason {
    /// Applied.
    Success,
    /// Not applied: the payload is not acceptable (MQTT 5: 0x99 payload format invalid).
    PayloadInvalid,
    /// Not applied: over the device's rate (MQTT 5: 0x97 quota exceeded).
    QuotaExceeded,
}

/// Why the server ends a connection, for MQTT 5's DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DisconnectReason {
    /// A protocol rule was broken.
    ProtocolError,
    /// The client may not do that (topic, retain, will).
    NotAuthorized,
    /// A packet was larger than the maximum (ours, or one we would send the client's).
    PacketTooLarge,
    /// A packet was malformed.
    MalformedPacket,
    /// QoS 2 is not supported.
    QosNotSupported,
    /// Retained messages are not supported.
    RetainNotSupported,
    /// The keep-alive ran out.
    KeepAliveTimeout,
    /// Key rotated, device deleted.
    AdministrativeAction,
    /// The server is stopping.
    ShuttingDown,
    /// The server failed.
    ServerError,
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outbound {
    /// CONNACK.
    ConnAck(ConnAck),
    /// SUBACK: per filter, granted (QoS 0) or refused.
    SubAck {
        /// Packet id.
        packet_id: u16,
        /// Granted or not, per filter.
        granted: Vec<bool>,
    },
    /// UNSUBACK.
    UnsubAck {
        /// Packet id.
        packet_id: u16,
        /// Filters unsubscribed (MQTT 5 reports one code each).
        count: usize,
    },
    /// PUBACK.
    PubAck {
        /// Packet id.
        packet_id: u16,
        /// Applied, or why not (MQTT 5 only).
        reason: PubAckReason,
    },
    /// PUBLISH at QoS 0.
    Publish {
        /// Topic.
        topic: ByteString,
        /// Payload.
        payload: Bytes,
    },
    /// PINGRESP.
    PingResponse,
    /// DISCONNECT (MQTT 5 only; a 3.1.1 server just closes).
    Disconnect(DisconnectReason),
}

/// Converts a decoded packet whose fixed header announced `remaining` bytes.
pub(super) fn inbound(packet: MqttPacket, remaining: u32) -> Inbound {
    let bare = matches!(
        packet,
        MqttPacket::V3(v3::Packet::PingRequest | v3::Packet::Disconnect) | MqttPacket::V5(v5::Packet::PingRequest)
    );
    if bare && remaining != 0 {
        // The codec reads these from their fixed header alone and skips the rest.
        return Inbound::Malformed("a PINGREQ or DISCONNECT with a remaining length");
    }
    match packet {
        MqttPacket::V3(p) => inbound_v3(p),
        MqttPacket::V5(p) => inbound_v5(p),
        MqttPacket::Version(_) => Inbound::Unexpected("version"),
    }
}

fn publish(p: &Publish) -> Inbound {
    Inbound::Publish {
        topic: p.topic.to_string(),
        payload: p.payload.clone(),
        qos: p.qos.value(),
        packet_id: p.packet_id.map(NonZeroU16::get),
        dup: p.dup,
        retain: p.retain,
    }
}

fn inbound_v3(p: v3::Packet) -> Inbound {
    match p {
        v3::Packet::Connect(c) => Inbound::Connect(Connect {
            client_id: c.client_id.to_string(),
            username: c.username.as_ref().map(ToString::to_string),
            password: c.password.clone(),
            keep_alive: c.keep_alive,
            has_will: c.last_will.is_some(),
            max_packet: None,
        }),
        v3::Packet::Publish(p) => publish(&p),
        v3::Packet::Subscribe { packet_id, topic_filters } => Inbound::Subscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.into_iter().map(|(f, _)| f.to_string()).collect(),
        },
        v3::Packet::Unsubscribe { packet_id, topic_filters } => Inbound::Unsubscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        v3::Packet::PingRequest => Inbound::PingRequest,
        v3::Packet::Disconnect => Inbound::Disconnect,
        v3::Packet::PublishAck { .. } => Inbound::Ack,
        v3::Packet::PublishReceived { .. } | v3::Packet::PublishRelease { .. } | v3::Packet::PublishComplete { .. } => {
            Inbound::Unexpected("QoS 2 flow")
        }
        v3::Packet::ConnectAck(_)
        | v3::Packet::SubscribeAck { .. }
        | v3::Packet::UnsubscribeAck { .. }
        | v3::Packet::PingResponse => Inbound::Unexpected("a server packet"),
    }
}

fn inbound_v5(p: v5::Packet) -> Inbound {
    match p {
        v5::Packet::Connect(c) => Inbound::Connect(Connect {
            client_id: c.client_id.to_string(),
            username: c.username.as_ref().map(ToString::to_string),
            password: c.password.clone(),
            keep_alive: c.keep_alive,
            has_will: c.last_will.is_some(),
            max_packet: c.max_packet_size.map(std::num::NonZeroU32::get),
        }),
        v5::Packet::Publish(p) => publish(&p),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            packet_id: s.packet_id.get(),
            filters: s.topic_filters.into_iter().map(|(f, _)| f.to_string()).collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            packet_id: u.packet_id.get(),
            filters: u.topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        v5::Packet::PingRequest => Inbound::PingRequest,
        v5::Packet::Disconnect(_) => Inbound::Disconnect,
        v5::Packet::PublishAck(_) => Inbound::Ack,
        v5::Packet::PublishReceived(_) | v5::Packet::PublishRelease(_) | v5::Packet::PublishComplete(_) => {
            Inbound::Unexpected("QoS 2 flow")
        }
        v5::Packet::Auth(_) => Inbound::Unexpected("AUTH"),
        v5::Packet::ConnectAck(_)
        | v5::Packet::SubscribeAck(_)
        | v5::Packet::UnsubscribeAck(_)
        | v5::Packet::PingResponse => Inbound::Unexpected("a server packet"),
    }
}

fn packet_id(id: u16) -> NonZeroU16 {
    NonZeroU16::new(id).unwrap_or(NonZeroU16::MIN)
}

/// Encodes an outbound packet for `version`; `None` when the version has no such packet
/// (a 3.1.1 server cannot send DISCONNECT).
pub(super) fn outbound(version: Version, packet: Outbound, max_packet: u32) -> Option<MqttPacket> {
    Some(match version {
        Version::V3 => MqttPacket::V3(match packet {
            Outbound::ConnAck(code) => v3::Packet::ConnectAck(v3::ConnectAck {
                session_present: false,
                return_code: match code {
                    ConnAck::Accepted => v3::ConnectAckReason::ConnectionAccepted,
                    ConnAck::BadCredentials => v3::ConnectAckReason::BadUserNameOrPassword,
                    ConnAck::NotAuthorized => v3::ConnectAckReason::NotAuthorized,
                    ConnAck::TooManySessions | ConnAck::RateLimited | ConnAck::ServerUnavailable => {
                        v3::ConnectAckReason::ServiceUnavailable
                    }
                },
            }),
            Outbound::SubAck { packet_id: id, granted } => v3::Packet::SubscribeAck {
                packet_id: packet_id(id),
                status: granted
                    .into_iter()
                    .map(|g| {
                        if g {
                            v3::SubscribeReturnCode::Success(QoS::AtMostOnce)
                        } else {
                            v3::SubscribeReturnCode::Failure
                        }
                    })
                    .collect(),
            },
            Outbound::UnsubAck { packet_id: id, .. } => v3::Packet::UnsubscribeAck { packet_id: packet_id(id) },
            Outbound::PubAck { packet_id: id, .. } => v3::Packet::PublishAck { packet_id: packet_id(id) },
            Outbound::Publish { topic, payload } => v3::Packet::Publish(Box::new(qos0(topic, payload))),
            Outbound::PingResponse => v3::Packet::PingResponse,
            Outbound::Disconnect(_) => return None,
        }),
        Version::V5 => MqttPacket::V5(match packet {
            Outbound::ConnAck(code) => v5::Packet::ConnectAck(Box::new(connack_v5(code, max_packet))),
            Outbound::SubAck { packet_id: id, granted } => v5::Packet::SubscribeAck(v5::SubscribeAck {
                packet_id: packet_id(id),
                properties: Vec::new(),
                reason_string: None,
                status: granted
                    .into_iter()
                    .map(
                        |g| if g { v5::SubscribeAckReason::GrantedQos0 } else { v5::SubscribeAckReason::NotAuthorized },
                    )
                    .collect(),
            }),
            Outbound::UnsubAck { packet_id: id, count } => v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                packet_id: packet_id(id),
                properties: Vec::new(),
                reason_string: None,
                status: vec![v5::UnsubscribeAckReason::Success; count],
            }),
            Outbound::PubAck { packet_id: id, reason } => v5::Packet::PublishAck(v5::PublishAck {
                packet_id: packet_id(id),
                reason_code: match reason {
                    PubAckReason::Success => v5::PublishAckReason::Success,
                    PubAckReason::PayloadInvalid => v5::PublishAckReason::PayloadFormatInvalid,
                    PubAckReason::QuotaExceeded => v5::PublishAckReason::QuotaExceeded,
                },
                properties: Vec::new(),
                reason_string: None,
            }),
            Outbound::Publish { topic, payload } => v5::Packet::Publish(Box::new(qos0(topic, payload))),
            Outbound::PingResponse => v5::Packet::PingResponse,
            Outbound::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect {
                reason_code: match reason {
                    DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                    DisconnectReason::NotAuthorized => v5::DisconnectReasonCode::NotAuthorized,
                    DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                    DisconnectReason::MalformedPacket => v5::DisconnectReasonCode::MalformedPacket,
                    DisconnectReason::QosNotSupported => v5::DisconnectReasonCode::QosNotSupported,
                    DisconnectReason::RetainNotSupported => v5::DisconnectReasonCode::RetainNotSupported,
                    DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                    DisconnectReason::AdministrativeAction => v5::DisconnectReasonCode::AdministrativeAction,
                    DisconnectReason::ShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
                    DisconnectReason::ServerError => v5::DisconnectReasonCode::UnspecifiedError,
                },
                session_expiry_interval_secs: None,
                server_reference: None,
                reason_string: None,
                user_properties: Vec::new(),
            }),
        }),
    })
}

/// The size on the wire of a QoS 0 PUBLISH of `payload` on `topic`, fixed header included: what
/// is compared with the Maximum Packet Size a client announced.
pub(super) fn publish_size(version: Version, topic: &str, payload: usize) -> usize {
    let properties = match version {
        Version::V3 => 0,
        Version::V5 => 1, // the properties' length: 0, in one byte
    };
    let remaining = 2 + topic.len() + properties + payload;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

fn qos0(topic: ByteString, payload: Bytes) -> Publish {
    Publish { dup: false, retain: false, qos: QoS::AtMostOnce, topic, packet_id: None, payload, properties: None }
}

/// A CONNACK that advertises only what this server does (the codec's defaults claim QoS 2,
/// retained messages, wildcards, shared subscriptions and subscription ids).
fn connack_v5(code: ConnAck, max_packet: u32) -> v5::ConnectAck {
    v5::ConnectAck {
        reason_code: match code {
            ConnAck::Accepted => v5::ConnectAckReason::Success,
            ConnAck::BadCredentials => v5::ConnectAckReason::BadUserNameOrPassword,
            ConnAck::NotAuthorized => v5::ConnectAckReason::NotAuthorized,
            ConnAck::TooManySessions => v5::ConnectAckReason::QuotaExceeded,
            ConnAck::RateLimited => v5::ConnectAckReason::ConnectionRateExceeded,
            ConnAck::ServerUnavailable => v5::ConnectAckReason::ServerUnavailable,
        },
        max_qos: QoS::AtLeastOnce,
        max_packet_size: Some(max_packet),
        retain_available: false,
        wildcard_subscription_available: false,
        subscription_identifiers_available: false,
        shared_subscription_available: false,
        ..v5::ConnectAck::default()
    }
}

/// The codec for `version`, limiting inbound (and for MQTT 5 outbound) packets to `max_packet`.
pub(super) fn codec(version: Version, max_packet: u32) -> MqttCodec {
    match version {
        Version::V3 => MqttCodec::V3(v3::Codec::new(max_packet)),
        // Outbound is not limited by our own maximum: a reload may be larger than what we accept.
        Version::V5 => MqttCodec::V5(v5::Codec::new(max_packet, 0)),
    }
}

/// The version-sniffing codec used until CONNECT is read.
pub(super) fn sniffing_codec() -> MqttCodec {
    MqttCodec::Version(rmqtt_codec::version::VersionCodec)
}

/// The version a sniffed CONNECT announced.
pub(super) fn version_of(packet: &MqttPacket) -> Option<Version> {
    match packet {
        MqttPacket::Version(rmqtt_codec::version::ProtocolVersion::MQTT3) => Some(Version::V3),
        MqttPacket::Version(rmqtt_codec::version::ProtocolVersion::MQTT5) => Some(Version::V5),
        _ => None,
    }
}
