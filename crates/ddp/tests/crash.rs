//! Durability under SIGKILL: clients write concurrently while the `ddp serve` process is killed at
//! a random moment. After each restart every acknowledged write is there (with its value or a
//! later one), the store's rev is at least the number of acknowledged writes, and new writes get
//! revs above every rev handed out before: no rev is ever reused.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ddp_testkit::DdpProcess;
use rand::RngExt;
use serde_json::json;

const KEY: &str = "crash-test-admin-key-0123456789";
const WRITERS: usize = 24;
const ROUNDS: usize = 4;

/// Starts `ddp serve` on free loopback ports with its data in `data_dir`.
fn start(data_dir: &Path) -> DdpProcess {
    DdpProcess::start(Path::new(env!("CARGO_BIN_EXE_ddp")), data_dir, KEY, &[]).expect("ddp serve starts")
}

#[derive(Default)]
struct Ledger {
    /// Per writer: the last sequence number acknowledged.
    last_acked: Vec<AtomicU64>,
    /// Acknowledged writes over all rounds.
    acked: AtomicU64,
    /// The highest rev any acknowledgement carried.
    max_rev: AtomicU64,
}

async fn write_until_killed(
    client: reqwest::Client,
    url: String,
    writer: usize,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut seq = ledger.last_acked[writer].load(Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let resp = client
            .put(format!("{url}/kv/w{writer}"))
            .header("Authorization", format!("ModeCloud {KEY}"))
            .json(&json!({ "value": { "seq": seq, "pad": "x".repeat(64) } }))
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => {
                let rev: u64 = r.headers()["etag"].to_str().expect("etag").trim_matches('"').parse().expect("rev");
                ledger.last_acked[writer].store(seq, Ordering::SeqCst);
                ledger.acked.fetch_add(1, Ordering::SeqCst);
                ledger.max_rev.fetch_max(rev, Ordering::SeqCst);
            }
            Ok(r) => panic!("unexpected answer {} while the server was up", r.status()),
            Err(_) => return, // killed
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let client = reqwest::Client::new();
    let ledger =
        Arc::new(Ledger { last_acked: (0..WRITERS).map(|_| AtomicU64::new(0)).collect(), ..Ledger::default() });

    let mut server = start(&data);
    let created: serde_json::Value = client
        .post(format!("{}/devices", server.base))
        .header("Authorization", format!("ModeCloud {KEY}"))
        .json(&json!({ "name": "crash-test" }))
        .send()
        .await
        .expect("create device")
        .json()
        .await
        .expect("json");
    let device = created["id"].as_u64().expect("device id");

    for round in 0..ROUNDS {
        let url = format!("{}/devices/{device}", server.base);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(write_until_killed(client.clone(), url.clone(), w, ledger.clone(), stop.clone())))
            .collect();
        let delay = rand::rng().random_range(150..700);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.expect("writer");
        }
        let acked_so_far = ledger.acked.load(Ordering::SeqCst);
        assert!(acked_so_far > 0, "round {round}: no write was acknowledged before the kill");
        eprintln!("round {round}: killed after {delay} ms; {acked_so_far} writes acknowledged so far");

        server = start(&data);
        let url = format!("{}/devices/{device}", server.base);
        let list = client
            .get(format!("{url}/kv"))
            .header("Authorization", format!("ModeCloud {KEY}"))
            .send()
            .await
            .expect("list");
        let rev: u64 = list.headers()["etag"].to_str().expect("etag").trim_matches('"').parse().expect("rev");
        let items: Vec<serde_json::Value> = list.json().await.expect("items");
        for w in 0..WRITERS {
            let acked = ledger.last_acked[w].load(Ordering::SeqCst);
            if acked == 0 {
                continue;
            }
            let stored = items
                .iter()
                .find(|i| i["key"] == format!("w{w}"))
                .unwrap_or_else(|| panic!("round {round}: acknowledged key w{w} is missing"))["value"]["seq"]
                .as_u64()
                .expect("seq");
            assert!(stored >= acked, "round {round}: w{w} holds seq {stored}, below the acknowledged {acked}");
        }
        assert!(rev >= acked_so_far, "round {round}: rev {rev} is below the {acked_so_far} acknowledged writes");
        let max_rev = ledger.max_rev.load(Ordering::SeqCst);
        assert!(rev >= max_rev, "round {round}: rev {rev} went back below the acknowledged rev {max_rev}");

        let probe = client
            .put(format!("{url}/kv/probe"))
            .header("Authorization", format!("ModeCloud {KEY}"))
            .json(&json!({ "value": round }))
            .send()
            .await
            .expect("probe");
        let probe_rev: u64 = probe.headers()["etag"].to_str().expect("etag").trim_matches('"').parse().expect("rev");
        assert!(
            probe_rev > max_rev,
            "round {round}: rev {probe_rev} reuses a rev handed out before the crash ({max_rev})"
        );
        ledger.acked.fetch_add(1, Ordering::SeqCst);
        ledger.max_rev.fetch_max(probe_rev, Ordering::SeqCst);
    }
    drop(server);
}
