//! Delivery and acknowledgement (PROTOCOL.md §10): devices run the Rust SDK (`ddp-device`), which
//! acknowledges what it applied. Two measures:
//!
//! - **write → applied** and **write → delivered**: apps write at a steady rate (open loop),
//!   alternately with `?wait=applied` and `?wait=delivered`; each answer comes when the device
//!   acknowledged (or its session sent) the change, so its response time is the latency. Both in
//!   the same run, over the same devices.
//! - **what acks cost**: durable writes/s from a closed loop of clients to the devices' stores
//!   while every device is connected, with the SDK acknowledging and without, alternating.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::devices::{self, Device};
use crate::report::{RunResult, alternating, median};
use crate::storm::cpu_seconds;
use crate::{server, writes};

/// Settings of `ddp-bench acks`.
#[derive(clap::Args)]
pub struct AcksArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Connected SDK devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Writes per second for the latency run, spread over the devices.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Closed-loop writers for the throughput runs.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5.0)]
    throughput_seconds: f64,
    /// Throughput runs with and without acks, alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// What the latency run measured.
pub struct WaitResult {
    /// Write issue → answer of `?wait=applied`, µs, for writes the device confirmed.
    pub applied: Histogram<u64>,
    /// Write issue → answer of `?wait=delivered`, µs, for writes delivered.
    pub delivered: Histogram<u64>,
    /// Writes that waited for `applied` / `delivered`.
    pub applied_sent: u64,
    /// Writes that waited for `delivered`.
    pub delivered_sent: u64,
    /// Writes the wait could not confirm (timeout or error).
    pub unconfirmed: u64,
}

impl WaitResult {
    fn ms(h: &Histogram<u64>, q: f64) -> f64 {
        h.value_at_quantile(q) as f64 / 1000.0
    }

    /// p50 and p99 of write → applied, ms.
    pub fn applied_ms(&self) -> (f64, f64) {
        (Self::ms(&self.applied, 0.5), Self::ms(&self.applied, 0.99))
    }

    /// p50 and p99 of write → delivered, ms.
    pub fn delivered_ms(&self) -> (f64, f64) {
        (Self::ms(&self.delivered, 0.5), Self::ms(&self.delivered, 0.99))
    }
}

/// Starts one SDK client per device over WebSocket (`acks`: acknowledging), 100 at a time, and
/// waits until all have synced.
pub async fn connect_sdk(base: &str, devices: &[Device], acks: bool) -> anyhow::Result<Vec<ddp_device::Client>> {
    let url = base.replace("http://", "ws://");
    let mut clients = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(100) {
        let started: Vec<ddp_device::Client> = chunk
            .iter()
            .map(|d| ddp_device::Client::builder(&url, d.id, &d.key).acknowledge(acks).start())
            .collect::<Result<_, _>>()?;
        for c in &started {
            tokio::time::timeout(Duration::from_secs(30), c.ready()).await.context("an SDK device did not sync")??;
        }
        clients.extend(started);
    }
    Ok(clients)
}

/// Closes SDK clients.
pub async fn close_sdk(clients: Vec<ddp_device::Client>) {
    futures_util::future::join_all(clients.iter().map(ddp_device::Client::close)).await;
}

/// Writes to the devices at `rate` for `duration` (open loop), alternately waiting for
/// `applied` and `delivered` (at most 10 s each), and times each answer from the write's issue.
pub async fn measure_waits(
    base: &str,
    devices: &[Device],
    rate: u64,
    duration: Duration,
) -> anyhow::Result<WaitResult> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let ids: Arc<Vec<u64>> = Arc::new(devices.iter().map(|d| d.id).collect());
    let unconfirmed = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut writes = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let device = ids[(i as usize * 7919) % ids.len()];
        let what = if i % 2 == 0 { "applied" } else { "delivered" };
        let url = format!("{base}/devices/{device}/kv/k{}?wait={what}&waitTimeout=10", i % 10);
        let (client, unconfirmed) = (client.clone(), unconfirmed.clone());
        writes.push(tokio::spawn(async move {
            let issued = std::time::Instant::now();
            let answer = client
                .put(url)
                .header("Authorization", format!("ModeCloud {}", server::ADMIN_KEY))
                .header("Content-Type", "application/json")
                .body(json!({ "value": i }).to_string())
                .send()
                .await;
            let confirmed = match answer {
                Ok(r) if r.status().is_success() => {
                    r.json::<serde_json::Value>().await.is_ok_and(|body| body[what] == true)
                }
                _ => false,
            };
            let took = issued.elapsed().as_micros() as u64;
            if !confirmed {
                unconfirmed.fetch_add(1, Ordering::Relaxed);
            }
            (what == "applied", confirmed, took)
        }));
    }
    let mut result = WaitResult {
        applied: Histogram::new(3)?,
        delivered: Histogram::new(3)?,
        applied_sent: 0,
        delivered_sent: 0,
        unconfirmed: 0,
    };
    for w in writes {
        let (applied, confirmed, took) = w.await?;
        let (hist, sent) = if applied {
            (&mut result.applied, &mut result.applied_sent)
        } else {
            (&mut result.delivered, &mut result.delivered_sent)
        };
        *sent += 1;
        if confirmed {
            hist.record(took)?;
        }
    }
    result.unconfirmed = unconfirmed.load(Ordering::Relaxed);
    Ok(result)
}

