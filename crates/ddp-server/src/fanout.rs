//! Where committed changes go. The store calls [`Fanout`] with every committed batch, in commit
//! order, once it is durable: the embedded store before any writer is answered, the PostgreSQL
//! store as soon as this node's change feed reads it (whichever node committed it).
//!
//! - key-value changes go to the [`Hub`], which hands them to live sessions, and become system
//!   events on the [`EventBus`];
//! - events raised on any node (device events, presence) go to this node's [`EventBus`], and
//!   commands sent through any node to the device's sessions here ([`Sessions::command`]);
//! - sync progress announced by any node, and every device store's changes, go to the delivery
//!   tracker ([`Tracker`]), which wakes the writers waiting for a device;
//! - admin changes clear the authentication cache and end, through the session registry
//!   ([`Sessions`]), every session they invalidate — a rotated key's, a deleted device's (its own
//!   and those watching it), a revoked project key's, and scoped project keys' sessions whose
//!   view changed (they may reconnect and are checked again) — whatever transport they use and
//!   whatever they have subscribed to.

use std::sync::{Arc, OnceLock};

use ddp_store::{AdminChange, CommitSink, Committed};

use crate::auth::AuthCache;
use crate::events::EventBus;
use crate::hub::Hub;
use crate::json::Json;
use crate::progress::Tracker;
use crate::sessions::Sessions;

/// What reads the store, so exists only after it is open; nothing can be live before then.
pub(crate) struct AfterOpen {
    /// Home events.
    pub(crate) events: Arc<EventBus>,
    /// The session registry.
    pub(crate) sessions: Arc<Sessions>,
    /// Delivery and acknowledgement.
    pub(crate) progress: Arc<Tracker>,
}

/// The server's [`CommitSink`].
pub(crate) struct Fanout {
    auth_cache: Arc<AuthCache>,
    hub: Arc<Hub>,
    after_open: OnceLock<AfterOpen>,
}

impl Fanout {
    /// A fan-out to `hub` that keeps `auth_cache` true to admin changes.
    pub(crate) fn new(auth_cache: Arc<AuthCache>, hub: Arc<Hub>) -> Fanout {
        Fanout { auth_cache, hub, after_open: OnceLock::new() }
    }

    /// Connects the event bus, the session registry and the delivery tracker.
    pub(crate) fn connect(&self, live: AfterOpen) {
        let _ = self.after_open.set(live);
    }

    fn admin(live: &AfterOpen, change: &AdminChange) {
        match *change {
            AdminChange::DeviceKeyRotated(d) => live.sessions.key_rotated(d),
            AdminChange::DeviceDeleted(d) => {
                live.sessions.device_deleted(d);
                live.progress.device_deleted(d);
            }
            AdminChange::ApiKeyDeleted(k) => live.sessions.key_revoked(k),
            AdminChange::DeviceMoved { device, to, .. } => {
                live.sessions.device_moved(device, to);
                live.progress.device_moved(device, to);
            }
            AdminChange::HomeDeleted(h) => live.sessions.home_deleted(h),
        }
    }
}

impl CommitSink for Fanout {
    fn committed(&self, batch: &[Committed]) {
        let after_open = self.after_open.get();
        let mut admin_changed = false;
        for item in batch {
            match item {
                Committed::Kv(change) => {
                    self.hub.publish(change);
                    if let Some(live) = after_open {
                        live.events.change(change);
                        live.progress.committed(change);
                    }
                }
                Committed::Admin(change) => {
                    // First the cache (so no new lookup finds the old key), then the sessions.
                    if !admin_changed {
                        self.auth_cache.invalidate();
                        admin_changed = true;
                    }
                    if let Some(live) = after_open {
                        Fanout::admin(live, change);
                    }
                }
                Committed::Event { home, json } => {
                    if let Some(live) = after_open {
                        live.events.publish(*home, || Ok(Json::from_shared(json.clone())));
                    }
                }
                Committed::Command { device, json } => {
                    if let Some(live) = after_open {
                        live.sessions.command(*device, &Json::from_shared(json.clone()));
                    }
                }
                Committed::Sync(progress) => {
                    if let Some(live) = after_open {
                        live.progress.announced(progress);
                    }
                }
            }
        }
    }
}
