//! Delivery and acknowledgement on a real `ddp serve` process (PROTOCOL.md §10): what devices
//! acknowledged survives SIGKILL when it was acknowledged more than the record interval before
//! (one second), and the process's own metrics say how long changes took to be applied and how
//! many connected devices are behind.

use std::path::Path;
use std::time::Duration;

use ddp_testkit::{DdpProcess, WsOpen, ws_connect};
use serde_json::{Value, json};

const KEY: &str = "delivery-test-admin-key-0123456789";

fn start(data_dir: &Path) -> DdpProcess {
    DdpProcess::start(Path::new(env!("CARGO_BIN_EXE_ddp")), data_dir, KEY, &[]).expect("ddp serve starts")
}

struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn of(server: &DdpProcess) -> Api {
        Api { client: reqwest::Client::new(), base: server.base.clone() }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("ModeCloud {KEY}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let resp = request.send().await.expect("request");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap_or(Value::Null)
    }

    async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.base)).send().await.expect("metrics").text().await.expect("text")
    }

    /// The value of an unlabelled metric line.
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

async fn device_session(server: &DdpProcess, api: &Api) -> (u64, ddp_testkit::WsClient) {
    let created = api.call(reqwest::Method::POST, "/devices", Some(json!({"name": "d"}))).await;
    let (dev, key) = (created["id"].as_u64().expect("id"), created["apiKey"].as_str().expect("key").to_owned());
    let addr = server.base.trim_start_matches("http://").parse().expect("addr");
    let mut ws = match ws_connect(addr, &format!("/devices/{dev}/kv"), Some(&key)).await {
        WsOpen::Open(ws) => *ws,
        WsOpen::Refused(status, body) => panic!("refused {status}: {body}"),
    };
    assert_eq!(ws.next_json().await["action"], "reload");
    (dev, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_older_than_the_record_interval_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = start(&data);
    let api = Api::of(&server);
    let (dev, mut ws) = device_session(&server, &api).await;
    for i in 0..3 {
        api.call(reqwest::Method::PUT, &format!("/devices/{dev}/kv/k{i}"), Some(json!({"value": i}))).await;
        ws.next_json().await;
    }
    ws.send_json(&json!({"action": "ack", "rev": 3})).await;
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = api.call(reqwest::Method::GET, &format!("/devices/{dev}/sync"), None).await;
        if seen["appliedRev"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen["appliedRev"], 3, "{seen}");
    // More than the record interval (1 s) and a commit later, the kill.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    server.kill();
    drop(ws);

    let server = start(&data);
    let api = Api::of(&server);
    let after = api.call(reqwest::Method::GET, &format!("/devices/{dev}/sync"), None).await;
    assert_eq!(
        (after["rev"].clone(), after["deliveredRev"].clone(), after["appliedRev"].clone()),
        (json!(3), json!(3), json!(3)),
        "{after}"
    );
    assert_eq!(after["appliedTime"], seen["appliedTime"], "exactly as reported before the crash");
    assert_eq!(after["isConnected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_commit_to_applied_latency_and_devices_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(&dir.path().join("data"));
    let api = Api::of(&server);
    let (dev, mut ws) = device_session(&server, &api).await;
    api.call(reqwest::Method::PUT, &format!("/devices/{dev}/kv/mode"), Some(json!({"value": "eco"}))).await;
    assert_eq!(ws.next_json().await["rev"], 1);
    let mut behind = None;
    for _ in 0..60 {
        behind = api.metric("ddp_connected_devices_behind").await;
        if behind == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(behind, Some(1.0), "the connected device has not acknowledged rev 1");

    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.send_json(&json!({"action": "ack", "rev": 1})).await;
    for _ in 0..60 {
        behind = api.metric("ddp_connected_devices_behind").await;
        if behind == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(behind, Some(0.0), "caught up");
    let text = api.metrics().await;
    assert!(text.contains("# TYPE ddp_commit_to_applied_seconds histogram"), "a real histogram:\n{text}");
    assert_eq!(api.metric("ddp_commit_to_applied_seconds_count").await, Some(1.0), "one change applied");
    let seconds = api.metric("ddp_commit_to_applied_seconds_sum").await.expect("sum");
    assert!((0.1..10.0).contains(&seconds), "the ack came at least 100 ms after the commit: {seconds}");
    assert!(text.contains(r#"ddp_commit_to_applied_seconds_bucket{le="0.1"} 0"#), "{text}");
    assert!(text.contains(r#"ddp_commit_to_applied_seconds_bucket{le="+Inf"} 1"#), "{text}");
    assert!(text.contains(r#"ddp_acks_total{outcome="advanced"} 1"#), "{text}");
}
