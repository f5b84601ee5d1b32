//! `ddp-bench writes`: durable REST writes per second and their latency.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::report::WriteLoad;
use crate::report::{RunResult, alternating, median, print_table};
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
    /// Also measure a server on PostgreSQL: a URL whose user may create databases (a fresh one
    /// is made), e.g. postgres://postgres@127.0.0.1:5432/postgres. Runs alternate between the
    /// backends.
    #[arg(long)]
    postgres: Option<String>,
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

    let log = ["--log", "warn,ddp_server::server=info"];
    let mut backends = vec![("SQLite (embedded)", server::start(&bin, &work.path().join("data"), &log)?)];
    if let Some(url) = &args.postgres {
        let db = ddp_testkit::create_database(url, "ddp_bench").await.map_err(anyhow::Error::msg)?;
        let flags = [&log[..], &["--database", &db]].concat();
        backends.push(("PostgreSQL", server::start(&bin, &work.path().join("pg"), &flags)?));
    }
    let value = json!({ "value": "x".repeat(args.load.value_bytes.saturating_sub(2)) }).to_string();
    let mut devices = Vec::new();
    for (_, ddp) in &backends {
        let made = crate::devices::create(&ddp.base, args.load.devices, 0, 0).await?;
        devices.push(Arc::new(made.into_iter().map(|d| d.id).collect::<Vec<_>>()));
    }

    // results[backend][clients index]
    let mut results: Vec<Vec<Vec<RunResult>>> = vec![vec![Vec::new(); args.load.clients.len()]; backends.len()];
    for round in 0..args.load.repeat {
        for b in alternating(backends.len(), round) {
            let (name, ddp) = &backends[b];
            for i in alternating(args.load.clients.len(), round) {
                let c = args.load.clients[i];
                load(&ddp.base, &devices[b], c, Duration::from_secs_f64(args.warmup), &value).await?;
                let r = load(&ddp.base, &devices[b], c, Duration::from_secs_f64(args.load.seconds), &value).await?;
                eprintln!(
                    "  run {}/{}: {name:<18} {c:>3} clients: {:>8.0} writes/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                    round + 1,
                    args.load.repeat,
                    r.per_sec,
                    r.p50_ms,
                    r.p99_ms,
                    r.errors
                );
                results[b][i].push(r);
            }
        }
    }
    let names: Vec<&str> = backends.iter().map(|(name, _)| *name).collect();
    drop(backends); // stops the servers

    for (b, name) in names.iter().enumerate() {
        println!();
        println!("{name}:");
        print_table("clients", "durable PUT/s over HTTP", &args.load.clients, &results[b], fsync_rate.per_sec);
    }
    if results.len() == 2 {
        println!();
        println!("| clients | PostgreSQL / SQLite writes/s | p99 PostgreSQL / SQLite |");
        println!("|---:|---:|---:|");
        for (i, c) in args.load.clients.iter().enumerate() {
            let (s, p) = (median(&results[0][i]), median(&results[1][i]));
            println!("| {c} | {:.2}× | {:.2}× |", p.per_sec / s.per_sec, p.p99_ms / s.p99_ms);
        }
    }
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
