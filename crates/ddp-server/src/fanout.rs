//! Where committed changes go. The store calls [`Fanout`] with every committed batch, in commit
//! order, once it is durable: the embedded store before any writer is answered, the PostgreSQL
//! store as soon as this node's change feed reads it (whichever node committed it).
//!
//! - key-value changes go to the [`Hub`], which hands them to live sessions, and become system
//!   events on the [`EventBus`];
//! - events raised on any node (device events, presence) go to this node's [`EventBus`];
//! - admin changes clear the authentication cache and end the sessions they invalidate: a rotated
//!   key's sessions, a deleted device's sessions, a revoked project key's sessions, and project-key
//!   watchers whose view of a device may have changed (they may reconnect and be re-checked).

use std::sync::Arc;

use ddp_store::{AdminChange, CommitSink, Committed, StoreRef};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::{AuthCache, Principal};
use crate::events::EventBus;
use crate::hub::{CloseReason, Hub};

/// The server's [`CommitSink`].
pub struct Fanout {
    auth_cache: Arc<AuthCache>,
    hub: Arc<Hub>,
    events: std::sync::OnceLock<Arc<EventBus>>,
}

impl Fanout {
    /// A fan-out to `hub` that keeps `auth_cache` true to admin changes.
    pub fn new(auth_cache: Arc<AuthCache>, hub: Arc<Hub>) -> Fanout {
        Fanout { auth_cache, hub, events: std::sync::OnceLock::new() }
    }

    /// Connects the event bus (it reads the store, so it exists only after the store is open).
    pub fn set_events(&self, events: Arc<EventBus>) {
        let _ = self.events.set(events);
    }

    fn admin(&self, change: &AdminChange) {
        let is_scoped_project = |p: &Principal| matches!(p, Principal::Project(k) if k.homes.is_some());
        match *change {
            AdminChange::DeviceKeyRotated(d) => self.hub.close_device_key(d, CloseReason::KeyRotated),
            AdminChange::DeviceDeleted(d) => {
                self.hub.close_store(StoreRef::Device(d), |_| true, CloseReason::DeviceDeleted)
            }
            AdminChange::ApiKeyDeleted(k) => {
                self.hub.close_project_key(k, CloseReason::KeyRevoked);
                if let Some(events) = self.events.get() {
                    events.close_project_key(k);
                }
            }
            AdminChange::DeviceMoved { device, to, .. } => self.hub.close_store(
                StoreRef::Device(device),
                |p| is_scoped_project(p) && !to.is_some_and(|h| p.sees_home(h)),
                CloseReason::AccessChanged,
            ),
            AdminChange::HomeDeleted(_) => self.hub.close_where(is_scoped_project, CloseReason::AccessChanged),
        }
    }
}

impl CommitSink for Fanout {
    fn committed(&self, batch: &[Committed]) {
        let mut admin_changed = false;
        for item in batch {
            match item {
                Committed::Kv(change) => {
                    self.hub.publish(change);
                    if let Some(events) = self.events.get() {
                        events.change(change);
                    }
                }
                Committed::Admin(change) => {
                    if !admin_changed {
                        self.auth_cache.invalidate();
                        admin_changed = true;
                    }
                    self.admin(change);
                }
                Committed::Event { home, json } => {
                    if let Some(events) = self.events.get() {
                        events.publish(*home, || Utf8Bytes::from(&**json));
                    }
                }
            }
        }
    }
}
