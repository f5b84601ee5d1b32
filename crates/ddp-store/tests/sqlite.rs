//! The conformance suite and SQLite-specific behaviour of the embedded backend.

use std::sync::Arc;

use ddp_protocol::{Key, Rev, Value};
use ddp_store::conformance::{Recorder, run_all};
use ddp_store::*;

fn open(dir: &tempfile::TempDir, recorder: Arc<Recorder>) -> SqliteStore {
    let mut options = SqliteOptions::new(dir.path().join("ddp.sqlite3"));
    // The conformance suite's fleet checks query indexed keys and others.
    options.value_index = ValueIndex::parse(ddp_store::conformance::INDEXED_KEYS).expect("keys");
    SqliteStore::open(options, recorder).expect("open store")
}

async fn device(store: &SqliteStore, key_hash: [u8; 32]) -> DeviceRecord {
    let new = NewDevice { name: "d".into(), home: None, device_class: String::new(), tag: String::new(), key_hash };
    store.create_device(new).await.expect("device")
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
    let dev = device(&store, [7; 32]).await;
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

/// The WAL's checkpoint sequence number (bytes 12–15 of its header, big-endian): SQLite raises
/// it each time the WAL starts over from its beginning.
fn wal_sequence(path: &std::path::Path) -> Option<u32> {
    let bytes = std::fs::read(path).ok()?;
    let seq: [u8; 4] = bytes.get(12..16)?.try_into().ok()?;
    Some(u32::from_be_bytes(seq))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_starts_over_under_a_steady_stream_of_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(&dir, Arc::new(Recorder::default())));
    let mut devices = Vec::new();
    for i in 0..20 {
        let d = store
            .create_device(NewDevice {
                name: format!("d{i}"),
                home: None,
                device_class: String::new(),
                tag: String::new(),
                key_hash: [i as u8; 32],
            })
            .await
            .expect("device");
        devices.push(StoreRef::Device(d.id));
    }
    let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for w in 0..64usize {
        let (store, devices, stop, written) = (store.clone(), devices.clone(), stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                i += 7;
                let write = KvWrite {
                    store: devices[i % devices.len()],
                    key: Key::new(&format!("k{}", i % 50)).expect("key"),
                    action: KvAction::Set(Value::parse(&format!("\"{}\"", "x".repeat(200 + i % 50))).expect("value")),
                    condition: Condition::None,
                    max_keys: 100,
                    origin: Origin::Admin,
                };
                store.write(write).await.expect("write");
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // While the writes never stop, the WAL must start over after every background checkpoint
    // (every 2 s here): the writer copies the last frames and its next batch restarts the log.
    // Left to background checkpoints alone it starts over only by luck, when one happens to
    // catch up at the moment a batch begins — under this load seldom or never.
    let wal = dir.path().join("ddp.sqlite3-wal");
    let started = std::time::Instant::now();
    let (mut last, mut restarts) = (None, 0);
    while started.elapsed() < std::time::Duration::from_secs(7) && restarts < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let Some(seq) = wal_sequence(&wal) else { continue };
        if last.is_some_and(|l| l != seq) {
            restarts += 1;
        }
        last = Some(seq);
    }
    let before_stop = written.load(Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let still_writing = written.load(Ordering::Relaxed) > before_stop;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    assert!(still_writing, "the writes kept flowing while the WAL was watched");
    assert!(
        restarts >= 2,
        "the WAL started over {restarts} time(s) in {:?} of continuous writes ({} writes)",
        started.elapsed(),
        written.load(Ordering::Relaxed)
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_to_commit_is_rolled_back_whole_and_revs_stay_contiguous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recorder = Arc::new(Recorder::default());
    let store = Arc::new(open(&dir, recorder.clone()));
    let dev = store
        .create_device(NewDevice {
            name: "d".into(),
            home: None,
            device_class: String::new(),
            tag: String::new(),
            key_hash: [9; 32],
        })
        .await
        .expect("device");
    let d = StoreRef::Device(dev.id);
    let write = move |key: String| KvWrite {
        store: d,
        key: Key::new(&key).expect("key"),
        action: KvAction::Set(Value::parse("1").expect("value")),
        condition: Condition::None,
        max_keys: 1000,
        origin: Origin::Admin,
    };
    store.write(write("before".into())).await.expect("write");
    // A real SQLite failure inside the batch transaction: a trigger that aborts one key's insert.
    let side = rusqlite::Connection::open(dir.path().join("ddp.sqlite3")).expect("side connection");
    side.execute_batch(
        "CREATE TRIGGER boom BEFORE INSERT ON items WHEN NEW.key = 'boom' BEGIN SELECT RAISE(ABORT, 'boom'); END;",
    )
    .expect("trigger");
    let mut writers = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        let key = if i % 10 == 5 { "boom".to_owned() } else { format!("k{i}") };
        writers.push(tokio::spawn(async move { (key.clone(), store.write(write(key)).await) }));
    }
    let mut applied = vec![Rev(1)];
    let mut failed = 0;
    for w in writers {
        match w.await.expect("writer") {
            (_, Ok(change)) => applied.push(change.rev),
            (key, Err(StoreError::Backend(_))) => {
                failed += 1;
                let got = store.get(d, Key::new(&key).expect("key")).await;
                assert!(matches!(got, Err(StoreError::KeyNotFound)), "{key} was rolled back with its batch");
            }
            (key, Err(e)) => panic!("{key}: {e}"),
        }
    }
    assert!(failed >= 4, "every boom write failed, and whatever shared its batch");
    applied.sort();
    let n = applied.len() as u64;
    assert_eq!(applied, (1..=n).map(Rev).collect::<Vec<_>>(), "the revs that were handed out are contiguous");
    // The writer's cache was dropped with the rollback: the next write continues the sequence.
    side.execute_batch("DROP TRIGGER boom").expect("drop trigger");
    assert_eq!(store.write(write("after".into())).await.expect("write").rev, Rev(n + 1));
    let snapshot = store.snapshot(d, None).await.expect("snapshot");
    assert_eq!((snapshot.rev, snapshot.items.len() as u64), (Rev(n + 1), n + 1));
    let seen: Vec<Rev> = recorder.changes_of(d).iter().map(|c| c.rev).collect();
    assert_eq!(seen, (1..=n + 1).map(Rev).collect::<Vec<_>>(), "the sink never saw a rolled-back change");
    store.close().await;
}

/// One node: devices a job claimed before a restart (a crash, say) need not wait for their
/// lease; the reopened store gives them out again at once, and the job still writes each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_claims_are_released_by_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, Arc::new(Recorder::default()));
    let dev = device(&store, [9; 32]).await;
    let new = NewJob { select: "{}".into(), ops: "[]".into(), rate: None, api_key: None, devices: vec![dev.id] };
    let job = store.create_job(new).await.expect("job");
    let now = ddp_protocol::Timestamp::now();
    assert!(matches!(store.claim_job_work(10, 3_600_000, now).await.expect("claim"), ClaimOutcome::Claimed(_)));
    assert!(matches!(store.claim_job_work(10, 3_600_000, now).await.expect("claim"), ClaimOutcome::Wait { .. }));
    store.close().await;
    drop(store);

    let store = open(&dir, Arc::new(Recorder::default()));
    let ClaimOutcome::Claimed(again) = store.claim_job_work(10, 3_600_000, now).await.expect("claim") else {
        panic!("the claim of the stopped store is released");
    };
    assert_eq!((again.job, again.devices), (job.id, vec![dev.id]));
    let set = KvOp {
        key: Key::new("k").expect("key"),
        action: KvAction::Set(Value::parse("1").expect("value")),
        condition: Condition::None,
    };
    let batch = KvBatch {
        store: StoreRef::Device(dev.id),
        ops: vec![set],
        store_rev: None,
        max_keys: 10,
        max_value_bytes: 100,
        origin: Origin::Admin,
        job: Some(job.id),
    };
    assert_eq!(store.write_batch(batch.clone()).await.expect("job write")[0].rev, Rev(1));
    assert_eq!(store.write_batch(batch).await, Err(StoreError::JobNotPending(job.id)));
    assert_eq!(store.job_results(job.id, vec![]).await.expect("results"), JobState::Done);
    store.close().await;
}
