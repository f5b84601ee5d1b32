//! The SDK against a real server, over both transports: first sync, live changes, confirmed
//! writes, refusals, a server restart, a network drop, and offline reads from the persisted mirror.

use std::time::Duration;

use ddp_device::{Client, ErrorKind, Reason, Source, Update};
use ddp_testkit::{TcpProxy, TestServer};
use reqwest::Method;
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Via {
    Ws,
    Mqtt,
}

fn url(s: &TestServer, via: Via) -> String {
    match via {
        Via::Ws => format!("ws://{}", s.addr),
        Via::Mqtt => format!("mqtt://{}", s.mqtt_addr.expect("mqtt")),
    }
}

fn fast(builder: ddp_device::ClientBuilder) -> ddp_device::ClientBuilder {
    builder
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(400))
        .write_timeout(Duration::from_secs(5))
}

async fn ready(client: &Client) {
    tokio::time::timeout(Duration::from_secs(10), client.ready()).await.expect("synced in time").expect("ready");
}

/// Waits until `key` holds `expected` in the mirror.
async fn converges(client: &Client, key: &str, expected: Option<&str>) {
    for _ in 0..500 {
        if client.get(key).map(|v| v.to_string()).as_deref() == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} never became {expected:?}; it is {:?}", client.get(key));
}

async fn sync_write_and_watch(via: Via) {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let put =
        s.admin(Method::PUT, &format!("{d}/kv/targetTemp")).body(r#"{"value": 21.50}"#).send().await.expect("put");
    assert_eq!(put.status(), reqwest::StatusCode::NO_CONTENT);
    s.put(&d, "mode", json!("eco")).await;

    let client = fast(Client::builder(&url(&s, via), dev, &key)).start().expect("start");
    let mut updates = client.updates();
    ready(&client).await;
    assert_eq!(client.get("targetTemp").map(|v| v.to_string()).as_deref(), Some("21.50"), "numbers stay exact");
    assert_eq!(client.get_all().len(), 2);
    assert_eq!(client.rev().0, 2);
    assert!(client.status().connected);

    // A live change from an app.
    s.put(&d, "mode", json!("away")).await;
    let change = loop {
        match tokio::time::timeout(Duration::from_secs(5), updates.recv()).await.expect("update").expect("open") {
            Update::Changed(c) if c.source == Source::Live => break c,
            _ => continue,
        }
    };
    assert_eq!(
        (change.key.as_str(), change.value.map(|v| v.to_string()), change.rev.0),
        ("mode", Some("\"away\"".into()), 3)
    );

    // Writes are confirmed with the server's rev, and land in the mirror and the store.
    let rev = client.set("currentTemp", &19.5).await.expect("set");
    assert_eq!(rev.0, 4);
    assert_eq!(client.get("currentTemp").map(|v| v.to_string()).as_deref(), Some("19.5"));
    let stored = s.items(&d).await;
    assert!(stored.iter().any(|i| i["key"] == "currentTemp" && i["value"] == json!(19.5)));
    assert_eq!(client.delete("mode").await.expect("delete").0, 5);
    assert_eq!(client.get("mode"), None);
    let burst = futures_util::future::join_all((0..10).map(|i| {
        let c = client.clone();
        async move { c.set(&format!("k{i}"), &i).await }
    }))
    .await;
    let mut revs: Vec<u64> = burst.into_iter().map(|r| r.expect("burst write").0).collect();
    revs.sort_unstable();
    assert_eq!(revs, (6..=15).collect::<Vec<_>>(), "concurrent writes from clones each get their own rev");
    client.close().await;
    assert_eq!(client.set("x", &1).await.err().map(|e| e.kind()), Some(ErrorKind::Closed));
}

#[tokio::test]
async fn syncs_writes_and_watches_over_websocket() {
    sync_write_and_watch(Via::Ws).await;
}

#[tokio::test]
async fn syncs_writes_and_watches_over_mqtt() {
    sync_write_and_watch(Via::Mqtt).await;
}

#[tokio::test]
async fn refused_writes_fail_with_the_servers_reason() {
    let s = TestServer::start_with(|c| c.limits.max_value_bytes = 100).await;
    let (dev, key) = s.create_device(None).await;
    let big = "x".repeat(200);
    let ws = fast(Client::builder(&url(&s, Via::Ws), dev, &key)).start().expect("start");
    ready(&ws).await;
    let err = ws.set("k", &big).await.expect_err("too large");
    assert_eq!((err.kind(), err.reason()), (ErrorKind::Refused, Some(Reason::ValueTooLarge)));
    let err = ws.delete("missing").await.expect_err("no such key");
    assert_eq!((err.kind(), err.reason()), (ErrorKind::Refused, Some(Reason::KeyNotFound)));
    let mqtt = fast(Client::builder(&url(&s, Via::Mqtt), dev, &key)).start().expect("start");
    ready(&mqtt).await;
    assert_eq!(mqtt.set("k", &big).await.expect_err("too large").kind(), ErrorKind::Refused, "MQTT 5 PUBACK reason");
    assert_eq!(ws.set("k", &"fine").await.expect("still works").0, 1);
    assert_eq!(Client::builder("ftp://x", dev, &key).start().err().map(|e| e.kind()), Some(ErrorKind::InvalidArgument));
    assert_eq!(Client::builder("ws://x", 0, &key).start().err().map(|e| e.kind()), Some(ErrorKind::InvalidArgument));
}

async fn survives_a_server_restart(via: Via) {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "a", json!(1)).await;
    let client = fast(Client::builder(&url(&s, via), dev, &key)).start().expect("start");
    let mut updates = client.updates();
    ready(&client).await;
    let (http, mqtt) = (s.addr, s.mqtt_addr);
    let kept = s.stop_keep_data().await;
    // While the server is down the mirror still answers.
    assert_eq!(client.get("a").map(|v| v.to_string()).as_deref(), Some("1"));
    let mut config = kept.config();
    config.http_listen = http;
    config.mqtt.listen = mqtt;
    let s = kept.start(config).await;
    s.put(&d, "a", json!(2)).await;
    converges(&client, "a", Some("2")).await;
    // Over WebSocket the client resumed from its rev: the missed change came live, not in a reload.
    let mut saw = Vec::new();
    while let Ok(Ok(u)) = tokio::time::timeout(Duration::from_millis(200), updates.recv()).await {
        if let Update::Changed(c) = u
            && c.key.as_str() == "a"
            && c.rev.0 == 2
        {
            saw.push(c.source);
        }
    }
    match via {
        Via::Ws => assert_eq!(saw, vec![Source::Live], "resumed over WebSocket"),
        // MQTT has no resume: a reload if the client reconnected after the write, else live.
        Via::Mqtt => assert_eq!(saw.len(), 1, "rev 2 exactly once over MQTT: {saw:?}"),
    }
    assert_eq!(client.set("b", &true).await.expect("write after restart").0, 3);
}

