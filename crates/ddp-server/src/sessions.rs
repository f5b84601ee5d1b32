//! Live sessions: every connection that holds a credential for longer than one request — a
//! WebSocket sync session, an MQTT connection in any state after its CONNACK, an app's event
//! stream, and whatever connection kind comes later. The registry does two things:
//!
//! - **It ends them when their credential stops standing**: on key rotation (4001 / MQTT
//!   administrative action), device deletion (4002), project-key revocation (4003) and a change
//!   of a project key's view (4004). The commit feed ([`Fanout`](crate::fanout::Fanout)) tells it,
//!   on every node, whatever the session has subscribed to. Sessions are indexed by the key that
//!   holds them and by the store they watch, so a closing touches only the sessions concerned.
//! - **It delivers commands** (PROTOCOL.md §8) to the sessions of a device's own key that listen
//!   for them (an MQTT connection subscribed to `/devices/{id}/command`, the command WebSocket,
//!   a sync session opened with `?commands=1`), from the commit feed, so from every node.
//! - **It counts devices' own sessions**: the per-device cap, `isConnected`, and the device's
//!   `lastConnectTime` / `lastDisconnectTime` — counted by the store, so over every node. Only
//!   sessions held by a device's own key count as the device being connected (and against its
//!   cap); apps watching a device do not.
//!
//! Opening asks the store ([`Store::session_opened`]) and, for a device's first session, raises
//! `_deviceConnected_` before the session starts. Closing runs in the background
//! ([`Store::session_closed`], then `_deviceDisconnected_` for the last one). A device opening a
//! session waits until its own earlier closes are recorded, so a quick reconnect is never refused
//! for a session that is already gone, and its events come in order.
//!
//! Sessions are opened only by the gate ([`Kv`](crate::kv::Kv)), which authorizes them first and,
//! when an admin change raced with the opening, checks again once the session is registered (a
//! revocation after that reaches it here).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Reason, Timestamp};
use ddp_store::{SessionClosed, SessionOpened, Store, StoreRef};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::json::Json;
use crate::kv::Transport;
use crate::locks;

/// What a session is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A sync session watching (and, with the right, writing) one store.
    Sync(StoreRef),
    /// A device's own connection (MQTT): it may watch and write its store and raise its events.
    Device(DeviceId),
    /// An app's event stream of these homes (`None`: every home its key may see).
    Events(Option<Vec<HomeId>>),
    /// A device's command socket (MODE's `GET /devices/{id}/command`): it only receives commands.
    Commands(DeviceId),
}

impl Purpose {
    /// The store the session reads and writes, if it has one.
    pub(crate) fn store(&self) -> Option<StoreRef> {
        match self {
            Purpose::Sync(store) => Some(*store),
            Purpose::Device(d) => Some(StoreRef::Device(*d)),
            Purpose::Events(_) | Purpose::Commands(_) => None,
        }
    }
}

/// What the registry tells a live session.
#[derive(Debug)]
pub(crate) enum Signal {
    /// The server ended the session.
    Closed(CloseReason),
    /// Commands for the device, in the order they were sent.
    Commands(VecDeque<Json>),
}

/// Commands a session may have waiting before newer ones are dropped (commands are not stored;
/// a device that cannot keep up loses the newest, and they are counted).
const COMMAND_QUEUE: usize = 64;

/// Why the server ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The device's key was rotated.
    KeyRotated,
    /// The device was deleted.
    DeviceDeleted,
    /// The project API key was revoked.
    KeyRevoked,
    /// The key's view changed (device moved, home deleted); reconnect to be checked again.
    AccessChanged,
}

impl CloseReason {
    /// A sentence for close frames and logs.
    pub(crate) fn message(self) -> &'static str {
        match self {
            CloseReason::KeyRotated => "the device key was rotated",
            CloseReason::DeviceDeleted => "the device was deleted",
            CloseReason::KeyRevoked => "the API key was revoked",
            CloseReason::AccessChanged => "access changed; reconnect",
        }
    }

    /// The WebSocket close code (PROTOCOL.md §4.1).
    pub(crate) fn ws_code(self) -> u16 {
        match self {
            CloseReason::KeyRotated => 4001,
            CloseReason::DeviceDeleted => 4002,
            CloseReason::KeyRevoked => 4003,
            CloseReason::AccessChanged => 4004,
        }
    }
}

/// A live session's entry in the registry.
struct Entry {
    id: u64,
    principal: Principal,
    purpose: Purpose,
    inbox: Mutex<Inbox>,
    wake: Notify,
}

