//! `ddp-bench fleet`: fleet queries and jobs (PROTOCOL.md §12) at fleet scale, on the embedded
//! store and on PostgreSQL side by side.
//!
//! Each server gets `devices` devices of 10 keys (`fw` from a few versions, a unique `serial`,
//! `k0…k7` numbers in 0..1000), set up 64 requests at a time (create, then one 10-op batch), and
//! runs with `--index-keys fw,serial,k0,k1`. Then, alternating between the servers:
//!
//! 1. the latency of `where` queries (each asked many times in a row, p50/p99): dense, sparse, two
//!    conditions, a page deep in the set, and one on a key that is not indexed (devices walked; not
//!    part of the goal);
//! 2. the devices per second of a job over every device (`"all": true`) without a rate, timed by
//!    the job's own `creationTime` and `endTime`, median of several jobs;
//! 3. the latency other writers see while such a job runs (closed-loop single-key `PUT`s to devices
//!    outside the fleet), as a ratio to the same load without a job, median over rounds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ddp_protocol::Timestamp;
use serde_json::{Value, json};

use crate::report::{RunResult, alternating};
use crate::server::{self, ADMIN_KEY, DdpProcess};
use crate::writes::{MakeRequest, http_load};

/// The keys the servers index.
pub const INDEX_KEYS: &str = "fw,serial,k0,k1";
/// Firmware versions the devices run, in turn (`fw<2.1` matches three in five).
const FIRMWARE: [&str; 5] = ["1", "2", "2.05", "2.1", "3"];
/// Devices the interference load writes to (class `load`, outside the fleet's jobs).
pub const LOAD_DEVICES: usize = 64;
/// Requests in flight while setting up.
pub const IN_FLIGHT: usize = 64;
/// Times each query is asked first, not counted.
const WARMUP_QUERIES: usize = 10;
/// At most this many timed asks of the query on a key that is not indexed (it walks devices).
const WALKED_TIMES: usize = 50;

/// Settings of the fleet benchmark.
#[derive(clap::Args)]
pub struct FleetArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Directory under which the servers' data goes.
    #[arg(long, default_value = ".")]
    work_dir: PathBuf,
    #[command(flatten)]
    plan: FleetPlan,
    /// Also measure a server on PostgreSQL: a URL whose user may create databases (a fresh one
    /// is made). Measurements alternate between the backends.
    #[arg(long)]
    postgres: Option<String>,
    /// Only PostgreSQL (with --postgres).
    #[arg(long)]
    postgres_only: bool,
}

/// How big the fleet benchmark is.
#[derive(clap::Args, Clone, Debug)]
pub struct FleetPlan {
    /// Devices in the fleet (10 keys each).
    #[arg(long, default_value_t = 100_000)]
    pub devices: usize,
    /// Times each query is asked in a row (after 10 not counted).
    #[arg(long, default_value_t = 200)]
    pub queries: usize,
    /// Closed-loop writers of the interference load.
    #[arg(long, default_value_t = 8)]
    pub load_clients: usize,
    /// Seconds of the interference load without a job, and again with one (shortened to fit
    /// inside a job: at most 80% of the job's expected time).
    #[arg(long, default_value_t = 4.0)]
    pub load_seconds: f64,
    /// Jobs timed, and rounds of the interference load, per backend; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One query's latencies.
pub struct QueryResult {
    /// What it asks.
    pub name: &'static str,
    /// Whether every key it names is indexed (the goal counts those).
    pub indexed: bool,
    /// Devices on its page.
    pub found: usize,
    /// Timed asks.
    pub times: usize,
    /// The very first ask (a warm-up, not in the percentiles), ms.
    pub first_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// One job over every device, without a rate.
#[derive(Clone, Copy)]
pub struct JobRun {
    /// Devices it selected.
    pub selected: u64,
    /// Devices it wrote.
    pub written: u64,
    /// Devices whose ops failed.
    pub failed: u64,
    /// `endTime − creationTime`, seconds.
    pub server_seconds: f64,
    /// From sending `POST /jobs` to seeing it done (polled every 100 ms), seconds.
    pub wall_seconds: f64,
}

impl JobRun {
    /// Devices per second by the job's own times (by wall time when they are missing).
    pub fn per_sec(&self) -> f64 {
        let secs = if self.server_seconds > 0.0 { self.server_seconds } else { self.wall_seconds };
        self.selected as f64 / secs.max(1e-9)
    }
}

/// One round of other writers without and with a job.
#[derive(Clone, Copy)]
pub struct Interference {
    /// Seconds of each load.
    pub window: f64,
    /// Without a job.
    pub quiet: RunResult,
    /// While a job over the fleet runs.
    pub busy: RunResult,
    /// The job's devices per second during the busy load.
    pub job_per_sec: f64,
    /// Whether the job was still running when the busy load ended.
    pub covered: bool,
}

impl Interference {
    /// Median latency with the job ÷ without.
    pub fn p50_ratio(&self) -> f64 {
        self.busy.p50_ms / self.quiet.p50_ms.max(1e-9)
    }

