//! Two `ddp serve` processes on one PostgreSQL database. Devices hold sessions on node A
//! (WebSocket and MQTT), an app listens to the home's events on node A, and writers write through
//! node B. Node B is SIGKILLed mid-stream; then a new node B writes on while node A's database
//! connections are killed. Every session sees every rev once and in order (or a reload that
//! covers what it missed), the listener hears every change once and in order, and no
//! acknowledged write is lost.
//!
//! Built with the `postgres-tests` feature; needs `DDP_TEST_DATABASE_URL` (`scripts/test`).
#![cfg(feature = "postgres-tests")]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ddp_testkit::{DdpProcess, Recorded, TestServer, WsOpen, fresh_database, mqtt_options, ws_connect};
use serde_json::{Value, json};

const KEY: &str = "cluster-test-admin-key-0123456789";
const DEVICES: usize = 4;

fn node(url: &str, name: &str, dir: &Path) -> DdpProcess {
    let data = dir.join(name);
    DdpProcess::start(Path::new(env!("CARGO_BIN_EXE_ddp")), &data, KEY, &["--database", url, "--node-name", name])
        .expect("ddp serve starts on PostgreSQL")
}

fn addr(base: &str) -> std::net::SocketAddr {
    base.trim_start_matches("http://").parse().expect("node address")
}

