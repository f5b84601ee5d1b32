//! The `ddp` client commands: the real binary against a real server.

use std::process::Stdio;
use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn command(s: &TestServer, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddp"));
    cmd.args(args).env("DDP_SERVER", &s.base).env_remove("DDP_TOKEN").env("DDP_DATA_DIR", "/nonexistent-ddp-data");
    if let Some(t) = token {
        cmd.env("DDP_TOKEN", t);
    }
    cmd
}

async fn ddp(s: &TestServer, token: Option<&str>, args: &[&str]) -> Run {
    let output = command(s, token, args).output().await.expect("ddp runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn ok(s: &TestServer, args: &[&str]) -> String {
    let run = ddp(s, Some(ADMIN_KEY), args).await;
    assert_eq!(run.code, 0, "ddp {args:?} failed: {}", run.err);
    run.out
}

async fn json(s: &TestServer, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = ok(s, &with_json).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ddp {args:?} --json printed no JSON ({e}): {out}"))
}

async fn fails(s: &TestServer, token: Option<&str>, args: &[&str], reason: &str) {
    let run = ddp(s, token, args).await;
    assert_eq!(run.code, 1, "ddp {args:?} should fail; stdout: {}", run.out);
    assert!(run.err.contains(reason), "ddp {args:?}: expected {reason} in {:?}", run.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homes_devices_and_keys() {
    let s = TestServer::start().await;
    assert!(ok(&s, &["home", "create", "--name", "Kitchen"]).await.contains("created home 1 (Kitchen)"));
    let table = ok(&s, &["home", "list"]).await;
    assert!(table.starts_with("ID  NAME     CREATED") && table.contains("1   Kitchen"), "{table}");
    assert_eq!(json(&s, &["home", "show", "1"]).await["name"], "Kitchen");

    let created = ok(&s, &["device", "create", "--name", "Thermostat", "--home", "1", "--class", "thermo"]).await;
    assert!(
        created.contains("created device 1 (Thermostat)") && created.contains("API key (shown only now): ddpd_"),
        "{created}"
    );
    let device = json(&s, &["device", "create", "--name", "Sensor"]).await;
    let key = device["apiKey"].as_str().expect("key").to_owned();
    let list = ok(&s, &["device", "list"]).await;
    assert!(list.contains("Thermostat") && list.contains("Sensor") && list.contains("CONNECTED"), "{list}");
    assert_eq!(json(&s, &["device", "list", "--home", "1"]).await.as_array().map(Vec::len), Some(1));
    let shown = ok(&s, &["device", "show", "1"]).await;
    assert!(shown.contains("class            thermo") && shown.contains("connected        false"), "{shown}");

    assert!(ok(&s, &["device", "move", "2", "--home", "1"]).await.contains("device 2 is in home 1 now"));
    assert!(ok(&s, &["device", "move", "2", "--no-home"]).await.contains("in no home"));
    let rotated = json(&s, &["device", "rotate-key", "2"]).await;
    assert_ne!(rotated["apiKey"].as_str(), Some(key.as_str()));
    fails(&s, Some(&key), &["device", "show", "2"], "UNAUTHENTICATED_CLIENT").await;
    let new_key = rotated["apiKey"].as_str().expect("new key");
    assert_eq!(ddp(&s, Some(new_key), &["device", "show", "2"]).await.code, 0, "a device may show its own record");

    let api_key = ok(&s, &["apikey", "create", "--name", "dash", "--home", "1", "--read-only"]).await;
    assert!(api_key.contains("created API key 1 (dash, read)") && api_key.contains("ddpp_"), "{api_key}");
    let keys = ok(&s, &["apikey", "list"]).await;
    assert!(
        keys.contains("dash") && keys.contains("[1]") && !keys.contains("ddpp_"),
        "secrets are never listed: {keys}"
    );
    assert!(ok(&s, &["apikey", "revoke", "1"]).await.contains("revoked API key 1"));
    fails(&s, Some(ADMIN_KEY), &["apikey", "revoke", "1"], "API_KEY_NOT_FOUND").await;

    assert!(ok(&s, &["device", "delete", "2"]).await.contains("deleted device 2"));
    assert!(ok(&s, &["home", "delete", "1"]).await.contains("deleted home 1"));
    fails(&s, Some(ADMIN_KEY), &["home", "show", "1"], "HOME_NOT_FOUND").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_values_on_devices_and_homes() {
    let s = TestServer::start().await;
    let (dev, _) = s.create_device(None).await;
    let home = s.create_home("H").await;
    let d = dev.to_string();
    assert_eq!(ok(&s, &["kv", "set", "--device", &d, "target", "21.50"]).await.trim(), "set target = 21.50 at rev 1");
    assert_eq!(ok(&s, &["kv", "set", "--device", &d, "mode", "eco"]).await.trim(), r#"set mode = "eco" at rev 2"#);
    ok(&s, &["kv", "set", "--device", &d, "schedule", r#"{"on":"07:00","days":[1,2]}"#]).await;
    assert_eq!(ok(&s, &["kv", "get", "--device", &d, "target"]).await.trim(), "21.50", "numbers exactly as stored");
    assert_eq!(ok(&s, &["kv", "get", "--device", &d, "mode"]).await.trim(), r#""eco""#);
    let raw = ok(&s, &["kv", "get", "--device", &d, "target", "--json"]).await;
    assert!(raw.contains(r#""value":21.50"#), "{raw}");

    let list = ok(&s, &["kv", "list", "--device", &d]).await;
    assert!(
        list.contains("KEY")
            && list.contains(r#"{"on":"07:00","days":[1,2]}"#)
            && list.contains("(3 keys, store at rev 3)"),
        "{list}"
    );
    let prefixed = json(&s, &["kv", "list", "--device", &d, "--prefix", "ta"]).await;
    assert_eq!(prefixed.as_array().map(Vec::len), Some(1));

    // Conditional writes.
    assert!(ok(&s, &["kv", "set", "--device", &d, "mode", "away", "--if-rev", "2"]).await.contains("at rev 4"));
    fails(&s, Some(ADMIN_KEY), &["kv", "set", "--device", &d, "mode", "home", "--if-rev", "2"], "REVISION_MISMATCH")
        .await;
    fails(&s, Some(ADMIN_KEY), &["kv", "delete", "--device", &d, "mode", "--if-rev", "3"], "REVISION_MISMATCH").await;
    assert_eq!(json(&s, &["kv", "delete", "--device", &d, "mode", "--if-rev", "4"]).await["rev"], 5);
    fails(&s, Some(ADMIN_KEY), &["kv", "get", "--device", &d, "mode"], "KEY_NOT_FOUND").await;

    // The same on a home's store.
    let h = home.to_string();
    assert!(ok(&s, &["kv", "set", "--home", &h, "away", "true"]).await.contains("set away = true at rev 1"));
    assert_eq!(ok(&s, &["kv", "get", "--home", &h, "away"]).await.trim(), "true");
    assert!(ok(&s, &["kv", "delete", "--home", &h, "away"]).await.contains("deleted away at rev 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_print_the_reason_and_exit_non_zero() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = dev.to_string();
    fails(&s, Some("ddpd_not-a-key"), &["home", "list"], "UNAUTHENTICATED_CLIENT").await;
    fails(&s, Some(&key), &["home", "list"], "PERMISSION_DENIED").await;
    fails(&s, Some(ADMIN_KEY), &["kv", "get", "--device", "999999", "k"], "DEVICE_NOT_FOUND").await;
    fails(&s, Some(ADMIN_KEY), &["kv", "set", "--device", &d, "a/b", "1"], "INVALID_KEY").await;
    fails(&s, Some(ADMIN_KEY), &["kv", "set", "--device", &d, "bad key", "1"], "INVALID_KEY").await;
    fails(&s, None, &["home", "list"], "no token").await;
    let unreachable = ddp(&s, Some(ADMIN_KEY), &["home", "list", "--server", "http://127.0.0.1:9"]).await;
    assert!(unreachable.code == 1 && unreachable.err.contains("cannot reach"), "{}", unreachable.err);
    let usage = ddp(&s, Some(ADMIN_KEY), &["kv", "get", "k"]).await;
    assert_eq!(usage.code, 2, "a usage error (no --device or --home) is exit 2: {}", usage.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_help_with_examples() {
    let s = TestServer::start().await;
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["home", "create", "--help"],
        vec!["home", "list", "--help"],
        vec!["device", "create", "--help"],
        vec!["device", "list", "--help"],
        vec!["device", "move", "--help"],
        vec!["device", "rotate-key", "--help"],
        vec!["apikey", "create", "--help"],
        vec!["kv", "set", "--help"],
        vec!["kv", "list", "--help"],
        vec!["kv", "patch", "--help"],
        vec!["kv", "apply", "--help"],
        vec!["job", "create", "--help"],
        vec!["job", "list", "--help"],
        vec!["job", "show", "--help"],
        vec!["job", "cancel", "--help"],
        vec!["command", "send", "--help"],
        vec!["watch", "--help"],
        vec!["events", "--help"],
    ] {
        let run = ddp(&s, None, &args).await;
        assert!(run.code == 0 && run.out.contains("Example"), "ddp {args:?}: {}", run.out);
    }
}

/// Lines of a running `ddp` command's standard output.
async fn follow(
    s: &TestServer,
    token: &str,
    args: &[&str],
) -> (tokio::process::Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    let mut child = command(s, Some(token), args).stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("ddp runs");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("a line in time")
        .expect("read")
        .expect("a line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_devices_sync_stream() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = dev.to_string();
    s.put(&format!("/devices/{dev}"), "a", serde_json::json!(1)).await;
    let (_child, mut lines) = follow(&s, &key, &["watch", "--device", &d]).await;
    assert_eq!(next_line(&mut lines).await, "rev 1      reload   1 keys");
    assert_eq!(next_line(&mut lines).await.trim(), "a = 1");
    ok(&s, &["kv", "set", "--device", &d, "b", "1.10"]).await;
    assert_eq!(next_line(&mut lines).await, "rev 2      set      b = 1.10");
    ok(&s, &["kv", "delete", "--device", &d, "a"]).await;
    assert_eq!(next_line(&mut lines).await, "rev 3      delete   a");

    let (_child, mut resumed) = follow(&s, &key, &["watch", "--device", &d, "--since-rev", "2", "--json"]).await;
    assert_eq!(next_line(&mut resumed).await, r#"{"action":"resume","rev":2}"#);
    assert_eq!(next_line(&mut resumed).await, r#"{"action":"delete","rev":3,"key":"a"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follows_home_events() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, _) = s.create_device(Some(home)).await;
    let (_child, mut lines) = follow(&s, ADMIN_KEY, &["events", "--home", &home.to_string(), "--json"]).await;
    // The stream is open once the server counts its listener; then write.
    for _ in 0..100 {
        let metrics =
            s.req(reqwest::Method::GET, "/metrics", None).send().await.expect("metrics").text().await.expect("text");
        if metrics.lines().any(|l| l.starts_with("ddp_event_listeners ") && !l.ends_with(" 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.put(&format!("/devices/{dev}"), "k", serde_json::json!("v")).await;
    let event: Value = serde_json::from_str(&next_line(&mut lines).await).expect("a JSON line");
    assert_eq!(
        (&event["eventType"], &event["eventData"]["key"]),
        (&serde_json::json!("_deviceKVSaved_"), &serde_json::json!("k"))
    );
    let (_child, mut human) = follow(&s, ADMIN_KEY, &["events"]).await;
    for _ in 0..100 {
        let metrics =
            s.req(reqwest::Method::GET, "/metrics", None).send().await.expect("metrics").text().await.expect("text");
        if metrics.lines().any(|l| l.starts_with("ddp_event_listeners ") && l.ends_with(" 2")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ok(&s, &["kv", "set", "--device", &dev.to_string(), "k", "2.50"]).await;
    let line = next_line(&mut human).await;
    assert!(
        line.contains(&format!(
            "home {home}  _deviceKVSaved_  {{\"deviceId\":{dev},\"key\":\"k\",\"value\":2.50,\"rev\":2}}"
        )),
        "{line}"
    );
}

/// `ddp serve` with its data in `data` and `extra` flags; the listeners `extra` does not name
/// are on ports the system picks.
fn serve(data: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddp"));
    cmd.arg("serve");
    for flag in ["--http-listen", "--mqtt-listen"] {
        if !extra.contains(&flag) {
            cmd.args([flag, "127.0.0.1:0"]);
        }
    }
    cmd.arg("--data-dir")
        .arg(data)
        .args(extra)
        .env_remove("DDP_ADMIN_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_refuses_to_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    for (flags, names) in [
        (&["--ws-idle", "0"][..], "--ws-idle"),
        (&["--max-sessions-per-device", "0"], "--max-sessions-per-device"),
        (&["--tls-cert", "c.pem"], "--tls-key"),
    ] {
        let out = serve(&data, flags).output().await.expect("ddp serve runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(names) && !err.contains("panicked"), "{flags:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_start_leaves_no_admin_key_and_the_start_that_serves_prints_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr").to_string();
    let out = serve(&data, &["--mqtt-listen", &busy]).output().await.expect("ddp serve runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mqtt-listen"));
    assert!(!data.join("admin.key").exists(), "no key was stored by a start that did not serve");
    let mut serving = serve(&data, &[]).spawn().expect("ddp serve");
    let mut lines = BufReader::new(serving.stdout.take().expect("stdout")).lines();
    let mut printed = None;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await {
        if let Some(key) = line.trim().strip_prefix("ddpa_") {
            printed = Some(format!("ddpa_{key}"));
            break;
        }
    }
    let printed = printed.expect("the serving start prints the key it generated");
    let stored = std::fs::read_to_string(data.join("admin.key")).expect("and stores it");
    assert_eq!(stored.trim(), printed);
    serving.kill().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_send_reaches_the_device() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = dev.to_string();
    fails(&s, Some(ADMIN_KEY), &["command", "send", "--device", &d, "reboot"], "DEVICE_OFFLINE").await;
    let mut socket = match s.ws_path(&format!("/devices/{dev}/command"), Some(&key)).await {
        ddp_testkit::WsOpen::Open(c) => *c,
        ddp_testkit::WsOpen::Refused(status, body) => panic!("{status} {body}"),
    };
    let out =
        ok(&s, &["command", "send", "--device", &d, "setLevel", "--param", "level=3", "--param", "unit=percent"]).await;
    assert!(out.contains("sent setLevel to device"), "{out}");
    assert_eq!(socket.next_text().await, r#"{"action":"setLevel","parameters":{"level":3,"unit":"percent"}}"#);
    ok(&s, &["command", "send", "--device", &d, "schedule", "--parameters", r#"{"on": "07:00", "x": 1.50}"#]).await;
    assert_eq!(socket.next_text().await, r#"{"action":"schedule","parameters":{"on":"07:00","x":1.50}}"#);
    let run = ddp(&s, Some(ADMIN_KEY), &["command", "send", "--device", &d, "x", "--parameters", "[1]"]).await;
    assert!(run.code != 0 && run.err.contains("JSON object"), "{}", run.err);
    fails(&s, Some(&key), &["command", "send", "--device", &d, "reboot"], "PERMISSION_DENIED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_the_device_and_device_sync_shows_where_it_stands() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = dev.to_string();
    let mut ws = s.ws_open(dev, &key, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    // The device acks every change it gets.
    let acker = tokio::spawn(async move {
        loop {
            let m = ws.next_json().await;
            if m["action"] == "set" || m["action"] == "delete" {
                ws.send_json(&serde_json::json!({"action": "ack", "rev": m["rev"]})).await;
            }
            if m["key"] == "stop" {
                return ws;
            }
        }
    });
    let out = ok(&s, &["kv", "set", "--device", &d, "mode", "eco", "--wait", "applied"]).await;
    assert!(out.starts_with(&format!("set mode = \"eco\" at rev 1; device {dev} applied it within ")), "{out}");
    assert!(out.contains(" s at 20"), "when it was applied: {out}");
    let answer = json(&s, &["kv", "set", "--device", &d, "level", "3", "--wait", "delivered"]).await;
    assert_eq!(answer, serde_json::json!({"key": "level", "rev": 2, "delivered": true, "deliveredRev": 2}));
    let out = ok(&s, &["kv", "delete", "--device", &d, "level", "--wait", "applied", "--wait-timeout", "5"]).await;
    assert!(out.starts_with("deleted level at rev 3; device"), "{out}");
    ok(&s, &["kv", "set", "--device", &d, "stop", "1", "--wait", "applied"]).await;
    let mut ws = acker.await.expect("acker");

    let table = ok(&s, &["device", "sync", &d]).await;
    for line in ["store rev", "delivered rev", "applied rev", "applied at", "connected"] {
        assert!(table.contains(line), "{line} in {table}");
    }
    assert!(table.contains("the device has applied its whole store"), "{table}");
    let sync = json(&s, &["device", "sync", &d]).await;
    assert_eq!((sync["rev"].clone(), sync["appliedRev"].clone()), (serde_json::json!(4), serde_json::json!(4)));

    // Not applied in time: the write stands, the command says so and exits non-zero.
    let run = ddp(
        &s,
        Some(ADMIN_KEY),
        &["kv", "set", "--device", &d, "mode", "away", "--wait", "applied", "--wait-timeout", "0.3"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.out.contains("set mode = \"away\" at rev 5"), "{}", run.out);
    assert!(run.err.contains("had not applied rev 5 within 0.3 s (it is at rev 4); the write stands"), "{}", run.err);
    assert_eq!(ws.next_json().await["rev"], 5);
    let table = ok(&s, &["device", "sync", &d]).await;
    assert!(table.contains("has not acknowledged the last 1 change(s)"), "{table}");
    let home = s.create_home("H").await.to_string();
    let run = ddp(&s, Some(ADMIN_KEY), &["kv", "set", "--home", &home, "x", "1", "--wait", "applied"]).await;
    assert!(run.code != 0 && run.err.contains("--wait is for device stores"), "{}", run.err);
    let run =
        ddp(&s, Some(ADMIN_KEY), &["kv", "set", "--device", &d, "x", "1", "--wait", "applied", "--wait-timeout", "90"])
            .await;
    assert!(run.code != 0 && run.err.contains("0–60"), "{}", run.err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_and_apply_write_several_keys_at_once() {
    let s = TestServer::start().await;
    let (dev, key) = s.create_device(None).await;
    let d = dev.to_string();
    ok(&s, &["kv", "set", "--device", &d, "net", r#"{"dhcp":false,"dns":["1.1.1.1"]}"#]).await;
    ok(&s, &["kv", "set", "--device", &d, "old", "1"]).await;
    let out = ok(
        &s,
        &[
            "kv",
            "patch",
            "--device",
            &d,
            "--set",
            "ssid=home",
            "--set",
            "level=1.10",
            "--merge",
            r#"net={"dhcp":true,"dns":null}"#,
            "--delete",
            "old",
        ],
    )
    .await;
    assert_eq!(
        out,
        "rev 3      ssid\nrev 4      level\nrev 5      net\nrev 6      old\napplied 4 ops at once at rev 6\n"
    );
    let level = ok(&s, &["kv", "get", "--device", &d, "level"]).await;
    assert_eq!(level.trim(), "1.10", "values travel exactly");
    assert_eq!(ok(&s, &["kv", "get", "--device", &d, "net"]).await.trim(), r#"{"dhcp":true}"#);

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("wifi.json");
    std::fs::write(&file, r#"{"ops":[{"op":"set","key":"ssid","value":"x","ifRev":3},{"op":"delete","key":"ssid"},{"op":"set","key":"n","value":12345678901234567890}]}"#).expect("write");
    let answer = json(&s, &["kv", "apply", "--device", &d, file.to_str().expect("path")]).await;
    assert_eq!(
        answer,
        serde_json::json!({"rev": 9, "results": [{"key": "ssid", "rev": 7}, {"key": "ssid", "rev": 8}, {"key": "n", "rev": 9}]})
    );
    assert_eq!(ok(&s, &["kv", "get", "--device", &d, "n"]).await.trim(), "12345678901234567890");

    // Refusals: the op at fault is named, nothing changes, the exit code is 1.
    std::fs::write(&file, r#"[{"op":"set","key":"a","value":1},{"op":"delete","key":"missing"}]"#).expect("write");
    fails(&s, Some(ADMIN_KEY), &["kv", "apply", "--device", &d, file.to_str().expect("path")], "KEY_NOT_FOUND").await;
    fails(
        &s,
        Some(ADMIN_KEY),
        &["kv", "patch", "--device", &d, "--set", "a=1", "--if-store-rev", "3"],
        "REVISION_MISMATCH",
    )
    .await;
    fails(&s, Some(ADMIN_KEY), &["kv", "patch", "--device", &d, "--set", "a=1", "--delete", "a"], "use `ddp kv apply`")
        .await;
    fails(&s, Some(ADMIN_KEY), &["kv", "patch", "--device", &d, "--merge", "a=[1]"], "a merge patch is a JSON object")
        .await;
    fails(&s, Some(ADMIN_KEY), &["kv", "patch", "--device", &d], "nothing to do").await;
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 9);

    // --wait applied: a device that takes batches acks the batch.
    let mut ws = s.ws_open(dev, &key, "?batches=1").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    let acker = tokio::spawn(async move {
        let batch = ws.next_json().await;
        ws.send_json(&serde_json::json!({"action": "ack", "rev": batch["rev"]})).await;
        (batch, ws)
    });
    let out = ok(&s, &["kv", "patch", "--device", &d, "--set", "a=1", "--set", "b=2", "--wait", "applied"]).await;
    assert!(out.contains(&format!("applied 2 ops at once at rev 11; device {dev} applied it within ")), "{out}");
    let (batch, _ws) = acker.await.expect("acker");
    assert_eq!(batch["action"], "batch");
}

/// The ids in a `--json` list of devices or jobs.
fn ids(list: &Value) -> Vec<u64> {
    list.as_array().expect("a list").iter().map(|d| d["id"].as_u64().expect("an id")).collect()
}

/// A device made with `ddp device create`, its store set with `ddp kv patch` (`sets`:
/// KEY=VALUE); its id and key.
async fn fleet_device(s: &TestServer, class: &str, tag: Option<&str>, sets: &[&str]) -> (u64, String) {
    let mut args = vec!["device", "create", "--name", "d", "--class", class];
    if let Some(t) = tag {
        args.extend(["--tag", t]);
    }
    let device = json(s, &args).await;
    let id = device["id"].as_u64().expect("device id");
    if !sets.is_empty() {
        let d = id.to_string();
        let mut args = vec!["kv", "patch", "--device", d.as_str()];
        for set in sets {
            args.extend(["--set", set]);
        }
        ok(s, &args).await;
    }
    (id, device["apiKey"].as_str().expect("key").to_owned())
}

/// The ids `ddp device list ARGS --json` prints.
async fn listed(s: &TestServer, args: &[&str]) -> Vec<u64> {
    let mut full = vec!["device", "list"];
    full.extend_from_slice(args);
    ids(&json(s, &full).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_filters_and_pages() {
    let s = TestServer::start().await;
    let (old1, _) = fleet_device(&s, "thermo", None, &["fw=2.0", "mode=\"eco\""]).await;
    let (old2, key2) = fleet_device(&s, "thermo", None, &["fw=1.5"]).await;
    let (new, _) = fleet_device(&s, "lamp", None, &["fw=2.1"]).await;
    let (bare, _) = fleet_device(&s, "lamp", Some("eu"), &[]).await;

    assert_eq!(listed(&s, &["--where", "fw<2.1"]).await, vec![old1, old2]);
    assert_eq!(listed(&s, &["--where", "fw<2.1", "--where", "mode=\"eco\""]).await, vec![old1]);
    assert_eq!(listed(&s, &["--where", "fw", "--class", "lamp"]).await, vec![new]);
    assert_eq!(listed(&s, &["--where", "!fw"]).await, vec![bare]);
    assert_eq!(listed(&s, &["--tag", "eu"]).await, vec![bare]);
    assert_eq!(listed(&s, &["--class", "thermo", "--where", "fw>=2"]).await, vec![old1]);
    assert_eq!(listed(&s, &["--where", "fw>9"]).await, Vec::<u64>::new());
    // Connected or not: only the device with a live session.
    let mut ws = s.ws_open(old2, &key2, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    assert_eq!(listed(&s, &["--connected"]).await, vec![old2]);
    assert_eq!(listed(&s, &["--connected", "false", "--class", "thermo"]).await, vec![old1]);
    assert_eq!(listed(&s, &["--disconnected"]).await, vec![old1, new, bare]);

    // Without new flags: the table as before, one page, no note.
    let run = ddp(&s, Some(ADMIN_KEY), &["device", "list"]).await;
    assert_eq!(run.code, 0, "{}", run.err);
    assert!(run.out.starts_with("ID  NAME  HOME  CONNECTED  LAST CONNECT"), "{}", run.out);
    assert_eq!(run.out.lines().count(), 5, "{}", run.out);
    assert!(run.err.is_empty(), "no note when nothing more follows: {}", run.err);

    // One page of two, and stderr says how to get the next.
    let run = ddp(&s, Some(ADMIN_KEY), &["device", "list", "--limit", "2"]).await;
    assert_eq!(run.code, 0, "{}", run.err);
    assert_eq!(run.out.lines().count(), 3, "a header and two devices: {}", run.out);
    assert!(run.err.contains(&format!("--after {old2}")) && run.err.contains("--all-pages"), "{}", run.err);
    let next = json(&s, &["device", "list", "--limit", "2", "--after", &old2.to_string()]).await;
    assert_eq!(ids(&next), vec![new, bare]);
    // --all-pages follows the Link to the end, keeping the filters.
    let run = ddp(&s, Some(ADMIN_KEY), &["device", "list", "--limit", "1", "--all-pages", "--json"]).await;
    assert_eq!(run.code, 0, "{}", run.err);
    let all: Value = serde_json::from_str(&run.out).expect("one JSON array");
    assert_eq!(ids(&all), vec![old1, old2, new, bare]);
    assert!(run.err.is_empty(), "{}", run.err);
    assert_eq!(listed(&s, &["--where", "fw", "--limit", "1", "--all-pages"]).await, vec![old1, old2, new]);
    let table = ok(&s, &["device", "list", "--class", "lamp", "--limit", "1", "--all-pages"]).await;
    assert_eq!(table.lines().count(), 3, "one table over every page: {table}");

    // Refusals: the server's reason and message, exit 1.
    fails(&s, Some(ADMIN_KEY), &["device", "list", "--where", "fw=eco"], "strings are quoted: fw=\"eco\"").await;
    fails(&s, Some(ADMIN_KEY), &["device", "list", "--where", "on<true"], "INVALID_PARAMETER").await;
    fails(&s, Some(ADMIN_KEY), &["device", "list", "--limit", "0"], "limit must be").await;
    fails(&s, Some(ADMIN_KEY), &["device", "list", "--home", "999"], "HOME_NOT_FOUND").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_wait_writes_every_selected_device_and_ends_done() {
    let s = TestServer::start().await;
    let (old1, _) = fleet_device(&s, "thermo", None, &["fw=2.0"]).await;
    let (old2, _) = fleet_device(&s, "thermo", None, &["fw=1.5"]).await;
    let (old3, _) = fleet_device(&s, "lamp", None, &["fw=1"]).await;
    let (current, _) = fleet_device(&s, "thermo", None, &["fw=2.1"]).await;

    let run = ddp(
        &s,
        Some(ADMIN_KEY),
        &[
            "job",
            "create",
            "--where",
            "fw<2.1",
            "--set",
            "otaUrl=\"https://fw.example/2.1\"",
            "--set",
            "level=1.10",
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.err);
    let job: Value = serde_json::from_str(&run.out).expect("the job as JSON");
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(
        (job["selected"].as_u64(), job["written"].as_u64(), job["failed"].as_u64()),
        (Some(3), Some(3), Some(0))
    );
    assert_eq!(job["select"], serde_json::json!({"where": ["fw<2.1"]}));
    assert!(run.out.contains(r#""value":1.10"#), "the ops exactly as given: {}", run.out);
    // The progress on stderr: plain lines (not a terminal), ending with the whole job written.
    assert!(!run.err.contains('\r'), "{:?}", run.err);
    let last = run.err.lines().last().unwrap_or_default();
    assert!(last.starts_with("job 1 done") && last.contains("[####################]  written 3/3"), "{}", run.err);
    assert!(!run.err.contains("warning"), "{}", run.err);
    for dev in [old1, old2, old3] {
        let d = dev.to_string();
        assert_eq!(ok(&s, &["kv", "get", "--device", &d, "level"]).await.trim(), "1.10", "device {dev}");
        assert_eq!(ok(&s, &["kv", "get", "--device", &d, "otaUrl"]).await.trim(), r#""https://fw.example/2.1""#);
    }
    fails(&s, Some(ADMIN_KEY), &["kv", "get", "--device", &current.to_string(), "otaUrl"], "KEY_NOT_FOUND").await;

    // Devices that fail do not fail the job: it ends done, exit 0, with a warning.
    let ids_arg = format!("{old1},{current}");
    let run = ddp(&s, Some(ADMIN_KEY), &["job", "create", "--ids", &ids_arg, "--delete", "otaUrl", "--wait"]).await;
    assert_eq!(run.code, 0, "{}", run.err);
    assert!(run.out.contains("state      done") && run.out.contains("failed     1"), "{}", run.out);
    assert!(run.out.contains(&format!("device {current}")) && run.out.contains("KEY_NOT_FOUND"), "{}", run.out);
    assert!(run.err.contains("warning: job 2 is done, but 1 of 2 device(s) failed"), "{}", run.err);
    fails(&s, Some(ADMIN_KEY), &["kv", "get", "--device", &old1.to_string(), "otaUrl"], "KEY_NOT_FOUND").await;

    // --all writes every device; without --wait the created job is printed.
    let job = json(&s, &["job", "create", "--all", "--ops", r#"[{"op":"set","key":"seen","value":true}]"#]).await;
    assert_eq!((job["id"].as_u64(), job["selected"].as_u64()), (Some(3), Some(4)));
    let shown = json(&s, &["job", "show", "3", "--follow"]).await;
    assert_eq!((shown["state"].clone(), shown["written"].clone()), (serde_json::json!("done"), serde_json::json!(4)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_shown_and_cancelled() {
    let s = TestServer::start().await;
    let mut devices = Vec::new();
    for _ in 0..6 {
        devices.push(fleet_device(&s, "thermo", None, &[]).await.0);
    }
    // A quick job, done.
    let done = json(&s, &["job", "create", "--class", "thermo", "--set", "a=1", "--wait"]).await;
    assert_eq!(done["state"], "done");
    // A slow one (a device every 2 s), cancelled while it runs.
    let slow = json(&s, &["job", "create", "--class", "thermo", "--set", "b=1", "--rate", "0.5"]).await;
    assert_eq!(
        (slow["id"].as_u64(), slow["state"].as_str(), slow["rate"].as_f64()),
        (Some(2), Some("running"), Some(0.5))
    );

    let jobs = json(&s, &["job", "list"]).await;
    assert_eq!(ids(&jobs), vec![1, 2]);
    let table = ok(&s, &["job", "list"]).await;
    assert!(table.starts_with("ID  STATE    SELECTED  WRITTEN  FAILED  DELIVERED  APPLIED  CREATED"), "{table}");
    assert!(table.contains("1   done     6         6") && table.contains("2   running  6"), "{table}");
    let shown = ok(&s, &["job", "show", "2"]).await;
    assert!(shown.contains("state      running") && shown.contains("rate       0.5 devices/s"), "{shown}");
    assert!(shown.contains(r#"ops        [{"op":"set","key":"b","value":1}]"#), "{shown}");
    assert_eq!(json(&s, &["job", "show", "1"]).await["written"], 6);

    // Someone cancels the job a --wait follows: the follower prints the job and exits 1.
    let waiting = command(&s, Some(ADMIN_KEY), &["job", "show", "2", "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ddp runs");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let cancelled = ok(&s, &["job", "cancel", "2"]).await;
    assert!(cancelled.starts_with("cancelled job 2: ") && cancelled.contains("of 6 device(s) written"), "{cancelled}");
    let out = tokio::time::timeout(Duration::from_secs(10), waiting.wait_with_output())
        .await
        .expect("the follower ends")
        .expect("output");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("job 2 running  ") && stderr.contains("/6  delivered"), "the progress: {stderr}");
    assert!(stderr.contains("error: job 2 was cancelled: "), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).expect("the job as it ended");
    assert_eq!(job["state"], "cancelled");
    assert!(job["written"].as_u64().is_some_and(|w| w < 6), "{job}");
    // Nothing more is written.
    let written = job["written"].clone();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(json(&s, &["job", "show", "2"]).await["written"], written);
    // --follow of a cancelled job: at once, exit 1; cancelling an ended job leaves it as it was.
    fails(&s, Some(ADMIN_KEY), &["job", "show", "2", "--follow"], "job 2 was cancelled").await;
    assert!(ok(&s, &["job", "cancel", "1"]).await.contains("job 1 had already ended (done)"));
    assert_eq!(json(&s, &["job", "cancel", "1"]).await["state"], "done");
    fails(&s, Some(ADMIN_KEY), &["job", "show", "99"], "NOT_FOUND").await;
    fails(&s, Some(ADMIN_KEY), &["job", "cancel", "99"], "job 99 does not exist").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_refused_with_the_servers_message() {
    let s = TestServer::start().await;
    let (dev, key) = fleet_device(&s, "thermo", None, &["fw=1"]).await;
    fails(&s, Some(ADMIN_KEY), &["job", "create", "--set", "x=1"], "INVALID_PARAMETER: the selection names no filter")
        .await;
    fails(&s, Some(ADMIN_KEY), &["job", "create", "--where", "fw=eco", "--set", "x=1"], "strings are quoted").await;
    fails(&s, Some(ADMIN_KEY), &["job", "create", "--all"], "nothing to do").await;
    fails(&s, Some(ADMIN_KEY), &["job", "create", "--all", "--ops", "[{"], "not JSON").await;
    fails(&s, Some(ADMIN_KEY), &["job", "create", "--all", "--ops", r#"[{"op":"nope","key":"x"}]"#], "unknown op")
        .await;
    fails(
        &s,
        Some(ADMIN_KEY),
        &["job", "create", "--all", "--set", "x=1", "--rate", "0"],
        "rate is devices per second",
    )
    .await;
    fails(&s, Some(ADMIN_KEY), &["job", "create", "--all", "--set", "x=1", "--delete", "x"], "with --ops").await;
    fails(&s, Some(&key), &["job", "create", "--all", "--set", "x=1"], "PERMISSION_DENIED").await;
    let (_, read_only) = s.create_api_key(None, "read").await;
    fails(&s, Some(&read_only), &["job", "create", "--all", "--set", "x=1"], "PERMISSION_DENIED").await;
    let usage = ddp(&s, Some(ADMIN_KEY), &["job", "create", "--all", "--set", "x=1", "--ops", "[]"]).await;
    assert_eq!(usage.code, 2, "--set and --ops together are a usage error: {}", usage.err);
    assert!(json(&s, &["job", "list"]).await.as_array().is_some_and(Vec::is_empty), "no job was created");
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 1);
}
