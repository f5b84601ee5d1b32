//! Device Data Proxy storage.
//!
//! One [`Store`] trait, implemented by every backend, and one conformance suite
//! (`conformance`, feature `conformance`) that every backend passes. The server talks only to
//! the trait.
//!
//! A store keeps homes, devices, project API keys, and one key-value store per device and per
//! home. Every committed set or delete gets the store's next [`Rev`] inside the same durable
//! transaction, is recorded in the change history, and is handed — in commit order — to the
//! [`CommitSink`] given when the backend was opened, before the writer hears its write succeeded.
//! That is how the server's hub sees every change exactly once and in rev order.
//!
//! # Layout
//! - [`model`]: the records and operations ([`KvWrite`], [`Change`], [`DeviceRecord`], …).
//! - [`error`]: the error type, [`StoreError`].
//! - [`fleet`]: device queries and jobs (PROTOCOL.md §12) and the SQL both backends run them with.
//! - [`sqlite`]: the embedded default, [`SqliteStore`] — WAL, one writer thread with pipelined
//!   group commit (an `fdatasync` of the log before anything is acknowledged or shown), a small
//!   pool of read connections. One node.
//! - [`postgres`]: [`PgStore`], for several nodes on one PostgreSQL database — one-round-trip
//!   writes, and a change feed that brings every node's commits to every node's sink.
//! - `conformance`: the backend-independent test suite.

mod batch;
pub mod error;
pub mod fleet;
pub mod model;
pub mod postgres;
mod sql;
pub mod sqlite;

#[cfg(feature = "conformance")]
pub mod conformance;

use async_trait::async_trait;
use ddp_protocol::{ApiKeyId, DeviceId, HomeId, JobId, Key, Rev, Timestamp};

pub use error::StoreError;
pub use fleet::{ClaimOutcome, DeviceQuery, JobClaim, JobRecord, JobState, NewJob, ValueIndex};
pub use model::*;
pub use postgres::{PgOptions, PgStore};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Receives every committed batch, in commit order, before the writers are answered.
///
/// Called on the backend's writer context: it must not block (hand the batch to channels).
pub trait CommitSink: Send + Sync + 'static {
    /// `batch` holds the committed changes and admin changes, in commit (and so rev) order.
    fn committed(&self, batch: &[Committed]);
}

/// A sink that drops everything (for tools and tests that do not watch).
pub struct NoSink;

impl CommitSink for NoSink {
    fn committed(&self, _batch: &[Committed]) {}
}