#[tokio::test]
async fn survives_a_server_restart_over_websocket() {
    survives_a_server_restart(Via::Ws).await;
}

#[tokio::test]
async fn survives_a_server_restart_over_mqtt() {
    survives_a_server_restart(Via::Mqtt).await;
}

async fn survives_a_network_drop(via: Via) {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let target = match via {
        Via::Ws => s.addr,
        Via::Mqtt => s.mqtt_addr.expect("mqtt"),
    };
    let proxy = TcpProxy::start(target).await;
    let scheme = match via {
        Via::Ws => "ws",
        Via::Mqtt => "mqtt",
    };
    let client = fast(Client::builder(&format!("{scheme}://{}", proxy.addr), dev, &key)).start().expect("start");
    let mut updates = client.updates();
    ready(&client).await;
    for round in 0..3 {
        proxy.cut();
        s.put(&d, "k", json!(round)).await;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), updates.recv()).await.expect("updates").expect("open") {
                Update::Disconnected => break,
                _ => continue,
            }
        }
        converges(&client, "k", Some(&round.to_string())).await;
    }
    assert_eq!(client.set("after", &"drops").await.expect("write after drops").0, 4);
    assert_eq!(s.store_rev(&d).await, 4);
}

#[tokio::test]
async fn survives_a_network_drop_over_websocket() {
    survives_a_network_drop(Via::Ws).await;
}

#[tokio::test]
async fn survives_a_network_drop_over_mqtt() {
    survives_a_network_drop(Via::Mqtt).await;
}

