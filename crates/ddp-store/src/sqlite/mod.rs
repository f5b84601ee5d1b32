//! The embedded default backend: one SQLite database file in WAL mode.
//!
//! - **Group commit, pipelined** (`writer`): one writer thread owns the only read-write
//!   connection and applies every write waiting at that moment in one transaction; a syncer
//!   thread makes each batch durable with one `fdatasync` of the WAL and only then hands its
//!   changes to the [`CommitSink`] (in commit order) and answers the writers. While a batch is
//!   being synced, the next one is already applied.
//! - **Nothing unsynced is ever seen**: reads (`readers`) wait until what they read is durable,
//!   and sessions only hear of a change after its fsync. A crash loses only writes that were never
//!   acknowledged and never shown, so no rev handed out is ever handed out again.
//! - **Checkpoints** (`checkpoint`) run on their own connection and thread.
//! - **History**: changes are appended under a global sequence (`schema`), with a small index by
//!   store and rev for resuming sessions.
//!
//! # Layout
//! - `schema`: tables and migrations.
//! - `writer`: the write pipeline and the durability watermarks.
//! - `ops`: what the key-value writes and the history trimming do in SQL.
//! - `fleet`: device queries and jobs (PROTOCOL.md §12).
//! - `rows`: row ↔ record conversions and small shared queries.
//! - `readers`: the read-only connection pool.
//! - `checkpoint`: WAL checkpoints.

mod checkpoint;
mod fleet;
mod ops;
mod readers;
mod rows;
mod schema;
mod state;
mod writer;

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use ddp_protocol::{ApiKeyId, DeviceId, HomeId, JobId, Key, Rev, Timestamp};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use self::checkpoint::Checkpointer;
use self::ops::{apply_batch, trim};
use self::readers::Readers;
use self::rows::*;
use self::schema::migrate;
use self::writer::{Durability, FnJob, Msg, Tx};
use crate::fleet::{ClaimOutcome, DeviceQuery, JobRecord, JobState, NewJob, ValueIndex};
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
    /// The keys whose values fleet queries read from an index (PROTOCOL.md §12).
    pub value_index: ValueIndex,
}

impl SqliteOptions {
    /// Defaults for the database file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteOptions {
        SqliteOptions { path: path.into(), readers: 4, max_batch: 1024, queue: 8192, value_index: ValueIndex::Off }
    }
}

/// The SQLite store. See the [module docs](self).
pub struct SqliteStore {
    sender: mpsc::Sender<Msg>,
    sink: Arc<dyn CommitSink>,
    sessions: Mutex<std::collections::HashMap<DeviceId, usize>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Readers>,
    checkpointer: Arc<Checkpointer>,
    durability: Arc<Durability>,
    value_index: Arc<ValueIndex>,
}

/// The WAL file, opened for `fdatasync` (on Linux an fsync on any descriptor flushes the file),
/// with its directory entry made durable.
fn open_wal(db: &std::path::Path) -> Result<File, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    let wal = File::options()
        .read(true)
        .write(true)
        .open(&name)
        .map_err(|e| StoreError::Backend(format!("cannot open the write-ahead log {}: {e}", name.display())))?;
    wal.sync_all().map_err(|e| StoreError::Backend(format!("cannot sync the write-ahead log: {e}")))?;
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Backend(format!("cannot sync the data directory {}: {e}", dir.display())))?;
    }
    Ok(wal)
}

