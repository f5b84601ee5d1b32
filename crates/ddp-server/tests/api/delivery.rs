//! Delivery and acknowledgement (PROTOCOL.md §10): `deliveredRev` moved by what the device's own
//! sessions hand over, `appliedRev` by its acks over WebSocket and MQTT, `GET /devices/{id}/sync`
//! and device objects, writes that wait (`?wait=applied|delivered`), `_deviceKVApplied_`, and
//! what is refused.

use std::time::Duration;

use ddp_testkit::raw::{self, read_packet};
use ddp_testkit::{ADMIN_KEY, TestServer, expect_error, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn sync_of(s: &TestServer, token: &str, dev: u64) -> Value {
    expect_json(s.req(Method::GET, &format!("/devices/{dev}/sync"), Some(token)).send().await, StatusCode::OK).await
}

/// Polls the sync endpoint until `check` holds (5 s at most); returns what it saw last.
async fn sync_until(s: &TestServer, dev: u64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Value::Null;
    for _ in 0..250 {
        seen = sync_of(s, ADMIN_KEY, dev).await;
        if check(&seen) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}; last seen {seen}");
}

async fn put_waiting(s: &TestServer, dev: u64, key: &str, value: Value, query: &str) -> reqwest::Response {
    s.admin(Method::PUT, &format!("/devices/{dev}/kv/{key}{query}"))
        .json(&json!({ "value": value }))
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn acks_over_websocket_move_applied_and_the_sync_endpoint_shows_where_the_device_stands() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    let first = sync_until(&s, dev, "the session is connected", |v| v["isConnected"] == true).await;
    assert_eq!(
        first,
        json!({"rev": 0, "deliveredRev": 0, "appliedRev": 0, "appliedTime": null, "isConnected": true}),
        "a new device: nothing delivered beyond its empty store, nothing applied"
    );

    s.put(&format!("/devices/{dev}"), "a", json!(1)).await;
    s.put(&format!("/devices/{dev}"), "b", json!(2)).await;
    assert_eq!(ws.next_json().await["rev"], 1);
    assert_eq!(ws.next_json().await["rev"], 2);
    let delivered = sync_until(&s, dev, "both changes delivered", |v| v["deliveredRev"] == 2).await;
    assert_eq!(
        (delivered["rev"].clone(), delivered["appliedRev"].clone()),
        (json!(2), json!(0)),
        "sent is not applied"
    );

    ws.send_json(&json!({"action": "ack", "rev": 2})).await;
    let applied = sync_until(&s, dev, "the ack recorded", |v| v["appliedRev"] == 2).await;
    assert!(applied["appliedTime"].is_string(), "appliedTime is when the ack came: {applied}");

    // Events: the change events, then _deviceKVApplied_ with the device and its rev.
    let applied_event = loop {
        let e = events.next_json().await;
        if e["eventType"] == "_deviceKVApplied_" {
            break e;
        }
    };
    assert_eq!(applied_event["homeId"], home);
    assert_eq!(applied_event["eventData"], json!({"deviceId": dev, "appliedRev": 2}));
    assert_eq!(applied_event["originDeviceId"], dev);

    // An ack at or below the recorded one changes nothing and is no error; one above the
    // store's rev is refused with an error frame that names no key.
    ws.send_json(&json!({"action": "ack", "rev": 1})).await;
    ws.send_json(&json!({"action": "ack", "rev": 3})).await;
    let refused = ws.next_json().await;
    assert_eq!(refused["action"], "error");
    assert_eq!(refused["reason"], "INVALID_PARAMETER", "{refused}");
    assert!(refused.get("key").is_none(), "{refused}");
    for bad in [json!({"action": "ack"}), json!({"action": "ack", "rev": -1}), json!({"action": "ack", "rev": "2"})] {
        ws.send_json(&bad).await;
        let e = ws.next_json().await;
        assert_eq!((e["action"].clone(), e["reason"].clone()), (json!("error"), json!("INVALID_PARAMETER")), "{bad}");
    }
    let after = sync_of(&s, ADMIN_KEY, dev).await;
    assert_eq!((after["appliedRev"].clone(), after["appliedTime"].clone()), (json!(2), applied["appliedTime"].clone()));
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 2, "acks are not changes: no rev");

    // The same in the device object, for the admin and for the device itself.
    for token in [ADMIN_KEY, key.as_str()] {
        let device =
            expect_json(s.req(Method::GET, &format!("/devices/{dev}"), Some(token)).send().await, StatusCode::OK).await;
        assert_eq!(device["sync"], after, "{device}");
    }
    let listed = expect_json(s.admin(Method::GET, "/devices").send().await, StatusCode::OK).await;
    assert_eq!(listed[0]["sync"]["appliedRev"], 2);
    assert_eq!(sync_of(&s, &key, dev).await["appliedRev"], 2, "the device reads its own");
}

