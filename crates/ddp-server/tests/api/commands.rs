//! Commands (PROTOCOL.md §8): `PUT /devices/{id}/command` to every live session of the device
//! that listens — MQTT `/devices/{id}/command`, MODE's command socket, a sync session with
//! `?commands=1` — and the answers to bad requests.

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, WsOpen, expect_error};
use reqwest::{Method, StatusCode};
use rumqttc::{Packet, QoS};
use serde_json::{Value, json};

async fn send(s: &TestServer, token: &str, device: u64, body: &str) -> reqwest::Response {
    s.req(Method::PUT, &format!("/devices/{device}/command"), Some(token))
        .body(body.to_owned())
        .send()
        .await
        .expect("sent")
}

async fn sent(s: &TestServer, device: u64, body: &str) {
    let resp = send(s, ADMIN_KEY, device, body).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{:?}", resp.text().await);
}

/// The next PUBLISH on `topic`, as text.
async fn next_on(c: &mut ddp_testkit::MqttClient, topic: &str) -> String {
    loop {
        match c.next_packet().await.expect("connected") {
            Packet::Publish(p) if p.topic == topic => return String::from_utf8(p.payload.to_vec()).expect("utf-8"),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn a_command_reaches_every_session_that_listens_exactly_and_in_order() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    // The MODE SDK's way: both topics in one SUBSCRIBE.
    let mut mqtt = TestServer::mqtt_connect(s.mqtt_options(dev, &key)).await.expect("connect");
    let (kv, command) = (format!("/devices/{dev}/kv"), format!("/devices/{dev}/command"));
    mqtt.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new(kv.clone(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new(command.clone(), QoS::AtMostOnce),
        ])
        .await
        .expect("subscribe");
    assert!(next_on(&mut mqtt, &kv).await.contains("reload"));
    let mut socket = match s.ws_path(&format!("/devices/{dev}/command"), Some(&key)).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("command socket refused: {status} {body}"),
    };
    let mut sync = s.ws_open(dev, &key, "?commands=1").await;
    assert_eq!(sync.next_json().await["action"], "reload");

    sent(&s, dev, r#"{"action":"reboot","parameters":{"delay":1.50,"big":12345678901234567890}}"#).await;
    let exact = r#"{"action":"reboot","parameters":{"delay":1.50,"big":12345678901234567890}}"#;
    assert_eq!(next_on(&mut mqtt, &command).await, exact, "MQTT: exactly {{action, parameters}}, numbers as sent");
    assert_eq!(socket.next_text().await, exact, "the command socket: the same frame");
    let framed = sync.next_text().await;
    assert_eq!(framed, format!(r#"{{"action":"command","command":{exact}}}"#), "the sync session: framed");

    sent(&s, dev, r#"{"action":"blink"}"#).await;
    assert_eq!(
        next_on(&mut mqtt, &command).await,
        r#"{"action":"blink","parameters":{}}"#,
        "parameters {{}} when absent"
    );
    for i in 0..20 {
        sent(&s, dev, &format!(r#"{{"action":"step","parameters":{{"i":{i}}}}}"#)).await;
    }
    let mut order = Vec::new();
    while order.len() < 20 {
        let text = socket.next_text().await;
        let v: Value = serde_json::from_str(&text).expect("json");
        if v["action"] == "step" {
            order.push(v["parameters"]["i"].as_u64().expect("i"));
        }
    }
    assert_eq!(order, (0..20).collect::<Vec<_>>(), "in the order sent");

    // Unsubscribed, an MQTT connection takes no more commands; the others go on.
    mqtt.client.unsubscribe(command.clone()).await.expect("unsubscribe");
    while !matches!(mqtt.next_packet().await, Ok(Packet::UnsubAck(_))) {}
    sent(&s, dev, r#"{"action":"after"}"#).await;
    let text = socket.next_text().await;
    assert!(text.contains("after"), "{text}");
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    assert!(next_on(&mut mqtt, &kv).await.contains(r#""key":"k""#), "the next thing on MQTT is the change, no command");
}

#[tokio::test]
async fn a_device_without_a_live_session_is_offline_and_the_command_socket_counts_as_one() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    expect_error(Ok(send(&s, ADMIN_KEY, dev, r#"{"action":"x"}"#).await), StatusCode::CONFLICT, "DEVICE_OFFLINE").await;
    let _watcher = s.ws_open(dev, ADMIN_KEY, "").await; // an app watching is not the device
    expect_error(Ok(send(&s, ADMIN_KEY, dev, r#"{"action":"x"}"#).await), StatusCode::CONFLICT, "DEVICE_OFFLINE").await;
    let socket = match s.ws_path(&format!("/devices/{dev}/command"), Some(&key)).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("{status} {body}"),
    };
    let device =
        ddp_testkit::expect_json(s.admin(Method::GET, &format!("/devices/{dev}")).send().await, StatusCode::OK).await;
    assert_eq!(device["isConnected"], true, "the command socket is a live session of the device");
    sent(&s, dev, r#"{"action":"x"}"#).await;
    socket.close().await;
    for _ in 0..100 {
        if send(&s, ADMIN_KEY, dev, r#"{"action":"x"}"#).await.status() == StatusCode::CONFLICT {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the device stayed online after its last session closed");
}

#[tokio::test]
async fn bad_commands_and_callers_get_the_contracts_errors() {
    let s = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let home = s.create_home("H").await;
    let other_home = s.create_home("O").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let (other, other_key) = s.create_device(Some(other_home)).await;
    let _online = s.ws_open(dev, &key, "").await;
    for (body, status, reason) in [
        (r#"{"parameters":{}}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"{"action":""}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"{"action":5}"#, StatusCode::BAD_REQUEST, "INVALID_JSON"),
        (r#"{"action":"x","parameters":[1]}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"{"action":"x","parameters":"on"}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"["x"]"#, StatusCode::BAD_REQUEST, "INVALID_JSON"),
        ("not json", StatusCode::BAD_REQUEST, "INVALID_JSON"),
    ] {
        expect_error(Ok(send(&s, ADMIN_KEY, dev, body).await), status, reason).await;
    }
    let long = format!(r#"{{"action":"{}"}}"#, "a".repeat(256));
    expect_error(Ok(send(&s, ADMIN_KEY, dev, &long).await), StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    let big = format!(r#"{{"action":"x","parameters":{{"p":"{}"}}}}"#, "x".repeat(2000));
    expect_error(Ok(send(&s, ADMIN_KEY, dev, &big).await), StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
    // Who may send: the admin and read-write project keys that see the device; never a device.
    let (_, read) = s.create_api_key(None, "read").await;
    let (_, write) = s.create_api_key(None, "readWrite").await;
    let (_, scoped_other) = s.create_api_key(Some(vec![other_home]), "readWrite").await;
    let ok = r#"{"action":"x"}"#;
    expect_error(Ok(send(&s, &key, dev, ok).await), StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    expect_error(Ok(send(&s, &other_key, dev, ok).await), StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    expect_error(Ok(send(&s, &read, dev, ok).await), StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    expect_error(Ok(send(&s, &scoped_other, dev, ok).await), StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    assert_eq!(send(&s, &write, dev, ok).await.status(), StatusCode::NO_CONTENT);
    expect_error(Ok(send(&s, ADMIN_KEY, 999_999, ok).await), StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND").await;
    // A device's command socket is its own: another device's key, an app's key, are refused.
    for token in [other_key.as_str(), ADMIN_KEY, write.as_str()] {
        match s.ws_path(&format!("/devices/{dev}/command"), Some(token)).await {
            WsOpen::Refused(status, body) => assert_eq!((status, &body["reason"]), (403, &json!("PERMISSION_DENIED"))),
            WsOpen::Open(_) => panic!("another key opened the device's command socket"),
        }
    }
    // ?commands=1 is for the device's own session.
    match s.ws(dev, ADMIN_KEY, "?commands=1").await {
        WsOpen::Refused(status, body) => assert_eq!((status, &body["reason"]), (400, &json!("INVALID_PARAMETER"))),
        WsOpen::Open(_) => panic!("an admin watch took the device's commands"),
    }
    let _ = other;
}

#[tokio::test]
async fn a_command_socket_never_sees_another_devices_commands() {
    let s = TestServer::start().await;
    let (a, a_key) = s.create_device(None).await;
    let (b, b_key) = s.create_device(None).await;
    let mut socket_a = match s.ws_path(&format!("/devices/{a}/command"), Some(&a_key)).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("{status} {body}"),
    };
    let mut socket_b = match s.ws_path(&format!("/devices/{b}/command?authToken={b_key}"), None).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("?authToken= is accepted too: {status} {body}"),
    };
    sent(&s, b, r#"{"action":"for-b"}"#).await;
    sent(&s, a, r#"{"action":"for-a"}"#).await;
    assert_eq!(socket_b.next_text().await, r#"{"action":"for-b","parameters":{}}"#);
    assert_eq!(socket_a.next_text().await, r#"{"action":"for-a","parameters":{}}"#, "a never got b's command");
    assert!(socket_a.quiet_for(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn commands_are_rate_limited_like_writes() {
    let s = TestServer::start_with(|c| c.rate_limits.project_per_sec = 1).await;
    let (dev, key) = s.create_device(None).await;
    let _online = s.ws_open(dev, &key, "").await;
    let (_, app) = s.create_api_key(None, "readWrite").await;
    for _ in 0..2 {
        assert_eq!(send(&s, &app, dev, r#"{"action":"x"}"#).await.status(), StatusCode::NO_CONTENT, "the burst");
    }
    let refused = send(&s, &app, dev, r#"{"action":"x"}"#).await;
    assert!(refused.headers().contains_key("retry-after"));
    expect_error(Ok(refused), StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED").await;
}
