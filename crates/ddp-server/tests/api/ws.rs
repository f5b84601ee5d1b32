//! WebSocket sync sessions (PROTOCOL.md §4, §4.1).

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, WsEnd, WsOpen, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn reload_first_then_every_change_in_rev_order() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "b", json!("bee")).await;
    s.put(&d, "a", json!(1)).await;

    let mut ws = s.ws_open(dev, &key, "").await;
    let reload = ws.next_json().await;
    assert_eq!((&reload["action"], &reload["rev"], &reload["numItems"]), (&json!("reload"), &json!(2), &json!(2)));
    let keys: Vec<&str> = reload["items"].as_array().expect("items").iter().filter_map(|i| i["key"].as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    assert!(reload["items"][0]["modificationTime"].as_str().is_some());

    s.put(&d, "a", json!(2)).await;
    let del = s.admin(Method::DELETE, &format!("{d}/kv/b")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    s.put(&d, "c", json!({"x": [1.50]})).await;
    assert_eq!(ws.next_json().await, json!({"action":"set","rev":3,"key":"a","value":2}));
    assert_eq!(ws.next_json().await, json!({"action":"delete","rev":4,"key":"b"}));
    let set = ws.next_json().await;
    assert_eq!((&set["rev"], &set["key"]), (&json!(5), &json!("c")));
    ws.close().await;
}

#[tokio::test]
async fn device_frames_go_through_the_write_path_and_come_back_with_their_rev() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["rev"], 0);
    // The exact frame an old MODE SDK sends, extra fields and all.
    ws.send_text(r#"{"action":"set","rev":0,"key":"temp","value":21.50,"numItems":0,"items":null}"#).await;
    let echo = ws.next_json().await;
    assert_eq!((&echo["action"], &echo["rev"], &echo["key"]), (&json!("set"), &json!(1), &json!("temp")));
    let raw =
        s.admin(Method::GET, &format!("/devices/{dev}/kv/temp")).send().await.expect("get").text().await.expect("text");
    assert!(raw.contains("\"value\":21.50"), "the number is stored exactly: {raw}");
    ws.send_text(r#"{"action":"delete","key":"temp","value":null}"#).await;
    assert_eq!(ws.next_json().await, json!({"action":"delete","rev":2,"key":"temp"}));
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 2);
}

