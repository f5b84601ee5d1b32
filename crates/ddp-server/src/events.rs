//! Home events (PROTOCOL.md §6): what apps hear on `GET /events/websocket`.
//!
//! - **System events** are raised from the commit feed ([`Fanout`](crate::fanout::Fanout)) after a
//!   change is durable, to the home recorded on the change at commit — the device's home at that
//!   moment — so a moved device's events go to its new home at once: `_deviceKVSaved_`,
//!   `_deviceKVDeleted_`, `_keyValueSaved_`, `_keyValueDeleted_`. `_deviceConnected_` and
//!   `_deviceDisconnected_` come from the session registry when a device's first session opens and
//!   its last closes. `_deviceKVApplied_` comes from the delivery tracker
//!   ([`Tracker`](crate::progress::Tracker)) when a device's acknowledged rev advances, at most
//!   once a second per device.
//! - **Device events** are raised by devices (`PUT /devices/{id}/event`, MQTT
//!   `/devices/{id}/event`) through one path, [`EventBus::raise`]; reserved types (`_…_`) are
//!   refused.
//! - **Raised events** (device events, presence) go through [`Store::broadcast_event`] so that
//!   every node's listeners hear them; they come back through the fan-out like changes do.
//! - **Delivery** is in memory: events are not stored. Each listener has a bounded mailbox;
//!   publishing never waits, and a listener that falls too far behind is closed (4009) rather than
//!   slowing anyone down. Per home, listeners get events in the order they were raised.
//! - Who may listen to which homes, and ending a stream whose key is revoked, are the gate's and
//!   the session registry's ([`Kv::open_events`](crate::kv::Kv::open_events)).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Reason, Rev, Timestamp, Value};
use ddp_store::{Change, Origin, Store, StoreRef};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::Notify;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::json::Json;
use crate::locks;

/// An event, serialized once for every listener of its home.
#[derive(Debug)]
pub(crate) struct EventFrame {
    /// The envelope's JSON.
    pub(crate) json: Json,
}

/// What a listener gets.
#[derive(Debug)]
pub(crate) enum EventDelivery {
    /// Events in the order they were raised.
    Events(VecDeque<Arc<EventFrame>>),
    /// The listener fell too far behind and was dropped: events are not stored, so it must
    /// reconnect and re-read the stores.
    TooSlow,
}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<Arc<EventFrame>>,
    too_slow: bool,
}

/// One app's event stream.
pub(crate) struct Listener {
    id: u64,
    homes: Option<Vec<HomeId>>,
    mailbox: Mutex<Mailbox>,
    wake: Notify,
}

impl Listener {
    /// The next delivery. Cancel-safe.
    pub(crate) async fn recv(&self) -> EventDelivery {
        loop {
            {
                let mut m = locks::recover(&self.mailbox);
                if m.too_slow {
                    return EventDelivery::TooSlow;
                }
                if !m.queue.is_empty() {
                    return EventDelivery::Events(std::mem::take(&mut m.queue));
                }
            }
            self.wake.notified().await;
        }
    }

