//! MQTT over WebSocket (PROTOCOL.md §9): on the HTTP listener at `/mqtt` and on a listener of its
//! own (any path), with rumqttc's WebSocket transport and a raw client that splits and joins
//! packets across messages, as MODE's Go SDK v4 and browsers do.

use ddp_testkit::TestServer;
use ddp_testkit::raw::{RawMqttWs, RawWs, connect_packet, publish_packet, subscribe_packet};
use reqwest::{Method, StatusCode};
use rumqttc::{Packet, QoS};
use serde_json::{Value, json};

fn over_ws(url: String, device: u64, key: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(format!("ws-{device}"), url, 0);
    options.set_transport(rumqttc::Transport::Ws);
    options.set_credentials(device.to_string(), key);
    options.set_keep_alive(std::time::Duration::from_secs(30));
    options
}

async fn syncs_writes_and_takes_commands(s: &TestServer, url: String) {
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "mode", json!("eco")).await;
    let mut c = TestServer::mqtt_connect(over_ws(url, dev, &key)).await.expect("connect over WebSocket");
    c.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new(format!("{d}/kv"), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new(format!("{d}/command"), QoS::AtMostOnce),
        ])
        .await
        .expect("subscribe");
    let reload = c.next_json().await;
    assert_eq!((&reload["action"], &reload["rev"]), (&json!("reload"), &json!(1)));
    s.put(&d, "target", json!(21.5)).await;
    assert_eq!(c.next_json().await, json!({"action":"set","rev":2,"key":"target","value":21.5}));
    c.client
        .publish(format!("{d}/kv"), QoS::AtLeastOnce, false, r#"{"action":"set","key":"temp","value":19.75}"#)
        .await
        .expect("publish");
    let (mut acked, mut echo) = (false, None);
    while !acked || echo.is_none() {
        match c.next_packet().await.expect("open") {
            Packet::PubAck(_) => acked = true,
            Packet::Publish(p) => echo = Some(serde_json::from_slice::<Value>(&p.payload).expect("json")),
            _ => {}
        }
    }
    assert_eq!(echo.expect("echo")["rev"], 3);
    let sent = s.admin(Method::PUT, &format!("{d}/command")).body(r#"{"action":"blink"}"#).send().await;
    assert_eq!(sent.expect("command").status(), StatusCode::NO_CONTENT);
    loop {
        if let Packet::Publish(p) = c.next_packet().await.expect("open")
            && p.topic == format!("{d}/command")
        {
            assert_eq!(&p.payload[..], br#"{"action":"blink","parameters":{}}"#);
            break;
        }
    }
}

#[tokio::test]
async fn rumqttc_over_websocket_on_the_http_listener() {
    let s = TestServer::start().await;
    syncs_writes_and_takes_commands(&s, format!("ws://{}/mqtt", s.addr)).await;
}

#[tokio::test]
async fn rumqttc_over_websocket_on_a_listener_of_its_own_any_path() {
    let s = TestServer::start_with(|c| c.mqtt.ws_listen = Some("127.0.0.1:0".parse().expect("addr"))).await;
    let addr = s.mqtt_ws_addr.expect("the MQTT-over-WebSocket listener");
    syncs_writes_and_takes_commands(&s, format!("ws://{addr}/")).await;
    syncs_writes_and_takes_commands(&s, format!("ws://{addr}/any/path")).await;
}

/// A raw client like MODE's Go SDK v4: no subprotocol offered; packets split across messages and
/// several in one message.
#[tokio::test]
async fn packets_split_across_messages_and_joined_in_one_both_work() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "k", json!(1)).await;
    let (ws, head) = RawWs::open_with(s.addr, "/mqtt", &[]).await;
    assert!(!head.to_ascii_lowercase().contains("sec-websocket-protocol"), "none chosen when none offered: {head}");
    let mut c = RawMqttWs::new(ws);
    let connect = connect_packet(dev, &key, 30);
    let (first, rest) = connect.split_at(5);
    c.send_message(first).await; // half a CONNECT…
    c.send_message(rest).await; // …and the rest
    assert_eq!(c.next_packet().await, Some((0x20, vec![0, 0])), "CONNACK accepted");
    // SUBSCRIBE and a PUBLISH in one message, the PUBLISH's end in the next.
    let mut joined = subscribe_packet(1, &format!("{d}/kv"), false);
    let publish = publish_packet(&format!("{d}/kv"), r#"{"action":"set","key":"j","value":true}"#, 7, false);
    let cut = joined.len() + publish.len() / 2;
    joined.extend(&publish);
    c.send_message(&joined[..cut]).await;
    c.send_message(&joined[cut..]).await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let (first, body) = c.next_packet().await.expect("open");
        match first {
            0x90 => seen.push("suback".to_owned()),
            0x40 => seen.push(format!("puback {}", u16::from_be_bytes([body[0], body[1]]))),
            0x30 => {
                let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let msg: Value = serde_json::from_slice(&body[2 + topic..]).expect("json");
                seen.push(format!("{} {}", msg["action"].as_str().unwrap_or_default(), msg["rev"]));
            }
            other => panic!("unexpected packet {other:#x}"),
        }
    }
    seen.sort();
    assert_eq!(seen, ["puback 7", "reload 1", "set 2", "suback"]);
    assert_eq!(s.store_rev(&d).await, 2, "the split PUBLISH was applied once");
}

#[tokio::test]
async fn the_subprotocol_is_chosen_when_offered_and_the_rules_are_mqtts() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let (ws, head) = RawWs::open_with(s.addr, "/mqtt", &[("Sec-WebSocket-Protocol", "mqtt")]).await;
    assert!(head.to_ascii_lowercase().contains("sec-websocket-protocol: mqtt"), "{head}");
    // Same session rules as over TCP: a wrong key gets CONNACK 4 and the end.
    let mut c = RawMqttWs::new(ws);
    c.send_message(&connect_packet(dev, "ddpd_wrong", 0)).await;
    assert_eq!(c.next_packet().await, Some((0x20, vec![0, 4])), "bad user name or password");
    assert_eq!(c.next_packet().await, None);
    // A key rotation ends the session, whatever it subscribed to.
    let (ws, _) = RawWs::open_with(s.addr, "/mqtt", &[("Sec-WebSocket-Protocol", "mqtt")]).await;
    let mut c = RawMqttWs::new(ws);
    c.send_message(&connect_packet(dev, &key, 0)).await;
    assert_eq!(c.next_packet().await, Some((0x20, vec![0, 0])));
    let rotated = s.admin(Method::POST, &format!("/devices/{dev}/apiKey")).send().await.expect("rotate");
    assert_eq!(rotated.status(), StatusCode::OK);
    assert_eq!(c.next_packet().await, None, "closed by the rotation");
    // A text message is not MQTT.
    let (dev, key) = s.create_device(None).await;
    let (ws, _) = RawWs::open_with(s.addr, "/mqtt", &[]).await;
    let mut c = RawMqttWs::new(ws);
    c.send_message(&connect_packet(dev, &key, 0)).await;
    assert_eq!(c.next_packet().await, Some((0x20, vec![0, 0])));
    c.ws.send(&RawWs::frame(true, 0, 1, true, b"{}")).await;
    assert_eq!(c.next_packet().await, None, "closed");
}