#[tokio::test]
async fn a_second_session_sees_the_first_ones_writes() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut one = s.ws_open(dev, &key, "").await;
    let mut two = s.ws_open(dev, &key, "").await;
    one.next_json().await;
    two.next_json().await;
    one.send_json(&json!({"action":"set","key":"k","value":"v"})).await;
    assert_eq!(two.next_json().await, json!({"action":"set","rev":1,"key":"k","value":"v"}));
    assert_eq!(one.next_json().await["rev"], 1);
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_session_stays_open() {
    let s = TestServer::start_with(|c| c.limits.max_keys_per_store = 1).await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    ws.next_json().await;
    let cases = [
        ("not json", "INVALID_JSON", None),
        (r#"{"action":"set","key":"a/b","value":1}"#, "INVALID_KEY", Some("a/b")),
        (r#"{"action":"set","key":"k","value":null}"#, "INVALID_VALUE", Some("k")),
        (r#"{"action":"explode","key":"k"}"#, "INVALID_PARAMETER", Some("k")),
        (r#"{"action":"delete","key":"missing"}"#, "KEY_NOT_FOUND", Some("missing")),
    ];
    for (frame, reason, key) in cases {
        ws.send_text(frame).await;
        let err = ws.next_json().await;
        assert_eq!((&err["action"], &err["reason"]), (&json!("error"), &json!(reason)), "frame {frame}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(err["key"].as_str(), key, "frame {frame}");
    }
    ws.send_json(&json!({"action":"set","key":"one","value":1})).await;
    assert_eq!(ws.next_json().await["rev"], 1, "still open and working");
    ws.send_json(&json!({"action":"set","key":"two","value":2})).await;
    assert_eq!(ws.next_json().await["reason"], "TOO_MANY_KEYS");
    let big = json!({"action":"set","key":"one","value":"x".repeat(70_000)});
    ws.send_json(&big).await;
    assert_eq!(ws.next_json().await["reason"], "VALUE_TOO_LARGE");
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 1, "refused frames changed nothing");
}

#[tokio::test]
async fn authentication_and_authorization_are_checked_before_the_upgrade() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, key) = s.create_device(Some(home)).await;
    let (_, other_key) = s.create_device(None).await;
    let (_, read_key) = s.create_api_key(Some(vec![home]), "read").await;
    let (_, elsewhere) = s.create_api_key(Some(vec![s.create_home("X").await]), "readWrite").await;

    let refused = |open: WsOpen| match open {
        WsOpen::Refused(status, body) => (status, body["reason"].as_str().unwrap_or_default().to_owned()),
        WsOpen::Open(_) => (101, String::new()),
    };
    assert_eq!(refused(s.ws_request(dev, None, "").await), (401, "UNAUTHENTICATED_CLIENT".into()));
    assert_eq!(refused(s.ws(dev, "ddpd_wrong", "").await), (401, "UNAUTHENTICATED_CLIENT".into()));
    assert_eq!(refused(s.ws(dev, &other_key, "").await), (403, "PERMISSION_DENIED".into()));
    assert_eq!(
        refused(s.ws(999_999, &key, "").await),
        (403, "PERMISSION_DENIED".into()),
        "devices never learn of others"
    );
    assert_eq!(refused(s.ws(dev, &elsewhere, "").await), (403, "PERMISSION_DENIED".into()));
    assert_eq!(refused(s.ws(999_999, ADMIN_KEY, "").await), (404, "DEVICE_NOT_FOUND".into()));
    assert_eq!(refused(s.ws(dev, &key, "?sinceRev=abc").await), (400, "INVALID_PARAMETER".into()));

    // ?authToken= works for browsers; apps with a read key may watch but not write.
    let mut watcher = match s.ws_request(dev, None, &format!("?authToken={read_key}")).await {
        WsOpen::Open(c) => *c,
        WsOpen::Refused(status, body) => panic!("{status} {body}"),
    };
    assert_eq!(watcher.next_json().await["action"], "reload");
    watcher.send_json(&json!({"action":"set","key":"k","value":1})).await;
    assert_eq!(watcher.next_json().await["reason"], "PERMISSION_DENIED");
    let mut admin = s.ws_open(dev, ADMIN_KEY, "").await;
    admin.next_json().await;
    admin.send_json(&json!({"action":"set","key":"k","value":1})).await;
    assert_eq!(admin.next_json().await["rev"], 1, "the admin may write through a session");
    assert_eq!(watcher.next_json().await["rev"], 1, "and watchers see it");
}

#[tokio::test]
async fn resume_inside_the_history_window_sends_only_what_was_missed() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    s.put(&d, "a", json!(1)).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["rev"], 1);
    ws.close().await;
    s.put(&d, "a", json!(2)).await;
    s.put(&d, "b", json!(3)).await;
    let del = s.admin(Method::DELETE, &format!("{d}/kv/a")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);

    let mut ws = s.ws_open(dev, &key, "?sinceRev=1").await;
    assert_eq!(ws.next_json().await, json!({"action":"resume","rev":1}));
    assert_eq!(ws.next_json().await, json!({"action":"set","rev":2,"key":"a","value":2}));
    assert_eq!(ws.next_json().await, json!({"action":"set","rev":3,"key":"b","value":3}));
    assert_eq!(ws.next_json().await, json!({"action":"delete","rev":4,"key":"a"}));
    s.put(&d, "c", json!(4)).await;
    assert_eq!(ws.next_json().await["rev"], 5, "then live, with no gap");

    let mut current = s.ws_open(dev, &key, "?sinceRev=5").await;
    assert_eq!(current.next_json().await, json!({"action":"resume","rev":5}));
    assert!(current.quiet_for(Duration::from_millis(200)).await, "nothing was missed");
    let mut future = s.ws_open(dev, &key, "?sinceRev=99").await;
    assert_eq!(future.next_json().await["action"], "reload", "a rev the server never handed out gets a reload");
}

