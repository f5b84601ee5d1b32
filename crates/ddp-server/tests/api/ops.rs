//! Health, readiness, metrics and shutdown (PROTOCOL.md §7).

use ddp_testkit::{TestServer, expect_json};
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
        ("--max-body-bytes", Box::new(|c| c.limits.max_value_bytes = c.limits.max_body_bytes + 1)),
        ("--mqtt-max-packet", Box::new(|c| c.mqtt.max_packet = 10)),
        ("--db-readers", Box::new(|c| c.db_readers = 0)),
        ("--tls-key", Box::new(|c| c.mqtt.tls_cert = Some("cert.pem".into()))),
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
