//! The Device Data Proxy vocabulary, shared by the server, the device SDK and the CLI.
//!
//! Everything here is plain data with validation on construction ("parse, don't validate"): once a
//! [`Key`] or a [`Value`] exists it obeys the wire contract (PROTOCOL.md §3), so the layers above
//! never re-check. Nothing in this crate does IO.
//!
//! # Layout
//! - [`ids`]: [`DeviceId`], [`HomeId`], [`ApiKeyId`] — positive integers written in decimal.
//! - [`key`]: [`Key`], 1–255 bytes of `A-Z a-z 0-9 _ - : .`.
//! - [`value`]: [`Value`], a JSON value kept as its exact (minified) text so numbers round-trip byte-exact.
//! - [`rev`]: [`Rev`], a store's revision counter.
//! - [`timestamp`]: [`Timestamp`], milliseconds since the epoch, written as RFC 3339 UTC with milliseconds.
//! - [`reason`]: [`Reason`], the `UPPER_SNAKE_CASE` error reasons of §2.
//! - [`batch`]: the ops of an atomic batch (§11) and RFC 7396 merge patch's home, [`Value::merge_patch`].
//! - [`fleet`]: the `where` conditions of device queries and jobs (§12), [`fleet::Where`].
//! - [`sync`]: the sync messages exchanged with devices over WebSocket and MQTT (§4).

pub mod batch;
pub mod fleet;
pub mod ids;
pub mod key;
pub mod reason;
pub mod rev;
pub mod sync;
pub mod timestamp;
pub mod value;

pub use ids::{ApiKeyId, DeviceId, HomeId, IdError, JobId};
pub use key::{Key, KeyError};
pub use reason::Reason;
pub use rev::Rev;
pub use timestamp::Timestamp;
pub use value::{Value, ValueError};