    /// p99 latency with the job ÷ without.
    pub fn p99_ratio(&self) -> f64 {
        self.busy.p99_ms / self.quiet.p99_ms.max(1e-9)
    }
}

/// Everything measured on one server.
pub struct FleetResult {
    /// The backend.
    pub name: String,
    /// Devices in the fleet.
    pub devices: usize,
    /// Seconds to set the fleet up (create + one 10-op batch each).
    pub setup_seconds: f64,
    /// The queries.
    pub queries: Vec<QueryResult>,
    /// The timed jobs.
    pub jobs: Vec<JobRun>,
    /// The interference rounds.
    pub rounds: Vec<Interference>,
}

impl FleetResult {
    /// Devices set up per second.
    pub fn setup_per_sec(&self) -> f64 {
        self.devices as f64 / self.setup_seconds.max(1e-9)
    }

    /// The median job's devices per second.
    pub fn job_per_sec(&self) -> f64 {
        median_of(self.jobs.iter().map(JobRun::per_sec))
    }

    /// The median job's devices per second by wall time.
    pub fn job_wall_per_sec(&self) -> f64 {
        median_of(self.jobs.iter().map(|j| j.selected as f64 / j.wall_seconds.max(1e-9)))
    }

    /// Median over the rounds of `f`.
    pub fn round_median(&self, f: impl Fn(&Interference) -> f64) -> f64 {
        median_of(self.rounds.iter().map(f))
    }

