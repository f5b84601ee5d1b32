//! The gate: the one door every transport goes through, for every request and every session.
//!
//! Transports decode their wire into a call here and encode the answer; everything else happens
//! here, once, whatever the transport:
//!
//! - **authentication** of tokens and device keys ([`Kv::authenticate`]);
//! - **rate limits** ([`Kv::admit`]): every read, write, event and session open by a device or
//!   project key is counted the same way; a refusal is an [`Error`] with `retry_after`, which
//!   each transport maps to its wire (HTTP 429, an `error` frame, an MQTT reason code);
//! - **authorization** (PROTOCOL.md §1) of every read and write, and of every session before it
//!   exists: a watch or an event stream can only be had for a [`Session`] the gate opened, so no
//!   transport can forget to check;
//! - **validation and limits** (§3, §3.3), and the durable write (the store assigns the rev);
//! - **device frames** ([`Kv::device_frame`]): the `set`/`delete`/`ack` messages devices send
//!   over WebSocket and MQTT are parsed and dispatched here, for both;
//! - **delivery and acknowledgement** (PROTOCOL.md §10): a watch of a device's own session
//!   reports what it delivered, acks move what is applied, and writers may wait for either
//!   ([`Kv::await_progress`]); the bookkeeping is the [`Tracker`]'s;
//! - **sessions**, registered with [`Sessions`] so that a revocation ends them.
//!
//! Fan-out to live sessions and events does not happen here: the store hands every commit to the
//! [`Fanout`](crate::fanout::Fanout) in commit order, whoever wrote it.

use std::sync::Arc;

use ddp_protocol::batch::{Op, OpKind};
use ddp_protocol::sync::DeviceRequest;
use ddp_protocol::{DeviceId, HomeId, JobId, Key, Reason, Rev, Value};
use ddp_store::{
    Change, Condition, DeviceSync, ItemRecord, KvAction, KvBatch, KvOp, Snapshot, Store, StoreError, StoreRef,
};

use crate::auth::{Authenticated, Authenticator, Principal};
use crate::config::{Limits, RateLimits};
use crate::error::{Error, Result};
use crate::events::{EventBus, ListenerGuard};
use crate::hub::Hub;
use crate::json::Json;
use crate::progress::{Awaited, Tracker};
use crate::ratelimit::RateLimiter;
use crate::sessions::{CloseReason, Purpose, Session, Sessions};
use crate::watch::Watch;

/// The transport a request came in on (for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// REST over HTTP.
    Rest,
    /// A WebSocket session (sync or events).
    WebSocket,
    /// An MQTT session.
    Mqtt,
    /// A fleet job (PROTOCOL.md §12).
    Job,
}

impl Transport {
    /// The label used in metrics.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Transport::Rest => "rest",
            Transport::WebSocket => "websocket",
            Transport::Mqtt => "mqtt",
            Transport::Job => "job",
        }
    }
}

/// Parses a key, answering `400 INVALID_KEY`.
pub(crate) fn parse_key(text: &str) -> Result<Key> {
    Key::new(text)
        .map_err(|e| Error::new(Reason::InvalidKey, e.to_string()).with_data(serde_json::json!({ "key": text })))
}

/// Longest command action, in characters.
const MAX_ACTION: usize = 255;

/// The JSON a command travels as: exactly `{"action","parameters"}`, `parameters` `{}` when
/// absent, its text kept as sent (numbers exact).
fn command_json(body: &[u8]) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        action: Option<String>,
        #[serde(borrow)]
        parameters: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(serde::Serialize)]
    struct Command<'a> {
        action: &'a str,
        parameters: &'a Value,
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::invalid_json("a command is a JSON object {\"action\", \"parameters\"?}"));
    }
    let parsed: Body<'_> = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_json(format!("a command is {{\"action\", \"parameters\"?}}: {e}")))?;
    let action = parsed.action.ok_or_else(|| Error::invalid_parameter("action is required"))?;
    if action.is_empty() || action.chars().count() > MAX_ACTION {
        return Err(Error::invalid_parameter(format!("action must be 1–{MAX_ACTION} characters")));
    }
    let parameters = match parsed.parameters {
        None => Value::empty_object(),
        Some(raw) => match Value::from_raw(raw) {
            Ok(v) if v.as_json().starts_with('{') => v,
            Err(ddp_protocol::ValueError::Null) => Value::empty_object(),
            Ok(_) => return Err(Error::invalid_parameter("parameters must be a JSON object")),
            Err(e) => return Err(Error::new(Reason::InvalidValue, format!("parameters: {e}"))),
        },
    };
    serde_json::to_string(&Command { action: &action, parameters: &parameters }).map_err(Error::internal)
}

