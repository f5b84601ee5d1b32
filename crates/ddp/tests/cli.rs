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
        vec!["device", "move", "--help"],
        vec!["device", "rotate-key", "--help"],
        vec!["apikey", "create", "--help"],
        vec!["kv", "set", "--help"],
        vec!["kv", "list", "--help"],
        vec!["kv", "patch", "--help"],
        vec!["kv", "apply", "--help"],
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