/// What waits for a session.
#[derive(Default)]
struct Inbox {
    closed: Option<CloseReason>,
    /// Whether it takes commands now.
    listening: bool,
    commands: VecDeque<Json>,
}

impl Entry {
    fn close(&self, reason: CloseReason) {
        let mut inbox = locks::recover(&self.inbox);
        if inbox.closed.is_none() {
            inbox.closed = Some(reason);
            tracing::info!(who = %self.principal, why = reason.message(), "closing a session");
        }
        drop(inbox);
        self.wake.notify_one();
    }

    fn command(&self, json: &Json) {
        let mut inbox = locks::recover(&self.inbox);
        if !inbox.listening || inbox.closed.is_some() {
            return;
        }
        if inbox.commands.len() >= COMMAND_QUEUE {
            metrics::counter!("ddp_commands_dropped_total").increment(1);
            return;
        }
        inbox.commands.push_back(json.clone());
        drop(inbox);
        self.wake.notify_one();
    }
}

/// Which key holds a session (the admin key is never revoked, so its sessions are not indexed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    Device(DeviceId),
    Project(ApiKeyId),
}

const SHARDS: usize = 16;

/// One shard of an [`Index`].
type Shard<K> = Mutex<HashMap<K, Vec<Arc<Entry>>>>;

/// Entries by a key, in sharded maps.
struct Index<K> {
    shards: Box<[Shard<K>]>,
    hasher: std::hash::RandomState,
}

impl<K: Hash + Eq + Copy> Index<K> {
    fn new() -> Index<K> {
        Index {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, key: K) -> &Shard<K> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn insert(&self, key: K, entry: &Arc<Entry>) -> Result<()> {
        locks::grant(self.shard(key))?.entry(key).or_default().push(entry.clone());
        Ok(())
    }

    fn remove(&self, key: K, id: u64) {
        let mut map = locks::recover(self.shard(key));
        if let Some(entries) = map.get_mut(&key) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                map.remove(&key);
            }
        }
    }

    /// Closes the entries under `key` that `which` picks.
    fn close(&self, key: K, which: impl Fn(&Entry) -> bool, reason: CloseReason) {
        if let Some(entries) = locks::recover(self.shard(key)).get(&key) {
            for e in entries.iter().filter(|e| which(e)) {
                e.close(reason);
            }
        }
    }

    /// Closes the entries under any key that `which` picks.
    fn close_all(&self, which: impl Fn(&K, &Entry) -> bool, reason: CloseReason) {
        for shard in self.shards.iter() {
            for (key, entries) in locks::recover(shard).iter() {
                for e in entries.iter().filter(|e| which(key, e)) {
                    e.close(reason);
                }
            }
        }
    }
}

/// A device's closes in progress.
struct Closing {
    pending: usize,
    done: Arc<Notify>,
}

/// The registry of live sessions. See the [module docs](self).
pub(crate) struct Sessions {
    store: Arc<dyn Store>,
    events: Arc<EventBus>,
    max_per_device: usize,
    live: watch::Sender<usize>,
    next_id: AtomicU64,
    /// Sessions by the device or project key that holds them.
    holders: Index<Holder>,
    /// Sessions by the store they watch.
    watchers: Index<StoreRef>,
    /// Closes handed to the background and not yet recorded, per device, with what wakes the
    /// device's next open when they are.
    closing: Mutex<HashMap<DeviceId, Closing>>,
    background: TaskTracker,
}

impl Sessions {
    /// A registry allowing `max_per_device` sessions per device key, counted in `store`, raising
    /// presence events on `events`.
    pub(crate) fn new(store: Arc<dyn Store>, events: Arc<EventBus>, max_per_device: usize) -> Sessions {
        Sessions {
            store,
            events,
            max_per_device: max_per_device.max(1),
            live: watch::Sender::new(0),
            next_id: AtomicU64::new(1),
            holders: Index::new(),
            watchers: Index::new(),
            closing: Mutex::new(HashMap::new()),
            background: TaskTracker::new(),
        }
    }

