//! Delivery and acknowledgement (PROTOCOL.md §10): per device, how far its own sessions have
//! handed its store to its connections (`deliveredRev`) and how far it says it has applied it
//! (`appliedRev`, `appliedTime`).
//!
//! - **Delivered**: the watch of a session of the device's own key holds an [`Attachment`] and
//!   reports, after each successful send, the rev up to which it has handed messages over (a
//!   `reload` or `resume` counts up to its rev). Sessions of other keys have none.
//! - **Applied**: a device's `{"action":"ack","rev":N}`, through the gate ([`Tracker::ack`]):
//!   above the store's rev it is refused, at or below the recorded one it changes nothing.
//! - **Values only rise.** This node's view of a device is the greatest of what its own sessions
//!   saw, what other nodes announced ([`Committed::Sync`](ddp_store::Committed::Sync) through the
//!   fan-out) and what storage recorded; every answer merges storage in ([`Tracker::current`]).
//! - **No disk on the hot path.** Deliveries and acks only update memory. The background task
//!   ([`Tracker::run`]) announces what moved to the other nodes at once (one announcement per
//!   [`ANNOUNCE_GAP`] at most, carrying everything that moved meanwhile), records it in storage
//!   every [`RECORD_EVERY`] in one batch, raises `_deviceKVApplied_` at most once per
//!   [`EVENT_EVERY`] per device (with the latest value), keeps the metrics, and forgets devices
//!   idle for [`FORGET_AFTER`]. After a crash the recorded values are at most [`RECORD_EVERY`]
//!   behind (plus the moment a batch takes to commit), never ahead; a clean stop records
//!   everything ([`Tracker::flush`]).
//! - **Waiters** (`?wait=applied|delivered`, [`Tracker::wait`]) are woken whenever the device's
//!   progress moves here, whether the ack came to this node or another, and read storage again
//!   every [`RECORD_EVERY`] in case an announcement came before they started listening.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddp_protocol::{DeviceId, HomeId, Rev, Timestamp};
use ddp_store::{Change, DeviceSync, Store, StoreRef, SyncProgress};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::locks;

/// How often what moved is recorded in storage: the most recorded values can be behind after
/// a crash.
pub(crate) const RECORD_EVERY: Duration = Duration::from_secs(1);
/// The least time between two announcements of this node's progress to the other nodes.
pub(crate) const ANNOUNCE_GAP: Duration = Duration::from_millis(10);
/// The least time between two `_deviceKVApplied_` events of one device from this node.
pub(crate) const EVENT_EVERY: Duration = Duration::from_secs(1);
/// A device with no session, waiter or pending record here is forgotten after this.
pub(crate) const FORGET_AFTER: Duration = Duration::from_secs(60);
/// How often the background task looks for due events.
const TICK: Duration = Duration::from_millis(250);
/// Commit times kept per device for the commit → applied histogram.
const MAX_COMMITS: usize = 16;
/// Shards of the device table.
const SHARDS: usize = 32;

/// Which progress a waiter waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaited {
    /// `deliveredRev`.
    Delivered,
    /// `appliedRev`.
    Applied,
}

impl Awaited {
    fn of(self, p: &SyncProgress) -> Rev {
        match self {
            Awaited::Delivered => p.delivered,
            Awaited::Applied => p.applied,
        }
    }
}

/// What this node knows of one device.
struct Entry {
    /// The greatest progress known here.
    known: SyncProgress,
    /// Whether `known` includes what storage recorded.
    seeded: bool,
    /// The highest rev of the device's store seen here (changes, deliveries, storage).
    store_rev: Rev,
    /// The device's home, once known (`Some(None)`: in no home).
    home: Option<Option<HomeId>>,
    /// Watches of the device's own sessions on this node.
    watchers: u32,
    /// Commit times of changes not yet acknowledged (while a session watches), oldest first.
    commits: VecDeque<(Rev, Timestamp)>,
    /// Woken when `known` moves, while someone waits.
    wake: Option<Arc<Notify>>,
    /// How many wait.
    waiting: u32,
    /// When this node last raised `_deviceKVApplied_` for the device.
    last_event: Option<Instant>,
    /// When the entry was last used.
    touched: Instant,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            known: SyncProgress::default(),
            seeded: false,
            store_rev: Rev::ZERO,
            home: None,
            watchers: 0,
            commits: VecDeque::new(),
            wake: None,
            waiting: 0,
            last_event: None,
            touched: Instant::now(),
        }
    }

    fn moved(&self) {
        if let Some(wake) = &self.wake {
            wake.notify_waiters();
        }
    }
}

