//! What the unit tests of several modules share: a real embedded store in a temporary directory,
//! holding one device, whose commit sink goes nowhere (the tests hand the hub or the tracker what
//! the fan-out would).

use std::sync::Arc;

use ddp_protocol::{DeviceId, Key, Value};
use ddp_store::{Condition, KvAction, KvWrite, NewDevice, NoSink, Origin, SqliteOptions, SqliteStore, Store, StoreRef};

/// An embedded store with one device; the directory goes when this is dropped.
pub(crate) struct Embedded {
    /// The store.
    pub(crate) store: Arc<dyn Store>,
    /// The device it holds.
    pub(crate) device: DeviceId,
    _dir: tempfile::TempDir,
}

/// Opens a fresh embedded store and creates a device in it.
pub(crate) async fn embedded() -> Embedded {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = SqliteOptions::new(dir.path().join("test.sqlite3"));
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(options, Arc::new(NoSink)).expect("store opens"));
    let device = store
        .create_device(NewDevice {
            name: "d".into(),
            home: None,
            device_class: String::new(),
            tag: String::new(),
            key_hash: [7; 32],
        })
        .await
        .expect("device")
        .id;
    Embedded { store, device, _dir: dir }
}

/// A set of `key` to the JSON `value` in `store`, by the admin.
pub(crate) fn set(store: StoreRef, key: &str, value: &str) -> KvWrite {
    KvWrite {
        store,
        key: Key::new(key).expect("key"),
        action: KvAction::Set(Value::parse(value).expect("value")),
        condition: Condition::None,
        max_keys: 100,
        origin: Origin::Admin,
    }
}