#[tokio::test]
async fn resume_outside_the_history_window_gets_a_reload() {
    let s = TestServer::start_with(|c| {
        c.history.keep_changes = 1;
        c.history.keep_age = Duration::ZERO;
        c.history.trim_every = Duration::from_millis(50);
    })
    .await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    for i in 0..5 {
        s.put(&d, "k", json!(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // a trim ran
    let mut ws = s.ws_open(dev, &key, "?sinceRev=1").await;
    let first = ws.next_json().await;
    assert_eq!((&first["action"], &first["rev"]), (&json!("reload"), &json!(5)));
    assert_eq!(first["items"], json!([{"key":"k","value":4,"modificationTime":first["items"][0]["modificationTime"]}]));
}

#[tokio::test]
async fn key_rotation_and_deletion_close_sessions() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut device = s.ws_open(dev, &key, "").await;
    let mut watcher = s.ws_open(dev, ADMIN_KEY, "").await;
    device.next_json().await;
    watcher.next_json().await;
    let rotated = s.admin(Method::POST, &format!("/devices/{dev}/apiKey")).send().await.expect("rotate");
    assert_eq!(rotated.status(), StatusCode::OK);
    assert_eq!(device.end().await, WsEnd::Closed(4001), "the old key's session ends");
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    assert_eq!(watcher.next_json().await["rev"], 1, "the admin's watch goes on");
    let del = s.admin(Method::DELETE, &format!("/devices/{dev}")).send().await.expect("delete");
    assert_eq!(del.status(), StatusCode::NO_CONTENT);
    assert_eq!(watcher.end().await, WsEnd::Closed(4002));
}

#[tokio::test]
async fn revoked_project_keys_lose_their_sessions() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let (key_id, project) = s.create_api_key(None, "read").await;
    let mut ws = s.ws_open(dev, &project, "").await;
    ws.next_json().await;
    let revoke = s.admin(Method::DELETE, &format!("/apiKeys/{key_id}")).send().await.expect("revoke");
    assert_eq!(revoke.status(), StatusCode::NO_CONTENT);
    assert_eq!(ws.end().await, WsEnd::Closed(4003));
}

#[tokio::test]
async fn a_device_may_hold_only_so_many_sessions() {
    let s = TestServer::start_with(|c| c.sessions.max_per_device = 2).await;
    let (dev, key) = s.create_device(None).await;
    let one = s.ws_open(dev, &key, "").await;
    let _two = s.ws_open(dev, &key, "").await;
    match s.ws(dev, &key, "").await {
        WsOpen::Refused(status, body) => {
            assert_eq!((status, body["reason"].as_str()), (429, Some("TOO_MANY_CONNECTIONS")));
            assert_eq!(body["data"]["limit"], 2);
        }
        WsOpen::Open(_) => panic!("a third session was accepted"),
    }
    let _watcher = s.ws_open(dev, ADMIN_KEY, "").await; // apps do not count against the device
    one.close().await;
    for _ in 0..50 {
        if let WsOpen::Open(_) = s.ws(dev, &key, "").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a closed session's place was not freed");
}

#[tokio::test]
async fn connection_state_is_recorded() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let path = format!("/devices/{dev}");
    let mut ws = s.ws_open(dev, &key, "").await;
    ws.next_json().await;
    let during = expect_json(s.admin(Method::GET, &path).send().await, StatusCode::OK).await;
    assert_eq!(during["isConnected"], true);
    ws.close().await;
    for _ in 0..100 {
        let after = expect_json(s.admin(Method::GET, &path).send().await, StatusCode::OK).await;
        if after["isConnected"] == false && after["lastDisconnectTime"].is_string() {
            assert!(after["lastConnectTime"].is_string());
            assert!(after["lastDisconnectTime"].as_str() >= after["lastConnectTime"].as_str());
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("disconnection was not recorded");
}

#[tokio::test]
async fn silent_peers_are_closed_after_twice_the_idle_interval() {
    let s = TestServer::start_with(|c| c.sessions.idle = Duration::from_millis(100)).await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    // Not reading means not answering the server's pings.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ws.end().await, WsEnd::Closed(4008));
}

#[tokio::test]
async fn shutdown_closes_sessions_as_going_away() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    ws.next_json().await;
    let stopping = tokio::spawn(s.stop());
    assert_eq!(ws.end().await, WsEnd::Closed(1001));
    stopping.await.expect("stopped");
}

#[tokio::test]
async fn large_messages_arrive_whole_even_when_sent_in_fragments() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = format!("/devices/{dev}");
    // Multi-byte characters at every offset, so some fall across fragment boundaries.
    let text: String = (0..20_000).map(|i| ['a', 'é', '€', '😀'][i % 4]).collect();
    s.put(&d, "big", json!(text)).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    let reload = ws.next_json().await;
    assert_eq!(reload["items"][0]["value"], json!(text));
    s.put(&d, "big", json!(format!("{text}!"))).await;
    assert_eq!(ws.next_json().await["value"], json!(format!("{text}!")));
}

#[tokio::test]
async fn a_malformed_upgrade_is_a_clear_400() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let resp = s
        .req(Method::GET, &format!("/devices/{dev}/kv"), Some(&key))
        .header("Connection", "upgrade")
        .header("Upgrade", "websocket")
        .send()
        .await
        .expect("request");
    let body = ddp_testkit::expect_error(Ok(resp), StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    assert!(body["message"].as_str().is_some_and(|m| m.contains("Sec-WebSocket")), "{body}");
}

// ---- every connection answers to the gate (issue: hardening) ----

#[tokio::test]
async fn json_that_is_not_an_object_gets_invalid_json_and_writes_nothing() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await;
    ws.next_json().await;
    for frame in [r#"["set","k",1]"#, r#"["delete","k"]"#, "true", r#""set""#] {
        ws.send_text(frame).await;
        let error = ws.next_json().await;
        assert_eq!((&error["action"], &error["reason"]), (&json!("error"), &json!("INVALID_JSON")), "{frame}: {error}");
    }
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 0, "nothing was applied");
}