    fn deliver(&self, frame: &Arc<EventFrame>, limit: usize) {
        let mut m = locks::recover(&self.mailbox);
        if m.too_slow {
            return;
        }
        if m.queue.len() >= limit {
            m.too_slow = true;
            m.queue.clear();
            metrics::counter!("ddp_event_listeners_dropped_total").increment(1);
        } else {
            m.queue.push_back(frame.clone());
        }
        drop(m);
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct Listeners {
    all_homes: Vec<Arc<Listener>>,
    by_home: HashMap<HomeId, Vec<Arc<Listener>>>,
}

/// The event bus. See the [module docs](self).
pub(crate) struct EventBus {
    listeners: Mutex<Listeners>,
    next_id: AtomicU64,
    mailbox_limit: usize,
    store: Arc<dyn Store>,
}

/// The envelope of every event.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a, D: Serialize> {
    home_id: HomeId,
    timestamp: Timestamp,
    event_type: &'a str,
    event_data: D,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_device_id: Option<DeviceId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_project_key_id: Option<ApiKeyId>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KvData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<DeviceId>,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a Value>,
    rev: Rev,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceData {
    device_id: DeviceId,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AppliedData {
    device_id: DeviceId,
    applied_rev: Rev,
}

fn envelope<D: Serialize>(home: HomeId, at: Timestamp, event_type: &str, data: D, origin: Origin) -> Result<String> {
    let (origin_device_id, origin_project_key_id) = match origin {
        Origin::Admin => (None, None),
        Origin::Device(d) => (Some(d), None),
        Origin::ProjectKey(k) => (None, Some(k)),
    };
    let env = Envelope {
        home_id: home,
        timestamp: at,
        event_type,
        event_data: data,
        origin_device_id,
        origin_project_key_id,
    };
    serde_json::to_string(&env).map_err(Error::internal)
}

/// Longest event type, in characters.
const MAX_EVENT_TYPE: usize = 255;

impl EventBus {
    /// A bus whose listeners may fall `mailbox_limit` events behind; device homes are read from
    /// `store`.
    pub(crate) fn new(store: Arc<dyn Store>, mailbox_limit: usize) -> EventBus {
        EventBus { listeners: Mutex::default(), next_id: AtomicU64::new(1), mailbox_limit: mailbox_limit.max(1), store }
    }

    /// Starts a stream of `homes` (`None`: every home). The gate has checked that its holder
    /// may see them.
    pub(crate) fn listen(self: &Arc<Self>, homes: Option<Vec<HomeId>>) -> Result<ListenerGuard> {
        let listener = Arc::new(Listener {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            homes: homes.clone(),
            mailbox: Mutex::default(),
            wake: Notify::new(),
        });
        {
            let mut l = locks::grant(&self.listeners)?;
            match &homes {
                None => l.all_homes.push(listener.clone()),
                Some(homes) => {
                    for h in homes {
                        l.by_home.entry(*h).or_default().push(listener.clone());
                    }
                }
            }
        }
        metrics::gauge!("ddp_event_listeners").increment(1.0);
        Ok(ListenerGuard { bus: self.clone(), listener })
    }

    fn unlisten(&self, listener: &Listener) {
        {
            let mut l = locks::recover(&self.listeners);
            match &listener.homes {
                None => l.all_homes.retain(|x| x.id != listener.id),
                Some(homes) => {
                    for h in homes {
                        if let Some(v) = l.by_home.get_mut(h) {
                            v.retain(|x| x.id != listener.id);
                            if v.is_empty() {
                                l.by_home.remove(h);
                            }
                        }
                    }
                }
            }
        }
        metrics::gauge!("ddp_event_listeners").decrement(1.0);
    }

    /// Hands an event to every listener of `home`; `make` builds it only if someone listens.
    /// An event whose envelope cannot be serialized is logged and dropped (events are not
    /// stored; listeners re-read the stores).
    pub(crate) fn publish(&self, home: HomeId, make: impl FnOnce() -> Result<Json>) {
        let targets: Vec<Arc<Listener>> = {
            let l = locks::recover(&self.listeners);
            l.all_homes.iter().chain(l.by_home.get(&home).into_iter().flatten()).cloned().collect()
        };
        metrics::counter!("ddp_events_total").increment(1);
        if targets.is_empty() {
            return;
        }
        let Ok(json) = make() else { return };
        let frame = Arc::new(EventFrame { json });
        for listener in &targets {
            listener.deliver(&frame, self.mailbox_limit);
        }
    }

    /// The system event of a committed key-value change (none for a device in no home).
    pub(crate) fn change(&self, change: &Change) {
        let Some(home) = change.home else { return };
        let (device_id, saved, deleted) = match change.store {
            StoreRef::Device(d) => (Some(d), "_deviceKVSaved_", "_deviceKVDeleted_"),
            StoreRef::Home(_) => (None, "_keyValueSaved_", "_keyValueDeleted_"),
        };
        let event_type = if change.value.is_some() { saved } else { deleted };
        self.publish(home, || {
            let data = KvData { device_id, key: change.key.as_str(), value: change.value.as_ref(), rev: change.rev };
            envelope(home, change.time, event_type, data, change.origin).map(Json::from_serialized)
        });
    }

    /// `_deviceConnected_` / `_deviceDisconnected_` of a device in `home` (none for a device in
    /// no home), on every node.
    pub(crate) async fn presence(&self, home: Option<HomeId>, device: DeviceId, connected: bool, at: Timestamp) {
        let Some(home) = home else { return };
        let event_type = if connected { "_deviceConnected_" } else { "_deviceDisconnected_" };
        let Ok(json) = envelope(home, at, event_type, DeviceData { device_id: device }, Origin::Device(device)) else {
            return;
        };
        if let Err(e) = self.store.broadcast_event(home, json).await {
            tracing::warn!(%device, event_type, error = %e, "presence event lost");
        }
    }

    /// `_deviceKVApplied_` (PROTOCOL.md §10): `device`, in `home`, has applied its store up to
    /// `rev` (acknowledged `at`); on every node.
    pub(crate) async fn applied(&self, home: HomeId, device: DeviceId, rev: Rev, at: Timestamp) {
        let data = AppliedData { device_id: device, applied_rev: rev };
        let Ok(json) = envelope(home, at, "_deviceKVApplied_", data, Origin::Device(device)) else { return };
        if let Err(e) = self.store.broadcast_event(home, json).await {
            tracing::warn!(%device, error = %e, "_deviceKVApplied_ event lost");
        }
    }

    /// A device event (`{"eventType","eventData"}`), raised by or for `device` — the one path
    /// for every transport, reached through the gate. A device in no home raises nothing.
    pub(crate) async fn raise(&self, who: &Principal, device: DeviceId, body: &[u8]) -> Result<()> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            event_type: Option<String>,
            #[serde(borrow)]
            event_data: Option<&'a RawValue>,
        }
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Error::invalid_json("an event is a JSON object {\"eventType\", \"eventData\"}"));
        }
        let parsed: Body<'_> = serde_json::from_slice(body)
            .map_err(|e| Error::invalid_json(format!("an event is {{\"eventType\", \"eventData\"}}: {e}")))?;
        let event_type = parsed.event_type.ok_or_else(|| Error::invalid_parameter("eventType is required"))?;
        if event_type.trim().is_empty() || event_type.chars().count() > MAX_EVENT_TYPE {
            return Err(Error::invalid_parameter(format!("eventType must be 1–{MAX_EVENT_TYPE} characters")));
        }
        if event_type.len() >= 2 && event_type.starts_with('_') && event_type.ends_with('_') {
            return Err(Error::invalid_parameter(format!(
                "{event_type:?} is reserved: types that start and end with _ are the server's"
            )));
        }
        let data = match parsed.event_data {
            None => None,
            Some(raw) => match Value::from_raw(raw) {
                Ok(v) if v.as_json().starts_with('{') => Some(v),
                Ok(_) | Err(ddp_protocol::ValueError::Null) => {
                    return Err(Error::invalid_parameter("eventData must be a JSON object"));
                }
                Err(e) => return Err(Error::new(Reason::InvalidValue, format!("eventData: {e}"))),
            },
        };
        let home = self.store.device(device).await?.home;
        let Some(home) = home else { return Ok(()) };
        let origin = who.origin();
        let json = match &data {
            Some(v) => envelope(home, Timestamp::now(), &event_type, v, origin)?,
            None => envelope(home, Timestamp::now(), &event_type, serde_json::json!({}), origin)?,
        };
        // Through the store, so the listeners of every node hear it.
        self.store.broadcast_event(home, json).await?;
        Ok(())
    }
}

/// A live event stream; stops when dropped.
pub(crate) struct ListenerGuard {
    bus: Arc<EventBus>,
    listener: Arc<Listener>,
}

impl std::ops::Deref for ListenerGuard {
    type Target = Listener;
    fn deref(&self) -> &Listener {
        &self.listener
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.bus.unlisten(&self.listener);
    }
}
