//! Live sync sessions, whatever their transport: the per-device cap, `isConnected`, and the
//! device's `lastConnectTime` / `lastDisconnectTime`.
//!
//! A transport takes a [`SessionTicket`] before it accepts a session and drops it when the
//! session ends. Only sessions held by a device's own key count as the device being connected
//! (and against its cap); apps watching a device do not. When a device's first session opens or
//! its last closes, one background worker — in order — records the time and raises
//! `_deviceConnected_` / `_deviceDisconnected_`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ddp_protocol::{DeviceId, Reason, Timestamp};
use ddp_store::Store;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::kv::Transport;

/// A device's first session opened (`true`) or its last closed, at a time.
type Presence = (DeviceId, bool, Timestamp);

/// The registry of live sessions.
pub struct Sessions {
    max_per_device: usize,
    per_device: Mutex<HashMap<DeviceId, usize>>,
    live: watch::Sender<usize>,
    presence: Mutex<Option<mpsc::UnboundedSender<Presence>>>,
    background: TaskTracker,
}

impl Sessions {
    /// A registry allowing `max_per_device` sessions per device key, recording connection times
    /// in `store` and raising presence events on `events`. Must be called inside the runtime.
    pub fn new(store: Arc<dyn Store>, events: Arc<EventBus>, max_per_device: usize) -> Sessions {
        let (tx, mut rx) = mpsc::unbounded_channel::<Presence>();
        let background = TaskTracker::new();
        background.spawn(async move {
            while let Some((device, connected, at)) = rx.recv().await {
                if let Err(e) = store.record_connection(device, connected, at).await {
                    tracing::debug!(%device, error = %e, "connection time not recorded");
                }
                events.presence(device, connected, at).await;
            }
        });
        Sessions {
            max_per_device: max_per_device.max(1),
            per_device: Mutex::new(HashMap::new()),
            live: watch::Sender::new(0),
            presence: Mutex::new(Some(tx)),
            background,
        }
    }

    /// Admits a session of `principal` on a device's store, or refuses it with
    /// `429 TOO_MANY_CONNECTIONS` when the device already has its maximum.
    pub fn open(self: &Arc<Self>, principal: &Principal, transport: Transport) -> Result<SessionTicket> {
        let device = match principal {
            Principal::Device(d) => Some(*d),
            _ => None,
        };
        if let Some(d) = device {
            let first = {
                let mut per_device =
                    self.per_device.lock().map_err(|_| Error::internal("session registry poisoned"))?;
                let n = per_device.entry(d).or_insert(0);
                if *n >= self.max_per_device {
                    return Err(Error::new(
                        Reason::TooManyConnections,
                        format!("device {d} already has {} live sessions, the maximum", self.max_per_device),
                    )
                    .with_data(serde_json::json!({ "limit": self.max_per_device })));
                }
                *n += 1;
                *n == 1
            };
            if first {
                self.record(d, true);
            }
        }
        self.live.send_modify(|n| *n += 1);
        metrics::gauge!("ddp_sessions", "transport" => transport.as_str()).increment(1.0);
        Ok(SessionTicket { sessions: self.clone(), device, transport })
    }

    /// Whether `device` has a live session on this node.
    pub fn is_connected(&self, device: DeviceId) -> bool {
        self.per_device.lock().map(|m| m.contains_key(&device)).unwrap_or(false)
    }

    /// Live sessions on this node.
    pub fn live(&self) -> usize {
        *self.live.borrow()
    }

    /// Waits until every session has ended and every connection time is recorded.
    pub async fn drained(&self) {
        let mut rx = self.live.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
        if let Ok(mut presence) = self.presence.lock() {
            presence.take(); // the worker finishes what is queued, then stops
        }
        self.background.close();
        self.background.wait().await;
    }

    fn record(&self, device: DeviceId, connected: bool) {
        if let Ok(presence) = self.presence.lock()
            && let Some(tx) = presence.as_ref()
        {
            let _ = tx.send((device, connected, Timestamp::now()));
        }
    }

    fn close(&self, device: Option<DeviceId>, transport: Transport) {
        if let Some(d) = device {
            let last = match self.per_device.lock() {
                Ok(mut per_device) => match per_device.get_mut(&d) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    Some(_) => {
                        per_device.remove(&d);
                        true
                    }
                    None => false,
                },
                Err(_) => false,
            };
            if last {
                self.record(d, false);
            }
        }
        metrics::gauge!("ddp_sessions", "transport" => transport.as_str()).decrement(1.0);
        self.live.send_modify(|n| *n = n.saturating_sub(1));
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
        self.sessions.close(self.device, self.transport);
    }
}
