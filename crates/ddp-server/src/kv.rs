//! The one write path and read path of the key-value stores, shared by every transport.
//!
//! Transports decode and authenticate; everything else happens here, once: authorization
//! (PROTOCOL.md §1), validation and limits (§3, §3.3), the durable write (the store assigns the
//! rev), and metrics. Fan-out to live sessions and events does not happen here: the store hands
//! every commit to the [`Fanout`](crate::fanout::Fanout) in commit order, whoever wrote it.

use std::sync::Arc;

use ddp_protocol::{Key, Reason, Value};
use ddp_store::{Change, Condition, ItemRecord, KvAction, KvWrite, Snapshot, Store, StoreRef};

use crate::auth::Principal;
use crate::config::Limits;
use crate::error::{Error, Result};

/// The transport a request came in on (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// REST over HTTP.
    Rest,
    /// A WebSocket sync session.
    WebSocket,
    /// An MQTT session.
    Mqtt,
}

impl Transport {
    /// The label used in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Rest => "rest",
            Transport::WebSocket => "websocket",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// Parses a key, answering `400 INVALID_KEY`.
pub fn parse_key(text: &str) -> Result<Key> {
    Key::new(text)
        .map_err(|e| Error::new(Reason::InvalidKey, e.to_string()).with_data(serde_json::json!({ "key": text })))
}

/// The key-value service.
pub struct Kv {
    store: Arc<dyn Store>,
    limits: Limits,
}

impl Kv {
    /// The service over `store` with `limits`.
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Kv {
        Kv { store, limits }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks that `who` may read (or, with `write`, write) `store`.
    ///
    /// Devices get 403 for any store but their own, whether or not it exists, so they never
    /// learn which devices exist. Project keys see the homes in their scope and those homes'
    /// devices; an unscoped key sees every home and every device.
    pub async fn authorize(&self, who: &Principal, store: StoreRef, write: bool) -> Result<()> {
        if write && !who.may_write() {
            return Err(Error::denied(format!("{who} is read-only")));
        }
        match (who, store) {
            (Principal::Admin, _) => Ok(()),
            (Principal::Device(me), StoreRef::Device(d)) if *me == d => Ok(()),
            (Principal::Device(_), _) => Err(Error::denied("a device may only use its own store")),
            (Principal::Project(_), StoreRef::Home(h)) => {
                if who.sees_home(h) {
                    Ok(())
                } else {
                    Err(Error::denied(format!("{who} may not see home {h}")))
                }
            }
            (Principal::Project(k), StoreRef::Device(d)) => {
                if k.homes.is_none() {
                    // Unscoped: every device, but a missing one is still a 404.
                    self.store.device(d).await?;
                    return Ok(());
                }
                match self.store.device(d).await?.home {
                    Some(h) if who.sees_home(h) => Ok(()),
                    _ => Err(Error::denied(format!("{who} may not see device {d}"))),
                }
            }
        }
    }

    /// One item.
    pub async fn get(&self, who: &Principal, store: StoreRef, key: Key) -> Result<ItemRecord> {
        self.authorize(who, store, false).await?;
        Ok(self.store.get(store, key).await?)
    }

    /// The store's rev and items (those starting with `prefix`, when given).
    pub async fn snapshot(&self, who: &Principal, store: StoreRef, prefix: Option<&str>) -> Result<Snapshot> {
        if let Some(p) = prefix
            && !p.is_empty()
            && let Err(e) = Key::validate(p)
        {
            return Err(Error::invalid_parameter(format!("keyPrefix is not a valid key prefix: {e}")));
        }
        self.authorize(who, store, false).await?;
        Ok(self.store.snapshot(store, prefix.filter(|p| !p.is_empty()).map(str::to_owned)).await?)
    }

    /// Sets `key` to `value`; returns the committed change (with the store's new rev).
    pub async fn set(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        key: Key,
        value: Value,
        condition: Condition,
    ) -> Result<Change> {
        self.authorize(who, store, true).await?;
        if value.len() > self.limits.max_value_bytes {
            return Err(Error::new(
                Reason::ValueTooLarge,
                format!("the value is {} bytes; the limit is {} bytes", value.len(), self.limits.max_value_bytes),
            )
            .with_data(serde_json::json!({ "size": value.len(), "limit": self.limits.max_value_bytes })));
        }
        self.write(who, transport, store, key, KvAction::Set(value), condition).await
    }

    /// Deletes `key`; returns the committed change (with the store's new rev).
    pub async fn delete(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        key: Key,
        condition: Condition,
    ) -> Result<Change> {
        self.authorize(who, store, true).await?;
        self.write(who, transport, store, key, KvAction::Delete, condition).await
    }

    async fn write(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        key: Key,
        action: KvAction,
        condition: Condition,
    ) -> Result<Change> {
        let op = if matches!(action, KvAction::Set(_)) { "set" } else { "delete" };
        let write =
            KvWrite { store, key, action, condition, max_keys: self.limits.max_keys_per_store, origin: who.origin() };
        let result = self.store.write(write).await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        metrics::counter!("ddp_writes_total", "transport" => transport.as_str(), "op" => op, "outcome" => outcome)
            .increment(1);
        Ok(result?)
    }
}
