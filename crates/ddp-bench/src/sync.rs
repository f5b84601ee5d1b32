//! Benchmarks of live sync sessions:
//!
//! - `ddp-bench idle`: memory per idle session. Starts `ddp serve`, creates the devices, then
//!   several client processes (one process may hold ~20,000 files here) open one session per
//!   device and hold it; the server's resident memory before and after, divided by the number of
//!   sessions, is the cost of a session.
//! - `ddp-bench latency`: write-to-device latency. Devices hold live sessions while a writer
//!   issues REST writes at a fixed rate (open loop); every write carries its issue time, and each
//!   device reports how long its change took to arrive. Loss, duplicates and gaps are counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::devices::{self, Device};
use crate::server;

/// How devices connect.
#[derive(Clone, Copy, Debug, clap::ValueEnum, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket sessions on `/devices/{id}/kv`.
    Ws,
    /// MQTT 3.1.1 sessions subscribed to `/devices/{id}/kv`.
    Mqtt,
    /// The same MQTT sessions over WebSocket (`/mqtt` on the HTTP listener).
    MqttWs,
    /// Plain MQTT 3.1.1 to a broker (the Mosquitto baseline): no credentials, subscribed to
    /// `bench/{id}`, no reload.
    Broker,
}

impl Transport {
    /// A name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Ws => "WebSocket",
            Transport::Mqtt => "MQTT",
            Transport::MqttWs => "MQTT over WebSocket",
            Transport::Broker => "MQTT (broker)",
        }
    }

    /// The command-line spelling.
    pub fn arg(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Mqtt => "mqtt",
            Transport::MqttWs => "mqtt-ws",
            Transport::Broker => "broker",
        }
    }
}

/// Settings of `ddp-bench idle`.
#[derive(clap::Args)]
pub struct IdleArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Sessions to open (one per device).
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Client processes that share them.
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// Keys per device store (each session's reload carries them).
    #[arg(long, default_value_t = 10)]
    keys: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 32)]
    value_bytes: usize,
    /// Transport.
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
}

/// Settings of the hidden `ddp-bench idle-client` (run by `idle`).
#[derive(clap::Args)]
pub struct IdleClientArgs {
    /// `host:port` of the server's listener for the transport.
    #[arg(long)]
    addr: String,
    /// JSON file with the devices to connect as.
    #[arg(long)]
    devices: PathBuf,
    /// Transport.
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
}

/// Settings of `ddp-bench latency`.
#[derive(clap::Args)]
pub struct LatencyArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Connected devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Writes per second, spread over the devices.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Transports to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ws,mqtt")]
    transports: Vec<Transport>,
    /// Also measure Mosquitto (Debian's `mosquitto`) relaying QoS 1 messages to as many subscribers.
    #[arg(long)]
    mosquitto: bool,
    /// Also measure two nodes on PostgreSQL, devices on node A and writes through node B: a URL
    /// whose user may create databases (a fresh one is made per transport).
    #[arg(long)]
    postgres: Option<String>,
}

fn small_buffers() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// A client WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a device's session and reads its first message (the reload).
/// Opens a device's session and reads its first message (the reload); returns the session and
/// the reload's rev.
async fn open_ws(addr: &str, device: &Device) -> anyhow::Result<(Ws, u64)> {
    let mut request = format!("ws://{addr}/devices/{}/kv", device.id).into_client_request()?;
    request.headers_mut().insert("Authorization", format!("ModeCloud {}", device.key).parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(small_buffers()), false).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) => Ok((ws, reload_rev(t.as_bytes(), device)?)),
        other => bail!("device {}: expected a reload, got {other:?}", device.id),
    }
}

/// The rev of a reload message.
fn reload_rev(text: &[u8], device: &Device) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_slice(text)?;
    match (v["action"].as_str(), v["rev"].as_u64()) {
        (Some("reload"), Some(rev)) => Ok(rev),
        _ => bail!("device {}: expected a reload, got {v}", device.id),
    }
}

