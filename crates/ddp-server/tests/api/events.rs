//! Home events (PROTOCOL.md §6) on `GET /events/websocket`, from every write path.

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, WsClient, WsEnd, WsOpen, expect_error};
use reqwest::{Method, StatusCode};
use rumqttc::QoS;
use serde_json::{Value, json};

/// The next event whose type is not a presence event (those come and go with sessions).
async fn next_event(events: &mut WsClient) -> Value {
    loop {
        let e = events.next_json().await;
        let t = e["eventType"].as_str().unwrap_or_default();
        if t != "_deviceConnected_" && t != "_deviceDisconnected_" {
            return e;
        }
    }
}

fn assert_envelope(e: &Value, home: u64, event_type: &str) {
    assert_eq!((e["homeId"].as_u64(), e["eventType"].as_str()), (Some(home), Some(event_type)), "{e}");
    let ts = e["timestamp"].as_str().expect("timestamp");
    assert!(ddp_protocol::Timestamp::parse(ts).is_some() && ts.len() == 24, "RFC 3339 with milliseconds: {ts}");
}

#[tokio::test]
async fn every_system_event_has_its_exact_fields_from_every_write_path() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let (project_id, project) = s.create_api_key(None, "readWrite").await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let d = format!("/devices/{dev}");

    // REST, admin key: no origin.
    s.put(&d, "a", json!(1.50)).await;
    let e = next_event(&mut events).await;
    assert_envelope(&e, home, "_deviceKVSaved_");
    assert_eq!(e["eventData"], json!({"deviceId": dev, "key": "a", "value": 1.50, "rev": 1}));
    assert!(e.get("originDeviceId").is_none() && e.get("originProjectKeyId").is_none(), "{e}");

    // REST, project key: originProjectKeyId.
    let put = s
        .req(Method::PUT, &format!("{d}/kv/b"), Some(&project))
        .json(&json!({"value": "x"}))
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let e = next_event(&mut events).await;
    assert_eq!((&e["originProjectKeyId"], &e["eventData"]["rev"]), (&json!(project_id), &json!(2)));

    // WebSocket, the device: originDeviceId; a delete.
    let mut ws = s.ws_open(dev, &key, "").await;
    ws.send_json(&json!({"action":"delete","key":"a"})).await;
    let e = next_event(&mut events).await;
    assert_envelope(&e, home, "_deviceKVDeleted_");
    assert_eq!(e["eventData"], json!({"deviceId": dev, "key": "a", "rev": 3}));
    assert_eq!(e["originDeviceId"], dev);

    // MQTT, the device.
    let (mqtt, _) = s.mqtt_device(dev, &key).await;
    mqtt.client
        .publish(format!("{d}/kv"), QoS::AtLeastOnce, false, r#"{"action":"set","key":"m","value":[1,2]}"#)
        .await
        .expect("publish");
    let e = next_event(&mut events).await;
    assert_eq!(
        (&e["eventType"], &e["eventData"]["value"], &e["originDeviceId"]),
        (&json!("_deviceKVSaved_"), &json!([1, 2]), &json!(dev))
    );

    // The home's own store.
    s.put(&format!("/homes/{home}"), "mode", json!("away")).await;
    let e = next_event(&mut events).await;
    assert_envelope(&e, home, "_keyValueSaved_");
    assert_eq!(e["eventData"], json!({"key": "mode", "value": "away", "rev": 1}));
    let del = s.admin(Method::DELETE, &format!("/homes/{home}/kv/mode")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let e = next_event(&mut events).await;
    assert_envelope(&e, home, "_keyValueDeleted_");
    assert_eq!(e["eventData"], json!({"key": "mode", "rev": 2}));
}

#[tokio::test]
async fn numbers_in_events_are_exact() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, _) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let put = s
        .admin(Method::PUT, &format!("/devices/{dev}/kv/n"))
        .body(r#"{"value": [12345678901234567890, 1.10, -0.0]}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let raw = events.next_text().await;
    assert!(raw.contains(r#""value":[12345678901234567890,1.10,-0.0]"#), "{raw}");
}

#[tokio::test]
async fn devices_connecting_and_disconnecting_raise_presence_events() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let one = s.ws_open(dev, &key, "").await;
    let two = s.ws_open(dev, &key, "").await;
    let e = events.next_json().await;
    assert_envelope(&e, home, "_deviceConnected_");
    assert_eq!((&e["eventData"], &e["originDeviceId"]), (&json!({"deviceId": dev}), &json!(dev)));
    one.close().await;
    assert!(events.quiet_for(Duration::from_millis(200)).await, "not while a session remains");
    two.close().await;
    let e = events.next_json().await;
    assert_envelope(&e, home, "_deviceDisconnected_");
    assert_eq!(e["eventData"], json!({"deviceId": dev}));
}

#[tokio::test]
async fn devices_raise_their_own_events_over_rest_and_mqtt() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let body = r#"{"eventType":"doorOpened","eventData":{"door":"front","battery":0.10}}"#;
    let raised = s.req(Method::PUT, &format!("/devices/{dev}/event"), Some(&key)).body(body).send().await.expect("put");
    assert_eq!(raised.status(), StatusCode::NO_CONTENT);
    let raw = events.next_text().await;
    assert!(raw.contains(r#""eventData":{"door":"front","battery":0.10}"#), "eventData is passed on exactly: {raw}");
    let e: Value = serde_json::from_str(&raw).expect("json");
    assert_envelope(&e, home, "doorOpened");
    assert_eq!(e["originDeviceId"], dev);

    let c = ddp_testkit::TestServer::mqtt_connect(s.mqtt_options(dev, &key)).await.expect("mqtt");
    c.client
        .publish(format!("/devices/{dev}/event"), QoS::AtLeastOnce, false, r#"{"eventType":"heartbeat"}"#)
        .await
        .expect("publish");
    let e = next_event(&mut events).await;
    assert_eq!((&e["eventType"], &e["eventData"]), (&json!("heartbeat"), &json!({})));
}

#[tokio::test]
async fn bad_and_reserved_event_types_are_refused() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let (other, _) = s.create_device(Some(home)).await;
    let url = format!("/devices/{dev}/event");
    for (body, status, reason) in [
        (r#"{"eventType":"_deviceKVSaved_","eventData":{}}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"{"eventType":"_custom_"}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"{"eventData":{}}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (r#"{"eventType":"x","eventData":[1]}"#, StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        ("nope", StatusCode::BAD_REQUEST, "INVALID_JSON"),
    ] {
        expect_error(s.req(Method::PUT, &url, Some(&key)).body(body).send().await, status, reason).await;
    }
    let foreign =
        s.req(Method::PUT, &format!("/devices/{other}/event"), Some(&key)).body(r#"{"eventType":"x"}"#).send().await;
    expect_error(foreign, StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
    let (_, read) = s.create_api_key(None, "read").await;
    let read_only = s.req(Method::PUT, &url, Some(&read)).body(r#"{"eventType":"x"}"#).send().await;
    expect_error(read_only, StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
}

#[tokio::test]
async fn listeners_see_only_the_homes_they_may_see() {
    let s = TestServer::start().await;
    let a = s.create_home("A").await;
    let b = s.create_home("B").await;
    let (dev_a, key_a) = s.create_device(Some(a)).await;
    let (dev_b, _) = s.create_device(Some(b)).await;
    let (_, key_for_a) = s.create_api_key(Some(vec![a]), "read").await;
    let mut scoped = s.events_open(&key_for_a, "").await;
    let mut narrowed = s.events_open(ADMIN_KEY, &format!("?homeId={b}")).await;
    let mut both = s.events_open(ADMIN_KEY, &format!("?homeId={a},{b}")).await;
    s.put(&format!("/devices/{dev_b}"), "k", json!("b")).await;
    s.put(&format!("/devices/{dev_a}"), "k", json!("a")).await;
    assert_eq!(next_event(&mut scoped).await["homeId"], a, "home B's event never reached the key for home A");
    assert_eq!(next_event(&mut narrowed).await["homeId"], b);
    assert!(narrowed.quiet_for(Duration::from_millis(200)).await, "?homeId narrows");
    let homes = [next_event(&mut both).await["homeId"].clone(), next_event(&mut both).await["homeId"].clone()];
    assert_eq!(homes, [json!(b), json!(a)]);

    let refused = |open: WsOpen| match open {
        WsOpen::Refused(status, body) => (status, body["reason"].as_str().unwrap_or_default().to_owned()),
        WsOpen::Open(_) => (101, String::new()),
    };
    assert_eq!(refused(s.events(Some(&key_for_a), &format!("?homeId={b}")).await), (403, "PERMISSION_DENIED".into()));
    assert_eq!(refused(s.events(Some(&key_a), "").await), (403, "PERMISSION_DENIED".into()), "devices do not listen");
    assert_eq!(refused(s.events(None, "").await), (401, "UNAUTHENTICATED_CLIENT".into()));
    assert_eq!(refused(s.events(Some(ADMIN_KEY), "?homeId=999999").await), (404, "HOME_NOT_FOUND".into()));
    assert_eq!(refused(s.events(Some(ADMIN_KEY), "?homeId=abc").await), (400, "INVALID_PARAMETER".into()));
    match s.ws_path(&format!("/events/websocket?authToken={key_for_a}"), None).await {
        WsOpen::Open(_) => {}
        WsOpen::Refused(status, body) => panic!("?authToken refused: {status} {body}"),
    }
}

#[tokio::test]
async fn events_arrive_in_rev_order_under_concurrent_writes() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 0).await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let d = format!("/devices/{dev}");
    let rest = (0..40).map(|i| {
        let req = s.admin(Method::PUT, &format!("{d}/kv/k{}", i % 7)).json(&json!({"value": i}));
        async move { req.send().await.expect("put").status() }
    });
    let mut ws = s.ws_open(dev, &key, "").await;
    for i in 0..20 {
        ws.send_json(&json!({"action":"set","key":format!("w{}", i % 3),"value":i})).await;
    }
    assert!(futures_util::future::join_all(rest).await.iter().all(|s| *s == StatusCode::NO_CONTENT));
    let mut revs = Vec::new();
    while revs.len() < 60 {
        revs.push(next_event(&mut events).await["eventData"]["rev"].as_u64().expect("rev"));
    }
    assert_eq!(revs, (1..=60).collect::<Vec<_>>(), "one event per change, in the order raised");
}

#[tokio::test]
async fn a_device_in_no_home_raises_nothing_and_a_moved_device_raises_to_its_new_home() {
    let s = TestServer::start().await;
    let a = s.create_home("A").await;
    let b = s.create_home("B").await;
    let (dev, key) = s.create_device(None).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    let raised = s
        .req(Method::PUT, &format!("/devices/{dev}/event"), Some(&key))
        .body(r#"{"eventType":"x"}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(raised.status(), StatusCode::NO_CONTENT);
    assert!(events.quiet_for(Duration::from_millis(200)).await, "homeless devices raise nothing");
    for home in [a, b] {
        let moved = s
            .admin(Method::PATCH, &format!("/devices/{dev}"))
            .json(&json!({"homeId": home}))
            .send()
            .await
            .expect("move");
        assert_eq!(moved.status(), StatusCode::OK);
        s.put(&format!("/devices/{dev}"), "k", json!(home)).await;
        assert_eq!(next_event(&mut events).await["homeId"], home, "events follow the device at once");
    }
}

#[tokio::test]
async fn a_listener_too_far_behind_is_closed_and_writers_never_wait() {
    let s = TestServer::start_with(|c| c.sessions.event_queue = 4).await;
    let home = s.create_home("H").await;
    let (dev, _) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let big = "x".repeat(60_000);
    for i in 0..400 {
        s.put(&format!("/devices/{dev}"), &format!("k{}", i % 50), json!(format!("{i}{big}"))).await;
    }
    assert_eq!(events.end().await, WsEnd::Closed(4009), "closed with a reason instead of slowing the writes");
}

#[tokio::test]
async fn revoking_a_key_closes_its_event_streams() {
    let s = TestServer::start().await;
    let (id, key) = s.create_api_key(None, "read").await;
    let mut events = s.events_open(&key, "").await;
    let revoke = s.admin(Method::DELETE, &format!("/apiKeys/{id}")).send().await.expect("revoke");
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    assert_eq!(events.end().await, WsEnd::Closed(4003));
}

#[tokio::test]
async fn a_scoped_stream_of_a_deleted_home_is_closed_with_4004() {
    let s = TestServer::start().await;
    let (a, b) = (s.create_home("A").await, s.create_home("B").await);
    let (_, scoped) = s.create_api_key(Some(vec![a, b]), "read").await;
    let mut of_a = s.events_open(&scoped, &format!("?homeId={a}")).await;
    let mut of_b = s.events_open(&scoped, &format!("?homeId={b}")).await;
    let mut admin = s.events_open(ADMIN_KEY, "").await;
    let del = s.admin(Method::DELETE, &format!("/homes/{a}")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    assert_eq!(of_a.end().await, WsEnd::Closed(4004), "the key's view changed");
    assert!(of_b.quiet_for(Duration::from_millis(200)).await, "a stream of another home stays");
    assert!(admin.quiet_for(Duration::from_millis(10)).await, "the admin's stays");
}

#[tokio::test]
async fn modes_app_event_path_serves_the_same_stream() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, _) = s.create_device(Some(home)).await;
    let (_, key) = s.create_api_key(Some(vec![home]), "read").await;
    // MODE's TypeScript app client: the token in the query, no header.
    let mut mode = match s.ws_path(&format!("/userSession/websocket?authToken={key}"), None).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("{status} {body}"),
    };
    let mut ours = s.events_open(&key, "").await;
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    let (a, b) = (next_event(&mut mode).await, next_event(&mut ours).await);
    assert_eq!(a, b, "the same frames");
    assert_eq!(a["eventType"], "_deviceKVSaved_");
    match s.ws_path("/userSession/websocket?authToken=nope", None).await {
        WsOpen::Refused(status, _) => assert_eq!(status, 401),
        WsOpen::Open(_) => panic!("a bad token opened a stream"),
    }
}
