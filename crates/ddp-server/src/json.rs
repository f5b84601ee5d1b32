//! [`Json`]: the text of one JSON message as the server sends it — a sync message, an `error`
//! frame, an event. Serialized once and shared by every session that sends it (cloning is a
//! reference count); transports put its bytes on their wire as they are: a WebSocket text
//! frame, an MQTT payload.
//!
//! It is the server's own type, so the core (hub, watch, events) depends on no transport's
//! library, and it is only ever made by serializing: a serialization that fails is an
//! [`Error`], never an empty message.

use bytes::Bytes;
use serde::Serialize;

use crate::error::{Error, Result};

/// The UTF-8 text of one serialized JSON message.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Json(Bytes);

impl Json {
    /// Serializes `value`; a failure is an internal error (logged), never an empty message.
    pub(crate) fn encode(value: &impl Serialize) -> Result<Json> {
        serde_json::to_string(value).map(Json::from_serialized).map_err(Error::internal)
    }

    /// Text that `serde_json` has just serialized.
    pub(crate) fn from_serialized(text: String) -> Json {
        Json(Bytes::from(text))
    }

    /// Text that is JSON already (an event's envelope read back from the commit feed).
    pub(crate) fn from_shared(text: std::sync::Arc<str>) -> Json {
        Json(Bytes::from_owner(ArcText(text)))
    }

    /// `prefix`, then `parts` separated by commas, then `suffix`: a document around messages
    /// that are JSON already (the `changes` of a `batch` message), copied without re-checking.
    pub(crate) fn wrap(prefix: &str, parts: &[Json], suffix: &str) -> Json {
        let len = prefix.len() + suffix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(prefix.as_bytes());
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&part.0);
        }
        out.extend_from_slice(suffix.as_bytes());
        Json(Bytes::from(out))
    }

    /// The bytes, shared.
    pub(crate) fn bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The text, for logs and tests.
    #[cfg(test)]
    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("<not UTF-8>")
    }
}

impl std::fmt::Debug for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Json({:?})", String::from_utf8_lossy(&self.0))
    }
}

/// An `Arc<str>` as the owner of a [`Bytes`].
struct ArcText(std::sync::Arc<str>);

impl AsRef<[u8]> for ArcText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_serialized_once_and_shared() {
        let json = Json::encode(&serde_json::json!({"action": "set", "rev": 1})).expect("encodes");
        assert_eq!(json.text(), r#"{"action":"set","rev":1}"#);
        let shared = json.clone();
        assert_eq!(shared.bytes().as_ptr(), json.bytes().as_ptr(), "a clone shares the bytes");
        let event = Json::from_shared(std::sync::Arc::from(r#"{"eventType":"x"}"#));
        assert_eq!((event.text(), event.len()), (r#"{"eventType":"x"}"#, 17));
    }

    #[test]
    fn a_failed_serialization_is_an_error() {
        struct Refuses;
        impl Serialize for Refuses {
            fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("cannot"))
            }
        }
        let err = Json::encode(&Refuses).expect_err("no empty message");
        assert_eq!(err.reason, ddp_protocol::Reason::InternalError);
    }
}
