//! Atomic batches on the device (PROTOCOL.md §11): the SDK takes each batch as one message and
//! applies and persists it whole. A device process is killed (SIGKILL) again and again while
//! batches that keep `ssid`, `password` and `channel` equal stream in; every mirror file it left
//! holds one batch's values, never a mix of two.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddp_device::{Client, Mirror, Source, Update};
use ddp_testkit::TestServer;
use reqwest::Method;
use serde_json::json;

const CHILD: &str = "DDP_ATOMIC_DEVICE";

/// The device process: the SDK with its mirror persisted to a file, until it is killed. Run
/// only as the child of the test below (it is ignored otherwise).
#[tokio::test]
#[ignore = "the device process of the test below, started by it"]
async fn device_process() {
    let Ok(spec) = std::env::var(CHILD) else { return };
    let parts: Vec<&str> = spec.split('|').collect();
    let [url, device, key, file] = parts.as_slice() else { panic!("bad {CHILD}: {spec}") };
    let client = Client::builder(url, device.parse().expect("device id"), key)
        .persist_to(file)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .start()
        .expect("start");
    let mut updates = client.updates();
    while updates.recv().await.is_ok() {}
}

fn start_device(url: &str, device: u64, key: &str, file: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--ignored", "--exact", "device_process", "--nocapture"])
        .env(CHILD, format!("{url}|{device}|{key}|{}", file.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("device process")
}

#[tokio::test]
async fn a_device_killed_while_persisting_keeps_a_whole_batch() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("mirror.json");
    let url = format!("ws://{}", s.addr);
    let store = format!("/devices/{dev}/kv");
    let mut next = 0u64;
    let mut kept_revs = Vec::new();
    for round in 0..6u64 {
        let mut device = start_device(&url, dev, &key, &file);
        // Batches stream in while the device applies and persists them (about once a second).
        let until = Instant::now() + Duration::from_millis(1_100 + 230 * round);
        while Instant::now() < until {
            next += 1;
            let ops = json!({"ops": [
                {"op": "set", "key": "ssid", "value": format!("net-{next}")},
                {"op": "set", "key": "password", "value": format!("net-{next}")},
                {"op": "merge", "key": "channel", "value": {"id": format!("net-{next}")}},
            ]});
            let answer = s.admin(Method::PATCH, &store).json(&ops).send().await.expect("patch");
            assert_eq!(answer.status(), 200);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        device.kill().expect("SIGKILL");
        device.wait().expect("reaped");
        let Ok(bytes) = std::fs::read(&file) else { continue };
        let mirror: Mirror = serde_json::from_slice(&bytes).expect("the mirror file is whole JSON");
        let ssid = mirror.get("ssid").map(|v| v.as_json().to_owned());
        let password = mirror.get("password").map(|v| v.as_json().to_owned());
        let channel = mirror.get("channel").map(|v| v.to_json_value()["id"].to_string());
        assert_eq!(ssid, password, "round {round}: one batch's values, never two");
        assert_eq!(ssid, channel, "round {round}: one batch's values, never two");
        assert_eq!(mirror.rev().0 % 3, 0, "round {round}: the mirror stands at the end of a batch");
        kept_revs.push(mirror.rev().0);
    }
    assert!(kept_revs.len() >= 4, "the device persisted in most rounds: {kept_revs:?}");
    assert!(kept_revs.windows(2).all(|w| w[0] <= w[1]), "and made progress: {kept_revs:?}");

    // And a device that stays up sees batches whole, with an Update::Batch after each.
    let client = Client::builder(&url, dev, &key).start().expect("start");
    let mut updates = client.updates();
    client.ready().await.expect("ready");
    let ops = json!({"ops": [{"op": "set", "key": "ssid", "value": "last"}, {"op": "delete", "key": "password"}]});
    s.admin(Method::PATCH, &store).json(&ops).send().await.expect("patch");
    let mut changed = Vec::new();
    let rev = loop {
        match tokio::time::timeout(Duration::from_secs(5), updates.recv()).await.expect("an update").expect("open") {
            Update::Changed(c) if c.source == Source::Live => changed.push(c.key.as_str().to_owned()),
            Update::Batch { rev } => break rev,
            _ => {}
        }
    };
    assert_eq!((changed, rev.0), (vec!["ssid".to_owned(), "password".to_owned()], next * 3 + 2));
    assert_eq!(
        (client.get("ssid").map(|v| v.as_json().to_owned()), client.get("password")),
        (Some("\"last\"".into()), None)
    );
    client.close().await;
}
