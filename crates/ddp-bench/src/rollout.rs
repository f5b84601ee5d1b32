//! `ddp-bench fleet`: fleet queries and jobs (PROTOCOL.md §12) at fleet scale, on the embedded
//! store and on PostgreSQL.
//!
//! Each server gets `devices` devices of 10 keys (`fw` from a few versions, a unique `serial`,
//! `k0…k7` random numbers) and runs with `--index-keys fw,serial,k0,k1`. Then: the latency of
//! `where` queries (sequential, p50/p99), dense and sparse, on indexed keys and on one that is not
//! (`k5`: devices walked); the devices per second of a job over every device without a rate; and
//! the latency other writers see while such a job runs, as a ratio to the same load without it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::report::RunResult;
use crate::server::{self, ADMIN_KEY};
use crate::writes::{MakeRequest, http_load};

/// The keys the servers index.
const INDEX_KEYS: &str = "fw,serial,k0,k1";
/// Firmware versions the devices run (`fw<2.1` matches three in five).
const FIRMWARE: [&str; 5] = ["1", "2", "2.05", "2.1", "3"];
/// Devices the interference load writes to (not in the job).
const LOAD_DEVICES: usize = 64;

/// Settings of the fleet benchmark.
#[derive(clap::Args)]
pub struct FleetArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Directory under which the servers' data goes.
    #[arg(long, default_value = ".")]
    work_dir: PathBuf,
    /// Devices in the fleet (10 keys each).
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    /// Times each query is asked (after 10 not counted).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Closed-loop writers of the interference load.
    #[arg(long, default_value_t = 8)]
    load_clients: usize,
    /// Seconds of the interference load, without and then with a job.
    #[arg(long, default_value_t = 4.0)]
    load_seconds: f64,
    /// Also measure a server on PostgreSQL: a URL whose user may create databases.
    #[arg(long)]
    postgres: Option<String>,
    /// Only PostgreSQL (with --postgres).
    #[arg(long)]
    postgres_only: bool,
}