async fn admin(client: &reqwest::Client, method: reqwest::Method, url: String, body: Option<Value>) -> Value {
    let mut req = client.request(method, url).header("Authorization", format!("ModeCloud {KEY}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.json().await.unwrap_or(Value::Null)
}

/// What the writers got acknowledged, per device: the highest sequence number and rev.
#[derive(Default)]
struct Acked {
    seq: Vec<AtomicU64>,
    rev: Vec<AtomicU64>,
    total: AtomicU64,
}

/// Writes `n = 1, 2, …` to every device through `base` until stopped or the node dies.
async fn write(base: String, devices: Vec<u64>, acked: Arc<Acked>, stop: Arc<AtomicBool>) {
    let client = reqwest::Client::new();
    let tasks = devices.into_iter().enumerate().map(|(i, dev)| {
        let (client, base, acked, stop) = (client.clone(), base.clone(), acked.clone(), stop.clone());
        async move {
            let mut seq = acked.seq[i].load(Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let resp = client
                    .put(format!("{base}/devices/{dev}/kv/n"))
                    .header("Authorization", format!("ModeCloud {KEY}"))
                    .json(&json!({ "value": seq }))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => {
                        let etag = r.headers()["etag"].to_str().expect("etag").trim_matches('"').to_owned();
                        acked.seq[i].store(seq, Ordering::SeqCst);
                        acked.rev[i].fetch_max(etag.parse().expect("rev"), Ordering::SeqCst);
                        acked.total.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => panic!("write answered {}", r.status()),
                    Err(_) => return, // the node is gone
                }
            }
        }
    });
    futures_util::future::join_all(tasks).await;
}

/// Checks a device session's messages: a reload first, then each change at the next rev, or a
/// reload at or past it. Returns the last rev seen.
fn check_session(name: &str, messages: &[Value]) -> u64 {
    let mut rev: Option<u64> = None;
    for m in messages {
        let r = m["rev"].as_u64().unwrap_or_else(|| panic!("{name}: message without rev: {m}"));
        match (m["action"].as_str(), rev) {
            (Some("reload"), None) => rev = Some(r),
            (Some("reload"), Some(last)) => {
                assert!(r >= last, "{name}: a reload went back from {last} to {r}");
                rev = Some(r);
            }
            (Some("set" | "delete"), Some(last)) => {
                assert_eq!(r, last + 1, "{name}: after rev {last} came {m}");
                rev = Some(r);
            }
            _ => panic!("{name}: unexpected {m} after {rev:?}"),
        }
    }
    rev.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_lose_nothing_when_a_node_or_the_database_connection_dies() {
    let url = fresh_database().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(&url, "node-a", dir.path());
    let mut b = node(&url, "node-b", dir.path());
    let http = reqwest::Client::new();
    use reqwest::Method;

    let home = admin(&http, Method::POST, format!("{}/homes", a.base), Some(json!({ "name": "h" }))).await["id"]
        .as_u64()
        .expect("home");
    let mut devices = Vec::new();
    let mut sessions: Vec<(String, Recorded)> = Vec::new();
    for i in 0..DEVICES {
        let created =
            admin(&http, Method::POST, format!("{}/devices", a.base), Some(json!({ "name": "d", "homeId": home })))
                .await;
        let (dev, key) = (created["id"].as_u64().expect("id"), created["apiKey"].as_str().expect("key").to_owned());
        devices.push(dev);
        // Even devices on WebSocket, odd ones on MQTT, all on node A.
        let session = if i % 2 == 0 {
            match ws_connect(addr(&a.base), &format!("/devices/{dev}/kv"), Some(&key)).await {
                WsOpen::Open(ws) => ws.record(),
                WsOpen::Refused(status, body) => panic!("session refused: {status} {body}"),
            }
        } else {
            let mqtt = TestServer::mqtt_connect(mqtt_options(a.mqtt.parse().expect("mqtt addr"), dev, &key))
                .await
                .expect("mqtt connect");
            mqtt.client.subscribe(format!("/devices/{dev}/kv"), rumqttc::QoS::AtMostOnce).await.expect("subscribe");
            mqtt.record()
        };
        sessions.push((format!("device {dev} ({})", if i % 2 == 0 { "ws" } else { "mqtt" }), session));
    }
    let events = match ws_connect(addr(&a.base), "/events/websocket", Some(KEY)).await {
        WsOpen::Open(ws) => ws.record(),
        WsOpen::Refused(status, body) => panic!("event stream refused: {status} {body}"),
    };
    // Presence is shared: node B sees node A's sessions.
    for &dev in &devices {
        let seen = admin(&http, Method::GET, format!("{}/devices/{dev}", b.base), None).await;
        assert_eq!(seen["isConnected"], true, "node B sees device {dev}'s session on node A");
    }

    // Phase 1: writes through B; B is killed mid-stream.
    let acked = Arc::new(Acked {
        seq: (0..DEVICES).map(|_| AtomicU64::new(0)).collect(),
        rev: (0..DEVICES).map(|_| AtomicU64::new(0)).collect(),
        ..Acked::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let writers = tokio::spawn(write(b.base.clone(), devices.clone(), acked.clone(), stop.clone()));
    while acked.total.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.kill();
    writers.await.expect("writers");
    let after_kill = acked.total.load(Ordering::SeqCst);

    // Phase 2: a new node B writes on while node A's database connections are killed twice.
    let b2 = node(&url, "node-b2", dir.path());
    let writers = tokio::spawn(write(b2.base.clone(), devices.clone(), acked.clone(), stop.clone()));
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    for _ in 0..2 {
        let target = acked.total.load(Ordering::SeqCst) + 150;
        while acked.total.load(Ordering::SeqCst) < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let killed = db
            .query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'node-a%'", &[])
            .await
            .expect("terminate node A's connections");
        assert!(!killed.is_empty(), "node A had database connections to kill");
    }
    let target = acked.total.load(Ordering::SeqCst) + 150;
    while acked.total.load(Ordering::SeqCst) < target {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    writers.await.expect("writers");
    assert!(acked.total.load(Ordering::SeqCst) > after_kill, "the new node B took writes");

    // Every acknowledged write is there (read through node A, which reconnected by itself).
    let mut final_rev = BTreeMap::new();
    for (i, &dev) in devices.iter().enumerate() {
        let resp = http
            .get(format!("{}/devices/{dev}/kv/n", a.base))
            .header("Authorization", format!("ModeCloud {KEY}"))
            .send()
            .await
            .expect("read through node A");
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        let rev = ddp_testkit::etag_of(&resp);
        let item: Value = resp.json().await.expect("item");
        let value = item["value"].as_u64().expect("value");
        assert!(
            value >= acked.seq[i].load(Ordering::SeqCst),
            "device {dev}: acknowledged write {} lost",
            acked.seq[i].load(Ordering::SeqCst)
        );
        assert!(rev >= acked.rev[i].load(Ordering::SeqCst));
        final_rev.insert(dev, rev);
    }

    // Every session and the listener catch up: each change once, in order.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done =
            sessions.iter().zip(&devices).all(|((name, s), dev)| check_session(name, &s.messages()) == final_rev[dev]);
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions did not catch up: {:?}",
            sessions.iter().map(|(n, s)| (n.clone(), check_session(n, &s.messages()))).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (name, s) in &sessions {
        assert!(!s.ended(), "{name}: node A kept the session through its database reconnects");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut per_device: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for e in events.messages().iter().filter(|e| e["eventType"] == "_deviceKVSaved_") {
            per_device
                .entry(e["eventData"]["deviceId"].as_u64().expect("device"))
                .or_default()
                .push(e["eventData"]["rev"].as_u64().expect("rev"));
        }
        let complete = devices.iter().all(|d| per_device.get(d).map(Vec::len) == Some(final_rev[d] as usize));
        if complete {
            for d in &devices {
                assert_eq!(
                    per_device[d],
                    (1..=final_rev[d]).collect::<Vec<_>>(),
                    "device {d}'s events, once each, in order"
                );
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener missed events: {:?}",
            per_device.iter().map(|(d, r)| (*d, r.len(), final_rev[d])).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloads: usize =
        sessions.iter().map(|(_, s)| s.messages().iter().filter(|m| m["action"] == "reload").count() - 1).sum();
    eprintln!(
        "acknowledged {} writes ({after_kill} before node B was killed); final revs {final_rev:?}; {reloads} catch-up reloads",
        acked.total.load(Ordering::SeqCst)
    );
    drop(a);
    drop(b2);
}
