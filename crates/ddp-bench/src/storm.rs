//! The reconnect storm: every device drops its connection and reconnects at the same moment;
//! measured is the time until every one of them has its full reload again, how many connections
//! failed, and whether the server's listen queue overflowed.
//!
//! Client processes (`ddp-bench storm-client`, each holding a share of the devices) connect, say
//! `ready N`, and on each `go` line drop every connection and reconnect them all at once, then
//! print one JSON line with what they saw. The Mosquitto baseline does the same with MQTT
//! retained messages standing in for the reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

use crate::devices::Device;
use crate::sync::{Transport, open_ddp_mqtt_reload, open_mqtt};

/// Settings of the hidden `ddp-bench storm-client`.
#[derive(clap::Args)]
pub struct StormClientArgs {
    /// `host:port` of the listener.
    #[arg(long)]
    addr: String,
    /// JSON file with the devices.
    #[arg(long)]
    devices: PathBuf,
    /// Transport.
    #[arg(long, value_enum)]
    transport: Transport,
    /// Keys each device's reload must carry (retained messages for the broker).
    #[arg(long)]
    keys: usize,
}

/// What one client process saw in one storm.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StormReport {
    /// Devices that got their full reload.
    pub done: usize,
    /// Devices whose reconnect failed.
    pub failed: usize,
    /// Milliseconds from `go` until each device had its reload.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The last one.
    pub max_ms: f64,
    /// The first failure, if any.
    pub error: Option<String>,
}

/// A held connection, of either kind (dropped to disconnect).
type Held = Box<dyn Send>;

/// Connects `device` and waits until its reload (or its `keys` retained messages) arrived.
async fn connect(addr: &str, device: &Device, transport: Transport, keys: usize) -> anyhow::Result<Held> {
    match transport {
        Transport::Ws => {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = format!("ws://{addr}/devices/{}/kv", device.id).into_client_request()?;
            request.headers_mut().insert("Authorization", format!("ModeCloud {}", device.key).parse()?);
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0);
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) => check_reload(t.as_bytes(), keys)?,
                other => bail!("expected a reload, got {other:?}"),
            }
            Ok(Box::new(ws))
        }
        Transport::Mqtt | Transport::MqttWs => {
            let (d, first) = open_ddp_mqtt_reload(addr, "storm", device).await?;
            check_reload(&first, keys)?;
            Ok(Box::new(d))
        }
        Transport::Broker => {
            let mut d = open_mqtt(addr, format!("storm-{}", device.id), None, format!("bench/{}/#", device.id)).await?;
            for _ in 0..keys {
                tokio::time::timeout(Duration::from_secs(60), d.payloads.recv())
                    .await
                    .context("retained messages did not all arrive within 60 s")?
                    .context("closed")?;
            }
            Ok(Box::new(d))
        }
    }
}

fn check_reload(text: &[u8], keys: usize) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_slice(text)?;
    if v["action"] != "reload" {
        bail!("expected a reload, got {v}");
    }
    let items = v["items"].as_array().map_or(0, Vec::len);
    if items != keys {
        bail!("the reload carried {items} items, not {keys}");
    }
    Ok(())
}

/// `ddp-bench storm-client`.
pub async fn client(args: StormClientArgs) -> anyhow::Result<()> {
    let devices: Arc<Vec<Device>> = Arc::new(serde_json::from_slice(&std::fs::read(&args.devices)?)?);
    // Warm: connect everyone, a few hundred at a time.
    let mut held: Vec<Held> = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(256) {
        let opened =
            futures_util::future::try_join_all(chunk.iter().map(|d| connect(&args.addr, d, args.transport, args.keys)))
                .await?;
        held.extend(opened);
    }
    println!("ready {}", held.len());
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        if line.trim() != "go" {
            continue;
        }
        // Everyone drops at once…
        held.clear();
        let go = Instant::now();
        // …and reconnects at once.
        let tasks: Vec<_> = devices
            .iter()
            .cloned()
            .map(|d| {
                let (addr, transport, keys) = (args.addr.clone(), args.transport, args.keys);
                tokio::spawn(async move {
                    let result =
                        connect(&addr, &d, transport, keys).await.map_err(|e| e.context(format!("device {}", d.id)));
                    (result, go.elapsed())
                })
            })
            .collect();
        let mut hist = Histogram::<u64>::new(3)?;
        let (mut failed, mut error) = (0usize, None);
        for t in tasks {
            match t.await? {
                (Ok(h), took) => {
                    hist.record(took.as_micros() as u64)?;
                    held.push(h);
                }
                (Err(e), _) => {
                    failed += 1;
                    error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let report = StormReport {
            done: hist.len() as usize,
            failed,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: hist.max() as f64 / 1000.0,
            error,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// Client processes holding `devices` against `addr`, ready for storms.
pub struct Storm {
    children: Vec<crate::devices::ClientProcess>,
    /// Devices connected.
    pub devices: usize,
}

impl Storm {
    /// Starts `processes` client processes and waits until they hold every session.
    pub async fn connect(
        addr: &str,
        devices: &[Device],
        processes: usize,
        transport: Transport,
        keys: usize,
        work: &std::path::Path,
    ) -> anyhow::Result<Storm> {
        let keys = keys.to_string();
        let (children, connected) = crate::devices::spawn_clients(
            "storm-client",
            &["--addr", addr, "--transport", transport.arg(), "--keys", &keys],
            devices,
            processes,
            work,
        )
        .await?;
        Ok(Storm { children, devices: connected })
    }

    /// CPU seconds the client processes have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.children.iter().filter_map(|(c, _)| c.id()).map(cpu_seconds).sum()
    }

    /// One storm: every client process drops and reconnects all its devices at once. Returns the
    /// merged report (the slowest process's p99 and max).
    pub async fn run(&mut self) -> anyhow::Result<StormReport> {
        use tokio::io::AsyncWriteExt;
        for (child, _) in &mut self.children {
            let stdin = child.stdin.as_mut().context("storm client stdin")?;
            stdin.write_all(b"go\n").await?;
            stdin.flush().await?;
        }
        let mut merged = StormReport { done: 0, failed: 0, p50_ms: 0.0, p99_ms: 0.0, max_ms: 0.0, error: None };
        for (_, lines) in &mut self.children {
            let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
                .await
                .context("a storm did not finish within 5 minutes")??
                .context("a storm client ended")?;
            let r: StormReport = serde_json::from_str(&line)?;
            merged.done += r.done;
            merged.failed += r.failed;
            merged.p50_ms = merged.p50_ms.max(r.p50_ms);
            merged.p99_ms = merged.p99_ms.max(r.p99_ms);
            merged.max_ms = merged.max_ms.max(r.max_ms);
            merged.error = merged.error.or(r.error);
        }
        Ok(merged)
    }
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExtListenOverflows` + `TcpExtListenDrops`).
pub fn listen_overflows() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else { return 0 };
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        return names
            .split_whitespace()
            .zip(values.split_whitespace())
            .filter(|(n, _)| *n == "ListenOverflows" || *n == "ListenDrops")
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum();
    }
    0
}

/// CPU seconds (user + system) process `pid` has used so far; 0 when it cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) in parentheses: utime is the 14th
    // field of the line, stime the 15th; both in clock ticks of 1/100 s on Linux.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}
