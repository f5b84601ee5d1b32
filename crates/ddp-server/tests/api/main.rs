//! The API over real sockets against a real server on 127.0.0.1:0: REST with reqwest,
//! WebSocket sync sessions with tokio-tungstenite.

mod admin;
mod auth;
mod batches;
#[cfg(feature = "postgres-tests")]
mod cluster;
mod commands;
mod console;
mod cors;
mod delivery;
mod errors;
mod events;
mod fleet;
mod fuzz;
mod kv;
mod mqtt;
mod mqtt_ws;
mod openapi;
mod ops;
mod tls;
mod ws;
mod ws_stress;
