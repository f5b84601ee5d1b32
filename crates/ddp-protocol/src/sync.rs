//! Sync messages (PROTOCOL.md §4): what the server sends a device's live session, and what a device
//! may send back. The same JSON travels over WebSocket text frames and MQTT payloads.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::batch::Op;
use crate::{Key, KeyError, Reason, Rev, Timestamp, Value, ValueError};

/// One item of a store, as listed by REST and carried by `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    /// The item's key.
    pub key: Key,
    /// The item's value.
    pub value: Value,
    /// When the item was last written.
    pub modification_time: Timestamp,
}

/// A command for a device (PROTOCOL.md §8): what MODE's SDKs receive on
/// `/devices/{id}/command` and the command socket, exactly `{"action","parameters"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// What to do.
    pub action: String,
    /// Its parameters: a JSON object (`{}` when the sender gave none), exact as sent.
    #[serde(default = "Value::empty_object")]
    pub parameters: Value,
}

/// A message from the server to a sync session.
///
/// Deserialization is written by hand: serde's internally tagged enums buffer their fields,
/// and a [`Value`] (an exact JSON text) cannot be read back from that buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum ServerMessage {
    /// The whole store at `rev`; replaces everything the device holds.
    #[serde(rename_all = "camelCase")]
    Reload {
        /// The store's rev at the snapshot.
        rev: Rev,
        /// `items.len()`, for MODE clients that read it.
        num_items: usize,
        /// Every item, sorted by key.
        items: Vec<Item>,
    },
    /// **(extension)** The session resumes after `rev`: the changes after it follow.
    Resume {
        /// The rev the device said it holds.
        rev: Rev,
    },
    /// A key was set at `rev`.
    Set {
        /// The store's rev at this change.
        rev: Rev,
        /// The key.
        key: Key,
        /// Its new value.
        value: Value,
    },
    /// A key was deleted at `rev`.
    Delete {
        /// The store's rev at this change.
        rev: Rev,
        /// The key.
        key: Key,
    },
    /// **(extension, PROTOCOL.md §11)** The changes of one atomic batch, for a session opened
    /// with `?batches=1`: `rev` is the last one's; apply them all at once.
    Batch {
        /// The rev of the batch's last change.
        rev: Rev,
        /// The `set`/`delete` messages, in rev order.
        changes: Vec<ServerMessage>,
    },
    /// **(extension)** A command for the device, on a sync session opened with `?commands=1`.
    Command {
        /// The command.
        command: Command,
    },
    /// **(extension)** A frame from the device could not be applied; the session stays open.
    Error {
        /// Why.
        reason: Reason,
        /// A human sentence.
        message: String,
        /// The key the frame named, when it named one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// For a `batch` frame, the op at fault (from 0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<usize>,
    },
}

impl ServerMessage {
    /// The message's `action`, as on the wire.
    pub fn action(&self) -> &'static str {
        match self {
            ServerMessage::Reload { .. } => "reload",
            ServerMessage::Resume { .. } => "resume",
            ServerMessage::Set { .. } => "set",
            ServerMessage::Delete { .. } => "delete",
            ServerMessage::Batch { .. } => "batch",
            ServerMessage::Command { .. } => "command",
            ServerMessage::Error { .. } => "error",
        }
    }
}

impl<'de> Deserialize<'de> for ServerMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ServerMessage, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        struct Wire {
            action: String,
            rev: Option<Rev>,
            key: Option<String>,
            value: Option<Value>,
            items: Option<Vec<Item>>,
            reason: Option<Reason>,
            message: Option<String>,
            command: Option<Command>,
            changes: Option<Vec<ServerMessage>>,
            index: Option<usize>,
        }
        /// Reads `Wire` from a JSON object only: serde would also fill a struct from an array by
        /// position, and `["set",2,"a",2]` is not a set.
        struct ObjectOnly;
        impl<'de> serde::de::Visitor<'de> for ObjectOnly {
            type Value = Wire;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sync message: a JSON object with an \"action\"")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Wire, A::Error> {
                Wire::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        let w = d.deserialize_map(ObjectOnly)?;
        let rev = |what: &str| w.rev.ok_or_else(|| D::Error::custom(format!("{what} without rev")));
        let key = |what: &str| {
            let k = w.key.clone().ok_or_else(|| D::Error::custom(format!("{what} without key")))?;
            Key::try_from(k).map_err(D::Error::custom)
        };
        Ok(match w.action.as_str() {
            "reload" => {
                let items = w.items.clone().unwrap_or_default();
                ServerMessage::Reload { rev: rev("reload")?, num_items: items.len(), items }
            }
            "resume" => ServerMessage::Resume { rev: rev("resume")? },
            "set" => ServerMessage::Set {
                rev: rev("set")?,
                key: key("set")?,
                value: w.value.clone().ok_or_else(|| D::Error::custom("set without value"))?,
            },
            "delete" => ServerMessage::Delete { rev: rev("delete")?, key: key("delete")? },
            "batch" => {
                let changes = w.changes.clone().ok_or_else(|| D::Error::custom("batch without changes"))?;
                if let Some(other) =
                    changes.iter().find(|c| !matches!(c, ServerMessage::Set { .. } | ServerMessage::Delete { .. }))
                {
                    return Err(D::Error::custom(format!(
                        "a batch holds set and delete messages only, not {:?}",
                        other.action()
                    )));
                }
                ServerMessage::Batch { rev: rev("batch")?, changes }
            }
            "command" => ServerMessage::Command {
                command: w.command.clone().ok_or_else(|| D::Error::custom("command without command"))?,
            },
            "error" => ServerMessage::Error {
                reason: w.reason.ok_or_else(|| D::Error::custom("error without reason"))?,
                message: w.message.clone().unwrap_or_default(),
                key: w.key.clone(),
                index: w.index,
            },
            other => return Err(D::Error::custom(format!("unknown action {other:?}"))),
        })
    }
}