#[tokio::test]
async fn who_may_read_progress_and_who_may_ack() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let other_home = s.create_home("other").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let (other, other_key) = s.create_device(None).await;
    let (_, reader) = s.create_api_key(Some(vec![home]), "read").await;
    let (_, outsider) = s.create_api_key(Some(vec![other_home]), "readWrite").await;
    assert_eq!(sync_of(&s, &reader, dev).await["rev"], 0, "a project key that may read the device");
    let path = format!("/devices/{dev}/sync");
    for (token, status, reason) in [
        (outsider.as_str(), StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        (other_key.as_str(), StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        ("nonsense", StatusCode::UNAUTHORIZED, "UNAUTHENTICATED_CLIENT"),
    ] {
        expect_error(s.req(Method::GET, &path, Some(token)).send().await, status, reason).await;
    }
    expect_error(s.admin(Method::GET, "/devices/999999/sync").send().await, StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND")
        .await;
    let _ = other;

    // An admin watching the device's store: what it is sent is not delivery to the device, and
    // its acks are refused.
    s.put(&format!("/devices/{dev}"), "a", json!(1)).await;
    let mut admin_watch = s.ws_open(dev, ADMIN_KEY, "").await;
    assert_eq!(admin_watch.next_json().await["rev"], 1);
    admin_watch.send_json(&json!({"action": "ack", "rev": 1})).await;
    let refused = admin_watch.next_json().await;
    assert_eq!(refused["reason"], "PERMISSION_DENIED", "{refused}");
    // The device's own session does move it.
    let mut own = s.ws_open(dev, &key, "").await;
    assert_eq!(own.next_json().await["rev"], 1);
    let seen = sync_until(&s, dev, "the reload to the device's own session", |v| v["deliveredRev"] == 1).await;
    assert_eq!(seen["appliedRev"], 0, "the admin's ack changed nothing");
}

#[tokio::test]
async fn mqtt_devices_ack_on_their_kv_topic_and_mqtt5_is_told_0x99_for_an_ack_above_the_store() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let topic = format!("/devices/{dev}/kv");
    s.put(&format!("/devices/{dev}"), "a", json!(1)).await;

    // MQTT 3.1.1 (rumqttc), QoS 0: the reload is delivered, the ack applies.
    let (mqtt, reload) = s.mqtt_device(dev, &key).await;
    assert_eq!(reload["rev"], 1);
    sync_until(&s, dev, "the MQTT reload delivered", |v| v["deliveredRev"] == 1).await;
    mqtt.client
        .publish(topic.clone(), rumqttc::QoS::AtMostOnce, false, r#"{"action":"ack","rev":1}"#)
        .await
        .expect("ack");
    sync_until(&s, dev, "the MQTT ack recorded", |v| v["appliedRev"] == 1).await;
    drop(mqtt);

    // MQTT 5 (raw), QoS 1: above the store's rev is PUBACK 0x99 and changes nothing.
    s.put(&format!("/devices/{dev}"), "b", json!(2)).await;
    let mut stream = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await.expect("tcp");
    stream.write_all(&raw::connect_v5_packet(dev, &key, None)).await.expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0x00));
    stream.write_all(&raw::publish_v5_packet(&topic, r#"{"action":"ack","rev":7}"#, 1)).await.expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("PUBACK");
    assert_eq!((first, body[2]), (0x40, 0x99), "payload format invalid: above the store's rev");
    stream.write_all(&raw::publish_v5_packet(&topic, r#"{"action":"ack","rev":2}"#, 2)).await.expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("PUBACK");
    assert_eq!(first, 0x40);
    assert!(body.len() == 2 || body[2] == 0, "success: {body:?}");
    let seen = sync_of(&s, ADMIN_KEY, dev).await;
    assert_eq!(
        (seen["appliedRev"].clone(), seen["deliveredRev"].clone()),
        (json!(2), json!(1)),
        "an ack may run ahead of what this server delivered (another session, another node), never of the store"
    );
}

#[tokio::test]
async fn writes_wait_for_the_device_to_apply_or_receive_them() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");

    // The device acks what it gets: the write's answer waits for it.
    let acker = tokio::spawn(async move {
        let set = ws.next_json().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send_json(&json!({"action": "ack", "rev": set["rev"]})).await;
        ws
    });
    let started = std::time::Instant::now();
    let resp = put_waiting(&s, dev, "a", json!(1), "?wait=applied&waitTimeout=10").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers().get("etag").and_then(|v| v.to_str().ok()), Some("\"1\""), "the ETag as for any write");
    assert_eq!(resp.json::<Value>().await.expect("json"), json!({"rev": 1, "applied": true, "appliedRev": 1}));
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited for the ack");
    let mut ws = acker.await.expect("acker");

    // No ack within the timeout: applied false, with where the device is.
    let resp = put_waiting(&s, dev, "b", json!(2), "?wait=applied&waitTimeout=0.3").await;
    assert_eq!(resp.json::<Value>().await.expect("json"), json!({"rev": 2, "applied": false, "appliedRev": 1}));
    assert_eq!(ws.next_json().await["rev"], 2);
    // Delivered: as soon as the session has sent it.
    let resp = put_waiting(&s, dev, "c", json!(3), "?wait=delivered").await;
    assert_eq!(resp.json::<Value>().await.expect("json"), json!({"rev": 3, "delivered": true, "deliveredRev": 3}));
    assert_eq!(ws.next_json().await["rev"], 3);
    // DELETE waits the same way; waitTimeout=0 answers at once.
    let resp =
        s.admin(Method::DELETE, &format!("/devices/{dev}/kv/a?wait=applied&waitTimeout=0")).send().await.expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.expect("json"), json!({"rev": 4, "applied": false, "appliedRev": 1}));
    ws.send_json(&json!({"action": "ack", "rev": 4})).await;
    let resp = put_waiting(&s, dev, "z", json!(0), "?wait=applied&waitTimeout=0").await;
    assert_eq!(resp.json::<Value>().await.expect("json")["applied"], false, "rev 5 is not applied yet");

    // Bad waits are refused before anything is written.
    let rev = s.store_rev(&format!("/devices/{dev}")).await;
    for query in [
        "?wait=soon",
        "?wait=applied&waitTimeout=61",
        "?wait=applied&waitTimeout=-1",
        "?wait=applied&waitTimeout=x",
        "?waitTimeout=3",
    ] {
        let resp = put_waiting(&s, dev, "x", json!(9), query).await;
        expect_error(Ok(resp), StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
        let resp = s.admin(Method::DELETE, &format!("/devices/{dev}/kv/b{query}")).send().await;
        expect_error(resp, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    }
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, rev, "nothing was written");
    let home = s.create_home("H").await;
    let resp =
        s.admin(Method::PUT, &format!("/homes/{home}/kv/x?wait=applied")).json(&json!({"value": 1})).send().await;
    expect_error(resp, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    assert_eq!(s.store_rev(&format!("/homes/{home}")).await, 0, "a home has no device to wait for");
}

#[tokio::test]
async fn acks_count_against_the_device_rate() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 2).await;
    let (dev, key) = s.create_device(None).await;
    s.put(&format!("/devices/{dev}"), "a", json!(1)).await;
    let mut ws = s.ws_open(dev, &key, "").await; // one of the burst of four
    assert_eq!(ws.next_json().await["rev"], 1);
    for _ in 0..6 {
        ws.send_json(&json!({"action": "ack", "rev": 1})).await;
    }
    // Three of the burst are left for the acks; the rest are refused like any frame.
    let refused = ws.next_json().await;
    assert_eq!((refused["action"].clone(), refused["reason"].clone()), (json!("error"), json!("RATE_LIMIT_EXCEEDED")));
    assert_eq!(sync_of(&s, ADMIN_KEY, dev).await["appliedRev"], 1, "those within it count");
}

#[tokio::test]
async fn recorded_progress_survives_a_restart() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    s.put(&format!("/devices/{dev}"), "a", json!(1)).await;
    s.put(&format!("/devices/{dev}"), "b", json!(2)).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["rev"], 2);
    ws.send_json(&json!({"action": "ack", "rev": 1})).await;
    let before = sync_until(&s, dev, "the ack recorded", |v| v["appliedRev"] == 1).await;
    ws.close().await;
    let kept = s.stop_keep_data().await;
    let config = kept.config();
    let s = kept.start(config).await;
    let after = sync_of(&s, ADMIN_KEY, dev).await;
    assert_eq!(after["deliveredRev"], 2);
    assert_eq!(after["appliedRev"], 1);
    assert_eq!(after["appliedTime"], before["appliedTime"], "a clean stop records everything, exactly");
}

#[tokio::test]
async fn applied_events_come_at_most_once_a_second_per_device_with_the_latest_value() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    for i in 0..3 {
        s.put(&format!("/devices/{dev}"), &format!("k{i}"), json!(i)).await;
        ws.next_json().await;
    }
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let started = std::time::Instant::now();
    ws.send_json(&json!({"action": "ack", "rev": 1})).await;
    let first = events.next_json().await;
    assert_eq!(
        (first["eventType"].clone(), first["eventData"]["appliedRev"].clone()),
        (json!("_deviceKVApplied_"), json!(1))
    );
    // Two more acks within the second: one event, a second after the first, with the latest.
    for rev in 2..=3 {
        ws.send_json(&json!({"action": "ack", "rev": rev})).await;
        sync_until(&s, dev, "the ack recorded", |v| v["appliedRev"] == rev).await;
    }
    let second = events.next_json().await;
    assert_eq!(second["eventData"]["appliedRev"], 3, "the latest value, not every one: {second}");
    assert!(started.elapsed() >= Duration::from_millis(900), "not within a second of the first");
    assert!(events.quiet_for(Duration::from_millis(1500)).await, "nothing more: rev 2 was never announced alone");
}