impl SqliteStore {
    /// Uncounts a session; true when it was the device's last.
    fn forget_session(&self, device: DeviceId) -> bool {
        let Ok(mut sessions) = self.sessions.lock() else { return false };
        match sessions.get_mut(&device) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                sessions.remove(&device);
                true
            }
            None => false,
        }
    }

    /// Writes a connection time (`column` is one of the two connection-time columns); returns the
    /// device's home.
    async fn record_connection(
        &self,
        id: DeviceId,
        column: &'static str,
        at: Timestamp,
    ) -> Result<Option<HomeId>, StoreError> {
        self.write_job(move |tx| {
            let sql = format!("UPDATE devices SET {column} = ?2 WHERE id = ?1 RETURNING home_id");
            let home = tx
                .conn
                .prepare_cached(&sql)?
                .query_row(params![sql_id(id.get()), at.millis()], |r| home_col(r, 0))
                .optional()?;
            Ok(home.ok_or(StoreError::DeviceNotFound(id)))
        })
        .await
    }

    /// Opens (creating or migrating) the database and starts the writer thread. Blocking: call
    /// it at start-up or from a blocking context.
    pub fn open(options: SqliteOptions, sink: Arc<dyn CommitSink>) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open_with_flags(
            &options.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", options.path.display())))?;
        // 2 KiB pages (for a new database): a write dirties a few random pages, and every dirty
        // page goes to the WAL whole, so smaller pages mean fewer bytes per fsync.
        conn.execute_batch("PRAGMA page_size=2048")?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!("SQLite refused WAL mode (got {mode})")));
        }
        // NORMAL: COMMIT does not wait for the disk; the syncer's fdatasync of the WAL does, before
        // anyone hears of the batch. Checkpoints run on their own thread, never in a commit (the
        // writer only copies the last frames between two batches, so the WAL starts over).
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=OFF; PRAGMA wal_autocheckpoint=0;
             PRAGMA cache_size=-8192; PRAGMA journal_size_limit=67108864;",
        )?;
        migrate(&mut conn)?;
        let (built, dropped) = fleet::reconcile_value_index(&conn, &options.value_index)?;
        if built + dropped > 0 {
            tracing::info!(keys = %options.value_index.describe(), built, dropped, "fleet value indexes changed");
        }
        let released = fleet::release_claims(&conn)?;
        if released > 0 {
            tracing::info!(devices = released, "job devices claimed before the restart may be claimed again");
        }
        // The writer's statements (batches use a few multi-row texts per kind) all stay prepared.
        conn.set_prepared_statement_cache_capacity(128);
        let wal = open_wal(&options.path)?;

        let durability = Arc::new(Durability::new());
        let readers = Arc::new(Readers::open(&options.path, options.readers.max(1), durability.clone())?);
        let (sender, receiver) = mpsc::channel(options.queue.max(1));
        let checkpointer = Arc::new(Checkpointer::start(&options.path)?);
        let writer = writer::start(
            conn,
            wal,
            receiver,
            options.max_batch.max(1),
            sink.clone(),
            durability.clone(),
            checkpointer.tail(),
        )?;
        Ok(SqliteStore {
            sender,
            sink,
            sessions: Mutex::default(),
            writer: Mutex::new(Some(writer)),
            readers,
            checkpointer,
            durability,
            value_index: Arc::new(options.value_index),
        })
    }

    /// Runs `f` in the writer's next batch transaction.
    async fn write_job<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> rusqlite::Result<Result<T, StoreError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(FnJob::new(Box::new(f), reply));
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

#[async_trait]
impl Store for SqliteStore {
    async fn write_batch(&self, batch: KvBatch) -> Result<Vec<Change>, StoreError> {
        if batch.ops.is_empty() {
            return Ok(Vec::new()); // nothing to commit
        }
        self.write_job(move |tx| apply_batch(tx, &batch)).await
    }

