//! The conformance suite on PostgreSQL, and what only several nodes on one database can show:
//! cross-node fan-out, revs under writers on different nodes, presence, a dropped feed
//! connection, and nodes migrating a fresh database at once.
//!
//! Built with the `postgres-tests` feature; needs `DDP_TEST_DATABASE_URL`, a database whose user
//! may create databases (each test makes its own). `scripts/test` starts a private PostgreSQL
//! and sets both.
#![cfg(feature = "postgres-tests")]

use std::sync::Arc;
use std::time::Duration;

use ddp_protocol::{DeviceId, Key, Rev, Timestamp, Value};
use ddp_store::conformance::{Recorder, run_all};
use ddp_store::*;

/// A fresh, empty database on the test server; returns its URL.
async fn fresh_database() -> String {
    let url = std::env::var("DDP_TEST_DATABASE_URL")
        .expect("DDP_TEST_DATABASE_URL must name a PostgreSQL database for the postgres-tests feature");
    let (client, conn) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect to the test server");
    tokio::spawn(conn);
    let name = format!("ddp_test_{:016x}", rand::random::<u64>());
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
    // The same URL, naming the new database.
    let base = url.split('?').next().unwrap_or(&url);
    let (prefix, _) = base.rsplit_once('/').expect("URL has a database");
    let query = url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    format!("{prefix}/{name}{query}")
}

async fn node(url: &str, name: &str) -> (PgStore, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let mut options = PgOptions::new(url);
    options.node_name = name.into();
    // The conformance suite's fleet checks query indexed keys and others.
    options.value_index = ValueIndex::parse(ddp_store::conformance::INDEXED_KEYS).expect("keys");
    let store = PgStore::open(options, recorder.clone()).await.expect("open PostgreSQL store");
    (store, recorder)
}

