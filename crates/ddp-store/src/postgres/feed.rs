//! How a node learns what every node commits.
//!
//! Three append-only tables are read after a cursor of sequence numbers: `changes`,
//! `admin_log` and `event_log` (events, commands and sync progress). Sequence numbers are taken before commit, so a reader can see
//! seq 12 while seq 11 is still in flight: the cursor remembers such *gaps* and asks for them
//! again until they appear or are given up (a rolled-back transaction leaves a gap forever).
//! Rows past a gap are delivered at once. That keeps every store's changes in rev order, because
//! a writer locks its store's row before taking a seq: a later change of the same store can only
//! be written after the earlier one committed, so it can never be visible first.
//!
//! The reader waits on `LISTEN ddp` (a dedicated connection — pooled ones drop notifications),
//! on this node's own writes, and on a one-second poll. After its connection drops it reconnects
//! and reads from its cursor, so a lost notification or listener never loses a change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddp_protocol::{DeviceId, HomeId, Timestamp};
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

use super::{key_of, value_of};
use crate::model::*;
use crate::sql::{rev_of, to_u64};
use crate::{CommitSink, StoreError};

/// How long a missing seq is waited for before it is taken as rolled back. Statements and idle
/// transactions time out after 30 s each (see `SESSION_OPTIONS`), so nothing commits later.
const GAP_WAIT: Duration = Duration::from_secs(120);
/// Most missing seqs remembered (the oldest are given up first).
const MAX_GAPS: usize = 10_000;
/// When a node starts, seqs this far below the head that are missing may still be in flight.
const HEAD_WINDOW: i64 = 1_000;
/// Rows read per table per round.
const BATCH: i64 = 2_000;
/// The poll that catches what no notification announced.
const POLL: Duration = Duration::from_secs(1);
/// The poll while gaps are pending.
const GAP_POLL: Duration = Duration::from_millis(250);
/// Largest NOTIFY payload sent (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7_000;

/// Wakes this node's reader.
#[derive(Default)]
pub(super) struct Feed {
    wake: Notify,
}

impl Feed {
    /// Read now: something was committed.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Announces this node's commits to the other nodes with `NOTIFY ddp`, outside the write
/// transactions and coalesced: while one notification is being sent, the next collects every
/// commit made meanwhile. The payload lists what was committed (`kind:owner:rev` for changes);
/// readers treat it as a wake-up only and read the tables.
#[derive(Default)]
pub(super) struct Announcer {
    pending: Mutex<String>,
    wake: Notify,
}

impl Announcer {
    pub(super) fn announce(&self, what: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            if pending.len() + what.len() < MAX_PAYLOAD {
                if !pending.is_empty() {
                    pending.push(' ');
                }
                pending.push_str(what);
            } else if !pending.ends_with('…') {
                pending.push('…');
            }
        }
        self.wake.notify_one();
    }
}

/// Sends the announcements until stopped.
pub(super) async fn announce_loop(pool: Pool, announcer: Arc<Announcer>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = announcer.wake.notified() => {}
            _ = stop.changed() => return,
        }
        let payload = announcer.pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        let sent = async {
            let client = pool.get().await?;
            client.execute("SELECT pg_notify('ddp', $1)", &[&payload]).await?;
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = sent {
            // The other nodes find the rows on their next poll.
            tracing::debug!(error = %e, "NOTIFY failed");
        }
    }
}

/// Where a reader is in one log: every seq up to `high` was delivered except the `gaps`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Cursor {
    high: i64,
    gaps: BTreeMap<i64, Instant>,
}

impl Cursor {
    /// A cursor at the head `high`, treating the seqs missing from `present` (those in the last
    /// [`HEAD_WINDOW`]) as possibly in flight.
    fn at_head(high: i64, present: &[i64], now: Instant) -> Cursor {
        let mut cursor = Cursor { high: (high - HEAD_WINDOW).max(0), gaps: BTreeMap::new() };
        for &seq in present {
            cursor.saw(seq, now);
        }
        if cursor.high < high {
            cursor.saw(high, now);
            cursor.high = high;
        }
        cursor
    }

