//! Bad input gets the §2 status and reason, and changes nothing.

use ddp_testkit::{ADMIN_KEY, TestServer, expect_error};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// A device with one key at rev 1, to check that bad writes leave it alone.
async fn seeded(s: &TestServer) -> String {
    let (dev, _) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "keep", json!("me")).await;
    d
}

async fn assert_untouched(s: &TestServer, d: &str) {
    assert_eq!(s.store_rev(d).await, 1, "the store's rev moved");
    assert_eq!(s.items(d).await, vec![s.items(d).await[0].clone()]);
    assert_eq!(s.items(d).await[0]["value"], json!("me"));
}

#[tokio::test]
async fn malformed_bodies_are_invalid_json() {
    let s = TestServer::start().await;
    let d = seeded(&s).await;
    for body in ["{", "not json", "[1]", "\"value\"", "{\"value\": 1,}", ""] {
        let resp = s.admin(Method::PUT, &format!("{d}/kv/k")).body(body).send().await;
        expect_error(resp, StatusCode::BAD_REQUEST, "INVALID_JSON").await;
    }
    assert_untouched(&s, &d).await;
}

#[tokio::test]
async fn null_missing_and_too_deep_values_are_invalid_values() {
    let s = TestServer::start().await;
    let d = seeded(&s).await;
    let deep = |n: usize| format!("{{\"value\":{}1{}}}", "[".repeat(n), "]".repeat(n));
    for body in [r#"{"value":null}"#.to_owned(), "{}".to_owned(), r#"{"val":1}"#.to_owned(), deep(33), deep(500)] {
        let resp = s.admin(Method::PUT, &format!("{d}/kv/k")).body(body.clone()).send().await;
        expect_error(resp, StatusCode::BAD_REQUEST, "INVALID_VALUE").await;
    }
    assert_untouched(&s, &d).await;
    let ok = s.admin(Method::PUT, &format!("{d}/kv/deep")).body(deep(32)).send().await.expect("put");
    assert_eq!(ok.status(), StatusCode::NO_CONTENT, "32 levels are allowed");
}

#[tokio::test]
async fn keys_outside_the_rule_are_invalid_keys() {
    let s = TestServer::start().await;
    let d = seeded(&s).await;
    let long = "k".repeat(256);
    for key in ["a%2Fb", "a/b", "a%20b", "caf%C3%A9", "a%3Fb", long.as_str()] {
        for method in [Method::PUT, Method::GET, Method::DELETE] {
            let resp = s.admin(method.clone(), &format!("{d}/kv/{key}")).json(&json!({ "value": 1 })).send().await;
            expect_error(resp, StatusCode::BAD_REQUEST, "INVALID_KEY").await;
        }
    }
    let empty = s.admin(Method::PUT, &format!("{d}/kv/")).json(&json!({ "value": 1 })).send().await;
    expect_error(empty, StatusCode::BAD_REQUEST, "INVALID_KEY").await;
    assert_untouched(&s, &d).await;
    let max = "k".repeat(255);
    assert_eq!(s.put(&d, &max, json!(1)).await, 2, "255 bytes is allowed");
    assert_eq!(s.put(&d, "A-Z_a.z:0-9", json!(1)).await, 3);
}

#[tokio::test]
async fn values_over_the_limit_are_too_large() {
    let s = TestServer::start().await;
    let d = seeded(&s).await;
    let limit = 64 * 1024;
    let at_limit = "x".repeat(limit - 2); // plus its two quotes
    assert_eq!(s.put(&d, "big", json!(at_limit)).await, 2, "a value of exactly the limit is allowed");
    let over = "x".repeat(limit - 1);
    let body = expect_error(
        s.admin(Method::PUT, &format!("{d}/kv/big")).json(&json!({ "value": over })).send().await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "VALUE_TOO_LARGE",
    )
    .await;
    assert_eq!(body["data"]["limit"], limit);
    assert_eq!(s.store_rev(&d).await, 2);
}

