//! The disk's serial fsync rate: the ceiling of one-write-per-commit durability, and the baseline
//! that group commit is measured against.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Where and how long to probe.
#[derive(clap::Args)]
pub struct FsyncArgs {
    /// Directory on the file system to measure.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Seconds to run.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
}

/// The result of a probe.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FsyncRate {
    /// Appends + fdatasync per second, one after another.
    pub per_sec: f64,
    /// Median latency of one fdatasync, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

impl fmt::Display for FsyncRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "serial fsync: {:.0}/s (p50 {:.2} ms, p99 {:.2} ms)", self.per_sec, self.p50_ms, self.p99_ms)
    }
}

/// Appends 256-byte records to a temporary file in `dir`, calling fdatasync after each, for
/// `duration`.
pub fn probe(dir: &Path, duration: Duration) -> anyhow::Result<FsyncRate> {
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    let record = [b'x'; 256];
    let mut hist = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        let t = Instant::now();
        file.write_all(&record)?;
        file.as_file().sync_data()?;
        hist.record(t.elapsed().as_micros() as u64)?;
        n += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(FsyncRate {
        per_sec: n as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}
