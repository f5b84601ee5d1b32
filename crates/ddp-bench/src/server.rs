//! Starting the real `ddp serve` as a separate process for a benchmark.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The admin key of servers the benchmark starts.
pub const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";

/// A `ddp serve` process, killed when dropped.
pub struct DdpProcess {
    child: Child,
    /// `http://127.0.0.1:port`
    pub base: String,
    /// The process id (for reading its memory use).
    pub pid: u32,
}

impl Drop for DdpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `ddp` binary next to this one (both built by `cargo build --release`).
pub fn default_ddp_bin() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("ddp"))).unwrap_or_else(|| PathBuf::from("ddp"))
}

/// Starts `ddp serve` on a free loopback port with its data in `data_dir`, plus `extra` flags.
pub fn start(bin: &Path, data_dir: &Path, extra: &[&str]) -> anyhow::Result<DdpProcess> {
    let mut child = Command::new(bin)
        .args(["serve", "--http-listen", "127.0.0.1:0", "--admin-key", ADMIN_KEY, "--log-format", "json"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {} (build it with `cargo build --release -p ddp`)", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(line) = lines.next() else { bail!("ddp serve exited before listening") };
        let line = line?;
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if entry["message"] == "listening" && entry["transport"] == "http" {
            break entry["addr"].as_str().context("listening line without addr")?.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();
    Ok(DdpProcess { child, base: format!("http://{addr}"), pid })
}
