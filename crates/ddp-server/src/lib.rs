//! The Device Data Proxy service as a library.
//!
//! [`Server::bind`] opens storage and binds the listeners; [`Server::run`] serves until its
//! shutdown future completes. The `ddp` binary is a thin wrapper around these two calls. That,
//! the settings ([`Config`]) and the error type are the whole public surface; everything else is
//! crate-private (`cargo doc --document-private-items` shows it).
//!
//! Every transport decodes and authenticates, then calls the one gate ([`kv::Kv`]): requests,
//! sessions, watches and device frames all go through it. Storage hands every commit, in commit
//! order, to [`fanout::Fanout`], which is where live sessions, events and caches learn about
//! changes.
//!
//! # Layout
//! - [`server`]: start-up (storage — the embedded SQLite data directory and its lock, or a
//!   PostgreSQL database shared by several nodes — admin key, listeners) and shutdown.
//! - [`config`]: every setting.
//! - [`app`]: the state all transports share.
//! - [`http`]: the REST API and the WebSocket sessions (axum).
//! - [`mqtt`]: the MQTT listener: devices sync and write over MQTT 3.1.1 and 5.
//! - [`kv`]: the gate — authentication, rate limits, authorization, validation and limits, the
//!   one write path, sessions, watches and device frames.
//! - [`auth`]: tokens to principals, with a cache that admin changes clear.
//! - [`secret`]: generating and hashing keys.
//! - [`ratelimit`]: per-key request rates.
//! - [`hub`]: committed changes to live sessions, per store.
//! - [`watch`]: the one watch path: subscribe, then snapshot or resume, then live.
//! - [`sessions`]: every live session of a credential: closed when the credential stops standing;
//!   for devices, the cap, presence and connection times (counted by the store, so over every
//!   node).
//! - [`events`]: home events: system events from the commit feed, device events, app streams.
//! - [`progress`]: delivery and acknowledgement — how far each device got, recorded coalesced,
//!   shared by the nodes, waited for by writers.
//! - [`fleet`]: fleet queries (`GET /devices` filters) and the job runner that writes a job's
//!   devices through the gate, exactly once each (PROTOCOL.md §12).
//! - [`fanout`]: the store's commit sink: hub, events, auth cache, closing sessions, progress.
//! - [`tls`]: the TLS listeners' certificate, reloaded when its files change or on SIGHUP.
//! - [`json`]: the server's own type for a serialized message.
//! - [`listener`]: connection caps over the open-file budget; who is shed when they are full.
//! - [`locks`]: what a poisoned lock means (fail closed).
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the one error type, with its `Reason`.
#![warn(unreachable_pub)]
// The map above links to the crate's private modules: read it with
// `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

mod app;
mod auth;
mod config;
mod error;
mod events;
mod fanout;
mod fleet;
mod http;
mod hub;
mod json;
mod kv;
mod listener;
mod locks;
mod metrics;
mod mqtt;
mod progress;
mod ratelimit;
mod secret;
mod server;
mod sessions;
#[cfg(test)]
mod testing;
mod tls;
mod watch;

pub use config::{Config, History, HttpSettings, Limits, MqttSettings, RateLimits, SessionLimits, TlsSettings};
/// Which keys' values fleet queries read from an index ([`Config::index_keys`]).
pub use ddp_store::ValueIndex;
pub use error::Error;
pub use server::{ADMIN_KEY_FILE, DATABASE_FILE, LOCK_FILE, Server, StartError};
