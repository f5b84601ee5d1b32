//! The embedded default backend: one SQLite database file.
//!
//! - WAL journal with `synchronous=FULL`: a commit returns only after the WAL is on disk, so an
//!   acknowledged write survives a crash or power loss.
//! - One writer thread owns the only read-write connection. It takes every write waiting at that
//!   moment (up to [`SqliteOptions::max_batch`]) and applies them in **one** transaction: one fsync
//!   per batch (group commit). While a batch commits, the next one queues up, so throughput grows
//!   with the number of concurrent writers instead of being capped at the disk's fsync rate.
//! - After the commit, and before any writer is answered, the batch's changes go to the
//!   [`CommitSink`] in commit order.
//! - Reads run on a small pool of read-only connections on the blocking thread pool; WAL lets
//!   them read while the writer writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use async_trait::async_trait;
use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Key, Rev, Timestamp, Value};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::model::*;
use crate::{CommitSink, Store, StoreError};

/// Settings of the SQLite backend.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file (created with its schema if missing).
    pub path: PathBuf,
    /// Number of read-only connections.
    pub readers: usize,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// Writes that may wait for the writer before callers wait for room.
    pub queue: usize,
}

impl SqliteOptions {
    /// Defaults for the database file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteOptions {
        SqliteOptions { path: path.into(), readers: 4, max_batch: 1024, queue: 8192 }
    }
}

/// The SQLite store. See the [module docs](self).
pub struct SqliteStore {
    sender: mpsc::Sender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Readers>,
}

/// The schema, one migration per entry; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE homes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE devices (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT NOT NULL,
    home_id             INTEGER,
    device_class        TEXT NOT NULL,
    tag                 TEXT NOT NULL,
    key_hash            BLOB NOT NULL UNIQUE,
    created_ms          INTEGER NOT NULL,
    last_connect_ms     INTEGER,
    last_disconnect_ms  INTEGER
);
CREATE INDEX devices_by_home ON devices(home_id);
CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    permission  TEXT NOT NULL,
    all_homes   INTEGER NOT NULL,
    key_hash    BLOB NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE api_key_homes (
    key_id   INTEGER NOT NULL,
    home_id  INTEGER NOT NULL,
    PRIMARY KEY (key_id, home_id)
) WITHOUT ROWID;
CREATE INDEX api_key_homes_by_home ON api_key_homes(home_id);
-- kind: 0 device store, 1 home store. history_from: every change with rev > history_from is kept.
CREATE TABLE stores (
    kind          INTEGER NOT NULL,
    owner         INTEGER NOT NULL,
    rev           INTEGER NOT NULL,
    num_keys      INTEGER NOT NULL,
    history_from  INTEGER NOT NULL,
    PRIMARY KEY (kind, owner)
) WITHOUT ROWID;
CREATE TABLE items (
    kind         INTEGER NOT NULL,
    owner        INTEGER NOT NULL,
    key          TEXT NOT NULL,
    value        TEXT NOT NULL,
    rev          INTEGER NOT NULL,
    modified_ms  INTEGER NOT NULL,
    PRIMARY KEY (kind, owner, key)
) WITHOUT ROWID;
-- value NULL: a delete. origin_kind: 0 admin, 1 project key, 2 device.
CREATE TABLE changes (
    kind         INTEGER NOT NULL,
    owner        INTEGER NOT NULL,
    rev          INTEGER NOT NULL,
    key          TEXT NOT NULL,
    value        TEXT,
    modified_ms  INTEGER NOT NULL,
    home_id      INTEGER,
    origin_kind  INTEGER NOT NULL,
    origin_id    INTEGER NOT NULL,
    PRIMARY KEY (kind, owner, rev)
) WITHOUT ROWID;
"#];

impl SqliteStore {
    /// Opens (creating or migrating) the database and starts the writer thread. Blocking: call
    /// it at start-up or from a blocking context.
    pub fn open(options: SqliteOptions, sink: Arc<dyn CommitSink>) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open_with_flags(
            &options.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", options.path.display())))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!("SQLite refused WAL mode (got {mode})")));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=OFF;")?;
        migrate(&mut conn)?;