/// A device frame that was not applied: why, and the key it named (for the `error` frame).
#[derive(Debug)]
pub(crate) struct Refused {
    /// Why.
    pub(crate) error: Error,
    /// The key the frame named, if it named one.
    pub(crate) key: Option<String>,
    /// For a `batch` frame, the op at fault.
    pub(crate) index: Option<usize>,
}

impl Refused {
    fn new(error: Error, key: Option<String>) -> Refused {
        Refused { error, key, index: None }
    }
}

/// A batch op of the wire as the store takes it: `ifRev` 0 means absent.
pub(crate) fn kv_op(op: Op) -> KvOp {
    let condition = match op.if_rev {
        None => Condition::None,
        Some(Rev::ZERO) => Condition::Absent,
        Some(rev) => Condition::RevIn(vec![rev]),
    };
    let action = match op.kind {
        OpKind::Set(v) => KvAction::Set(v),
        OpKind::Delete => KvAction::Delete,
        OpKind::Merge(patch) => KvAction::Merge(patch),
    };
    KvOp { key: op.key, action, condition }
}

/// Why a write failed, and the op at fault when one is.
type Failed = (Option<usize>, Error);

/// A batch's error: `data.index` names the op at fault.
fn indexed((index, error): Failed) -> Error {
    match index {
        Some(i) => error.at_op(i),
        None => error,
    }
}

/// The parts the gate guards.
pub(crate) struct KvParts {
    /// Storage.
    pub(crate) store: Arc<dyn Store>,
    /// Size and count limits.
    pub(crate) limits: Limits,
    /// Request rates.
    pub(crate) rate_limits: RateLimits,
    /// Tokens to principals.
    pub(crate) auth: Authenticator,
    /// Committed changes to live sessions.
    pub(crate) hub: Arc<Hub>,
    /// The session registry.
    pub(crate) sessions: Arc<Sessions>,
    /// Home events.
    pub(crate) events: Arc<EventBus>,
    /// Delivery and acknowledgement.
    pub(crate) progress: Arc<Tracker>,
}

/// The gate. See the [module docs](self).
pub(crate) struct Kv {
    store: Arc<dyn Store>,
    limits: Limits,
    auth: Authenticator,
    limiter: RateLimiter,
    hub: Arc<Hub>,
    sessions: Arc<Sessions>,
    events: Arc<EventBus>,
    progress: Arc<Tracker>,
}

impl Kv {
    /// The gate over `parts`.
    pub(crate) fn new(parts: KvParts) -> Kv {
        Kv {
            store: parts.store,
            limits: parts.limits,
            auth: parts.auth,
            limiter: RateLimiter::new(parts.rate_limits),
            hub: parts.hub,
            sessions: parts.sessions,
            events: parts.events,
            progress: parts.progress,
        }
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The session registry (for shutdown).
    pub(crate) fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The delivery tracker (its background task runs for the server's life).
    pub(crate) fn progress(&self) -> &Arc<Tracker> {
        &self.progress
    }

    // ---- who is calling ----

    /// The principal holding `token`, or 401.
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Authenticated> {
        self.auth.authenticate(token).await
    }

    /// Counts one request of `who` against its key's rate: `429 RATE_LIMIT_EXCEEDED` with
    /// `retry_after` beyond it. The admin key is never limited.
    pub(crate) fn admit(&self, who: &Principal) -> Result<()> {
        self.limiter.check(who)
    }

    /// Checks that `who` may read (or, with `write`, write) `store`.
    ///
    /// Devices get 403 for any store but their own, whether or not it exists, so they never
    /// learn which devices exist; so do scoped project keys for devices outside their homes,
    /// existing or not. Project keys see the homes in their scope and those homes' devices; an
    /// unscoped key sees every home and every device (and gets 404 for one that does not exist).
    async fn authorize(&self, who: &Principal, store: StoreRef, write: bool) -> Result<()> {
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
                let home = match self.store.device(d).await {
                    Ok(device) => device.home,
                    Err(StoreError::DeviceNotFound(_)) if k.homes.is_some() => None,
                    Err(e) => return Err(e.into()),
                };
                if k.homes.is_none() || home.is_some_and(|h| who.sees_home(h)) {
                    Ok(())
                } else {
                    Err(Error::denied(format!("{who} may not see device {d}")))
                }
            }
        }
    }

