//! Health, readiness, metrics and shutdown (PROTOCOL.md §7).

use ddp_testkit::{ADMIN_KEY, TestServer, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn health_and_readiness_need_no_token() {
    let s = TestServer::start().await;
    assert_eq!(expect_json(s.req(Method::GET, "/healthz", None).send().await, StatusCode::OK).await["status"], "ok");
    assert_eq!(expect_json(s.req(Method::GET, "/readyz", None).send().await, StatusCode::OK).await["status"], "ready");
}

#[tokio::test]
async fn metrics_count_requests_and_writes() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    let resp = s.req(Method::GET, "/metrics", None).send().await.expect("metrics");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("text/plain"))
    );
    let text = resp.text().await.expect("text");
    let backend = if ddp_testkit::suite_on_postgres() { "ddp_feed_rows_total" } else { "ddp_store_fsync_seconds" };
    for needle in [
        "ddp_http_requests_total{method=\"PUT\",route=\"/devices/{id}/kv/{*key}\",status=\"204\"}",
        "ddp_writes_total{transport=\"rest\",op=\"set\",outcome=\"ok\"}",
        "ddp_store_commit_seconds",
        "ddp_store_batch_size",
        backend,
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}

#[tokio::test]
async fn shutdown_finishes_in_flight_writes_then_refuses_connections() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let writes: Vec<_> =
        (0..50).map(|i| s.admin(Method::PUT, &format!("{d}/kv/k{i}")).json(&json!({ "value": i })).send()).collect();
    let pending = tokio::spawn(futures_util::future::join_all(writes));
    tokio::task::yield_now().await;
    let addr = s.addr;
    let base = s.base.clone();
    let kept = s.stop_keep_data().await;
    let acked = pending
        .await
        .expect("writers")
        .into_iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == StatusCode::NO_CONTENT))
        .count();
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err(), "{addr} still accepts connections after shutdown");

    let config = kept.config();
    let again = kept.start(config).await;
    assert!(again.items(&d).await.len() >= acked, "every acknowledged write survived the shutdown");
    assert_eq!(again.store_rev(&d).await as usize, again.items(&d).await.len());
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || ddp_testkit::TestServer::config(&dir.path().join("data"));
    let first = ddp_server::Server::bind(config()).await.expect("first binds");
    let second = ddp_server::Server::bind(config()).await.err().expect("second is refused");
    assert!(second.to_string().contains("in use by another"), "{second}");
    drop(first);
    assert!(ddp_server::Server::bind(config()).await.is_ok(), "the lock is released with the server");
}

#[tokio::test]
async fn a_busy_port_names_the_flag_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ddp_testkit::TestServer::config(&dir.path().join("data"));
    config.http_listen = taken.local_addr().expect("addr");
    let err = ddp_server::Server::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("--http-listen"), "{err}");
}

