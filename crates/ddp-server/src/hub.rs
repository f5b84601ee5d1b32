//! The change hub: fans committed changes out to the live sessions of each store.
//!
//! The store's commit sink ([`Fanout`](crate::fanout::Fanout)) calls [`Hub::publish`] for every
//! committed change, in rev order, from the thread that made it durable. Publishing never blocks
//! and never waits for a session: each [`Subscription`] has a bounded mailbox; one that
//! overflows is emptied and flagged *lagged*, and its session replaces what it missed with a fresh
//! snapshot. A change's sync message is serialized once and shared by every session (and every
//! transport: WebSocket text frames and MQTT payloads carry the same JSON).
//!
//! The hub only moves data: who may watch a store is decided before a subscription exists (by
//! the gate, [`Kv`](crate::kv::Kv)), and ending sessions is the session registry's
//! ([`Sessions`](crate::sessions::Sessions)). It knows nothing of transports or of where changes
//! come from, so changes made on other nodes feed the same sessions the same way.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ddp_protocol::Rev;
use ddp_protocol::sync::ServerMessage;
use ddp_store::{Change, StoreRef};
use tokio::sync::Notify;

use crate::error::Result;
use crate::json::Json;
use crate::locks;

/// A committed change with its sync message, serialized once for every session.
#[derive(Debug)]
pub(crate) struct ChangeFrame {
    /// The change.
    pub(crate) change: Change,
    /// `{"action":"set"|"delete","rev":…,"key":…[,"value":…]}`.
    pub(crate) json: Json,
}

impl ChangeFrame {
    /// The frame for `change`.
    pub(crate) fn new(change: Change) -> Result<ChangeFrame> {
        let message = match &change.value {
            Some(value) => ServerMessage::Set { rev: change.rev, key: change.key.clone(), value: value.clone() },
            None => ServerMessage::Delete { rev: change.rev, key: change.key.clone() },
        };
        let json = Json::encode(&message)?;
        Ok(ChangeFrame { change, json })
    }

    /// The change's rev.
    pub(crate) fn rev(&self) -> Rev {
        self.change.rev
    }
}

/// What a session gets from its subscription.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// Changes in rev order.
    Changes(VecDeque<Arc<ChangeFrame>>),
    /// Changes were dropped (the mailbox overflowed): take a fresh snapshot.
    Lagged,
}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<Arc<ChangeFrame>>,
    lagged: bool,
}

/// One session's interest in one store.
pub(crate) struct Subscription {
    id: u64,
    store: StoreRef,
    mailbox: Mutex<Mailbox>,
    wake: Notify,
}

impl Subscription {
    /// Waits for the next delivery. Cancel-safe: nothing is taken from the mailbox until the
    /// future completes.
    pub(crate) async fn recv(&self) -> Delivery {
        loop {
            if let Some(delivery) = self.take() {
                return delivery;
            }
            self.wake.notified().await;
        }
    }

    fn take(&self) -> Option<Delivery> {
        let mut m = locks::recover(&self.mailbox);
        if m.lagged {
            m.lagged = false;
            m.queue.clear();
            return Some(Delivery::Lagged);
        }
        if m.queue.is_empty() { None } else { Some(Delivery::Changes(std::mem::take(&mut m.queue))) }
    }

    fn deliver(&self, frame: &Arc<ChangeFrame>, limit: usize) {
        let mut m = locks::recover(&self.mailbox);
        if m.queue.len() >= limit {
            self.lag(&mut m);
        }
        m.queue.push_back(frame.clone());
        drop(m);
        self.wake.notify_one();
    }

    /// Drops what is queued: the session takes a fresh snapshot.
    fn lag(&self, m: &mut Mailbox) {
        if !m.lagged {
            metrics::counter!("ddp_lag_reloads_total").increment(1);
        }
        m.lagged = true;
        m.queue.clear();
    }
}

const SHARDS: usize = 32;

type Topics = HashMap<StoreRef, Vec<Arc<Subscription>>>;

/// The hub. See the [module docs](self).
pub(crate) struct Hub {
    shards: Box<[Mutex<Topics>]>,
    next_id: AtomicU64,
    mailbox_limit: usize,
    hasher: std::hash::RandomState,
}

