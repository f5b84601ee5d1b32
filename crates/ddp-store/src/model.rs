//! What the store keeps and the operations on it.

use std::fmt;

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Key, Rev, Timestamp, Value};

/// Which key-value store: a device's or a home's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreRef {
    /// The store of a device.
    Device(DeviceId),
    /// The store of a home.
    Home(HomeId),
}

impl StoreRef {
    /// The numeric kind used in storage: 0 device, 1 home.
    pub const fn kind(self) -> i64 {
        match self {
            StoreRef::Device(_) => 0,
            StoreRef::Home(_) => 1,
        }
    }

    /// The owner's id.
    pub const fn owner(self) -> u64 {
        match self {
            StoreRef::Device(d) => d.get(),
            StoreRef::Home(h) => h.get(),
        }
    }

    /// Rebuilds a reference from its storage form.
    pub fn from_parts(kind: i64, owner: u64) -> Option<StoreRef> {
        match kind {
            0 => DeviceId::new(owner).map(StoreRef::Device),
            1 => HomeId::new(owner).map(StoreRef::Home),
            _ => None,
        }
    }
}

impl fmt::Display for StoreRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreRef::Device(d) => write!(f, "device {d}"),
            StoreRef::Home(h) => write!(f, "home {h}"),
        }
    }
}

/// Who made a change (for events' `originDeviceId` / `originProjectKeyId`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The operator's admin key.
    Admin,
    /// A project API key.
    ProjectKey(ApiKeyId),
    /// A device, with its own key.
    Device(DeviceId),
}

impl Origin {
    /// Storage form: (kind, id) with kind 0 admin, 1 project key, 2 device.
    pub const fn to_parts(self) -> (i64, u64) {
        match self {
            Origin::Admin => (0, 0),
            Origin::ProjectKey(k) => (1, k.get()),
            Origin::Device(d) => (2, d.get()),
        }
    }

    /// Rebuilds an origin from its storage form.
    pub fn from_parts(kind: i64, id: u64) -> Origin {
        match kind {
            1 => ApiKeyId::new(id).map_or(Origin::Admin, Origin::ProjectKey),
            2 => DeviceId::new(id).map_or(Origin::Admin, Origin::Device),
            _ => Origin::Admin,
        }
    }
}

/// A precondition on a write (PROTOCOL.md §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Condition {
    /// Always apply.
    #[default]
    None,
    /// `If-Match: "<rev>", …`: apply only if the item exists at one of these revs.
    RevIn(Vec<Rev>),
    /// `If-Match: *`: apply only if the item exists.
    Exists,
    /// `If-None-Match: *`: apply only if the item does not exist (create only).
    Absent,
}

impl Condition {
    /// Whether an item currently at `current` (None: absent) satisfies the condition.
    pub fn holds(&self, current: Option<Rev>) -> bool {
        match self {
            Condition::None => true,
            Condition::RevIn(revs) => current.is_some_and(|c| revs.contains(&c)),
            Condition::Exists => current.is_some(),
            Condition::Absent => current.is_none(),
        }
    }
}

/// What a write does to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvAction {
    /// Create or overwrite the key.
    Set(Value),
    /// Delete the key (it must exist).
    Delete,
    /// Apply an RFC 7396 merge patch (a JSON object) to the key's value ([`Value::merge_patch`]);
    /// stored as a set of the result.
    Merge(Value),
}

/// One op of a [`KvBatch`].
#[derive(Debug, Clone)]
pub struct KvOp {
    /// The key written.
    pub key: Key,
    /// Set, delete or merge.
    pub action: KvAction,
    /// The op's precondition, on the key as the ops before it left it.
    pub condition: Condition,
}

/// Ops on one store, applied all or none, in order, in one durable transaction, with
/// consecutive revs (PROTOCOL.md §11). A single write is a batch of one.
#[derive(Debug, Clone)]
pub struct KvBatch {
    /// The store written.
    pub store: StoreRef,
    /// The ops, in order (at least one).
    pub ops: Vec<KvOp>,
    /// `If-Match` on the whole store: apply only if the store is at this rev.
    pub store_rev: Option<Rev>,
    /// Most keys the store may hold after any op.
    pub max_keys: usize,
    /// Largest value, in bytes, a merge may leave (sets are checked before they reach the store).
    pub max_value_bytes: usize,
    /// Who asked.
    pub origin: Origin,
    /// The job writing this device's store, if one is: the batch commits only while the job
    /// runs and has not yet written the device, and records the write as the job's, in the same
    /// transaction ([`StoreError::JobNotPending`] otherwise).
    pub job: Option<ddp_protocol::JobId>,
}