async fn admin_connection(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

fn set(store: StoreRef, key: &str, value: &str) -> KvWrite {
    KvWrite {
        store,
        key: Key::new(key).expect("key"),
        action: KvAction::Set(Value::parse(value).expect("value")),
        condition: Condition::None,
        max_keys: 1000,
        origin: Origin::Admin,
    }
}

async fn device(store: &PgStore, n: u8) -> DeviceId {
    let mut key_hash = [n; 32];
    key_hash[0] = rand::random();
    key_hash[1] = rand::random();
    store
        .create_device(NewDevice {
            name: format!("d{n}"),
            home: None,
            device_class: String::new(),
            tag: String::new(),
            key_hash,
        })
        .await
        .expect("device")
        .id
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened within 10 s: {what}");
}

fn revs(recorder: &Recorder, store: StoreRef) -> Vec<u64> {
    recorder.changes_of(store).iter().map(|c| c.rev.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() {
    let url = fresh_database().await;
    let (store, recorder) = node(&url, "conformance").await;
    run_all(&store, &recorder).await;
    store.close().await;
    store.close().await; // idempotent
    assert_eq!(store.ping().await, Err(StoreError::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_revs_changes_events_and_admin_changes() {
    let url = fresh_database().await;
    let (a, seen_a) = node(&url, "node-a").await;
    let (b, seen_b) = node(&url, "node-b").await;
    let d = StoreRef::Device(device(&a, 1).await);

    // Writers on both nodes, concurrently, to one store: one rev each, no gap.
    const N: u64 = 300;
    let writes = (0..N).map(|i| {
        let node = if i % 2 == 0 { &a } else { &b };
        node.write(set(d, &format!("k{}", i % 7), &i.to_string()))
    });
    let mut got: Vec<u64> =
        futures_util::future::join_all(writes).await.into_iter().map(|r| r.expect("write").rev.0).collect();
    got.sort_unstable();
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
    // Each node's sink saw every change once, in rev order, whichever node wrote it.
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        eventually(&format!("node {name} saw {N} changes"), || seen.changes_of(d).len() >= N as usize).await;
        assert_eq!(revs(seen, d), (1..=N).collect::<Vec<_>>(), "node {name}");
    }

    // Events raised on one node reach every node.
    let home = a.create_home("h".into()).await.expect("home").id;
    b.broadcast_event(home, r#"{"eventType":"ping"}"#.into()).await.expect("event");
    for seen in [&seen_a, &seen_b] {
        eventually("the event reached both nodes", || {
            seen.all()
                .iter()
                .any(|c| matches!(c, Committed::Event { home: h, json } if *h == home && json.contains("ping")))
        })
        .await;
    }

    // Commands sent through one node reach every node, in the order sent.
    let target = device(&a, 3).await;
    for i in 0..10 {
        b.broadcast_command(target, format!(r#"{{"action":"c{i}"}}"#)).await.expect("command");
    }
    let commands = |seen: &Recorder| -> Vec<String> {
        seen.all()
            .into_iter()
            .filter_map(|c| match c {
                Committed::Command { device, json } if device == target => Some(json.to_string()),
                _ => None,
            })
            .collect()
    };
    let expected: Vec<String> = (0..10).map(|i| format!(r#"{{"action":"c{i}"}}"#)).collect();
    for seen in [&seen_a, &seen_b] {
        eventually("the commands reached both nodes", || commands(seen).len() >= 10).await;
        assert_eq!(commands(seen), expected);
    }

    // Sync progress announced by one node reaches the other; what both record meets in the
    // database, each value the greater of the two, however the batches interleave.
    let acked = device(&a, 4).await;
    let progress = |delivered, applied| SyncProgress {
        delivered: Rev(delivered),
        applied: Rev(applied),
        applied_at: Some(Timestamp(1_700_000_000_000 + applied as i64)),
    };
    a.broadcast_sync(vec![(acked, progress(5, 4))]).await.expect("broadcast sync");
    eventually("b heard a's progress", || {
        seen_b.all().iter().any(|c| matches!(c, Committed::Sync(list) if **list == [(acked, progress(5, 4))]))
    })
    .await;
    let (ra, rb) = tokio::join!(
        a.record_sync(vec![(acked, progress(5, 4)), (target, progress(2, 1))]),
        b.record_sync(vec![(target, progress(3, 0)), (acked, progress(6, 2))]),
    );
    ra.expect("a records");
    rb.expect("b records");
    let recorded = b.device_sync(vec![acked, target]).await.expect("read");
    let of = |d| recorded.iter().find(|s| s.device == d).map(|s| s.progress);
    assert_eq!(of(acked), Some(progress(6, 4)));
    assert_eq!(of(target), Some(SyncProgress { delivered: Rev(3), ..progress(2, 1) }));

    // An admin change on one node reaches the other.
    let dev = device(&a, 2).await;
    a.rotate_device_key(dev, [9; 32]).await.expect("rotate");
    eventually("b saw the rotation", || seen_b.admin_changes().contains(&AdminChange::DeviceKeyRotated(dev))).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_on_two_nodes_over_many_stores_never_deadlock() {
    let url = fresh_database().await;
    let (a, seen_a) = node(&url, "node-a").await;
    let (b, _) = node(&url, "node-b").await;
    let mut stores = Vec::new();
    for n in 0..20u8 {
        stores.push(StoreRef::Device(device(&a, 10 + n).await));
    }
    // 1,000 concurrent writes, half through each node, to the stores in scrambled orders: the
    // batches of both nodes lock many stores at once.
    const N: usize = 1000;
    let writes = (0..N).map(|i| {
        let node = if i % 2 == 0 { &a } else { &b };
        node.write(set(stores[(i * 7 + i / 20) % stores.len()], &format!("k{}", i % 3), &i.to_string()))
    });
    let results = futures_util::future::join_all(writes).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} writes failed, e.g. {:?}", failed.len(), failed.first());
    for &store in &stores {
        let mut revs: Vec<u64> =
            results.iter().filter_map(|r| r.as_ref().ok()).filter(|c| c.store == store).map(|c| c.rev.0).collect();
        revs.sort_unstable();
        assert_eq!(revs, (1..=revs.len() as u64).collect::<Vec<_>>(), "{store}: contiguous revs");
    }
    for &store in &stores {
        let expected = a.snapshot(store, None).await.expect("snapshot").rev.0;
        eventually("node a's sink saw every change", || seen_a.changes_of(store).len() as u64 == expected).await;
        assert_eq!(revs(&seen_a, store), (1..=expected).collect::<Vec<_>>());
    }
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_counted_across_nodes() {
    let url = fresh_database().await;
    let (a, _) = node(&url, "node-a").await;
    let (b, _) = node(&url, "node-b").await;
    let dev = device(&a, 3).await;
    let t = Timestamp(1_800_000_000_000);
    assert_eq!(a.session_opened(dev, 2, t).await, Ok(SessionOpened::Opened { first: true, home: None }));
    assert_eq!(b.connected(vec![dev]).await, Ok(vec![dev]), "b sees a's session");
    assert_eq!(b.session_opened(dev, 2, t).await, Ok(SessionOpened::Opened { first: false, home: None }));
    assert_eq!(a.session_opened(dev, 2, t).await, Ok(SessionOpened::Refused), "the cap holds over both nodes");
    assert_eq!(a.session_closed(dev, t).await, Ok(SessionClosed::Others), "b still holds one");
    assert_eq!(
        b.session_closed(dev, Timestamp(t.0 + 5)).await,
        Ok(SessionClosed::Last { home: None }),
        "the last one, on another node"
    );
    assert_eq!(a.connected(vec![dev]).await, Ok(vec![]));
    assert_eq!(a.device(dev).await.expect("device").last_disconnect, Some(Timestamp(t.0 + 5)));

    // A node that goes away (closed here) leaves no session behind.
    assert_eq!(b.session_opened(dev, 2, t).await, Ok(SessionOpened::Opened { first: true, home: None }));
    b.close().await;
    assert_eq!(a.connected(vec![dev]).await, Ok(vec![]), "a closed node's sessions do not count");
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_feed_connection_loses_nothing() {
    let url = fresh_database().await;
    let (a, _) = node(&url, "writer").await;
    let (b, seen_b) = node(&url, "reader").await;
    let d = StoreRef::Device(device(&a, 4).await);
    let admin = admin_connection(&url).await;
    let kill_reader_feed = || async {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'reader feed'",
                &[],
            )
            .await
            .expect("terminate")
    };

    let writer = async {
        for i in 0..400u32 {
            a.write(set(d, "k", &i.to_string())).await.expect("write");
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let killer = async {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            kill_reader_feed().await;
        }
    };
    tokio::join!(writer, killer);
    eventually("b caught up after its feed connection was killed", || seen_b.changes_of(d).len() >= 400).await;
    assert_eq!(revs(&seen_b, d), (1..=400).collect::<Vec<_>>(), "every change once, in order");
    // And the feed works on afterwards.
    assert_eq!(a.write(set(d, "k", "\"after\"")).await.expect("write").rev, Rev(401));
    eventually("b saw the next change", || seen_b.changes_of(d).len() == 401).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let url = fresh_database().await;
    let opened = futures_util::future::join_all((0..4).map(|i| {
        let url = url.clone();
        async move { node(&url, &format!("n{i}")).await }
    }))
    .await;
    let admin = admin_connection(&url).await;
    let version: i32 = admin.query_one("SELECT version FROM ddp_schema", &[]).await.expect("version").get(0);
    assert!(version >= 1);
    let nodes: i64 = admin.query_one("SELECT COUNT(*) FROM nodes", &[]).await.expect("nodes").get(0);
    assert_eq!(nodes, 4);
    for (store, _) in &opened {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let url = fresh_database().await;
    let (store, _) = node(&url, "first").await;
    store.close().await;
    admin_connection(&url).await.execute("UPDATE ddp_schema SET version = 999", &[]).await.expect("bump");
    let refused = PgStore::open(PgOptions::new(&url), Arc::new(Recorder::default())).await.err().expect("refused");
    assert!(refused.to_string().contains("newer"), "{refused}");
}
