//! Errors of the SDK: a kind to match on, a human message, and — when the server refused
//! something — its reason. No dependency's error type is part of the API.

use std::fmt;

use ddp_protocol::Reason;

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A setting is unusable (URL, device id, file).
    InvalidArgument,
    /// The server refused the request; see [`Error::reason`].
    Refused,
    /// No confirmation in time (the write may still be applied later; the mirror will show it).
    Timeout,
    /// The connection dropped while a write was in flight: it may or may not have been applied.
    ConnectionLost,
    /// The client was closed.
    Closed,
    /// Reading or writing the persisted mirror failed.
    Storage,
}

/// An SDK error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    reason: Option<Reason>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), reason: None }
    }

    pub(crate) fn refused(reason: Reason, message: impl Into<String>) -> Error {
        Error { kind: ErrorKind::Refused, message: message.into(), reason: Some(reason) }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The server's reason, when it refused (e.g. `VALUE_TOO_LARGE`).
    pub fn reason(&self) -> Option<Reason> {
        self.reason
    }

    /// What happened, for humans.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Some(r) => write!(f, "{r}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

/// Results of the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;