    fn gap_list(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// Records that `seq` was read.
    fn saw(&mut self, seq: i64, now: Instant) {
        if seq > self.high {
            let from = (self.high + 1).max(seq - MAX_GAPS as i64);
            for missing in from..seq {
                self.gaps.insert(missing, now);
            }
            self.high = seq;
            while self.gaps.len() > MAX_GAPS {
                self.gaps.pop_first();
            }
        } else {
            self.gaps.remove(&seq);
        }
    }

    /// Gives up gaps older than [`GAP_WAIT`].
    fn expire(&mut self, now: Instant) {
        self.gaps.retain(|_, since| now.duration_since(*since) < GAP_WAIT);
    }
}

/// The reader's cursors over the three logs.
#[derive(Debug)]
pub(super) struct Cursors {
    changes: Cursor,
    admin: Cursor,
    events: Cursor,
}

const TABLES: [&str; 3] = ["changes", "admin_log", "event_log"];

impl Cursors {
    /// Cursors at the current heads: a node starting now delivers what commits from now on.
    pub(super) async fn start_at_head(client: &Client) -> Result<Cursors, StoreError> {
        let now = Instant::now();
        let mut cursors = Vec::with_capacity(3);
        for table in TABLES {
            // The sequence's position covers rows already deleted, so a node does not wait for them.
            let head: i64 = client
                .query_one(
                    &format!(
                        "SELECT GREATEST(COALESCE((SELECT MAX(seq) FROM {table}), 0),
                                COALESCE((SELECT last_value FROM {table}_seq_seq WHERE is_called), 0) - {HEAD_WINDOW})"
                    ),
                    &[],
                )
                .await?
                .try_get(0)?;
            let present: Vec<i64> = client
                .query(&format!("SELECT seq FROM {table} WHERE seq > $1 ORDER BY seq"), &[&(head - HEAD_WINDOW)])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            cursors.push(Cursor::at_head(head, &present, now));
        }
        let mut it = cursors.into_iter();
        match (it.next(), it.next(), it.next()) {
            (Some(changes), Some(admin), Some(events)) => Ok(Cursors { changes, admin, events }),
            _ => Err(StoreError::Backend("feed cursors".into())),
        }
    }

    fn has_gaps(&self) -> bool {
        !(self.changes.gaps.is_empty() && self.admin.gaps.is_empty() && self.events.gaps.is_empty())
    }

    /// Reads one round of each log and hands it to `sink`; true when a log has more to read.
    async fn read(&mut self, conn: &Listener, sink: &dyn CommitSink) -> Result<bool, StoreError> {
        let now = Instant::now();
        for cursor in [&mut self.changes, &mut self.admin, &mut self.events] {
            cursor.expire(now);
        }
        let (cg, ag, eg) = (self.changes.gap_list(), self.admin.gap_list(), self.events.gap_list());
        let client = &conn.client;
        let (ch, ah, eh) = (self.changes.high, self.admin.high, self.events.high);
        let cp: [&(dyn ToSql + Sync); 3] = [&ch, &cg, &BATCH];
        let ap: [&(dyn ToSql + Sync); 3] = [&ah, &ag, &BATCH];
        let ep: [&(dyn ToSql + Sync); 3] = [&eh, &eg, &BATCH];
        // Three queries pipelined on one connection: one round trip.
        let (kv, admin, events) = futures_util::try_join!(
            client.query(&conn.changes, &cp),
            client.query(&conn.admin, &ap),
            client.query(&conn.events, &ep),
        )?;
        let mut batch = Vec::with_capacity(kv.len() + admin.len() + events.len());
        for row in &kv {
            self.changes.saw(row.try_get(0)?, now);
            match change_row(row) {
                Ok(change) => batch.push(Committed::Kv(change)),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable change row"),
            }
        }
        for row in &admin {
            self.admin.saw(row.try_get(0)?, now);
            match admin_row(row) {
                Ok(Some(change)) => batch.push(Committed::Admin(change)),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "skipping an unreadable admin log row"),
            }
        }
        for row in &events {
            self.events.saw(row.try_get(0)?, now);
            match event_row(row) {
                Ok(Some(event)) => batch.push(event),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "skipping an unreadable event log row"),
            }
        }
        if !batch.is_empty() {
            metrics::counter!("ddp_feed_rows_total").increment(batch.len() as u64);
            sink.committed(&batch);
        }
        let full = |rows: &Vec<Row>| rows.len() as i64 >= BATCH;
        Ok(full(&kv) || full(&admin) || full(&events))
    }
}

