//! No client can hold the server: the real `ddp serve` process with its open-file limit lowered
//! to 256 (`prlimit`), against hundreds of silent and trickling connections on HTTP, WebSocket
//! upgrades and MQTT. Well-behaved clients keep being answered within a second, because at the
//! connection cap the oldest connections that never authenticated make way.

use std::time::{Duration, Instant};

use ddp_testkit::raw::{self, read_packet};
use ddp_testkit::{DdpProcess, WsOpen, ws_connect};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const ADMIN: &str = "limits-admin-key-0123456789";
/// Connections the attacker holds: more than the 256 files the server may open.
const SILENT: usize = 100;

async fn within_a_second<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(5), f).await.unwrap_or_else(|_| panic!("{what}: no answer"));
    let took = started.elapsed();
    assert!(took <= Duration::from_secs(1), "{what} took {took:?}");
    out
}

/// Opens `n` TCP connections to `addr` and, when given, writes `first` on each (then nothing).
async fn hold(addr: &str, n: usize, first: Option<&[u8]>) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match TcpStream::connect(addr).await {
            Ok(mut s) => {
                if let Some(bytes) = first {
                    let _ = s.write_all(bytes).await;
                }
                held.push(s);
            }
            Err(e) => panic!("the kernel refused a connection to {addr}: {e}"),
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_connections_cannot_starve_well_behaved_clients() {
    assert!(
        std::process::Command::new("prlimit").arg("--version").output().is_ok(),
        "prlimit (util-linux) is needed to lower the server's open-file limit"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    // Long HTTP timeouts, so that it is the cap that protects the server here, not a timeout.
    let server = DdpProcess::start_wrapped(
        &["prlimit", "--nofile=256:256"],
        std::path::Path::new(env!("CARGO_BIN_EXE_ddp")),
        &dir.path().join("data"),
        ADMIN,
        &["--http-header-timeout", "60s", "--http-idle-timeout", "60s", "--device-rate-limit", "0"],
    )
    .expect("ddp serve starts under prlimit");
    let http = server.base.trim_start_matches("http://").to_owned();
    let http_addr: std::net::SocketAddr = http.parse().expect("http addr");
    let client = reqwest::Client::new();
    let admin = |m: reqwest::Method, path: &str| {
        client.request(m, format!("{}{path}", server.base)).header("Authorization", format!("ModeCloud {ADMIN}"))
    };
    let created: Value = admin(reqwest::Method::POST, "/devices")
        .json(&json!({"name": "d"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let (dev, key) = (created["id"].as_u64().expect("id"), created["apiKey"].as_str().expect("key").to_owned());

    // A device connected before the flood keeps its session through it.
    let mqtt_addr: std::net::SocketAddr = server.mqtt.parse().expect("mqtt addr");
    let mut early = raw::mqtt_connect(mqtt_addr, dev, &key, 0).await;
    early.write_all(&raw::subscribe_packet(1, &format!("/devices/{dev}/kv"), false)).await.expect("subscribe");
    assert_eq!(read_packet(&mut early).await.map(|p| p.0), Some(0x90));
    assert_eq!(read_packet(&mut early).await.map(|p| p.0), Some(0x30), "reload");

    // The flood: 300 connections that never authenticate.
    let upgrade = format!("GET /devices/{dev}/kv HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n");
    let mut attacker = hold(&http, SILENT, None).await;
    attacker.extend(hold(&http, SILENT, Some(upgrade.as_bytes())).await);
    attacker.extend(hold(&server.mqtt, SILENT, None).await);

    for round in 0..3 {
        let health = within_a_second("GET /healthz", client.get(format!("{}/healthz", server.base)).send()).await;
        assert_eq!(health.expect("healthz").status(), 200, "round {round}");
        let put = within_a_second(
            "an authenticated PUT",
            admin(reqwest::Method::PUT, &format!("/devices/{dev}/kv/round")).json(&json!({"value": round})).send(),
        )
        .await;
        assert_eq!(put.expect("put").status(), 204);
        let ws =
            within_a_second("a WebSocket session", ws_connect(http_addr, &format!("/devices/{dev}/kv"), Some(&key)))
                .await;
        assert!(matches!(ws, WsOpen::Open(_)), "round {round}: the WebSocket session opened");
        let device = within_a_second("an MQTT device connecting", raw::mqtt_connect(mqtt_addr, dev, &key, 0)).await;
        drop(device);
        // More silent connections arrive between rounds.
        attacker.extend(hold(&http, 20, None).await);
        attacker.extend(hold(&server.mqtt, 20, None).await);
    }
    // The early device was authenticated: it was never shed, and still gets every change.
    let put = admin(reqwest::Method::PUT, &format!("/devices/{dev}/kv/last")).json(&json!({"value": true})).send();
    assert_eq!(put.await.expect("put").status(), 204);
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let (first, body) = read_packet(&mut early).await.expect("the early device is still connected");
        if first == 0x30 {
            let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let msg: Value = serde_json::from_slice(&body[2 + topic..]).expect("json");
            seen.push(msg["key"].as_str().expect("key").to_owned());
        }
    }
    assert_eq!(seen, ["round", "round", "round", "last"]);
    let metrics =
        client.get(format!("{}/metrics", server.base)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("ddp_connections_shed_total"), "shedding is counted");
    drop(attacker);
}