/// Durable writes/s of `clients` closed-loop writers to the devices' stores, with every device
/// connected through the SDK, acknowledging (`acks`) or not. Warms up for a second first.
/// Also returns the CPU seconds the server (`pid`) and this process spent per second measured.
pub async fn throughput(
    base: &str,
    pid: u32,
    devices: &[Device],
    acks: bool,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    let sdk = connect_sdk(base, devices, acks).await?;
    let ids = Arc::new(devices.iter().map(|d| d.id).collect::<Vec<_>>());
    let body = json!({ "value": "x".repeat(254) }).to_string();
    writes::load(base, &ids, clients, Duration::from_secs(1), &body).await?;
    let (server0, own0, acks0) = (cpu_seconds(pid), cpu_seconds(std::process::id()), acks_taken(base).await);
    let r = writes::load(base, &ids, clients, duration, &body).await?;
    let secs = duration.as_secs_f64();
    let (server, own) = ((cpu_seconds(pid) - server0) / secs, (cpu_seconds(std::process::id()) - own0) / secs);
    let acks = (acks_taken(base).await - acks0) / secs;
    close_sdk(sdk).await;
    Ok(Throughput { result: r, server_cpu: server, own_cpu: own, acks_per_sec: acks })
}

/// One throughput run: the writes, the CPU the server and this process (load and devices)
/// spent per second, and the acks the server took per second.
pub struct Throughput {
    /// The writes.
    pub result: RunResult,
    /// Server CPU seconds per second.
    pub server_cpu: f64,
    /// This process's CPU seconds per second.
    pub own_cpu: f64,
    /// Acks per second.
    pub acks_per_sec: f64,
}

/// Acks the server has taken so far (`ddp_acks_total`, every outcome).
async fn acks_taken(base: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("{base}/metrics")).await else { return 0.0 };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("ddp_acks_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Throughput with and without acks, `repeat` times each, alternating; (without, with).
pub async fn throughput_pair(
    base: &str,
    pid: u32,
    devices: &[Device],
    clients: usize,
    duration: Duration,
    repeat: usize,
) -> anyhow::Result<(Vec<RunResult>, Vec<RunResult>)> {
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..repeat {
        for acks in alternating(2, round) {
            let t = throughput(base, pid, devices, acks == 1, clients, duration).await?;
            let r = t.result;
            eprintln!(
                "  round {}: {clients} writers, {} SDK devices {}: {:.0} writes/s p99 {:.2} ms errors {}, \
                 {:.0} acks/s (CPU: server {:.2}, load and devices {:.2})",
                round + 1,
                devices.len(),
                if acks == 1 { "acknowledging" } else { "not acknowledging" },
                r.per_sec,
                r.p99_ms,
                r.errors,
                t.acks_per_sec,
                t.server_cpu,
                t.own_cpu
            );
            if acks == 1 { with.push(r) } else { without.push(r) }
        }
    }
    Ok((without, with))
}

/// `ddp-bench acks`.
pub async fn run(args: AcksArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    let work = tempfile::tempdir_in(".")?;
    let ddp = server::start(&bin, &work.path().join("data"), &[]).context("ddp serve")?;
    let made = devices::create(&ddp.base, args.devices, 0, 0).await?;

    let sdk = connect_sdk(&ddp.base, &made, true).await?;
    let r = measure_waits(&ddp.base, &made, args.rate, Duration::from_secs_f64(args.seconds)).await?;
    close_sdk(sdk).await;
    let (ap50, ap99) = r.applied_ms();
    let (dp50, dp99) = r.delivered_ms();
    println!(
        "| {} SDK devices, {} writes/s | writes | p50 ms | p99 ms |\n|---|---:|---:|---:|",
        args.devices, args.rate
    );
    println!("| write → delivered (`?wait=delivered`) | {} | {dp50:.2} | {dp99:.2} |", r.delivered_sent);
    println!("| write → applied (`?wait=applied`) | {} | {ap50:.2} | {ap99:.2} |", r.applied_sent);
    println!("unconfirmed within 10 s: {}", r.unconfirmed);

    let duration = Duration::from_secs_f64(args.throughput_seconds);
    let (without, with) = throughput_pair(&ddp.base, ddp.pid, &made, args.clients, duration, args.repeat).await?;
    let (a, b) = (median(&without), median(&with));
    println!();
    println!(
        "| {} writers, {} SDK devices connected | durable PUT/s (median of {}) | p99 ms |",
        args.clients, args.devices, args.repeat
    );
    println!("|---|---:|---:|");
    println!("| devices not acknowledging | {:.0} | {:.2} |", a.per_sec, a.p99_ms);
    println!("| devices acknowledging | {:.0} | {:.2} |", b.per_sec, b.p99_ms);
    println!("ratio with / without acks: {:.2}×", b.per_sec / a.per_sec);
    Ok(())
}
