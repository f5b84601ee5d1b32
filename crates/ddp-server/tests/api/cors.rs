//! CORS by `--cors-origin` (PROTOCOL.md §13): preflights answered, the headers on every answer
//! (errors too), a listed origin echoed as itself, `*` for any, nothing for other origins.

use ddp_testkit::TestServer;
use reqwest::{Method, StatusCode};

const APP: &str = "https://app.example.com";

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn names(resp: &reqwest::Response, name: &str) -> Vec<String> {
    header(resp, name).unwrap_or_default().split(',').map(|s| s.trim().to_ascii_lowercase()).collect()
}

#[tokio::test]
async fn a_listed_origin_gets_preflights_and_headers_on_every_answer() {
    let s = TestServer::start_with(|c| c.cors_origins = vec![APP.into(), "http://localhost:3000".into()]).await;
    let (dev, _) = s.create_device(None).await;
    let path = format!("/devices/{dev}/kv/k");

    let preflight = s
        .req(Method::OPTIONS, &path, None)
        .header("Origin", APP)
        .header("Access-Control-Request-Method", "PUT")
        .header("Access-Control-Request-Headers", "authorization, if-match, content-type")
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(header(&preflight, "access-control-allow-origin"), Some(APP));
    let allowed = names(&preflight, "access-control-allow-headers");
    for h in ["authorization", "if-match", "if-none-match", "content-type"] {
        assert!(allowed.contains(&h.to_owned()), "{h} not in {allowed:?}");
    }
    let methods = names(&preflight, "access-control-allow-methods");
    for m in ["get", "put", "patch", "delete", "post"] {
        assert!(methods.contains(&m.to_owned()), "{m} not in {methods:?}");
    }

    let put = s.admin(Method::PUT, &path).header("Origin", APP).json(&serde_json::json!({"value": 1})).send();
    let put = put.await.expect("put");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&put, "access-control-allow-origin"), Some(APP));
    assert!(names(&put, "vary").contains(&"origin".to_owned()), "Vary: {:?}", header(&put, "vary"));
    let exposed = names(&put, "access-control-expose-headers");
    for h in ["etag", "link", "retry-after"] {
        assert!(exposed.contains(&h.to_owned()), "{h} not in {exposed:?}");
    }

    // An error answer carries them too, so the page can read the reason.
    let denied = s.req(Method::GET, &path, None).header("Origin", APP).send().await.expect("get");
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&denied, "access-control-allow-origin"), Some(APP));

    let other = s.admin(Method::GET, &path).header("Origin", "https://evil.example").send().await.expect("get");
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(header(&other, "access-control-allow-origin"), None, "an unlisted origin is not allowed");
}

#[tokio::test]
async fn a_wildcard_allows_any_origin_and_none_is_the_default() {
    let any = TestServer::start_with(|c| c.cors_origins = vec!["*".into()]).await;
    let resp = any.req(Method::GET, "/healthz", None).header("Origin", "https://x.example").send().await.expect("get");
    assert_eq!(header(&resp, "access-control-allow-origin"), Some("*"));

    let none = TestServer::start().await;
    let resp = none.req(Method::GET, "/healthz", None).header("Origin", APP).send().await.expect("get");
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    let preflight = none
        .req(Method::OPTIONS, "/homes", None)
        .header("Origin", APP)
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .expect("preflight");
    assert_eq!(header(&preflight, "access-control-allow-origin"), None);
}
