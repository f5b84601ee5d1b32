//! The Device Data Proxy service as a library.
//!
//! [`Server::bind`] opens storage and binds the listeners; [`Server::run`] serves until its
//! shutdown future completes. The `ddp` binary is a thin wrapper around these two calls.
//!
//! Every transport decodes and authenticates, then calls the one write/read path
//! ([`kv::Kv`]). Storage hands every commit, in commit order, to [`fanout::Fanout`], which is
//! where live sessions, events and caches learn about changes.
//!
//! # Layout
//! - [`server`]: start-up (storage — the embedded SQLite data directory and its lock, or a
//!   PostgreSQL database shared by several nodes — admin key, listeners) and shutdown.
//! - [`config`]: every setting.
//! - [`app`]: the state all transports share.
//! - [`http`]: the REST API and the WebSocket sync sessions (axum).
//! - [`mqtt`]: the MQTT listener: devices sync and write over MQTT 3.1.1 and 5.
//! - [`kv`]: the one write path and read path: authorization, validation, limits.
//! - [`auth`]: tokens to principals, with a cache that admin changes clear.
//! - [`secret`]: generating and hashing keys.
//! - [`ratelimit`]: per-key request rates.
//! - [`hub`]: committed changes to live sessions, per store.
//! - [`watch`]: the one watch path: subscribe, then snapshot or resume, then live.
//! - [`sessions`]: live sessions: cap per device, presence, connection times (counted by the
//!   store, so over every node).
//! - [`events`]: home events: system events from the commit feed, device events, app streams.
//! - [`fanout`]: the store's commit sink: hub, events, auth cache, closing sessions.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: the one error type, with its `Reason`.

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod events;
pub mod fanout;
pub mod http;
pub mod hub;
pub mod kv;
pub mod metrics;
pub mod mqtt;
pub mod ratelimit;
pub mod secret;
pub mod server;
pub mod sessions;
pub mod watch;

pub use config::{Config, History, Limits, MqttSettings, RateLimits, SessionLimits};
pub use error::Error;
pub use server::{Server, StartError};
