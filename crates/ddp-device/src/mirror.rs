//! The local mirror of a device's store, as a state machine without IO.
//!
//! The mirror keeps, per key, the newest thing it knows — a value or a deletion — with the rev
//! it was learnt at:
//! - `set`/`delete` apply only if their rev is greater than the key's; a delete leaves a
//!   tombstone, so a late `set` for the same key is recognised and ignored;
//! - a `reload` at rev R describes every key as of R: it replaces what the mirror holds, except
//!   keys the mirror already knows at a rev above R (a reload older than what the mirror holds is
//!   not applied blindly);
//! - [`Mirror::rev`] is the rev up to which the mirror has seen *every* change, which is what a
//!   session resumes from.
//!
//! - a `batch` (PROTOCOL.md §11) is its changes applied at once, in order.
//!
//! These rules make the mirror's content independent of the order in which it receives the
//! messages of one history, of duplicates and of delays: any order ends in the in-order state
//! (property-tested below).

use std::collections::{BTreeMap, BTreeSet};

use ddp_protocol::sync::ServerMessage;
use ddp_protocol::{Key, Rev, Value};
use serde::{Deserialize, Serialize};

/// What the mirror knows of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The value; `None` for a deletion (a tombstone).
    pub value: Option<Value>,
    /// The rev this was learnt at.
    pub rev: Rev,
}

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `reload` (the first sync, a reconnect without resume, or a session that fell behind).
    Reload,
    /// A live `set` or `delete` (including resumed ones).
    Live,
}

/// A change the mirror applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// Its new value; `None` when deleted.
    pub value: Option<Value>,
    /// The rev of the change (a reload's rev for reloaded keys).
    pub rev: Rev,
    /// Where it came from.
    pub source: Source,
}

/// The mirror. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    rev: Rev,
    /// Revs above `rev` seen out of order, waiting for the gap below them to fill.
    #[serde(default)]
    ahead: BTreeSet<u64>,
    entries: BTreeMap<Key, Entry>,
}

impl Mirror {
    /// An empty mirror at rev 0.
    pub fn new() -> Mirror {
        Mirror::default()
    }

