//! Live sync sessions, whatever their transport: the per-device cap, `isConnected`, and the
//! device's `lastConnectTime` / `lastDisconnectTime` — counted by the store, so over every node.
//!
//! A transport takes a [`SessionTicket`] before it accepts a session and drops it when the
//! session ends. Only sessions held by a device's own key count as the device being connected
//! (and against its cap); apps watching a device do not.
//!
//! Opening asks the store ([`Store::session_opened`]) and, for a device's first session, raises
//! `_deviceConnected_` before the session starts. Closing runs in the background
//! ([`Store::session_closed`], then `_deviceDisconnected_` for the last one). A device opening a
//! session waits until its own earlier closes are recorded, so a quick reconnect is never refused
//! for a session that is already gone, and its events come in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ddp_protocol::{DeviceId, Reason, Timestamp};
use ddp_store::{SessionClosed, SessionOpened, Store};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::kv::Transport;

/// A device's closes in progress.
struct Closing {
    pending: usize,
    done: Arc<Notify>,
}

/// The registry of live sessions.
pub struct Sessions {
    store: Arc<dyn Store>,
    events: Arc<EventBus>,
    max_per_device: usize,
    live: watch::Sender<usize>,
    /// Closes handed to the background and not yet recorded, per device, with what wakes the
    /// device's next open when they are.
    closing: Mutex<HashMap<DeviceId, Closing>>,
    background: TaskTracker,
}

impl Sessions {
    /// A registry allowing `max_per_device` sessions per device key, counted in `store`, raising
    /// presence events on `events`.
    pub fn new(store: Arc<dyn Store>, events: Arc<EventBus>, max_per_device: usize) -> Sessions {
        Sessions {
            store,
            events,
            max_per_device: max_per_device.max(1),
            live: watch::Sender::new(0),
            closing: Mutex::new(HashMap::new()),
            background: TaskTracker::new(),
        }
    }

    /// Admits a session of `principal`, or refuses it with `429 TOO_MANY_CONNECTIONS` when its
    /// device already holds its maximum on all nodes.
    pub async fn open(self: &Arc<Self>, principal: &Principal, transport: Transport) -> Result<SessionTicket> {
        let device = match principal {
            Principal::Device(d) => Some(*d),
            _ => None,
        };
        if let Some(d) = device {
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
                    sessions.close(Some(d), None);
                }
            });
            match answer.await.map_err(|_| Error::unavailable("the session registry stopped"))? {
                Ok(SessionOpened::Opened { .. }) => {}
                Ok(SessionOpened::Refused) => {
                    return Err(Error::new(
                        Reason::TooManyConnections,
                        format!("device {d} already has {} live sessions, the maximum", self.max_per_device),
                    )
                    .with_data(serde_json::json!({ "limit": self.max_per_device })));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.live.send_modify(|n| *n += 1);
        metrics::gauge!("ddp_sessions", "transport" => transport.as_str()).increment(1.0);
        Ok(SessionTicket { sessions: self.clone(), device, transport })
    }

    /// Live sessions on this node.
    pub fn live(&self) -> usize {
        *self.live.borrow()
    }

    /// Waits until every session on this node has ended and every close is recorded.
    pub async fn drained(&self) {
        let mut rx = self.live.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        self.background.close();
        self.background.wait().await;
    }

    /// Waits until the device's closes in progress are recorded. Only this device's opens are
    /// woken when they are (a storm of reconnects must not wake every waiter on every close).
    async fn wait_for_closes(&self, device: DeviceId) {
        let pending = || self.closing.lock().ok().and_then(|c| c.get(&device).map(|c| c.done.clone()));
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

    /// Ends a session: a device's is recorded in the background.
    fn close(self: &Arc<Self>, device: Option<DeviceId>, transport: Option<Transport>) {
        if let Some(d) = device {
            if let Ok(mut closing) = self.closing.lock() {
                closing.entry(d).or_insert_with(|| Closing { pending: 0, done: Arc::new(Notify::new()) }).pending += 1;
            }
            let at = Timestamp::now();
            let sessions = self.clone();
            self.background.spawn(async move {
                match sessions.store.session_closed(d, at).await {
                    Ok(SessionClosed::Last { home }) => sessions.events.presence(home, d, false, at).await,
                    Ok(SessionClosed::Others) => {}
                    Err(e) => tracing::warn!(device = %d, error = %e, "session close not recorded"),
                }
                if let Ok(mut closing) = sessions.closing.lock()
                    && let Some(c) = closing.get_mut(&d)
                {
                    c.pending -= 1;
                    if c.pending == 0
                        && let Some(c) = closing.remove(&d)
                    {
                        c.done.notify_waiters();
                    }
                }
            });
        }
        if let Some(transport) = transport {
            metrics::gauge!("ddp_sessions", "transport" => transport.as_str()).decrement(1.0);
            self.live.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

/// A live session's place in the registry; dropping it ends the session there.
pub struct SessionTicket {
    sessions: Arc<Sessions>,
    device: Option<DeviceId>,
    transport: Transport,
}

impl Drop for SessionTicket {
    fn drop(&mut self) {
        self.sessions.close(self.device, Some(self.transport));
    }
}
