//! Atomic multi-key writes and JSON merge patch (PROTOCOL.md §11): `PATCH …/kv` with ops, the
//! single-key merge patch, `batch` messages for sessions that ask for them (live and resumed),
//! batches sent by devices over WebSocket and MQTT, `?wait=applied` on a batch, and everything a
//! batch refuses — which leaves nothing behind.

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, etag_of, expect_error, expect_json};
use reqwest::{Method, StatusCode};
use rumqttc::QoS;
use serde_json::{Value, json};

async fn patch(s: &TestServer, token: &str, store: &str, body: Value) -> reqwest::Result<reqwest::Response> {
    s.req(Method::PATCH, &format!("{store}/kv"), Some(token)).json(&body).send().await
}

/// `(action, rev, key)` of a set/delete message.
fn change(m: &Value) -> (String, u64, String) {
    (
        m["action"].as_str().unwrap_or_default().to_owned(),
        m["rev"].as_u64().unwrap_or_default(),
        m["key"].as_str().unwrap_or_default().to_owned(),
    )
}

fn changes(list: &[(&str, u64, &str)]) -> Vec<(String, u64, String)> {
    list.iter().map(|(a, r, k)| ((*a).to_owned(), *r, (*k).to_owned())).collect()
}

#[tokio::test]
async fn a_batch_applies_every_op_in_order_with_consecutive_revs_and_sessions_see_it_their_way() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let store = format!("/devices/{dev}");
    s.put(&store, "old", json!(1)).await;
    s.put(&store, "net", json!({"ssid": "a", "dhcp": false, "dns": ["1.1.1.1"]})).await;
    let mut plain = s.ws_open(dev, &key, "").await;
    let mut batched = s.ws_open(dev, &key, "?batches=1").await;
    assert_eq!(plain.next_json().await["rev"], 2);
    assert_eq!(batched.next_json().await["action"], "reload");
    let mut events = s.events_open(ADMIN_KEY, "").await;

    let resp = patch(
        &s,
        ADMIN_KEY,
        &store,
        json!({"ops": [
            {"op": "set", "key": "ssid", "value": "home", "ifRev": 0},
            {"op": "set", "key": "password", "value": 1.5},
            {"op": "merge", "key": "net", "value": {"dhcp": true, "dns": null}, "ifRev": 2},
            {"op": "delete", "key": "old", "ifRev": 1},
            {"op": "set", "key": "ssid", "value": "home-5g", "ifRev": 3},
        ]}),
    )
    .await;
    let resp = resp.expect("sent");
    assert_eq!(etag_of(&resp), 7, "the ETag is the store's new rev");
    let body = expect_json(Ok(resp), StatusCode::OK).await;
    assert_eq!(
        body,
        json!({"rev": 7, "results": [
            {"key": "ssid", "rev": 3}, {"key": "password", "rev": 4}, {"key": "net", "rev": 5},
            {"key": "old", "rev": 6}, {"key": "ssid", "rev": 7}
        ]}),
        "a key named twice is applied in order and ends with its last op"
    );

    let items = s.items(&store).await;
    assert_eq!(
        items.iter().map(|i| (i["key"].clone(), i["value"].clone())).collect::<Vec<_>>(),
        [
            (json!("net"), json!({"ssid": "a", "dhcp": true})),
            (json!("password"), json!(1.5)),
            (json!("ssid"), json!("home-5g"))
        ]
    );

    // A session of Part I gets ordinary messages with consecutive revs …
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(change(&plain.next_json().await));
    }
    assert_eq!(
        seen,
        changes(&[
            ("set", 3, "ssid"),
            ("set", 4, "password"),
            ("set", 5, "net"),
            ("delete", 6, "old"),
            ("set", 7, "ssid")
        ])
    );
    // … one that asked for batches gets the batch as one message.
    let batch = batched.next_json().await;
    assert_eq!((batch["action"].clone(), batch["rev"].clone()), (json!("batch"), json!(7)), "{batch}");
    let inside: Vec<_> = batch["changes"].as_array().expect("changes").iter().map(change).collect();
    assert_eq!(inside, seen, "the same changes, whole");
    assert_eq!(batch["changes"][2]["value"], json!({"ssid": "a", "dhcp": true}), "a merge is sent as a set");

    // Events: one per change, in rev order.
    let mut revs = Vec::new();
    while revs.len() < 5 {
        let e = events.next_json().await;
        if e["eventType"] == "_deviceKVSaved_" || e["eventType"] == "_deviceKVDeleted_" {
            revs.push(e["eventData"]["rev"].as_u64().unwrap_or_default());
        }
    }
    assert_eq!(revs, [3, 4, 5, 6, 7]);

    // A single write stays an ordinary message for both sessions.
    s.put(&store, "one", json!(true)).await;
    assert_eq!(change(&plain.next_json().await), ("set".into(), 8, "one".into()));
    assert_eq!(change(&batched.next_json().await), ("set".into(), 8, "one".into()));
}