/// A device's MQTT session, subscribed to its kv topic; its reload has been read.
pub struct MqttDevice {
    /// Incoming publish payloads.
    pub payloads: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    /// The client, kept so the connection stays open.
    _client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttDevice {
    /// Closes the connection: the event loop task holds a client handle of its own, so it would
    /// otherwise keep the connection open.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens an MQTT 3.1.1 session subscribed to `topic` at QoS 1 (granted QoS 0 by DDP).
pub async fn open_mqtt(
    addr: &str,
    client_id: String,
    credentials: Option<(String, String)>,
    topic: String,
) -> anyhow::Result<MqttDevice> {
    let mut options = match addr.strip_prefix("ws://") {
        // MQTT over WebSocket: the broker address is the URL.
        Some(_) => {
            let mut o = rumqttc::MqttOptions::new(client_id, addr, 0);
            o.set_transport(rumqttc::Transport::Ws);
            o
        }
        None => {
            let (host, port) = addr.rsplit_once(':').context("mqtt address")?;
            rumqttc::MqttOptions::new(client_id, host, port.parse::<u16>()?)
        }
    };
    options.set_keep_alive(Duration::from_secs(60));
    options.set_clean_session(true);
    if let Some((user, pass)) = credentials {
        options.set_credentials(user, pass);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    // rumqttc gives up on a connect after 5 s by default; in a reconnect storm of thousands a
    // device may wait longer than that in the listen queue, which is not a failure of the server.
    let mut network = eventloop.network_options();
    network.set_connection_timeout(60);
    eventloop.set_network_options(network);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let subscriber = client.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    if let Err(e) = subscriber.subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce).await
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(Err(e.into()));
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(anyhow::anyhow!("mqtt: {e}")));
                    }
                    return;
                }
            }
        }
    });
    let subscribed =
        tokio::time::timeout(Duration::from_secs(30), ready_rx).await.context("mqtt subscribe timed out")?;
    subscribed.context("the mqtt connection ended")??;
    Ok(MqttDevice { payloads: rx, _client: client, task })
}

/// Opens a device's MQTT session on DDP and reads its reload.
async fn open_ddp_mqtt(addr: &str, device: &Device) -> anyhow::Result<(MqttDevice, u64)> {
    let (d, first) = open_ddp_mqtt_reload(addr, "bench", device).await?;
    let rev = reload_rev(&first, device)?;
    Ok((d, rev))
}

/// Opens a device's MQTT session on DDP (client id `{prefix}-{id}`) and waits up to 60 s for
/// its first message, the reload, which it returns.
pub async fn open_ddp_mqtt_reload(addr: &str, prefix: &str, device: &Device) -> anyhow::Result<(MqttDevice, Vec<u8>)> {
    let mut d = open_mqtt(
        addr,
        format!("{prefix}-{}", device.id),
        Some((device.id.to_string(), device.key.clone())),
        format!("/devices/{}/kv", device.id),
    )
    .await?;
    let first = tokio::time::timeout(Duration::from_secs(60), d.payloads.recv())
        .await
        .context("no reload within 60 s")?
        .context("the connection closed before the reload")?;
    Ok((d, first))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    line.split_whitespace().nth(1).context("bad VmRSS")?.parse().context("bad VmRSS number")
}

/// What an idle-sessions run measured.
#[derive(Debug, Clone, Copy)]
pub struct IdleResult {
    /// Sessions opened.
    pub sessions: usize,
    /// Seconds to open them all.
    pub connect_secs: f64,
    /// Server resident memory before, KiB.
    pub before_kib: u64,
    /// And with every session open, KiB.
    pub after_kib: u64,
}

impl IdleResult {
    /// Resident memory per session, bytes.
    pub fn per_session(&self) -> f64 {
        self.after_kib.saturating_sub(self.before_kib) as f64 * 1024.0 / self.sessions.max(1) as f64
    }

    /// A markdown table row: `name`, sessions, time to open, RSS before and after, per session.
    pub fn table_row(&self, name: &str) -> String {
        format!(
            "| {name} | {} | {:.1} s | {:.1} MiB | {:.1} MiB | {:.0} bytes ({:.1} KiB) |",
            self.sessions,
            self.connect_secs,
            self.before_kib as f64 / 1024.0,
            self.after_kib as f64 / 1024.0,
            self.per_session(),
            self.per_session() / 1024.0
        )
    }
}

/// Opens one session per device against `addr` from `processes` client processes, holds them all,
/// and measures the resident memory of the server process `pid` before and after.
pub async fn measure_idle(
    pid: u32,
    addr: &str,
    devices: &[Device],
    processes: usize,
    transport: Transport,
    work: &std::path::Path,
) -> anyhow::Result<IdleResult> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let (children, opened) = devices::spawn_clients(
        "idle-client",
        &["--addr", addr, "--transport", transport.arg()],
        devices,
        processes,
        work,
    )
    .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    drop(children);
    Ok(IdleResult { sessions: opened, connect_secs, before_kib: before, after_kib: after })
}

/// `ddp-bench idle`.
pub async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    let work = tempfile::tempdir_in(".")?;
    let ddp = server::start(&bin, &work.path().join("data"), &[])?;
    eprintln!("creating {} devices with {} keys each…", args.sessions, args.keys);
    let devices = devices::create(&ddp.base, args.sessions, args.keys, args.value_bytes).await?;
    let addr = match args.transport {
        Transport::Ws => ddp.base.trim_start_matches("http://").to_owned(),
        Transport::MqttWs => format!("ws://{}/mqtt", ddp.base.trim_start_matches("http://")),
        Transport::Mqtt | Transport::Broker => ddp.mqtt.clone(),
    };
    let r = measure_idle(ddp.pid, &addr, &devices, args.processes, args.transport, work.path()).await?;
    println!("| transport | sessions | opened in | server RSS before | after | per session |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("{}", r.table_row(args.transport.label()));
    Ok(())
}

