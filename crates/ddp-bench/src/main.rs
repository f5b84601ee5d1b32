//! `ddp-bench`: load generator for the Device Data Proxy.
//!
//! `ddp-bench writes` measures durable REST writes: it starts the real `ddp serve` (release build)
//! as a separate process on a fresh data directory, measures the disk's serial fsync rate in the
//! same run and on the same file system, then drives `PUT /devices/{id}/kv/{key}` with 1 and 64
//! concurrent clients, several times each, and prints medians and ratios.
//!
//! With `--postgres URL`, `writes` also runs a server on a fresh PostgreSQL database, alternating
//! with the embedded one, and `latency` also measures two nodes on PostgreSQL (devices on one,
//! writes through the other).
//!
//! `ddp-bench store` measures the storage engine alone, in process, to show what group commit
//! does without HTTP in the way.
//!
//! Run it with `cargo build --release -p ddp -p ddp-bench && target/release/ddp-bench writes`.

mod acks;
mod baselines;
mod batches;
mod chart;
mod commands;
mod devices;
mod fsync;
mod mosquitto;
mod report;
mod rollout;
mod server;
mod store;
mod storm;
mod suite;
mod sync;
mod writes;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ddp-bench", version, about = "Benchmarks for the Device Data Proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// DDP side by side with etcd, Redis and Mosquitto: durable writes, write-to-device latency,
    /// idle memory and a reconnect storm, with medians, ratios and the goals judged.
    Compare(suite::CompareArgs),
    /// Durable REST writes per second at several client counts, beside the serial fsync rate.
    Writes(writes::WritesArgs),
    /// Durable writes/s of the storage engine alone, in process (no HTTP), beside the serial
    /// fsync rate.
    Store(store::StoreArgs),
    /// Only the disk's serial fsync rate (append 256 bytes, fdatasync, repeat).
    Fsync(fsync::FsyncArgs),
    /// Memory per idle sync session, with thousands of sessions from several client processes.
    Idle(sync::IdleArgs),
    /// A client process of `idle` (started by it).
    #[command(hide = true)]
    IdleClient(sync::IdleClientArgs),
    /// Write-to-device latency with many connected devices under a steady write rate.
    Latency(sync::LatencyArgs),
    /// Command delivery latency with many connected devices under a steady command rate.
    Commands(commands::CommandsArgs),
    /// Write → applied and write → delivered latency with SDK devices that acknowledge, and
    /// what acknowledgements cost durable writes.
    Acks(acks::AcksArgs),
    /// Durable key writes per second through atomic batches of 1, 10 and 100 ops, on the
    /// embedded store and (with --postgres) on PostgreSQL.
    Batches(batches::BatchesArgs),
    /// Fleet queries and jobs at fleet scale (100,000 devices × 10 keys by default): `where`
    /// query latencies, job devices/s, and other writers' latency while a job runs.
    Fleet(rollout::FleetArgs),
    /// A client process of the reconnect storm (started by `compare`).
    #[command(hide = true)]
    StormClient(storm::StormClientArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Compare(args) => runtime.block_on(suite::run(args)),
        Command::Writes(args) => runtime.block_on(writes::run(args)),
        Command::Store(args) => runtime.block_on(store::run(args)),
        Command::Idle(args) => runtime.block_on(sync::idle(args)),
        Command::IdleClient(args) => runtime.block_on(sync::idle_client(args)),
        Command::Latency(args) => runtime.block_on(sync::latency(args)),
        Command::Commands(args) => runtime.block_on(commands::run(args)),
        Command::Acks(args) => runtime.block_on(acks::run(args)),
        Command::Batches(args) => runtime.block_on(batches::run(args)),
        Command::Fleet(args) => runtime.block_on(rollout::run(args)),
        Command::StormClient(args) => runtime.block_on(storm::client(args)),
        Command::Fsync(args) => {
            let r = fsync::probe(&args.dir, std::time::Duration::from_secs_f64(args.seconds))?;
            println!("{r}");
            Ok(())
        }
    }
}