/// What the background task has to do.
#[derive(Default)]
struct Outbox {
    /// Progress to announce to the other nodes.
    announce: HashMap<DeviceId, SyncProgress>,
    /// Progress to record in storage.
    record: HashMap<DeviceId, SyncProgress>,
    /// Devices whose `_deviceKVApplied_` is due now.
    due: HashSet<DeviceId>,
    /// Devices whose `_deviceKVApplied_` waits for [`EVENT_EVERY`] to pass since their last.
    deferred: HashSet<DeviceId>,
}

/// When an advanced ack's `_deviceKVApplied_` goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raise {
    /// At once.
    Now,
    /// Once [`EVENT_EVERY`] has passed since the last one.
    Later,
    /// Never: the device is in no home.
    Never,
}

impl Outbox {
    fn moved(&mut self, device: DeviceId, known: SyncProgress) {
        self.announce.entry(device).or_default().merge(&known);
        self.record.entry(device).or_default().merge(&known);
    }
}

type Devices = HashMap<DeviceId, Entry>;

/// The metrics of the ack path, registered once (looking them up on every ack costs).
struct Meters {
    advanced: metrics::Counter,
    unchanged: metrics::Counter,
    refused: metrics::Counter,
    applied_after: metrics::Histogram,
}

impl Meters {
    fn new() -> Meters {
        Meters {
            advanced: metrics::counter!("ddp_acks_total", "outcome" => "advanced"),
            unchanged: metrics::counter!("ddp_acks_total", "outcome" => "unchanged"),
            refused: metrics::counter!("ddp_acks_total", "outcome" => "refused"),
            applied_after: metrics::histogram!("ddp_commit_to_applied_seconds"),
        }
    }
}

/// The tracker. See the [module docs](self).
pub(crate) struct Tracker {
    store: Arc<dyn Store>,
    events: Arc<EventBus>,
    shards: Box<[Mutex<Devices>]>,
    hasher: std::hash::RandomState,
    outbox: Mutex<Outbox>,
    wake: Notify,
    meters: Meters,
}

impl Tracker {
    /// A tracker over `store`, raising its events on `events`.
    pub(crate) fn new(store: Arc<dyn Store>, events: Arc<EventBus>) -> Tracker {
        Tracker {
            store,
            events,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
            outbox: Mutex::default(),
            wake: Notify::new(),
            meters: Meters::new(),
        }
    }

    fn shard(&self, device: DeviceId) -> &Mutex<Devices> {
        &self.shards[(self.hasher.hash_one(device) as usize) % SHARDS]
    }

    fn with_entry<T>(&self, device: DeviceId, f: impl FnOnce(&mut Entry) -> T) -> T {
        let mut shard = locks::recover(self.shard(device));
        let entry = shard.entry(device).or_insert_with(Entry::new);
        entry.touched = Instant::now();
        f(entry)
    }

    fn with_existing<T>(&self, device: DeviceId, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        locks::recover(self.shard(device)).get_mut(&device).map(f)
    }

    fn moved(&self, device: DeviceId, known: SyncProgress, raise: Raise) {
        let mut outbox = locks::recover(&self.outbox);
        outbox.moved(device, known);
        match raise {
            Raise::Now => {
                outbox.due.insert(device);
            }
            Raise::Later => {
                outbox.deferred.insert(device);
            }
            Raise::Never => {}
        }
        drop(outbox);
        self.wake.notify_one();
    }

    // ---- deliveries and acks ----

    /// Registers a watch of a session of `device`'s own key; its deliveries move
    /// `deliveredRev`.
    pub(crate) fn attach(self: &Arc<Self>, device: DeviceId) -> Attachment {
        self.with_entry(device, |e| e.watchers += 1);
        Attachment { tracker: self.clone(), device }
    }

    fn delivered(&self, device: DeviceId, rev: Rev) {
        let moved = self.with_entry(device, |e| {
            e.store_rev = e.store_rev.max(rev);
            if rev <= e.known.delivered {
                return None;
            }
            e.known.delivered = rev;
            e.moved();
            Some(e.known)
        });
        if let Some(known) = moved {
            self.moved(device, known, Raise::Never);
        }
    }