/// A write as a batch of one. A [`KvWrite`] carries no value size limit, so a merge made this way
/// is not size-checked: callers that merge (the server's gate) build the [`KvBatch`] themselves.
impl From<KvWrite> for KvBatch {
    fn from(w: KvWrite) -> KvBatch {
        KvBatch {
            store: w.store,
            ops: vec![KvOp { key: w.key, action: w.action, condition: w.condition }],
            store_rev: None,
            max_keys: w.max_keys,
            max_value_bytes: usize::MAX,
            origin: w.origin,
            job: None,
        }
    }
}

/// One set or delete, as the write path hands it to the store.
#[derive(Debug, Clone)]
pub struct KvWrite {
    /// The store written.
    pub store: StoreRef,
    /// The key written.
    pub key: Key,
    /// Set or delete.
    pub action: KvAction,
    /// The precondition.
    pub condition: Condition,
    /// Most keys the store may hold after a set of a new key.
    pub max_keys: usize,
    /// Who asked.
    pub origin: Origin,
}

/// A committed change, as recorded in the history and fanned out to sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The store changed.
    pub store: StoreRef,
    /// The store's rev after the change.
    pub rev: Rev,
    /// The key changed.
    pub key: Key,
    /// The new value; `None` for a delete.
    pub value: Option<Value>,
    /// When it was committed.
    pub time: Timestamp,
    /// The home the store belonged to at commit: the device's home for a device store (None
    /// when it was in no home), the home itself for a home store.
    pub home: Option<HomeId>,
    /// Who made the change.
    pub origin: Origin,
    /// For a change made by a batch of two or more ops: the rev of the batch's last change
    /// (sessions that take batches get them whole, PROTOCOL.md §11).
    pub batch_last: Option<Rev>,
}

impl Change {
    /// Whether this change ends its batch (a change of a batch of one always does).
    pub fn ends_batch(&self) -> bool {
        self.batch_last.is_none_or(|last| last <= self.rev)
    }
}

/// One item of a store with its rev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRecord {
    /// The key.
    pub key: Key,
    /// The value.
    pub value: Value,
    /// The store rev at which the item was last written.
    pub rev: Rev,
    /// When it was last written.
    pub modified: Timestamp,
}

/// A consistent view of a store: its rev and its items, sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's rev.
    pub rev: Rev,
    /// The items, sorted by key (bytewise).
    pub items: Vec<ItemRecord>,
}

/// A home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeRecord {
    /// Its id.
    pub id: HomeId,
    /// Its name.
    pub name: String,
    /// When it was created.
    pub created: Timestamp,
}

/// A device (never its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Its id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// The home it is in, if any.
    pub home: Option<HomeId>,
    /// Free-form class given at creation.
    pub device_class: String,
    /// Free-form tag given at creation.
    pub tag: String,
    /// When it was created.
    pub created: Timestamp,
    /// When its first sync session last opened.
    pub last_connect: Option<Timestamp>,
    /// When its last sync session last closed.
    pub last_disconnect: Option<Timestamp>,
}

/// A device to create.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its name.
    pub name: String,
    /// Its home, if any (must exist).
    pub home: Option<HomeId>,
    /// Free-form class.
    pub device_class: String,
    /// Free-form tag.
    pub tag: String,
    /// SHA-256 digest of its API key.
    pub key_hash: [u8; 32],
}

impl NewDevice {
    /// The record of this device once created with `id` at `created`.
    pub fn into_record(self, id: DeviceId, created: Timestamp) -> DeviceRecord {
        DeviceRecord {
            id,
            name: self.name,
            home: self.home,
            device_class: self.device_class,
            tag: self.tag,
            created,
            last_connect: None,
            last_disconnect: None,
        }
    }
}

/// Changes to a device; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct DeviceUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new home (`Some(None)`: leave its home).
    pub home: Option<Option<HomeId>>,
}

/// What a project API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read stores and receive events.
    Read,
    /// Read and write stores, receive events.
    ReadWrite,
}

impl Permission {
    /// Wire and storage spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::ReadWrite => "readWrite",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Permission> {
        match s {
            "read" => Some(Permission::Read),
            "readWrite" => Some(Permission::ReadWrite),
            _ => None,
        }
    }
}