#[tokio::test]
async fn writes_made_offline_go_out_on_reconnect() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let proxy = TcpProxy::start(s.addr).await;
    let client = fast(Client::builder(&format!("ws://{}", proxy.addr), dev, &key))
        .reconnect_backoff(Duration::from_millis(300), Duration::from_millis(300))
        .start()
        .expect("start");
    let mut updates = client.updates();
    ready(&client).await;
    proxy.cut();
    // Once the client knows it is offline, a write waits for the next session.
    loop {
        if let Update::Disconnected =
            tokio::time::timeout(Duration::from_secs(10), updates.recv()).await.expect("in time").expect("open")
        {
            break;
        }
    }
    assert!(!client.status().connected);
    let write = tokio::spawn({
        let client = client.clone();
        async move { client.set("queued", &42).await }
    });
    assert_eq!(write.await.expect("task").expect("sent after reconnecting").0, 1);
}

#[tokio::test]
async fn reads_work_offline_from_the_persisted_mirror() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    s.put(&format!("/devices/{dev}"), "config", json!({"interval": 30})).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mirror.json");
    let client = fast(Client::builder(&url(&s, Via::Ws), dev, &key)).persist_to(&file).start().expect("start");
    ready(&client).await;
    client.set("boot", &1).await.expect("set");
    client.close().await;
    s.stop().await;

    // A restart with no server to talk to: the last known configuration is there at once.
    let offline = fast(Client::builder("ws://127.0.0.1:9", dev, &key)).persist_to(&file).start().expect("start");
    assert_eq!(offline.get("config").map(|v| v.to_string()).as_deref(), Some(r#"{"interval":30}"#));
    assert_eq!(offline.get("boot").map(|v| v.to_string()).as_deref(), Some("1"));
    assert_eq!(offline.rev().0, 2);
    let status = offline.status();
    assert!(!status.connected && !status.synced);
    std::fs::write(&file, "not json").expect("corrupt");
    let corrupt = Client::builder("ws://127.0.0.1:9", dev, &key).persist_to(&file).start();
    assert_eq!(corrupt.err().map(|e| e.kind()), Some(ErrorKind::Storage));
}

#[tokio::test]
async fn mqtts_with_a_private_ca() {
    let (s, ca_pem) = TestServer::start_with_mqtt_tls(&["localhost"]).await;
    let (dev, key) = s.create_device(None).await;
    let port = s.mqtt_tls_addr.expect("tls").port();
    let client = fast(Client::builder(&format!("mqtts://localhost:{port}"), dev, &key))
        .tls_ca_pem(ca_pem)
        .start()
        .expect("start");
    ready(&client).await;
    assert_eq!(client.set("secure", &true).await.expect("set").0, 1);
}

async fn a_large_store_syncs_and_one_too_large_for_the_device_is_reported(via: Via) {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    for i in 0..3 {
        s.put(&d, &format!("blob{i}"), json!("x".repeat(20_000))).await;
    }
    // A 60 KB reload: more than the MQTT library's own 10 KiB default.
    let client = fast(Client::builder(&url(&s, via), dev, &key)).start().expect("start");
    ready(&client).await;
    assert_eq!(client.get_all().len(), 3);
    client.close().await;
    // A device that takes at most 16 KiB is never sent the 60 KB reload; it says why.
    let small = fast(Client::builder(&url(&s, via), dev, &key)).max_message_bytes(16 * 1024).start().expect("start");
    let mut why = None;
    for _ in 0..200 {
        if let Some(e) = small.status().last_error {
            why = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = why.expect("an error is reported");
    assert!(!small.status().synced, "{why}");
    let expected = match via {
        Via::Mqtt => "PacketTooLarge", // the server's DISCONNECT 0x95
        Via::Ws => "Message too long", // the client's own limit
    };
    assert!(why.contains(expected), "{why}");
    small.close().await;
}

#[tokio::test]
async fn a_large_store_syncs_and_one_too_large_is_reported_over_mqtt() {
    a_large_store_syncs_and_one_too_large_for_the_device_is_reported(Via::Mqtt).await;
}

#[tokio::test]
async fn a_large_store_syncs_and_one_too_large_is_reported_over_websocket() {
    a_large_store_syncs_and_one_too_large_for_the_device_is_reported(Via::Ws).await;
}

async fn commands_reach_the_application(via: Via) {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let client = fast(Client::builder(&url(&s, via), dev, &key)).start().expect("start");
    let mut commands = client.commands();
    ready(&client).await;
    for (i, body) in [r#"{"action":"reboot","parameters":{"delay":1.50}}"#, r#"{"action":"blink"}"#].iter().enumerate()
    {
        let resp = s.admin(Method::PUT, &format!("/devices/{dev}/command")).body(*body).send().await.expect("send");
        assert_eq!(resp.status(), reqwest::StatusCode::NO_CONTENT, "command {i}");
    }
    let first = tokio::time::timeout(Duration::from_secs(5), commands.recv()).await.expect("in time").expect("open");
    assert_eq!((first.action.as_str(), first.parameters.as_json()), ("reboot", r#"{"delay":1.50}"#), "exact");
    let second = tokio::time::timeout(Duration::from_secs(5), commands.recv()).await.expect("in time").expect("open");
    assert_eq!((second.action.as_str(), second.parameters.as_json()), ("blink", "{}"));
    // Commands do not disturb the mirror.
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    converges(&client, "k", Some("1")).await;
    assert_eq!(client.get_all().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn commands_reach_the_application_over_mqtt() {
    commands_reach_the_application(Via::Mqtt).await;
}

#[tokio::test]
async fn commands_reach_the_application_over_websocket() {
    commands_reach_the_application(Via::Ws).await;
}

/// `PUT …?wait=applied` of `value` to `key`; the answer's body.
async fn put_and_wait(
    s: &TestServer,
    dev: u64,
    key: &str,
    value: serde_json::Value,
    timeout: &str,
) -> serde_json::Value {
    let resp = s
        .admin(Method::PUT, &format!("/devices/{dev}/kv/{key}?wait=applied&waitTimeout={timeout}"))
        .json(&json!({ "value": value }))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    resp.json().await.expect("json")
}

async fn acknowledges_what_it_applied(via: Via) {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    s.put(&format!("/devices/{dev}"), "mode", json!("eco")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mirror.json");
    let client = fast(Client::builder(&url(&s, via), dev, &key)).persist_to(&file).start().expect("start");
    ready(&client).await;
    // A write waits for the device: the SDK applies it, saves its mirror, then acks.
    let answer = put_and_wait(&s, dev, "mode", json!("away"), "10").await;
    assert_eq!(answer, json!({"rev": 2, "applied": true, "appliedRev": 2}));
    let saved = std::fs::read_to_string(&file).expect("mirror file");
    assert!(saved.contains("away"), "acknowledged only once persisted: {saved}");
    // A burst is acknowledged coalesced, up to its last rev.
    for i in 0..20 {
        s.put(&format!("/devices/{dev}"), &format!("k{i}"), json!(i)).await;
    }
    let answer = put_and_wait(&s, dev, "last", json!(true), "10").await;
    assert_eq!(answer["applied"], true, "{answer}");
    assert_eq!(answer["appliedRev"], 23);
    let sync = s.admin(Method::GET, &format!("/devices/{dev}/sync")).send().await.expect("sync");
    let sync: serde_json::Value = sync.json().await.expect("json");
    assert_eq!((sync["deliveredRev"].clone(), sync["appliedRev"].clone()), (json!(23), json!(23)));
    client.close().await;
}

#[tokio::test]
async fn acknowledges_what_it_applied_over_websocket() {
    acknowledges_what_it_applied(Via::Ws).await;
}

#[tokio::test]
async fn acknowledges_what_it_applied_over_mqtt() {
    acknowledges_what_it_applied(Via::Mqtt).await;
}

#[tokio::test]
async fn acknowledgements_can_be_turned_off() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let client = fast(Client::builder(&url(&s, Via::Ws), dev, &key)).acknowledge(false).start().expect("start");
    ready(&client).await;
    let answer = put_and_wait(&s, dev, "mode", json!("away"), "0.5").await;
    assert_eq!(answer, json!({"rev": 1, "applied": false, "appliedRev": 0}));
    converges(&client, "mode", Some("\"away\"")).await;
    let sync = s.admin(Method::GET, &format!("/devices/{dev}/sync")).send().await.expect("sync");
    let sync: serde_json::Value = sync.json().await.expect("json");
    assert_eq!(sync["deliveredRev"], 1, "delivered all the same");
    client.close().await;
}
