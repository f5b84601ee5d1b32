//! Error reasons (PROTOCOL.md §2), shared by HTTP error bodies and WebSocket/MQTT error frames.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The machine-readable reason of an error, written in `UPPER_SNAKE_CASE` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// The body is not JSON or not the expected shape.
    InvalidJson,
    /// A key breaks the key rule.
    InvalidKey,
    /// A value is `null`, missing, or nested too deep.
    InvalidValue,
    /// Any other bad field or query parameter.
    InvalidParameter,
    /// Missing, unknown or revoked token.
    UnauthenticatedClient,
    /// Known token without the right.
    PermissionDenied,
    /// No such device.
    DeviceNotFound,
    /// No such home.
    HomeNotFound,
    /// No such key.
    KeyNotFound,
    /// No such project API key.
    ApiKeyNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The request (its body) did not arrive in time.
    RequestTimeout,
    /// The device is already in the home it was asked to join.
    DeviceAlreadyInHome,
    /// A command was sent to a device with no live session on any node.
    DeviceOffline,
    /// A conditional write's precondition failed.
    RevisionMismatch,
    /// A value is over the size limit.
    ValueTooLarge,
    /// A store is at its key limit.
    TooManyKeys,
    /// A request body or message is over the size limit.
    PayloadTooLarge,
    /// Too many live sync sessions for one device.
    TooManyConnections,
    /// The caller is over its request rate.
    RateLimitExceeded,
    /// Something failed inside the server.
    InternalError,
    /// The server cannot serve right now (starting, stopping, storage unreachable).
    Unavailable,
}

impl Reason {
    /// Every reason, in the order of PROTOCOL.md §2 (for documents that list them, e.g. the
    /// OpenAPI document).
    pub const ALL: [Reason; 23] = [
        Reason::InvalidJson,
        Reason::InvalidKey,
        Reason::InvalidValue,
        Reason::InvalidParameter,
        Reason::UnauthenticatedClient,
        Reason::PermissionDenied,
        Reason::DeviceNotFound,
        Reason::HomeNotFound,
        Reason::KeyNotFound,
        Reason::ApiKeyNotFound,
        Reason::NotFound,
        Reason::MethodNotAllowed,
        Reason::RequestTimeout,
        Reason::DeviceAlreadyInHome,
        Reason::DeviceOffline,
        Reason::RevisionMismatch,
        Reason::ValueTooLarge,
        Reason::TooManyKeys,
        Reason::PayloadTooLarge,
        Reason::TooManyConnections,
        Reason::RateLimitExceeded,
        Reason::InternalError,
        Reason::Unavailable,
    ];

    /// The wire spelling, e.g. `"INVALID_KEY"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "INVALID_JSON",
            Reason::InvalidKey => "INVALID_KEY",
            Reason::InvalidValue => "INVALID_VALUE",
            Reason::InvalidParameter => "INVALID_PARAMETER",
            Reason::UnauthenticatedClient => "UNAUTHENTICATED_CLIENT",
            Reason::PermissionDenied => "PERMISSION_DENIED",
            Reason::DeviceNotFound => "DEVICE_NOT_FOUND",
            Reason::HomeNotFound => "HOME_NOT_FOUND",
            Reason::KeyNotFound => "KEY_NOT_FOUND",
            Reason::ApiKeyNotFound => "API_KEY_NOT_FOUND",
            Reason::NotFound => "NOT_FOUND",
            Reason::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Reason::RequestTimeout => "REQUEST_TIMEOUT",
            Reason::DeviceAlreadyInHome => "DEVICE_ALREADY_IN_HOME",
            Reason::DeviceOffline => "DEVICE_OFFLINE",
            Reason::RevisionMismatch => "REVISION_MISMATCH",
            Reason::ValueTooLarge => "VALUE_TOO_LARGE",
            Reason::TooManyKeys => "TOO_MANY_KEYS",
            Reason::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Reason::TooManyConnections => "TOO_MANY_CONNECTIONS",
            Reason::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            Reason::InternalError => "INTERNAL_ERROR",
            Reason::Unavailable => "UNAVAILABLE",
        }
    }
}

impl Reason {
    /// The HTTP status that goes with the reason (PROTOCOL.md §2).
    pub const fn http_status(self) -> u16 {
        match self {
            Reason::InvalidJson | Reason::InvalidKey | Reason::InvalidValue | Reason::InvalidParameter => 400,
            Reason::UnauthenticatedClient => 401,
            Reason::PermissionDenied => 403,
            Reason::DeviceNotFound
            | Reason::HomeNotFound
            | Reason::KeyNotFound
            | Reason::ApiKeyNotFound
            | Reason::NotFound => 404,
            Reason::MethodNotAllowed => 405,
            Reason::RequestTimeout => 408,
            Reason::DeviceAlreadyInHome | Reason::DeviceOffline => 409,
            Reason::RevisionMismatch => 412,
            Reason::ValueTooLarge | Reason::TooManyKeys | Reason::PayloadTooLarge => 413,
            Reason::TooManyConnections | Reason::RateLimitExceeded => 429,
            Reason::InternalError => 500,
            Reason::Unavailable => 503,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_spelling_matches_as_str() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            let json = serde_json::to_string(&r).expect("serialize");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert!(seen.insert(r), "{r} twice in Reason::ALL");
        }
    }
}