    /// A device's acknowledgement that it has applied every change up to `rev`. Above its
    /// store's rev: `INVALID_PARAMETER`, nothing changes. At or below the recorded one: nothing
    /// changes.
    pub(crate) async fn ack(&self, device: DeviceId, rev: Rev) -> Result<()> {
        let now = Timestamp::now();
        let mut outcome = self.with_entry(device, |e| self.apply_ack(e, rev, now, false));
        if outcome.is_none() {
            // The first ack since this node took note of the device, or one beyond what it has
            // seen of the store: storage knows the store's rev and what was recorded before.
            self.load(vec![device], true).await?;
            outcome = self.with_entry(device, |e| self.apply_ack(e, rev, now, true));
        }
        match outcome {
            Some(Err(store_rev)) => {
                self.meters.refused.increment(1);
                Err(Error::invalid_parameter(format!(
                    "an ack of rev {rev} is above the store's rev {store_rev}: ack only revs you have received"
                )))
            }
            Some(Ok(None)) | None => {
                self.meters.unchanged.increment(1);
                Ok(())
            }
            Some(Ok(Some((known, raise)))) => {
                self.meters.advanced.increment(1);
                self.moved(device, known, raise);
                Ok(())
            }
        }
    }

    /// Applies an ack to what this node knows: `None` when storage must be read first (the
    /// entry is not seeded, or the rev is beyond the store's rev seen here) unless `loaded`;
    /// `Err(store rev)` above the store; `Ok(None)` when nothing moved; else the new progress and
    /// when its event goes out.
    fn apply_ack(
        &self,
        e: &mut Entry,
        rev: Rev,
        now: Timestamp,
        loaded: bool,
    ) -> Option<std::result::Result<Option<(SyncProgress, Raise)>, Rev>> {
        if !loaded && (!e.seeded || rev > e.store_rev) {
            return None;
        }
        if rev > e.store_rev {
            return Some(Err(e.store_rev));
        }
        if rev <= e.known.applied {
            return Some(Ok(None));
        }
        e.known.applied = rev;
        e.known.applied_at = Some(now);
        while let Some(&(r, committed)) = e.commits.front() {
            if r > rev {
                break;
            }
            e.commits.pop_front();
            let ms = (now.millis() - committed.millis()).max(0);
            self.meters.applied_after.record(ms as f64 / 1000.0);
        }
        e.moved();
        let raise = if e.home == Some(None) {
            Raise::Never
        } else if e.last_event.is_none_or(|at| at.elapsed() >= EVENT_EVERY) {
            e.last_event = Some(Instant::now());
            Raise::Now
        } else {
            Raise::Later
        };
        Some(Ok(Some((e.known, raise))))
    }

    // ---- reading and waiting ----

    /// Reads what storage recorded of `devices` and merges it into what this node knows — into
    /// its entries, creating them with `create`; returns the merged records of the devices
    /// that exist.
    async fn load(&self, devices: Vec<DeviceId>, create: bool) -> Result<Vec<DeviceSync>> {
        let mut records = self.store.device_sync(devices).await?;
        for record in &mut records {
            let merge = |e: &mut Entry| {
                if e.known.merge(&record.progress) {
                    e.moved();
                }
                e.seeded = true;
                e.store_rev = e.store_rev.max(record.rev);
                (e.known, e.store_rev)
            };
            let merged = if create {
                Some(self.with_entry(record.device, merge))
            } else {
                self.with_existing(record.device, merge)
            };
            if let Some((known, store_rev)) = merged {
                record.progress = known;
                record.rev = store_rev;
            }
        }
        Ok(records)
    }

