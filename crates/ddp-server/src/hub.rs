//! The change hub: fans committed changes out to the live sessions of each store.
//!
//! The store's commit sink ([`Fanout`](crate::fanout::Fanout)) calls [`Hub::publish`] for every
//! committed change, in rev order, from the thread that made it durable. Publishing never blocks
//! and never waits for a session: each [`Subscription`] has a bounded mailbox; one that
//! overflows is emptied and flagged *lagged*, and its session replaces what it missed with a fresh
//! snapshot. A change's sync message is serialized once and shared by every session (and every
//! transport: WebSocket text frames and MQTT payloads carry the same JSON).
//!
//! The hub knows nothing of transports or of where changes come from, so the MQTT listener and
//! (with a shared database) changes made on other nodes feed the same sessions the same way.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ddp_protocol::sync::ServerMessage;
use ddp_protocol::{ApiKeyId, DeviceId, Rev};
use ddp_store::{Change, StoreRef};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::Principal;

/// A committed change with its sync message, serialized once for every session.
#[derive(Debug)]
pub struct ChangeFrame {
    /// The change.
    pub change: Change,
    /// `{"action":"set"|"delete","rev":…,"key":…[,"value":…]}`.
    pub json: Utf8Bytes,
}

impl ChangeFrame {
    /// The frame for `change`.
    pub fn new(change: Change) -> ChangeFrame {
        let message = match &change.value {
            Some(value) => ServerMessage::Set { rev: change.rev, key: change.key.clone(), value: value.clone() },
            None => ServerMessage::Delete { rev: change.rev, key: change.key.clone() },
        };
        let json = serde_json::to_string(&message).unwrap_or_default();
        ChangeFrame { change, json: Utf8Bytes::from(json) }
    }

    /// The change's rev.
    pub fn rev(&self) -> Rev {
        self.change.rev
    }
}

/// Why the server ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The device's key was rotated.
    KeyRotated,
    /// The device was deleted.
    DeviceDeleted,
    /// The project API key was revoked.
    KeyRevoked,
    /// The key's view of the device changed (device moved, home deleted); reconnect to re-check.
    AccessChanged,
    /// The server is shutting down.
    ShuttingDown,
}

impl CloseReason {
    /// A sentence for close frames and logs.
    pub fn message(self) -> &'static str {
        match self {
            CloseReason::KeyRotated => "the device key was rotated",
            CloseReason::DeviceDeleted => "the device was deleted",
            CloseReason::KeyRevoked => "the API key was revoked",
            CloseReason::AccessChanged => "access changed; reconnect",
            CloseReason::ShuttingDown => "the server is shutting down",
        }
    }
}

/// What a session gets from its subscription.
#[derive(Debug)]
pub enum Delivery {
    /// Changes in rev order.
    Changes(VecDeque<Arc<ChangeFrame>>),
    /// The mailbox overflowed: changes were dropped; take a fresh snapshot.
    Lagged,
    /// The server ended the session.
    Closed(CloseReason),
}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<Arc<ChangeFrame>>,
    lagged: bool,
    closed: Option<CloseReason>,
}

/// One session's interest in one store.
pub struct Subscription {
    id: u64,
    store: StoreRef,
    principal: Principal,
    mailbox: Mutex<Mailbox>,
    wake: Notify,
}

impl Subscription {
    /// Waits for the next delivery. Cancel-safe: nothing is taken from the mailbox until the
    /// future completes.
    pub async fn recv(&self) -> Delivery {
        loop {
            if let Some(delivery) = self.take() {
                return delivery;
            }
            self.wake.notified().await;
        }
    }

    fn take(&self) -> Option<Delivery> {
        let mut m = self.mailbox.lock().ok()?;
        if let Some(reason) = m.closed {
            return Some(Delivery::Closed(reason));
        }
        if m.lagged {
            m.lagged = false;
            m.queue.clear();
            return Some(Delivery::Lagged);
        }
        if m.queue.is_empty() { None } else { Some(Delivery::Changes(std::mem::take(&mut m.queue))) }
    }

    fn deliver(&self, frame: &Arc<ChangeFrame>, limit: usize) {
        let Ok(mut m) = self.mailbox.lock() else { return };
        if m.closed.is_some() {
            return;
        }
        if m.queue.len() >= limit {
            if !m.lagged {
                metrics::counter!("ddp_lag_reloads_total").increment(1);
            }
            m.lagged = true;
            m.queue.clear();
        }
        m.queue.push_back(frame.clone());
        drop(m);
        self.wake.notify_one();
    }

    fn close(&self, reason: CloseReason) {
        if let Ok(mut m) = self.mailbox.lock() {
            m.closed.get_or_insert(reason);
        }
        self.wake.notify_one();
    }

    /// Who holds the session.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
}

const SHARDS: usize = 32;

type Topics = HashMap<StoreRef, Vec<Arc<Subscription>>>;

/// The hub. See the [module docs](self).
pub struct Hub {
    shards: Box<[Mutex<Topics>]>,
    next_id: AtomicU64,
    mailbox_limit: usize,
    hasher: std::hash::RandomState,
}