        let readers = Arc::new(Readers::open(&options.path, options.readers.max(1))?);
        let (sender, receiver) = mpsc::channel(options.queue.max(1));
        let max_batch = options.max_batch.max(1);
        let writer = std::thread::Builder::new()
            .name("ddp-sqlite-writer".into())
            .spawn(move || writer_loop(conn, receiver, max_batch, sink))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore { sender, writer: Mutex::new(Some(writer)), readers })
    }

    /// Runs `f` in the writer's next batch transaction.
    async fn write_job<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, Timestamp, &mut Vec<Committed>) -> rusqlite::Result<Result<T, StoreError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(FnJob { apply: Some(Box::new(f)), result: None, reply });
        self.sender.send(Msg::Job(job)).await.map_err(|_| StoreError::Closed)?;
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Runs `f` on a read connection.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.readers.run(f).await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Backend(format!(
            "the database has schema version {version}, newer than this ddp knows ({known}); use a newer ddp"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
        tracing::info!(version = i + 1, "storage schema migrated");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer thread

enum Msg {
    Job(Box<dyn Job>),
    /// Commit everything queued before this, then stop.
    Shutdown,
}

/// One unit of work in a batch transaction.
trait Job: Send {
    /// Applies the job inside the batch transaction. An `Err` aborts the whole batch.
    fn apply(&mut self, conn: &Connection, now: Timestamp, out: &mut Vec<Committed>) -> rusqlite::Result<()>;
    /// Answers the caller once the batch's fate is known.
    fn finish(self: Box<Self>, batch: Result<(), StoreError>);
}

type ApplyFn<T> =
    Box<dyn FnOnce(&Connection, Timestamp, &mut Vec<Committed>) -> rusqlite::Result<Result<T, StoreError>> + Send>;

struct FnJob<T> {
    apply: Option<ApplyFn<T>>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> Job for FnJob<T> {
    fn apply(&mut self, conn: &Connection, now: Timestamp, out: &mut Vec<Committed>) -> rusqlite::Result<()> {
        if let Some(f) = self.apply.take() {
            self.result = Some(f(conn, now, out)?);
        }
        Ok(())
    }

    fn finish(self: Box<Self>, batch: Result<(), StoreError>) {
        let result = match batch {
            Ok(()) => self.result.unwrap_or_else(|| Err(StoreError::Backend("write was not applied".into()))),
            Err(e) => Err(e),
        };
        // The caller may have gone away (client disconnected); the write stands either way.
        let _ = self.reply.send(result);
    }
}

fn writer_loop(conn: Connection, mut receiver: mpsc::Receiver<Msg>, max_batch: usize, sink: Arc<dyn CommitSink>) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut out: Vec<Committed> = Vec::new();
    let mut stopping = false;
    while !stopping {
        match receiver.blocking_recv() {
            Some(Msg::Job(first)) => batch.push(first),
            Some(Msg::Shutdown) | None => break,
        }
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(Msg::Job(job)) => batch.push(job),
                Ok(Msg::Shutdown) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let now = Timestamp::now();
        let result = commit_batch(&conn, &mut batch, now, &mut out);
        metrics::histogram!("ddp_store_batch_size").record(batch.len() as f64);
        metrics::histogram!("ddp_store_commit_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                if !out.is_empty() {
                    sink.committed(&out);
                }
                for job in batch.drain(..) {
                    job.finish(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "storage commit failed; the batch was rolled back");
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    tracing::debug!(error = %e, "rollback after a failed commit");
                }
                for job in batch.drain(..) {
                    job.finish(Err(StoreError::Backend(e.to_string())));
                }
            }
        }
        out.clear();
    }
    tracing::debug!("storage writer stopped");
}

fn commit_batch(
    conn: &Connection,
    batch: &mut [Box<dyn Job>],
    now: Timestamp,
    out: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        job.apply(conn, now, out)?;
    }
    conn.execute_batch("COMMIT")
}