/// A request from a device (or a watching app) over its sync session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Set `key` to `value`.
    Set {
        /// The key.
        key: Key,
        /// The value.
        value: Value,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Key,
    },
    /// **(extension, PROTOCOL.md §10)** The device has applied (and persisted) every change
    /// up to `rev`.
    Ack {
        /// The highest rev applied.
        rev: Rev,
    },
    /// **(extension, PROTOCOL.md §11)** Applies `ops` atomically, in order.
    Batch {
        /// The ops (at least one).
        ops: Vec<Op>,
    },
}

/// Why a device frame was refused; carried back in an `error` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The reason for the `error` message.
    pub reason: Reason,
    /// A human sentence.
    pub message: String,
    /// The key, when the frame named one.
    pub key: Option<String>,
    /// For a `batch` frame, the op at fault.
    pub index: Option<usize>,
}

impl FrameError {
    fn new(reason: Reason, message: impl Into<String>, key: Option<String>) -> FrameError {
        FrameError { reason, message: message.into(), key, index: None }
    }

    /// The `error` message that reports this to the device.
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::Error {
            reason: self.reason,
            message: self.message.clone(),
            key: self.key.clone(),
            index: self.index,
        }
    }
}

/// The loose shape of a device frame. Fields that older MODE SDKs send (`rev`, `numItems`,
/// `items`, `"value":null` on delete) are accepted and ignored.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    rev: Option<&'a RawValue>,
    ops: Option<&'a RawValue>,
}