    // ---- requests ----

    /// One item.
    pub(crate) async fn get(&self, who: &Principal, store: StoreRef, key: Key) -> Result<ItemRecord> {
        self.admit(who)?;
        self.authorize(who, store, false).await?;
        Ok(self.store.get(store, key).await?)
    }

    /// The store's rev and items (those starting with `prefix`, when given).
    pub(crate) async fn snapshot(&self, who: &Principal, store: StoreRef, prefix: Option<&str>) -> Result<Snapshot> {
        self.admit(who)?;
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
    pub(crate) async fn set(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        key: Key,
        value: Value,
        condition: Condition,
    ) -> Result<Change> {
        self.admit(who)?;
        self.write_one(who, transport, store, KvOp { key, action: KvAction::Set(value), condition }).await
    }

    /// Deletes `key`; returns the committed change (with the store's new rev).
    pub(crate) async fn delete(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        key: Key,
        condition: Condition,
    ) -> Result<Change> {
        self.admit(who)?;
        self.write_one(who, transport, store, KvOp { key, action: KvAction::Delete, condition }).await
    }

    /// Merges `patch` (RFC 7396, an object) into `key`'s value (`PATCH …/kv/{key}`).
    pub(crate) async fn merge(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        key: Key,
        patch: Value,
        condition: Condition,
    ) -> Result<Change> {
        self.admit(who)?;
        patch.check_merge_patch().map_err(|e| Error::new(Reason::InvalidValue, e.to_string()))?;
        self.write_one(who, transport, store, KvOp { key, action: KvAction::Merge(patch), condition }).await
    }

    /// An atomic batch (PROTOCOL.md §11): every op or none, consecutive revs; `store_rev` is
    /// the `If-Match` on the whole store. A failing op's error names it in `data.index`.
    pub(crate) async fn batch(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        ops: Vec<Op>,
        store_rev: Option<Rev>,
    ) -> Result<Vec<Change>> {
        self.admit(who)?;
        self.write(who, transport, store, ops.into_iter().map(kv_op).collect(), store_rev, None).await.map_err(indexed)
    }

    /// A job's batch to one device: written with the job's creator's rights, once at most (the
    /// store records it as the job's in the same transaction).
    pub(crate) async fn job_batch(
        &self,
        who: &Principal,
        job: JobId,
        device: DeviceId,
        ops: Vec<Op>,
    ) -> Result<Vec<Change>> {
        let ops = ops.into_iter().map(kv_op).collect();
        self.write(who, Transport::Job, StoreRef::Device(device), ops, None, Some(job)).await.map_err(indexed)
    }

    /// A write of one op: a batch of one, its errors without an index.
    async fn write_one(&self, who: &Principal, transport: Transport, store: StoreRef, op: KvOp) -> Result<Change> {
        let mut changes = self.write(who, transport, store, vec![op], None, None).await.map_err(|(_, e)| e)?;
        changes.pop().ok_or_else(|| Error::internal("a write of one op committed no change"))
    }

    /// `413 PAYLOAD_TOO_LARGE` for a batch of more ops than `--max-batch-ops` (checked on every
    /// write, and when a job is created, before it writes anything).
    pub(crate) fn check_batch_len(&self, ops: usize) -> Result<()> {
        let max_ops = self.limits.max_batch_ops;
        if ops > max_ops {
            return Err(Error::new(
                Reason::PayloadTooLarge,
                format!("a batch holds at most {max_ops} ops; this one has {ops}"),
            )
            .with_data(serde_json::json!({ "limit": max_ops, "ops": ops })));
        }
        Ok(())
    }

    /// The one write path: authorize, check the limits, write durably.
    async fn write(
        &self,
        who: &Principal,
        transport: Transport,
        store: StoreRef,
        ops: Vec<KvOp>,
        store_rev: Option<Rev>,
        job: Option<JobId>,
    ) -> std::result::Result<Vec<Change>, Failed> {
        self.authorize(who, store, true).await.map_err(|e| (None, e))?;
        self.check_batch_len(ops.len()).map_err(|e| (None, e))?;
        let max_value = self.limits.max_value_bytes;
        for (i, op) in ops.iter().enumerate() {
            if let KvAction::Set(value) = &op.action
                && value.len() > max_value
            {
                return Err((
                    Some(i),
                    Error::new(
                        Reason::ValueTooLarge,
                        format!("the value is {} bytes; the limit is {max_value} bytes", value.len()),
                    )
                    .with_data(serde_json::json!({ "size": value.len(), "limit": max_value })),
                ));
            }
        }
        let labels: Vec<&'static str> = ops
            .iter()
            .map(|op| match op.action {
                KvAction::Set(_) => "set",
                KvAction::Delete => "delete",
                KvAction::Merge(_) => "merge",
            })
            .collect();
        let batch = KvBatch {
            store,
            ops,
            store_rev,
            max_keys: self.limits.max_keys_per_store,
            max_value_bytes: max_value,
            origin: who.origin(),
            job,
        };
        let result = self.store.write_batch(batch).await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        for op in labels {
            metrics::counter!("ddp_writes_total", "transport" => transport.as_str(), "op" => op, "outcome" => outcome)
                .increment(1);
        }
        result.map_err(|e| {
            let (index, e) = e.split_op();
            (index, Error::from(e))
        })
    }

    /// Raises a device event (`{"eventType","eventData"}`) for `device`: by the device itself,
    /// the admin, or a read-write project key that may see the device.
    pub(crate) async fn raise_event(&self, who: &Principal, device: DeviceId, body: &[u8]) -> Result<()> {
        self.admit(who)?;
        self.authorize(who, StoreRef::Device(device), true).await?;
        self.events.raise(who, device, body).await
    }

    /// Sends a command (`{"action","parameters"?}`, PROTOCOL.md §8) to every live session of
    /// `device` that listens for commands, on every node: the admin, or a read-write project key
    /// that may see the device. Not stored: a device with no live session is `409 DEVICE_OFFLINE`.
    pub(crate) async fn send_command(&self, who: &Principal, device: DeviceId, body: &[u8]) -> Result<()> {
        self.admit(who)?;
        if matches!(who, Principal::Device(_)) {
            return Err(Error::denied("commands are sent to devices by apps: use a project API key or the admin key"));
        }
        self.authorize(who, StoreRef::Device(device), true).await?;
        if who.is_admin() {
            self.store.device(device).await?;
        }
        let json = command_json(body)?;
        if self.store.connected(vec![device]).await?.is_empty() {
            return Err(Error::new(
                Reason::DeviceOffline,
                format!("device {device} has no live session: commands are not stored, so it would never get it"),
            ));
        }
        self.store.broadcast_command(device, json).await?;
        metrics::counter!("ddp_commands_sent_total").increment(1);
        Ok(())
    }

    // ---- sessions ----

    /// Opens a sync session of `auth` on `store` (WebSocket): it may watch the store and, with
    /// the right, write it; with `commands`, a device's own session also takes its commands.
    pub(crate) async fn open_sync(
        &self,
        auth: Authenticated,
        transport: Transport,
        store: StoreRef,
        commands: bool,
    ) -> Result<Session> {
        let own = matches!((&auth.principal, store), (Principal::Device(me), StoreRef::Device(d)) if *me == d);
        if commands && !own {
            return Err(Error::invalid_parameter(
                "commands=1 is for a device's own session: only it takes its commands",
            ));
        }
        let session = self.open(auth, Purpose::Sync(store), transport).await?;
        session.listen_for_commands(commands);
        Ok(session)
    }

    /// Opens a device's command socket (`GET /devices/{id}/command`): the device's own key only.
    pub(crate) async fn open_commands(&self, auth: Authenticated, device: DeviceId) -> Result<Session> {
        self.open(auth, Purpose::Commands(device), Transport::WebSocket).await
    }

    /// Opens a device's own connection (MQTT CONNECT): `key` must be `device`'s key.
    pub(crate) async fn open_device(&self, device: DeviceId, key: &str, transport: Transport) -> Result<Session> {
        let auth = self.auth.authenticate_device(device, key).await?;
        self.open(auth, Purpose::Device(device), transport).await
    }

    /// Opens an app's event stream of the `requested` homes (none: every home its key may see).
    pub(crate) async fn open_events(
        &self,
        auth: Authenticated,
        requested: Vec<HomeId>,
    ) -> Result<(Session, ListenerGuard)> {
        let homes = if requested.is_empty() { None } else { Some(requested) };
        let session = self.open(auth, Purpose::Events(homes), Transport::WebSocket).await?;
        let homes = match (session.purpose(), session.principal()) {
            (Purpose::Events(Some(homes)), _) => Some(homes.clone()),
            (_, Principal::Project(k)) => k.homes.clone(),
            _ => None,
        };
        let listener = self.events.listen(homes)?;
        Ok((session, listener))
    }

    /// Admits, authorizes and registers a session. When an admin change raced with the opening
    /// (it may have revoked the key or changed its view before the session was registered, so
    /// the registry could not end it), the key and the right are checked again: any change
    /// after registration reaches the session through the registry.
    async fn open(&self, auth: Authenticated, purpose: Purpose, transport: Transport) -> Result<Session> {
        self.admit(&auth.principal)?;
        self.authorize_session(&auth.principal, &purpose).await?;
        let session = self.sessions.open(auth.principal.clone(), purpose, transport).await?;
        if self.auth.may_have_changed(&auth) {
            let now = self.auth.again(&auth).await?;
            if now.principal != auth.principal {
                session.close(CloseReason::AccessChanged);
                return Err(Error::unavailable("the key changed while the session was opening; connect again"));
            }
            self.authorize_session(&now.principal, session.purpose()).await?;
        }
        Ok(session)
    }

    async fn authorize_session(&self, who: &Principal, purpose: &Purpose) -> Result<()> {
        match purpose {
            Purpose::Sync(store) => {
                self.authorize(who, *store, false).await?;
                if let (Principal::Admin, StoreRef::Device(d)) = (who, store) {
                    self.store.device(*d).await?; // 404 now, not a closed session later
                }
                Ok(())
            }
            Purpose::Device(d) => self.authorize(who, StoreRef::Device(*d), true).await,
            Purpose::Commands(d) => match who {
                Principal::Device(me) if me == d => Ok(()),
                _ => Err(Error::denied("a command socket is for the device's own key")),
            },
            Purpose::Events(homes) => {
                if matches!(who, Principal::Device(_)) {
                    return Err(Error::denied("event streams are for apps: use a project API key or the admin key"));
                }
                for h in homes.iter().flatten() {
                    if !who.sees_home(*h) {
                        return Err(Error::denied(format!("{who} may not see home {h}")));
                    }
                    self.store.home(*h).await?;
                }
                Ok(())
            }
        }
    }

    /// Starts the watch of a session's store: a `reload` (or, with `since` inside the history,
    /// a `resume` and the changes after it), then every change — with `batches`, each batch's
    /// changes as one `batch` message.
    pub(crate) async fn watch(
        &self,
        session: &Session,
        since: Option<Rev>,
        batches: bool,
    ) -> Result<(Watch, Vec<Json>)> {
        let Some(store) = session.purpose().store() else {
            return Err(Error::denied("this session watches no store"));
        };
        let progress = match (session.principal(), store) {
            (Principal::Device(me), StoreRef::Device(d)) if *me == d => Some(self.progress.attach(d)),
            _ => None,
        };
        Watch::start(self.store.clone(), &self.hub, store, since, progress, batches).await
    }

    /// Applies a frame a session sent (`{"action":"set"|"delete",…}`, PROTOCOL.md §4) to the
    /// session's store: counted, parsed, authorized and written like any write.
    pub(crate) async fn device_frame(&self, session: &Session, frame: &[u8]) -> std::result::Result<(), Refused> {
        let who = session.principal();
        // Parsed before it is counted, so that a refusal names the key; counted even when it
        // does not parse, so that garbage costs a client its rate like anything else.
        let parsed = DeviceRequest::parse(frame);
        let key = match &parsed {
            Ok(request) => request.key().map(|k| k.as_str().to_owned()),
            Err(e) => e.key.clone(),
        };
        self.admit(who).map_err(|error| Refused::new(error, key.clone()))?;
        let request =
            parsed.map_err(|e| Refused { error: Error::new(e.reason, e.message), key: e.key, index: e.index })?;
        let Some(store) = session.purpose().store() else {
            return Err(Refused::new(Error::denied("this session writes no store"), key));
        };
        let transport = session.transport();
        let op = |key, action| vec![KvOp { key, action, condition: Condition::None }];
        let (ops, batch) = match request {
            DeviceRequest::Set { key, value } => (op(key, KvAction::Set(value)), false),
            DeviceRequest::Delete { key } => (op(key, KvAction::Delete), false),
            DeviceRequest::Batch { ops } => (ops.into_iter().map(kv_op).collect::<Vec<_>>(), true),
            DeviceRequest::Ack { rev } => {
                return match (who, store) {
                    (Principal::Device(me), StoreRef::Device(d)) if *me == d => self.progress.ack(d, rev).await,
                    _ => Err(Error::denied("only the device's own key acknowledges its changes")),
                }
                .map_err(|error| Refused::new(error, None));
            }
        };
        let keys: Vec<String> =
            if batch { ops.iter().map(|o| o.key.as_str().to_owned()).collect() } else { Vec::new() };
        match self.write(who, transport, store, ops, None, None).await {
            Ok(_) => Ok(()),
            Err((index, error)) if batch => {
                Err(Refused { key: index.and_then(|i| keys.get(i).cloned()), error: indexed((index, error)), index })
            }
            Err((_, error)) => Err(Refused::new(error, key)),
        }
    }

    // ---- delivery and acknowledgement ----

    /// `GET /devices/{id}/sync`: the device's store rev, `deliveredRev` and `appliedRev`, and
    /// whether it is connected — for the admin, project keys that may read the device, and the
    /// device itself.
    pub(crate) async fn device_sync(&self, who: &Principal, device: DeviceId) -> Result<(DeviceSync, bool)> {
        self.admit(who)?;
        self.authorize(who, StoreRef::Device(device), false).await?;
        let sync = self.progress.current(vec![device]).await?.pop().ok_or(StoreError::DeviceNotFound(device))?;
        let connected = !self.store.connected(vec![device]).await?.is_empty();
        Ok((sync, connected))
    }

    /// Checks (and counts against its rate) that `who` may read `device`'s record and store.
    pub(crate) async fn may_read_device(&self, who: &Principal, device: DeviceId) -> Result<()> {
        self.admit(who)?;
        self.authorize(who, StoreRef::Device(device), false).await
    }

    /// The progress of `devices` (those that exist), for device objects: the caller may see
    /// them (the admin, the device itself, or a project key that sees them).
    pub(crate) async fn progress_of(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceSync>> {
        self.progress.current(devices).await
    }

    /// After a write at `rev` of `device`'s store: waits until the device has `what` it, for at
    /// most `timeout` (or until shutdown); returns the device's progress then.
    pub(crate) async fn await_progress(
        &self,
        device: DeviceId,
        what: Awaited,
        rev: Rev,
        timeout: std::time::Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Rev {
        self.progress.wait(device, what, rev, timeout, shutdown).await
    }

    /// Raises an event a device's own session sent (MQTT `/devices/{id}/event`).
    pub(crate) async fn session_event(&self, session: &Session, body: &[u8]) -> Result<()> {
        let Purpose::Device(device) = session.purpose() else {
            return Err(Error::denied("only a device's own connection raises its events"));
        };
        self.raise_event(session.principal(), *device, body).await
    }
}
