//! `ddp`: the Device Data Proxy command.
//!
//! `ddp serve` runs the server (REST + WebSocket + MQTT on the embedded store by default).
//! Every flag can also be given as a `DDP_*` environment variable; `ddp serve --help` lists them.

mod serve;

use clap::{Parser, Subcommand};

/// Device Data Proxy: a key-value store per IoT device that is also a live two-way channel
/// between apps and devices.
#[derive(Parser)]
#[command(name = "ddp", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    ///
    /// With no arguments it keeps its data in ./ddp-data and serves HTTP on 127.0.0.1:8080.
    /// On first start it generates an admin key, stores it in the data directory and prints it.
    Serve(Box<serve::ServeArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
