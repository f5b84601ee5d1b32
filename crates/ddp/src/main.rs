//! `ddp`: the Device Data Proxy command.
//!
//! `ddp serve` runs the server (REST + WebSocket + MQTT on the embedded store by default).
//! The other subcommands (`home`, `device`, `apikey`, `kv`, `job`, `command`, `watch`, `events`)
//! talk to a server over its public API. Every flag can also be given as a `DDP_*` environment
//! variable; `ddp <command> --help` lists them, with examples.

mod cli;
mod serve;

use clap::{Parser, Subcommand};

/// Device Data Proxy: a key-value store per IoT device that is also a live two-way channel
/// between apps and devices.
#[derive(Parser)]
#[command(
    name = "ddp",
    version,
    propagate_version = true,
    after_help = "Examples:\n  ddp serve\n  ddp home create --name Kitchen\n  ddp device create --name Thermostat --home 1\n  ddp kv set --device 1 targetTemp 21.5\n  ddp watch --device 1 --token ddpd_…\n\nClient commands find the server with --server / DDP_SERVER (default http://127.0.0.1:8080) and\nauthenticate with --token / DDP_TOKEN, or the admin key in ./ddp-data/admin.key."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    ///
    /// With no arguments it keeps its data in ./ddp-data and serves HTTP on 127.0.0.1:8080.
    /// On first start it generates an admin key, stores it in the data directory and prints it.
    Serve(Box<serve::ServeArgs>),
    /// Manage homes (admin key).
    Home {
        #[command(subcommand)]
        command: cli::Home,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Manage devices and their keys (admin key; a device key may show its own record).
    Device {
        #[command(subcommand)]
        command: cli::Device,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Manage project API keys for apps (admin key).
    Apikey {
        #[command(subcommand)]
        command: cli::ApiKey,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Read and write a device's or a home's key-value store.
    Kv {
        #[command(subcommand)]
        command: cli::Kv,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Write to many devices at once: jobs over a selection of devices (admin key or a
    /// read-write project key), their progress, and cancelling them.
    Job {
        #[command(subcommand)]
        command: cli::Job,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Send devices commands.
    Command {
        #[command(subcommand)]
        command: cli::CommandCmd,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Follow a device's sync stream (reload, then every change) until Ctrl-C.
    Watch {
        #[command(flatten)]
        args: cli::WatchArgs,
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// Follow home events (every home the token may see, or --home) until Ctrl-C.
    Events {
        #[command(flatten)]
        args: cli::EventsArgs,
        #[command(flatten)]
        conn: cli::Connection,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(args) => serve::run(*args),
        client => run_client(client),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_client(command: Cmd) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match command {
            Cmd::Serve(_) => Ok(()),
            Cmd::Home { command, conn } => cli::home(&conn, command).await,
            Cmd::Device { command, conn } => cli::device(&conn, command).await,
            Cmd::Apikey { command, conn } => cli::apikey(&conn, command).await,
            Cmd::Kv { command, conn } => cli::kv(&conn, command).await,
            Cmd::Job { command, conn } => cli::job(&conn, command).await,
            Cmd::Command { command, conn } => cli::command(&conn, command).await,
            Cmd::Watch { args, conn } => cli::watch(&conn, args).await,
            Cmd::Events { args, conn } => cli::events(&conn, args).await,
        }
    })?;
    Ok(())
}
