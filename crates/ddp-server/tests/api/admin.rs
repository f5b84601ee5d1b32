//! The admin API (PROTOCOL.md §5).

use ddp_testkit::{TestServer, expect_error, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn homes_create_list_get_delete() {
    let s = TestServer::start().await;
    let created = s.admin(Method::POST, "/homes").json(&json!({ "name": "Kitchen" })).send().await.expect("post");
    let location = created.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let home = expect_json(Ok(created), StatusCode::CREATED).await;
    let id = home["id"].as_u64().expect("id");
    assert_eq!((home["name"].as_str(), location), (Some("Kitchen"), Some(format!("/homes/{id}"))));
    assert!(home["creationTime"].as_str().is_some());
    assert_eq!(expect_json(s.admin(Method::GET, &format!("/homes/{id}")).send().await, StatusCode::OK).await, home);
    assert_eq!(expect_json(s.admin(Method::GET, "/homes").send().await, StatusCode::OK).await, json!([home]));

    let (dev, _) = s.create_device(Some(id)).await;
    s.put(&format!("/homes/{id}"), "k", json!(1)).await;
    let del = s.admin(Method::DELETE, &format!("/homes/{id}")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    expect_error(s.admin(Method::GET, &format!("/homes/{id}")).send().await, StatusCode::NOT_FOUND, "HOME_NOT_FOUND")
        .await;
    expect_error(
        s.admin(Method::GET, &format!("/homes/{id}/kv")).send().await,
        StatusCode::NOT_FOUND,
        "HOME_NOT_FOUND",
    )
    .await;
    let device = expect_json(s.admin(Method::GET, &format!("/devices/{dev}")).send().await, StatusCode::OK).await;
    assert_eq!(device["homeId"], json!(null), "its devices left the deleted home");
}

#[tokio::test]
async fn home_bodies_are_checked() {
    let s = TestServer::start().await;
    for (body, reason) in [
        ("{}", "INVALID_PARAMETER"),
        (r#"{"name":""}"#, "INVALID_PARAMETER"),
        (r#"{"name":"  "}"#, "INVALID_PARAMETER"),
        (r#"{"name":5}"#, "INVALID_PARAMETER"),
        (r#"{"name":"x","color":"red"}"#, "INVALID_PARAMETER"),
        ("[]", "INVALID_JSON"),
        ("{", "INVALID_JSON"),
    ] {
        expect_error(s.admin(Method::POST, "/homes").body(body).send().await, StatusCode::BAD_REQUEST, reason).await;
    }
    let long = format!("{{\"name\":\"{}\"}}", "n".repeat(256));
    expect_error(s.admin(Method::POST, "/homes").body(long).send().await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER")
        .await;
    assert_eq!(
        expect_json(s.admin(Method::GET, "/homes").send().await, StatusCode::OK).await,
        json!([]),
        "nothing was created"
    );
}

#[tokio::test]
async fn devices_lifecycle() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let created = expect_json(
        s.admin(Method::POST, "/devices")
            .json(&json!({ "name": "Thermostat", "homeId": home, "deviceClass": "thermo", "tag": "t-1" }))
            .send()
            .await,
        StatusCode::CREATED,
    )
    .await;
    let id = created["id"].as_u64().expect("id");
    assert_eq!(created["name"], "Thermostat");
    assert_eq!(created["homeId"], home);
    assert_eq!((created["deviceClass"].as_str(), created["tag"].as_str()), (Some("thermo"), Some("t-1")));
    assert_eq!(created["isConnected"], false);
    assert_eq!((created["lastConnectTime"].clone(), created["lastDisconnectTime"].clone()), (json!(null), json!(null)));
    let key = created["apiKey"].as_str().expect("the key is shown at creation");

    let shown = expect_json(s.admin(Method::GET, &format!("/devices/{id}")).send().await, StatusCode::OK).await;
    assert!(shown.get("apiKey").is_none(), "the key is never shown again: {shown}");
    let own = expect_json(s.req(Method::GET, &format!("/devices/{id}"), Some(key)).send().await, StatusCode::OK).await;
    assert_eq!(own, shown, "a device may read its own record");

    let (homeless, _) = s.create_device(None).await;
    let in_home =
        expect_json(s.admin(Method::GET, &format!("/devices?homeId={home}")).send().await, StatusCode::OK).await;
    assert_eq!(
        in_home.as_array().map(|a| a.iter().map(|d| d["id"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(id)])
    );
    let all = expect_json(s.admin(Method::GET, "/devices").send().await, StatusCode::OK).await;
    assert_eq!(all.as_array().map(Vec::len), Some(2));
    expect_error(s.admin(Method::GET, "/devices?homeId=999999").send().await, StatusCode::NOT_FOUND, "HOME_NOT_FOUND")
        .await;
    expect_error(s.admin(Method::GET, "/devices?homeId=x").send().await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER")
        .await;

    // PATCH: rename, move, leave, conflicts.
    let other = s.create_home("Other").await;
    let renamed = expect_json(
        s.admin(Method::PATCH, &format!("/devices/{id}")).json(&json!({ "name": "T2" })).send().await,
        StatusCode::OK,
    )
    .await;
    assert_eq!((renamed["name"].as_str(), renamed["homeId"].as_u64()), (Some("T2"), Some(home)));
    let moved = expect_json(
        s.admin(Method::PATCH, &format!("/devices/{id}")).json(&json!({ "homeId": other })).send().await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(moved["homeId"], other);
    let same = s.admin(Method::PATCH, &format!("/devices/{id}")).json(&json!({ "homeId": other })).send().await;
    expect_error(same, StatusCode::CONFLICT, "DEVICE_ALREADY_IN_HOME").await;
    let ghost = s.admin(Method::PATCH, &format!("/devices/{id}")).json(&json!({ "homeId": 999999 })).send().await;
    expect_error(ghost, StatusCode::NOT_FOUND, "HOME_NOT_FOUND").await;
    let bad = s.admin(Method::PATCH, &format!("/devices/{id}")).json(&json!({ "homeId": "x" })).send().await;
    expect_error(bad, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    let left = expect_json(
        s.admin(Method::PATCH, &format!("/devices/{id}")).json(&json!({ "homeId": null })).send().await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(left["homeId"], json!(null));
    let missing = s.admin(Method::PATCH, "/devices/999999").json(&json!({ "name": "x" })).send().await;
    expect_error(missing, StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND").await;

    // Creation refuses a missing home and bad fields.
    let ghost_home = s.admin(Method::POST, "/devices").json(&json!({ "name": "x", "homeId": 999999 })).send().await;
    expect_error(ghost_home, StatusCode::NOT_FOUND, "HOME_NOT_FOUND").await;
    let no_name = s.admin(Method::POST, "/devices").json(&json!({ "homeId": home })).send().await;
    expect_error(no_name, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;

    // Delete: record and store gone, ids never reused.
    s.put(&format!("/devices/{homeless}"), "k", json!(1)).await;
    let del = s.admin(Method::DELETE, &format!("/devices/{homeless}")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    expect_error(
        s.admin(Method::GET, &format!("/devices/{homeless}")).send().await,
        StatusCode::NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    .await;
    expect_error(
        s.admin(Method::GET, &format!("/devices/{homeless}/kv")).send().await,
        StatusCode::NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    .await;
    expect_error(
        s.admin(Method::DELETE, &format!("/devices/{homeless}")).send().await,
        StatusCode::NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    .await;
    let (next, _) = s.create_device(None).await;
    assert!(next > homeless, "ids are never reused");
    expect_error(
        s.admin(Method::POST, "/devices/999999/apiKey").send().await,
        StatusCode::NOT_FOUND,
        "DEVICE_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn api_keys_lifecycle() {
    let s = TestServer::start().await;
    let a = s.create_home("A").await;
    let created = expect_json(
        s.admin(Method::POST, "/apiKeys")
            .json(&json!({ "name": "dashboard", "homes": [a], "permission": "read" }))
            .send()
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!((created["name"].as_str(), created["permission"].as_str()), (Some("dashboard"), Some("read")));
    assert_eq!(created["homes"], json!([a]));
    assert!(created["key"].as_str().is_some_and(|k| k.len() > 32));
    let all = expect_json(
        s.admin(Method::POST, "/apiKeys").json(&json!({ "name": "ops", "permission": "readWrite" })).send().await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(all["homes"], json!(null), "no homes means every home");
    let listed = expect_json(s.admin(Method::GET, "/apiKeys").send().await, StatusCode::OK).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    for (body, status, reason) in [
        (json!({ "name": "x", "permission": "admin" }), StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (json!({ "name": "x" }), StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (json!({ "name": "x", "permission": "read", "homes": [] }), StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (json!({ "name": "x", "permission": "read", "homes": [0] }), StatusCode::BAD_REQUEST, "INVALID_PARAMETER"),
        (json!({ "name": "x", "permission": "read", "homes": [999999] }), StatusCode::NOT_FOUND, "HOME_NOT_FOUND"),
    ] {
        expect_error(s.admin(Method::POST, "/apiKeys").json(&body).send().await, status, reason).await;
    }
    let id = created["id"].as_u64().expect("id");
    assert_eq!(
        s.admin(Method::DELETE, &format!("/apiKeys/{id}")).send().await.expect("revoke").status(),
        StatusCode::NO_CONTENT
    );
    expect_error(
        s.admin(Method::DELETE, &format!("/apiKeys/{id}")).send().await,
        StatusCode::NOT_FOUND,
        "API_KEY_NOT_FOUND",
    )
    .await;
}

#[tokio::test]
async fn the_admin_api_is_admin_only() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, dev_key) = s.create_device(Some(home)).await;
    let (_, project) = s.create_api_key(None, "readWrite").await;
    for token in [dev_key.as_str(), project.as_str()] {
        // Listing homes and devices is open to project keys too (PROTOCOL.md §12); not to devices.
        for path in ["/homes", "/devices"] {
            let resp = s.req(Method::GET, path, Some(token)).send().await;
            if token == dev_key {
                expect_error(resp, StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
            } else {
                expect_json(resp, StatusCode::OK).await;
            }
        }
        for (method, path) in [
            (Method::POST, "/homes".to_owned()),
            (Method::GET, format!("/homes/{home}")),
            (Method::DELETE, format!("/homes/{home}")),
            (Method::POST, "/devices".to_owned()),
            (Method::PATCH, format!("/devices/{dev}")),
            (Method::DELETE, format!("/devices/{dev}")),
            (Method::POST, format!("/devices/{dev}/apiKey")),
            (Method::POST, "/apiKeys".to_owned()),
            (Method::GET, "/apiKeys".to_owned()),
            (Method::DELETE, "/apiKeys/1".to_owned()),
        ] {
            let resp = s.req(method.clone(), &path, Some(token)).json(&json!({ "name": "x" })).send().await;
            expect_error(resp, StatusCode::FORBIDDEN, "PERMISSION_DENIED").await;
        }
    }
    assert_eq!(
        s.req(Method::GET, &format!("/devices/{dev}"), Some(&dev_key)).send().await.expect("get").status(),
        StatusCode::OK
    );
    assert_eq!(
        expect_json(s.admin(Method::GET, "/homes").send().await, StatusCode::OK).await.as_array().map(Vec::len),
        Some(1)
    );
}
