//! Fuzzing the live server over real sockets: random WebSocket frames after a real handshake, and
//! random HTTP requests (methods, paths, headers, bodies). Whatever arrives, the server must not
//! panic, must answer a client's mistake with a 4xx (never a 5xx), must close a broken WebSocket
//! with one of RFC 6455's codes, and must stay bounded: every session ends, `/metrics` gains no
//! label set a client chose, memory does not grow with the cases. Each property runs
//! `PROPTEST_CASES` cases (default 48; CI keeps the default, so the run stays short).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ddp_testkit::raw::RawWs;
use ddp_testkit::{ADMIN_KEY, TestServer};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use reqwest::Method;
use serde_json::json;

/// Counts panics anywhere in this process (the server runs in it), keeping the default report.
fn count_panics() -> Arc<AtomicUsize> {
    static PANICS: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();
    PANICS
        .get_or_init(|| {
            let count = Arc::new(AtomicUsize::new(0));
            let seen = count.clone();
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                seen.fetch_add(1, Ordering::SeqCst);
                default(info);
            }));
            count
        })
        .clone()
}

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48);
    TestRunner::new(RunnerConfig { cases, failure_persistence: None, ..RunnerConfig::default() })
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// The label sets of `ddp_http_requests_total` in a `/metrics` text.
fn request_series(metrics: &str) -> Vec<String> {
    metrics.lines().filter(|l| l.starts_with("ddp_http_requests_total{")).map(str::to_owned).collect()
}

// ---- WebSocket ----

/// One client frame: fin, reserved bits, opcode, masked, payload.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        Just(br#"{"action":"set","key":"k","value":1}"#.to_vec()),
        Just(br#"{"action":"delete","key":"k"}"#.to_vec()),
        Just(br#"["set","k",1]"#.to_vec()),
        "[ -~]{0,64}".prop_map(String::into_bytes),
    ];
    let opcode = prop_oneof![4 => Just(1u8), 1 => Just(2u8), 1 => Just(0u8), 1 => Just(8u8), 1 => Just(9u8), 1 => Just(10u8), 1 => 0u8..16];
    (prop::bool::weighted(0.9), prop_oneof![8 => Just(0u8), 1 => 0u8..8], opcode, prop::bool::weighted(0.95), payload)
        .prop_map(|(fin, rsv, opcode, masked, payload)| RawWs::frame(fin, rsv, opcode, masked, &payload))
}

