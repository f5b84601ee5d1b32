//! The systems DDP is compared with, run from their Debian packages on loopback ports: etcd 3.4
//! (durable revisioned KV with watch; writes through its JSON gateway) and Redis with
//! `appendfsync always` (every write fsynced before the reply). Each runs in its own data
//! directory and is killed when its guard is dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::RunResult;
use crate::sync::{LatencyResult, WriteRequest, timed_writes};
use crate::writes::{Exchange, MakeRequest, closed_loop, http_load};

/// A child process, killed and reaped when dropped.
pub struct Guard {
    child: Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(addr: &str, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on {addr} within 20 s")
}

/// The first line `cmd args` prints, for reports.
pub fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

/// A single-member etcd.
pub struct Etcd {
    /// `http://127.0.0.1:port` of its client listener (gRPC and the JSON gateway).
    pub base: String,
    _guard: Guard,
}

impl Etcd {
    /// Starts `etcd` with its data in `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Etcd> {
        let (client, peer) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir)
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--quota-backend-bytes", "8589934592"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start etcd (Debian package etcd-server)")?;
        wait_listening(&format!("127.0.0.1:{client}"), "etcd", &mut child)?;
        let etcd = Etcd { base: client_url, _guard: Guard { child } };
        // The gateway answers once the member has elected itself.
        let started = Instant::now();
        loop {
            let ok = std::process::Command::new("etcdctl")
                .args(["--endpoints", &etcd.base, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(etcd);
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("etcd did not become healthy within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A closed-loop `PUT` load through the JSON gateway (`POST /v3/kv/put`), on 10,000 keys.
    pub async fn put_load(&self, clients: usize, duration: Duration, value: &str) -> anyhow::Result<RunResult> {
        let addr = self.base.trim_start_matches("http://").to_owned();
        let (host, value) = (addr.clone(), B64.encode(value));
        let request: MakeRequest = Arc::new(move |i| {
            let key = B64.encode(format!("dev/{}/k{}", i % 1000, i % 10));
            let body = format!(r#"{{"key":"{key}","value":"{value}"}}"#);
            format!(
                "POST /v3/kv/put HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        });
        http_load(&addr, clients, duration, request).await
    }
}

impl Etcd {
    /// Write-to-watcher latency: `watchers` streaming watches through the JSON gateway
    /// (`POST /v3/watch`), one key each, while puts (`POST /v3/kv/put`) arrive at `rate` spread
    /// over the keys, each carrying its issue time.
    pub async fn watch_latency(&self, watchers: usize, rate: u64, duration: Duration) -> anyhow::Result<LatencyResult> {
        let epoch = Instant::now();
        let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, bool)>();
        let client = reqwest::Client::builder().pool_max_idle_per_host(watchers + 256).build()?;
        let mut tasks = Vec::with_capacity(watchers);
        for chunk in (0..watchers).collect::<Vec<_>>().chunks(100) {
            let mut ready = Vec::new();
            for &w in chunk {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let (client, base, report) = (client.clone(), self.base.clone(), report_tx.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = watch(&client, &base, w, report, epoch, tx).await {
                        eprintln!("  etcd watcher {w}: {e}");
                    }
                }));
                ready.push(rx);
            }
            for r in ready {
                tokio::time::timeout(Duration::from_secs(30), r).await.context("etcd watch not created")???;
            }
        }
        drop(report_tx);
        let base = self.base.clone();
        let request: WriteRequest = Arc::new(move |client, i, payload| {
            let key = B64.encode(format!("w/{}", (i as usize * 7919) % watchers));
            client
                .post(format!("{base}/v3/kv/put"))
                .header("Content-Type", "application/json")
                .body(format!(r#"{{"key":"{key}","value":"{}"}}"#, B64.encode(payload)))
        });
        let result = timed_writes(request, rate, duration, epoch, report_rx).await;
        for t in tasks {
            t.abort();
        }
        result
    }
}

/// One streaming watch on key `w/{w}`: says when it is created, then reports each event's latency
/// (from the issue time in its value) and whether its revision is above the previous one.
async fn watch(
    client: &reqwest::Client,
    base: &str,
    w: usize,
    report: tokio::sync::mpsc::UnboundedSender<(u64, u64, bool)>,
    epoch: Instant,
    created: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let body = format!(r#"{{"create_request":{{"key":"{}"}}}}"#, B64.encode(format!("w/{w}")));
    let mut resp = client.post(format!("{base}/v3/watch")).body(body).send().await?;
    let mut created = Some(created);
    let mut buf: Vec<u8> = Vec::new();
    let mut last_rev = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        buf.extend_from_slice(&chunk);
        let mut consumed = 0;
        let mut messages = serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
        while let Some(Ok(message)) = messages.next() {
            consumed = messages.byte_offset();
            let result = &message["result"];
            if result["created"] == true
                && let Some(c) = created.take()
            {
                let _ = c.send(Ok(()));
            }
            for event in result["events"].as_array().into_iter().flatten() {
                let now = epoch.elapsed().as_micros() as u64;
                let rev: u64 = event["kv"]["mod_revision"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0);
                let value = event["kv"]["value"].as_str().and_then(|v| B64.decode(v).ok()).unwrap_or_default();
                if let Some(sent) =
                    serde_json::from_slice::<serde_json::Value>(&value).ok().and_then(|v| v["t"].as_u64())
                {
                    let _ = report.send((now.saturating_sub(sent), rev, rev > last_rev));
                }
                last_rev = last_rev.max(rev);
            }
        }
        buf.drain(..consumed);
    }
    Ok(())
}

/// A Redis server with `appendonly yes`, `appendfsync always`.
pub struct Redis {
    /// `127.0.0.1:port`.
    pub addr: String,
    _guard: Guard,
}

impl Redis {
    /// Starts `redis-server` with its append-only file in `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"])
            .args(["--logfile", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (Debian package redis-server)")?;
        let addr = format!("127.0.0.1:{port}");
        wait_listening(&addr, "redis-server", &mut child)?;
        Ok(Redis { addr, _guard: Guard { child } })
    }

    /// `clients` connections each sending `SET` and waiting for `+OK`, in a closed loop, on
    /// 10,000 keys.
    pub async fn set_load(&self, clients: usize, duration: Duration, value: &str) -> anyhow::Result<RunResult> {
        let value = value.to_owned();
        let request: MakeRequest = Arc::new(move |i| {
            let key = format!("dev/{}/k{}", i % 1000, i % 10);
            format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n", key.len(), value.len()).into_bytes()
        });
        let addr = self.addr.clone();
        closed_loop(clients, duration, request, move || {
            let addr = addr.clone();
            async move {
                let stream = tokio::net::TcpStream::connect(&addr).await?;
                stream.set_nodelay(true)?;
                Ok(RedisConn { stream, reply: Vec::with_capacity(64) })
            }
        })
        .await
    }
}

/// One Redis connection of the write load.
struct RedisConn {
    stream: tokio::net::TcpStream,
    reply: Vec<u8>,
}

impl Exchange for RedisConn {
    /// Sends one command, reads its one-line reply; `+OK` is a success.
    async fn exchange_ok(&mut self, command: &[u8]) -> anyhow::Result<bool> {
        self.stream.write_all(command).await?;
        self.reply.clear();
        let mut chunk = [0u8; 64];
        while !self.reply.ends_with(b"\r\n") {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("redis closed the connection");
            }
            self.reply.extend_from_slice(&chunk[..n]);
        }
        Ok(self.reply.starts_with(b"+OK"))
    }
}
