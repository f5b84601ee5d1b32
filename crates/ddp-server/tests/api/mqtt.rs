//! The MQTT listener (PROTOCOL.md §4.2) with real MQTT clients: rumqttc for 3.1.1 and 5, and a
//! raw client for the protocol's edges (retransmissions, keep-alive, first packets).

use std::time::Duration;

use ddp_testkit::raw::{self, connect_packet, publish_packet, read_packet};
use ddp_testkit::{ADMIN_KEY, TestServer, WsEnd};
use reqwest::{Method, StatusCode};
use rumqttc::{Packet, QoS};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn a_device_syncs_and_writes_over_mqtt_311() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "mode", json!("eco")).await;
    let (mut c, reload) = s.mqtt_device(dev, &key).await;
    assert_eq!(
        (&reload["rev"], &reload["numItems"], &reload["items"][0]["key"]),
        (&json!(1), &json!(1), &json!("mode"))
    );

    s.put(&d, "target", json!(21.5)).await;
    assert_eq!(c.next_json().await, json!({"action":"set","rev":2,"key":"target","value":21.5}));

    // The MODE SDK's own frame, at QoS 1: PUBACK only once durable, then the echo with its rev.
    let frame = r#"{"action":"set","rev":0,"key":"temp","value":19.75,"numItems":0,"items":null}"#;
    c.client.publish(format!("/devices/{dev}/kv"), QoS::AtLeastOnce, false, frame).await.expect("publish");
    let mut acked = false;
    let echo = loop {
        match c.next_packet().await.expect("open") {
            Packet::PubAck(_) => acked = true,
            Packet::Publish(p) => break serde_json::from_slice::<serde_json::Value>(&p.payload).expect("json"),
            _ => {}
        }
    };
    assert_eq!(echo, json!({"action":"set","rev":3,"key":"temp","value":19.75}));
    if !acked {
        assert!(matches!(c.next_packet().await, Ok(Packet::PubAck(_))));
    }
    let raw = s.admin(Method::GET, &format!("{d}/kv/temp")).send().await.expect("get").text().await.expect("text");
    assert!(raw.contains("\"value\":19.75"), "{raw}");

    c.client
        .publish(format!("/devices/{dev}/kv"), QoS::AtMostOnce, false, r#"{"action":"delete","key":"mode"}"#)
        .await
        .expect("publish");
    assert_eq!(c.next_json().await, json!({"action":"delete","rev":4,"key":"mode"}));
}

#[tokio::test]
async fn the_mode_sdk_way_both_topics_in_one_subscribe_and_no_keep_alive() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut options = s.mqtt_options(dev, &key);
    options.set_keep_alive(Duration::ZERO);
    let mut c = TestServer::mqtt_connect(options).await.expect("connect");
    c.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new(format!("/devices/{dev}/kv"), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new(format!("/devices/{dev}/command"), QoS::AtMostOnce),
        ])
        .await
        .expect("subscribe");
    let suback = loop {
        if let Packet::SubAck(ack) = c.next_packet().await.expect("open") {
            break ack;
        }
    };
    assert_eq!(
        suback.return_codes,
        vec![
            rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce),
            rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
    assert_eq!(c.next_json().await["action"], "reload");
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    assert_eq!(c.next_json().await["rev"], 1);
}

#[tokio::test]
async fn bad_credentials_are_refused_with_connack_codes() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let (other, _) = s.create_device(None).await;
    let refused = |r: Result<ddp_testkit::MqttClient, String>| r.err().unwrap_or_default();
    let wrong_key = refused(TestServer::mqtt_connect(s.mqtt_options(dev, "ddpd_wrong")).await);
    assert!(wrong_key.contains("BadUserNamePassword"), "{wrong_key}");
    let other_device = refused(TestServer::mqtt_connect(s.mqtt_options(other, &key)).await);
    assert!(other_device.contains("BadUserNamePassword"), "another device's key: {other_device}");
    let admin = refused(TestServer::mqtt_connect(s.mqtt_options(dev, ADMIN_KEY)).await);
    assert!(admin.contains("BadUserNamePassword"), "only device keys: {admin}");
    let mut options = s.mqtt_options(dev, &key);
    options.set_credentials("not-a-number", key.clone());
    assert!(refused(TestServer::mqtt_connect(options).await).contains("BadUserNamePassword"));
    let mut options = s.mqtt_options(dev, &key);
    options.set_last_will(rumqttc::LastWill::new("/devices/x", "bye", QoS::AtMostOnce, false));
    assert!(refused(TestServer::mqtt_connect(options).await).contains("NotAuthorized"), "wills are refused");
}