#[tokio::test]
async fn bodies_over_the_limit_are_payload_too_large() {
    let s = TestServer::start_with(|c| c.limits.max_body_bytes = 4096).await;
    let d = seeded(&s).await;
    let body = format!("{{\"value\":\"{}\"}}", "x".repeat(5000));
    let resp = s.admin(Method::PUT, &format!("{d}/kv/k")).body(body).send().await;
    expect_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
    let home = s.admin(Method::POST, "/homes").body(format!("{{\"name\":\"{}\"}}", "n".repeat(5000))).send().await;
    expect_error(home, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
    assert_untouched(&s, &d).await;
}

#[tokio::test]
async fn a_full_store_refuses_new_keys_but_not_overwrites() {
    let s = TestServer::start_with(|c| c.limits.max_keys_per_store = 3).await;
    let d = seeded(&s).await;
    s.put(&d, "b", json!(2)).await;
    s.put(&d, "c", json!(3)).await;
    let body = expect_error(
        s.admin(Method::PUT, &format!("{d}/kv/d")).json(&json!({ "value": 4 })).send().await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "TOO_MANY_KEYS",
    )
    .await;
    assert_eq!(body["data"]["limit"], 3);
    assert_eq!(s.store_rev(&d).await, 3);
    assert_eq!(s.put(&d, "c", json!(33)).await, 4, "overwriting an existing key is fine");
}

#[tokio::test]
async fn unknown_and_malformed_ids() {
    let s = TestServer::start().await;
    for path in ["/devices/999999/kv", "/devices/999999/kv/k", "/devices/999999", "/devices/18446744073709551615/kv"] {
        expect_error(s.admin(Method::GET, path).send().await, StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND").await;
    }
    let put = s.admin(Method::PUT, "/devices/999999/kv/k").json(&json!({ "value": 1 })).send().await;
    expect_error(put, StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND").await;
    expect_error(
        s.admin(Method::DELETE, "/devices/999999/kv/k").send().await,
        StatusCode::NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    .await;
    for path in ["/homes/999999", "/homes/999999/kv", "/homes/999999/kv/k"] {
        expect_error(s.admin(Method::GET, path).send().await, StatusCode::NOT_FOUND, "HOME_NOT_FOUND").await;
    }
    expect_error(s.admin(Method::DELETE, "/apiKeys/999999").send().await, StatusCode::NOT_FOUND, "API_KEY_NOT_FOUND")
        .await;
    for path in ["/devices/abc/kv", "/devices/0/kv", "/devices/-1", "/homes/1.5/kv", "/devices/18446744073709551616"] {
        expect_error(s.admin(Method::GET, path).send().await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_json() {
    let s = TestServer::start().await;
    expect_error(s.admin(Method::GET, "/nowhere").send().await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    expect_error(s.admin(Method::POST, "/healthz").send().await, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
        .await;
    expect_error(s.admin(Method::PATCH, "/homes").send().await, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED")
        .await;
}

#[tokio::test]
async fn device_keys_over_their_rate_get_429_with_retry_after() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 2).await;
    let (dev, key) = s.create_device(None).await;
    let path = format!("/devices/{dev}/kv");
    for _ in 0..4 {
        let ok = s.req(Method::GET, &path, Some(&key)).send().await.expect("get");
        assert_eq!(ok.status(), StatusCode::OK, "within the burst of twice the rate");
    }
    let resp =
        s.req(Method::PUT, &format!("{path}/k"), Some(&key)).json(&json!({ "value": 1 })).send().await.expect("put");
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    expect_error(Ok(resp), StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED").await;
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 0, "the refused write was not applied");
    let admin = s.req(Method::GET, &path, Some(ADMIN_KEY)).send().await.expect("get");
    assert_eq!(admin.status(), StatusCode::OK, "the admin key is never limited");
}

#[test]
fn storage_failures_map_to_500_and_503_without_leaking() {
    use ddp_server::Error;
    use ddp_store::StoreError;
    let internal = Error::from(StoreError::Backend("disk I/O error at /secret/path".into()));
    assert_eq!((internal.status(), internal.reason.as_str()), (500, "INTERNAL_ERROR"));
    assert!(!internal.message.contains("/secret/path"), "internals stay in the log: {}", internal.message);
    let closed = Error::from(StoreError::Closed);
    assert_eq!((closed.status(), closed.reason.as_str(), closed.retry_after_secs()), (503, "UNAVAILABLE", Some(1)));
}
