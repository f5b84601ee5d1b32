//! Many writers and many sessions at once, some sessions slowed down on purpose so their
//! mailboxes overflow. Every session must end with exactly the store's final content, see every
//! rev at most once and in increasing order, and never skip a rev after its reload unless a fresh
//! reload covered it.

use std::collections::BTreeMap;
use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, WsClient};
use rand::{RngExt, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};

const KEYS: usize = 12;
const REST_WRITERS: usize = 4;
const WRITES_EACH: usize = 120;

/// A session's mirror, checked message by message.
#[derive(Default)]
struct Mirror {
    items: BTreeMap<String, Value>,
    last: u64,
    reloads: usize,
}

impl Mirror {
    fn apply(&mut self, who: &str, message: &Value) {
        let rev = message["rev"].as_u64().expect("every sync message has a rev");
        match message["action"].as_str() {
            Some("reload") => {
                assert!(rev >= self.last, "{who}: reload at {rev} goes back behind rev {}", self.last);
                self.items = message["items"]
                    .as_array()
                    .expect("items")
                    .iter()
                    .map(|i| (i["key"].as_str().expect("key").to_owned(), i["value"].clone()))
                    .collect();
                self.reloads += 1;
            }
            Some("set") => {
                assert_eq!(rev, self.last + 1, "{who}: after rev {} came rev {rev}", self.last);
                self.items.insert(message["key"].as_str().expect("key").to_owned(), message["value"].clone());
            }
            Some("delete") => {
                assert_eq!(rev, self.last + 1, "{who}: after rev {} came rev {rev}", self.last);
                self.items.remove(message["key"].as_str().expect("key"));
            }
            other => panic!("{who}: unexpected message {other:?}: {message}"),
        }
        self.last = rev;
    }
}

async fn follow(
    name: String,
    mut ws: WsClient,
    pause_every: usize,
    pause: Duration,
    mut stop_at: tokio::sync::watch::Receiver<u64>,
) -> Mirror {
    let mut mirror = Mirror::default();
    let mut seen = 0usize;
    loop {
        let final_rev = *stop_at.borrow_and_update();
        if final_rev > 0 && mirror.last == final_rev {
            return mirror;
        }
        let message = tokio::select! {
            m = ws.next_json_within(Duration::from_secs(60)) => m.unwrap_or_else(|end| panic!("{name} ended: {end:?}")),
            _ = stop_at.changed() => continue,
        };
        mirror.apply(&name, &message);
        seen += 1;
        if pause_every > 0 && seen.is_multiple_of(pause_every) {
            tokio::time::sleep(pause).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_converges_and_never_skips_or_repeats_a_rev() {
    let s = TestServer::start_with(|c| {
        c.sessions.mailbox = 8;
        c.rate_limits.device_per_sec = 0;
    })
    .await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u64);
    let (written_tx, written_rx) = tokio::sync::watch::channel(false);

    // Sessions: two keep up, two are slow, one pauses for a long time once.
    let mut followers = Vec::new();
    for (i, (every, pause)) in [(0, 0), (0, 0), (5, 3), (2, 1), (0, 0)].into_iter().enumerate() {
        let ws = s.ws_open(dev, if i % 2 == 0 { &key } else { ADMIN_KEY }, "").await;
        let pause = Duration::from_millis(pause);
        let name = format!("session {i}");
        if i == 4 {
            // Reads its reload, then stops reading until every REST write is done: megabytes
            // pile up behind it, more than socket buffers and its mailbox hold, so it must lag.
            let stop_rx = stop_rx.clone();
            let mut written = written_rx.clone();
            followers.push(tokio::spawn(async move {
                let mut ws = ws;
                let mut mirror = Mirror::default();
                mirror.apply(&name, &ws.next_json().await);
                written.wait_for(|done| *done).await.expect("the writers finish");
                let mut rest = follow(name.clone(), ws, 0, Duration::ZERO, stop_rx).await;
                rest.reloads += mirror.reloads;
                rest
            }));
            continue;
        }
        followers.push(tokio::spawn(follow(name, ws, every, pause, stop_rx.clone())));
    }

    // Writers: REST with the admin key, and the device over its own session.
    let big = "x".repeat(16 * 1024); // large values fill socket buffers, so slow sessions lag
    let mut writers = Vec::new();
    for w in 0..REST_WRITERS {
        let (client, base, d, big) = (s.client.clone(), s.base.clone(), d.clone(), big.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
            for i in 0..WRITES_EACH {
                let k = rng.random_range(0..KEYS);
                let url = format!("{base}{d}/kv/k{k}");
                let auth = format!("ModeCloud {ADMIN_KEY}");
                let req = if rng.random_bool(0.2) {
                    client.delete(url).header("Authorization", auth)
                } else {
                    client.put(url).header("Authorization", auth).json(&json!({ "value": format!("{w}-{i}-{big}") }))
                };
                let status = req.send().await.expect("write").status().as_u16();
                assert!(status == 204 || status == 404, "write answered {status}");
            }
        }));
    }
    let (mut device_writer, _echoes) = s.ws_open(dev, &key, "").await.drained();
    for i in 0..40 {
        device_writer.send_json(&json!({"action":"set","key":format!("k{}", i % KEYS),"value":i})).await;
    }
    for w in writers {
        w.await.expect("writer");
    }
    written_tx.send(true).expect("session 4 waits");

    // A session applies its frames in order: once the marker is in the store, all 40 are.
    device_writer.send_json(&json!({"action":"set","key":"done","value":true})).await;
    let mut marker_seen = false;
    for _ in 0..500 {
        let marker = s.admin(Method::GET, &format!("{d}/kv/done")).send().await.expect("get");
        if marker.status() == reqwest::StatusCode::OK {
            marker_seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(marker_seen, "the device's frames were not all applied");
    let final_rev = s.store_rev(&d).await;
    let expected: BTreeMap<String, Value> = s
        .items(&d)
        .await
        .into_iter()
        .map(|i| (i["key"].as_str().expect("key").to_owned(), i["value"].clone()))
        .collect();
    stop_tx.send(final_rev).expect("followers listen");

    let mut lagged = 0;
    for (i, f) in followers.into_iter().enumerate() {
        let mirror =
            tokio::time::timeout(Duration::from_secs(60), f).await.expect("session caught up").expect("follower");
        assert_eq!(mirror.last, final_rev, "session {i} ends at the final rev");
        assert_eq!(mirror.items, expected, "session {i} holds exactly the store's final content");
        if mirror.reloads > 1 {
            lagged += 1;
        }
    }
    assert!(lagged >= 1, "no session lagged: the test did not exercise fresh reloads");
    let metrics = s.req(Method::GET, "/metrics", None).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("ddp_lag_reloads_total"), "lag reloads are counted");
}
