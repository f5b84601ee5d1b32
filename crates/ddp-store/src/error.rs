//! Storage errors.

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Rev};

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
    /// The backend failed (disk, database, corruption). The text is for logs, never for clients.
    #[error("storage failure: {0}")]
    Backend(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Backend(e.to_string())
    }
}
