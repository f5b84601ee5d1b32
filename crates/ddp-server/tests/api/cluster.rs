//! Two servers on one PostgreSQL database, as two nodes behind a load balancer would be: what a
//! client does on one node holds on the other (feature `postgres-tests`).

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, WsEnd, WsOpen, expect_json, fresh_database};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn two_nodes() -> (TestServer, TestServer) {
    let url = fresh_database().await;
    let a = TestServer::start_with(|c| {
        c.database = Some(url.clone());
        c.node_name = "api-a".into();
    })
    .await;
    let b = TestServer::start_with(|c| {
        c.database = Some(url.clone());
        c.node_name = "api-b".into();
    })
    .await;
    (a, b)
}

#[tokio::test]
async fn the_session_cap_and_presence_hold_across_nodes() {
    let (a, b) = two_nodes().await;
    let home = a.create_home("H").await;
    let (dev, key) = a.create_device(Some(home)).await;
    let mut events_on_b = b.events_open(ADMIN_KEY, "").await;
    let mut sessions = Vec::new();
    for node in [&a, &b, &a, &b, &a] {
        let mut s = node.ws_open(dev, &key, "").await;
        s.next_json().await;
        sessions.push(s);
    }
    let e = events_on_b.next_json().await;
    assert_eq!(e["eventType"], "_deviceConnected_", "node B hears node A's presence event");
    // The sixth session is refused, on either node: five are live across both.
    match b.ws(dev, &key, "").await {
        WsOpen::Refused(status, body) => {
            assert_eq!((status, &body["reason"]), (429, &json!("TOO_MANY_CONNECTIONS")), "{body}");
        }
        WsOpen::Open(_) => panic!("a sixth session was admitted"),
    }
    let seen = expect_json(b.admin(Method::GET, &format!("/devices/{dev}")).send().await, StatusCode::OK).await;
    assert_eq!(seen["isConnected"], true);
    for s in sessions {
        s.close().await;
    }
    let e = events_on_b.next_json().await;
    assert_eq!(e["eventType"], "_deviceDisconnected_", "once, after the last session on any node");
    let seen = expect_json(a.admin(Method::GET, &format!("/devices/{dev}")).send().await, StatusCode::OK).await;
    assert_eq!(seen["isConnected"], false);
    assert!(seen["lastDisconnectTime"].is_number() || seen["lastDisconnectTime"].is_string());
}

