//! `ddp-bench compare`: DDP side by side with what users would otherwise build on — etcd
//! (revisioned KV with watch), Redis (`appendfsync always`) and Mosquitto — on the same machine,
//! in the same run, alternating between the systems round by round, reporting medians and
//! ratios, and judging the goals.
//!
//! 1. Durable writes/s and p99 at 1 and 64 clients: DDP REST `PUT` vs etcd (the same HTTP load
//!    on its JSON gateway) vs Redis, beside the disk's serial fsync rate.
//! 2. Write-to-device latency with devices at a steady write rate: DDP over WebSocket and MQTT vs
//!    etcd watchers on the same keys vs Mosquitto relaying QoS 1.
//! 3. Memory per idle session at many sessions: DDP WebSocket and MQTT vs Mosquitto.
//! 4. A reconnect storm: every device (10 keys each) reconnects at once; time until all have their
//!    reload — vs Mosquitto delivering 10 retained messages per device.
//! 5. Command delivery latency: commands sent over REST to devices on MQTT and on the command
//!    WebSocket, vs Mosquitto relaying QoS 0 publishes.
//! 6. Delivery and acknowledgement: write → delivered and write → applied latency with SDK
//!    devices that acknowledge, and durable writes with acking devices vs without (no peer keeps
//!    a standing per-device answer, so DDP is compared with itself).
//! 7. Atomic batches: durable key writes/s through `PATCH /devices/{id}/kv` batches of 1, 10 and
//!    100 ops, on the embedded store and on PostgreSQL.
//! 8. Fleet queries and jobs at 100,000 devices × 10 keys, on the embedded store and on
//!    PostgreSQL: `where` query latency, job devices/s, and other writers' latency while a job
//!    runs (see `rollout`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::baselines::{Etcd, Redis, version};
use crate::chart::{PERCENTILES, Series, latency_svg};
use crate::devices::{self, Device};
use crate::report::{RunResult, alternating, median};
use crate::storm::{Storm, StormReport, cpu_seconds, listen_overflows};
use crate::sync::{IdleResult, LatencyResult, Transport, measure, measure_idle};
use crate::{fsync, mosquitto, server, writes};

/// Settings of `ddp-bench compare`.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// Short runs (under 2 minutes in all, after the build) for a quick look.
    #[arg(long)]
    quick: bool,
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Directory for every system's data and the fsync probe (one file system).
    #[arg(long, default_value = ".")]
    work_dir: PathBuf,
    /// Write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the latency chart (SVG) to this file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Scenarios to run, comma-separated (1 writes, 2 latency, 3 idle memory, 4 reconnect storm,
    /// 5 command latency, 6 delivery and acknowledgement, 7 atomic batches, 8 fleet queries and
    /// jobs).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8")]
    scenarios: Vec<u8>,
    /// PostgreSQL for scenarios 7 and 8's second backend: a URL whose user may create databases
    /// (`bench/run` starts a private server). Without it, they measure the embedded store only.
    #[arg(long)]
    postgres: Option<String>,
}

/// How big each scenario is.
struct Plan {
    fsync_seconds: f64,
    write_seconds: f64,
    warmup: f64,
    repeat: usize,
    clients: Vec<usize>,
    write_devices: usize,
    value_bytes: usize,
    lat_devices: usize,
    lat_rate: u64,
    lat_seconds: f64,
    idle_sessions: usize,
    storm_devices: usize,
    storm_keys: usize,
    processes: usize,
    fleet: crate::rollout::FleetPlan,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                fsync_seconds: 1.0,
                write_seconds: 2.0,
                warmup: 0.5,
                repeat: 1,
                clients: vec![1, 64],
                write_devices: 200,
                value_bytes: 256,
                lat_devices: 300,
                lat_rate: 1000,
                lat_seconds: 3.0,
                idle_sessions: 2000,
                storm_devices: 2000,
                storm_keys: 10,
                processes: 2,
                fleet: crate::rollout::FleetPlan {
                    devices: 10_000,
                    queries: 100,
                    load_clients: 8,
                    load_seconds: 2.0,
                    rounds: 1,
                },
            }
        } else {
            Plan {
                fsync_seconds: 3.0,
                write_seconds: 5.0,
                warmup: 1.0,
                repeat: 3,
                clients: vec![1, 64],
                write_devices: 1000,
                value_bytes: 256,
                lat_devices: 1000,
                lat_rate: 1000,
                lat_seconds: 10.0,
                idle_sessions: 10_000,
                storm_devices: 10_000,
                storm_keys: 10,
                processes: 2,
                fleet: crate::rollout::FleetPlan {
                    devices: 100_000,
                    queries: 200,
                    load_clients: 8,
                    load_seconds: 4.0,
                    rounds: 3,
                },
            }
        }
    }
}

/// A goal, judged.
struct Goal {
    what: String,
    met: bool,
    detail: String,
}

/// The report, printed as it grows and written at the end.
#[derive(Default)]
struct Report {
    markdown: String,
    goals: Vec<Goal>,
    chart: Vec<Series>,
}

impl Report {
    fn section(&mut self, text: &str) {
        println!("{text}");
        self.markdown.push_str(text);
        self.markdown.push('\n');
    }