    /// Registers a session of `principal` for `purpose`, or refuses it with
    /// `429 TOO_MANY_CONNECTIONS` when it is a device's own and the device already holds its
    /// maximum on all nodes. The caller (the gate) has authorized it.
    pub(crate) async fn open(
        self: &Arc<Self>,
        principal: Principal,
        purpose: Purpose,
        transport: Transport,
    ) -> Result<Session> {
        let device = match principal {
            Principal::Device(d) => Some(d),
            _ => None,
        };
        if let Some(d) = device {
            self.admit_device(d).await?;
        }
        self.live.send_modify(|n| *n += 1);
        metrics::gauge!("ddp_sessions", "transport" => transport.as_str()).increment(1.0);
        let listening = matches!(purpose, Purpose::Commands(_));
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            principal,
            purpose,
            inbox: Mutex::new(Inbox { listening, ..Inbox::default() }),
            wake: Notify::new(),
        });
        // From here the session is live: dropping it undoes all of the above.
        let session = Session { registry: self.clone(), entry, device, transport };
        if let Some(holder) = session.holder() {
            self.holders.insert(holder, &session.entry)?;
        }
        if let Some(store) = session.entry.purpose.store() {
            self.watchers.insert(store, &session.entry)?;
        }
        Ok(session)
    }

    /// Counts one more session of device `d` in the store (over every node), or refuses it.
    async fn admit_device(self: &Arc<Self>, d: DeviceId) -> Result<()> {
        self.wait_for_closes(d).await;
        // On its own task: if the caller gives up half-way, an admitted session is still
        // closed again rather than counted forever.
        let (reply, answer) = oneshot::channel();
        let sessions = self.clone();
        self.background.spawn(async move {
            let at = Timestamp::now();
            let opened = sessions.store.session_opened(d, sessions.max_per_device, at).await;
            if let Ok(SessionOpened::Opened { first: true, home }) = opened {
                sessions.events.presence(home, d, true, at).await;
            }
            if let Err(Ok(SessionOpened::Opened { .. })) = reply.send(opened) {
                sessions.record_close(d);
            }
        });
        match answer.await.map_err(|_| Error::unavailable("the session registry stopped"))? {
            Ok(SessionOpened::Opened { .. }) => Ok(()),
            Ok(SessionOpened::Refused) => Err(Error::new(
                Reason::TooManyConnections,
                format!("device {d} already has {} live sessions, the maximum", self.max_per_device),
            )
            .with_data(serde_json::json!({ "limit": self.max_per_device }))),
            Err(e) => Err(e.into()),
        }
    }

    /// Live sessions on this node.
    pub(crate) fn live(&self) -> usize {
        *self.live.borrow()
    }

    /// Waits until every session on this node has ended and every close is recorded.
    pub(crate) async fn drained(&self) {
        let mut rx = self.live.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        self.background.close();
        self.background.wait().await;
    }

    // ---- ending sessions whose credential no longer stands ----

    /// A device's key was rotated: its sessions end.
    pub(crate) fn key_rotated(&self, device: DeviceId) {
        self.holders.close(Holder::Device(device), |_| true, CloseReason::KeyRotated);
    }

    /// A device was deleted: its own sessions and every session watching its store end.
    pub(crate) fn device_deleted(&self, device: DeviceId) {
        self.holders.close(Holder::Device(device), |_| true, CloseReason::DeviceDeleted);
        self.watchers.close(StoreRef::Device(device), |_| true, CloseReason::DeviceDeleted);
    }

    /// A project key was revoked: every session it holds ends.
    pub(crate) fn key_revoked(&self, key: ApiKeyId) {
        self.holders.close(Holder::Project(key), |_| true, CloseReason::KeyRevoked);
    }

    /// A device moved to `to`: scoped project keys' sessions watching it that no longer see it
    /// end (they may reconnect, and are checked again).
    pub(crate) fn device_moved(&self, device: DeviceId, to: Option<HomeId>) {
        self.watchers.close(
            StoreRef::Device(device),
            |e| is_scoped_project(&e.principal) && !to.is_some_and(|h| e.principal.sees_home(h)),
            CloseReason::AccessChanged,
        );
    }

    /// A home was deleted: its devices left it, so scoped project keys' sessions watching a
    /// device end, as do their event streams that included the home.
    pub(crate) fn home_deleted(&self, home: HomeId) {
        self.holders.close_all(
            |_, e| {
                is_scoped_project(&e.principal)
                    && match &e.purpose {
                        Purpose::Sync(StoreRef::Device(_)) | Purpose::Device(_) => true,
                        Purpose::Sync(StoreRef::Home(h)) => *h == home,
                        Purpose::Events(Some(homes)) => homes.contains(&home),
                        Purpose::Events(None) => e.principal.sees_home(home),
                        Purpose::Commands(_) => false,
                    }
            },
            CloseReason::AccessChanged,
        );
    }

    // ---- commands ----

    /// A command for `device`: to every session of the device's own key that listens.
    pub(crate) fn command(&self, device: DeviceId, json: &Json) {
        metrics::counter!("ddp_commands_total").increment(1);
        if let Some(entries) = locks::recover(self.holders.shard(Holder::Device(device))).get(&Holder::Device(device)) {
            for e in entries {
                e.command(json);
            }
        }
    }

    // ---- presence ----

    /// Waits until the device's closes in progress are recorded. Only this device's opens are
    /// woken when they are (a storm of reconnects must not wake every waiter on every close).
    async fn wait_for_closes(&self, device: DeviceId) {
        let pending = || locks::recover(&self.closing).get(&device).map(|c| c.done.clone());
        while let Some(done) = pending() {
            let closed = done.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            // Look again after registering: the closes may have been recorded just before (the
            // wake-up then went by), and a new close may have started with a new `done`.
            match pending() {
                Some(still) if Arc::ptr_eq(&still, &done) => closed.await,
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Records, in the background, that a session of device `d` ended.
    fn record_close(self: &Arc<Self>, d: DeviceId) {
        locks::recover(&self.closing)
            .entry(d)
            .or_insert_with(|| Closing { pending: 0, done: Arc::new(Notify::new()) })
            .pending += 1;
        let at = Timestamp::now();
        let sessions = self.clone();
        self.background.spawn(async move {
            match sessions.store.session_closed(d, at).await {
                Ok(SessionClosed::Last { home }) => sessions.events.presence(home, d, false, at).await,
                Ok(SessionClosed::Others) => {}
                Err(e) => tracing::warn!(device = %d, error = %e, "session close not recorded"),
            }
            let mut closing = locks::recover(&sessions.closing);
            if let Some(c) = closing.get_mut(&d) {
                c.pending -= 1;
                if c.pending == 0
                    && let Some(c) = closing.remove(&d)
                {
                    c.done.notify_waiters();
                }
            }
        });
    }
}

fn is_scoped_project(p: &Principal) -> bool {
    matches!(p, Principal::Project(k) if k.homes.is_some())
}

/// A live session's place in the registry; dropping it ends the session there.
pub(crate) struct Session {
    registry: Arc<Sessions>,
    entry: Arc<Entry>,
    device: Option<DeviceId>,
    transport: Transport,
}

impl Session {
    /// Who holds it.
    pub(crate) fn principal(&self) -> &Principal {
        &self.entry.principal
    }

    /// What it is for.
    pub(crate) fn purpose(&self) -> &Purpose {
        &self.entry.purpose
    }

    /// The transport it came in on.
    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// The next thing the registry has for the session: commands, or the end of the session
    /// (its credential no longer stands). Cancel-safe: use it in `select!`.
    pub(crate) async fn signal(&self) -> Signal {
        loop {
            {
                let mut inbox = locks::recover(&self.entry.inbox);
                if let Some(reason) = inbox.closed {
                    return Signal::Closed(reason);
                }
                if !inbox.commands.is_empty() {
                    return Signal::Commands(std::mem::take(&mut inbox.commands));
                }
            }
            self.entry.wake.notified().await;
        }
    }

    /// Starts or stops taking the device's commands (MQTT SUBSCRIBE / UNSUBSCRIBE of its command
    /// topic; `?commands=1` on a sync session). Only a device's own key takes them.
    pub(crate) fn listen_for_commands(&self, listening: bool) {
        if matches!(self.entry.principal, Principal::Device(_)) {
            let mut inbox = locks::recover(&self.entry.inbox);
            inbox.listening = listening;
            if !listening {
                inbox.commands.clear();
            }
        }
    }

    /// Ends the session now (the gate found, checking again, that it may not stay open).
    pub(crate) fn close(&self, reason: CloseReason) {
        self.entry.close(reason);
    }

    fn holder(&self) -> Option<Holder> {
        match &self.entry.principal {
            Principal::Admin => None,
            Principal::Device(d) => Some(Holder::Device(*d)),
            Principal::Project(k) => Some(Holder::Project(k.id)),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(holder) = self.holder() {
            self.registry.holders.remove(holder, self.entry.id);
        }
        if let Some(store) = self.entry.purpose.store() {
            self.registry.watchers.remove(store, self.entry.id);
        }
        if let Some(d) = self.device {
            self.registry.record_close(d);
        }
        metrics::gauge!("ddp_sessions", "transport" => self.transport.as_str()).decrement(1.0);
        self.registry.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}