#[tokio::test]
async fn a_failing_op_applies_nothing_and_the_error_names_it() {
    let s = TestServer::start_with(|c| {
        c.limits.max_batch_ops = 4;
        c.limits.max_value_bytes = 64;
        c.limits.max_keys_per_store = 3;
        c.limits.max_body_bytes = 4096;
    })
    .await;
    let (dev, key) = s.create_device(None).await;
    let store = format!("/devices/{dev}");
    s.put(&store, "a", json!({"x": 1})).await;
    let mut ws = s.ws_open(dev, &key, "?batches=1").await;
    assert_eq!(ws.next_json().await["rev"], 1);
    let set = |k: &str, v: Value| json!({"op": "set", "key": k, "value": v});

    let cases: Vec<(Value, StatusCode, &str, Value)> = vec![
        (
            json!({"ops": [set("b", json!(1)), {"op": "delete", "key": "zz"}]}),
            StatusCode::NOT_FOUND,
            "KEY_NOT_FOUND",
            json!(1),
        ),
        (
            json!({"ops": [set("b", json!(1)), {"op": "set", "key": "a", "value": 2, "ifRev": 9}]}),
            StatusCode::PRECONDITION_FAILED,
            "REVISION_MISMATCH",
            json!(1),
        ),
        (
            json!({"ops": [set("b", json!(1)), set("c", json!(1)), set("d", json!(1))]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "TOO_MANY_KEYS",
            json!(2),
        ),
        (json!({"ops": [set("b", json!("x".repeat(80)))]}), StatusCode::PAYLOAD_TOO_LARGE, "VALUE_TOO_LARGE", json!(0)),
        (
            json!({"ops": [set("b", json!(1)), {"op": "merge", "key": "a", "value": {"y": "y".repeat(80)}}]}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "VALUE_TOO_LARGE",
            json!(1),
        ),
        (
            json!({"ops": [set("b", json!(1)), {"op": "merge", "key": "a", "value": [1]}]}),
            StatusCode::BAD_REQUEST,
            "INVALID_VALUE",
            json!(1),
        ),
        (
            json!({"ops": [set("b", json!(1)), {"op": "set", "key": "bad key", "value": 1}]}),
            StatusCode::BAD_REQUEST,
            "INVALID_KEY",
            json!(1),
        ),
        (
            json!({"ops": [set("b", json!(1)), {"op": "set", "key": "c"}]}),
            StatusCode::BAD_REQUEST,
            "INVALID_VALUE",
            json!(1),
        ),
        (json!({"ops": [{"op": "rename", "key": "a"}]}), StatusCode::BAD_REQUEST, "INVALID_PARAMETER", json!(0)),
    ];
    for (body, status, reason, index) in cases {
        let error = expect_error(patch(&s, ADMIN_KEY, &store, body.clone()).await, status, reason).await;
        assert_eq!(error["data"]["index"], index, "{body} → {error}");
    }
    let too_many = expect_error(
        patch(&s, ADMIN_KEY, &store, json!({"ops": [set("b", json!(1)), set("c", json!(1)), set("d", json!(1)), set("e", json!(1)), set("f", json!(1))]})).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    )
    .await;
    assert_eq!(too_many["data"]["limit"], 4);
    let big = json!({"ops": [set("b", json!("x".repeat(1500))), set("c", json!("x".repeat(1500))), set("d", json!("x".repeat(1500)))]});
    let too_big =
        expect_error(patch(&s, ADMIN_KEY, &store, big).await, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(too_big["data"]["limit"], 4096, "the body limit holds for batches too");
    for (body, reason) in [
        (json!({"ops": []}), "INVALID_PARAMETER"),
        (json!({"ops": {"op": "set"}}), "INVALID_PARAMETER"),
        (json!({"nothing": 1}), "INVALID_PARAMETER"),
        (json!([set("b", json!(1))]), "INVALID_JSON"),
    ] {
        expect_error(patch(&s, ADMIN_KEY, &store, body).await, StatusCode::BAD_REQUEST, reason).await;
    }
    let stale = s
        .admin(Method::PATCH, &format!("{store}/kv"))
        .header("If-Match", "\"0\"")
        .json(&json!({"ops": [set("b", json!(1))]}))
        .send()
        .await;
    let error = expect_error(stale, StatusCode::PRECONDITION_FAILED, "REVISION_MISMATCH").await;
    assert_eq!((error["data"]["rev"].clone(), error["data"].get("index")), (json!(1), None), "{error}");

    assert_eq!(s.store_rev(&store).await, 1, "no failing batch used a rev");
    assert_eq!(s.items(&store).await.len(), 1, "nor left anything");
    assert!(ws.quiet_for(Duration::from_millis(300)).await, "nor reached a session");

    let fresh = s
        .admin(Method::PATCH, &format!("{store}/kv"))
        .header("If-Match", "\"1\"")
        .json(&json!({"ops": [set("b", json!(1))]}))
        .send()
        .await;
    assert_eq!(expect_json(fresh, StatusCode::OK).await["rev"], 2, "If-Match on the store's rev holds");
    assert_eq!(change(&ws.next_json().await), ("set".into(), 2, "b".into()), "a batch of one is a plain set");
}

#[tokio::test]
async fn who_may_write_a_batch_is_who_may_write_the_store() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let (other, _) = s.create_device(Some(home)).await;
    let (_, reader) = s.create_api_key(None, "read").await;
    let (_, writer) = s.create_api_key(Some(vec![home]), "readWrite").await;
    let body = json!({"ops": [{"op": "set", "key": "k", "value": 1}]});
    expect_error(
        patch(&s, &reader, &format!("/devices/{dev}"), body.clone()).await,
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
    )
    .await;
    expect_error(
        patch(&s, &key, &format!("/devices/{other}"), body.clone()).await,
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
    )
    .await;
    assert_eq!(
        expect_json(patch(&s, &key, &format!("/devices/{dev}"), body.clone()).await, StatusCode::OK).await["rev"],
        1
    );
    assert_eq!(
        expect_json(patch(&s, &writer, &format!("/homes/{home}"), body.clone()).await, StatusCode::OK).await["rev"],
        1
    );
    expect_error(patch(&s, ADMIN_KEY, "/devices/999999", body).await, StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND").await;
}

#[tokio::test]
async fn a_merge_patch_on_one_key_follows_rfc_7396() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    for store in [format!("/homes/{home}"), format!("/devices/{}", s.create_device(Some(home)).await.0)] {
        s.put(&store, "cfg", json!({"a": 1, "b": {"c": 2, "d": 3}})).await;
        let merge = |body: &str, content_type: &str| {
            s.admin(Method::PATCH, &format!("{store}/kv/cfg"))
                .header("Content-Type", content_type)
                .body(body.to_owned())
                .send()
        };
        let resp = merge(r#"{"b":{"d":null,"e":[1]},"f":"x"}"#, "application/merge-patch+json").await.expect("sent");
        assert_eq!((resp.status(), etag_of(&resp)), (StatusCode::NO_CONTENT, 2), "{store}");
        let item = expect_json(s.admin(Method::GET, &format!("{store}/kv/cfg")).send().await, StatusCode::OK).await;
        assert_eq!(item["value"], json!({"a": 1, "b": {"c": 2, "e": [1]}, "f": "x"}));
        let fresh = merge(r#"{"n":1}"#, "application/merge-patch+json; charset=utf-8");
        assert_eq!(fresh.await.expect("sent").status(), StatusCode::NO_CONTENT);
        let created = s
            .admin(Method::PATCH, &format!("{store}/kv/new"))
            .header("Content-Type", "application/merge-patch+json")
            .header("If-None-Match", "*")
            .body(r#"{"x":{"y":null}}"#)
            .send()
            .await
            .expect("sent");
        assert_eq!(created.status(), StatusCode::NO_CONTENT, "an absent key counts as {{}}");
        let new = expect_json(s.admin(Method::GET, &format!("{store}/kv/new")).send().await, StatusCode::OK).await;
        assert_eq!(new["value"], json!({"x": {}}));
        expect_error(merge(r#"{"n":1}"#, "application/json").await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
        expect_error(merge("[1]", "application/merge-patch+json").await, StatusCode::BAD_REQUEST, "INVALID_VALUE")
            .await;
        expect_error(merge("{", "application/merge-patch+json").await, StatusCode::BAD_REQUEST, "INVALID_JSON").await;
        let stale = s
            .admin(Method::PATCH, &format!("{store}/kv/cfg"))
            .header("Content-Type", "application/merge-patch+json")
            .header("If-Match", "\"2\"")
            .body(r#"{"n":2}"#)
            .send()
            .await;
        expect_error(stale, StatusCode::PRECONDITION_FAILED, "REVISION_MISMATCH").await;
        assert_eq!(s.store_rev(&store).await, 4, "refused patches change nothing");
    }
}

#[tokio::test]
async fn devices_send_batches_over_websocket_and_mqtt() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let store = format!("/devices/{dev}");
    let mut ws = s.ws_open(dev, &key, "?batches=1").await;
    assert_eq!(ws.next_json().await["action"], "reload");

    ws.send_json(&json!({"action": "batch", "ops": [
        {"op": "set", "key": "ssid", "value": "x"}, {"op": "set", "key": "password", "value": "y"}
    ]}))
    .await;
    let back = ws.next_json().await;
    assert_eq!((back["action"].clone(), back["rev"].clone()), (json!("batch"), json!(2)), "{back}");

    ws.send_json(&json!({"action": "batch", "ops": [
        {"op": "set", "key": "n", "value": 1}, {"op": "delete", "key": "missing"}
    ]}))
    .await;
    let error = ws.next_json().await;
    assert_eq!(
        (error["action"].clone(), error["reason"].clone(), error["index"].clone(), error["key"].clone()),
        (json!("error"), json!("KEY_NOT_FOUND"), json!(1), json!("missing")),
        "{error}"
    );
    ws.send_json(&json!({"action": "batch", "ops": [{"op": "merge", "key": "n", "value": 5}]})).await;
    let error = ws.next_json().await;
    assert_eq!((error["reason"].clone(), error["index"].clone()), (json!("INVALID_VALUE"), json!(0)), "{error}");
    ws.send_json(&json!({"action": "batch"})).await;
    assert_eq!(ws.next_json().await["reason"], "INVALID_PARAMETER");
    assert_eq!(s.store_rev(&store).await, 2, "refused batches change nothing");

    let (mut mqtt, reload) = s.mqtt_device(dev, &key).await;
    assert_eq!(reload["rev"], 2);
    let frame = r#"{"action":"batch","ops":[{"op":"merge","key":"net","value":{"on":true}},{"op":"delete","key":"ssid","ifRev":1}]}"#;
    mqtt.client.publish(format!("/devices/{dev}/kv"), QoS::AtLeastOnce, false, frame).await.expect("publish");
    let first = mqtt.next_json().await;
    let second = mqtt.next_json().await;
    assert_eq!(
        (change(&first), change(&second)),
        (("set".into(), 3, "net".into()), ("delete".into(), 4, "ssid".into())),
        "MQTT sessions get Part I messages"
    );
    let batch = ws.next_json().await;
    assert_eq!((batch["action"].clone(), batch["changes"].as_array().map(Vec::len)), (json!("batch"), Some(2)));
    let bad = r#"{"action":"batch","ops":[{"op":"set","key":"z","value":1},{"op":"delete","key":"nothing"}]}"#;
    mqtt.client.publish(format!("/devices/{dev}/kv"), QoS::AtLeastOnce, false, bad).await.expect("publish");
    assert!(ws.quiet_for(Duration::from_millis(300)).await, "an invalid MQTT batch applies nothing");
    assert_eq!(s.store_rev(&store).await, 4);
}

#[tokio::test]
async fn a_resumed_batches_session_gets_what_it_missed_batch_by_batch() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let store = format!("/devices/{dev}");
    s.put(&store, "a", json!(1)).await;
    let set = |k: &str, v: u64| json!({"op": "set", "key": k, "value": v});
    expect_json(patch(&s, ADMIN_KEY, &store, json!({"ops": [set("x", 1), set("y", 1)]})).await, StatusCode::OK).await;
    s.put(&store, "a", json!(2)).await;
    expect_json(
        patch(&s, ADMIN_KEY, &store, json!({"ops": [set("x", 2), set("y", 2), set("z", 2)]})).await,
        StatusCode::OK,
    )
    .await;
    let mut ws = s.ws_open(dev, &key, "?batches=1&sinceRev=1").await;
    assert_eq!(ws.next_json().await, json!({"action": "resume", "rev": 1}));
    let revs = |m: &Value| -> Vec<u64> {
        m["changes"].as_array().map(|c| c.iter().filter_map(|c| c["rev"].as_u64()).collect()).unwrap_or_default()
    };
    let first = ws.next_json().await;
    assert_eq!((first["action"].clone(), revs(&first)), (json!("batch"), vec![2, 3]));
    assert_eq!(change(&ws.next_json().await), ("set".into(), 4, "a".into()));
    let last = ws.next_json().await;
    assert_eq!((last["rev"].clone(), revs(&last)), (json!(7), vec![5, 6, 7]));
    let mut plain = s.ws_open(dev, &key, "?sinceRev=4").await;
    assert_eq!(plain.next_json().await["action"], "resume");
    for rev in 5..=7 {
        assert_eq!(plain.next_json().await["rev"], rev, "without batches=1, one message per change");
    }
}

#[tokio::test]
async fn a_batch_may_wait_until_the_device_applied_it() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "?batches=1").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    let device = tokio::spawn(async move {
        let batch = ws.next_json().await;
        ws.send_json(&json!({"action": "ack", "rev": batch["rev"]})).await;
        (batch, ws)
    });
    let answer = s
        .admin(Method::PATCH, &format!("/devices/{dev}/kv?wait=applied&waitTimeout=10"))
        .json(&json!({"ops": [{"op": "set", "key": "a", "value": 1}, {"op": "set", "key": "b", "value": 2}]}))
        .send()
        .await;
    let body = expect_json(answer, StatusCode::OK).await;
    assert_eq!(
        body,
        json!({"rev": 2, "results": [{"key": "a", "rev": 1}, {"key": "b", "rev": 2}], "applied": true, "appliedRev": 2})
    );
    let (batch, _ws) = device.await.expect("device task");
    assert_eq!(batch["action"], "batch");
    let late = s
        .admin(Method::PATCH, &format!("/devices/{dev}/kv?wait=applied&waitTimeout=0.2"))
        .json(&json!({"ops": [{"op": "delete", "key": "a"}]}))
        .send()
        .await;
    let body = expect_json(late, StatusCode::OK).await;
    assert_eq!(
        (body["rev"].clone(), body["applied"].clone(), body["appliedRev"].clone()),
        (json!(3), json!(false), json!(2))
    );
}