impl Hub {
    /// A hub whose session mailboxes hold at most `mailbox_limit` changes.
    pub fn new(mailbox_limit: usize) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            mailbox_limit: mailbox_limit.max(1),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, store: StoreRef) -> &Mutex<Topics> {
        &self.shards[(self.hasher.hash_one(store) as usize) % SHARDS]
    }

    /// Subscribes to `store`'s changes; the subscription ends when the guard is dropped.
    pub fn subscribe(self: &Arc<Self>, store: StoreRef, principal: Principal) -> SubscriptionGuard {
        let sub = Arc::new(Subscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            store,
            principal,
            mailbox: Mutex::new(Mailbox::default()),
            wake: Notify::new(),
        });
        if let Ok(mut topics) = self.shard(store).lock() {
            topics.entry(store).or_default().push(sub.clone());
        }
        SubscriptionGuard { hub: self.clone(), sub }
    }

    fn unsubscribe(&self, sub: &Subscription) {
        if let Ok(mut topics) = self.shard(sub.store).lock()
            && let Some(subs) = topics.get_mut(&sub.store)
        {
            subs.retain(|s| s.id != sub.id);
            if subs.is_empty() {
                topics.remove(&sub.store);
            }
        }
    }

    /// Hands `change` to every session of its store. Never blocks on a session.
    pub fn publish(&self, change: &Change) {
        let subs: Vec<Arc<Subscription>> = match self.shard(change.store).lock() {
            Ok(topics) => match topics.get(&change.store) {
                Some(subs) => subs.clone(),
                None => return,
            },
            Err(_) => return,
        };
        let frame = Arc::new(ChangeFrame::new(change.clone()));
        for sub in &subs {
            sub.deliver(&frame, self.mailbox_limit);
        }
    }

    /// Ends the sessions of `store` whose holder matches `which`.
    pub fn close_store(&self, store: StoreRef, which: impl Fn(&Principal) -> bool, reason: CloseReason) {
        if let Ok(topics) = self.shard(store).lock()
            && let Some(subs) = topics.get(&store)
        {
            for sub in subs.iter().filter(|s| which(&s.principal)) {
                sub.close(reason);
            }
        }
    }

    /// Ends every session whose holder matches `which`, on any store.
    pub fn close_where(&self, which: impl Fn(&Principal) -> bool, reason: CloseReason) {
        for shard in self.shards.iter() {
            if let Ok(topics) = shard.lock() {
                for sub in topics.values().flatten().filter(|s| which(&s.principal)) {
                    sub.close(reason);
                }
            }
        }
    }

    /// Ends the sessions held by a device's own key.
    pub fn close_device_key(&self, device: DeviceId, reason: CloseReason) {
        self.close_store(StoreRef::Device(device), |p| *p == Principal::Device(device), reason);
    }

    /// Ends the sessions held by a project key.
    pub fn close_project_key(&self, key: ApiKeyId, reason: CloseReason) {
        self.close_where(|p| matches!(p, Principal::Project(k) if k.id == key), reason);
    }

    /// Live subscriptions (for tests and metrics).
    pub fn subscriptions(&self) -> usize {
        self.shards.iter().filter_map(|s| s.lock().ok()).map(|t| t.values().map(Vec::len).sum::<usize>()).sum()
    }
}

/// A live subscription; unsubscribes when dropped.
pub struct SubscriptionGuard {
    hub: Arc<Hub>,
    sub: Arc<Subscription>,
}

impl std::ops::Deref for SubscriptionGuard {
    type Target = Subscription;
    fn deref(&self) -> &Subscription {
        &self.sub
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.sub);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddp_protocol::{Key, Timestamp, Value};
    use ddp_store::Origin;

    fn change(store: StoreRef, rev: u64) -> Change {
        Change {
            store,
            rev: Rev(rev),
            key: Key::new("k").expect("key"),
            value: Some(Value::parse(&rev.to_string()).expect("value")),
            time: Timestamp(0),
            home: None,
            origin: Origin::Admin,
        }
    }

    fn revs(d: Delivery) -> Vec<u64> {
        match d {
            Delivery::Changes(q) => q.iter().map(|f| f.rev().0).collect(),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn subscribers_get_their_store_in_order_and_nothing_else() {
        let hub = Arc::new(Hub::new(10));
        let a = StoreRef::Device(DeviceId::new(1).expect("id"));
        let b = StoreRef::Device(DeviceId::new(2).expect("id"));
        let sub = hub.subscribe(a, Principal::Admin);
        hub.publish(&change(a, 1));
        hub.publish(&change(b, 1));
        hub.publish(&change(a, 2));
        assert_eq!(revs(sub.recv().await), [1, 2]);
        let frame = ChangeFrame::new(change(a, 3));
        assert_eq!(frame.json.as_str(), r#"{"action":"set","rev":3,"key":"k","value":3}"#);
    }

    #[tokio::test]
    async fn an_overflowing_mailbox_is_flagged_lagged_and_keeps_what_came_after() {
        let hub = Arc::new(Hub::new(3));
        let a = StoreRef::Device(DeviceId::new(1).expect("id"));
        let sub = hub.subscribe(a, Principal::Admin);
        for rev in 1..=5 {
            hub.publish(&change(a, rev));
        }
        assert!(matches!(sub.recv().await, Delivery::Lagged));
        hub.publish(&change(a, 6));
        assert_eq!(revs(sub.recv().await), [6]);
    }

    #[tokio::test]
    async fn closing_reaches_only_the_matching_sessions_and_dropping_unsubscribes() {
        let hub = Arc::new(Hub::new(10));
        let d = DeviceId::new(7).expect("id");
        let store = StoreRef::Device(d);
        let device_session = hub.subscribe(store, Principal::Device(d));
        let admin_session = hub.subscribe(store, Principal::Admin);
        hub.close_device_key(d, CloseReason::KeyRotated);
        assert!(matches!(device_session.recv().await, Delivery::Closed(CloseReason::KeyRotated)));
        hub.publish(&change(store, 1));
        assert_eq!(revs(admin_session.recv().await), [1], "the admin's watch is not the device's key");
        assert_eq!(hub.subscriptions(), 2);
        drop(device_session);
        drop(admin_session);
        assert_eq!(hub.subscriptions(), 0);
    }
}
