//! Test support: [`TestServer`] runs a real server (in this process, on `127.0.0.1:0`, with a
//! temporary data directory) and stops it when dropped; its helpers create homes, devices and
//! keys through the real admin API.
//!
//! With `DDP_TEST_STORE=postgres` (and `DDP_TEST_DATABASE_URL`), servers started with
//! [`TestServer::start`] / [`TestServer::start_with`] store everything in a fresh PostgreSQL
//! database instead, so the same suites run on both backends (`scripts/test` does both).
//!
//! # Layout, by fixture kind
//! - [`server`]: [`TestServer`] and the admin and assertion helpers.
//! - [`ws`]: WebSocket clients for sync sessions and event streams.
//! - [`mqtt`]: MQTT clients for devices.
//! - [`raw`]: raw MQTT and WebSocket peers for the protocols' edges (malformed packets, frames).
//! - [`postgres`]: fresh PostgreSQL databases.
//! - [`process`]: a real `ddp serve` process.
//! - [`proxy`]: a TCP proxy that can cut every connection.

pub mod mqtt;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod server;
pub mod ws;

pub use mqtt::{MqttClient, mqtt_options};
pub use postgres::{create_database, fresh_database, suite_on_postgres};
pub use process::DdpProcess;
pub use proxy::TcpProxy;
pub use server::{ADMIN_KEY, KeptData, TestServer, TlsFiles, etag_of, etag_rev, expect_error, expect_json};
pub use ws::{Recorded, WsClient, WsEnd, WsOpen, WsWriter, tls_client_config, ws_connect, wss_connect};