#[tokio::test]
async fn metrics_labels_come_from_fixed_sets_whatever_clients_send() {
    let s = TestServer::start().await;
    let tag = format!("XM{:08x}", rand::random::<u32>());
    for i in 0..50 {
        let method = Method::from_bytes(format!("{tag}{i}").as_bytes()).expect("a method token");
        let resp = s.req(method, &format!("/{tag}/{i}"), None).send().await.expect("request");
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    let after = s.req(Method::GET, "/metrics", None).send().await.expect("metrics").text().await.expect("text");
    assert!(!after.contains(&tag), "no label holds what a client sent");
    assert!(after.contains(r#"method="other",route="unmatched""#), "unknown methods are counted as other");
}

#[tokio::test]
async fn the_whole_configuration_is_checked_before_anything_starts() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = || ddp_testkit::TestServer::config(&dir.path().join("data"));
    type Tweak = Box<dyn Fn(&mut ddp_server::Config)>;
    let cases: Vec<(&str, Tweak)> = vec![
        ("--ws-idle", Box::new(|c| c.sessions.idle = Duration::ZERO)),
        ("--max-sessions-per-device", Box::new(|c| c.sessions.max_per_device = 0)),
        ("--session-queue", Box::new(|c| c.sessions.mailbox = 0)),
        ("--max-keys-per-store", Box::new(|c| c.limits.max_keys_per_store = 0)),
        ("--max-body-bytes", Box::new(|c| c.limits.max_body_bytes = 0)),
        ("--http-header-timeout", Box::new(|c| c.http.header_timeout = Duration::ZERO)),
        ("--max-connections", Box::new(|c| c.max_connections = Some(0))),
        ("--mqtt-max-packet", Box::new(|c| c.mqtt.max_packet = 10)),
        ("--db-readers", Box::new(|c| c.db_readers = 0)),
        ("--tls-key", Box::new(|c| c.tls.cert = Some("cert.pem".into()))),
        ("--https-listen", Box::new(|c| c.https_listen = Some("127.0.0.1:0".parse().expect("addr")))),
        ("--mqtt-tls-listen", Box::new(|c| c.mqtt.tls_listen = Some("127.0.0.1:0".parse().expect("addr")))),
        (
            "give each listener its own address",
            Box::new(|c| {
                c.http_listen = "127.0.0.1:48123".parse().expect("addr");
                c.mqtt.listen = Some(c.http_listen);
            }),
        ),
    ];
    for (names, tweak) in cases {
        let mut config = base();
        tweak(&mut config);
        let err = ddp_server::Server::bind(config).await.err().expect("refused");
        assert!(err.to_string().contains(names), "{names}: {err}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was created for a configuration that cannot start");
}

/// Reads until the server closes `stream`; returns what it sent and how long that took.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> (String, std::time::Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("the server held the connection for 10 s"),
        }
    }
}

#[tokio::test]
async fn idle_and_trickling_http_clients_are_let_go_and_upgraded_sessions_are_not() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let s = TestServer::start_with(|c| {
        c.http.header_timeout = Duration::from_millis(400);
        c.http.idle_timeout = Duration::from_millis(800);
        c.http.body_timeout = Duration::from_millis(400);
    })
    .await;
    // A connection that never sends anything.
    let mut silent = TcpStream::connect(s.addr).await.expect("tcp");
    let (sent, took) = until_closed(&mut silent).await;
    assert!(sent.is_empty() && took >= Duration::from_millis(700), "closed after the idle timeout ({took:?})");

    // A request head that trickles in: bytes keep coming, but the head is never complete.
    let mut trickle = TcpStream::connect(s.addr).await.expect("tcp");
    trickle.write_all(b"GET /healthz HTTP/1.1\r\n").await.expect("write");
    let writer = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if trickle.write_all(b"X-Slow: 1\r\n").await.is_err() {
                return true;
            }
        }
        false
    });
    assert!(writer.await.expect("writer"), "the server stopped taking the trickle before 2 s");

    // Keep-alive: one request, then silence until the idle timeout.
    let mut keep_alive = TcpStream::connect(s.addr).await.expect("tcp");
    keep_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let (sent, took) = until_closed(&mut keep_alive).await;
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    assert!(took >= Duration::from_millis(700), "kept for the idle timeout after the answer ({took:?})");

    // A body that never arrives whole.
    let (dev, _) = s.create_device(None).await;
    let mut slow_body = TcpStream::connect(s.addr).await.expect("tcp");
    let head = format!(
        "PUT /devices/{dev}/kv/k HTTP/1.1\r\nHost: x\r\nAuthorization: ModeCloud {ADMIN_KEY}\r\nContent-Length: 20\r\n\r\n{{\"va"
    );
    slow_body.write_all(head.as_bytes()).await.expect("write");
    let (sent, _) = until_closed(&mut slow_body).await;
    assert!(sent.starts_with("HTTP/1.1 408") && sent.contains("REQUEST_TIMEOUT"), "{sent}");
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 0);

    // A WebSocket session is not an idle HTTP connection.
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    ws.next_json().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    assert_eq!(ws.next_json().await["rev"], 1, "the upgraded session outlived the HTTP idle timeout");
}