impl DeviceRequest {
    /// Parses a frame sent by a device: a JSON object of the contract, nothing else (serde
    /// would also read a struct from a JSON array, so `["set","k",1]` is refused here).
    pub fn parse(text: &[u8]) -> Result<DeviceRequest, FrameError> {
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(FrameError::new(Reason::InvalidJson, "a frame is a JSON object {\"action\", …}", None));
        }
        let raw: RawFrame<'_> = serde_json::from_slice(text)
            .map_err(|e| FrameError::new(Reason::InvalidJson, format!("frame is not a JSON object: {e}"), None))?;
        let key_text = raw.key.as_deref();
        let named = || key_text.map(str::to_owned);
        let key = || -> Result<Key, FrameError> {
            let k = key_text.ok_or_else(|| FrameError::new(Reason::InvalidKey, "frame has no \"key\"", None))?;
            Key::new(k).map_err(|e: KeyError| FrameError::new(Reason::InvalidKey, e.to_string(), named()))
        };
        match raw.action.as_deref() {
            Some("set") => {
                let k = key()?;
                let value = match raw.value {
                    None => Err(ValueError::Null),
                    Some(v) => Value::from_raw(v),
                }
                .map_err(|e| FrameError::new(Reason::InvalidValue, e.to_string(), named()))?;
                Ok(DeviceRequest::Set { key: k, value })
            }
            Some("delete") => Ok(DeviceRequest::Delete { key: key()? }),
            Some("ack") => {
                let rev = raw.rev.and_then(|r| r.get().parse::<u64>().ok()).ok_or_else(|| {
                    FrameError::new(Reason::InvalidParameter, "an ack needs \"rev\": a rev (0 or more)", None)
                })?;
                Ok(DeviceRequest::Ack { rev: Rev(rev) })
            }
            Some("batch") => {
                let ops = raw.ops.ok_or_else(|| {
                    FrameError::new(Reason::InvalidParameter, "a batch needs \"ops\": an array of ops", None)
                })?;
                let ops = Op::parse_list(ops).map_err(|e| FrameError {
                    reason: e.reason,
                    message: e.message,
                    key: e.key,
                    index: e.index,
                })?;
                Ok(DeviceRequest::Batch { ops })
            }
            Some(other) => Err(FrameError::new(
                Reason::InvalidParameter,
                format!("unknown action {other:?}; devices send \"set\", \"delete\", \"batch\" or \"ack\""),
                named(),
            )),
            None => Err(FrameError::new(Reason::InvalidParameter, "frame has no \"action\"", named())),
        }
    }

    /// The key the request names (an ack names none).
    pub fn key(&self) -> Option<&Key> {
        match self {
            DeviceRequest::Set { key, .. } | DeviceRequest::Delete { key } => Some(key),
            DeviceRequest::Ack { .. } | DeviceRequest::Batch { .. } => None,
        }
    }

    /// The frame's JSON text: what a device sends.
    pub fn to_frame(&self) -> String {
        match self {
            DeviceRequest::Set { key, value } => format!(r#"{{"action":"set","key":"{key}","value":{value}}}"#),
            DeviceRequest::Delete { key } => format!(r#"{{"action":"delete","key":"{key}"}}"#),
            DeviceRequest::Ack { rev } => format!(r#"{{"action":"ack","rev":{rev}}}"#),
            DeviceRequest::Batch { ops } => format!(r#"{{"action":"batch","ops":{}}}"#, Op::list_json(ops)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_are_objects_and_batches_hold_only_changes() {
        let parse = |t: &str| serde_json::from_str::<ServerMessage>(t);
        assert!(parse(r#"{"action":"set","rev":2,"key":"a","value":2}"#).is_ok());
        // serde would fill the message from an array by position
        assert!(parse(r#"["set",2,"a",2,null,null,null,null,null,null]"#).is_err());
        assert!(
            parse(r#"{"action":"batch","rev":3,"changes":[["set",2,"a",2,null,null,null,null,null,null]]}"#).is_err()
        );
        let reload = r#"{"action":"reload","rev":1,"numItems":0,"items":[]}"#;
        assert!(parse(&format!(r#"{{"action":"batch","rev":3,"changes":[{reload}]}}"#)).is_err());
        let ok = parse(
            r#"{"action":"batch","rev":3,"changes":[{"action":"set","rev":2,"key":"a","value":1},{"action":"delete","rev":3,"key":"b"}]}"#,
        );
        assert_eq!(ok.map(|m| m.action()).ok(), Some("batch"));
    }

    #[test]
    fn server_messages_have_the_mode_shape() {
        let reload = ServerMessage::Reload {
            rev: Rev(82),
            num_items: 1,
            items: vec![Item {
                key: Key::new("foo").expect("key"),
                value: Value::parse("22399").expect("value"),
                modification_time: Timestamp(1_511_263_758_000),
            }],
        };
        assert_eq!(
            serde_json::to_string(&reload).expect("json"),
            r#"{"action":"reload","rev":82,"numItems":1,"items":[{"key":"foo","value":22399,"modificationTime":"2017-11-21T11:29:18.000Z"}]}"#
        );
        let set = ServerMessage::Set {
            rev: Rev(83),
            key: Key::new("xyz").expect("key"),
            value: Value::parse("\"hi\"").expect("v"),
        };
        assert_eq!(serde_json::to_string(&set).expect("json"), r#"{"action":"set","rev":83,"key":"xyz","value":"hi"}"#);
        let del = ServerMessage::Delete { rev: Rev(85), key: Key::new("xyz").expect("key") };
        assert_eq!(serde_json::to_string(&del).expect("json"), r#"{"action":"delete","rev":85,"key":"xyz"}"#);
        let back: ServerMessage = serde_json::from_str(r#"{"action":"delete","rev":85,"key":"xyz"}"#).expect("parse");
        assert_eq!(back, del);
    }

    #[test]
    fn every_server_message_round_trips_exactly() {
        let messages = [
            r#"{"action":"reload","rev":82,"numItems":2,"items":[{"key":"a","value":1.10,"modificationTime":"2017-11-19T01:23:22.000Z"},{"key":"b","value":{"x":[12345678901234567890]},"modificationTime":"2017-11-19T01:23:22.000Z"}]}"#,
            r#"{"action":"resume","rev":7}"#,
            r#"{"action":"set","rev":83,"key":"xyz","value":-0.0}"#,
            r#"{"action":"delete","rev":85,"key":"xyz"}"#,
            r#"{"action":"error","reason":"INVALID_KEY","message":"bad","key":"a/b"}"#,
            r#"{"action":"error","reason":"INVALID_JSON","message":"bad"}"#,
            r#"{"action":"command","command":{"action":"reboot","parameters":{"delay":1.50}}}"#,
            r#"{"action":"batch","rev":9,"changes":[{"action":"set","rev":8,"key":"ssid","value":"x"},{"action":"delete","rev":9,"key":"old"}]}"#,
            r#"{"action":"error","reason":"KEY_NOT_FOUND","message":"op 1: gone","key":"b","index":1}"#,
        ];
        for text in messages {
            let parsed: ServerMessage = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(serde_json::to_string(&parsed).expect("json"), text, "numbers and shape survive");
        }
        for bad in [
            r#"{"action":"set","rev":1,"key":"k"}"#,
            r#"{"action":"set","key":"k","value":1}"#,
            r#"{"action":"nope","rev":1}"#,
            r#"{"action":"set","rev":1,"key":"a b","value":1}"#,
        ] {
            assert!(serde_json::from_str::<ServerMessage>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_frames_from_old_mode_sdks_are_accepted() {
        let set = DeviceRequest::parse(br#"{"action":"set","rev":0,"key":"k","value":1.10,"numItems":0,"items":null}"#);
        assert_eq!(
            set,
            Ok(DeviceRequest::Set { key: Key::new("k").expect("key"), value: Value::parse("1.10").expect("v") })
        );
        let del = DeviceRequest::parse(br#"{"action":"delete","rev":0,"key":"k","value":null}"#);
        assert_eq!(del, Ok(DeviceRequest::Delete { key: Key::new("k").expect("key") }));
    }

    #[test]
    fn bad_frames_get_precise_reasons() {
        let reason = |t: &[u8]| DeviceRequest::parse(t).map_err(|e| e.reason).err();
        assert_eq!(reason(b"not json"), Some(Reason::InvalidJson));
        assert_eq!(reason(b"[1]"), Some(Reason::InvalidJson));
        assert_eq!(reason(br#"["set","k",1]"#), Some(Reason::InvalidJson), "an array is not a frame");
        assert_eq!(reason(br#" ["delete","k"]"#), Some(Reason::InvalidJson));
        assert_eq!(reason(br#""set""#), Some(Reason::InvalidJson));
        assert_eq!(reason(b"17"), Some(Reason::InvalidJson));
        assert_eq!(reason(br#"{"action":"set","key":"a/b","value":1}"#), Some(Reason::InvalidKey));
        assert_eq!(reason(br#"{"action":"set","key":"a","value":null}"#), Some(Reason::InvalidValue));
        assert_eq!(reason(br#"{"action":"set","key":"a"}"#), Some(Reason::InvalidValue));
        assert_eq!(reason(br#"{"action":"explode","key":"a"}"#), Some(Reason::InvalidParameter));
        let err = DeviceRequest::parse(br#"{"action":"delete","key":"bad key"}"#).expect_err("bad key");
        assert_eq!(err.key.as_deref(), Some("bad key"));
    }

    #[test]
    fn acks_carry_a_rev_and_nothing_else_counts() {
        assert_eq!(DeviceRequest::parse(br#"{"action":"ack","rev":42}"#), Ok(DeviceRequest::Ack { rev: Rev(42) }));
        assert_eq!(
            DeviceRequest::parse(br#"{"action":"ack","rev":0,"key":"ignored"}"#),
            Ok(DeviceRequest::Ack { rev: Rev(0) })
        );
        let reason = |t: &[u8]| DeviceRequest::parse(t).map_err(|e| e.reason).err();
        for bad in [
            &br#"{"action":"ack"}"#[..],
            br#"{"action":"ack","rev":-1}"#,
            br#"{"action":"ack","rev":1.5}"#,
            br#"{"action":"ack","rev":"3"}"#,
            br#"{"action":"ack","rev":null}"#,
            br#"{"action":"ack","rev":18446744073709551616}"#,
        ] {
            assert_eq!(reason(bad), Some(Reason::InvalidParameter), "{}", String::from_utf8_lossy(bad));
        }
        for request in [
            DeviceRequest::Ack { rev: Rev(7) },
            DeviceRequest::Set { key: Key::new("k").expect("key"), value: Value::parse("1.10").expect("v") },
            DeviceRequest::Delete { key: Key::new("k").expect("key") },
            DeviceRequest::Batch {
                ops: vec![Op {
                    key: Key::new("k").expect("key"),
                    kind: crate::batch::OpKind::Delete,
                    if_rev: Some(Rev(3)),
                }],
            },
        ] {
            assert_eq!(DeviceRequest::parse(request.to_frame().as_bytes()), Ok(request));
        }
    }
}