#[tokio::test]
async fn only_the_devices_own_topics_are_granted() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let (other, _) = s.create_device(None).await;
    let mut c = TestServer::mqtt_connect(s.mqtt_options(dev, &key)).await.expect("connect");
    c.client
        .subscribe_many(
            [
                format!("/devices/{other}/kv"),
                "/devices/+/kv".into(),
                "#".into(),
                format!("devices/{dev}/kv"),
                format!("/devices/{dev}/event"),
            ]
            .into_iter()
            .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtMostOnce)),
        )
        .await
        .expect("subscribe");
    let suback = loop {
        if let Packet::SubAck(ack) = c.next_packet().await.expect("open") {
            break ack;
        }
    };
    assert!(
        suback.return_codes.iter().all(|c| *c == rumqttc::SubscribeReasonCode::Failure),
        "{:?}",
        suback.return_codes
    );
}

#[tokio::test]
async fn forbidden_publishes_disconnect() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let (other, _) = s.create_device(None).await;
    for (topic, retain) in [
        (format!("/devices/{other}/kv"), false),
        (format!("/devices/{dev}/command"), false),
        (format!("/devices/{dev}/kv"), true),
    ] {
        let mut c = TestServer::mqtt_connect(s.mqtt_options(dev, &key)).await.expect("connect");
        c.client
            .publish(topic.clone(), QoS::AtLeastOnce, retain, r#"{"action":"set","key":"k","value":1}"#)
            .await
            .expect("publish");
        c.ended().await;
    }
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 0, "nothing was applied");
}

#[tokio::test]
async fn invalid_payloads_are_acknowledged_but_not_applied() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let (mut c, _) = s.mqtt_device(dev, &key).await;
    for payload in
        ["not json", r#"{"action":"set","key":"a/b","value":1}"#, r#"{"action":"set","key":"k","value":null}"#]
    {
        c.client.publish(format!("/devices/{dev}/kv"), QoS::AtLeastOnce, false, payload).await.expect("publish");
        loop {
            if let Packet::PubAck(_) = c.next_packet().await.expect("still connected") {
                break;
            }
        }
    }
    c.client
        .publish(format!("/devices/{dev}/kv"), QoS::AtLeastOnce, false, r#"{"action":"set","key":"ok","value":1}"#)
        .await
        .expect("publish");
    assert_eq!(c.next_json().await["rev"], 1, "the session stayed up and the next valid write is rev 1");
    let metrics = s.req(Method::GET, "/metrics", None).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("ddp_mqtt_rejected_publishes_total"), "rejected publishes are counted");
}