fn change_row(row: &Row) -> Result<Change, StoreError> {
    let kind: i16 = row.try_get(1)?;
    let store = StoreRef::from_parts(i64::from(kind), to_u64(row.try_get(2)?))
        .ok_or_else(|| StoreError::Backend("change row with an unknown store".into()))?;
    Ok(Change {
        store,
        rev: rev_of(row.try_get(3)?),
        key: key_of(row.try_get(4)?)?,
        value: row.try_get::<_, Option<String>>(5)?.map(value_of).transpose()?,
        time: Timestamp(row.try_get(6)?),
        home: row.try_get::<_, Option<i64>>(7)?.and_then(|h| HomeId::new(to_u64(h))),
        origin: Origin::from_parts(i64::from(row.try_get::<_, i16>(8)?), to_u64(row.try_get(9)?)),
        batch_last: row.try_get::<_, Option<i64>>(10)?.map(rev_of),
    })
}

/// An admin change as an `admin_log` row: kind and up to three ids.
pub(super) fn admin_to_row(change: &AdminChange) -> (&'static str, Option<i64>, Option<i64>, Option<i64>) {
    let id = |n: u64| Some(crate::sql::sql_id(n));
    match *change {
        AdminChange::HomeDeleted(h) => ("home_deleted", id(h.get()), None, None),
        AdminChange::DeviceDeleted(d) => ("device_deleted", id(d.get()), None, None),
        AdminChange::DeviceKeyRotated(d) => ("device_key_rotated", id(d.get()), None, None),
        AdminChange::DeviceMoved { device, from, to } => {
            ("device_moved", id(device.get()), from.and_then(|h| id(h.get())), to.and_then(|h| id(h.get())))
        }
        AdminChange::ApiKeyDeleted(k) => ("api_key_deleted", id(k.get()), None, None),
    }
}

fn admin_row(row: &Row) -> Result<Option<AdminChange>, StoreError> {
    let kind: &str = row.try_get(1)?;
    let id = |i: usize| -> Result<Option<u64>, StoreError> { Ok(row.try_get::<_, Option<i64>>(i)?.map(to_u64)) };
    let a = id(2)?.unwrap_or(0);
    let home = |i: usize| -> Result<Option<HomeId>, StoreError> { Ok(id(i)?.and_then(HomeId::new)) };
    Ok(match kind {
        "home_deleted" => HomeId::new(a).map(AdminChange::HomeDeleted),
        "device_deleted" => DeviceId::new(a).map(AdminChange::DeviceDeleted),
        "device_key_rotated" => DeviceId::new(a).map(AdminChange::DeviceKeyRotated),
        "device_moved" => {
            let (from, to) = (home(3)?, home(4)?);
            DeviceId::new(a).map(|device| AdminChange::DeviceMoved { device, from, to })
        }
        "api_key_deleted" => ddp_protocol::ApiKeyId::new(a).map(AdminChange::ApiKeyDeleted),
        other => {
            tracing::warn!(kind = other, "unknown admin log entry (from a newer ddp?); ignored");
            None
        }
    })
}

/// An `event_log` row: an event for a home, a command for a device, or sync progress.
fn event_row(row: &Row) -> Result<Option<Committed>, StoreError> {
    if row.try_get::<_, i16>(4)? == 1 {
        return super::progress::decode(row.try_get(2)?).map(Some);
    }
    let home = row.try_get::<_, Option<i64>>(1)?.and_then(|h| HomeId::new(to_u64(h)));
    let json: Arc<str> = Arc::from(row.try_get::<_, String>(2)?);
    let device = row.try_get::<_, Option<i64>>(3)?.and_then(|d| DeviceId::new(to_u64(d)));
    Ok(match (home, device) {
        (Some(home), _) => Some(Committed::Event { home, json }),
        (None, Some(device)) => Some(Committed::Command { device, json }),
        (None, None) => None,
    })
}

/// The reader's dedicated connection, listening, with its statements.
struct Listener {
    client: Client,
    changes: Statement,
    admin: Statement,
    events: Statement,
}