// ---------------------------------------------------------------------------------------------
// Read connections

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl Readers {
    fn open(path: &Path, count: usize) -> Result<Readers, StoreError> {
        let idle = (0..count).map(|_| open_reader(path)).collect::<Result<Vec<_>, _>>()?;
        Ok(Readers { path: path.to_owned(), idle: Mutex::new(idle), permits: Semaphore::new(count) })
    }

    async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let _permit = self.permits.acquire().await.map_err(|_| StoreError::Closed)?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let pooled = this.idle.lock().map_err(|_| StoreError::Backend("reader pool poisoned".into()))?.pop();
            // A connection lost to a panic is replaced here.
            let mut conn = match pooled {
                Some(c) => c,
                None => open_reader(&this.path)?,
            };
            let result = f(&mut conn);
            if let Ok(mut idle) = this.idle.lock() {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| StoreError::Backend(format!("cannot open {} for reading: {e}", path.display())))?;
    conn.execute_batch("PRAGMA busy_timeout=5000;")?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------------
// Conversions

/// An id as SQLite's i64; ids past i64::MAX cannot exist, so they map to -1 which matches nothing.
fn sql_id(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(-1)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn rev_of(n: i64) -> Rev {
    Rev(to_u64(n))
}

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, what.to_owned(), rusqlite::types::Type::Null)
}

fn key_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Key> {
    let s: String = row.get(i)?;
    Key::try_from(s).map_err(|_| corrupt("key"))
}

fn value_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Value> {
    let s: String = row.get(i)?;
    Value::from_stored(s).map_err(|_| corrupt("value"))
}

fn home_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<HomeId>> {
    Ok(row.get::<_, Option<i64>>(i)?.and_then(|n| HomeId::new(to_u64(n))))
}

fn ts_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<Timestamp>> {
    Ok(row.get::<_, Option<i64>>(i)?.map(Timestamp))
}

fn not_found(store: StoreRef) -> StoreError {
    match store {
        StoreRef::Device(d) => StoreError::DeviceNotFound(d),
        StoreRef::Home(h) => StoreError::HomeNotFound(h),
    }
}

const DEVICE_COLUMNS: &str =
    "id, name, home_id, device_class, tag, created_ms, last_connect_ms, last_disconnect_ms";

fn device_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: DeviceId::new(to_u64(row.get(0)?)).ok_or_else(|| corrupt("device id"))?,
        name: row.get(1)?,
        home: home_col(row, 2)?,
        device_class: row.get(3)?,
        tag: row.get(4)?,
        created: Timestamp(row.get(5)?),
        last_connect: ts_col(row, 6)?,
        last_disconnect: ts_col(row, 7)?,
    })
}

fn home_row(row: &Row<'_>) -> rusqlite::Result<HomeRecord> {
    Ok(HomeRecord {
        id: HomeId::new(to_u64(row.get(0)?)).ok_or_else(|| corrupt("home id"))?,
        name: row.get(1)?,
        created: Timestamp(row.get(2)?),
    })
}

fn change_row(store: StoreRef, row: &Row<'_>) -> rusqlite::Result<Change> {
    let value: Option<String> = row.get(2)?;
    Ok(Change {
        store,
        rev: rev_of(row.get(0)?),
        key: key_col(row, 1)?,
        value: value.map(Value::from_stored).transpose().map_err(|_| corrupt("value"))?,
        time: Timestamp(row.get(3)?),
        home: home_col(row, 4)?,
        origin: Origin::from_parts(row.get(5)?, to_u64(row.get(6)?)),
    })
}

