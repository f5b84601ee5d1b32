//! TLS on HTTP (PROTOCOL.md §9): REST and every WebSocket — sync, command socket, events, MQTT
//! at `/mqtt` — over `https`/`wss`, with clients that trust only the server's generated
//! certificate; and a renewed certificate picked up without a restart, on HTTPS and MQTT TLS.

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, TlsFiles, WsOpen, wss_connect};
use reqwest::StatusCode;
use serde_json::json;

fn base(s: &TestServer) -> String {
    format!("https://localhost:{}", s.https_addr.expect("the HTTPS listener").port())
}

fn resolving(client: reqwest::ClientBuilder, s: &TestServer) -> reqwest::ClientBuilder {
    client.resolve("localhost", s.https_addr.expect("https"))
}

#[tokio::test]
async fn rest_and_every_websocket_work_over_tls() {
    let (s, files) = TestServer::start_with_tls(&["localhost"], |_| {}).await;
    let ca = reqwest::Certificate::from_pem(files.ca_pem.as_bytes()).expect("pem");
    let client = resolving(reqwest::Client::builder().tls_certs_only([ca]), &s).build().expect("client");
    let home: serde_json::Value = client
        .post(format!("{}/homes", base(&s)))
        .header("Authorization", format!("ModeCloud {ADMIN_KEY}"))
        .json(&json!({"name": "H"}))
        .send()
        .await
        .expect("HTTPS")
        .json()
        .await
        .expect("json");
    let (dev, key) = s.create_device(home["id"].as_u64()).await;
    let put = client
        .put(format!("{}/devices/{dev}/kv/k", base(&s)))
        .header("Authorization", format!("ModeCloud {ADMIN_KEY}"))
        .body(r#"{"value": 1.50}"#)
        .send()
        .await
        .expect("HTTPS PUT");
    assert_eq!(put.status(), StatusCode::NO_CONTENT);

    let addr = s.https_addr.expect("https");
    let open = |path: String, token: String| {
        let ca = files.ca_pem.clone();
        async move {
            match wss_connect(addr, "localhost", &path, Some(&token), &ca).await {
                WsOpen::Open(c) => *c,
                WsOpen::Refused(status, body) => panic!("{path} over wss: {status} {body}"),
            }
        }
    };
    let mut sync = open(format!("/devices/{dev}/kv"), key.clone()).await;
    let reload = sync.next_text().await;
    assert!(reload.contains(r#""value":1.50"#), "the sync session over wss: {reload}");
    let mut events = open("/events/websocket".into(), ADMIN_KEY.into()).await;
    let mut commands = open(format!("/devices/{dev}/command"), key.clone()).await;
    s.put(&format!("/devices/{dev}"), "k", json!(2)).await;
    assert_eq!(sync.next_json().await["rev"], 2);
    let mut event = events.next_json().await;
    while event["eventType"] == "_deviceConnected_" {
        event = events.next_json().await;
    }
    assert_eq!(event["eventType"], "_deviceKVSaved_", "events over wss");
    let sent = client
        .put(format!("{}/devices/{dev}/command", base(&s)))
        .header("Authorization", format!("ModeCloud {ADMIN_KEY}"))
        .body(r#"{"action":"blink"}"#)
        .send()
        .await
        .expect("command over HTTPS");
    assert_eq!(sent.status(), StatusCode::NO_CONTENT);
    assert_eq!(commands.next_text().await, r#"{"action":"blink","parameters":{}}"#, "the command socket over wss");

    // MQTT over wss, at /mqtt on the HTTPS listener.
    let tls =
        rumqttc::TlsConfiguration::Simple { ca: files.ca_pem.clone().into_bytes(), alpn: None, client_auth: None };
    let mut options = rumqttc::MqttOptions::new("wss", format!("wss://localhost:{}/mqtt", addr.port()), 0);
    options.set_transport(rumqttc::Transport::Wss(tls));
    options.set_credentials(dev.to_string(), key.clone());
    // rumqttc resolves the host itself: localhost is the loopback address here.
    let mut mqtt = TestServer::mqtt_connect(options).await.expect("MQTT over wss");
    mqtt.client.subscribe(format!("/devices/{dev}/kv"), rumqttc::QoS::AtMostOnce).await.expect("subscribe");
    assert_eq!(mqtt.next_json().await["action"], "reload");
}

#[tokio::test]
async fn a_renewed_certificate_is_picked_up_without_a_restart() {
    let (s, first) = TestServer::start_with_tls(&["localhost"], |_| {}).await;
    let get = |ca: String| {
        let client = resolving(
            reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).expect("pem")]),
            &s,
        )
        .build()
        .expect("client");
        let url = format!("{}/healthz", base(&s));
        async move { client.get(url).send().await.map(|r| r.status()) }
    };
    assert_eq!(get(first.ca_pem.clone()).await.expect("trusted"), StatusCode::OK);
    let dir = first.cert.parent().expect("tls dir").to_owned();
    let renewed = TlsFiles::write(&dir, &["localhost"]); // as an ACME client would
    let mut picked_up = false;
    for _ in 0..100 {
        if get(renewed.ca_pem.clone()).await.is_ok() {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(picked_up, "new connections get the renewed certificate");
    assert!(get(first.ca_pem.clone()).await.is_err(), "and no longer the old one");
    // The MQTT TLS listener too.
    let (dev, key) = s.create_device(None).await;
    let mut options = rumqttc::MqttOptions::new("tls", "localhost", s.mqtt_tls_addr.expect("mqtts").port());
    options.set_credentials(dev.to_string(), key);
    options.set_transport(rumqttc::Transport::tls(renewed.ca_pem.clone().into_bytes(), None, None));
    TestServer::mqtt_connect(options).await.expect("MQTT TLS with the renewed certificate");
}
