//! Results and the markdown tables the benchmarks print.

use hdrhistogram::Histogram;

/// The settings every write benchmark shares.
#[derive(clap::Args)]
pub struct WriteLoad {
    /// Directory under which the data and the fsync probe file go (same file system).
    #[arg(long, default_value = ".")]
    pub work_dir: std::path::PathBuf,
    /// Concurrent writers, comma-separated; each writes in a closed loop (over HTTP: one
    /// keep-alive connection each).
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// Seconds of measurement per run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Runs per writer count; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Devices written to (writes spread over them, 10 keys each).
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Size of each value's JSON text in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
pub struct RunResult {
    /// Successful operations per second.
    pub per_sec: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Failed operations.
    pub errors: u64,
}

impl RunResult {
    /// A result from a histogram of microsecond latencies over `secs` seconds.
    pub fn from_histogram(hist: &Histogram<u64>, secs: f64, errors: u64) -> RunResult {
        RunResult {
            per_sec: hist.len() as f64 / secs,
            p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
            errors,
        }
    }
}

/// Indexes `0..n` forwards on even rounds and backwards on odd ones, so slow drift (page cache,
/// WAL size) does not favour one configuration.
pub fn alternating(n: usize, round: usize) -> Vec<usize> {
    if round.is_multiple_of(2) { (0..n).collect() } else { (0..n).rev().collect() }
}

/// The run with the median `per_sec`.
pub fn median(runs: &[RunResult]) -> RunResult {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    sorted[sorted.len() / 2]
}

/// Prints one row per concurrency level: median throughput, latency, errors, ratio to fsync.
pub fn print_table(who: &str, what: &str, levels: &[usize], results: &[Vec<RunResult>], fsync_per_sec: f64) {
    let repeat = results.first().map_or(0, Vec::len);
    println!("| {who} | {what} (median of {repeat}) | p50 ms | p99 ms | errors | × serial fsync |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (level, runs) in levels.iter().zip(results) {
        if runs.is_empty() {
            continue;
        }
        let m = median(runs);
        println!(
            "| {level} | {:.0} | {:.2} | {:.2} | {} | {:.1}× |",
            m.per_sec,
            m.p50_ms,
            m.p99_ms,
            runs.iter().map(|r| r.errors).sum::<u64>(),
            m.per_sec / fsync_per_sec
        );
    }
}
