//! The authentication and authorization matrix of PROTOCOL.md §1.

use ddp_testkit::{ADMIN_KEY, TestServer, expect_error};
use reqwest::{Method, StatusCode};
use serde_json::json;

struct World {
    s: TestServer,
    home_a: u64,
    dev: u64,
    dev_key: String,
    other_dev: u64,
    other_key: String,
    read_key: String,
    write_key: String,
    scoped_other_key: String,
    scoped_a_read: String,
}

async fn world() -> World {
    let s = TestServer::start().await;
    let home_a = s.create_home("A").await;
    let home_b = s.create_home("B").await;
    let (dev, dev_key) = s.create_device(Some(home_a)).await;
    let (other_dev, other_key) = s.create_device(Some(home_b)).await;
    let (_, read_key) = s.create_api_key(None, "read").await;
    let (_, write_key) = s.create_api_key(None, "readWrite").await;
    let (_, scoped_other_key) = s.create_api_key(Some(vec![home_b]), "readWrite").await;
    let (_, scoped_a_read) = s.create_api_key(Some(vec![home_a]), "read").await;
    World { s, home_a, dev, dev_key, other_dev, other_key, read_key, write_key, scoped_other_key, scoped_a_read }
}

async fn status(s: &TestServer, method: Method, path: &str, token: Option<&str>) -> StatusCode {
    let mut req = s.req(method.clone(), path, token);
    if method == Method::PUT {
        req = req.json(&json!({ "value": 1 }));
    }
    req.send().await.expect("request").status()
}

#[tokio::test]
async fn the_matrix() {
    let w = world().await;
    let s = &w.s;
    let dkv = format!("/devices/{}/kv", w.dev);
    let dput = format!("/devices/{}/kv/k", w.dev);
    let hkv = format!("/homes/{}/kv", w.home_a);
    let hput = format!("/homes/{}/kv/k", w.home_a);
    let drec = format!("/devices/{}", w.dev);
    use StatusCode as S;
    // (token, device kv read, device kv write, home kv read, home kv write, an admin-only list, device
    // record). `GET /homes` is no longer admin-only: project keys list the homes they see (§12),
    // and read the records of the devices they see.
    let rows: Vec<(&str, Option<&str>, [StatusCode; 6])> = vec![
        ("admin", Some(ADMIN_KEY), [S::OK, S::NO_CONTENT, S::OK, S::NO_CONTENT, S::OK, S::OK]),
        ("project read", Some(&w.read_key), [S::OK, S::FORBIDDEN, S::OK, S::FORBIDDEN, S::FORBIDDEN, S::OK]),
        ("project readWrite", Some(&w.write_key), [S::OK, S::NO_CONTENT, S::OK, S::NO_CONTENT, S::FORBIDDEN, S::OK]),
        (
            "project scoped to home A, read",
            Some(&w.scoped_a_read),
            [S::OK, S::FORBIDDEN, S::OK, S::FORBIDDEN, S::FORBIDDEN, S::OK],
        ),
        ("project scoped to another home", Some(&w.scoped_other_key), [S::FORBIDDEN; 6]),
        ("device own", Some(&w.dev_key), [S::OK, S::NO_CONTENT, S::FORBIDDEN, S::FORBIDDEN, S::FORBIDDEN, S::OK]),
        ("device other", Some(&w.other_key), [S::FORBIDDEN; 6]),
        ("no token", None, [S::UNAUTHORIZED; 6]),
        ("unknown token", Some("ddpd_not-a-real-key-at-all"), [S::UNAUTHORIZED; 6]),
    ];
    for (who, token, expected) in rows {
        let got = [
            status(s, Method::GET, &dkv, token).await,
            status(s, Method::PUT, &dput, token).await,
            status(s, Method::GET, &hkv, token).await,
            status(s, Method::PUT, &hput, token).await,
            status(s, Method::GET, "/apiKeys", token).await,
            status(s, Method::GET, &drec, token).await,
        ];
        assert_eq!(got, expected, "row {who:?}");
    }
}