    async fn get(&self, store: StoreRef, key: Key) -> Result<ItemRecord, StoreError> {
        self.read(move |conn| {
            let item = conn
                .prepare_cached(
                    "SELECT value, rev, modified_ms FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3",
                )?
                .query_row(params![store.kind(), sql_id(store.owner()), key.as_str()], |r| {
                    Ok(ItemRecord {
                        key: key.clone(),
                        value: value_col(r, 0)?,
                        rev: rev_of(r.get(1)?),
                        modified: Timestamp(r.get(2)?),
                    })
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
            let Some(rev) = store_rev(&tx, store)? else { return Err(not_found(store)) };
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
                    Ok(ItemRecord {
                        key: key_col(r, 0)?,
                        value: value_col(r, 1)?,
                        rev: rev_of(r.get(2)?),
                        modified: Timestamp(r.get(3)?),
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok(Snapshot { rev, items })
        })
        .await
    }

    async fn changes_since(&self, store: StoreRef, after: Rev) -> Result<Option<Vec<Change>>, StoreError> {
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let (kind, owner) = (store.kind(), sql_id(store.owner()));
            let Some((rev, history_from)) = store_rev_and_history(&tx, store)? else { return Err(not_found(store)) };
            let after = sql_id(after.0);
            if after < history_from || after > sql_id(rev.0) {
                return Ok(None);
            }
            let changes = {
                let mut stmt = tx.prepare_cached(
                    "SELECT rev, key, value, modified_ms, home_id, origin_kind, origin_id, batch_last FROM changes
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
        self.write_job(move |tx| {
            let (conn, now) = (tx.conn, tx.now);
            conn.prepare_cached("INSERT INTO homes (name, created_ms) VALUES (?1, ?2)")?
                .execute(params![name, now.millis()])?;
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
        self.write_job(move |tx| {
            let conn = tx.conn;
            if !home_exists(conn, id)? {
                return Ok(Err(StoreError::HomeNotFound(id)));
            }
            let hid = sql_id(id.get());
            conn.prepare_cached("UPDATE devices SET home_id = NULL WHERE home_id = ?1")?.execute([hid])?;
            conn.prepare_cached("DELETE FROM api_key_homes WHERE home_id = ?1")?.execute([hid])?;
            delete_store(conn, StoreRef::Home(id))?;
            conn.prepare_cached("DELETE FROM homes WHERE id = ?1")?.execute([hid])?;
            // Its devices changed home; its store is gone.
            tx.states.clear();
            tx.out.push(Committed::Admin(AdminChange::HomeDeleted(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn create_device(&self, new: NewDevice) -> Result<DeviceRecord, StoreError> {
        self.write_job(move |tx| {
            let (conn, now) = (tx.conn, tx.now);
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
            Ok(Ok(new.into_record(id, now)))
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
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {DEVICE_COLUMNS} FROM devices WHERE home_id = ?1 ORDER BY id"
                    ))?;
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
        self.write_job(move |tx| {
            let conn = tx.conn;
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
                    tx.out.push(Committed::Admin(AdminChange::DeviceMoved { device: id, from: device.home, to }));
                    tx.states.forget(StoreRef::Device(id));
                    device.home = to;
                }
            }
            if let Some(name) = update.name {
                conn.prepare_cached("UPDATE devices SET name = ?2 WHERE id = ?1")?
                    .execute(params![sql_id(id.get()), name])?;
                device.name = name;
            }
            Ok(Ok(device))
        })
        .await
    }

    async fn rotate_device_key(&self, id: DeviceId, key_hash: [u8; 32]) -> Result<(), StoreError> {
        self.write_job(move |tx| {
            let conn = tx.conn;
            let n = conn
                .prepare_cached("UPDATE devices SET key_hash = ?2 WHERE id = ?1")?
                .execute(params![sql_id(id.get()), &key_hash[..]])?;
            if n == 0 {
                return Ok(Err(StoreError::DeviceNotFound(id)));
            }
            tx.out.push(Committed::Admin(AdminChange::DeviceKeyRotated(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn delete_device(&self, id: DeviceId) -> Result<(), StoreError> {
        self.write_job(move |tx| {
            let conn = tx.conn;
            let n = conn.prepare_cached("DELETE FROM devices WHERE id = ?1")?.execute([sql_id(id.get())])?;
            if n == 0 {
                return Ok(Err(StoreError::DeviceNotFound(id)));
            }
            delete_store(conn, StoreRef::Device(id))?;
            conn.prepare_cached("DELETE FROM device_sync WHERE device_id = ?1")?.execute([sql_id(id.get())])?;
            tx.states.forget(StoreRef::Device(id));
            tx.out.push(Committed::Admin(AdminChange::DeviceDeleted(id)));
            Ok(Ok(()))
        })
        .await
    }

    async fn session_opened(&self, device: DeviceId, max: usize, at: Timestamp) -> Result<SessionOpened, StoreError> {
        // One node: the count lives here; only the connection time needs the disk.
        let first = {
            let mut sessions =
                self.sessions.lock().map_err(|_| StoreError::Backend("session registry poisoned".into()))?;
            let n = sessions.entry(device).or_insert(0);
            if *n >= max {
                return Ok(SessionOpened::Refused);
            }
            *n += 1;
            *n == 1
        };
        if !first {
            return Ok(SessionOpened::Opened { first, home: None });
        }
        match self.record_connection(device, "last_connect_ms", at).await {
            Ok(home) => Ok(SessionOpened::Opened { first, home }),
            Err(e) => {
                self.forget_session(device);
                Err(e)
            }
        }
    }

    async fn session_closed(&self, device: DeviceId, at: Timestamp) -> Result<SessionClosed, StoreError> {
        if !self.forget_session(device) {
            return Ok(SessionClosed::Others);
        }
        match self.record_connection(device, "last_disconnect_ms", at).await {
            Ok(home) => Ok(SessionClosed::Last { home }),
            Err(StoreError::DeviceNotFound(_)) => Ok(SessionClosed::Last { home: None }),
            Err(e) => Err(e),
        }
    }

    async fn connected(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceId>, StoreError> {
        let sessions = self.sessions.lock().map_err(|_| StoreError::Backend("session registry poisoned".into()))?;
        Ok(devices.into_iter().filter(|d| sessions.contains_key(d)).collect())
    }

    async fn broadcast_event(&self, home: HomeId, json: String) -> Result<(), StoreError> {
        // One node: its own sink is every node's.
        self.sink.committed(&[Committed::Event { home, json: Arc::from(json) }]);
        Ok(())
    }

    async fn broadcast_command(&self, device: DeviceId, json: String) -> Result<(), StoreError> {
        self.sink.committed(&[Committed::Command { device, json: Arc::from(json) }]);
        Ok(())
    }

    async fn record_sync(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        // In the writer's next batch, with whatever writes it carries: no fsync of its own
        // while writes flow.
        self.write_job(move |tx| {
            let mut stmt = tx.conn.prepare_cached(
                "INSERT INTO device_sync (device_id, delivered_rev, applied_rev, applied_ms)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)
                 ON CONFLICT (device_id) DO UPDATE SET
                     delivered_rev = MAX(delivered_rev, excluded.delivered_rev),
                     applied_ms = CASE WHEN excluded.applied_rev > applied_rev
                                         OR (excluded.applied_rev = applied_rev AND applied_ms IS NULL)
                                       THEN excluded.applied_ms ELSE applied_ms END,
                     applied_rev = MAX(applied_rev, excluded.applied_rev)",
            )?;
            for (device, p) in &progress {
                stmt.execute(params![
                    sql_id(device.get()),
                    sql_id(p.delivered.0),
                    sql_id(p.applied.0),
                    p.applied_at.map(Timestamp::millis)
                ])?;
            }
            Ok(Ok(()))
        })
        .await
    }

    async fn device_sync(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceSync>, StoreError> {
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let mut out = Vec::with_capacity(devices.len());
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT MAX(s.rev, COALESCE((SELECT MAX(c.rev) FROM changes c WHERE c.kind = 0 AND c.owner = s.owner), 0)),
                            d.delivered_rev, d.applied_rev, d.applied_ms
                     FROM stores s LEFT JOIN device_sync d ON d.device_id = s.owner
                     WHERE s.kind = 0 AND s.owner = ?1",
                )?;
                for device in devices {
                    let row = stmt
                        .query_row([sql_id(device.get())], |r| {
                            Ok(DeviceSync {
                                device,
                                rev: rev_of(r.get(0)?),
                                progress: SyncProgress {
                                    delivered: rev_of(r.get::<_, Option<i64>>(1)?.unwrap_or(0)),
                                    applied: rev_of(r.get::<_, Option<i64>>(2)?.unwrap_or(0)),
                                    applied_at: r.get::<_, Option<i64>>(3)?.map(Timestamp),
                                },
                            })
                        })
                        .optional()?;
                    out.extend(row);
                }
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn broadcast_sync(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError> {
        if !progress.is_empty() {
            self.sink.committed(&[Committed::Sync(Arc::from(progress))]);
        }
        Ok(())
    }

    async fn find_devices(&self, query: DeviceQuery) -> Result<Vec<DeviceRecord>, StoreError> {
        let index = self.value_index.clone();
        self.read(move |conn| fleet::find_devices(conn, &index, &query)).await
    }

    async fn create_job(&self, new: NewJob) -> Result<JobRecord, StoreError> {
        let id = self.write_job(move |tx| fleet::create_job(tx, &new)).await?;
        self.job(id).await
    }

    async fn jobs(&self, api_key: Option<ApiKeyId>) -> Result<Vec<JobRecord>, StoreError> {
        self.read(move |conn| fleet::jobs(conn, api_key)).await
    }

    async fn job(&self, id: JobId) -> Result<JobRecord, StoreError> {
        self.read(move |conn| fleet::job(conn, id)).await
    }

    async fn cancel_job(&self, id: JobId) -> Result<JobRecord, StoreError> {
        if !self.write_job(move |tx| fleet::cancel_job(tx, id).map(Ok)).await? {
            return Err(StoreError::JobNotFound(id));
        }
        self.job(id).await
    }

    async fn claim_job_work(&self, max: usize, lease_ms: i64, now: Timestamp) -> Result<ClaimOutcome, StoreError> {
        self.write_job(move |tx| fleet::claim(tx, max, lease_ms, now).map(Ok)).await
    }

    async fn job_results(&self, job: JobId, failed: Vec<(DeviceId, String)>) -> Result<JobState, StoreError> {
        self.write_job(move |tx| fleet::results(tx, job, &failed)).await
    }

    async fn create_api_key(&self, new: NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        self.write_job(move |tx| {
            let (conn, now) = (tx.conn, tx.now);
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
            .execute(params![
                new.name,
                new.permission.as_str(),
                homes.is_none(),
                &new.key_hash[..],
                now.millis()
            ])?;
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
            let mut stmt =
                conn.prepare_cached("SELECT id, name, permission, all_homes, created_ms FROM api_keys ORDER BY id")?;
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
        self.write_job(move |tx| {
            let conn = tx.conn;
            let n = conn.prepare_cached("DELETE FROM api_keys WHERE id = ?1")?.execute([sql_id(id.get())])?;
            if n == 0 {
                return Ok(Err(StoreError::ApiKeyNotFound(id)));
            }
            conn.prepare_cached("DELETE FROM api_key_homes WHERE key_id = ?1")?.execute([sql_id(id.get())])?;
            tx.out.push(Committed::Admin(AdminChange::ApiKeyDeleted(id)));
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
            let mut stmt = conn.prepare_cached(
                "SELECT id, name, permission, all_homes, created_ms FROM api_keys WHERE key_hash = ?1",
            )?;
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
        if self.durability.has_failed() {
            return Err(StoreError::Backend("an fsync failed; restart the server after checking the disk".into()));
        }
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    async fn trim_history(&self, keep_changes: u64, keep_age_ms: i64) -> Result<u64, StoreError> {
        self.write_job(move |tx| {
            let cutoff = tx.now.millis() - keep_age_ms;
            Ok(Ok(trim(tx, keep_changes, cutoff)?))
        })
        .await
    }

    async fn close(&self) {
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        let Some(handle) = handle else { return };
        // Everything queued before the sentinel is committed; whatever comes after finds the
        // channel closed and gets `Closed` (never acknowledged, never applied).
        if self.sender.send(Msg::Shutdown).await.is_err() {
            tracing::warn!("storage writer had already stopped");
        }
        let joined = tokio::task::spawn_blocking(move || handle.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("storage writer thread panicked");
        }
        let checkpointer = self.checkpointer.clone();
        let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
    }
}
