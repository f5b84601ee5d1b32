//! `ddp-bench writes`: durable REST writes per second and their latency.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::report::WriteLoad;
use crate::report::{RunResult, alternating, print_table};
use crate::{fsync, server};

/// Settings of the write benchmark.
#[derive(clap::Args)]
pub struct WritesArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Seconds of warm-up before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[command(flatten)]
    load: WriteLoad,
}

/// Runs the benchmark and prints its table.
pub async fn run(args: WritesArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    let work = tempfile::tempdir_in(&args.load.work_dir).context("cannot create a work directory")?;
    println!("machine: {} CPUs; {}", std::thread::available_parallelism().map_or(0, |n| n.get()), kernel());
    let fsync_rate = {
        let dir = work.path().to_owned();
        tokio::task::spawn_blocking(move || fsync::probe(&dir, Duration::from_secs(3))).await??
    };
    println!("{fsync_rate}");

    let ddp = server::start(&bin, &work.path().join("data"), &["--log", "warn,ddp_server::server=info"])?;
    let client = reqwest::Client::new();
    let mut devices = Vec::with_capacity(args.load.devices);
    for i in 0..args.load.devices {
        let created: serde_json::Value = client
            .post(format!("{}/devices", ddp.base))
            .header("Authorization", format!("ModeCloud {}", server::ADMIN_KEY))
            .json(&json!({ "name": format!("bench-{i}") }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        devices.push(created["id"].as_u64().context("device id")?);
    }
    let devices = Arc::new(devices);
    let value = json!({ "value": "x".repeat(args.load.value_bytes.saturating_sub(2)) }).to_string();

    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); args.load.clients.len()];
    for round in 0..args.load.repeat {
        for i in alternating(args.load.clients.len(), round) {
            let c = args.load.clients[i];
            load(&ddp.base, &devices, c, Duration::from_secs_f64(args.warmup), &value).await?;
            let r = load(&ddp.base, &devices, c, Duration::from_secs_f64(args.load.seconds), &value).await?;
            eprintln!(
                "  run {}/{}: {c:>3} clients: {:>8.0} writes/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                round + 1,
                args.load.repeat,
                r.per_sec,
                r.p50_ms,
                r.p99_ms,
                r.errors
            );
            results[i].push(r);
        }
    }
    drop(ddp);

    println!();
    print_table("clients", "durable PUT/s over HTTP", &args.load.clients, &results, fsync_rate.per_sec);
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown kernel".into(), |k| format!("Linux {}", k.trim()))
}

/// `clients` connections writing in a closed loop for `duration`.
async fn load(
    base: &str,
    devices: &Arc<Vec<u64>>,
    clients: usize,
    duration: Duration,
    body: &str,
) -> anyhow::Result<RunResult> {
    if devices.is_empty() {
        bail!("no devices to write to");
    }
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let base = base.to_owned();
            let devices = devices.clone();
            let body = body.to_owned();
            tokio::spawn(async move {
                let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
                let mut hist = Histogram::<u64>::new(3)?;
                let (mut ok, mut errors) = (0u64, 0u64);
                let mut i = c * 7919;
                while Instant::now() < deadline {
                    i += 1;
                    let device = devices[i % devices.len()];
                    let url = format!("{base}/devices/{device}/kv/k{}", i % 10);
                    let t = Instant::now();
                    let resp = client
                        .put(url)
                        .header("Authorization", format!("ModeCloud {}", server::ADMIN_KEY))
                        .header("Content-Type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => {
                            hist.record(t.elapsed().as_micros() as u64)?;
                            ok += 1;
                        }
                        _ => errors += 1,
                    }
                }
                anyhow::Ok((hist, ok, errors))
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    for t in tasks {
        let (h, o, e) = t.await??;
        hist.add(h)?;
        ok += o;
        errors += e;
    }
    debug_assert_eq!(hist.len(), ok);
    Ok(RunResult::from_histogram(&hist, started.elapsed().as_secs_f64(), errors))
}