#[tokio::test]
async fn frames_over_the_rate_get_an_error_frame_and_opens_over_it_get_429() {
    let s = TestServer::start_with(|c| c.rate_limits.device_per_sec = 1).await;
    let (dev, key) = s.create_device(None).await;
    let mut ws = s.ws_open(dev, &key, "").await; // the open takes one of two tokens
    ws.next_json().await;
    ws.send_json(&json!({"action":"set","key":"a","value":1})).await;
    assert_eq!(ws.next_json().await["rev"], 1, "within the burst");
    ws.send_json(&json!({"action":"set","key":"b","value":1})).await;
    let refused = ws.next_json().await;
    assert_eq!((&refused["reason"], &refused["key"]), (&json!("RATE_LIMIT_EXCEEDED"), &json!("b")), "{refused}");
    match s.ws(dev, &key, "").await {
        WsOpen::Refused(status, body) => assert_eq!((status, &body["reason"]), (429, &json!("RATE_LIMIT_EXCEEDED"))),
        WsOpen::Open(_) => panic!("a session was opened over the rate"),
    }
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 1, "the refused write was not applied");
}

#[tokio::test]
async fn a_scoped_watcher_whose_device_leaves_its_homes_is_closed_with_4004() {
    let s = TestServer::start().await;
    let (a, b) = (s.create_home("A").await, s.create_home("B").await);
    let (dev, _) = s.create_device(Some(a)).await;
    let (_, scoped) = s.create_api_key(Some(vec![a]), "read").await;
    let (_, both) = s.create_api_key(Some(vec![a, b]), "read").await;
    let mut narrow = s.ws_open(dev, &scoped, "").await;
    let mut wide = s.ws_open(dev, &both, "").await;
    narrow.next_json().await;
    wide.next_json().await;
    let moved = s.admin(Method::PATCH, &format!("/devices/{dev}")).json(&json!({ "homeId": b })).send().await;
    assert_eq!(moved.expect("move").status(), StatusCode::OK);
    assert_eq!(narrow.end().await, WsEnd::Closed(4004), "access changed: reconnect to be checked again");
    s.put(&format!("/devices/{dev}"), "k", json!(1)).await;
    assert_eq!(wide.next_json().await["rev"], 1, "a key that still sees the device keeps its session");
    match s.ws(dev, &scoped, "").await {
        WsOpen::Refused(status, _) => assert_eq!(status, 403, "checked again on reconnect"),
        WsOpen::Open(_) => panic!("the moved device is still visible to the narrow key"),
    }
}

