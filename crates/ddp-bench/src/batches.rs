//! `ddp-bench batches`: durable key writes per second through atomic batches (PROTOCOL.md §11),
//! `PATCH /devices/{id}/kv` with 1, 10 or 100 `set` ops, on the embedded store and on
//! PostgreSQL side by side.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::report::{RunResult, alternating, median};
use crate::writes::{MakeRequest, http_load};
use crate::{fsync, server};

/// Settings of the batch benchmark.
#[derive(clap::Args)]
pub struct BatchesArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Directory under which the data and the fsync probe file go (same file system).
    #[arg(long, default_value = ".")]
    work_dir: PathBuf,
    /// Ops per batch, comma-separated.
    #[arg(long, default_value = "1,10,100", value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Concurrent writers (keep-alive connections, closed loop), comma-separated.
    #[arg(long, default_value = "16,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Seconds of measurement per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Seconds of warm-up before each run.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Devices written to (batches spread over them).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Size of each value's JSON text in bytes.
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// Also measure a server on PostgreSQL: a URL whose user may create databases (a fresh one
    /// is made). Runs alternate between the backends.
    #[arg(long)]
    postgres: Option<String>,
}

/// One server under load: its name, base URL and devices.
pub struct Target {
    /// For the report.
    pub name: String,
    /// `http://host:port`.
    pub base: String,
    /// The devices written to.
    pub devices: Arc<Vec<u64>>,
}

/// Every run of a matrix: `[target][size][clients][run]`.
pub type Matrix = Vec<Vec<Vec<Vec<RunResult>>>>;