#[tokio::test]
async fn mqtt5_clients_get_reason_codes() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let addr = s.mqtt_addr.expect("mqtt");
    let mut options = rumqttc::v5::MqttOptions::new("v5", addr.ip().to_string(), addr.port());
    options.set_credentials(dev.to_string(), key.clone());
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 16);
    let mut next = async || loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await.expect("in time") {
            Ok(rumqttc::v5::Event::Incoming(p)) => return Ok(p),
            Ok(_) => continue,
            Err(e) => return Err(e.to_string()),
        }
    };
    assert!(
        matches!(next().await, Ok(P5::ConnAck(a)) if a.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success)
    );
    client.subscribe(format!("/devices/{dev}/kv"), rumqttc::v5::mqttbytes::QoS::AtMostOnce).await.expect("subscribe");
    let reload = loop {
        if let Ok(P5::Publish(p)) = next().await {
            break serde_json::from_slice::<serde_json::Value>(&p.payload).expect("json");
        }
    };
    assert_eq!(reload["action"], "reload");
    client
        .publish(format!("/devices/{dev}/kv"), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "not json")
        .await
        .expect("publish");
    let ack = loop {
        if let Ok(P5::PubAck(a)) = next().await {
            break a;
        }
    };
    assert_eq!(ack.reason, PubAckReason::PayloadFormatInvalid, "MQTT 5 says why it was not applied");
    client
        .publish(
            format!("/devices/{dev}/kv"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"action":"set","key":"k","value":1}"#,
        )
        .await
        .expect("publish");
    let (mut acked, mut echoed) = (false, false);
    while !(acked && echoed) {
        match next().await {
            Ok(P5::PubAck(a)) => {
                assert_eq!(a.reason, PubAckReason::Success);
                acked = true;
            }
            Ok(P5::Publish(p)) => {
                assert_eq!(serde_json::from_slice::<serde_json::Value>(&p.payload).expect("json")["rev"], 1);
                echoed = true;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    client
        .publish(format!("/devices/{}/kv", dev + 1000), rumqttc::v5::mqttbytes::QoS::AtMostOnce, false, "{}")
        .await
        .expect("publish");
    let ended = loop {
        match next().await {
            Ok(P5::Disconnect(d)) => break format!("{:?}", d.reason_code),
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(ended.contains("NotAuthorized"), "an MQTT 5 client hears why it is disconnected: {ended}");
}

#[tokio::test]
async fn a_cross_transport_device_sees_one_rev_sequence_everywhere() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 0).await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let (mut mqtt, _) = s.mqtt_device(dev, &key).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    let status = s.admin(Method::GET, &d).send().await.expect("get").json::<serde_json::Value>().await.expect("json");
    assert_eq!(status["isConnected"], true);
    for i in 0..30 {
        match i % 3 {
            0 => {
                s.put(&d, &format!("k{}", i % 5), json!(i)).await;
            }
            1 => mqtt
                .client
                .publish(
                    format!("{d}/kv"),
                    QoS::AtLeastOnce,
                    false,
                    json!({"action":"set","key":format!("k{}", i % 5),"value":i}).to_string(),
                )
                .await
                .expect("publish"),
            _ => ws.send_json(&json!({"action":"set","key":format!("k{}", i % 5),"value":i})).await,
        }
    }
    let mut over_mqtt = Vec::new();
    while over_mqtt.len() < 30 {
        over_mqtt.push(mqtt.next_json().await["rev"].as_u64().expect("rev"));
    }
    let mut over_ws = Vec::new();
    while over_ws.len() < 30 {
        over_ws.push(ws.next_json().await["rev"].as_u64().expect("rev"));
    }
    assert_eq!(over_mqtt, (1..=30).collect::<Vec<_>>());
    assert_eq!(over_ws, over_mqtt, "both sessions saw the same sequence");
}

#[tokio::test]
async fn rotation_deletion_and_the_session_cap_apply_to_mqtt_too() {
    let s = TestServer::start_with(|c| c.sessions.max_per_device = 2).await;
    let (dev, key) = s.create_device(None).await;
    let (mut one, _) = s.mqtt_device(dev, &key).await;
    let _ws = s.ws_open(dev, &key, "").await;
    let third = TestServer::mqtt_connect(s.mqtt_options(dev, &key)).await.err().unwrap_or_default();
    assert!(third.contains("ServiceUnavailable"), "the cap counts both transports: {third}");
    let rotate = s.admin(Method::POST, &format!("/devices/{dev}/apiKey")).send().await.expect("rotate");
    assert_eq!(rotate.status(), StatusCode::OK);
    one.ended().await;

    let (dev2, key2) = s.create_device(None).await;
    let (mut two, _) = s.mqtt_device(dev2, &key2).await;
    let del = s.admin(Method::DELETE, &format!("/devices/{dev2}")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    two.ended().await;
}

#[tokio::test]
async fn connection_state_follows_the_last_session_across_transports() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let path = format!("/devices/{dev}");
    let (mqtt, _) = s.mqtt_device(dev, &key).await;
    let ws = s.ws_open(dev, &key, "").await;
    drop(mqtt);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status =
        s.admin(Method::GET, &path).send().await.expect("get").json::<serde_json::Value>().await.expect("json");
    assert_eq!(status["isConnected"], true, "the WebSocket session is still open");
    ws.close().await;
    for _ in 0..100 {
        let status =
            s.admin(Method::GET, &path).send().await.expect("get").json::<serde_json::Value>().await.expect("json");
        if status["isConnected"] == false {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("isConnected did not drop with the last session");
}

#[tokio::test]
async fn shutdown_disconnects_mqtt_sessions() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let (mut c, _) = s.mqtt_device(dev, &key).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    let stopping = tokio::spawn(s.stop());
    c.ended().await;
    assert_eq!(ws.end().await, WsEnd::Closed(1001));
    stopping.await.expect("stopped");
}

// ---- the protocol's edges, with a raw client ----

async fn raw_connect(s: &TestServer, device: u64, key: &str, keep_alive: u16) -> TcpStream {
    raw::mqtt_connect(s.mqtt_addr.expect("mqtt"), device, key, keep_alive).await
}

#[tokio::test]
async fn a_retransmitted_qos1_publish_is_applied_once() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut stream = raw_connect(&s, dev, &key, 0).await;
    let topic = format!("/devices/{dev}/kv");
    stream
        .write_all(&publish_packet(&topic, r#"{"action":"set","key":"k","value":1}"#, 7, false))
        .await
        .expect("write");
    assert_eq!(read_packet(&mut stream).await, Some((0x40, vec![0, 7])), "PUBACK 7");
    stream.write_all(&publish_packet(&topic, r#"{"action":"set","key":"k","value":1}"#, 7, true)).await.expect("write");
    assert_eq!(read_packet(&mut stream).await, Some((0x40, vec![0, 7])), "the retransmission is acknowledged again");
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 1, "but applied once");
    stream
        .write_all(&publish_packet(&topic, r#"{"action":"set","key":"k","value":2}"#, 7, false))
        .await
        .expect("write");
    assert_eq!(read_packet(&mut stream).await, Some((0x40, vec![0, 7])));
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 2, "a reused id without DUP is a new message");
}

#[tokio::test]
async fn connect_must_be_first_and_in_time() {
    let s = TestServer::start_with(|c| c.mqtt.connect_timeout = Duration::from_millis(300)).await;
    let mut silent = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await.expect("tcp");
    assert_eq!(read_packet(&mut silent).await, None, "no CONNECT in time: closed");
    let mut ping_first = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await.expect("tcp");
    ping_first.write_all(&[0xC0, 0x00]).await.expect("write");
    assert_eq!(read_packet(&mut ping_first).await, None, "PINGREQ before CONNECT: closed");
    let (dev, key) = s.create_device(None).await;
    let mut twice = raw_connect(&s, dev, &key, 0).await;
    twice.write_all(&connect_packet(dev, &key, 0)).await.expect("write");
    assert_eq!(read_packet(&mut twice).await, None, "a second CONNECT: closed");
}

#[tokio::test]
async fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut stream = raw_connect(&s, dev, &key, 1).await;
    stream.write_all(&[0xC0, 0x00]).await.expect("PINGREQ");
    assert_eq!(read_packet(&mut stream).await, Some((0xD0, vec![])), "PINGRESP");
    let started = tokio::time::Instant::now();
    assert_eq!(read_packet(&mut stream).await, None, "closed after silence");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(5), "closed after {waited:?}");
}

#[tokio::test]
async fn packets_over_the_limit_close_the_connection() {
    let s = TestServer::start_with(|c| c.mqtt.max_packet = 1024).await;
    let (dev, key) = s.create_device(None).await;
    let mut stream = raw_connect(&s, dev, &key, 0).await;
    let big = format!(r#"{{"action":"set","key":"k","value":"{}"}}"#, "x".repeat(2000));
    stream.write_all(&publish_packet(&format!("/devices/{dev}/kv"), &big, 1, false)).await.expect("write");
    assert_eq!(read_packet(&mut stream).await, None);
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 0);
}

#[tokio::test]
async fn mosquitto_clients_work_against_the_server() {
    let found = std::process::Command::new("mosquitto_sub").arg("--help").output();
    assert!(found.is_ok(), "mosquitto_sub not found: install the Debian package mosquitto-clients (scripts/test does)");
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let addr = s.mqtt_addr.expect("mqtt");
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let topic = format!("/devices/{dev}/kv");
    let user = dev.to_string();
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h", &host, "-p", &port, "-u", &user, "-P", &key, "-t", &topic, "-C", "2", "-W", "10", "-V", "mqttv311",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub");
    // The reload comes first; wait for the subscriber to be live before writing.
    for _ in 0..100 {
        let status = s
            .admin(Method::GET, &format!("/devices/{dev}"))
            .send()
            .await
            .expect("get")
            .json::<serde_json::Value>()
            .await
            .expect("json");
        if status["isConnected"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &host, "-p", &port, "-u", &user, "-P", &key, "-t", &topic, "-q", "1", "-V", "mqttv311"])
        .args(["-m", r#"{"action":"set","key":"from-mosquitto","value":[1,2.50]}"#])
        .status()
        .await
        .expect("mosquitto_pub");
    assert!(published.success(), "mosquitto_pub exited with {published}");
    let out = sub.wait_with_output().await.expect("mosquitto_sub output");
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 2, "reload and set: {lines:?}");
    assert_eq!(lines[0]["action"], "reload");
    let raw = serde_json::to_string(&lines[1]).expect("json");
    assert!(raw.contains(r#""key":"from-mosquitto""#) && lines[1]["rev"] == 1, "{raw}");
}

#[tokio::test]
async fn the_tls_listener_serves_mqtts() {
    let (s, ca_pem) = TestServer::start_with_mqtt_tls(&["localhost", "127.0.0.1"]).await;
    let (dev, key) = s.create_device(None).await;
    let tls_addr = s.mqtt_tls_addr.expect("tls listener");
    let mut options = rumqttc::MqttOptions::new("tls", "localhost", tls_addr.port());
    options.set_credentials(dev.to_string(), key);
    options.set_transport(rumqttc::Transport::tls(ca_pem.into_bytes(), None, None));
    let mut c = TestServer::mqtt_connect(options).await.expect("TLS connect");
    c.client.subscribe(format!("/devices/{dev}/kv"), QoS::AtMostOnce).await.expect("subscribe");
    assert_eq!(c.next_json().await["action"], "reload");
}

#[tokio::test]
async fn a_busy_mqtt_port_names_the_flag_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = TestServer::config(&dir.path().join("data"));
    config.mqtt.listen = Some(taken.local_addr().expect("addr"));
    let err = ddp_server::Server::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("--mqtt-listen"), "{err}");
}

// ---- every connection answers to the gate (issue: hardening) ----

/// Connects over MQTT 5 with a raw client (announcing `max_packet` when given); returns the
/// stream once the CONNACK accepted it.
async fn raw_connect_v5(s: &TestServer, device: u64, key: &str, max_packet: Option<u32>) -> TcpStream {
    let mut stream = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await.expect("tcp");
    stream.write_all(&raw::connect_v5_packet(device, key, max_packet)).await.expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0x00), "CONNACK accepted");
    stream
}

/// Reads until the server's DISCONNECT (MQTT 5) and returns its reason code; asserts the
/// connection then ends.
async fn disconnect_reason(stream: &mut TcpStream) -> u8 {
    loop {
        match read_packet(stream).await {
            Some((0xE0, body)) => {
                assert_eq!(read_packet(stream).await, None, "the server closes after DISCONNECT");
                return body.first().copied().unwrap_or(0);
            }
            Some(_) => continue,
            None => panic!("the connection ended without a DISCONNECT"),
        }
    }
}

#[tokio::test]
async fn a_connection_that_never_subscribed_is_closed_when_its_key_is_rotated_or_its_device_deleted() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut v5 = raw_connect_v5(&s, dev, &key, None).await;
    let mut v3 = raw_connect(&s, dev, &key, 0).await;
    let rotate = s.admin(Method::POST, &format!("/devices/{dev}/apiKey")).send().await.expect("rotate");
    assert_eq!(rotate.status(), StatusCode::OK);
    assert_eq!(disconnect_reason(&mut v5).await, 0x98, "administrative action");
    // Whatever it sends next is not applied: the connection is gone.
    let _ = v3
        .write_all(&publish_packet(&format!("/devices/{dev}/kv"), r#"{"action":"set","key":"k","value":1}"#, 1, false))
        .await;
    assert_eq!(read_packet(&mut v3).await, None, "the 3.1.1 connection is closed, no PUBACK");
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 0, "nothing was applied");

    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let mut events = s.events_open(ADMIN_KEY, "").await;
    let mut c = TestServer::mqtt_connect(s.mqtt_options(dev, &key)).await.expect("connect");
    assert_eq!(events.next_json().await["eventType"], "_deviceConnected_");
    c.client.subscribe(format!("/devices/{dev}/kv"), QoS::AtMostOnce).await.expect("subscribe");
    assert_eq!(c.next_json().await["action"], "reload");
    c.client.unsubscribe(format!("/devices/{dev}/kv")).await.expect("unsubscribe");
    while !matches!(c.next_packet().await, Ok(Packet::UnsubAck(_))) {}
    let del = s.admin(Method::DELETE, &format!("/devices/{dev}")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    c.ended().await;
    // Nothing more is raised through the closed connection (a deleted device raises no events).
    c.client.publish(format!("/devices/{dev}/event"), QoS::AtMostOnce, false, r#"{"eventType":"late"}"#).await.ok();
    assert!(events.quiet_for(Duration::from_millis(300)).await, "no event from the closed connection");
}

#[tokio::test]
async fn over_its_rate_an_mqtt_311_device_is_held_back_in_order_and_keeps_being_answered() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 5).await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let mut stream = raw_connect(&s, dev, &key, 0).await; // the CONNECT takes one of 10 tokens
    stream.write_all(&raw::subscribe_packet(1, &format!("{d}/kv"), false)).await.expect("subscribe");
    assert_eq!(read_packet(&mut stream).await.map(|p| p.0), Some(0x90), "SUBACK");
    assert_eq!(read_packet(&mut stream).await.map(|p| p.0), Some(0x30), "the reload");
    let n = 16u16;
    let mut burst = Vec::new();
    for i in 1..=n {
        burst.extend(publish_packet(
            &format!("{d}/kv"),
            &format!(r#"{{"action":"set","key":"k","value":{i}}}"#),
            i,
            false,
        ));
    }
    burst.extend([0xC0, 0x00]); // and a PINGREQ behind them
    stream.write_all(&burst).await.expect("write");
    // Meanwhile the session still delivers what others write (the admin key is not limited).
    s.put(&d, "other", json!(true)).await;
    let (mut acks, mut echoes, mut pong_after, mut other_after) = (Vec::new(), Vec::new(), None, None);
    while acks.len() < usize::from(n) || echoes.len() < usize::from(n) || other_after.is_none() {
        let (first, body) = read_packet(&mut stream).await.expect("the connection stays open");
        match first {
            0x40 => acks.push(u16::from_be_bytes([body[0], body[1]])),
            0x30 => {
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let msg: serde_json::Value = serde_json::from_slice(&body[2 + topic_len..]).expect("json");
                match msg["key"].as_str() {
                    Some("k") => echoes.push(msg["value"].as_u64().expect("value")),
                    _ => other_after = Some(acks.len()),
                }
            }
            0xD0 => pong_after = Some(acks.len()),
            other => panic!("unexpected packet {other:#x}"),
        }
    }
    let pong = pong_after.expect("PINGRESP");
    assert!(pong < usize::from(n), "the PINGREQ was answered while writes were held ({pong} PUBACKs before it)");
    let delivered = other_after.expect("the other write");
    assert!(delivered < usize::from(n), "another client's write was delivered while writes were held");
    assert_eq!(acks, (1..=n).collect::<Vec<_>>(), "every publish acknowledged, in order");
    assert_eq!(echoes, (1..=u64::from(n)).collect::<Vec<_>>(), "and applied in the order sent");
    assert_eq!(s.store_rev(&d).await, u64::from(n) + 1);
}

#[tokio::test]
async fn over_its_rate_an_mqtt5_device_gets_quota_exceeded_and_nothing_is_applied() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 1).await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let d = format!("/devices/{dev}");
    let mut stream = raw_connect_v5(&s, dev, &key, None).await; // 1 of 2 tokens
    stream
        .write_all(&raw::publish_v5_packet(&format!("{d}/kv"), r#"{"action":"set","key":"a","value":1}"#, 1))
        .await
        .expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("PUBACK");
    assert_eq!((first, body[2]), (0x40, 0x00), "within the burst: applied");
    stream
        .write_all(&raw::publish_v5_packet(&format!("{d}/kv"), r#"{"action":"set","key":"b","value":1}"#, 2))
        .await
        .expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("PUBACK");
    assert_eq!((first, body[2]), (0x40, 0x97), "quota exceeded");
    stream.write_all(&raw::publish_v5_packet(&format!("{d}/event"), r#"{"eventType":"e"}"#, 3)).await.expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("PUBACK");
    assert_eq!((first, body[2]), (0x40, 0x97), "events count against the same rate");
    assert_eq!(s.store_rev(&d).await, 1, "the refused write was not applied");
}

#[tokio::test]
async fn connects_count_against_the_device_rate_too() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 1).await;
    let (dev, key) = s.create_device(None).await;
    for _ in 0..2 {
        drop(raw_connect(&s, dev, &key, 0).await); // the burst: two
    }
    let mut v3 = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await.expect("tcp");
    v3.write_all(&connect_packet(dev, &key, 0)).await.expect("write");
    assert_eq!(read_packet(&mut v3).await, Some((0x20, vec![0, 3])), "3.1.1: server unavailable");
    let mut v5 = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await.expect("tcp");
    v5.write_all(&raw::connect_v5_packet(dev, &key, None)).await.expect("write");
    let (first, body) = read_packet(&mut v5).await.expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0x9F), "5: connection rate exceeded");
}

#[tokio::test]
async fn json_that_is_not_an_object_is_refused_not_applied() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    let mut v5 = raw_connect_v5(&s, dev, &key, None).await;
    for (id, payload) in [(1, r#"["set","k",1]"#), (2, r#"["delete","k"]"#), (3, "17")] {
        v5.write_all(&raw::publish_v5_packet(&format!("{d}/kv"), payload, id)).await.expect("write");
        let (first, body) = read_packet(&mut v5).await.expect("PUBACK");
        assert_eq!((first, body[2]), (0x40, 0x99), "{payload}: payload format invalid");
    }
    assert_eq!(s.store_rev(&d).await, 0, "nothing was applied");
}

#[tokio::test]
async fn a_client_is_never_sent_more_than_its_maximum_packet_size() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "big", json!("x".repeat(20_000))).await;
    // A reload that cannot fit: DISCONNECT 0x95 instead of a 20 KB packet.
    let mut small = raw_connect_v5(&s, dev, &key, Some(1024)).await;
    small.write_all(&raw::subscribe_packet(1, &format!("{d}/kv"), true)).await.expect("subscribe");
    let mut reason = None;
    while let Some((first, body)) = read_packet(&mut small).await {
        assert!(body.len() + 2 <= 1024, "a {}-byte packet was sent to a client that takes 1024", body.len());
        if first == 0xE0 {
            reason = body.first().copied();
        }
    }
    assert_eq!(reason, Some(0x95), "packet too large");
    // A client that takes it gets it.
    let mut big = raw_connect_v5(&s, dev, &key, Some(64 * 1024)).await;
    big.write_all(&raw::subscribe_packet(1, &format!("{d}/kv"), true)).await.expect("subscribe");
    assert_eq!(read_packet(&mut big).await.map(|p| p.0), Some(0x90), "SUBACK");
    let (first, body) = read_packet(&mut big).await.expect("the reload");
    assert_eq!(first, 0x30);
    assert!(body.len() > 20_000);
    // A change that cannot fit ends a small client's session too (skipping it would leave a gap).
    let (dev2, key2) = s.create_device(None).await;
    let mut small = raw_connect_v5(&s, dev2, &key2, Some(1024)).await;
    small.write_all(&raw::subscribe_packet(1, &format!("/devices/{dev2}/kv"), true)).await.expect("subscribe");
    assert_eq!(read_packet(&mut small).await.map(|p| p.0), Some(0x90));
    assert_eq!(read_packet(&mut small).await.map(|p| p.0), Some(0x30), "the small reload fits");
    s.put(&format!("/devices/{dev2}"), "k", json!("y".repeat(2000))).await;
    assert_eq!(disconnect_reason(&mut small).await, 0x95);
}

#[tokio::test]
async fn malformed_fixed_size_packets_close_the_connection() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut v3 = raw_connect(&s, dev, &key, 0).await;
    v3.write_all(&[0xC0, 0x01, 0x00]).await.expect("a PINGREQ with a remaining length");
    assert_eq!(read_packet(&mut v3).await, None, "closed, no PINGRESP");
    let mut disconnect = raw_connect(&s, dev, &key, 0).await;
    disconnect.write_all(&[0xE0, 0x02, 0x00, 0x00]).await.expect("a 3.1.1 DISCONNECT with a body");
    assert_eq!(read_packet(&mut disconnect).await, None);
    let mut v5 = raw_connect_v5(&s, dev, &key, None).await;
    v5.write_all(&[0xC0, 0x01, 0x00]).await.expect("write");
    assert_eq!(disconnect_reason(&mut v5).await, 0x81, "malformed packet");
}