#[test]
fn random_websocket_frames_never_panic_and_always_end_cleanly() {
    let panics = count_panics();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let s = runtime.block_on(TestServer::start_with(|c| {
        c.limits.max_body_bytes = 1024;
        c.rate_limits.device_per_sec = 0;
    }));
    let (dev, key) = runtime.block_on(s.create_device(None));
    let rss_before = resident_bytes();
    runner()
        .run(&prop::collection::vec(frame(), 1..12), |frames| {
            runtime.block_on(async {
                let path = format!("/devices/{dev}/kv");
                let mut ws = RawWs::open(s.addr, &path, &key).await;
                for f in &frames {
                    if ws.try_send(f).await.is_err() {
                        break; // the server closed it: a broken frame came first
                    }
                }
                // Then read what the server says until it closes, or is quiet for a moment.
                loop {
                    match tokio::time::timeout(Duration::from_millis(300), ws.next_frame()).await {
                        Err(_) => break, // still open and quiet: fine
                        Ok(None) => break,
                        Ok(Some(f)) if f.opcode == 8 => {
                            let code = f.close_code();
                            prop_assert!(
                                matches!(code, None | Some(1000 | 1002 | 1007 | 1009)),
                                "close code {code:?} after {frames:?}"
                            );
                            break;
                        }
                        Ok(Some(f)) => prop_assert!(matches!(f.opcode, 1 | 9 | 10), "frame {f:?}"),
                    }
                }
                prop_assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic in the server");
                Ok(())
            })
        })
        .expect("the property holds");
    runtime.block_on(async {
        let health = s.req(Method::GET, "/healthz", None).send().await.expect("healthz");
        assert_eq!(health.status(), 200, "the server is still up");
        // Every session ended: the device may open as many as its cap allows again.
        for _ in 0..100 {
            let metrics = s.req(Method::GET, "/metrics", None).send().await.expect("m").text().await.expect("t");
            if metrics.lines().any(|l| l.starts_with("ddp_sessions{transport=\"websocket\"} 0")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let grown = resident_bytes().saturating_sub(rss_before);
    assert!(grown < 64 * 1024 * 1024, "memory grew by {grown} bytes over the cases");
}

// ---- HTTP ----

#[derive(Debug, Clone)]
struct RandomRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn path_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("devices".to_owned()),
        Just("homes".to_owned()),
        Just("kv".to_owned()),
        Just("apiKeys".to_owned()),
        Just("event".to_owned()),
        Just("apiKey".to_owned()),
        Just("events".to_owned()),
        Just("websocket".to_owned()),
        Just("1".to_owned()),
        Just("0".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("%00".to_owned()),
        Just("%ff%fe".to_owned()),
        Just("..".to_owned()),
        "[a-zA-Z0-9_:.-]{1,20}",
        "[!-~]{1,8}".prop_map(|s| s.replace(['/', '?', '#', '%'], "x")),
    ]
}

fn request() -> impl Strategy<Value = RandomRequest> {
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("PUT".to_owned()),
        Just("POST".to_owned()),
        Just("DELETE".to_owned()),
        Just("PATCH".to_owned()),
        Just("HEAD".to_owned()),
        Just("OPTIONS".to_owned()),
        "[A-Z]{1,12}",
    ];
    let header = prop_oneof![
        Just(("Authorization".to_owned(), format!("ModeCloud {ADMIN_KEY}"))),
        Just(("Authorization".to_owned(), "Bearer nope".to_owned())),
        "[ -~]{0,40}".prop_map(|v| ("Authorization".to_owned(), v)),
        "[ -~]{0,20}".prop_map(|v| ("If-Match".to_owned(), v)),
        "[ -~]{0,20}".prop_map(|v| ("If-None-Match".to_owned(), v)),
        "[ -~]{0,30}".prop_map(|v| ("Content-Type".to_owned(), v)),
        Just(("Upgrade".to_owned(), "websocket".to_owned())),
        Just(("Connection".to_owned(), "Upgrade".to_owned())),
        ("[A-Za-z-]{1,16}", "[ -~]{0,30}"),
    ];
    let body = prop_oneof![
        Just(Vec::new()),
        Just(br#"{"value":1}"#.to_vec()),
        Just(br#"{"name":"n","homeId":1}"#.to_vec()),
        Just(br#"{"eventType":"e","eventData":{}}"#.to_vec()),
        Just(br#"{"value":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#.to_vec()),
        prop::collection::vec(any::<u8>(), 0..300),
        "[ -~]{0,100}".prop_map(String::into_bytes),
    ];
    (
        method,
        prop::collection::vec(path_segment(), 0..5),
        prop::option::of("[a-zA-Z]{1,8}=[ -~&&[^#&]]{0,16}"),
        prop::collection::vec(header, 0..4),
        body,
    )
        .prop_map(|(method, segments, query, headers, body)| {
            let mut path = format!("/{}", segments.join("/"));
            if let Some(q) = query {
                path.push('?');
                path.push_str(&q.replace(' ', "+"));
            }
            RandomRequest { method, path, headers, body }
        })
}

#[test]
fn random_http_requests_get_4xx_never_5xx_and_metrics_stay_bounded() {
    let panics = count_panics();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let s = runtime.block_on(TestServer::start());
    runtime.block_on(async {
        let home = s.create_home("H").await;
        let (dev, _) = s.create_device(Some(home)).await;
        s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    });
    let client = reqwest::Client::new();
    runner()
        .run(&request(), |r| {
            runtime.block_on(async {
                let Ok(method) = Method::from_bytes(r.method.as_bytes()) else { return Ok(()) };
                let mut builder = client.request(method, format!("{}{}", s.base, r.path)).body(r.body.clone());
                for (name, value) in &r.headers {
                    builder = builder.header(name, value);
                }
                let Ok(request) = builder.build() else { return Ok(()) }; // not a valid HTTP request
                let response = match client.execute(request).await {
                    Ok(resp) => resp,
                    // The server may close a connection for a request it cannot read at all.
                    Err(e) if e.is_request() || e.is_connect() || e.is_body() => return Ok(()),
                    Err(e) => return Err(TestCaseError::fail(format!("{r:?}: {e}"))),
                };
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                prop_assert!(status.as_u16() < 500, "{r:?} → {status}: {body}");
                if status.is_client_error() && !body.is_empty() {
                    let parsed: serde_json::Value =
                        serde_json::from_str(&body).map_err(|e| TestCaseError::fail(format!("{r:?}: {e}: {body}")))?;
                    prop_assert!(parsed["reason"].is_string(), "{r:?}: errors are JSON with a reason: {body}");
                }
                prop_assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic in the server");
                Ok(())
            })
        })
        .expect("the property holds");
    let metrics = runtime.block_on(async {
        s.req(Method::GET, "/metrics", None).send().await.expect("metrics").text().await.expect("text")
    });
    let series = request_series(&metrics);
    let fixed_methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"];
    for line in &series {
        let method = line.split("method=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        let route = line.split("route=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        assert!(fixed_methods.contains(&method), "a client chose a method label: {line}");
        assert!(route == "unmatched" || route.starts_with('/'), "a client chose a route label: {line}");
        assert!(!route.contains("%") && !route.contains(".."), "a route label holds a raw path: {line}");
    }
}