/// The storage interface of the server. Every method is atomic; writes are durable when they
/// return `Ok`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- key-value stores ----

    /// Applies a batch (PROTOCOL.md §11): checks the store exists, its rev against
    /// `store_rev`, and then each op in order — its precondition, that a deleted key exists, the
    /// key limit, a merge's result size — as the ops before it left the store; then gives the
    /// ops the store's next revs, in order, all in one durable transaction. All or nothing: a
    /// failing op is [`StoreError::InOp`] and nothing is applied. The changes, in rev order (none
    /// for a batch of no ops, which commits nothing).
    ///
    /// This is the only write path: a single write is a batch of one ([`Store::write`]).
    async fn write_batch(&self, batch: KvBatch) -> Result<Vec<Change>, StoreError>;

    /// One set, delete or merge: [`Store::write_batch`] with one op (its errors without the
    /// [`StoreError::InOp`] around them).
    async fn write(&self, write: KvWrite) -> Result<Change, StoreError> {
        let mut changes = self.write_batch(write.into()).await.map_err(|e| e.split_op().1)?;
        changes.pop().ok_or_else(|| StoreError::Backend("a write of one op committed no change".into()))
    }

    /// One item, or [`StoreError::KeyNotFound`] / `NotFound` for a missing store.
    async fn get(&self, store: StoreRef, key: Key) -> Result<ItemRecord, StoreError>;

    /// The store's rev and every item (or those whose key starts with `prefix`), sorted by key,
    /// read in one consistent snapshot.
    async fn snapshot(&self, store: StoreRef, prefix: Option<String>) -> Result<Snapshot, StoreError>;

    /// The changes after `after`, in rev order, when the history still holds all of them;
    /// `Ok(None)` when part of it has been trimmed.
    async fn changes_since(&self, store: StoreRef, after: Rev) -> Result<Option<Vec<Change>>, StoreError>;

    // ---- homes ----

    /// Creates a home with an empty store.
    async fn create_home(&self, name: String) -> Result<HomeRecord, StoreError>;
    /// Every home, by id.
    async fn homes(&self) -> Result<Vec<HomeRecord>, StoreError>;
    /// One home.
    async fn home(&self, id: HomeId) -> Result<HomeRecord, StoreError>;
    /// Deletes a home and its store; its devices leave it; project keys stop naming it.
    async fn delete_home(&self, id: HomeId) -> Result<(), StoreError>;

    // ---- devices ----

    /// Creates a device with an empty store, whose API key has SHA-256 digest `key_hash`.
    async fn create_device(&self, new: NewDevice) -> Result<DeviceRecord, StoreError>;
    /// Every device (in `home`, when given), by id.
    async fn devices(&self, home: Option<HomeId>) -> Result<Vec<DeviceRecord>, StoreError>;
    /// One device.
    async fn device(&self, id: DeviceId) -> Result<DeviceRecord, StoreError>;
    /// Renames a device and/or moves it between homes.
    async fn update_device(&self, id: DeviceId, update: DeviceUpdate) -> Result<DeviceRecord, StoreError>;
    /// Replaces a device's API key digest; the old key stops working.
    async fn rotate_device_key(&self, id: DeviceId, key_hash: [u8; 32]) -> Result<(), StoreError>;
    /// Deletes a device and its store.
    async fn delete_device(&self, id: DeviceId) -> Result<(), StoreError>;

    // ---- live sessions, over every node ----

    /// Admits a sync session of `device` if it holds fewer than `max` over all nodes; records
    /// `at` as its `lastConnectTime` when this is its first (and then returns its home, for the
    /// `_deviceConnected_` event).
    async fn session_opened(&self, device: DeviceId, max: usize, at: Timestamp) -> Result<SessionOpened, StoreError>;
    /// Ends a session of `device`; when it was its last over all nodes, records `at` as its
    /// `lastDisconnectTime` and returns its home (for `_deviceDisconnected_`).
    async fn session_closed(&self, device: DeviceId, at: Timestamp) -> Result<SessionClosed, StoreError>;
    /// Which of `devices` hold a live session on some node.
    async fn connected(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceId>, StoreError>;

    // ---- events ----

    /// Hands an event for `home` to the commit sink of every node ([`Committed::Event`]).
    /// Events are not stored: a node that is down when it is raised does not get it.
    async fn broadcast_event(&self, home: HomeId, json: String) -> Result<(), StoreError>;

    /// Hands a command for `device` to the commit sink of every node ([`Committed::Command`]),
    /// after the commands sent before it through this node. Commands are not stored either.
    async fn broadcast_command(&self, device: DeviceId, json: String) -> Result<(), StoreError>;

    // ---- delivery and acknowledgement (PROTOCOL.md §10) ----

    /// Raises the recorded progress of each device to at least the given one (never lowers
    /// it; devices that no longer exist are skipped). Durable when it returns. Callers batch:
    /// the server records what changed about once a second, not each delivery or ack.
    async fn record_sync(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError>;

    /// The store rev and recorded progress of each of `devices` that exists, by device id.
    async fn device_sync(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceSync>, StoreError>;

    /// Hands progress seen on this node to the commit sink of every node ([`Committed::Sync`]),
    /// so that their waiters hear of it at once. Not stored (that is [`Store::record_sync`]).
    async fn broadcast_sync(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError>;

    // ---- fleet (PROTOCOL.md §12) ----

    /// The devices `query` selects, in id order, at most `query.limit` of them. Reads indexes,
    /// never every store (see [`fleet`]).
    async fn find_devices(&self, query: DeviceQuery) -> Result<Vec<DeviceRecord>, StoreError>;

    /// Creates a running job over `new.devices` (each written at most once, ever).
    async fn create_job(&self, new: NewJob) -> Result<JobRecord, StoreError>;
    /// Every job (those `api_key` created, when given), by id, with their progress.
    async fn jobs(&self, api_key: Option<ApiKeyId>) -> Result<Vec<JobRecord>, StoreError>;
    /// One job, with its progress.
    async fn job(&self, id: JobId) -> Result<JobRecord, StoreError>;
    /// Cancels a running job: devices not yet written never will be. A job that has ended
    /// stays as it was.
    async fn cancel_job(&self, id: JobId) -> Result<JobRecord, StoreError>;
    /// Claims up to `max` unwritten devices of a running job for `lease_ms` (other nodes skip
    /// them meanwhile; when the lease runs out they may take them), as the job's rate allows.
    async fn claim_job_work(&self, max: usize, lease_ms: i64, now: Timestamp) -> Result<ClaimOutcome, StoreError>;
    /// Records the devices of `job` whose write failed, with why, and ends the job (`done`)
    /// when no device is left to write. Its state afterwards.
    async fn job_results(&self, job: JobId, failed: Vec<(DeviceId, String)>) -> Result<JobState, StoreError>;

    // ---- project API keys ----

    /// Creates a project API key whose secret has SHA-256 digest `key_hash`.
    async fn create_api_key(&self, new: NewApiKey) -> Result<ApiKeyRecord, StoreError>;
    /// Every project API key, by id (no secrets).
    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Deletes a project API key; it stops working at once.
    async fn delete_api_key(&self, id: ApiKeyId) -> Result<(), StoreError>;

    // ---- authentication ----

    /// Who holds the device or project key whose SHA-256 digest is `key_hash`.
    async fn principal_by_key_hash(&self, key_hash: [u8; 32]) -> Result<Option<KeyHolder>, StoreError>;

    // ---- operations ----

    /// Checks that storage answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Drops change history older than the retention rule: a store keeps at least its last
    /// `keep_changes` changes and every change younger than `keep_age_ms`.
    async fn trim_history(&self, keep_changes: u64, keep_age_ms: i64) -> Result<u64, StoreError>;

    /// Finishes every queued write, then stops accepting new ones. Idempotent.
    async fn close(&self);
}