impl Listener {
    async fn connect(config: &tokio_postgres::Config, feed: &Arc<Feed>) -> Result<Listener, StoreError> {
        let (client, mut connection) = config.connect(NoTls).await?;
        let feed = feed.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => feed.wake(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the change feed's PostgreSQL connection failed");
                        break;
                    }
                }
            }
            feed.wake(); // the reader notices the closed connection at once
        });
        client.batch_execute("LISTEN ddp").await?;
        // Two index scans: the rows after the cursor, and the gaps. (One `seq > $1 OR seq =
        // ANY($2)` filter makes PostgreSQL walk the whole index.)
        let query = |table: &str, columns: &str| {
            format!(
                "(SELECT {columns} FROM {table} WHERE seq > $1 ORDER BY seq LIMIT $3)
                 UNION ALL (SELECT {columns} FROM {table} WHERE seq = ANY($2)) ORDER BY 1"
            )
        };
        let changes = client
            .prepare(&query(
                "changes",
                "seq, kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id, batch_last",
            ))
            .await?;
        let admin = client.prepare(&query("admin_log", "seq, kind, a, b, c")).await?;
        let events = client.prepare(&query("event_log", "seq, home_id, json, device_id, kind")).await?;
        Ok(Listener { client, changes, admin, events })
    }
}

/// Reads the logs until stopped, reconnecting whenever the connection drops.
pub(super) async fn read_loop(
    mut config: tokio_postgres::Config,
    mut cursors: Cursors,
    feed: Arc<Feed>,
    sink: Arc<dyn CommitSink>,
    mut stop: watch::Receiver<bool>,
) {
    let name = format!("{} feed", config.get_application_name().unwrap_or("ddp"));
    config.application_name(&name);
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let conn = match Listener::connect(&config, &feed).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach PostgreSQL for the change feed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if connected_before {
            metrics::counter!("ddp_feed_reconnects_total").increment(1);
            tracing::info!("change feed reconnected; catching up from where it was");
        }
        connected_before = true;
        backoff = Duration::from_millis(100);
        loop {
            match cursors.read(&conn, &*sink).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the change feed failed; reconnecting");
                    break;
                }
            }
            let wait = if cursors.has_gaps() { GAP_POLL } else { POLL };
            tokio::select! {
                () = feed.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            if conn.client.is_closed() {
                tracing::warn!("the change feed's PostgreSQL connection closed; reconnecting");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_remembers_and_fills_gaps() {
        let now = Instant::now();
        let mut c = Cursor::default();
        c.saw(1, now);
        c.saw(4, now);
        assert_eq!((c.high, c.gap_list()), (4, vec![2, 3]));
        c.saw(3, now);
        assert_eq!(c.gap_list(), vec![2]);
        c.saw(2, now);
        assert!(c.gaps.is_empty());
        c.saw(6, now);
        c.expire(now + GAP_WAIT);
        assert!(c.gaps.is_empty(), "a gap older than GAP_WAIT is given up");
    }

    #[test]
    fn cursor_at_head_waits_for_missing_recent_seqs() {
        let now = Instant::now();
        let c = Cursor::at_head(5000, &[4998, 5000], now);
        assert_eq!(c.high, 5000);
        assert_eq!(c.gaps.len(), HEAD_WINDOW as usize - 2);
        assert!(c.gaps.contains_key(&4999) && !c.gaps.contains_key(&4998));
        let empty = Cursor::at_head(0, &[], now);
        assert_eq!(empty, Cursor::default());
    }

    #[test]
    fn gaps_are_bounded() {
        let now = Instant::now();
        let mut c = Cursor::default();
        c.saw(1_000_000, now);
        assert_eq!(c.gaps.len(), MAX_GAPS);
        assert_eq!(c.gaps.keys().next(), Some(&(1_000_000 - MAX_GAPS as i64)));
    }

    #[test]
    fn announcements_fit_a_notification() {
        let a = Announcer::default();
        for i in 0..10_000 {
            a.announce(&format!("0:{i}:{i}"));
        }
        let payload = a.pending.lock().map(|p| p.clone()).unwrap_or_default();
        assert!(payload.len() <= MAX_PAYLOAD + '…'.len_utf8() && payload.ends_with('…'));
    }
}