#[tokio::test]
async fn error_bodies_carry_the_reasons() {
    let w = world().await;
    let s = &w.s;
    let path = format!("/devices/{}/kv", w.dev);
    expect_error(s.req(Method::GET, &path, None).send().await, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED_CLIENT")
        .await;
    expect_error(
        s.req(Method::GET, &path, Some(&w.other_key)).send().await,
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
    )
    .await;
    let basic =
        s.client.get(format!("{}{path}", s.base)).header("Authorization", format!("Basic {ADMIN_KEY}")).send().await;
    expect_error(basic, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED_CLIENT").await;
    let bearer = s
        .client
        .get(format!("{}{path}", s.base))
        .header("Authorization", format!("Bearer {}", w.dev_key))
        .send()
        .await
        .expect("get");
    assert_eq!(bearer.status(), StatusCode::OK, "Bearer is accepted as well as ModeCloud");
}

#[tokio::test]
async fn a_device_never_learns_whether_another_device_exists() {
    let w = world().await;
    let s = &w.s;
    for path in ["/devices/999999/kv", "/devices/999999/kv/k", "/devices/999999"] {
        expect_error(
            s.req(Method::GET, path, Some(&w.dev_key)).send().await,
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
        )
        .await;
    }
    let other = format!("/devices/{}/kv", w.other_dev);
    expect_error(s.req(Method::GET, &other, Some(&w.dev_key)).send().await, StatusCode::FORBIDDEN, "PERMISSION_DENIED")
        .await;
}

#[tokio::test]
async fn revoked_and_rotated_keys_stop_working_at_once() {
    let w = world().await;
    let s = &w.s;
    let path = format!("/devices/{}/kv", w.dev);
    // Warm the cache first, so revocation must clear it.
    assert_eq!(status(s, Method::GET, &path, Some(&w.write_key)).await, StatusCode::OK);
    assert_eq!(status(s, Method::GET, &path, Some(&w.dev_key)).await, StatusCode::OK);

    let keys: serde_json::Value =
        s.admin(Method::GET, "/apiKeys").send().await.expect("list").json().await.expect("json");
    let listed = keys.as_array().expect("array");
    assert!(listed.iter().all(|k| k.get("key").is_none()), "secrets are never listed: {keys}");
    let write_id = listed
        .iter()
        .find(|k| k["permission"] == "readWrite" && k["homes"].is_null())
        .expect("the readWrite key")["id"]
        .clone();
    let revoke = s.admin(Method::DELETE, &format!("/apiKeys/{write_id}")).send().await.expect("revoke");
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    expect_error(
        s.req(Method::GET, &path, Some(&w.write_key)).send().await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED_CLIENT",
    )
    .await;

    let rotated: serde_json::Value = s
        .admin(Method::POST, &format!("/devices/{}/apiKey", w.dev))
        .send()
        .await
        .expect("rotate")
        .json()
        .await
        .expect("json");
    let new_key = rotated["apiKey"].as_str().expect("new key");
    assert_ne!(new_key, w.dev_key);
    expect_error(
        s.req(Method::GET, &path, Some(&w.dev_key)).send().await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED_CLIENT",
    )
    .await;
    assert_eq!(status(s, Method::GET, &path, Some(new_key)).await, StatusCode::OK);

    let delete = s.admin(Method::DELETE, &format!("/devices/{}", w.dev)).send().await.expect("delete");
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    expect_error(
        s.req(Method::GET, &path, Some(new_key)).send().await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED_CLIENT",
    )
    .await;
}

#[tokio::test]
async fn scoped_keys_follow_devices_between_homes() {
    let w = world().await;
    let s = &w.s;
    let path = format!("/devices/{}/kv", w.dev);
    assert_eq!(status(s, Method::GET, &path, Some(&w.scoped_a_read)).await, StatusCode::OK);
    assert_eq!(status(s, Method::GET, &path, Some(&w.scoped_other_key)).await, StatusCode::FORBIDDEN);
    let other_home = s.create_home("C").await;
    let moved = s
        .admin(Method::PATCH, &format!("/devices/{}", w.dev))
        .json(&json!({ "homeId": other_home }))
        .send()
        .await
        .expect("move");
    assert_eq!(moved.status(), StatusCode::OK);
    assert_eq!(
        status(s, Method::GET, &path, Some(&w.scoped_a_read)).await,
        StatusCode::FORBIDDEN,
        "the device left home A"
    );
    let homeless = s
        .admin(Method::PATCH, &format!("/devices/{}", w.dev))
        .json(&json!({ "homeId": null }))
        .send()
        .await
        .expect("leave");
    assert_eq!(homeless.status(), StatusCode::OK);
    assert_eq!(status(s, Method::GET, &path, Some(&w.scoped_a_read)).await, StatusCode::FORBIDDEN);
    assert_eq!(
        status(s, Method::GET, &path, Some(&w.read_key)).await,
        StatusCode::OK,
        "an unscoped key sees homeless devices"
    );
    // A scoped key whose only home is deleted sees nothing, not everything.
    let del = s.admin(Method::DELETE, &format!("/homes/{}", w.home_a)).send().await.expect("delete home");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    let other = format!("/devices/{}/kv", w.other_dev);
    assert_eq!(status(s, Method::GET, &other, Some(&w.scoped_a_read)).await, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn project_keys_get_404_for_missing_things_they_could_see() {
    let w = world().await;
    let s = &w.s;
    expect_error(
        s.req(Method::GET, "/devices/999999/kv", Some(&w.read_key)).send().await,
        StatusCode::NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    .await;
    expect_error(
        s.req(Method::GET, "/homes/999999/kv", Some(&w.read_key)).send().await,
        StatusCode::NOT_FOUND,
        "HOME_NOT_FOUND",
    )
    .await;
    expect_error(
        s.req(Method::GET, "/homes/999999/kv", Some(&w.scoped_a_read)).send().await,
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
    )
    .await;
}

#[tokio::test]
async fn a_scoped_key_cannot_tell_a_device_outside_its_homes_from_a_missing_one() {
    let w = world().await;
    let s = &w.s;
    // A read-write key scoped to home B; w.dev is in home A.
    let (key, outside, missing) = (&w.scoped_other_key, format!("/devices/{}", w.dev), "/devices/999999");
    for (method, suffix) in
        [(Method::GET, "/kv"), (Method::GET, "/kv/k"), (Method::PUT, "/kv/k"), (Method::DELETE, "/kv/k")]
    {
        let a = status(s, method.clone(), &format!("{outside}{suffix}"), Some(key)).await;
        let b = status(s, method.clone(), &format!("{missing}{suffix}"), Some(key)).await;
        assert_eq!((a, b), (StatusCode::FORBIDDEN, StatusCode::FORBIDDEN), "{method} {suffix}");
    }
    for device in [w.other_dev, 999_999] {
        let raised = s
            .req(Method::PUT, &format!("/devices/{device}/event"), Some(&w.scoped_other_key))
            .body(r#"{"eventType":"x"}"#)
            .send()
            .await
            .expect("raise");
        let expected = if device == w.other_dev { StatusCode::NO_CONTENT } else { StatusCode::FORBIDDEN };
        assert_eq!(raised.status(), expected, "device {device}");
        let watched = s.ws(if device == w.other_dev { w.dev } else { device }, &w.scoped_other_key, "").await;
        assert!(matches!(watched, ddp_testkit::WsOpen::Refused(403, _)), "a watch of device {device} is 403");
    }
}