/// `ddp-bench idle-client`: opens its devices' sessions, says `ready N`, holds them until stdin
/// closes.
pub async fn idle_client(args: IdleClientArgs) -> anyhow::Result<()> {
    let devices: Vec<Device> = serde_json::from_slice(&std::fs::read(&args.devices)?)?;
    let devices = Arc::new(devices);
    let next = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<anyhow::Result<()>>(256);
    let transport = args.transport;
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    for _ in 0..128 {
        let (devices, next, opened, done_tx, addr, held) =
            (devices.clone(), next.clone(), opened.clone(), done_tx.clone(), args.addr.clone(), held.clone());
        tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(device) = devices.get(i) else { break };
                let result = match transport {
                    Transport::Ws => open_ws(&addr, device).await.map(|(mut ws, _)| {
                        // Keep reading so the server's pings are answered.
                        tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
                    }),
                    Transport::Mqtt | Transport::MqttWs => open_ddp_mqtt(&addr, device).await.map(|(d, _)| {
                        if let Ok(mut held) = held.lock() {
                            held.push(d);
                        }
                    }),
                    Transport::Broker => {
                        open_mqtt(&addr, format!("idle-{}", device.id), None, format!("bench/{}", device.id)).await.map(
                            |d| {
                                if let Ok(mut held) = held.lock() {
                                    held.push(d);
                                }
                            },
                        )
                    }
                };
                match result {
                    Ok(()) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let _ = done_tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            let _ = done_tx.send(Ok(())).await;
        });
    }
    drop(done_tx);
    while let Some(r) = done_rx.recv().await {
        r?;
    }
    println!("ready {}", opened.load(Ordering::Relaxed));
    // Hold until the parent closes our stdin.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while stdin.next_line().await?.is_some() {}
    Ok(())
}

/// `ddp-bench latency`.
pub async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    let duration = Duration::from_secs_f64(args.seconds);
    let mut rows = Vec::new();
    for transport in &args.transports {
        let work = tempfile::tempdir_in(".")?;
        let ddp = server::start(&bin, &work.path().join("data"), &[])?;
        let devices = devices::create(&ddp.base, args.devices, 0, 0).await?;
        let result = measure(&ddp.base, &ddp.base, &ddp.mqtt, &devices, args.rate, duration, *transport).await?;
        rows.push(result.row(&format!("DDP over {} (durable REST write → device)", transport.label())));
    }
    if let Some(url) = &args.postgres {
        for transport in &args.transports {
            let work = tempfile::tempdir_in(".")?;
            let db = ddp_testkit::create_database(url, "ddp_bench").await.map_err(anyhow::Error::msg)?;
            let start = |name: &str| {
                let flags = ["--database", &db, "--node-name", name];
                server::start(&bin, &work.path().join(name), &flags)
            };
            let (a, b) = (start("node-a")?, start("node-b")?);
            let devices = devices::create(&a.base, args.devices, 0, 0).await?;
            let result = measure(&b.base, &a.base, &a.mqtt, &devices, args.rate, duration, *transport).await?;
            rows.push(result.row(&format!(
                "DDP on PostgreSQL over {}, 2 nodes (REST write on node B → device on node A)",
                transport.label()
            )));
        }
    }
    if args.mosquitto {
        let result = crate::mosquitto::measure(args.devices, args.rate, duration, rumqttc::QoS::AtLeastOnce).await?;
        rows.push(result.row("Mosquitto QoS 1 relay (publish → subscriber, not durable)"));
    }
    println!("{}", LatencyResult::HEADER);
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// What a latency run measured.
pub struct LatencyResult {
    /// Write-issue to device-receive latencies, microseconds.
    pub hist: Histogram<u64>,
    /// Writes acknowledged.
    pub acked: u64,
    /// Changes received by devices.
    pub delivered: u64,
    /// Changes a device received twice, or out of rev order, or after a gap.
    pub disorder: u64,
}

impl LatencyResult {
    /// The table header.
    pub const HEADER: &str = "| system | writes acked | delivered | lost | out of order | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|---:|";

    /// One table row.
    pub fn row(&self, name: &str) -> String {
        let ms = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "| {name} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            self.acked,
            self.delivered,
            self.acked.saturating_sub(self.delivered),
            self.disorder,
            ms(0.5),
            ms(0.99),
            self.hist.max() as f64 / 1000.0
        )
    }
}