    /// The store rev and progress of each of `devices` that exists: what storage recorded,
    /// raised by what this node knows. Never lower than an earlier answer while the server runs.
    pub(crate) async fn current(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceSync>> {
        self.load(devices, false).await
    }

    /// After a write of `device`'s store at `rev`: waits until the device's `what` progress
    /// reaches `rev`, for at most `timeout` (or until `shutdown`); returns the progress then.
    /// Storage is read when the wait starts and every [`RECORD_EVERY`]; if it cannot be read,
    /// what this node knows is answered (the write stands either way).
    pub(crate) async fn wait(
        &self,
        device: DeviceId,
        what: Awaited,
        rev: Rev,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Rev {
        let waiter = Waiter::new(self, device);
        let deadline = Instant::now() + timeout;
        let mut reread = Instant::now();
        let mut value = Rev::ZERO;
        loop {
            let notified = waiter.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if Instant::now() >= reread {
                if let Err(e) = self.load(vec![device], true).await {
                    tracing::debug!(%device, error = %e, "a waiter could not read the recorded progress");
                }
                reread = Instant::now() + RECORD_EVERY;
            }
            match self.with_existing(device, |e| what.of(&e.known)) {
                Some(now) => value = now,
                None => return value, // the device was deleted
            }
            if value >= rev || Instant::now() >= deadline {
                return value;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline.min(reread)) => {}
                () = shutdown.cancelled() => return value,
            }
        }
    }

    // ---- from the fan-out ----

    /// A committed change: the store's rev, the device's home, and the commit time (for the
    /// commit → applied histogram) of a device this node tracks.
    pub(crate) fn committed(&self, change: &Change) {
        let StoreRef::Device(device) = change.store else { return };
        self.with_existing(device, |e| {
            e.store_rev = e.store_rev.max(change.rev);
            e.home = Some(change.home);
            if e.watchers > 0 && change.rev > e.known.applied {
                if e.commits.len() == MAX_COMMITS {
                    e.commits.pop_front();
                }
                e.commits.push_back((change.rev, change.time));
            }
        });
    }

    /// Progress announced by some node (this one included).
    pub(crate) fn announced(&self, progress: &[(DeviceId, SyncProgress)]) {
        for (device, p) in progress {
            self.with_existing(*device, |e| {
                e.store_rev = e.store_rev.max(p.delivered).max(p.applied);
                if e.known.merge(p) {
                    while e.commits.front().is_some_and(|&(r, _)| r <= e.known.applied) {
                        e.commits.pop_front();
                    }
                    e.moved();
                }
            });
        }
    }

    /// A device moved to `home`.
    pub(crate) fn device_moved(&self, device: DeviceId, home: Option<HomeId>) {
        self.with_existing(device, |e| e.home = Some(home));
    }

    /// A device was deleted: it is forgotten, and its waiters answer.
    pub(crate) fn device_deleted(&self, device: DeviceId) {
        if let Some(entry) = locks::recover(self.shard(device)).remove(&device) {
            entry.moved();
        }
        let mut outbox = locks::recover(&self.outbox);
        outbox.announce.remove(&device);
        outbox.record.remove(&device);
        outbox.due.remove(&device);
        outbox.deferred.remove(&device);
    }

    // ---- the background task ----

    /// Announces, records, raises events, forgets idle devices and keeps the metrics, until
    /// `shutdown`; then [`Tracker::flush`] finishes.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_record = Instant::now() + RECORD_EVERY;
        loop {
            let ticked = tokio::select! {
                () = self.wake.notified() => false,
                _ = tick.tick() => true,
                () = shutdown.cancelled() => return,
            };
            let announced = self.announce().await;
            self.raise_events(ticked).await;
            if Instant::now() >= next_record {
                next_record = Instant::now() + RECORD_EVERY;
                self.record().await;
                self.sweep();
            }
            if announced {
                // Whatever moves meanwhile goes in the next announcement.
                tokio::select! {
                    () = tokio::time::sleep(ANNOUNCE_GAP) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Announces and records everything pending (at shutdown, once sessions have closed).
    pub(crate) async fn flush(&self) {
        self.announce().await;
        self.record().await;
    }

    async fn announce(&self) -> bool {
        let pending: Vec<(DeviceId, SyncProgress)> = locks::recover(&self.outbox).announce.drain().collect();
        if pending.is_empty() {
            return false;
        }
        if let Err(e) = self.store.broadcast_sync(pending).await {
            // Other nodes' waiters read storage again within a second.
            tracing::debug!(error = %e, "announcing sync progress failed");
        }
        true
    }

    async fn record(&self) {
        let pending: Vec<(DeviceId, SyncProgress)> = locks::recover(&self.outbox).record.drain().collect();
        if pending.is_empty() {
            return;
        }
        let n = pending.len();
        if let Err(e) = self.store.record_sync(pending.clone()).await {
            metrics::counter!("ddp_sync_record_failures_total").increment(1);
            tracing::warn!(devices = n, error = %e, "recording sync progress failed; trying again in a second");
            let mut outbox = locks::recover(&self.outbox);
            for (device, p) in pending {
                outbox.record.entry(device).or_default().merge(&p);
            }
        }
    }

    /// Raises the `_deviceKVApplied_` events that are due, each with the latest value: those due
    /// at once, and (on a `tick`) the deferred ones whose [`EVENT_EVERY`] has passed.
    async fn raise_events(&self, tick: bool) {
        let mut now: Vec<DeviceId> = locks::recover(&self.outbox).due.drain().collect();
        if tick {
            let deferred: Vec<DeviceId> = locks::recover(&self.outbox).deferred.iter().copied().collect();
            for device in deferred {
                let due = self.with_existing(device, |e| {
                    let due = e.last_event.is_none_or(|at| at.elapsed() >= EVENT_EVERY);
                    if due {
                        e.last_event = Some(Instant::now());
                    }
                    due
                });
                if due != Some(false) {
                    locks::recover(&self.outbox).deferred.remove(&device);
                }
                if due == Some(true) {
                    now.push(device);
                }
            }
        }
        for device in now {
            let Some((home, known)) = self.with_existing(device, |e| (e.home, e.known)) else { continue };
            let home = match home {
                Some(home) => home,
                None => match self.store.device(device).await {
                    Ok(record) => {
                        self.with_existing(device, |e| e.home = Some(record.home));
                        record.home
                    }
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "no home for _deviceKVApplied_");
                        continue;
                    }
                },
            };
            if let (Some(home), Some(at)) = (home, known.applied_at) {
                self.events.applied(home, device, known.applied, at).await;
            }
        }
    }

    /// Forgets devices that nothing here needs any more, and updates the gauges.
    fn sweep(&self) {
        let pending: HashSet<DeviceId> = locks::recover(&self.outbox).record.keys().copied().collect();
        let (mut tracked, mut behind) = (0usize, 0usize);
        for shard in self.shards.iter() {
            let mut devices = locks::recover(shard);
            devices.retain(|device, e| {
                e.watchers > 0 || e.waiting > 0 || pending.contains(device) || e.touched.elapsed() < FORGET_AFTER
            });
            tracked += devices.len();
            behind += devices.values().filter(|e| e.watchers > 0 && e.known.applied < e.store_rev).count();
        }
        metrics::gauge!("ddp_sync_tracked_devices").set(tracked as f64);
        metrics::gauge!("ddp_connected_devices_behind").set(behind as f64);
    }

    /// How many devices this node tracks (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards.iter().map(|s| locks::recover(s).len()).sum()
    }
}

/// A watch of a session of the device's own key: what it hands to its connection is delivered.
pub(crate) struct Attachment {
    tracker: Arc<Tracker>,
    device: DeviceId,
}

impl Attachment {
    /// The session has handed every message up to `rev` to its connection.
    pub(crate) fn delivered(&self, rev: Rev) {
        self.tracker.delivered(self.device, rev);
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.tracker.with_existing(self.device, |e| {
            e.watchers = e.watchers.saturating_sub(1);
            e.touched = Instant::now();
            if e.watchers == 0 {
                e.commits.clear();
            }
        });
    }
}

/// One waiter's interest in a device, kept for as long as it waits.
struct Waiter<'a> {
    tracker: &'a Tracker,
    device: DeviceId,
    wake: Arc<Notify>,
}

