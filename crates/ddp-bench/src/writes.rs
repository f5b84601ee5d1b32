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

    let mut backends = vec![("SQLite (embedded)", server::start(&bin, &work.path().join("data"), &[])?)];
    if let Some(url) = &args.postgres {
        let db = ddp_testkit::create_database(url, "ddp_bench").await.map_err(anyhow::Error::msg)?;
        backends.push(("PostgreSQL", server::start(&bin, &work.path().join("pg"), &["--database", &db])?));
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

/// The kernel, for reports.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown kernel".into(), |k| format!("Linux {}", k.trim()))
}

/// Builds the bytes of the `n`-th request of a closed-loop client.
pub type MakeRequest = Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>;

/// `clients` connections writing to DDP in a closed loop for `duration`: `PUT` of `body` to
/// key `k0..k9` of the devices in turn.
pub async fn load(
    base: &str,
    devices: &Arc<Vec<u64>>,
    clients: usize,
    duration: Duration,
    body: &str,
) -> anyhow::Result<RunResult> {
    if devices.is_empty() {
        bail!("no devices to write to");
    }
    let addr = base.trim_start_matches("http://").to_owned();
    let (devices, body) = (devices.clone(), body.to_owned());
    let host = addr.clone();
    let request: MakeRequest = Arc::new(move |i| {
        let device = devices[i % devices.len()];
        format!(
            "PUT /devices/{device}/kv/k{} HTTP/1.1\r\nHost: {host}\r\nAuthorization: ModeCloud {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            i % 10,
            server::ADMIN_KEY,
            body.len()
        )
        .into_bytes()
    });
    http_load(&addr, clients, duration, request).await
}

/// `clients` HTTP/1.1 keep-alive connections to `addr`, each sending `request(n)` and reading
/// its answer, in a closed loop for `duration`. A 2xx answer counts, anything else is an error.
///
/// The client is a minimal HTTP/1.1 writer and reader over a TCP stream, so that on a machine
/// whose cores the servers share, the load generator costs as little as the Redis one does.
pub async fn http_load(
    addr: &str,
    clients: usize,
    duration: Duration,
    request: MakeRequest,
) -> anyhow::Result<RunResult> {
    let addr = addr.to_owned();
    closed_loop(clients, duration, request, move || {
        let addr = addr.clone();
        async move { RawHttp::connect(&addr).await }
    })
    .await
}

/// One connection of a closed-loop load: sends a request, waits for its answer.
pub trait Exchange: Send + 'static {
    /// Sends `request`, reads the answer; `Ok(true)` when it was a success.
    fn exchange_ok(&mut self, request: &[u8]) -> impl std::future::Future<Output = anyhow::Result<bool>> + Send;
}

impl Exchange for RawHttp {
    async fn exchange_ok(&mut self, request: &[u8]) -> anyhow::Result<bool> {
        Ok((200..300).contains(&self.exchange(request).await?))
    }
}

/// `clients` connections made by `connect`, each sending `request(n)` and waiting for the
/// answer before the next, for `duration`. Latency is recorded for successes only.
pub async fn closed_loop<C, F, Fut>(
    clients: usize,
    duration: Duration,
    request: MakeRequest,
    connect: F,
) -> anyhow::Result<RunResult>
where
    C: Exchange,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<C>> + Send + 'static,
{
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (request, connecting) = (request.clone(), connect());
            tokio::spawn(async move {
                let mut conn = connecting.await?;
                let mut hist = Histogram::<u64>::new(3)?;
                let mut errors = 0u64;
                let mut i = c * 7919;
                while Instant::now() < deadline {
                    i += 1;
                    let bytes = request(i);
                    let t = Instant::now();
                    if conn.exchange_ok(&bytes).await? {
                        hist.record(t.elapsed().as_micros() as u64)?;
                    } else {
                        errors += 1;
                    }
                }
                anyhow::Ok((hist, errors))
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3)?;
    let mut errors = 0u64;
    for t in tasks {
        let (h, e) = t.await??;
        hist.add(h)?;
        errors += e;
    }
    Ok(RunResult::from_histogram(&hist, started.elapsed().as_secs_f64(), errors))
}

/// One keep-alive HTTP/1.1 connection: writes a request, reads one response (Content-Length or
/// chunked), returns its status.
pub struct RawHttp {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawHttp {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str) -> anyhow::Result<RawHttp> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawHttp { stream, buf: Vec::with_capacity(4096) })
    }

    /// Sends `request` and reads the whole response; returns its status code.
    pub async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head is not UTF-8")?;
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status code")?;
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
            })
        };
        if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            let mut at = head_end;
            loop {
                let line_end = loop {
                    if let Some(p) = find(&self.buf[at..], b"\r\n") {
                        break at + p;
                    }
                    self.fill().await?;
                };
                let size_text =
                    std::str::from_utf8(&self.buf[at..line_end])?.split(';').next().unwrap_or("").trim().to_owned();
                let size = usize::from_str_radix(&size_text, 16).context("bad chunk size")?;
                let end = line_end + 2 + size + 2;
                while self.buf.len() < end {
                    self.fill().await?;
                }
                at = end;
                if size == 0 {
                    break;
                }
            }
        } else {
            let length: usize = header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
            while self.buf.len() < head_end + length {
                self.fill().await?;
            }
        }
        Ok(status)
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