/// Connects `devices` to the node at `session_base` (WebSocket) or `mqtt`, writes through the node
/// at `write_base` at `rate` for `duration`, and measures delivery.
pub async fn measure(
    write_base: &str,
    session_base: &str,
    mqtt: &str,
    devices: &[Device],
    rate: u64,
    duration: Duration,
    transport: Transport,
) -> anyhow::Result<LatencyResult> {
    let addr = session_base.trim_start_matches("http://").to_owned();
    let epoch = Instant::now();
    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, bool)>();
    let mut readers = Vec::new();
    // A device's messages, checked for order and timed from their write's issue.
    let check =
        move |report: &tokio::sync::mpsc::UnboundedSender<(u64, u64, bool)>, last_rev: &mut u64, text: &[u8]| {
            let now = epoch.elapsed().as_micros() as u64;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(text) else { return };
            let rev = v["rev"].as_u64().unwrap_or(0);
            let in_order = rev == *last_rev + 1;
            *last_rev = rev;
            if let Some(sent) = v["value"]["t"].as_u64() {
                let _ = report.send((now.saturating_sub(sent), rev, in_order));
            }
        };
    for chunk in devices.chunks(100) {
        match transport {
            Transport::Broker | Transport::MqttWs => bail!("the DDP latency benchmark runs over ws or mqtt"),
            Transport::Ws => {
                let opened = futures_util::future::try_join_all(chunk.iter().map(|d| open_ws(&addr, d))).await?;
                for (mut ws, mut last_rev) in opened {
                    let report = report_tx.clone();
                    readers.push(tokio::spawn(async move {
                        while let Some(Ok(message)) = ws.next().await {
                            if let Message::Text(text) = message {
                                check(&report, &mut last_rev, text.as_bytes());
                            }
                        }
                    }));
                }
            }
            Transport::Mqtt => {
                let opened = futures_util::future::try_join_all(chunk.iter().map(|d| open_ddp_mqtt(mqtt, d))).await?;
                for (mut device, mut last_rev) in opened {
                    let report = report_tx.clone();
                    readers.push(tokio::spawn(async move {
                        while let Some(payload) = device.payloads.recv().await {
                            check(&report, &mut last_rev, &payload);
                        }
                    }));
                }
            }
        }
    }
    drop(report_tx);
    let result = write_and_collect(write_base, devices, rate, duration, epoch, report_rx).await;
    for r in readers {
        r.abort();
    }
    result
}

/// Issues REST writes at `rate` (open loop) carrying their issue time, then collects deliveries.
async fn write_and_collect(
    base: &str,
    devices: &[Device],
    rate: u64,
    duration: Duration,
    epoch: Instant,
    report_rx: tokio::sync::mpsc::UnboundedReceiver<(u64, u64, bool)>,
) -> anyhow::Result<LatencyResult> {
    let (base, ids) = (base.to_owned(), devices.iter().map(|d| d.id).collect::<Vec<_>>());
    let request: WriteRequest = Arc::new(move |client, i, payload| {
        let device = ids[(i as usize * 7919) % ids.len()];
        client
            .put(format!("{base}/devices/{device}/kv/k"))
            .header("Authorization", format!("ModeCloud {}", server::ADMIN_KEY))
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"value":{payload}}}"#))
    });
    timed_writes(request, rate, duration, epoch, report_rx).await
}

/// Builds write `i` carrying `payload` (a JSON object with its issue time).
pub type WriteRequest = Arc<dyn Fn(&reqwest::Client, u64, String) -> reqwest::RequestBuilder + Send + Sync>;

/// Issues `request`s at `rate` (open loop) for `duration`, each carrying its issue time (µs since
/// `epoch`) in `{"t","s"}`, then collects what the receivers report: (latency µs, rev, in order).
pub async fn timed_writes(
    request: WriteRequest,
    rate: u64,
    duration: Duration,
    epoch: Instant,
    mut report_rx: tokio::sync::mpsc::UnboundedReceiver<(u64, u64, bool)>,
) -> anyhow::Result<LatencyResult> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let acked = Arc::new(AtomicU64::new(0));
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let start = tokio::time::Instant::now();
    let mut writes = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let payload = json!({ "t": epoch.elapsed().as_micros() as u64, "s": i }).to_string();
        let sent = request(&client, i, payload);
        let acked = acked.clone();
        writes.push(tokio::spawn(async move {
            if sent.send().await.is_ok_and(|r| r.status().is_success()) {
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in writes {
        w.await?;
    }
    let acked = acked.load(Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut delivered, mut disorder) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while delivered < acked {
        match tokio::time::timeout_at(deadline, report_rx.recv()).await {
            Ok(Some((micros, _rev, in_order))) => {
                hist.record(micros.max(1))?;
                delivered += 1;
                disorder += u64::from(!in_order);
            }
            _ => break,
        }
    }
    Ok(LatencyResult { hist, acked, delivered, disorder })
}