/// A project API key (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Its id.
    pub id: ApiKeyId,
    /// Its name.
    pub name: String,
    /// The homes it may see; `None` means every home.
    pub homes: Option<Vec<HomeId>>,
    /// What it may do.
    pub permission: Permission,
    /// When it was created.
    pub created: Timestamp,
}

/// A project API key to create.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Its name.
    pub name: String,
    /// The homes it may see (each must exist); `None` means every home.
    pub homes: Option<Vec<HomeId>>,
    /// What it may do.
    pub permission: Permission,
    /// SHA-256 digest of its secret.
    pub key_hash: [u8; 32],
}

/// Who holds a key found by its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHolder {
    /// A device's key.
    Device(DeviceId),
    /// A project API key.
    Project(ApiKeyRecord),
}

/// A change to homes, devices or keys that live sessions and caches must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminChange {
    /// A home was deleted.
    HomeDeleted(HomeId),
    /// A device was deleted.
    DeviceDeleted(DeviceId),
    /// A device's key was replaced.
    DeviceKeyRotated(DeviceId),
    /// A device changed home.
    DeviceMoved {
        /// The device.
        device: DeviceId,
        /// Its old home.
        from: Option<HomeId>,
        /// Its new home.
        to: Option<HomeId>,
    },
    /// A project API key was deleted.
    ApiKeyDeleted(ApiKeyId),
}

/// One element of a committed batch handed to the [`CommitSink`](crate::CommitSink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// A key-value change.
    Kv(Change),
    /// An admin change.
    Admin(AdminChange),
    /// An event raised on some node, for the listeners of `home` ([`Store::broadcast_event`](crate::Store::broadcast_event)).
    Event {
        /// The home.
        home: HomeId,
        /// The event's JSON.
        json: std::sync::Arc<str>,
    },
    /// A command sent through some node, for the live sessions of `device`
    /// ([`Store::broadcast_command`](crate::Store::broadcast_command)).
    Command {
        /// The device.
        device: DeviceId,
        /// The command's JSON, `{"action","parameters"}`.
        json: std::sync::Arc<str>,
    },
    /// Sync progress recorded on some node, for the others
    /// ([`Store::broadcast_sync`](crate::Store::broadcast_sync)).
    Sync(std::sync::Arc<[(DeviceId, SyncProgress)]>),
}

/// How far a device has got with its store (PROTOCOL.md §10): what its own sessions handed to
/// its connections, and what it acknowledged having applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncProgress {
    /// The highest rev a session of the device's own key handed to its connection.
    pub delivered: Rev,
    /// The highest rev the device acknowledged having applied.
    pub applied: Rev,
    /// When the server received that acknowledgement (`None` before the first).
    pub applied_at: Option<Timestamp>,
}

impl SyncProgress {
    /// Raises this to at least `other`, field by field; never lowers anything. `applied_at`
    /// goes with the greater `applied` (on a tie, the one known first stays). True when
    /// anything moved.
    pub fn merge(&mut self, other: &SyncProgress) -> bool {
        let mut moved = false;
        if other.delivered > self.delivered {
            self.delivered = other.delivered;
            moved = true;
        }
        if other.applied > self.applied {
            self.applied = other.applied;
            self.applied_at = other.applied_at;
            moved = true;
        } else if other.applied == self.applied && self.applied_at.is_none() && other.applied_at.is_some() {
            self.applied_at = other.applied_at;
            moved = true;
        }
        moved
    }
}

/// What storage knows of one device's sync: its store's rev and its recorded progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSync {
    /// The device.
    pub device: DeviceId,
    /// Its store's rev.
    pub rev: Rev,
    /// Its recorded progress (zero when none was recorded).
    pub progress: SyncProgress,
}

/// The outcome of [`Store::session_opened`](crate::Store::session_opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOpened {
    /// Admitted; `first` when the device had no other session on any node.
    Opened {
        /// The device's first live session.
        first: bool,
        /// For a first session, the device's home (for its `_deviceConnected_`); else `None`.
        home: Option<HomeId>,
    },
    /// The device already holds its maximum.
    Refused,
}

/// The outcome of [`Store::session_closed`](crate::Store::session_closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionClosed {
    /// The device still holds other sessions.
    Others,
    /// That was its last session on every node.
    Last {
        /// The device's home (for its `_deviceDisconnected_`), if it is in one.
        home: Option<HomeId>,
    },
}