    /// The rev up to which every change has been seen.
    pub fn rev(&self) -> Rev {
        self.rev
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key).and_then(|e| e.value.as_ref())
    }

    /// Every key and value, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.entries.iter().filter_map(|(k, e)| e.value.as_ref().map(|v| (k, v)))
    }

    /// How many keys hold a value.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether no key holds a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the mirror knows of `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Applies a message from the server; returns the changes it made (nothing for messages that
    /// change nothing: duplicates, stale ones, `resume`, `error`).
    pub fn apply(&mut self, message: &ServerMessage) -> Vec<Change> {
        match message {
            ServerMessage::Reload { rev, items, .. } => self.reload(*rev, items.iter().map(|i| (&i.key, &i.value))),
            ServerMessage::Set { rev, key, value } => self.change(*rev, key, Some(value)).into_iter().collect(),
            ServerMessage::Delete { rev, key } => self.change(*rev, key, None).into_iter().collect(),
            // The changes of one batch, applied under the one borrow: whoever reads (or
            // persists) the mirror sees it before the batch or after it, never in between.
            ServerMessage::Batch { changes, .. } => changes.iter().flat_map(|c| self.apply(c)).collect(),
            ServerMessage::Resume { .. } | ServerMessage::Error { .. } | ServerMessage::Command { .. } => Vec::new(),
        }
    }

    fn change(&mut self, rev: Rev, key: &Key, value: Option<&Value>) -> Option<Change> {
        if rev <= self.rev {
            // Every change up to the mirror's rev is reflected already (seen, or inside a
            // reload): this one is a duplicate or older, even for a key the mirror does not hold.
            return None;
        }
        self.advance(rev);
        if self.entries.get(key.as_str()).is_some_and(|e| e.rev >= rev) {
            return None; // a duplicate, or older than what the mirror knows
        }
        let old = self.entries.insert(key.clone(), Entry { value: value.cloned(), rev });
        let changed = old.and_then(|e| e.value).as_ref() != value;
        changed.then(|| Change { key: key.clone(), value: value.cloned(), rev, source: Source::Live })
    }

    /// Records that every change up to `rev` has been seen, or that `rev` arrived early.
    fn advance(&mut self, rev: Rev) {
        if rev.0 == self.rev.0 + 1 {
            self.rev = rev;
            while self.ahead.remove(&(self.rev.0 + 1)) {
                self.rev = self.rev.next();
            }
        } else if rev > self.rev {
            self.ahead.insert(rev.0);
        }
    }

    fn reload<'a>(&mut self, rev: Rev, items: impl Iterator<Item = (&'a Key, &'a Value)>) -> Vec<Change> {
        if rev <= self.rev {
            // The mirror reflects every change up to its rev already: a snapshot at or below it
            // tells nothing new (and must not bring back keys deleted since).
            return Vec::new();
        }
        let incoming: BTreeMap<&Key, &Value> = items.collect();
        let mut changes = Vec::new();
        // Keys the reload holds: take them unless the mirror knows newer.
        for (key, value) in &incoming {
            let newer = self.entries.get(key.as_str()).is_some_and(|e| e.rev > rev);
            if newer {
                continue;
            }
            let old = self.entries.insert((*key).clone(), Entry { value: Some((*value).clone()), rev });
            if old.and_then(|e| e.value).as_ref() != Some(*value) {
                changes.push(Change {
                    key: (*key).clone(),
                    value: Some((*value).clone()),
                    rev,
                    source: Source::Reload,
                });
            }
        }
        // Keys it does not hold were deleted by rev, unless the mirror knows newer.
        for (key, entry) in self.entries.iter_mut() {
            if incoming.contains_key(key) || entry.rev > rev {
                continue;
            }
            let had_value = entry.value.is_some();
            *entry = Entry { value: None, rev };
            if had_value {
                changes.push(Change { key: key.clone(), value: None, rev, source: Source::Reload });
            }
        }
        if rev > self.rev {
            self.rev = rev;
            self.ahead = self.ahead.split_off(&(rev.0 + 1));
            while self.ahead.remove(&(self.rev.0 + 1)) {
                self.rev = self.rev.next();
            }
        }
        changes.sort_by(|a, b| a.key.cmp(&b.key));
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddp_protocol::Timestamp;
    use ddp_protocol::sync::Item;
    use proptest::prelude::*;

    fn key(s: &str) -> Key {
        Key::new(s).expect("key")
    }

    fn val(n: u64) -> Value {
        Value::parse(&n.to_string()).expect("value")
    }

    fn set(rev: u64, k: &str, v: u64) -> ServerMessage {
        ServerMessage::Set { rev: Rev(rev), key: key(k), value: val(v) }
    }

    fn del(rev: u64, k: &str) -> ServerMessage {
        ServerMessage::Delete { rev: Rev(rev), key: key(k) }
    }

    fn reload(rev: u64, items: &[(&str, u64)]) -> ServerMessage {
        let items: Vec<Item> =
            items.iter().map(|(k, v)| Item { key: key(k), value: val(*v), modification_time: Timestamp(0) }).collect();
        ServerMessage::Reload { rev: Rev(rev), num_items: items.len(), items }
    }

    fn content(m: &Mirror) -> Vec<(String, String)> {
        m.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reload_then_live_changes() {
        let mut m = Mirror::new();
        let changes = m.apply(&reload(3, &[("a", 1), ("b", 2)]));
        assert_eq!(changes.len(), 2);
        assert!(changes.iter().all(|c| c.source == Source::Reload));
        assert_eq!(m.rev(), Rev(3));
        assert_eq!(
            m.apply(&set(4, "a", 5)),
            vec![Change { key: key("a"), value: Some(val(5)), rev: Rev(4), source: Source::Live }]
        );
        assert_eq!(m.apply(&del(5, "b")).len(), 1);
        assert_eq!(content(&m), [("a".into(), "5".into())]);
        assert_eq!(m.rev(), Rev(5));
    }

    #[test]
    fn a_late_set_after_a_delete_is_ignored() {
        let mut m = Mirror::new();
        m.apply(&set(1, "k", 1));
        m.apply(&del(3, "k"));
        assert!(m.apply(&set(2, "k", 2)).is_empty(), "the tombstone at rev 3 wins over a set at rev 2");
        assert_eq!(m.get("k"), None);
        assert_eq!(m.entry("k").map(|e| e.rev), Some(Rev(3)));
    }

    #[test]
    fn an_older_reload_does_not_undo_newer_knowledge() {
        let mut m = Mirror::new();
        m.apply(&reload(5, &[("a", 1), ("b", 1)]));
        m.apply(&set(6, "a", 2));
        m.apply(&del(7, "b"));
        let changes = m.apply(&reload(5, &[("a", 1), ("b", 1)]));
        assert!(changes.is_empty(), "a stale reload changes nothing: {changes:?}");
        assert_eq!((content(&m), m.rev()), (vec![("a".into(), "2".into())], Rev(7)));
    }

    #[test]
    fn a_newer_reload_replaces_everything_and_reports_deletions() {
        let mut m = Mirror::new();
        m.apply(&reload(2, &[("a", 1), ("b", 1)]));
        let changes = m.apply(&reload(9, &[("b", 1), ("c", 3)]));
        let summary: Vec<(&str, Option<String>)> =
            changes.iter().map(|c| (c.key.as_str(), c.value.as_ref().map(ToString::to_string))).collect();
        assert_eq!(summary, [("a", None), ("c", Some("3".into()))], "b did not change");
        assert_eq!(m.rev(), Rev(9));
    }

    #[test]
    fn rev_only_advances_over_a_complete_sequence() {
        let mut m = Mirror::new();
        m.apply(&set(1, "a", 1));
        m.apply(&set(3, "a", 3));
        assert_eq!(m.rev(), Rev(1), "rev 2 is missing");
        m.apply(&set(2, "b", 2));
        assert_eq!(m.rev(), Rev(3));
    }

    #[test]
    fn the_mirror_round_trips_through_json() {
        let mut m = Mirror::new();
        m.apply(&reload(4, &[("a", 1)]));
        m.apply(&del(5, "a"));
        m.apply(&set(7, "b", 2));
        let back: Mirror = serde_json::from_str(&serde_json::to_string(&m).expect("json")).expect("parse");
        assert_eq!(back, m);
    }

    /// A history: changes at revs 1..=n, and reloads taken at some revs.
    fn history() -> impl Strategy<Value = Vec<ServerMessage>> {
        prop::collection::vec((0usize..4, any::<bool>(), 0u64..100), 1..40)
            .prop_flat_map(|ops| {
                let mut state: BTreeMap<String, u64> = BTreeMap::new();
                let mut messages = Vec::new();
                let mut reloads = Vec::new();
                for (i, (k, is_delete, v)) in ops.iter().enumerate() {
                    let rev = i as u64 + 1;
                    let k = format!("k{k}");
                    if *is_delete {
                        state.remove(&k);
                        messages.push(del(rev, &k));
                    } else {
                        state.insert(k.clone(), *v);
                        messages.push(set(rev, &k, *v));
                    }
                    if v % 5 == 0 {
                        let items: Vec<(String, u64)> = state.iter().map(|(k, v)| (k.clone(), *v)).collect();
                        reloads.push((rev, items));
                    }
                }
                for (rev, items) in reloads {
                    let items: Vec<(&str, u64)> = items.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                    messages.push(reload(rev, &items));
                }
                let n = messages.len();
                (Just(messages), prop::collection::vec(0..n, 0..10), Just(n))
            })
            .prop_flat_map(|(messages, dupes, n)| {
                let mut all = messages.clone();
                all.extend(dupes.iter().map(|&i| messages[i].clone()));
                (Just(messages), Just(all).prop_shuffle(), Just(n))
            })
            .prop_map(|(in_order, shuffled, _)| {
                let mut both = in_order;
                both.push(ServerMessage::Resume { rev: Rev(0) }); // separator
                both.extend(shuffled);
                both
            })
    }

    proptest! {
        /// Shuffled, duplicated and delayed delivery ends in the state of in-order delivery.
        #[test]
        fn any_order_converges_to_the_in_order_state(messages in history()) {
            let split = messages.iter().position(|m| matches!(m, ServerMessage::Resume { .. })).unwrap_or(0);
            let (in_order, shuffled) = (&messages[..split], &messages[split + 1..]);
            let mut expected = Mirror::new();
            for m in in_order.iter().filter(|m| !matches!(m, ServerMessage::Reload { .. })) {
                expected.apply(m);
            }
            let mut got = Mirror::new();
            for m in shuffled {
                got.apply(m);
            }
            prop_assert_eq!(content(&got), content(&expected));
            prop_assert_eq!(got.rev(), expected.rev(), "every change was delivered, so rev is complete");
        }
    }
}
