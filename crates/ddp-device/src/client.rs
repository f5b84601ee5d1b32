//! The client handle and its builder.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ddp_protocol::sync::Command;
use ddp_protocol::sync::DeviceRequest;
use ddp_protocol::{DeviceId, Key, Rev, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::connection::{Job, Target, Task};
use crate::error::{Error, ErrorKind, Result};
use crate::mirror::{Change, Mirror};
use crate::persist;

/// Connection state, as [`Client::status`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// A session with the server is open.
    pub connected: bool,
    /// The mirror has been synchronised with the server at least once since the client started
    /// (it may still hold a persisted mirror before that).
    pub synced: bool,
    /// Why the last connection attempt or session failed, if it did.
    pub last_error: Option<String>,
}

/// What the client tells device code as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// A key changed (see [`Change::source`]: from a reload, or live).
    Changed(Change),
    /// The mirror is synchronised: after a reload (at `rev`) or a resume. Sent on every
    /// (re)connection; the first one means the mirror is ready.
    Synced {
        /// The mirror's rev.
        rev: Rev,
    },
    /// The session dropped; the client reconnects by itself.
    Disconnected,
    /// An atomic batch (PROTOCOL.md §11) up to `rev` was applied whole: its
    /// [`Update::Changed`]s came just before, and the mirror never held part of it.
    Batch {
        /// The rev of the batch's last change.
        rev: Rev,
    },
}

pub(crate) struct Shared {
    pub(crate) mirror: RwLock<Mirror>,
    pub(crate) updates: broadcast::Sender<Update>,
    pub(crate) commands: broadcast::Sender<Command>,
    pub(crate) status: watch::Sender<Status>,
}

/// A device's connection to the Device Data Proxy. Cheap to clone; every clone shares the one
/// connection and mirror. The connection runs in a background task that reconnects by itself.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Job>,
    write_timeout: Duration,
}

/// Settings of a [`Client`].
pub struct ClientBuilder {
    url: String,
    device: u64,
    key: String,
    persist: Option<PathBuf>,
    write_timeout: Duration,
    backoff: (Duration, Duration),
    ca_pem: Option<Vec<u8>>,
    max_message: usize,
    acks: bool,
}

/// The largest sync message a client takes by default: a reload of a store at the server's
/// default limits (1,000 keys of 64 KiB values) with room to spare.
pub const DEFAULT_MAX_MESSAGE: usize = 96 * 1024 * 1024;

impl ClientBuilder {
    /// Keeps the mirror in `path`: it is read at start (so the device has its last known values
    /// before it is online) and rewritten as it changes (at most once a second) and on close.
    pub fn persist_to(mut self, path: impl Into<PathBuf>) -> ClientBuilder {
        self.persist = Some(path.into());
        self
    }

    /// How long [`Client::set`] and [`Client::delete`] wait for the server's confirmation
    /// (default 10 s).
    pub fn write_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.write_timeout = timeout;
        self
    }

    /// Reconnection delays: start at `min`, double up to `max`, each with random jitter
    /// (default 200 ms to 30 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> ClientBuilder {
        self.backoff = (min, max.max(min));
        self
    }

    /// Trusts this CA (PEM) for `wss://` and `mqtts://`, besides the usual public roots
    /// (for servers with a private certificate).
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> ClientBuilder {
        self.ca_pem = Some(pem.into());
        self
    }

    /// The largest message the device takes from the server, in bytes (default
    /// [`DEFAULT_MAX_MESSAGE`]). A `reload` carries the whole store, so this bounds the store
    /// the device can mirror. Over MQTT it is announced to the server as MQTT 5's Maximum Packet
    /// Size: the server never sends more, and ends a session whose reload cannot fit (the client
    /// reports `PacketTooLarge` in [`Status::last_error`] and keeps retrying).
    pub fn max_message_bytes(mut self, bytes: usize) -> ClientBuilder {
        self.max_message = bytes.max(1024);
        self
    }

    /// Whether the client tells the server which changes it has applied (PROTOCOL.md §10), so
    /// that apps can see (and wait for) the device having its configuration. On by default.
    /// With [`persist_to`](Self::persist_to), a change is acknowledged once the mirror file
    /// holding it is saved; saves then follow changes at once after a quiet spell and at most
    /// once a second. Without, acknowledgements follow changes at once and at most four a second.
    /// Each carries the latest rev, so a burst of changes costs one or two.
    pub fn acknowledge(mut self, on: bool) -> ClientBuilder {
        self.acks = on;
        self
    }

    /// Starts the client: reads the persisted mirror if any, and starts connecting in the
    /// background. Returns at once; reads work immediately, [`Client::ready`] waits for the
    /// first sync. Must be called inside a tokio runtime.
    pub fn start(self) -> Result<Client> {
        let device = DeviceId::new(self.device)
            .ok_or_else(|| Error::new(ErrorKind::InvalidArgument, "a device id is a positive integer"))?;
        let target = Target::parse(&self.url, device, &self.key, self.ca_pem.as_deref())?;
        let mirror = match &self.persist {
            Some(path) => persist::load(path)?.unwrap_or_default(),
            None => Mirror::new(),
        };
        let (updates, _) = broadcast::channel(1024);
        let (commands, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            mirror: RwLock::new(mirror),
            updates,
            commands,
            status: watch::Sender::new(Status::default()),
        });
        let (commands, receiver) = mpsc::channel(1024);
        let task = Task::new(shared.clone(), target, receiver, self.persist, self.backoff, self.max_message, self.acks);
        tokio::spawn(task.run());
        Ok(Client { shared, commands, write_timeout: self.write_timeout })
    }
}