impl Hub {
    /// A hub whose session mailboxes hold at most `mailbox_limit` changes.
    pub(crate) fn new(mailbox_limit: usize) -> Hub {
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
    pub(crate) fn subscribe(self: &Arc<Self>, store: StoreRef) -> Result<SubscriptionGuard> {
        let sub = Arc::new(Subscription {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            store,
            mailbox: Mutex::new(Mailbox::default()),
            wake: Notify::new(),
        });
        locks::grant(self.shard(store))?.entry(store).or_default().push(sub.clone());
        Ok(SubscriptionGuard { hub: self.clone(), sub })
    }

    fn unsubscribe(&self, sub: &Subscription) {
        let mut topics = locks::recover(self.shard(sub.store));
        if let Some(subs) = topics.get_mut(&sub.store) {
            subs.retain(|s| s.id != sub.id);
            if subs.is_empty() {
                topics.remove(&sub.store);
            }
        }
    }

    /// Hands `change` to every session of its store. Never blocks on a session. If its message
    /// cannot be serialized, every session of the store is sent a fresh reload instead: a
    /// session never silently misses a change.
    pub(crate) fn publish(&self, change: &Change) {
        let subs: Vec<Arc<Subscription>> = match locks::recover(self.shard(change.store)).get(&change.store) {
            Some(subs) => subs.clone(),
            None => return,
        };
        match ChangeFrame::new(change.clone()) {
            Ok(frame) => {
                let frame = Arc::new(frame);
                for sub in &subs {
                    sub.deliver(&frame, self.mailbox_limit);
                }
            }
            Err(_) => {
                for sub in &subs {
                    sub.lag(&mut locks::recover(&sub.mailbox));
                    sub.wake.notify_one();
                }
            }
        }
    }

    /// Live subscriptions (for tests and metrics).
    #[cfg(test)]
    pub(crate) fn subscriptions(&self) -> usize {
        self.shards.iter().map(|s| locks::recover(s).values().map(Vec::len).sum::<usize>()).sum()
    }
}

/// A live subscription; unsubscribes when dropped.
pub(crate) struct SubscriptionGuard {
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
    use ddp_protocol::{DeviceId, Key, Timestamp, Value};
    use ddp_store::Origin;

    pub(crate) fn change(store: StoreRef, rev: u64) -> Change {
        Change {
            store,
            rev: Rev(rev),
            key: Key::new("k").expect("key"),
            value: Some(Value::parse(&rev.to_string()).expect("value")),
            time: Timestamp(0),
            home: None,
            origin: Origin::Admin,
            batch_last: None,
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
        let sub = hub.subscribe(a).expect("subscribed");
        hub.publish(&change(a, 1));
        hub.publish(&change(b, 1));
        hub.publish(&change(a, 2));
        assert_eq!(revs(sub.recv().await), [1, 2]);
        let frame = ChangeFrame::new(change(a, 3)).expect("frame");
        assert_eq!(frame.json.text(), r#"{"action":"set","rev":3,"key":"k","value":3}"#);
    }

    #[tokio::test]
    async fn an_overflowing_mailbox_is_flagged_lagged_and_keeps_what_came_after() {
        let hub = Arc::new(Hub::new(3));
        let a = StoreRef::Device(DeviceId::new(1).expect("id"));
        let sub = hub.subscribe(a).expect("subscribed");
        for rev in 1..=5 {
            hub.publish(&change(a, rev));
        }
        assert!(matches!(sub.recv().await, Delivery::Lagged));
        hub.publish(&change(a, 6));
        assert_eq!(revs(sub.recv().await), [6]);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let hub = Arc::new(Hub::new(10));
        let store = StoreRef::Device(DeviceId::new(7).expect("id"));
        let one = hub.subscribe(store).expect("subscribed");
        let two = hub.subscribe(store).expect("subscribed");
        assert_eq!(hub.subscriptions(), 2);
        drop(one);
        hub.publish(&change(store, 1));
        assert_eq!(revs(two.recv().await), [1]);
        drop(two);
        assert_eq!(hub.subscriptions(), 0);
    }
}