#[tokio::test]
async fn changes_events_and_revocations_reach_the_other_node() {
    let (a, b) = two_nodes().await;
    let home = a.create_home("H").await;
    let (dev, key) = a.create_device(Some(home)).await;
    let mut device_on_a = a.ws_open(dev, &key, "").await;
    assert_eq!(device_on_a.next_json().await["action"], "reload");
    let mut events_on_a = a.events_open(ADMIN_KEY, "").await;

    // A write through B reaches the device's session on A, and A's event listener.
    assert_eq!(b.put(&format!("/devices/{dev}"), "k", json!(1.50)).await, 1);
    let change = device_on_a.next_json().await;
    assert_eq!((&change["action"], &change["rev"]), (&json!("set"), &json!(1)));
    let mut saved = events_on_a.next_json().await;
    while saved["eventType"] == "_deviceConnected_" {
        saved = events_on_a.next_json().await;
    }
    assert_eq!(saved["eventType"], "_deviceKVSaved_");
    // A device event raised through B is heard on A.
    let raised = b
        .req(Method::PUT, &format!("/devices/{dev}/event"), Some(&key))
        .body(r#"{"eventType":"doorOpened"}"#)
        .send()
        .await
        .expect("raise");
    assert_eq!(raised.status(), StatusCode::NO_CONTENT);
    assert_eq!(events_on_a.next_json().await["eventType"], "doorOpened");

    // Rotating the key on B ends the old key's session on A and the old key stops working on A.
    let rotated = b.admin(Method::POST, &format!("/devices/{dev}/apiKey")).send().await.expect("rotate");
    assert_eq!(rotated.status(), StatusCode::OK);
    assert_eq!(device_on_a.end().await, WsEnd::Closed(4001));
    let mut refused = false;
    for _ in 0..100 {
        let r = a.req(Method::GET, &format!("/devices/{dev}/kv"), Some(&key)).send().await.expect("get");
        if r.status() == StatusCode::UNAUTHORIZED {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "node A refuses the rotated key");
}

#[tokio::test]
async fn nodes_share_one_generated_admin_key() {
    let url = fresh_database().await;
    let dir = tempfile::tempdir().expect("dir");
    let first = ddp_server::Server::bind({
        let mut c = TestServer::config(&dir.path().join("a"));
        c.admin_key = None;
        c.database = Some(url.clone());
        c
    })
    .await
    .expect("first node");
    let key = first.admin_key().expect("the first node generated the key").to_owned();
    assert!(first.admin_key_created().is_some());
    let b = TestServer::start_with(|c| {
        c.admin_key = None;
        c.database = Some(url.clone());
    })
    .await;
    let homes = b.req(Method::GET, "/homes", Some(&key)).send().await.expect("homes");
    assert_eq!(homes.status(), StatusCode::OK, "a later node accepts the first node's key");
    drop(first);
}

#[tokio::test]
async fn a_revocation_on_one_node_closes_every_kind_of_session_on_the_other() {
    let (a, b) = two_nodes().await;
    let home = a.create_home("H").await;
    let (dev, key) = a.create_device(Some(home)).await;
    let (key_id, project) = a.create_api_key(Some(vec![home]), "read").await;
    // On A: an MQTT connection that never subscribed, a project key's watch and event stream.
    let mut mqtt = TestServer::mqtt_connect(a.mqtt_options(dev, &key)).await.expect("connect");
    let mut watch = a.ws_open(dev, &project, "").await;
    watch.next_json().await;
    let mut events = a.events_open(&project, "").await;
    // Through B: rotate the device key and revoke the project key.
    let rotated = b.admin(Method::POST, &format!("/devices/{dev}/apiKey")).send().await.expect("rotate");
    assert_eq!(rotated.status(), StatusCode::OK);
    mqtt.ended().await;
    let revoked = b.admin(Method::DELETE, &format!("/apiKeys/{key_id}")).send().await.expect("revoke");
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_eq!(watch.end().await, WsEnd::Closed(4003));
    assert_eq!(events.end().await, WsEnd::Closed(4003));
}

#[tokio::test]
async fn a_command_sent_through_one_node_reaches_the_device_on_the_other() {
    let (a, b) = two_nodes().await;
    let (dev, key) = a.create_device(None).await;
    let send = |node: &TestServer, body: &'static str| {
        node.req(Method::PUT, &format!("/devices/{dev}/command"), Some(ADMIN_KEY)).body(body).send()
    };
    let offline = send(&b, r#"{"action":"early"}"#).await.expect("send");
    assert_eq!(offline.status(), StatusCode::CONFLICT, "no session on any node");
    let mut mqtt = TestServer::mqtt_connect(a.mqtt_options(dev, &key)).await.expect("connect");
    mqtt.client.subscribe(format!("/devices/{dev}/command"), rumqttc::QoS::AtMostOnce).await.expect("subscribe");
    while !matches!(mqtt.next_packet().await, Ok(rumqttc::Packet::SubAck(_))) {}
    let mut socket = match a.ws_path(&format!("/devices/{dev}/command"), Some(&key)).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("{status} {body}"),
    };
    for body in [r#"{"action":"one"}"#, r#"{"action":"two","parameters":{"n":2}}"#] {
        let resp = send(&b, body).await.expect("send");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "the device is online on node A");
    }
    let mut over_mqtt = Vec::new();
    while over_mqtt.len() < 2 {
        if let Ok(rumqttc::Packet::Publish(p)) = mqtt.next_packet().await {
            over_mqtt.push(String::from_utf8(p.payload.to_vec()).expect("utf-8"));
        }
    }
    let expected = [r#"{"action":"one","parameters":{}}"#, r#"{"action":"two","parameters":{"n":2}}"#];
    assert_eq!(over_mqtt, expected);
    assert_eq!([socket.next_text().await, socket.next_text().await], expected);
}

#[tokio::test]
async fn an_ack_on_one_node_releases_a_writer_waiting_on_the_other() {
    let (a, b) = two_nodes().await;
    let (dev, key) = a.create_device(None).await;
    let mut ws = b.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    let writer = {
        let url = format!("{}/devices/{dev}/kv/mode?wait=applied&waitTimeout=20", a.base);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = reqwest::Client::new()
                .put(url)
                .header("Authorization", format!("ModeCloud {ADMIN_KEY}"))
                .json(&json!({"value": "eco"}))
                .send()
                .await
                .expect("sent");
            (resp.status(), resp.json::<serde_json::Value>().await.expect("json"), started.elapsed())
        })
    };
    let set = ws.next_json().await;
    assert_eq!((set["key"].clone(), set["rev"].clone()), (json!("mode"), json!(1)), "node B delivered node A's write");
    ws.send_json(&json!({"action": "ack", "rev": 1})).await;
    let (status, body, took) = writer.await.expect("writer");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"rev": 1, "applied": true, "appliedRev": 1}));
    assert!(took < Duration::from_secs(10), "released by the ack on the other node, not by the timeout ({took:?})");
    // Both nodes report it, and node A's delivered comes from node B's session.
    for node in [&a, &b] {
        let seen =
            expect_json(node.admin(Method::GET, &format!("/devices/{dev}/sync")).send().await, StatusCode::OK).await;
        assert_eq!((seen["deliveredRev"].clone(), seen["appliedRev"].clone()), (json!(1), json!(1)), "{seen}");
    }
}

