//! # ddp-device: the Device Data Proxy SDK for Rust device software
//!
//! A device keeps a local **mirror** of its key-value store. The [`Client`] connects over
//! WebSocket or MQTT (same API; the URL's scheme picks), keeps the mirror in sync — a `reload`
//! of the whole store on connect, then every change in rev order — and reconnects by itself with
//! capped exponential backoff and jitter. Reads are served from the mirror, also while offline;
//! writes go to the server and resolve with the rev the server gave them.
//!
//! Where the mirror is concerned it is careful in ways that matter on real networks: a change
//! applies only if its rev is newer than what the mirror knows of its key, deletions leave
//! tombstones so a late update cannot resurrect a key, and a reload older than what the mirror
//! holds is merged, not applied blindly ([`mirror`]). Over WebSocket a reconnect resumes from
//! the mirror's rev (`sinceRev`), so only missed changes flow. The mirror can be kept in a file.
//!
//! The client **acknowledges** what it has applied (PROTOCOL.md §10): once the mirror holds a
//! rev — and, when it is kept in a file, once that file is saved — it tells the server, which
//! shows it as the device's `appliedRev` and lets apps wait for it (`PUT …?wait=applied`).
//! Acknowledgements are coalesced (the latest rev, a few a second at most); see
//! [`ClientBuilder::acknowledge`].
//!
//! ## Quick start
//!
//! ```no_run
//! # async fn example() -> Result<(), ddp_device::Error> {
//! use ddp_device::{Client, Update};
//!
//! // The device's id and API key come from `POST /devices` (or `ddp device create`).
//! let client = Client::builder("ws://127.0.0.1:8080", 1, "ddpd_…")
//!     .persist_to("/var/lib/thermostat/mirror.json")
//!     .start()?;
//! client.ready().await?; // first sync (reads work before it, from the persisted mirror)
//!
//! if let Some(target) = client.get("targetTemp") {
//!     println!("target: {target}");
//! }
//! let rev = client.set("currentTemp", &21.5).await?; // confirmed by the server, with its rev
//! println!("written at rev {rev}");
//!
//! let mut updates = client.updates();
//! while let Ok(update) = updates.recv().await {
//!     if let Update::Changed(change) = update {
//!         println!("{} is now {:?} (rev {}, {:?})", change.key, change.value, change.rev, change.source);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! URLs: `ws://host:8080` / `wss://host` (the server's HTTP address), `mqtt://host:1883` /
//! `mqtts://host:8883`. See `examples/thermostat.rs` for a whole device program.
//!
//! # Layout
//! - [`client`]: [`Client`], [`ClientBuilder`], [`Status`], [`Update`].
//! - [`mirror`]: [`Mirror`], the state machine without IO, and [`Change`].
//! - [`error`]: [`Error`] and [`ErrorKind`].
//! - `connection`: the background task (transports, write confirmations, acknowledgements,
//!   reconnection).
//! - `persist`: the mirror file.

pub mod client;
mod connection;
pub mod error;
pub mod mirror;
mod persist;

pub use client::{Client, ClientBuilder, DEFAULT_MAX_MESSAGE, Status, Update};
pub use ddp_protocol::sync::Command;
pub use ddp_protocol::{Key, Reason, Rev, Value};
pub use error::{Error, ErrorKind, Result};
pub use mirror::{Change, Mirror, Source};
