//! The REST API over real HTTP against a real server on 127.0.0.1:0.

mod admin;
mod auth;
mod errors;
mod kv;
mod ops;