/// `clients` closed-loop writers sending batches of `size` sets (keys `k0…`) of `value` to the
/// devices in turn; `per_sec` counts batches.
pub async fn load(
    target: &Target,
    clients: usize,
    size: usize,
    duration: Duration,
    value: &str,
) -> anyhow::Result<RunResult> {
    let addr = target.base.trim_start_matches("http://").to_owned();
    let ops: Vec<String> = (0..size).map(|k| format!(r#"{{"op":"set","key":"k{k}","value":{value}}}"#)).collect();
    let body = format!(r#"{{"ops":[{}]}}"#, ops.join(","));
    let (devices, host) = (target.devices.clone(), addr.clone());
    let request: MakeRequest = Arc::new(move |i| {
        let device = devices[i % devices.len()];
        format!(
            "PATCH /devices/{device}/kv HTTP/1.1\r\nHost: {host}\r\nAuthorization: ModeCloud {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            server::ADMIN_KEY,
            body.len()
        )
        .into_bytes()
    });
    http_load(&addr, clients, duration, request).await
}

/// Every (target, size, clients) for `repeat` rounds, alternating the order each round; keeps
/// every measured run.
pub async fn matrix(
    targets: &[Target],
    sizes: &[usize],
    clients: &[usize],
    warmup: Duration,
    seconds: Duration,
    repeat: usize,
    value: &str,
) -> anyhow::Result<Matrix> {
    let mut results: Matrix = vec![vec![vec![Vec::new(); clients.len()]; sizes.len()]; targets.len()];
    for round in 0..repeat {
        for t in alternating(targets.len(), round) {
            for si in alternating(sizes.len(), round) {
                for ci in alternating(clients.len(), round) {
                    let (size, c) = (sizes[si], clients[ci]);
                    load(&targets[t], c, size, warmup, value).await?;
                    let r = load(&targets[t], c, size, seconds, value).await?;
                    eprintln!(
                        "  run {}/{repeat}: {:<18} batches of {size:>3}, {c:>3} clients: {:>9.0} key writes/s \
                         ({:.0} batches/s) p50 {:.2} ms p99 {:.2} ms errors {}",
                        round + 1,
                        targets[t].name,
                        r.per_sec * size as f64,
                        r.per_sec,
                        r.p50_ms,
                        r.p99_ms,
                        r.errors
                    );
                    results[t][si][ci].push(r);
                }
            }
        }
    }
    Ok(results)
}

/// The markdown table of a matrix: one row per target, size and writer count.
pub fn table(targets: &[Target], sizes: &[usize], clients: &[usize], results: &Matrix) -> String {
    let mut s = String::from(
        "| store | ops per batch | clients | key writes/s | batches/s | p50 ms | p99 ms | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (t, target) in targets.iter().enumerate() {
        for (si, size) in sizes.iter().enumerate() {
            for (ci, c) in clients.iter().enumerate() {
                let runs = &results[t][si][ci];
                if runs.is_empty() {
                    continue;
                }
                let m = median(runs);
                let errors: u64 = runs.iter().map(|r| r.errors).sum();
                s.push_str(&format!(
                    "| {} | {size} | {c} | {:.0} | {:.0} | {:.2} | {:.2} | {errors} |\n",
                    target.name,
                    m.per_sec * *size as f64,
                    m.per_sec,
                    m.p50_ms,
                    m.p99_ms
                ));
            }
        }
    }
    s
}

/// The best median key writes/s of `target` with batches of `size` (over the writer counts).
pub fn best_key_writes(results: &Matrix, target: usize, sizes: &[usize], size: usize) -> Option<f64> {
    let si = sizes.iter().position(|&s| s == size)?;
    results[target][si]
        .iter()
        .filter(|runs| !runs.is_empty())
        .map(|runs| median(runs).per_sec * size as f64)
        .reduce(f64::max)
}

/// The JSON text of a string value `bytes` long.
pub fn value_of(bytes: usize) -> String {
    json!("x".repeat(bytes.saturating_sub(2))).to_string()
}

/// Starts the servers: the embedded store, and PostgreSQL when `postgres` names one.
pub async fn start_targets(
    bin: &std::path::Path,
    work: &std::path::Path,
    postgres: Option<&str>,
    devices: usize,
) -> anyhow::Result<(Vec<Target>, Vec<server::DdpProcess>)> {
    let mut processes = vec![server::start(bin, &work.join("batches-sqlite"), &[])?];
    let mut names = vec!["SQLite (embedded)".to_owned()];
    if let Some(url) = postgres {
        let db = ddp_testkit::create_database(url, "ddp_bench").await.map_err(anyhow::Error::msg)?;
        processes.push(server::start(bin, &work.join("batches-pg"), &["--database", &db])?);
        names.push("PostgreSQL".to_owned());
    }
    let mut targets = Vec::new();
    for (name, ddp) in names.into_iter().zip(&processes) {
        let made = crate::devices::create(&ddp.base, devices, 0, 0).await?;
        targets.push(Target {
            name,
            base: ddp.base.clone(),
            devices: Arc::new(made.into_iter().map(|d| d.id).collect()),
        });
    }
    Ok((targets, processes))
}

/// Runs the benchmark and prints its table.
pub async fn run(args: BatchesArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    std::fs::create_dir_all(&args.work_dir)?;
    let work = tempfile::tempdir_in(&args.work_dir).context("cannot create a work directory")?;
    let fsync_rate = {
        let dir = work.path().to_owned();
        tokio::task::spawn_blocking(move || fsync::probe(&dir, Duration::from_secs(2))).await??
    };
    println!("machine: {} CPUs; {fsync_rate}", std::thread::available_parallelism().map_or(0, |n| n.get()));
    let (targets, processes) = start_targets(&bin, work.path(), args.postgres.as_deref(), args.devices).await?;
    let results = matrix(
        &targets,
        &args.sizes,
        &args.clients,
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.seconds),
        args.repeat,
        &value_of(args.value_bytes),
    )
    .await?;
    drop(processes);
    println!();
    println!("{}-byte values, median of {} run(s) of {} s each:", args.value_bytes, args.repeat, args.seconds);
    println!();
    print!("{}", table(&targets, &args.sizes, &args.clients, &results));
    Ok(())
}