impl Client {
    /// A builder for a device's client. The URL's scheme picks the transport: `ws://host:8080`
    /// or `wss://…` for a WebSocket (the server's HTTP address), `mqtt://host:1883` or
    /// `mqtts://host:8883` for MQTT.
    pub fn builder(url: &str, device: u64, key: &str) -> ClientBuilder {
        ClientBuilder {
            url: url.to_owned(),
            device,
            key: key.to_owned(),
            persist: None,
            write_timeout: Duration::from_secs(10),
            backoff: (Duration::from_millis(200), Duration::from_secs(30)),
            ca_pem: None,
            max_message: DEFAULT_MAX_MESSAGE,
            acks: true,
        }
    }

    /// The value of `key` in the mirror (also while offline).
    pub fn get(&self, key: &str) -> Option<Value> {
        self.shared.mirror.read().ok().and_then(|m| m.get(key).cloned())
    }

    /// Every key and value in the mirror, sorted by key.
    pub fn get_all(&self) -> Vec<(Key, Value)> {
        self.shared.mirror.read().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    /// The rev up to which the mirror has every change.
    pub fn rev(&self) -> Rev {
        self.shared.mirror.read().map(|m| m.rev()).unwrap_or_default()
    }

    /// The connection state now.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// Waits until the mirror has been synchronised with the server once.
    pub async fn ready(&self) -> Result<()> {
        let mut rx = self.shared.status.subscribe();
        rx.wait_for(|s| s.synced).await.map(|_| ()).map_err(|_| Error::new(ErrorKind::Closed, "the client was closed"))
    }

    /// Updates as they happen: changed keys, syncs, disconnections. A receiver that falls more
    /// than 1024 updates behind skips the oldest (the mirror itself is always current).
    pub fn updates(&self) -> broadcast::Receiver<Update> {
        self.shared.updates.subscribe()
    }

    /// The commands apps send the device (PROTOCOL.md §8), from the moment of the call, in the
    /// order they were sent. Over MQTT they come on `/devices/{id}/command` (subscribed beside
    /// the key-value topic); over WebSocket on the sync session itself, opened with
    /// `?commands=1`. Commands are not stored: those sent while the device is offline are
    /// refused to their sender (`409 DEVICE_OFFLINE`), and a receiver more than 256 commands
    /// behind skips the oldest.
    pub fn commands(&self) -> broadcast::Receiver<Command> {
        self.shared.commands.subscribe()
    }

    /// Sets `key` to `value` (anything serde can write as JSON, except `null`); resolves with the
    /// rev the server gave the change, once the server's confirmation arrives.
    pub async fn set<V: serde::Serialize + ?Sized>(&self, key: &str, value: &V) -> Result<Rev> {
        let text = serde_json::to_string(value).map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        let value = Value::parse(&text).map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        self.set_value(key, value).await
    }

    /// Sets `key` to an exact JSON value (numbers keep their text).
    pub async fn set_value(&self, key: &str, value: Value) -> Result<Rev> {
        self.write(DeviceRequest::Set { key: parse_key(key)?, value }).await
    }

    /// Deletes `key`; resolves with the rev of the deletion.
    pub async fn delete(&self, key: &str) -> Result<Rev> {
        self.write(DeviceRequest::Delete { key: parse_key(key)? }).await
    }

    async fn write(&self, request: DeviceRequest) -> Result<Rev> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Job::Write { request, reply })
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "the client was closed"))?;
        match tokio::time::timeout(self.write_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::new(ErrorKind::Closed, "the client was closed")),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no confirmation within {:?}; the write may still be applied", self.write_timeout),
            )),
        }
    }

    /// Closes the connection, saves the persisted mirror, and stops the background task.
    /// Other clones fail with [`ErrorKind::Closed`] from then on.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Job::Close(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

fn parse_key(key: &str) -> Result<Key> {
    Key::new(key).map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))
}