#[tokio::test]
async fn concurrent_batches_on_two_nodes_reach_a_batches_session_whole_and_in_order() {
    let (a, b) = two_nodes().await;
    let (dev, key) = a.create_device(None).await;
    let mut on_b = b.ws_open(dev, &key, "?batches=1").await;
    assert_eq!(on_b.next_json().await["action"], "reload");
    let patch = |node: &TestServer, i: u64| {
        let body = json!({"ops": [
            {"op": "set", "key": "ssid", "value": i},
            {"op": "set", "key": "password", "value": i},
            {"op": "merge", "key": "log", "value": {format!("w{i}"): true}}
        ]});
        node.admin(Method::PATCH, &format!("/devices/{dev}/kv")).json(&body).send()
    };
    let writes: Vec<_> = (0..20u64).map(|i| patch(if i % 2 == 0 { &a } else { &b }, i)).collect();
    for answer in futures_util::future::join_all(writes).await {
        expect_json(answer, StatusCode::OK).await;
    }
    let mut last = 0;
    for _ in 0..20 {
        let batch = on_b.next_json().await;
        assert_eq!(batch["action"], "batch", "{batch}");
        let revs: Vec<u64> =
            batch["changes"].as_array().expect("changes").iter().filter_map(|c| c["rev"].as_u64()).collect();
        assert_eq!(revs, [last + 1, last + 2, last + 3], "whole batches, in rev order, never interleaved");
        assert_eq!(batch["changes"][0]["value"], batch["changes"][1]["value"], "ssid and password from the same batch");
        last += 3;
    }
    let log = expect_json(b.admin(Method::GET, &format!("/devices/{dev}/kv/log")).send().await, StatusCode::OK).await;
    assert_eq!(log["value"].as_object().map(serde_json::Map::len), Some(20), "no merge lost across nodes: {log}");
}

#[tokio::test]
async fn two_nodes_share_a_job_and_write_each_device_exactly_once() {
    let (a, b) = two_nodes().await;
    let mut devices = Vec::new();
    for _ in 0..60 {
        let body = expect_json(
            a.admin(Method::POST, "/devices").json(&json!({"name": "d", "deviceClass": "fleet"})).send().await,
            StatusCode::CREATED,
        )
        .await;
        devices.push(body["id"].as_u64().expect("id"));
    }
    // A rate spreads the claims over a few seconds, so both nodes' runners take turns claiming.
    let job = expect_json(
        a.admin(Method::POST, "/jobs")
            .json(&json!({"select": {"deviceClass": "fleet"}, "ops": [{"op": "set", "key": "ota", "value": 1}], "rate": 30}))
            .send()
            .await,
        StatusCode::CREATED,
    )
    .await;
    let id = job["id"].as_u64().expect("id");
    let mut done = Value::Null;
    for _ in 0..500 {
        done = expect_json(b.admin(Method::GET, &format!("/jobs/{id}")).send().await, StatusCode::OK).await;
        if done["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!((done["written"].clone(), done["failed"].clone()), (json!(60), json!(0)));
    for d in devices {
        assert_eq!(b.store_rev(&format!("/devices/{d}")).await, 1, "device {d} written exactly once");
    }
}