impl<'a> Waiter<'a> {
    fn new(tracker: &'a Tracker, device: DeviceId) -> Waiter<'a> {
        let wake = tracker.with_entry(device, |e| {
            e.waiting += 1;
            e.wake.get_or_insert_with(|| Arc::new(Notify::new())).clone()
        });
        Waiter { tracker, device, wake }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.tracker.with_existing(self.device, |e| {
            e.waiting = e.waiting.saturating_sub(1);
            if e.waiting == 0 {
                e.wake = None;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    //! The tracker on a real embedded store, whose commit sink goes nowhere: what the fan-out
    //! would hand it is handed by the test.

    use super::*;
    use crate::testing::{Embedded, embedded, set};

    struct Fixture {
        store: Arc<dyn Store>,
        tracker: Arc<Tracker>,
        device: DeviceId,
        _embedded: Embedded,
    }

    async fn fixture() -> Fixture {
        let embedded = embedded().await;
        let store = embedded.store.clone();
        let events = Arc::new(EventBus::new(store.clone(), 16));
        let tracker = Arc::new(Tracker::new(store.clone(), events));
        Fixture { store, tracker, device: embedded.device, _embedded: embedded }
    }

    async fn write(f: &Fixture, n: u32) -> Change {
        let mut last = None;
        for i in 0..n {
            let change = f.store.write(set(StoreRef::Device(f.device), &format!("k{i}"), "1")).await.expect("write");
            f.tracker.committed(&change);
            last = Some(change);
        }
        last.expect("a change")
    }

    #[tokio::test]
    async fn acks_rise_only_and_never_above_the_store() {
        let f = fixture().await;
        let watch = f.tracker.attach(f.device);
        write(&f, 3).await;
        watch.delivered(Rev(3));
        let refused = f.tracker.ack(f.device, Rev(4)).await.expect_err("above the store");
        assert_eq!(refused.reason, ddp_protocol::Reason::InvalidParameter);
        f.tracker.ack(f.device, Rev(2)).await.expect("ack");
        f.tracker.ack(f.device, Rev(1)).await.expect("a lower ack is no error");
        let now = f.tracker.current(vec![f.device]).await.expect("current");
        assert_eq!((now[0].rev, now[0].progress.delivered, now[0].progress.applied), (Rev(3), Rev(3), Rev(2)));
        assert!(now[0].progress.applied_at.is_some());
    }

    #[tokio::test]
    async fn what_is_recorded_survives_a_new_tracker_and_an_old_record_never_lowers_it() {
        let f = fixture().await;
        write(&f, 2).await;
        let watch = f.tracker.attach(f.device);
        watch.delivered(Rev(2));
        f.tracker.ack(f.device, Rev(2)).await.expect("ack");
        f.tracker.flush().await;
        // A later node (a restart): storage answers.
        let events = Arc::new(EventBus::new(f.store.clone(), 16));
        let fresh = Tracker::new(f.store.clone(), events);
        let now = fresh.current(vec![f.device]).await.expect("current");
        assert_eq!((now[0].progress.delivered, now[0].progress.applied), (Rev(2), Rev(2)));
        // Something older announced by another node changes nothing.
        fresh.with_entry(f.device, |_| ());
        fresh.announced(&[(f.device, SyncProgress { delivered: Rev(1), applied: Rev(1), applied_at: None })]);
        let again = fresh.current(vec![f.device]).await.expect("current");
        assert_eq!(again[0].progress, now[0].progress);
    }

    #[tokio::test]
    async fn a_waiter_hears_an_ack_announced_by_another_node() {
        let f = fixture().await;
        write(&f, 1).await;
        let tracker = f.tracker.clone();
        let device = f.device;
        let shutdown = CancellationToken::new();
        let waiting = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tracker.wait(device, Awaited::Applied, Rev(1), Duration::from_secs(20), &shutdown).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        f.tracker.announced(&[(
            f.device,
            SyncProgress { delivered: Rev(1), applied: Rev(1), applied_at: Some(Timestamp::now()) },
        )]);
        let applied = waiting.await.expect("joined");
        assert_eq!(applied, Rev(1));
        assert!(started.elapsed() < Duration::from_secs(5), "woken by the announcement, not by the timeout");
    }

    #[tokio::test]
    async fn a_waiter_gives_up_at_its_timeout_with_the_value_then() {
        let f = fixture().await;
        write(&f, 2).await;
        f.tracker.attach(f.device).delivered(Rev(1));
        let shutdown = CancellationToken::new();
        let value = f.tracker.wait(f.device, Awaited::Delivered, Rev(2), Duration::from_millis(100), &shutdown).await;
        assert_eq!(value, Rev(1));
    }

    #[tokio::test]
    async fn idle_devices_are_forgotten_and_busy_ones_kept() {
        let f = fixture().await;
        let watch = f.tracker.attach(f.device);
        write(&f, 1).await;
        watch.delivered(Rev(1));
        f.tracker.flush().await;
        f.tracker.with_existing(f.device, |e| e.touched = e.touched.checked_sub(FORGET_AFTER).expect("uptime"));
        f.tracker.sweep();
        assert_eq!(f.tracker.tracked(), 1, "a device with a live session is kept");
        drop(watch);
        f.tracker.with_existing(f.device, |e| e.touched = e.touched.checked_sub(FORGET_AFTER).expect("uptime"));
        f.tracker.sweep();
        assert_eq!(f.tracker.tracked(), 0, "then forgotten");
        let now = f.tracker.current(vec![f.device]).await.expect("current");
        assert_eq!(now[0].progress.delivered, Rev(1), "what it knew is in storage");
    }
}