    /// The worst p99 of the queries on indexed keys, and which.
    pub fn worst_indexed(&self) -> Option<&QueryResult> {
        self.queries.iter().filter(|q| q.indexed).max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
    }
}

/// The median of some numbers (0 for none).
fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn auth() -> String {
    format!("ModeCloud {ADMIN_KEY}")
}

/// A number in 0..1000 that looks random over devices and keys (a multiplicative hash).
fn spread(device: u64, key: u64) -> u64 {
    (device.wrapping_mul(2_654_435_761).wrapping_add(key.wrapping_mul(40_503)) >> 7) % 1000
}

/// One server with its fleet set up.
struct Backend {
    name: String,
    base: String,
    fleet: Vec<u64>,
    load: Vec<u64>,
    setup_seconds: f64,
    _ddp: DdpProcess,
}

/// The 10-op batch device `i` of the fleet gets.
fn fleet_batch(i: usize) -> anyhow::Result<Value> {
    let fw: Value = serde_json::from_str(FIRMWARE[i % FIRMWARE.len()])?;
    let mut ops = vec![
        json!({"op": "set", "key": "fw", "value": fw}),
        json!({"op": "set", "key": "serial", "value": format!("S{i:06}")}),
    ];
    for k in 0..8u64 {
        ops.push(json!({"op": "set", "key": format!("k{k}"), "value": spread(i as u64, k)}));
    }
    Ok(json!({ "ops": ops }))
}

/// Creates the fleet (`n` devices of class `fleet`, 10 keys each, [`IN_FLIGHT`] requests at a
/// time) and the load devices; returns the fleet's ids in order, the load devices' ids, and the
/// seconds it took.
async fn setup(base: &str, n: usize) -> anyhow::Result<(Vec<u64>, Vec<u64>, f64)> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
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
                        .json(&json!({ "name": format!("{class}-{i}"), "deviceClass": class }))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let id = created["id"].as_u64().context("device id")?;
                    if i < n {
                        client
                            .patch(format!("{base}/devices/{id}/kv"))
                            .header("Authorization", auth())
                            .json(&fleet_batch(i)?)
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
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let fleet = all.iter().filter(|(i, _)| *i < n).map(|(_, id)| *id).collect();
    let load = all.iter().filter(|(i, _)| *i >= n).map(|(_, id)| *id).collect();
    Ok((fleet, load, seconds))
}

/// A query of the benchmark.
struct Query {
    name: &'static str,
    indexed: bool,
    times: usize,
    /// The query string, given the fleet's ids.
    text: fn(&[u64]) -> String,
}

/// The queries, in the order they are asked.
fn queries(times: usize) -> Vec<Query> {
    let q = |name, indexed, text| Query { name, indexed, times, text };
    vec![
        q("dense: `fw<2.1` (3 in 5 match), first page of 100", true, |_| "where=fw%3C2.1&limit=100".into()),
        q("sparse string: `serial=\"S050000\"`-style (1 match)", true, |f| {
            format!("where=serial%3D%22S{:06}%22", f.len() / 2)
        }),
        q("sparse number: `k0>=999` (1 in 1000)", true, |_| "where=k0%3E%3D999".into()),
        q("two conditions: `fw<2.1` and `k1<10`", true, |_| "where=fw%3C2.1&where=k1%3C10".into()),
        q("deep page: `fw<2.1` after the device 90% of the way in", true, |f| {
            format!("where=fw%3C2.1&after={}", f.get(f.len() * 9 / 10).copied().unwrap_or(0))
        }),
        Query {
            name: "not indexed: `k5>=999` (devices walked; not in the goal)",
            indexed: false,
            times: times.min(WALKED_TIMES),
            text: |_| "where=k5%3E%3D999".into(),
        },
    ]
}

/// Asks `query` its number of times in a row (after [`WARMUP_QUERIES`] not counted).
async fn time_query(client: &reqwest::Client, b: &Backend, query: &Query) -> anyhow::Result<QueryResult> {
    let url = format!("{}/devices?{}", b.base, (query.text)(&b.fleet));
    let (mut found, mut first_ms) = (0, 0.0);
    let mut ms = Vec::with_capacity(query.times);
    for i in 0..query.times + WARMUP_QUERIES {
        let started = Instant::now();
        let page: Vec<Value> =
            client.get(&url).header("Authorization", auth()).send().await?.error_for_status()?.json().await?;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        if i == 0 {
            first_ms = elapsed;
        } else if i >= WARMUP_QUERIES {
            ms.push(elapsed);
        }

        found = page.len();
    }
    ms.sort_by(f64::total_cmp);
    Ok(QueryResult {
        name: query.name,
        indexed: query.indexed,
        found,
        times: query.times,
        first_ms,
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
    })
}

/// Starts a job over `select` setting `otaUrl` to `value`; its id.
async fn start_job(client: &reqwest::Client, base: &str, select: Value, value: &str) -> anyhow::Result<u64> {
    let job: Value = client
        .post(format!("{base}/jobs"))
        .header("Authorization", auth())
        .json(&json!({"select": select, "ops": [{"op": "set", "key": "otaUrl", "value": value}]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    job["id"].as_u64().context("job id")
}

async fn get_job(client: &reqwest::Client, base: &str, id: u64) -> anyhow::Result<Value> {
    Ok(client
        .get(format!("{base}/jobs/{id}"))
        .header("Authorization", auth())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Polls a job every 100 ms until it ends; its last state.
async fn wait_job(client: &reqwest::Client, base: &str, id: u64) -> anyhow::Result<Value> {
    loop {
        let job = get_job(client, base, id).await?;
        if job["state"] != "running" {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `endTime − creationTime` of a job that ended, in seconds (0 when either is missing).
fn server_seconds(job: &Value) -> f64 {
    let time = |field: &str| job[field].as_str().and_then(Timestamp::parse);
    match (time("creationTime"), time("endTime")) {
        (Some(start), Some(end)) => (end.millis() - start.millis()).max(0) as f64 / 1000.0,
        _ => 0.0,
    }
}

fn count(job: &Value, field: &str) -> u64 {
    job[field].as_u64().unwrap_or(0)
}

/// A job over every device without a rate, waited for.
async fn time_job(client: &reqwest::Client, b: &Backend, round: usize) -> anyhow::Result<JobRun> {
    let started = Instant::now();
    let value = format!("https://fw.example/2.1?job={round}");
    let id = start_job(client, &b.base, json!({"all": true}), &value).await?;
    let job = wait_job(client, &b.base, id).await?;
    let wall_seconds = started.elapsed().as_secs_f64();
    if job["state"] != "done" {
        anyhow::bail!("{}: job {id} ended {}, not done", b.name, job["state"]);
    }
    Ok(JobRun {
        selected: count(&job, "selected"),
        written: count(&job, "written"),
        failed: count(&job, "failed"),
        server_seconds: server_seconds(&job),
        wall_seconds,
    })
}

/// Closed-loop single-key writers on the load devices.
async fn write_load(b: &Backend, clients: usize, seconds: f64) -> anyhow::Result<RunResult> {
    let addr = b.base.trim_start_matches("http://").to_owned();
    let (devices, host) = (Arc::new(b.load.clone()), addr.clone());
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

/// One round: the load without a job, then again while a job over the fleet runs (cancelled
/// after it).
async fn interference(
    client: &reqwest::Client,
    b: &Backend,
    clients: usize,
    window: f64,
    round: usize,
) -> anyhow::Result<Interference> {
    let quiet = write_load(b, clients, window).await?;
    let started = Instant::now();
    let value = format!("https://fw.example/2.2?round={round}");
    let id = start_job(client, &b.base, json!({"deviceClass": "fleet"}), &value).await?;
    let busy = write_load(b, clients, window).await?;
    let during = get_job(client, &b.base, id).await?;
    let job_per_sec = count(&during, "written") as f64 / started.elapsed().as_secs_f64();
    let covered = during["state"] == "running";
    client.delete(format!("{}/jobs/{id}", b.base)).header("Authorization", auth()).send().await?;
    wait_job(client, &b.base, id).await?;
    // Let what the job left behind (checkpoints, vacuum) settle before the next measurement.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Interference { window, quiet, busy, job_per_sec, covered })
}

/// Starts the servers and sets up each fleet.
async fn start(
    bin: &Path,
    work: &Path,
    postgres: Option<&str>,
    embedded: bool,
    devices: usize,
) -> anyhow::Result<Vec<Backend>> {
    let flags = ["--index-keys", INDEX_KEYS];
    let mut servers = Vec::new();
    if embedded {
        servers.push(("SQLite (embedded)", server::start(bin, &work.join("fleet-sqlite"), &flags)?));
    }
    if let Some(url) = postgres {
        let db = ddp_testkit::create_database(url, "ddp_fleet").await.map_err(anyhow::Error::msg)?;
        let pg = server::start(bin, &work.join("fleet-pg"), &[&flags[..], &["--database", &db]].concat())?;
        servers.push(("PostgreSQL", pg));
    }
    let mut backends = Vec::new();
    for (name, ddp) in servers {
        eprintln!("  {name}: setting up {devices} devices × 10 keys ({IN_FLIGHT} requests in flight)…");
        let (fleet, load, setup_seconds) = setup(&ddp.base, devices).await?;
        eprintln!(
            "    {:.0} devices/s ({:.0} key writes/s), {setup_seconds:.1} s",
            devices as f64 / setup_seconds,
            devices as f64 * 10.0 / setup_seconds
        );
        backends.push(Backend { name: name.to_owned(), base: ddp.base.clone(), fleet, load, setup_seconds, _ddp: ddp });
    }
    Ok(backends)
}

/// Runs the benchmark on each backend asked for (the embedded store when `embedded`, PostgreSQL
/// when `postgres` names one), alternating between them.
pub async fn measure(
    bin: &Path,
    work: &Path,
    postgres: Option<&str>,
    embedded: bool,
    plan: &FleetPlan,
) -> anyhow::Result<Vec<FleetResult>> {
    let backends = start(bin, work, postgres, embedded, plan.devices).await?;
    let client = reqwest::Client::new();
    let n = backends.len();
    let mut results: Vec<FleetResult> = backends
        .iter()
        .map(|b| FleetResult {
            name: b.name.clone(),
            devices: plan.devices,
            setup_seconds: b.setup_seconds,
            queries: Vec::new(),
            jobs: Vec::new(),
            rounds: Vec::new(),
        })
        .collect();

    eprintln!("  queries…");
    for (qi, query) in queries(plan.queries).iter().enumerate() {
        for b in alternating(n, qi) {
            let r = time_query(&client, &backends[b], query).await?;
            eprintln!(
                "    {:<18} {}: {} found, p50 {:.1} ms, p99 {:.1} ms (first ask {:.1} ms)",
                backends[b].name, r.name, r.found, r.p50_ms, r.p99_ms, r.first_ms
            );
            results[b].queries.push(r);
        }
    }

    let rounds = plan.rounds.max(1);
    eprintln!("  jobs over every device, without a rate…");
    for round in 0..rounds {
        for b in alternating(n, round) {
            let j = time_job(&client, &backends[b], round).await?;
            eprintln!(
                "    job {}/{rounds}: {:<18} {:.0} devices/s ({} selected, {} written, {} failed; {:.2} s by the job, \
                 {:.2} s wall)",
                round + 1,
                backends[b].name,
                j.per_sec(),
                j.selected,
                j.written,
                j.failed,
                j.server_seconds,
                j.wall_seconds
            );
            results[b].jobs.push(j);
        }
    }

    eprintln!("  other writers without and with a job…");
    for backend in &backends {
        write_load(backend, plan.load_clients, 0.5).await?; // warm-up, not counted
    }
    for round in 0..rounds {
        for b in alternating(n, round) {
            // The busy load must end before the job does: at most 80% of a job's expected time.
            let expected = plan.devices as f64 / results[b].job_per_sec().max(1.0);
            let window = plan.load_seconds.min(0.8 * expected).max(0.2);
            let r = interference(&client, &backends[b], plan.load_clients, window, round).await?;
            eprintln!(
                "    round {}/{rounds}: {:<18} {window:.1} s each: without p50 {:.2} ms p99 {:.2} ms; with p50 {:.2} ms \
                 p99 {:.2} ms ({:.2}× / {:.2}×); job {:.0} devices/s{}",
                round + 1,
                backends[b].name,
                r.quiet.p50_ms,
                r.quiet.p99_ms,
                r.busy.p50_ms,
                r.busy.p99_ms,
                r.p50_ratio(),
                r.p99_ratio(),
                r.job_per_sec,
                if r.covered { "" } else { " (the job ended before the load did)" }
            );
            results[b].rounds.push(r);
        }
    }
    Ok(results)
}

/// The report's tables (markdown).
pub fn tables(results: &[FleetResult]) -> String {
    let mut s = String::from("| query | asked |");
    for r in results {
        s.push_str(&format!(" {0} p50 ms | {0} p99 ms | {0} first ask ms |", r.name));
    }
    s.push_str(" devices on the page |\n|---|---:|");
    s.push_str(&"---:|---:|---:|".repeat(results.len()));
    s.push_str("---:|\n");
    if let Some(first) = results.first() {
        for (qi, q) in first.queries.iter().enumerate() {
            s.push_str(&format!("| {} | {} |", q.name, q.times));
            let mut found = Vec::new();
            for r in results {
                match r.queries.get(qi) {
                    Some(q) => {
                        s.push_str(&format!(" {:.1} | {:.1} | {:.1} |", q.p50_ms, q.p99_ms, q.first_ms));
                        found.push(q.found.to_string());
                    }
                    None => s.push_str(" – | – | – |"),
                }
            }
            found.dedup();
            s.push_str(&format!(" {} |\n", found.join(" / ")));
        }
    }

    s.push_str(
        "\n| store | set up: devices/s (key writes/s) | job over every device: devices/s, median | by wall time | \
         jobs | devices per job | failed |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {:.0} ({:.0}) | **{:.0}** | {:.0} | {} | {} | {} |\n",
            r.name,
            r.setup_per_sec(),
            r.setup_per_sec() * 10.0,
            r.job_per_sec(),
            r.job_wall_per_sec(),
            r.jobs.len(),
            r.jobs.first().map_or(0, |j| j.selected),
            r.jobs.iter().map(|j| j.failed).sum::<u64>()
        ));
    }

    s.push_str(
        "\n| store | other writers p50 / p99 ms, no job | while a job runs | ratio p50 | ratio p99 | job devices/s \
         meanwhile | rounds (s each) | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let uncovered = r.rounds.iter().filter(|i| !i.covered).count();
        s.push_str(&format!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2}× | **{:.2}×** | {:.0} | {} ({:.1}){} | {} |\n",
            r.name,
            r.round_median(|i| i.quiet.p50_ms),
            r.round_median(|i| i.quiet.p99_ms),
            r.round_median(|i| i.busy.p50_ms),
            r.round_median(|i| i.busy.p99_ms),
            r.round_median(Interference::p50_ratio),
            r.round_median(Interference::p99_ratio),
            r.round_median(|i| i.job_per_sec),
            r.rounds.len(),
            r.round_median(|i| i.window),
            if uncovered > 0 { format!(", {uncovered} with the job ending first") } else { String::new() },
            r.rounds.iter().map(|i| i.quiet.errors + i.busy.errors).sum::<u64>()
        ));
    }
    s
}

/// The goals, judged: (what, met, measured).
pub fn goals(results: &[FleetResult]) -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    for r in results {
        if let Some(worst) = r.worst_indexed() {
            out.push((
                format!("8: every `where` query on indexed keys ≤ 100 ms p99 ({}, {} devices)", r.name, r.devices),
                worst.p99_ms <= 100.0,
                format!("worst {:.1} ms: {}", worst.p99_ms, worst.name),
            ));
        }
    }
    if let Some(r) = results.iter().find(|r| r.name.starts_with("SQLite")) {
        out.push((
            format!("8: a job writes ≥ 5,000 devices/s on the embedded store ({} devices)", r.devices),
            r.job_per_sec() >= 5000.0,
            format!("{:.0} devices/s, median of {}", r.job_per_sec(), r.jobs.len()),
        ));
    }
    for r in results {
        let (p50, p99) = (r.round_median(Interference::p50_ratio), r.round_median(Interference::p99_ratio));
        out.push((
            format!("8: other writers' latency while a job runs ≤ 2× without, p50 and p99 ({})", r.name),
            p50 <= 2.0 && p99 <= 2.0,
            format!("p50 {p50:.2}×, p99 {p99:.2}× (median of {} round(s))", r.rounds.len()),
        ));
    }
    out
}

/// `ddp-bench fleet`.
pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    if args.postgres_only && args.postgres.is_none() {
        anyhow::bail!("--postgres-only needs --postgres");
    }
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    std::fs::create_dir_all(&args.work_dir)?;
    let work = tempfile::tempdir_in(&args.work_dir).context("cannot create a work directory")?;
    let results = measure(&bin, work.path(), args.postgres.as_deref(), !args.postgres_only, &args.plan).await?;
    let p = &args.plan;
    println!();
    println!(
        "{} devices × 10 keys, --index-keys {INDEX_KEYS}; each query {} times in a row; jobs over every device \
         without a rate, median of {}; {} writers, {} rounds:",
        p.devices,
        p.queries,
        p.rounds.max(1),
        p.load_clients,
        p.rounds.max(1)
    );
    println!();
    print!("{}", tables(&results));
    println!();
    for (what, met, detail) in goals(&results) {
        println!("goal: {what} — {} ({detail})", if met { "met" } else { "MISSED" });
    }
    Ok(())
}