/// One query's latencies.
pub struct QueryResult {
    /// What it asks.
    pub name: &'static str,
    /// Devices on its page.
    pub found: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// Everything measured on one server.
pub struct FleetResult {
    /// The backend.
    pub name: String,
    /// Devices set up per second (create + one 10-op batch each).
    pub setup_per_sec: f64,
    /// The queries.
    pub queries: Vec<QueryResult>,
    /// A job over every device, without a rate: devices written per second.
    pub job_per_sec: f64,
    /// The other writers without a job.
    pub quiet: RunResult,
    /// The same writers while a job runs.
    pub busy: RunResult,
    /// The job's devices per second during that run.
    pub busy_job_per_sec: f64,
}

fn auth() -> String {
    format!("ModeCloud {ADMIN_KEY}")
}

/// Creates the fleet (`n` devices of class `fleet`, 10 keys each) and the load devices; returns
/// the fleet's ids in order, the load devices' ids, and devices set up per second.
async fn setup(base: &str, n: usize) -> anyhow::Result<(Vec<u64>, Vec<u64>, f64)> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, base, next) = (client.clone(), base.to_owned(), next.clone());
            tokio::spawn(async move {
                let mut made = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n + LOAD_DEVICES {
                        return anyhow::Ok(made);
                    }
                    let class = if i < n { "fleet" } else { "load" };
                    let created: Value = client
                        .post(format!("{base}/devices"))
                        .header("Authorization", auth())
                        .json(&json!({ "name": format!("fleet-{i}"), "deviceClass": class }))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let id = created["id"].as_u64().context("device id")?;
                    if i < n {
                        let mut ops = vec![
                            json!({"op": "set", "key": "fw", "value": serde_json::from_str::<Value>(FIRMWARE[i % 5])?}),
                            json!({"op": "set", "key": "serial", "value": format!("S{i:06}")}),
                        ];
                        for k in 0..8u64 {
                            ops.push(json!({"op": "set", "key": format!("k{k}"), "value": spread(i as u64, k)}));
                        }
                        client
                            .patch(format!("{base}/devices/{id}/kv"))
                            .header("Authorization", auth())
                            .json(&json!({ "ops": ops }))
                            .send()
                            .await?
                            .error_for_status()?;
                    }
                    made.push((i, id));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n + LOAD_DEVICES);
    for w in workers {
        all.extend(w.await??);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    all.sort_unstable();
    let fleet = all.iter().filter(|(i, _)| *i < n).map(|(_, id)| *id).collect();
    let load = all.iter().filter(|(i, _)| *i >= n).map(|(_, id)| *id).collect();
    Ok((fleet, load, rate))
}

/// A number in 0..1000 that looks random over devices and keys (a multiplicative hash).
fn spread(device: u64, key: u64) -> u64 {
    (device.wrapping_mul(2_654_435_761).wrapping_add(key.wrapping_mul(40_503)) >> 7) % 1000
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Asks `query` `times` times in a row (after 10 not counted).
async fn time_query(
    client: &reqwest::Client,
    base: &str,
    name: &'static str,
    query: String,
    times: usize,
) -> anyhow::Result<QueryResult> {
    let url = format!("{base}/devices?{query}");
    let mut found = 0;
    let mut ms = Vec::with_capacity(times);
    for i in 0..times + 10 {
        let started = Instant::now();
        let page: Vec<Value> =
            client.get(&url).header("Authorization", auth()).send().await?.error_for_status()?.json().await?;
        if i >= 10 {
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        found = page.len();
    }
    ms.sort_by(f64::total_cmp);
    Ok(QueryResult { name, found, p50_ms: percentile(&ms, 0.5), p99_ms: percentile(&ms, 0.99) })
}

/// Starts a job over the whole fleet setting `otaUrl` to `value`; its id.
async fn start_job(client: &reqwest::Client, base: &str, value: &str) -> anyhow::Result<u64> {
    let job: Value = client
        .post(format!("{base}/jobs"))
        .header("Authorization", auth())
        .json(&json!({"select": {"deviceClass": "fleet"}, "ops": [{"op": "set", "key": "otaUrl", "value": value}]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    job["id"].as_u64().context("job id")
}

/// Polls a job every 100 ms until it ends; its last state.
async fn wait_job(client: &reqwest::Client, base: &str, id: u64) -> anyhow::Result<Value> {
    loop {
        let job: Value = client
            .get(format!("{base}/jobs/{id}"))
            .header("Authorization", auth())
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if job["state"] != "running" {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closed-loop single-key writers on the load devices.
async fn write_load(base: &str, load: &[u64], clients: usize, seconds: f64) -> anyhow::Result<RunResult> {
    let addr = base.trim_start_matches("http://").to_owned();
    let (devices, host) = (Arc::new(load.to_vec()), addr.clone());
    let body = r#"{"value":"load"}"#;
    let request: MakeRequest = Arc::new(move |i| {
        let device = devices[i % devices.len()];
        format!(
            "PUT /devices/{device}/kv/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            auth(),
            body.len()
        )
        .into_bytes()
    });
    http_load(&addr, clients, Duration::from_secs_f64(seconds), request).await
}

/// Sets up one server and measures it.
async fn measure_one(
    name: &str,
    base: &str,
    devices: usize,
    queries: usize,
    load_clients: usize,
    load_seconds: f64,
) -> anyhow::Result<FleetResult> {
    eprintln!("  {name}: setting up {devices} devices × 10 keys…");
    let (fleet, load, setup_per_sec) = setup(base, devices).await?;
    eprintln!("  {name}: {setup_per_sec:.0} devices/s set up; queries…");
    let client = reqwest::Client::new();
    let deep = fleet.get(fleet.len() * 9 / 10).copied().unwrap_or(0);
    let sparse_serial = format!("S{:06}", devices / 2);
    let asked: Vec<(&'static str, String)> = vec![
        ("dense, indexed: fw<2.1 (3 in 5 match), first page of 100", "where=fw%3C2.1&limit=100".into()),
        ("sparse string, indexed: one serial", format!("where=serial%3D%22{sparse_serial}%22")),
        ("sparse number, indexed: k0>=999 (1 in 1000)", "where=k0%3E%3D999".into()),
        ("two conditions: fw<2.1 and k1<10", "where=fw%3C2.1&where=k1%3C10".into()),
        ("a page 90% of the way in: fw<2.1 after …", format!("where=fw%3C2.1&after={deep}")),
        ("not indexed, sparse: k5>=999 (devices walked)", "where=k5%3E%3D999".into()),
    ];
    let mut results = Vec::new();
    for (what, query) in asked {
        let r = time_query(&client, base, what, query, queries).await?;
        eprintln!("    {what}: {} found, p50 {:.1} ms, p99 {:.1} ms", r.found, r.p50_ms, r.p99_ms);
        results.push(r);
    }

    eprintln!("  {name}: a job over {devices} devices…");
    let started = Instant::now();
    let id = start_job(&client, base, "https://fw.example/2.1").await?;
    let job = wait_job(&client, base, id).await?;
    let job_per_sec = job["written"].as_f64().unwrap_or(0.0) / started.elapsed().as_secs_f64();
    eprintln!("    {job_per_sec:.0} devices/s ({} written, {} failed)", job["written"], job["failed"]);

    eprintln!("  {name}: other writers without and with a job…");
    let quiet = write_load(base, &load, load_clients, load_seconds).await?;
    let started = Instant::now();
    let id = start_job(&client, base, "https://fw.example/2.2").await?;
    let busy = write_load(base, &load, load_clients, load_seconds).await?;
    let during: Value = client
        .get(format!("{base}/jobs/{id}"))
        .header("Authorization", auth())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let busy_job_per_sec = during["written"].as_f64().unwrap_or(0.0) / started.elapsed().as_secs_f64();
    let _ = client.delete(format!("{base}/jobs/{id}")).header("Authorization", auth()).send().await?;
    eprintln!(
        "    without: p50 {:.2} ms p99 {:.2} ms; with: p50 {:.2} ms p99 {:.2} ms (job {busy_job_per_sec:.0} devices/s)",
        quiet.p50_ms, quiet.p99_ms, busy.p50_ms, busy.p99_ms
    );
    Ok(FleetResult {
        name: name.to_owned(),
        setup_per_sec,
        queries: results,
        job_per_sec,
        quiet,
        busy,
        busy_job_per_sec,
    })
}

/// Runs the benchmark on each backend asked for.
#[allow(clippy::too_many_arguments)] // the benchmark's settings, shared by `fleet` and `compare`
pub async fn measure(
    bin: &std::path::Path,
    work: &std::path::Path,
    postgres: Option<&str>,
    sqlite: bool,
    devices: usize,
    queries: usize,
    load_clients: usize,
    load_seconds: f64,
) -> anyhow::Result<Vec<FleetResult>> {
    let flags = ["--index-keys", INDEX_KEYS];
    let mut out = Vec::new();
    if sqlite {
        let ddp = server::start(bin, &work.join("fleet-sqlite"), &flags)?;
        out.push(measure_one("SQLite (embedded)", &ddp.base, devices, queries, load_clients, load_seconds).await?);
    }
    if let Some(url) = postgres {
        let db = ddp_testkit::create_database(url, "ddp_fleet").await.map_err(anyhow::Error::msg)?;
        let ddp = server::start(bin, &work.join("fleet-pg"), &[&flags[..], &["--database", &db]].concat())?;
        out.push(measure_one("PostgreSQL", &ddp.base, devices, queries, load_clients, load_seconds).await?);
    }
    Ok(out)
}

/// The report's tables.
pub fn tables(results: &[FleetResult]) -> String {
    let mut s = String::from("| store | query | found | p50 ms | p99 ms |\n|---|---|---:|---:|---:|\n");
    for r in results {
        for q in &r.queries {
            s.push_str(&format!("| {} | {} | {} | {:.1} | {:.1} |\n", r.name, q.name, q.found, q.p50_ms, q.p99_ms));
        }
    }
    s.push_str(
        "\n| store | devices set up/s | job devices/s | other writers p50 / p99 ms, no job | with a job | \
         ratio p50 / p99 | job devices/s meanwhile |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× / {:.2}× | {:.0} |\n",
            r.name,
            r.setup_per_sec,
            r.job_per_sec,
            r.quiet.p50_ms,
            r.quiet.p99_ms,
            r.busy.p50_ms,
            r.busy.p99_ms,
            r.busy.p50_ms / r.quiet.p50_ms.max(1e-9),
            r.busy.p99_ms / r.quiet.p99_ms.max(1e-9),
            r.busy_job_per_sec
        ));
    }
    s
}

/// `ddp-bench fleet`.
pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    std::fs::create_dir_all(&args.work_dir)?;
    let work = tempfile::tempdir_in(&args.work_dir).context("cannot create a work directory")?;
    if args.postgres_only && args.postgres.is_none() {
        anyhow::bail!("--postgres-only needs --postgres");
    }
    let results = measure(
        &bin,
        work.path(),
        args.postgres.as_deref(),
        !args.postgres_only,
        args.devices,
        args.queries,
        args.load_clients,
        args.load_seconds,
    )
    .await?;
    println!();
    println!(
        "{} devices × 10 keys, --index-keys {INDEX_KEYS}; each query {} times in a row; {} writers for {} s:",
        args.devices, args.queries, args.load_clients, args.load_seconds
    );
    println!();
    print!("{}", tables(&results));
    Ok(())
}
