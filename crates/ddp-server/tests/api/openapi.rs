//! The OpenAPI document (PROTOCOL.md §13): served without a token, OpenAPI 3.1, and true to the
//! router — every documented operation is routed. (`scripts/test-openapi` goes further: it
//! fuzzes a live server from the document and checks every answer against its schema.)

use ddp_testkit::{TestServer, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];
const OPEN: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/mqtt"];

async fn document(s: &TestServer) -> Value {
    let resp = s.req(Method::GET, "/openapi.json", None).send().await;
    expect_json(resp, StatusCode::OK).await
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_schemas_security_and_every_error_reason() {
    let s = TestServer::start().await;
    let doc = document(&s).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "Device Data Proxy");
    let paths = doc["paths"].as_object().expect("paths");
    for must in [
        "/devices/{id}/kv",
        "/devices/{id}/kv/{key}",
        "/homes/{id}/kv/{key}",
        "/devices",
        "/jobs/{id}",
        "/devices/{id}/sync",
        "/devices/{id}/command",
    ] {
        assert!(paths.contains_key(must), "{must} is not documented");
    }
    assert!(!paths.keys().any(|p| p.contains('*')), "a wildcard leaked into the document");
    let reasons = doc["components"]["schemas"]["ErrorBody"]["properties"]["reason"]["enum"].as_array().expect("enum");
    assert!(reasons.iter().any(|r| r == "REVISION_MISMATCH") && reasons.iter().any(|r| r == "DEVICE_OFFLINE"));
    let mut operations = 0;
    let mut ids = std::collections::HashSet::new();
    for (path, item) in paths {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            operations += 1;
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(ids.insert(id.to_owned()), "operationId {id} twice");
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2') || s == "101"),
                "{method} {path} has no success answer"
            );
            if path != "/healthz" && path != "/metrics" && path != "/openapi.json" {
                let bad = &responses["400"];
                let reasons = bad["content"]["application/json"]["schema"]["properties"]["reason"]["enum"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path}: 400 lists no reasons"));
                assert!(reasons.iter().any(|r| r == "INVALID_PARAMETER"), "{method} {path}");
            }
            let secured = op["security"].as_array().is_some_and(|s| s.iter().any(|r| r.get("ModeCloud").is_some()));
            assert_eq!(secured, !OPEN.contains(&path.as_str()), "{method} {path}: security");
        }
    }
    assert!(operations >= 35, "only {operations} operations");
    let new_value = &doc["components"]["schemas"]["NewValue"];
    assert_eq!(new_value["required"], serde_json::json!(["value"]), "{new_value}");
}

/// Every (method, path) of the document reaches a handler: none is answered by the router's
/// fallbacks ("no such endpoint", METHOD_NOT_ALLOWED).
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let s = TestServer::start().await;
    let doc = document(&s).await;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_none() {
                continue;
            }
            let concrete = path.replace("{id}", "987654").replace("{key}", "a%2Fkey");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let resp = s.admin(m, &concrete).body("{}").send().await.expect("request");
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {body}");
            assert!(!body.contains("no such endpoint"), "{method} {path} is not routed: {body}");
        }
    }
}