    fn goal(&mut self, what: impl Into<String>, met: bool, detail: impl Into<String>) {
        let goal = Goal { what: what.into(), met, detail: detail.into() };
        println!("  goal: {} — {} ({})", goal.what, if goal.met { "met" } else { "MISSED" }, goal.detail);
        self.goals.push(goal);
    }
}

/// Rotates `0..n` by `round`, so each system goes first in turn.
fn rotated(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|i| (i + round) % n).collect()
}

/// Runs the comparison.
pub async fn run(args: CompareArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args.quick);
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    std::fs::create_dir_all(&args.work_dir)?;
    let work = tempfile::tempdir_in(&args.work_dir).context("cannot create a work directory")?;
    let started = Instant::now();
    let mut report = Report::default();

    let fsync_rate = {
        let dir = work.path().to_owned();
        let seconds = plan.fsync_seconds;
        tokio::task::spawn_blocking(move || fsync::probe(&dir, Duration::from_secs_f64(seconds))).await??
    };
    report.section(&machine(&fsync_rate, args.quick));

    for scenario in &args.scenarios {
        match scenario {
            1 => writes_scenario(&plan, &bin, work.path(), fsync_rate.per_sec, &mut report).await?,
            2 => latency_scenario(&plan, &bin, work.path(), &mut report).await?,
            3 => idle_scenario(&plan, &bin, work.path(), &mut report).await?,
            4 => storm_scenario(&plan, &bin, work.path(), &mut report).await?,
            5 => commands_scenario(&plan, &bin, work.path(), &mut report).await?,
            6 => acks_scenario(&plan, &bin, work.path(), &mut report).await?,
            7 => batches_scenario(&plan, &bin, work.path(), args.postgres.as_deref(), &mut report).await?,
            8 => fleet_scenario(&plan, &bin, work.path(), args.postgres.as_deref(), &mut report).await?,
            other => anyhow::bail!("there is no scenario {other} (1–8)"),
        }
    }

    let mut goals = String::from("## Goals\n\n");
    if args.quick {
        goals.push_str(
            "Quick mode runs at a smaller scale than the goals are set for (memory per session, for one, \
             includes fixed costs spread over fewer sessions); judge the goals by the full run.\n\n",
        );
    }
    goals.push_str("| goal | result | measured |\n|---|---|---|\n");
    for g in &report.goals {
        let _ = writeln!(goals, "| {} | {} | {} |", g.what, if g.met { "met" } else { "**missed**" }, g.detail);
    }
    report.section(&goals);
    report.section(&format!("The whole run took {:.0} s.\n", started.elapsed().as_secs_f64()));

    if let Some(path) = &args.chart
        && !report.chart.is_empty()
    {
        let title = format!(
            "Write-to-device latency, {} devices at {} writes/s (all rounds merged)",
            plan.lat_devices, plan.lat_rate
        );
        std::fs::write(path, latency_svg(&title, &report.chart))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.out {
        let mut doc = String::from("# Benchmarks: DDP beside etcd, Redis and Mosquitto\n\n");
        doc.push_str(
            "Written by `bench/run` (`ddp-bench compare`); every number below comes from one run on \
             one machine, the systems alternating round by round. Ratios within the run are what to \
             read; absolute numbers depend on the machine.\n\n",
        );
        doc.push_str(
            "## Commands\n\n```sh\nbench/run            # this report: installs the baselines if missing, builds, runs every scenario\n\
             bench/run --quick    # the same in under 2 minutes, for a look (target/bench/benchmarks-quick.md)\n\
             bench/run --scenarios 2,4   # some scenarios only\n```\n\n\
             Each scenario starts its own servers (DDP on a fresh data directory, etcd, Redis, Mosquitto) on loopback \
             ports, with their data on the same file system as the fsync probe, and stops them when it ends.\n\n",
        );
        doc.push_str(
            "## Reading the results\n\n\
             - The baselines do less than DDP. Redis acknowledges a `SET` after its append-only file is fsynced, \
             but keeps no revision per store and no change history, and here notifies no one; Mosquitto keeps QoS 1 messages \
             in memory only (nothing is fsynced) and has no store to reload from; etcd is the closest peer \
             (revisioned, durable, watchable) but one key space for everything.\n\
             - Servers and load generators share the same cores: at 64 clients every system is CPU-bound, and the \
             load tool's own share of the CPU counts against the server it measures.\n\
             - DDP's write-to-device latency includes the fsync of the write: a stall of the disk shows up in its \
             p99 and max, never in Mosquitto's. The table gives the median over rounds of each round's p99; the \
             chart merges every round, so one bad round shows there.\n\n",
        );
        if let Some(chart) = &args.chart
            && !report.chart.is_empty()
        {
            let name = chart.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let _ = writeln!(doc, "![Write-to-device latency percentiles]({name})\n");
        }
        doc.push_str(&report.markdown);
        std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

fn machine(fsync_rate: &fsync::FsyncRate, quick: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut s = String::from("## Machine and versions\n\n");
    let _ = writeln!(s, "- {cpus} vCPUs ({cpu}), {mem_gib:.0} GiB RAM, {}", writes::kernel());
    let _ = writeln!(s, "- the disk's {fsync_rate} — the ceiling of one fsync per write");
    let _ = writeln!(s, "- DDP {} (embedded SQLite store), release build", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "- {}", version("etcd", &["--version"]));
    let _ = writeln!(s, "- {}", version("redis-server", &["--version"]));
    let _ = writeln!(s, "- {}", version("mosquitto", &["-h"]));
    let _ = writeln!(
        s,
        "- servers and load generators share the machine's cores (no pinning); every server listens on loopback"
    );
    if quick {
        let _ = writeln!(s, "- **quick mode**: short runs, fewer devices, one round — for a look, not for quoting");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// 1. Durable writes

async fn writes_scenario(
    plan: &Plan,
    bin: &Path,
    work: &Path,
    fsync_per_sec: f64,
    report: &mut Report,
) -> anyhow::Result<()> {
    eprintln!("scenario 1: durable writes…");
    let ddp = server::start(bin, &work.join("s1-ddp"), &[])?;
    let made = devices::create(&ddp.base, plan.write_devices, 0, 0).await?;
    let ids = std::sync::Arc::new(made.iter().map(|d| d.id).collect::<Vec<_>>());
    let etcd = Etcd::start(&work.join("s1-etcd"))?;
    let redis = Redis::start(&work.join("s1-redis"))?;
    let text = "x".repeat(plan.value_bytes.saturating_sub(2));
    let ddp_body = json!({ "value": text }).to_string();
    let raw_value = json!(text).to_string();
    let names = ["DDP (REST PUT)", "etcd (JSON gateway put)", "Redis (SET, appendfsync always)"];

    // results[system][clients index]
    let mut results: Vec<Vec<Vec<RunResult>>> = vec![vec![Vec::new(); plan.clients.len()]; names.len()];
    for round in 0..plan.repeat {
        for system in rotated(names.len(), round) {
            for ci in alternating(plan.clients.len(), round) {
                let c = plan.clients[ci];
                for (seconds, keep) in [(plan.warmup, false), (plan.write_seconds, true)] {
                    let d = Duration::from_secs_f64(seconds);
                    let r = match system {
                        0 => writes::load(&ddp.base, &ids, c, d, &ddp_body).await?,
                        1 => etcd.put_load(c, d, &raw_value).await?,
                        _ => redis.set_load(c, d, &raw_value).await?,
                    };
                    if keep {
                        eprintln!(
                            "  round {}: {:<32} {c:>3} clients {:>8.0}/s p99 {:.2} ms",
                            round + 1,
                            names[system],
                            r.per_sec,
                            r.p99_ms
                        );
                        results[system][ci].push(r);
                    }
                }
            }
        }
    }
    drop((ddp, etcd, redis));

    let mut s = format!(
        "## 1. Durable writes\n\n{} keys ({} devices × 10), {}-byte values, closed-loop clients, {} s per run, \
         median of {} run(s). Every system acknowledges only after an fsync. Serial fsync: {:.0}/s.\n\n\
         | clients | system | writes/s | p50 ms | p99 ms | errors | DDP ÷ system (writes/s) |\n|---:|---|---:|---:|---:|---:|---:|\n",
        plan.write_devices * 10,
        plan.write_devices,
        plan.value_bytes,
        plan.write_seconds,
        plan.repeat,
        fsync_per_sec
    );
    for (ci, c) in plan.clients.iter().enumerate() {
        let ddp = median(&results[0][ci]);
        for (system, name) in names.iter().enumerate() {
            let m = median(&results[system][ci]);
            let errors: u64 = results[system][ci].iter().map(|r| r.errors).sum();
            let ratio = if system == 0 {
                format!("{:.1}× fsync", m.per_sec / fsync_per_sec)
            } else {
                format!("{:.2}×", ddp.per_sec / m.per_sec)
            };
            let _ = writeln!(
                s,
                "| {c} | {name} | {:.0} | {:.2} | {:.2} | {errors} | {ratio} |",
                m.per_sec, m.p50_ms, m.p99_ms
            );
        }
    }
    report.section(&s);
    if let Some(ci) = plan.clients.iter().position(|&c| c == 64) {
        let (d, e, r) = (median(&results[0][ci]), median(&results[1][ci]), median(&results[2][ci]));
        report.goal(
            "1: at 64 clients, ≥ 3× etcd's writes/s",
            d.per_sec >= 3.0 * e.per_sec,
            format!("{:.2}× ({:.0} vs {:.0}/s)", d.per_sec / e.per_sec, d.per_sec, e.per_sec),
        );
        report.goal(
            "1: at 64 clients, ≥ 0.5× Redis-always writes/s",
            d.per_sec >= 0.5 * r.per_sec,
            format!("{:.2}× ({:.0} vs {:.0}/s)", d.per_sec / r.per_sec, d.per_sec, r.per_sec),
        );
        report.goal(
            "1: at 64 clients, p99 ≤ 2× Redis-always p99",
            d.p99_ms <= 2.0 * r.p99_ms,
            format!("{:.2} ms vs {:.2} ms ({:.1}×)", d.p99_ms, r.p99_ms, d.p99_ms / r.p99_ms),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Write-to-device latency

/// One latency run's numbers.
struct LatencyRun {
    result: LatencyResult,
}

impl LatencyRun {
    fn ms(&self, q: f64) -> f64 {
        self.result.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

async fn latency_scenario(plan: &Plan, bin: &Path, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("scenario 2: write-to-device latency…");
    let ddp = server::start(bin, &work.join("s2-ddp"), &[])?;
    let made = devices::create(&ddp.base, plan.lat_devices, 0, 0).await?;
    let etcd = Etcd::start(&work.join("s2-etcd"))?;
    let names = [
        "DDP over WebSocket (REST write → device)",
        "DDP over MQTT (REST write → device)",
        "etcd watch (JSON gateway put → watcher)",
        "Mosquitto QoS 1 (publish → subscriber, not durable)",
    ];
    let duration = Duration::from_secs_f64(plan.lat_seconds);
    let mut runs: Vec<Vec<LatencyRun>> = (0..names.len()).map(|_| Vec::new()).collect();
    for round in 0..plan.repeat {
        for system in rotated(names.len(), round) {
            let result = match system {
                0 => measure(&ddp.base, &ddp.base, &ddp.mqtt, &made, plan.lat_rate, duration, Transport::Ws).await?,
                1 => measure(&ddp.base, &ddp.base, &ddp.mqtt, &made, plan.lat_rate, duration, Transport::Mqtt).await?,
                2 => etcd.watch_latency(plan.lat_devices, plan.lat_rate, duration).await?,
                _ => mosquitto::measure(plan.lat_devices, plan.lat_rate, duration, rumqttc::QoS::AtLeastOnce).await?,
            };
            eprintln!(
                "  round {}: {:<52} p50 {:.2} ms p99 {:.2} ms lost {}",
                round + 1,
                names[system],
                result.hist.value_at_quantile(0.5) as f64 / 1000.0,
                result.hist.value_at_quantile(0.99) as f64 / 1000.0,
                result.acked.saturating_sub(result.delivered)
            );
            runs[system].push(LatencyRun { result });
        }
    }
    drop((ddp, etcd));

    let med = |v: &[LatencyRun], f: &dyn Fn(&LatencyRun) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let mut s = format!(
        "## 2. Write-to-device latency\n\n{} devices (one key each written), {} writes/s spread over them for {} s, \
         open loop; each write carries its issue time and each device reports when its change arrived. \
         Median of {} run(s) per system; lost and out-of-order are totals.\n\n\
         | system | writes acked | delivered | lost | out of order | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        plan.lat_devices, plan.lat_rate, plan.lat_seconds, plan.repeat
    );
    for (system, name) in names.iter().enumerate() {
        let v = &runs[system];
        let acked: u64 = v.iter().map(|r| r.result.acked).sum();
        let delivered: u64 = v.iter().map(|r| r.result.delivered).sum();
        let disorder: u64 = v.iter().map(|r| r.result.disorder).sum();
        let _ = writeln!(
            s,
            "| {name} | {acked} | {delivered} | {} | {disorder} | {:.2} | {:.2} | {:.2} |",
            acked.saturating_sub(delivered),
            med(v, &|r| r.ms(0.5)),
            med(v, &|r| r.ms(0.99)),
            med(v, &|r| r.result.hist.max() as f64 / 1000.0)
        );
        let mut merged = Histogram::<u64>::new(3)?;
        for r in v {
            merged.add(&r.result.hist)?;
        }
        report.chart.push(Series {
            name: name.split(" (").next().unwrap_or(name).to_owned(),
            ms: PERCENTILES
                .iter()
                .map(|p| if *p >= 100.0 { merged.max() } else { merged.value_at_percentile(*p) } as f64 / 1000.0)
                .collect(),
        });
    }
    report.section(&s);
    let mosquitto_p99 = med(&runs[3], &|r| r.ms(0.99));
    for (system, transport) in [(0, "WebSocket"), (1, "MQTT")] {
        let v = &runs[system];
        let p99 = med(v, &|r| r.ms(0.99));
        let lost: u64 = v.iter().map(|r| r.result.acked.saturating_sub(r.result.delivered)).sum();
        let disorder: u64 = v.iter().map(|r| r.result.disorder).sum();
        report.goal(format!("2: DDP over {transport}: p99 ≤ 5 ms"), p99 <= 5.0, format!("{p99:.2} ms"));
        report.goal(
            format!("2: DDP over {transport}: p99 ≤ 2× Mosquitto QoS 1 p99"),
            p99 <= 2.0 * mosquitto_p99,
            format!("{p99:.2} ms vs {mosquitto_p99:.2} ms ({:.1}×)", p99 / mosquitto_p99),
        );
        report.goal(
            format!("2: DDP over {transport}: no loss, no reordering"),
            lost == 0 && disorder == 0,
            format!("{lost} lost, {disorder} out of order"),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Idle sessions

async fn idle_scenario(plan: &Plan, bin: &Path, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("scenario 3: memory per idle session…");
    let data = work.join("s3-ddp");
    let made = {
        let ddp = server::start(bin, &data, &[])?;
        devices::create(&ddp.base, plan.idle_sessions, 10, 32).await?
    };
    let mut rows: Vec<(String, IdleResult)> = Vec::new();
    // A fresh server process for each transport, on the same data.
    for transport in [Transport::Ws, Transport::Mqtt, Transport::MqttWs] {
        let ddp = server::start(bin, &data, &[])?;
        let addr = match transport {
            Transport::Ws => ddp.base.trim_start_matches("http://").to_owned(),
            Transport::MqttWs => format!("ws://{}/mqtt", ddp.base.trim_start_matches("http://")),
            _ => ddp.mqtt.clone(),
        };
        let r = measure_idle(ddp.pid, &addr, &made, plan.processes, transport, work).await?;
        eprintln!("  DDP {}: {:.0} bytes per session", transport.label(), r.per_session());
        rows.push((format!("DDP {} session (reload of 10 keys)", transport.label()), r));
    }
    let broker = mosquitto::start()?;
    let r = measure_idle(broker.pid(), &broker.addr, &made, plan.processes, Transport::Broker, work).await?;
    eprintln!("  Mosquitto: {:.0} bytes per connection", r.per_session());
    rows.push(("Mosquitto connection (one subscription)".into(), r));
    drop(broker);

    let mut s = format!(
        "## 3. Memory per idle session\n\n{} sessions from {} client processes; the server process's resident \
         memory before and after, divided by the sessions (user space; the kernel's socket buffers are extra).\n\n\
         | system | sessions | opened in | RSS before | RSS after | per session |\n|---|---:|---:|---:|---:|---:|\n",
        plan.idle_sessions, plan.processes
    );
    for (name, r) in &rows {
        let _ = writeln!(s, "{}", r.table_row(name));
    }
    report.section(&s);
    let (ws, mqtt, mqtt_ws) = (rows[0].1.per_session(), rows[1].1.per_session(), rows[2].1.per_session());
    report.goal(
        "3: ≤ 8 KB per WebSocket session",
        ws <= 8000.0 && rows[0].1.sessions == plan.idle_sessions,
        format!("{ws:.0} bytes, {} sessions", rows[0].1.sessions),
    );
    report.goal(
        "3: ≤ 6 KB per MQTT session",
        mqtt <= 6000.0 && rows[1].1.sessions == plan.idle_sessions,
        format!("{mqtt:.0} bytes, {} sessions", rows[1].1.sessions),
    );
    report.goal(
        "3: ≤ 8 KB per MQTT-over-WebSocket session",
        mqtt_ws <= 8000.0 && rows[2].1.sessions == plan.idle_sessions,
        format!("{mqtt_ws:.0} bytes, {} sessions", rows[2].1.sessions),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Command delivery latency

async fn commands_scenario(plan: &Plan, bin: &Path, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    use crate::commands::{self, Via};
    eprintln!("scenario 5: command delivery latency…");
    let ddp = server::start(bin, &work.join("s5-ddp"), &[])?;
    let made = devices::create(&ddp.base, plan.lat_devices, 0, 0).await?;
    let names = [
        "DDP command over MQTT (REST PUT → device)",
        "DDP command over the command WebSocket (REST PUT → device)",
        "Mosquitto QoS 0 (publish → subscriber)",
    ];
    let duration = Duration::from_secs_f64(plan.lat_seconds);
    let mut runs: Vec<Vec<LatencyResult>> = (0..names.len()).map(|_| Vec::new()).collect();
    for round in 0..plan.repeat {
        for system in rotated(names.len(), round) {
            let r = match system {
                0 => commands::measure(&ddp.base, &ddp.mqtt, &made, plan.lat_rate, duration, Via::Mqtt).await?,
                1 => commands::measure(&ddp.base, &ddp.mqtt, &made, plan.lat_rate, duration, Via::Ws).await?,
                _ => mosquitto::measure(plan.lat_devices, plan.lat_rate, duration, rumqttc::QoS::AtMostOnce).await?,
            };
            eprintln!(
                "  round {}: {:<60} p50 {:.2} ms p99 {:.2} ms lost {}",
                round + 1,
                names[system],
                r.hist.value_at_quantile(0.5) as f64 / 1000.0,
                r.hist.value_at_quantile(0.99) as f64 / 1000.0,
                r.acked.saturating_sub(r.delivered)
            );
            runs[system].push(r);
        }
    }
    drop(ddp);
    let med = |v: &[LatencyResult], q: f64| {
        let mut xs: Vec<f64> = v.iter().map(|r| r.hist.value_at_quantile(q) as f64 / 1000.0).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let mut s = format!(
        "## 5. Command delivery latency\n\n{} connected devices, {} commands/s spread over them for {} s, open \
         loop; each command carries its issue time, each device reports when it arrived and checks the order. \
         Commands are not stored, so Mosquitto relaying QoS 0 is the floor. Median of {} run(s) per system; \
         lost and out-of-order are totals; merged percentiles over every round beside.\n\n\
         | system | sent | delivered | lost | out of order | p50 ms | p99 ms | merged p99 ms | merged max ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        plan.lat_devices, plan.lat_rate, plan.lat_seconds, plan.repeat
    );
    for (system, name) in names.iter().enumerate() {
        let v = &runs[system];
        let acked: u64 = v.iter().map(|r| r.acked).sum();
        let delivered: u64 = v.iter().map(|r| r.delivered).sum();
        let disorder: u64 = v.iter().map(|r| r.disorder).sum();
        let mut merged = Histogram::<u64>::new(3)?;
        for r in v {
            merged.add(&r.hist)?;
        }
        let _ = writeln!(
            s,
            "| {name} | {acked} | {delivered} | {} | {disorder} | {:.2} | {:.2} | {:.2} | {:.2} |",
            acked.saturating_sub(delivered),
            med(v, 0.5),
            med(v, 0.99),
            merged.value_at_quantile(0.99) as f64 / 1000.0,
            merged.max() as f64 / 1000.0
        );
    }
    report.section(&s);
    let mosquitto_p99 = med(&runs[2], 0.99);
    for (system, via) in [(0, "MQTT"), (1, "the command WebSocket")] {
        let p99 = med(&runs[system], 0.99);
        report.goal(
            format!("5: commands over {via}: p99 ≤ 2× Mosquitto QoS 0 p99"),
            p99 <= 2.0 * mosquitto_p99,
            format!("{p99:.2} ms vs {mosquitto_p99:.2} ms ({:.1}×)", p99 / mosquitto_p99),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Delivery and acknowledgement

async fn acks_scenario(plan: &Plan, bin: &Path, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    use crate::acks;
    eprintln!("scenario 6: delivery and acknowledgement…");
    let ddp = server::start(bin, &work.join("s6-ddp"), &[])?;
    let made = devices::create(&ddp.base, plan.lat_devices, 0, 0).await?;
    let duration = Duration::from_secs_f64(plan.lat_seconds);
    let mut waits = Vec::new();
    let sdk = acks::connect_sdk(&ddp.base, &made, true).await?;
    for round in 0..plan.repeat {
        let r = acks::measure_waits(&ddp.base, &made, plan.lat_rate, duration).await?;
        let ((ap50, ap99), (dp50, dp99)) = (r.applied_ms(), r.delivered_ms());
        eprintln!(
            "  round {}: write → delivered p50 {dp50:.2} ms p99 {dp99:.2} ms; write → applied p50 {ap50:.2} ms \
             p99 {ap99:.2} ms; unconfirmed {}",
            round + 1,
            r.unconfirmed
        );
        waits.push(r);
    }
    acks::close_sdk(sdk).await;
    let (without, with) =
        acks::throughput_pair(&ddp.base, ddp.pid, &made, 64, Duration::from_secs_f64(plan.write_seconds), plan.repeat)
            .await?;
    drop(ddp);

    let med = |xs: Vec<f64>| {
        let mut xs = xs;
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let unconfirmed: u64 = waits.iter().map(|r| r.unconfirmed).sum();
    let sent =
        |applied: bool| -> u64 { waits.iter().map(|r| if applied { r.applied_sent } else { r.delivered_sent }).sum() };
    let (ap50, ap99) =
        (med(waits.iter().map(|r| r.applied_ms().0).collect()), med(waits.iter().map(|r| r.applied_ms().1).collect()));
    let (dp50, dp99) = (
        med(waits.iter().map(|r| r.delivered_ms().0).collect()),
        med(waits.iter().map(|r| r.delivered_ms().1).collect()),
    );
    let (a, b) = (median(&without), median(&with));
    let ratio = b.per_sec / a.per_sec;
    let mut s = format!(
        "## 6. Delivery and acknowledgement\n\n{} devices running the Rust SDK over WebSocket, which acknowledges \
         each change once applied (coalesced: at most four acks a second per device). Apps write {} times a \
         second for {} s, open loop, alternately with `?wait=applied` and `?wait=delivered`: each answer comes \
         when the device acknowledged the change (or its session sent it), so its response time from the \
         write's issue is the latency. Median of {} run(s).\n\n\
         | measure | writes | p50 ms | p99 ms |\n|---|---:|---:|---:|\n\
         | write → delivered | {} | {dp50:.2} | {dp99:.2} |\n\
         | write → applied | {} | {ap50:.2} | {ap99:.2} |\n\n\
         Writes the wait could not confirm within 10 s: {unconfirmed}.\n\n\
         Durable writes/s from 64 closed-loop writers to the same devices' stores while all are connected, \
         the SDK acknowledging or not, alternating (median of {} each):\n\n\
         | devices | durable PUT/s | p99 ms |\n|---|---:|---:|\n\
         | not acknowledging | {:.0} | {:.2} |\n| acknowledging | {:.0} | {:.2} |\n\n\
         With acks / without: **{ratio:.2}×**.\n",
        plan.lat_devices,
        plan.lat_rate,
        plan.lat_seconds,
        plan.repeat,
        sent(false),
        sent(true),
        plan.repeat,
        a.per_sec,
        a.p99_ms,
        b.per_sec,
        b.p99_ms,
    );
    s.push('\n');
    report.section(&s);
    report.goal(
        format!("6: durable writes with {} acking devices ≥ 0.9× without acks", plan.lat_devices),
        ratio >= 0.9,
        format!("{:.0} vs {:.0} writes/s ({ratio:.2}×)", b.per_sec, a.per_sec),
    );
    report.goal(
        "6: every write waiting for its device confirmed",
        unconfirmed == 0,
        format!("{unconfirmed} unconfirmed of {}", sent(true) + sent(false)),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Atomic batches

async fn batches_scenario(
    plan: &Plan,
    bin: &Path,
    work: &Path,
    postgres: Option<&str>,
    report: &mut Report,
) -> anyhow::Result<()> {
    use crate::batches;
    eprintln!("scenario 7: atomic batches…");
    let (sizes, clients) = ([1, 10, 100], [16, 64]);
    let value_bytes = 64;
    let (targets, processes) = batches::start_targets(bin, work, postgres, plan.write_devices).await?;
    let results = batches::matrix(
        &targets,
        &sizes,
        &clients,
        Duration::from_secs_f64(plan.warmup),
        Duration::from_secs_f64(plan.write_seconds.min(3.0)),
        plan.repeat,
        &batches::value_of(value_bytes),
    )
    .await?;
    drop(processes);
    let mut s = format!(
        "## 7. Atomic batches\n\n`PATCH /devices/{{id}}/kv` with 1, 10 or 100 `set` ops of {value_bytes}-byte values, \
         spread over {} devices; closed-loop writers, {} s per run, median of {} run(s). A batch is one durable \
         transaction: every op or none, consecutive revs. Key writes/s = batches/s × ops per batch. The load \
         generator runs on the same cores as the server.{}\n\n",
        plan.write_devices,
        plan.write_seconds.min(3.0),
        plan.repeat,
        if postgres.is_none() {
            " PostgreSQL was not given (`--postgres`), so only the embedded store ran."
        } else {
            ""
        }
    );
    s.push_str(&batches::table(&targets, &sizes, &clients, &results));
    let best = |t: usize, size: usize| batches::best_key_writes(&results, t, &sizes, size).unwrap_or(0.0);
    if targets.len() == 2 {
        s.push_str("\n| ops per batch | PostgreSQL ÷ SQLite key writes/s (best of the writer counts) |\n|---:|---:|\n");
        for size in sizes {
            let _ = writeln!(s, "| {size} | {:.2}× |", best(1, size) / best(0, size).max(1.0));
        }
    }
    let _ = writeln!(
        s,
        "\nBatches of 100 ÷ single writes on the embedded store: **{:.1}×** the key writes/s.",
        best(0, 100) / best(0, 1).max(1.0)
    );
    report.section(&s);
    report.goal(
        "7: ≥ 100,000 key writes/s with batches of 100 on the embedded store",
        best(0, 100) >= 100_000.0,
        format!("{:.0} key writes/s", best(0, 100)),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. Fleet queries and jobs

async fn fleet_scenario(
    plan: &Plan,
    bin: &Path,
    work: &Path,
    postgres: Option<&str>,
    report: &mut Report,
) -> anyhow::Result<()> {
    use crate::rollout;
    eprintln!("scenario 8: fleet queries and jobs…");
    let fleet = &plan.fleet;
    let results = rollout::measure(bin, work, postgres, true, fleet).await?;
    let mut s = format!(
        "## 8. Fleet queries and jobs\n\n{} devices × 10 keys (`fw` of five versions, a unique `serial`, `k0…k7` \
         numbers in 0..1000), set up {} requests at a time (create, then one 10-op batch), each server started \
         with `--index-keys {}`; measurements alternate between the backends. Each `GET /devices?where=…` query is \
         asked {} times in a row after 10 not counted (p50/p99 of the whole request, a page of up to 100 device \
         objects). A job over every device (`\"select\": {{\"all\": true}}`) writes one `set`, without a rate: \
         devices/s = selected ÷ (`endTime` − `creationTime`), median of {} job(s). Then, {} round(s): {} closed-loop \
         writers of single keys on {} devices outside the fleet, without a job and again while a job over the fleet \
         runs (each load at most {} s and inside the job's time); the ratio is their latency with the job ÷ without, \
         median over the rounds.{}\n\n",
        fleet.devices,
        rollout::IN_FLIGHT,
        rollout::INDEX_KEYS,
        fleet.queries,
        fleet.rounds,
        fleet.rounds,
        fleet.load_clients,
        rollout::LOAD_DEVICES,
        fleet.load_seconds,
        if postgres.is_none() {
            " PostgreSQL was not given (`--postgres`), so only the embedded store ran."
        } else {
            ""
        }
    );
    s.push_str(&rollout::tables(&results));
    report.section(&s);
    for (what, met, detail) in rollout::goals(&results) {
        report.goal(what, met, detail);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Reconnect storm

async fn storm_scenario(plan: &Plan, bin: &Path, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("scenario 4: reconnect storm…");
    let ddp = server::start(bin, &work.join("s4-ddp"), &[])?;
    let made = devices::create(&ddp.base, plan.storm_devices, plan.storm_keys, 64).await?;
    let broker = mosquitto::start()?;
    retain(&broker.addr, &made, plan.storm_keys).await?;
    let names = [
        "DDP over WebSocket (reload)".to_owned(),
        "DDP over MQTT (reload)".to_owned(),
        format!("Mosquitto ({} retained messages per device)", plan.storm_keys),
    ];
    let mut runs: Vec<Vec<StormRun>> = (0..names.len()).map(|_| Vec::new()).collect();
    for round in 0..plan.repeat {
        for system in rotated(names.len(), round) {
            let (addr, transport) = match system {
                0 => (ddp.base.trim_start_matches("http://").to_owned(), Transport::Ws),
                1 => (ddp.mqtt.clone(), Transport::Mqtt),
                _ => (broker.addr.clone(), Transport::Broker),
            };
            let mut storm = Storm::connect(&addr, &made, plan.processes, transport, plan.storm_keys, work).await?;
            anyhow::ensure!(storm.devices == made.len(), "only {} of {} devices connected", storm.devices, made.len());
            let server_pid = if system == 2 { broker.pid() } else { ddp.pid };
            let before = (listen_overflows(), cpu_seconds(server_pid), storm.cpu_seconds());
            let r = storm.run().await?;
            let run = StormRun {
                overflows: listen_overflows().saturating_sub(before.0),
                server_cpu: cpu_seconds(server_pid) - before.1,
                client_cpu: storm.cpu_seconds() - before.2,
                report: r,
            };
            let r = &run.report;
            eprintln!(
                "  round {}: {:<44} all {} in {:.0} ms ({:.0}/s), failed {}, listen overflows {}, CPU s server {:.2} \
                 clients {:.2}",
                round + 1,
                names[system],
                r.done,
                r.max_ms,
                r.done as f64 / (r.max_ms / 1000.0).max(1e-3),
                r.failed,
                run.overflows,
                run.server_cpu,
                run.client_cpu
            );
            if let Some(e) = &r.error {
                eprintln!("    first failure: {e}");
            }
            runs[system].push(run);
            drop(storm);
            // Let the server see the disconnects before the next system's turn.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    drop((ddp, broker));

    let mut s = format!(
        "## 4. Reconnect storm\n\n{} devices with {} keys each hold sessions from {} client processes; at once, every \
         connection is dropped and reopened. Measured: the time from that moment until every device has its full \
         reload again (median of {} storm(s)), connections that failed, the kernel's listen-queue overflows (a machine-wide counter), and \
         the CPU time the server and the client processes used during the storm (the machine has {} core-seconds \
         per second).\n\n\
         | system | devices | all reloaded in | reloads/s | p50 ms | p99 ms | failed | listen overflows | server CPU | clients CPU |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        plan.storm_devices,
        plan.storm_keys,
        plan.processes,
        plan.repeat,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rates = Vec::new();
    for (system, name) in names.iter().enumerate() {
        let mut v = runs[system].clone();
        v.sort_by(|a, b| a.report.max_ms.total_cmp(&b.report.max_ms));
        let median = &v[v.len() / 2];
        let m = &median.report;
        let failed: usize = v.iter().map(|r| r.report.failed).sum();
        let overflows: u64 = v.iter().map(|r| r.overflows).sum();
        let rate = m.done as f64 / (m.max_ms / 1000.0).max(1e-3);
        rates.push((rate, failed, overflows, m.done));
        let _ = writeln!(
            s,
            "| {name} | {} | {:.0} ms | {rate:.0} | {:.0} | {:.0} | {failed} | {overflows} | {:.1} s | {:.1} s |",
            m.done, m.max_ms, m.p50_ms, m.p99_ms, median.server_cpu, median.client_cpu
        );
    }
    report.section(&s);
    for (system, transport) in [(0, "WebSocket"), (1, "MQTT")] {
        let (rate, failed, overflows, done) = rates[system];
        report.goal(
            format!("4: DDP over {transport}: ≥ 5,000 reloads/s"),
            rate >= 5000.0 && done == plan.storm_devices,
            format!("{rate:.0}/s, {done} of {} devices", plan.storm_devices),
        );
        report.goal(
            format!("4: DDP over {transport}: no refused connections"),
            failed == 0 && overflows == 0,
            format!("{failed} failed, {overflows} listen overflows"),
        );
    }
    Ok(())
}

/// One storm of one system.
#[derive(Clone)]
struct StormRun {
    report: StormReport,
    overflows: u64,
    /// CPU seconds the server used during the storm.
    server_cpu: f64,
    /// CPU seconds the client processes used.
    client_cpu: f64,
}

/// Publishes `keys` retained messages for each device's topic on the broker.
async fn retain(addr: &str, devices: &[Device], keys: usize) -> anyhow::Result<()> {
    let (host, port) = addr.rsplit_once(':').context("broker address")?;
    let mut options = rumqttc::MqttOptions::new("retainer", host, port.parse::<u16>()?);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(1000);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
    let total = devices.len() * keys;
    let acks = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < total {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("retaining: {e}")),
            }
        }
        Ok(())
    });
    let value = "v".repeat(62);
    for d in devices {
        for k in 0..keys {
            client
                .publish(format!("bench/{}/k{k}", d.id), rumqttc::QoS::AtLeastOnce, true, format!("\"{value}\""))
                .await?;
        }
    }
    tokio::time::timeout(Duration::from_secs(120), acks).await.context("retained messages not acknowledged")???;
    Ok(())
}
