//! The conformance suite and SQLite-specific behaviour of the embedded backend.

use std::sync::Arc;

use ddp_protocol::{Key, Rev, Value};
use ddp_store::conformance::{Recorder, run_all};
use ddp_store::*;

fn open(dir: &tempfile::TempDir, recorder: Arc<Recorder>) -> SqliteStore {
    SqliteStore::open(SqliteOptions::new(dir.path().join("ddp.sqlite3")), recorder).expect("open store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = Arc::new(Recorder::default());
    let store = open(&dir, recorder.clone());
    run_all(&store, &recorder).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_revs_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, Arc::new(Recorder::default()));
    let dev = store
        .create_device(NewDevice {
            name: "d".into(),
            home: None,
            device_class: String::new(),
            tag: String::new(),
            key_hash: [7; 32],
        })
        .await
        .expect("device");
    let d = StoreRef::Device(dev.id);
    for i in 0..5 {
        let write = KvWrite {
            store: d,
            key: Key::new("k").expect("key"),
            action: KvAction::Set(Value::parse(&format!("{i}.50")).expect("value")),
            condition: Condition::None,
            max_keys: 10,
            origin: Origin::Admin,
        };
        store.write(write).await.expect("write");
    }
    store.close().await;
    store.close().await; // idempotent
    let after_close = store.snapshot(d, None).await;
    assert!(after_close.is_ok(), "reads still work on a closed store: {after_close:?}");

    let reopened = open(&dir, Arc::new(Recorder::default()));
    let snap = reopened.snapshot(d, None).await.expect("snapshot");
    assert_eq!(snap.rev, Rev(5));
    assert_eq!(snap.items[0].value.as_json(), "4.50");
    let next = KvWrite {
        store: d,
        key: Key::new("k2").expect("key"),
        action: KvAction::Delete,
        condition: Condition::None,
        max_keys: 10,
        origin: Origin::Admin,
    };
    assert_eq!(reopened.write(next).await, Err(StoreError::KeyNotFound));
    reopened.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_close_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, Arc::new(Recorder::default()));
    store.close().await;
    assert_eq!(store.create_home("late".into()).await.map(|h| h.id), Err(StoreError::Closed));
    assert_eq!(store.ping().await, Err(StoreError::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ddp.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch("PRAGMA user_version = 999").expect("set version");
    }
    let err = SqliteStore::open(SqliteOptions::new(&path), Arc::new(Recorder::default())).err().expect("refused");
    assert!(err.to_string().contains("newer"), "{err}");
}