fn store_exists(conn: &Connection, store: StoreRef) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM stores WHERE kind = ?1 AND owner = ?2")?
        .query_row(params![store.kind(), sql_id(store.owner())], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

fn home_exists(conn: &Connection, id: HomeId) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM homes WHERE id = ?1")?
        .query_row([sql_id(id.get())], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

fn device_in(conn: &Connection, id: DeviceId) -> rusqlite::Result<Option<DeviceRecord>> {
    conn.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"))?
        .query_row([sql_id(id.get())], device_row)
        .optional()
}

fn delete_store(conn: &Connection, store: StoreRef) -> rusqlite::Result<()> {
    let (kind, owner) = (store.kind(), sql_id(store.owner()));
    conn.prepare_cached("DELETE FROM items WHERE kind = ?1 AND owner = ?2")?.execute(params![kind, owner])?;
    conn.prepare_cached("DELETE FROM changes WHERE kind = ?1 AND owner = ?2")?.execute(params![kind, owner])?;
    conn.prepare_cached("DELETE FROM stores WHERE kind = ?1 AND owner = ?2")?.execute(params![kind, owner])?;
    Ok(())
}

fn create_store(conn: &Connection, store: StoreRef) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO stores (kind, owner, rev, num_keys, history_from) VALUES (?1, ?2, 0, 0, 0)")?
        .execute(params![store.kind(), sql_id(store.owner())])?;
    Ok(())
}

fn api_key_homes(conn: &Connection, id: i64) -> rusqlite::Result<Vec<HomeId>> {
    let mut stmt = conn.prepare_cached("SELECT home_id FROM api_key_homes WHERE key_id = ?1 ORDER BY home_id")?;
    let rows = stmt.query_map([id], |r| r.get::<_, i64>(0))?;
    let mut homes = Vec::new();
    for h in rows {
        homes.extend(HomeId::new(to_u64(h?)));
    }
    Ok(homes)
}

fn api_key_row(conn: &Connection, row: &Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    let id: i64 = row.get(0)?;
    let all_homes: bool = row.get(3)?;
    let permission: String = row.get(2)?;
    Ok(ApiKeyRecord {
        id: ApiKeyId::new(to_u64(id)).ok_or_else(|| corrupt("api key id"))?,
        name: row.get(1)?,
        homes: if all_homes { None } else { Some(api_key_homes(conn, id)?) },
        permission: Permission::parse(&permission).ok_or_else(|| corrupt("permission"))?,
        created: Timestamp(row.get(4)?),
    })
}

// ---------------------------------------------------------------------------------------------
// The write transactions

fn apply_kv(conn: &Connection, w: &KvWrite, now: Timestamp, out: &mut Vec<Committed>) -> rusqlite::Result<Result<Change, StoreError>> {
    let (kind, owner) = (w.store.kind(), sql_id(w.store.owner()));
    let store_row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT rev, num_keys FROM stores WHERE kind = ?1 AND owner = ?2")?
        .query_row(params![kind, owner], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((store_rev, num_keys)) = store_row else {
        return Ok(Err(not_found(w.store)));
    };
    let current: Option<i64> = conn
        .prepare_cached("SELECT rev FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
        .query_row(params![kind, owner, w.key.as_str()], |r| r.get(0))
        .optional()?;
    let current_rev = current.map(rev_of);
    if !w.condition.holds(current_rev) {
        return Ok(Err(StoreError::RevisionMismatch { current: current_rev }));
    }
    let new_rev = store_rev + 1;
    let new_count = match &w.action {
        KvAction::Set(value) => {
            if current.is_none() && usize::try_from(num_keys).unwrap_or(usize::MAX) >= w.max_keys {
                return Ok(Err(StoreError::TooManyKeys { limit: w.max_keys }));
            }
            conn.prepare_cached(
                "INSERT INTO items (kind, owner, key, value, rev, modified_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (kind, owner, key) DO UPDATE SET value = excluded.value, rev = excluded.rev,
                 modified_ms = excluded.modified_ms",
            )?
            .execute(params![kind, owner, w.key.as_str(), value.as_json(), new_rev, now.millis()])?;
            num_keys + i64::from(current.is_none())
        }
        KvAction::Delete => {
            if current.is_none() {
                return Ok(Err(StoreError::KeyNotFound));
            }
            conn.prepare_cached("DELETE FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
                .execute(params![kind, owner, w.key.as_str()])?;
            num_keys - 1
        }
    };
    let home = match w.store {
        StoreRef::Device(d) => conn
            .prepare_cached("SELECT home_id FROM devices WHERE id = ?1")?
            .query_row([sql_id(d.get())], |r| home_col(r, 0))
            .optional()?
            .flatten(),
        StoreRef::Home(h) => Some(h),
    };
    let value = match &w.action {
        KvAction::Set(v) => Some(v.clone()),
        KvAction::Delete => None,
    };
    let (origin_kind, origin_id) = w.origin.to_parts();
    conn.prepare_cached(
        "INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        kind,
        owner,
        new_rev,
        w.key.as_str(),
        value.as_ref().map(Value::as_json),
        now.millis(),
        home.map(|h| sql_id(h.get())),
        origin_kind,
        sql_id(origin_id)
    ])?;
    conn.prepare_cached("UPDATE stores SET rev = ?3, num_keys = ?4 WHERE kind = ?1 AND owner = ?2")?
        .execute(params![kind, owner, new_rev, new_count])?;
    let change = Change {
        store: w.store,
        rev: rev_of(new_rev),
        key: w.key.clone(),
        value,
        time: now,
        home,
        origin: w.origin,
    };
    out.push(Committed::Kv(change.clone()));
    Ok(Ok(change))
}

fn trim(conn: &Connection, keep_changes: u64, cutoff_ms: i64) -> rusqlite::Result<u64> {
    let keep = sql_id(keep_changes);
    let candidates: Vec<(i64, i64, i64, i64)> = {
        let mut stmt = conn.prepare_cached("SELECT kind, owner, rev, history_from FROM stores WHERE rev - history_from > ?1")?;
        let rows = stmt.query_map([keep], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut removed = 0u64;
    for (kind, owner, rev, history_from) in candidates {
        let newest_droppable: Option<i64> = conn
            .prepare_cached(
                "SELECT MAX(rev) FROM changes WHERE kind = ?1 AND owner = ?2 AND rev <= ?3 AND modified_ms <= ?4",
            )?
            .query_row(params![kind, owner, rev - keep, cutoff_ms], |r| r.get(0))?;
        let Some(upto) = newest_droppable.filter(|&m| m > history_from) else { continue };
        removed += conn
            .prepare_cached("DELETE FROM changes WHERE kind = ?1 AND owner = ?2 AND rev <= ?3")?
            .execute(params![kind, owner, upto])? as u64;
        conn.prepare_cached("UPDATE stores SET history_from = ?3 WHERE kind = ?1 AND owner = ?2")?
            .execute(params![kind, owner, upto])?;
    }
    Ok(removed)
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, write: KvWrite) -> Result<Change, StoreError> {
        self.write_job(move |conn, now, out| apply_kv(conn, &write, now, out)).await
    }

    async fn get(&self, store: StoreRef, key: Key) -> Result<ItemRecord, StoreError> {
        self.read(move |conn| {
            let item = conn
                .prepare_cached("SELECT value, rev, modified_ms FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
                .query_row(params![store.kind(), sql_id(store.owner()), key.as_str()], |r| {
                    Ok(ItemRecord { key: key.clone(), value: value_col(r, 0)?, rev: rev_of(r.get(1)?), modified: Timestamp(r.get(2)?) })
                })
                .optional()?;
            match item {
                Some(item) => Ok(item),
                None if store_exists(conn, store)? => Err(StoreError::KeyNotFound),
                None => Err(not_found(store)),
            }
        })
        .await
    }

    async fn snapshot(&self, store: StoreRef, prefix: Option<String>) -> Result<Snapshot, StoreError> {
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let (kind, owner) = (store.kind(), sql_id(store.owner()));
            let rev: Option<i64> = tx
                .prepare_cached("SELECT rev FROM stores WHERE kind = ?1 AND owner = ?2")?
                .query_row(params![kind, owner], |r| r.get(0))
                .optional()?;
            let Some(rev) = rev else { return Err(not_found(store)) };
            // Keys use only characters below U+007F, so prefix..prefix+U+007F spans every key
            // that starts with the prefix.
            let (low, high) = match prefix {
                Some(p) => (p.clone(), format!("{p}\u{7f}")),
                None => (String::new(), "\u{7f}".to_owned()),
            };
            let items = {
                let mut stmt = tx.prepare_cached(
                    "SELECT key, value, rev, modified_ms FROM items
                     WHERE kind = ?1 AND owner = ?2 AND key >= ?3 AND key < ?4 ORDER BY key",
                )?;
                let rows = stmt.query_map(params![kind, owner, low, high], |r| {
                    Ok(ItemRecord { key: key_col(r, 0)?, value: value_col(r, 1)?, rev: rev_of(r.get(2)?), modified: Timestamp(r.get(3)?) })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok(Snapshot { rev: rev_of(rev), items })
        })
        .await
    }

    async fn changes_since(&self, store: StoreRef, after: Rev) -> Result<Option<Vec<Change>>, StoreError> {
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let (kind, owner) = (store.kind(), sql_id(store.owner()));
            let row: Option<(i64, i64)> = tx
                .prepare_cached("SELECT rev, history_from FROM stores WHERE kind = ?1 AND owner = ?2")?
                .query_row(params![kind, owner], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((rev, history_from)) = row else { return Err(not_found(store)) };
            let after = sql_id(after.0);
            if after < history_from || after > rev {
                return Ok(None);
            }
            let changes = {
                let mut stmt = tx.prepare_cached(
                    "SELECT rev, key, value, modified_ms, home_id, origin_kind, origin_id FROM changes
                     WHERE kind = ?1 AND owner = ?2 AND rev > ?3 ORDER BY rev",
                )?;
                let rows = stmt.query_map(params![kind, owner, after], |r| change_row(store, r))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok(Some(changes))
        })
        .await
    }

    async fn create_home(&self, name: String) -> Result<HomeRecord, StoreError> {
        self.write_job(move |conn, now, _| {
            conn.prepare_cached("INSERT INTO homes (name, created_ms) VALUES (?1, ?2)")?.execute(params![name, now.millis()])?;
            let id = HomeId::new(to_u64(conn.last_insert_rowid())).ok_or_else(|| corrupt("home id"))?;
            create_store(conn, StoreRef::Home(id))?;
            Ok(Ok(HomeRecord { id, name, created: now }))
        })
        .await
    }

    async fn homes(&self) -> Result<Vec<HomeRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT id, name, created_ms FROM homes ORDER BY id")?;
            let rows = stmt.query_map([], home_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn home(&self, id: HomeId) -> Result<HomeRecord, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT id, name, created_ms FROM homes WHERE id = ?1")?
                .query_row([sql_id(id.get())], home_row)
                .optional()?
                .ok_or(StoreError::HomeNotFound(id))
        })
        .await
    }

    async fn delete_home(&self, id: HomeId) -> Result<(), StoreError> {
        self.write_job(move |conn, _, out| {
            if !home_exists(conn, id)? {
                return Ok(Err(StoreError::HomeNotFound(id)));
            }
            let hid = sql_id(id.get());
            conn.prepare_cached("UPDATE devices SET home_id = NULL WHERE home_id = ?1")?.execute([hid])?;
            conn.prepare_cached("DELETE FROM api_key_homes WHERE home_id = ?1")?.execute([hid])?;
            delete_store(conn, StoreRef::Home(id))?;
            conn.prepare_cached("DELETE FROM homes WHERE id = ?1")?.execute([hid])?;
            out.push(Committed::Admin(AdminChange::HomeDeleted(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn create_device(&self, new: NewDevice) -> Result<DeviceRecord, StoreError> {
        self.write_job(move |conn, now, _| {
            if let Some(h) = new.home
                && !home_exists(conn, h)?
            {
                return Ok(Err(StoreError::HomeNotFound(h)));
            }
            conn.prepare_cached(
                "INSERT INTO devices (name, home_id, device_class, tag, key_hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![new.name, new.home.map(|h| sql_id(h.get())), new.device_class, new.tag, &new.key_hash[..], now.millis()])?;
            let id = DeviceId::new(to_u64(conn.last_insert_rowid())).ok_or_else(|| corrupt("device id"))?;
            create_store(conn, StoreRef::Device(id))?;
            Ok(Ok(DeviceRecord {
                id,
                name: new.name,
                home: new.home,
                device_class: new.device_class,
                tag: new.tag,
                created: now,
                last_connect: None,
                last_disconnect: None,
            }))
        })
        .await
    }

    async fn devices(&self, home: Option<HomeId>) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(move |conn| {
            let rows = match home {
                Some(h) => {
                    if !home_exists(conn, h)? {
                        return Err(StoreError::HomeNotFound(h));
                    }
                    let mut stmt =
                        conn.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE home_id = ?1 ORDER BY id"))?;
                    stmt.query_map([sql_id(h.get())], device_row)?.collect::<rusqlite::Result<Vec<_>>>()?
                }
                None => {
                    let mut stmt = conn.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))?;
                    stmt.query_map([], device_row)?.collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            Ok(rows)
        })
        .await
    }

    async fn device(&self, id: DeviceId) -> Result<DeviceRecord, StoreError> {
        self.read(move |conn| device_in(conn, id)?.ok_or(StoreError::DeviceNotFound(id))).await
    }

    async fn update_device(&self, id: DeviceId, update: DeviceUpdate) -> Result<DeviceRecord, StoreError> {
        self.write_job(move |conn, _, out| {
            let Some(mut device) = device_in(conn, id)? else {
                return Ok(Err(StoreError::DeviceNotFound(id)));
            };
            if let Some(to) = update.home {
                if let Some(h) = to {
                    if !home_exists(conn, h)? {
                        return Ok(Err(StoreError::HomeNotFound(h)));
                    }
                    if device.home == Some(h) {
                        return Ok(Err(StoreError::DeviceAlreadyInHome { device: id, home: h }));
                    }
                }
                if device.home != to {
                    conn.prepare_cached("UPDATE devices SET home_id = ?2 WHERE id = ?1")?
                        .execute(params![sql_id(id.get()), to.map(|h| sql_id(h.get()))])?;
                    out.push(Committed::Admin(AdminChange::DeviceMoved { device: id, from: device.home, to }));
                    device.home = to;
                }
            }
            if let Some(name) = update.name {
                conn.prepare_cached("UPDATE devices SET name = ?2 WHERE id = ?1")?.execute(params![sql_id(id.get()), name])?;
                device.name = name;
            }
            Ok(Ok(device))
        })
        .await
    }

    async fn rotate_device_key(&self, id: DeviceId, key_hash: [u8; 32]) -> Result<(), StoreError> {
        self.write_job(move |conn, _, out| {
            let n = conn
                .prepare_cached("UPDATE devices SET key_hash = ?2 WHERE id = ?1")?
                .execute(params![sql_id(id.get()), &key_hash[..]])?;
            if n == 0 {
                return Ok(Err(StoreError::DeviceNotFound(id)));
            }
            out.push(Committed::Admin(AdminChange::DeviceKeyRotated(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn delete_device(&self, id: DeviceId) -> Result<(), StoreError> {
        self.write_job(move |conn, _, out| {
            let n = conn.prepare_cached("DELETE FROM devices WHERE id = ?1")?.execute([sql_id(id.get())])?;
            if n == 0 {
                return Ok(Err(StoreError::DeviceNotFound(id)));
            }
            delete_store(conn, StoreRef::Device(id))?;
            out.push(Committed::Admin(AdminChange::DeviceDeleted(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn record_connection(&self, id: DeviceId, connected: bool, at: Timestamp) -> Result<(), StoreError> {
        self.write_job(move |conn, _, _| {
            let sql = if connected {
                "UPDATE devices SET last_connect_ms = ?2 WHERE id = ?1"
            } else {
                "UPDATE devices SET last_disconnect_ms = ?2 WHERE id = ?1"
            };
            let n = conn.prepare_cached(sql)?.execute(params![sql_id(id.get()), at.millis()])?;
            Ok(if n == 0 { Err(StoreError::DeviceNotFound(id)) } else { Ok(()) })
        })
        .await
    }

    async fn create_api_key(&self, new: NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        self.write_job(move |conn, now, _| {
            let mut homes = new.homes.clone();
            if let Some(list) = homes.as_mut() {
                list.sort_unstable();
                list.dedup();
                for &h in list.iter() {
                    if !home_exists(conn, h)? {
                        return Ok(Err(StoreError::HomeNotFound(h)));
                    }
                }
            }
            conn.prepare_cached(
                "INSERT INTO api_keys (name, permission, all_homes, key_hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![new.name, new.permission.as_str(), homes.is_none(), &new.key_hash[..], now.millis()])?;
            let raw_id = conn.last_insert_rowid();
            for h in homes.iter().flatten() {
                conn.prepare_cached("INSERT INTO api_key_homes (key_id, home_id) VALUES (?1, ?2)")?
                    .execute(params![raw_id, sql_id(h.get())])?;
            }
            let id = ApiKeyId::new(to_u64(raw_id)).ok_or_else(|| corrupt("api key id"))?;
            Ok(Ok(ApiKeyRecord { id, name: new.name, homes, permission: new.permission, created: now }))
        })
        .await
    }

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT id, name, permission, all_homes, created_ms FROM api_keys ORDER BY id")?;
            let mut rows = stmt.query([])?;
            let mut keys = Vec::new();
            while let Some(row) = rows.next()? {
                keys.push(api_key_row(conn, row)?);
            }
            Ok(keys)
        })
        .await
    }

    async fn delete_api_key(&self, id: ApiKeyId) -> Result<(), StoreError> {
        self.write_job(move |conn, _, out| {
            let n = conn.prepare_cached("DELETE FROM api_keys WHERE id = ?1")?.execute([sql_id(id.get())])?;
            if n == 0 {
                return Ok(Err(StoreError::ApiKeyNotFound(id)));
            }
            conn.prepare_cached("DELETE FROM api_key_homes WHERE key_id = ?1")?.execute([sql_id(id.get())])?;
            out.push(Committed::Admin(AdminChange::ApiKeyDeleted(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn principal_by_key_hash(&self, key_hash: [u8; 32]) -> Result<Option<KeyHolder>, StoreError> {
        self.read(move |conn| {
            let device: Option<i64> = conn
                .prepare_cached("SELECT id FROM devices WHERE key_hash = ?1")?
                .query_row([&key_hash[..]], |r| r.get(0))
                .optional()?;
            if let Some(id) = device.and_then(|d| DeviceId::new(to_u64(d))) {
                return Ok(Some(KeyHolder::Device(id)));
            }
            let mut stmt =
                conn.prepare_cached("SELECT id, name, permission, all_homes, created_ms FROM api_keys WHERE key_hash = ?1")?;
            let mut rows = stmt.query([&key_hash[..]])?;
            match rows.next()? {
                Some(row) => Ok(Some(KeyHolder::Project(api_key_row(conn, row)?))),
                None => Ok(None),
            }
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.sender.is_closed() {
            return Err(StoreError::Closed);
        }
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    async fn trim_history(&self, keep_changes: u64, keep_age_ms: i64) -> Result<u64, StoreError> {
        self.write_job(move |conn, now, _| Ok(Ok(trim(conn, keep_changes, now.millis() - keep_age_ms)?))).await
    }

    async fn close(&self) {
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        let Some(handle) = handle else { return };
        // Everything queued before the sentinel is committed; whatever comes after finds the
        // channel closed and gets `Closed` (never acknowledged, never applied).
        if self.sender.send(Msg::Shutdown).await.is_err() {
            tracing::warn!("storage writer had already stopped");
        }
        if tokio::task::spawn_blocking(move || handle.join()).await.is_err() {
            tracing::error!("storage writer thread panicked");
        }
    }
}
