//! Starting the real `ddp serve` as a separate process for a benchmark.

use std::path::{Path, PathBuf};

pub use ddp_testkit::DdpProcess;

/// The admin key of servers the benchmark starts.
pub const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef";

/// The `ddp` binary next to this one (both built by `cargo build --release`).
pub fn default_ddp_bin() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("ddp"))).unwrap_or_else(|| PathBuf::from("ddp"))
}

/// The server's log under a benchmark: warnings only, plus the `listening` lines that
/// [`DdpProcess`] waits for (logging every request would cost the server CPU it is measured on).
const LOG: [&str; 2] = ["--log", "warn,ddp_server::server=info"];

/// Starts `ddp serve` on free loopback ports with its data in `data_dir`, quiet logging, plus
/// `extra` flags.
pub fn start(bin: &Path, data_dir: &Path, extra: &[&str]) -> anyhow::Result<DdpProcess> {
    let flags = [&LOG[..], extra].concat();
    DdpProcess::start(bin, data_dir, ADMIN_KEY, &flags)
        .map_err(|e| anyhow::anyhow!("{e} (build it with `cargo build --release -p ddp`)"))
}