#[tokio::test]
async fn protocol_violations_get_rfc_6455_close_codes() {
    use ddp_testkit::raw::RawWs;
    let s = TestServer::start_with(|c| c.limits.max_body_bytes = 4096).await;
    let (dev, key) = s.create_device(None).await;
    let path = format!("/devices/{dev}/kv");
    let text = |fin, payload: &[u8]| RawWs::frame(fin, 0, 1, true, payload);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid UTF-8 in a text frame", text(true, &[b'{', 0xff, 0xfe, b'}']), 1007),
        ("an unmasked client frame", RawWs::frame(true, 0, 1, false, b"{}"), 1002),
        ("reserved bits set", RawWs::frame(true, 4, 1, true, b"{}"), 1002),
        ("a reserved data opcode", RawWs::frame(true, 0, 3, true, b"{}"), 1002),
        ("a reserved control opcode", RawWs::frame(true, 0, 0xB, true, b""), 1002),
        ("a fragmented ping", RawWs::frame(false, 0, 9, true, b"x"), 1002),
        ("a continuation with nothing to continue", RawWs::frame(true, 0, 0, true, b"{}"), 1002),
        ("a frame over the limit", text(true, &vec![b' '; 5000]), 1009),
        (
            "a message over the limit",
            [text(false, &[b' '; 3000]), RawWs::frame(true, 0, 0, true, &[b' '; 3000])].concat(),
            1009,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut ws = RawWs::open(s.addr, &path, &key).await;
        assert_eq!(ws.next_frame().await.map(|f| f.opcode), Some(1), "the reload comes first");
        ws.send(&bytes).await;
        assert_eq!(ws.close_code().await, Some(code), "{what}");
    }
    // The event stream answers the same way.
    let mut events = RawWs::open(s.addr, "/events/websocket", ADMIN_KEY).await;
    events.send(&RawWs::frame(true, 0, 1, false, b"{}")).await;
    assert_eq!(events.close_code().await, Some(1002), "event stream: unmasked frame");
}

/// A client that closes gets the server's Close frame back (RFC 6455 §5.5.1), on every kind
/// of WebSocket: browsers report such a session as closed cleanly (1000), not 1006.
#[tokio::test]
async fn a_close_from_the_client_is_answered_with_a_close_frame() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    for path in [
        format!("/devices/{dev}/kv?authToken={key}"),
        format!("/devices/{dev}/command?authToken={key}"),
        format!("/events/websocket?authToken={ADMIN_KEY}"),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{path}", s.addr)).await.expect("connect");
        if path.contains("/kv") {
            let first = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("reload in time");
            assert!(matches!(first, Some(Ok(Message::Text(_)))), "{path}: {first:?}");
        }
        ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })))
            .await
            .expect("send close");
        let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("an answer in time");
        match answer {
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal), "{path}: the close code is echoed");
            }
            other => panic!("{path}: the server ended without a Close frame: {other:?}"),
        }
    }
}
