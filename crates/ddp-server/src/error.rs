//! The one error type of the service, shared by every transport.
//!
//! It carries a [`Reason`] (which fixes the HTTP status), a human message, and optional
//! machine-readable `data`. Internal causes are logged where they happen and never put in the
//! message.

use std::time::Duration;

use ddp_protocol::Reason;
use ddp_store::StoreError;

/// An error answered to a client: `{"reason","message","data"?}` over HTTP, an `error` frame
/// over WebSocket, a reason code or a log line over MQTT.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    /// What went wrong, machine-readable.
    pub reason: Reason,
    /// What went wrong, for humans.
    pub message: String,
    /// Details, e.g. the limit that was exceeded.
    pub data: Option<serde_json::Value>,
    /// For 429/503: how long after which a retry may succeed (HTTP's `Retry-After` rounds it up
    /// to whole seconds).
    pub retry_after: Option<Duration>,
}

/// Results of the service.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with `reason` and `message`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Error {
        Error { reason, message: message.into(), data: None, retry_after: None }
    }

    /// Adds machine-readable details.
    pub fn with_data(mut self, data: serde_json::Value) -> Error {
        self.data = Some(data);
        self
    }

    /// Adds a retry hint.
    pub fn with_retry_after(mut self, after: Duration) -> Error {
        self.retry_after = Some(after);
        self
    }

    /// The retry hint in whole seconds, rounded up (at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// `401 UNAUTHENTICATED_CLIENT`.
    pub fn unauthenticated(message: impl Into<String>) -> Error {
        Error::new(Reason::UnauthenticatedClient, message)
    }

    /// `403 PERMISSION_DENIED`.
    pub fn denied(message: impl Into<String>) -> Error {
        Error::new(Reason::PermissionDenied, message)
    }

    /// `400 INVALID_PARAMETER`.
    pub fn invalid_parameter(message: impl Into<String>) -> Error {
        Error::new(Reason::InvalidParameter, message)
    }

    /// `400 INVALID_JSON`.
    pub fn invalid_json(message: impl Into<String>) -> Error {
        Error::new(Reason::InvalidJson, message)
    }

    /// `500 INTERNAL_ERROR`; the cause goes to the log, not to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Error {
        tracing::error!(error = %cause, "internal error");
        Error::new(Reason::InternalError, "the server failed to handle the request; it has been logged")
    }

    /// `503 UNAVAILABLE` with `Retry-After: 1`.
    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(Reason::Unavailable, message).with_retry_after(Duration::from_secs(1))
    }

    /// This error as the failure of op `index` of a batch: `data.index` names it and the
    /// message says so.
    pub fn at_op(mut self, index: usize) -> Error {
        self.message = format!("op {index}: {}", self.message);
        let mut data = match self.data.take() {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        data.insert("index".into(), index.into());
        self.data = Some(serde_json::Value::Object(data));
        self
    }

    /// Whether this is a job's write to a device the job no longer waits to write (cancelled,
    /// or written already by a claim whose lease had run out).
    pub fn is_job_gone(&self) -> bool {
        self.data.as_ref().is_some_and(|d| d.get("jobGone").is_some())
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        self.reason.http_status()
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Error {}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::DeviceNotFound(id) => Error::new(Reason::DeviceNotFound, format!("device {id} does not exist")),
            StoreError::HomeNotFound(id) => Error::new(Reason::HomeNotFound, format!("home {id} does not exist")),
            StoreError::ApiKeyNotFound(id) => {
                Error::new(Reason::ApiKeyNotFound, format!("API key {id} does not exist"))
            }
            StoreError::JobNotFound(id) => Error::new(Reason::NotFound, format!("job {id} does not exist")),
            StoreError::JobNotPending(id) => {
                Error::new(Reason::NotFound, format!("job {id} no longer waits to write this device"))
                    .with_data(serde_json::json!({ "jobGone": id }))
            }
            StoreError::KeyNotFound => Error::new(Reason::KeyNotFound, "the key does not exist in this store"),
            StoreError::RevisionMismatch { current } => Error::new(
                Reason::RevisionMismatch,
                match current {
                    Some(rev) => format!("the precondition failed: the key is at rev {rev}"),
                    None => "the precondition failed: the key does not exist".to_owned(),
                },
            )
            .with_data(serde_json::json!({ "rev": current.map(|r| r.0) })),
            StoreError::TooManyKeys { limit } => {
                Error::new(Reason::TooManyKeys, format!("the store already holds its limit of {limit} keys"))
                    .with_data(serde_json::json!({ "limit": limit }))
            }
            StoreError::StoreRevMismatch { current } => {
                Error::new(Reason::RevisionMismatch, format!("the precondition failed: the store is at rev {current}"))
                    .with_data(serde_json::json!({ "rev": current.0 }))
            }
            StoreError::ValueTooLarge { size, limit } => Error::new(
                Reason::ValueTooLarge,
                format!("the merged value would be {size} bytes; the limit is {limit} bytes"),
            )
            .with_data(serde_json::json!({ "size": size, "limit": limit })),
            StoreError::InvalidValue(why) => Error::new(Reason::InvalidValue, why),
            StoreError::InOp { index, error } => Error::from(*error).at_op(index),
            StoreError::DeviceAlreadyInHome { device, home } => {
                Error::new(Reason::DeviceAlreadyInHome, format!("device {device} is already in home {home}"))
            }
            StoreError::Closed => Error::unavailable("the server is shutting down"),
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "storage unreachable");
                Error::unavailable("storage is unreachable; retry shortly")
            }
            StoreError::Backend(cause) => Error::internal(format_args!("storage: {cause}")),
        }
    }
}

/// A bad op of a batch: its reason, with the op's `index` (and `key`) in `data`.
impl From<ddp_protocol::batch::OpError> for Error {
    fn from(e: ddp_protocol::batch::OpError) -> Error {
        let error = Error::new(e.reason, e.message);
        match (e.index, e.key) {
            (Some(i), Some(key)) => error.with_data(serde_json::json!({ "index": i, "key": key })),
            (Some(i), None) => error.with_data(serde_json::json!({ "index": i })),
            (None, _) => error,
        }
    }
}
