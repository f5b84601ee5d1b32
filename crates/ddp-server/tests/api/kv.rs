//! Key-value stores: reads, writes, revs, ETags, conditional writes, number fidelity.

use ddp_testkit::{TestServer, etag_of, expect_error, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn put_get_list_delete_with_revs_and_etags() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let d = format!("/devices/{dev}");

    let empty = s.admin(Method::GET, &format!("{d}/kv")).send().await.expect("list");
    assert_eq!((empty.status(), etag_of(&empty)), (StatusCode::OK, 0));
    assert_eq!(empty.json::<serde_json::Value>().await.expect("json"), json!([]));

    assert_eq!(s.put(&d, "b", json!("bee")).await, 1);
    assert_eq!(s.put(&d, "a", json!({"x": [1, 2]})).await, 2);
    assert_eq!(s.put(&d, "b", json!(true)).await, 3, "overwriting takes the next rev");

    let item = s.admin(Method::GET, &format!("{d}/kv/b")).send().await.expect("get");
    assert_eq!(etag_of(&item), 3, "an item's ETag is the rev it was written at");
    let body: serde_json::Value = item.json().await.expect("json");
    assert_eq!((&body["key"], &body["value"]), (&json!("b"), &json!(true)));
    assert!(ddp_protocol::Timestamp::parse(body["modificationTime"].as_str().expect("time")).is_some());
    assert_eq!(body["modificationTime"].as_str().map(str::len), Some(24), "RFC 3339 with milliseconds");

    let a_rev = etag_of(&s.admin(Method::GET, &format!("{d}/kv/a")).send().await.expect("get"));
    assert_eq!(a_rev, 2, "untouched items keep their rev");

    let list = s.admin(Method::GET, &format!("{d}/kv")).send().await.expect("list");
    assert_eq!(etag_of(&list), 3, "the list's ETag is the store rev");
    let keys: Vec<String> = list
        .json::<Vec<serde_json::Value>>()
        .await
        .expect("json")
        .iter()
        .map(|i| i["key"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(keys, ["a", "b"]);

    let del = s.admin(Method::DELETE, &format!("{d}/kv/a")).send().await.expect("delete");
    assert_eq!((del.status(), etag_of(&del)), (StatusCode::NO_CONTENT, 4));
    expect_error(s.admin(Method::GET, &format!("{d}/kv/a")).send().await, StatusCode::NOT_FOUND, "KEY_NOT_FOUND").await;
    expect_error(s.admin(Method::DELETE, &format!("{d}/kv/a")).send().await, StatusCode::NOT_FOUND, "KEY_NOT_FOUND")
        .await;
    assert_eq!(s.store_rev(&d).await, 4, "a delete of a missing key leaves rev alone");
    assert_eq!(s.put(&d, "a", json!(1)).await, 5, "revs are never reused after a delete");
}

#[tokio::test]
async fn numbers_and_strings_come_back_byte_exact() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let cases = [
        "12345678901234567890",
        "1.10",
        "-0.0",
        "1e400",
        "[1.0,2.50,-0]",
        r#"{"b":1,"a":0.1000000000000000055511151231257827}"#,
        r#""caf\u00e9 \"quoted\"""#,
    ];
    for (i, text) in cases.iter().enumerate() {
        let body = format!("{{\"value\": {text}}}");
        let resp = s.admin(Method::PUT, &format!("/devices/{dev}/kv/k{i}")).body(body).send().await.expect("put");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let got = s
            .admin(Method::GET, &format!("/devices/{dev}/kv/k{i}"))
            .send()
            .await
            .expect("get")
            .text()
            .await
            .expect("text");
        assert!(got.contains(&format!("\"value\":{text},")), "value {text} came back as {got}");
    }
    let list =
        s.admin(Method::GET, &format!("/devices/{dev}/kv")).send().await.expect("list").text().await.expect("text");
    assert!(list.contains("\"value\":12345678901234567890,") && list.contains("\"value\":-0.0,"), "{list}");
}

#[tokio::test]
async fn white_space_is_dropped_but_nothing_else_changes() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let resp = s
        .admin(Method::PUT, &format!("/devices/{dev}/kv/k"))
        .body("{ \"value\" : { \"a b\" : [ 1.50 , \"x  y\" ] } }")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let got =
        s.admin(Method::GET, &format!("/devices/{dev}/kv/k")).send().await.expect("get").text().await.expect("text");
    assert!(got.contains(r#""value":{"a b":[1.50,"x  y"]}"#), "{got}");
}

#[tokio::test]
async fn key_prefix_filters_the_list() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    for k in ["zone:b", "zone:a", "zonal", "temp", "zone"] {
        s.put(&d, k, json!(1)).await;
    }
    let list = expect_json(s.admin(Method::GET, &format!("{d}/kv?keyPrefix=zone:")).send().await, StatusCode::OK).await;
    let keys: Vec<&str> = list.as_array().expect("array").iter().filter_map(|i| i["key"].as_str()).collect();
    assert_eq!(keys, ["zone:a", "zone:b"]);
    let all = expect_json(s.admin(Method::GET, &format!("{d}/kv?keyPrefix=")).send().await, StatusCode::OK).await;
    assert_eq!(all.as_array().map(Vec::len), Some(5), "an empty prefix lists everything");
    expect_error(
        s.admin(Method::GET, &format!("{d}/kv?keyPrefix=a%2F")).send().await,
        StatusCode::BAD_REQUEST,
        "INVALID_PARAMETER",
    )
    .await;
}

#[tokio::test]
async fn home_stores_work_like_device_stores() {
    let s = TestServer::start().await;
    let home = s.create_home("Kitchen").await;
    let h = format!("/homes/{home}");
    assert_eq!(s.put(&h, "mode", json!("away")).await, 1);
    assert_eq!(s.put(&h, "mode", json!("home")).await, 2);
    let items = s.items(&h).await;
    assert_eq!((items.len(), &items[0]["value"]), (1, &json!("home")));
    let del = s.admin(Method::DELETE, &format!("{h}/kv/mode")).send().await.expect("delete");
    assert_eq!(etag_of(&del), 3);
    expect_error(s.admin(Method::GET, "/homes/999999/kv").send().await, StatusCode::NOT_FOUND, "HOME_NOT_FOUND").await;
}

#[tokio::test]
async fn conditional_writes_follow_if_match_and_if_none_match() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let k = format!("/devices/{dev}/kv/k");
    let put = |cond: (&'static str, &'static str), v: i32| {
        s.admin(Method::PUT, &k).header(cond.0, cond.1).json(&json!({ "value": v })).send()
    };

    // Create-only on a missing key works once.
    let created = put(("If-None-Match", "*"), 1).await.expect("put");
    assert_eq!((created.status(), etag_of(&created)), (StatusCode::NO_CONTENT, 1));
    let again =
        expect_error(put(("If-None-Match", "*"), 2).await, StatusCode::PRECONDITION_FAILED, "REVISION_MISMATCH").await;
    assert_eq!(again["data"]["rev"], 1, "the 412 tells the current rev");

    // If-Match with the current rev applies; a stale one does not.
    let stale = s.admin(Method::PUT, &k).header("If-Match", "\"7\"").json(&json!({ "value": 3 })).send().await;
    expect_error(stale, StatusCode::PRECONDITION_FAILED, "REVISION_MISMATCH").await;
    let fresh =
        s.admin(Method::PUT, &k).header("If-Match", "\"1\"").json(&json!({ "value": 3 })).send().await.expect("put");
    assert_eq!(etag_of(&fresh), 2);
    let star = put(("If-Match", "*"), 4).await.expect("put");
    assert_eq!(etag_of(&star), 3, "If-Match: * applies to an existing key");

    // Deletes honour If-Match too.
    let stale_delete = s.admin(Method::DELETE, &k).header("If-Match", "\"2\"").send().await;
    expect_error(stale_delete, StatusCode::PRECONDITION_FAILED, "REVISION_MISMATCH").await;
    let delete = s.admin(Method::DELETE, &k).header("If-Match", "\"3\"").send().await.expect("delete");
    assert_eq!((delete.status(), etag_of(&delete)), (StatusCode::NO_CONTENT, 4));
    expect_error(put(("If-Match", "*"), 5).await, StatusCode::PRECONDITION_FAILED, "REVISION_MISMATCH").await;
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 4, "failed preconditions change nothing");

    // Bad precondition headers are parameters errors.
    expect_error(put(("If-Match", "\"abc\""), 1).await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    expect_error(put(("If-None-Match", "\"3\""), 1).await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    let del_inm = s.admin(Method::DELETE, &k).header("If-None-Match", "*").send().await;
    expect_error(del_inm, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
}

#[tokio::test]
async fn get_with_a_matching_etag_is_not_modified() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "k", json!(1)).await;
    let item = s.admin(Method::GET, &format!("{d}/kv/k")).header("If-None-Match", "\"1\"").send().await.expect("get");
    assert_eq!((item.status(), etag_of(&item)), (StatusCode::NOT_MODIFIED, 1));
    let list = s.admin(Method::GET, &format!("{d}/kv")).header("If-None-Match", "\"1\"").send().await.expect("list");
    assert_eq!(list.status(), StatusCode::NOT_MODIFIED);
    s.put(&d, "k", json!(2)).await;
    let changed = s.admin(Method::GET, &format!("{d}/kv")).header("If-None-Match", "\"1\"").send().await.expect("list");
    assert_eq!((changed.status(), etag_of(&changed)), (StatusCode::OK, 2));
}

#[tokio::test]
async fn concurrent_writers_get_every_rev_once() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let writes = (0..64).map(|i| {
        let req = s.admin(Method::PUT, &format!("{d}/kv/k{}", i % 10)).json(&json!({ "value": i }));
        async move { etag_of(&req.send().await.expect("put")) }
    });
    let mut revs: Vec<u64> = futures_util::future::join_all(writes).await;
    revs.sort_unstable();
    assert_eq!(revs, (1..=64).collect::<Vec<_>>());
    assert_eq!(s.store_rev(&d).await, 64);
}

#[tokio::test]
async fn data_survives_a_restart() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let put = s.admin(Method::PUT, &format!("{d}/kv/k")).body(r#"{"value": 1.10}"#).send().await.expect("put");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    let kept = s.stop_keep_data().await;
    let config = kept.config();
    let again = kept.start(config).await;
    let got = again.req(Method::GET, &format!("{d}/kv/k"), Some(&key)).send().await.expect("get");
    assert_eq!(etag_of(&got), 1);
    assert!(
        got.text().await.expect("text").contains("\"value\":1.10"),
        "the device key still works and the value is exact"
    );
    assert_eq!(again.put(&d, "k", json!(2)).await, 2);
}
