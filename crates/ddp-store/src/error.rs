//! Storage errors.

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, JobId, Rev};

/// Something a [`Store`](crate::Store) call could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such device.
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    /// No such home.
    #[error("home {0} not found")]
    HomeNotFound(HomeId),
    /// No such project API key.
    #[error("API key {0} not found")]
    ApiKeyNotFound(ApiKeyId),
    /// No such job.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// A job's write to a device that the job no longer waits to write (it was cancelled, or
    /// the device was written already); nothing was applied.
    #[error("job {0} no longer waits to write this device")]
    JobNotPending(JobId),
    /// No such key in the store.
    #[error("key not found")]
    KeyNotFound,
    /// A conditional write's precondition failed; `current` is the item's rev (None: absent).
    #[error("revision mismatch (current: {current:?})")]
    RevisionMismatch {
        /// The item's current rev, or `None` when the key is absent.
        current: Option<Rev>,
    },
    /// The store already holds `limit` keys.
    #[error("the store already holds its limit of {limit} keys")]
    TooManyKeys {
        /// The limit that was reached.
        limit: usize,
    },
    /// A batch's `If-Match` on the whole store failed: the store is at `current`.
    #[error("the store is at rev {current}")]
    StoreRevMismatch {
        /// The store's rev.
        current: Rev,
    },
    /// A merge cannot be worked out (a member name no JSON reader agrees on).
    #[error("{0}")]
    InvalidValue(String),
    /// A merge would leave a value larger than the limit.
    #[error("the merged value would be {size} bytes; the limit is {limit}")]
    ValueTooLarge {
        /// The merged value's size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Op `index` of a batch failed with `error`; nothing of the batch was applied.
    #[error("op {index}: {error}")]
    InOp {
        /// The op at fault (from 0).
        index: usize,
        /// Why.
        error: Box<StoreError>,
    },
    /// The device is already in that home.
    #[error("device {device} is already in home {home}")]
    DeviceAlreadyInHome {
        /// The device.
        device: DeviceId,
        /// The home.
        home: HomeId,
    },
    /// The store is closed (shutting down).
    #[error("storage is closed")]
    Closed,
    /// The database cannot be reached (connection refused or lost, pool exhausted); retrying
    /// later may work. The text is for logs, never for clients.
    #[error("storage unreachable: {0}")]
    Unavailable(String),
    /// The backend failed (disk, database, corruption). The text is for logs, never for clients.
    #[error("storage failure: {0}")]
    Backend(String),
}

impl StoreError {
    /// This error, as the failure of op `index` of a batch.
    pub fn in_op(self, index: usize) -> StoreError {
        StoreError::InOp { index, error: Box::new(self) }
    }

    /// The error without the op it happened in, and that op.
    pub fn split_op(self) -> (Option<usize>, StoreError) {
        match self {
            StoreError::InOp { index, error } => (Some(index), *error),
            other => (None, other),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Backend(e.to_string())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let text = format!("PostgreSQL {} {code}: {}", db.severity(), db.message());
            // Class 08: connection exceptions; 57P0x: the server is shutting down or starting;
            // 53300: too many connections.
            return if code.starts_with("08") || code.starts_with("57P0") || code == "53300" {
                StoreError::Unavailable(text)
            } else {
                StoreError::Backend(text)
            };
        }
        let cause = std::error::Error::source(&e);
        let text = match cause {
            Some(cause) => format!("PostgreSQL: {e}: {cause}"),
            None => format!("PostgreSQL: {e}"),
        };
        let io = cause.is_some_and(|c| c.is::<std::io::Error>());
        if e.is_closed() || io || text.contains("timeout") {
            StoreError::Unavailable(text)
        } else {
            StoreError::Backend(text)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            deadpool_postgres::PoolError::Closed => StoreError::Closed,
            deadpool_postgres::PoolError::Timeout(_) => {
                StoreError::Unavailable("no PostgreSQL connection became free or could be made in time".into())
            }
            other => StoreError::Backend(format!("PostgreSQL connection pool: {other}")),
        }
    }
}
