//! The scale-out backend: several `ddp serve` nodes on one PostgreSQL database.
//!
//! - **Writes** (`writer`) are group-committed: a few batcher tasks each send every batch waiting
//!   (up to 128 ops) in one `ddp_kv_apply` call — one round trip, one commit with
//!   `synchronous_commit = on`. For each batch, `ddp_kv_apply` (`schema`) locks the store's row,
//!   works every op out (preconditions, deletes, merges, limits) before writing anything, then
//!   writes the items and appends the changes with consecutive revs. Locking the store row
//!   serialises writers to one store whichever node they are on, so revs are contiguous and change
//!   rows of one store become visible in rev order.
//! - **Fan-out** (`feed`): every node reads the `changes`, `admin_log` and `event_log` tables
//!   after a cursor of sequence numbers, and hands what it has not seen to its [`CommitSink`].
//!   A write's node announces it with `NOTIFY ddp` after commit (outside the write transaction, so
//!   writers never queue on PostgreSQL's notification lock); the other nodes `LISTEN` on a
//!   dedicated connection and read at once. A lost notification or a dropped listener costs
//!   latency only: nodes also poll every second, and read from their cursor after reconnecting.
//! - **Presence** (`ddp_session_open` / `ddp_session_close`): live sessions are counted per device
//!   and node; nodes heartbeat, and the sessions of a node that stops heartbeating stop counting
//!   (and are reaped later), so the per-device cap and `isConnected` hold across nodes.
//! - **Admin changes** are logged for the other nodes and handed to this node's sink before the
//!   call returns (the sink's reactions are idempotent, so seeing them again from the feed is
//!   harmless).
//!
//! Ids come from identity columns, so they are never reused.
//!
//! # Layout
//! - this module: [`PgStore`] and its [`Store`] implementation.
//! - `schema`: the tables, the SQL functions and migrations.
//! - `writer`: the group-commit batchers.
//! - `feed`: the change feed (cursors, gaps, LISTEN/NOTIFY) and the announcer.
//! - `fleet`: device queries and jobs (PROTOCOL.md §12), work claimed in the database.
//! - `presence`: sessions counted per device and node, heartbeats, reaping.
//! - `progress`: delivery and acknowledgement per device, recorded and shared.
//! - `rows`: rows into records, and the statements several operations share.

mod feed;
mod fleet;
mod presence;
mod progress;
mod rows;
mod schema;
mod writer;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ddp_protocol::{ApiKeyId, DeviceId, HomeId, JobId, Key, Rev, Timestamp};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use self::feed::{Announcer, Feed};
use self::presence::heartbeat_loop;
use self::rows::*;
use crate::fleet::{ClaimOutcome, DeviceQuery, JobRecord, JobState, NewJob, ValueIndex};
use crate::model::*;
use crate::sql::{not_found, rev_of, sql_id, to_u64};
use crate::{CommitSink, Store, StoreError};

/// How long admin changes and events stay in their logs for nodes that are catching up.
const LOG_KEEP_MS: i64 = 3_600_000;
/// Tasks committing batches of writes at the same time.
const BATCHERS: usize = 4;
/// Most writes in one batch.
const MAX_BATCH: usize = 128;
/// Writes that may wait for a batcher before callers wait for room.
const WRITE_QUEUE: usize = 8192;

/// Settings of the PostgreSQL backend.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A connection URL or key-value string, e.g. `postgres://ddp:secret@db:5432/ddp`.
    pub url: String,
    /// Most pooled connections (the feed uses one more of its own).
    pub pool_size: usize,
    /// A name for this node in `pg_stat_activity` and the `nodes` table.
    pub node_name: String,
    /// The keys whose values fleet queries read from an index (PROTOCOL.md §12); every node
    /// should be given the same.
    pub value_index: ValueIndex,
}

impl PgOptions {
    /// Defaults for the database at `url`.
    pub fn new(url: impl Into<String>) -> PgOptions {
        PgOptions { url: url.into(), pool_size: 32, node_name: "ddp".into(), value_index: ValueIndex::Off }
    }

    /// The database for logs and errors: user, hosts and database name, never the password.
    pub fn describe(&self) -> String {
        let Ok(config) = tokio_postgres::Config::from_str(&self.url) else {
            return "PostgreSQL (unparsable URL)".into();
        };
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}:{port}", p.display()),
            })
            .collect();
        format!(
            "PostgreSQL database {} on {} as {}",
            config.get_dbname().unwrap_or("(default)"),
            hosts.join(","),
            config.get_user().unwrap_or("(default user)")
        )
    }
}

/// The PostgreSQL store. See the [module docs](self).
pub struct PgStore {
    pool: Pool,
    node: i64,
    sink: Arc<dyn CommitSink>,
    feed: Arc<Feed>,
    announcer: Arc<Announcer>,
    /// This node's live sessions per device, to re-register after its presence was reaped.
    local: Arc<Mutex<HashMap<DeviceId, i32>>>,
    /// The write queue; `None` once closed.
    writes: Mutex<Option<tokio::sync::mpsc::Sender<writer::Pending>>>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
    value_index: Arc<ValueIndex>,
}

/// The settings every connection runs with: durable commits (whatever the server's default),
/// and bounded statements and transactions, so a stuck one cannot hold a store's lock forever.
const SESSION_OPTIONS: &str =
    "-c synchronous_commit=on -c statement_timeout=30000 -c idle_in_transaction_session_timeout=30000";

fn pg_config(url: &str, application: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::Backend(format!("bad PostgreSQL URL (--database / DDP_DATABASE_URL): {}", StoreError::from(e)))
    })?;
    let options = match config.get_options() {
        Some(given) => format!("{SESSION_OPTIONS} {given}"),
        None => SESSION_OPTIONS.to_owned(),
    };
    config.options(&options);
    if config.get_application_name().is_none() {
        config.application_name(application);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

impl PgStore {
    /// Connects, migrates the schema (several nodes may start at once), registers this node and
    /// starts its feed, heartbeat and announcer tasks. Must be called inside a Tokio runtime.
    pub async fn open(options: PgOptions, sink: Arc<dyn CommitSink>) -> Result<PgStore, StoreError> {
        let config = pg_config(&options.url, &options.node_name)?;
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot build the PostgreSQL pool: {e}")))?;
        let mut client = pool.get().await?;
        schema::migrate(&mut client).await?;
        if schema::reconcile_value_index(&mut client, &options.value_index).await? {
            tracing::info!(keys = %options.value_index.describe(), "fleet value index rebuilt");
        }

        // A random node id: nodes need no configuration to be told apart.
        let node = i64::try_from(rand::random::<u64>() >> 1).unwrap_or(1).max(1);
        client
            .execute(
                "INSERT INTO nodes (id, name, heartbeat) VALUES ($1, $2, clock_timestamp())",
                &[&node, &options.node_name],
            )
            .await?;
        let cursors = feed::Cursors::start_at_head(&client).await?;
        drop(client);

        let feed = Arc::new(Feed::default());
        let announcer = Arc::new(Announcer::default());
        let (stop, stopped) = watch::channel(false);
        let local = Arc::new(Mutex::new(HashMap::new()));
        let (writes, writers) =
            writer::start(pool.clone(), BATCHERS, MAX_BATCH, WRITE_QUEUE, feed.clone(), announcer.clone());
        let tasks = vec![
            tokio::spawn(feed::read_loop(config, cursors, feed.clone(), sink.clone(), stopped.clone())),
            tokio::spawn(feed::announce_loop(pool.clone(), announcer.clone(), stopped.clone())),
            tokio::spawn(heartbeat_loop(pool.clone(), node, options.node_name.clone(), local.clone(), stopped)),
        ];
        tracing::info!(node, "PostgreSQL store open");
        Ok(PgStore {
            pool,
            node,
            sink,
            feed,
            announcer,
            local,
            writes: Mutex::new(Some(writes)),
            writers: Mutex::new(writers),
            stop,
            tasks: Mutex::new(tasks),
            closed: AtomicBool::new(false),
            value_index: Arc::new(options.value_index),
        })
    }

    /// This node's id in the `nodes` table.
    pub fn node_id(&self) -> i64 {
        self.node
    }

    /// The value of a setting shared by every node, or `None`.
    pub async fn setting(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client.query_opt("SELECT value FROM settings WHERE name = $1", &[&name]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Stores `value` under `name` unless the setting exists; returns the value in force (this
    /// one, or the one another node stored first).
    pub async fn setting_or_insert(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &value],
            )
            .await?;
        let row = client.query_one("SELECT value FROM settings WHERE name = $1", &[&name]).await?;
        Ok(row.try_get(0)?)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(self.pool.get().await?)
    }

    /// After a committed admin change: this node's sink reacts now, the others when they read
    /// the log.
    /// Logs `change` in the admin log inside `tx`, commits, and tells this node at once.
    async fn commit_admin(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        change: AdminChange,
    ) -> Result<(), StoreError> {
        log_admin(&tx, &change, Timestamp::now()).await?;
        tx.commit().await?;
        self.admin_committed(change);
        Ok(())
    }

    fn admin_committed(&self, change: AdminChange) {
        self.sink.committed(&[Committed::Admin(change)]);
        self.announcer.announce("admin");
        self.feed.wake();
    }
}

#[async_trait]
impl Store for PgStore {
    async fn write_batch(&self, batch: KvBatch) -> Result<Vec<Change>, StoreError> {
        if batch.ops.is_empty() {
            return Ok(Vec::new()); // nothing to commit
        }
        let queue = self.writes.lock().ok().and_then(|w| w.clone()).ok_or(StoreError::Closed)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        queue.send(writer::Pending { batch, reply }).await.map_err(|_| StoreError::Closed)?;
        let mut changes = answer.await.unwrap_or(Err(StoreError::Closed))?;
        writer::mark_batch(&mut changes);
        Ok(changes)
    }

    async fn get(&self, store: StoreRef, key: Key) -> Result<ItemRecord, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT i.value, i.rev, i.modified_ms FROM stores s
                 LEFT JOIN items i ON i.kind = s.kind AND i.owner = s.owner AND i.key = $3
                 WHERE s.kind = $1 AND s.owner = $2",
            )
            .await?;
        let row = client
            .query_opt(&stmt, &[&(store.kind() as i16), &sql_id(store.owner()), &key.as_str()])
            .await?
            .ok_or_else(|| not_found(store))?;
        let Some(value) = row.try_get::<_, Option<String>>(0)? else { return Err(StoreError::KeyNotFound) };
        Ok(ItemRecord {
            key,
            value: value_of(value)?,
            rev: rev_of(row.try_get(1)?),
            modified: Timestamp(row.try_get(2)?),
        })
    }

    async fn snapshot(&self, store: StoreRef, prefix: Option<String>) -> Result<Snapshot, StoreError> {
        let client = self.client().await?;
        // One statement: one consistent view of the rev and the items. Keys use only characters
        // below U+007F, so prefix..prefix+U+007F spans every key that starts with the prefix.
        let stmt = client
            .prepare_cached(
                "SELECT s.rev, i.key, i.value, i.rev, i.modified_ms FROM stores s
                 LEFT JOIN items i ON i.kind = s.kind AND i.owner = s.owner AND i.key >= $3 AND i.key < $4
                 WHERE s.kind = $1 AND s.owner = $2 ORDER BY i.key",
            )
            .await?;
        let (low, high) = match prefix {
            Some(p) => (p.clone(), format!("{p}\u{7f}")),
            None => (String::new(), "\u{7f}".to_owned()),
        };
        let rows = client.query(&stmt, &[&(store.kind() as i16), &sql_id(store.owner()), &low, &high]).await?;
        let Some(first) = rows.first() else { return Err(not_found(store)) };
        let rev = rev_of(first.try_get(0)?);
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(key) = row.try_get::<_, Option<String>>(1)? else { continue };
            items.push(ItemRecord {
                key: key_of(key)?,
                value: value_of(row.try_get(2)?)?,
                rev: rev_of(row.try_get(3)?),
                modified: Timestamp(row.try_get(4)?),
            });
        }
        Ok(Snapshot { rev, items })
    }

    async fn changes_since(&self, store: StoreRef, after: Rev) -> Result<Option<Vec<Change>>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT s.rev, s.history_from, c.rev, c.key, c.value, c.modified_ms, c.home_id, c.origin_kind, c.origin_id,
                        c.batch_last
                 FROM stores s LEFT JOIN changes c ON c.kind = s.kind AND c.owner = s.owner AND c.rev > $3
                 WHERE s.kind = $1 AND s.owner = $2 ORDER BY c.rev",
            )
            .await?;
        let after = sql_id(after.0);
        let rows = client.query(&stmt, &[&(store.kind() as i16), &sql_id(store.owner()), &after]).await?;
        let Some(first) = rows.first() else { return Err(not_found(store)) };
        let (rev, history_from): (i64, i64) = (first.try_get(0)?, first.try_get(1)?);
        if after < history_from || after > rev {
            return Ok(None);
        }
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(rev) = row.try_get::<_, Option<i64>>(2)? else { continue };
            changes.push(Change {
                store,
                rev: rev_of(rev),
                key: key_of(row.try_get(3)?)?,
                value: row.try_get::<_, Option<String>>(4)?.map(value_of).transpose()?,
                time: Timestamp(row.try_get(5)?),
                home: home_of(row.try_get(6)?),
                origin: Origin::from_parts(i64::from(row.try_get::<_, i16>(7)?), to_u64(row.try_get(8)?)),
                batch_last: row.try_get::<_, Option<i64>>(9)?.map(rev_of),
            });
        }
        Ok(Some(changes))
    }

    async fn create_home(&self, name: String) -> Result<HomeRecord, StoreError> {
        let mut client = self.client().await?;
        let now = Timestamp::now();
        let tx = client.transaction().await?;
        let row = tx
            .query_one("INSERT INTO homes (name, created_ms) VALUES ($1, $2) RETURNING id", &[&name, &now.millis()])
            .await?;
        let id = HomeId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("home id"))?;
        create_store(&tx, StoreRef::Home(id)).await?;
        tx.commit().await?;
        Ok(HomeRecord { id, name, created: now })
    }

    async fn homes(&self) -> Result<Vec<HomeRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client.query("SELECT id, name, created_ms FROM homes ORDER BY id", &[]).await?;
        rows.iter().map(home_row).collect()
    }

    async fn home(&self, id: HomeId) -> Result<HomeRecord, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT id, name, created_ms FROM homes WHERE id = $1").await?;
        match client.query_opt(&stmt, &[&home_id(id)]).await? {
            Some(row) => home_row(&row),
            None => Err(StoreError::HomeNotFound(id)),
        }
    }

    async fn delete_home(&self, id: HomeId) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if tx.execute("DELETE FROM homes WHERE id = $1", &[&home_id(id)]).await? == 0 {
            return Err(StoreError::HomeNotFound(id));
        }
        tx.execute("UPDATE devices SET home_id = NULL WHERE home_id = $1", &[&home_id(id)]).await?;
        tx.execute("DELETE FROM api_key_homes WHERE home_id = $1", &[&home_id(id)]).await?;
        delete_store(&tx, StoreRef::Home(id)).await?;
        self.commit_admin(tx, AdminChange::HomeDeleted(id)).await
    }

    async fn create_device(&self, new: NewDevice) -> Result<DeviceRecord, StoreError> {
        let mut client = self.client().await?;
        let now = Timestamp::now();
        let tx = client.transaction().await?;
        if let Some(h) = new.home
            && !lock_home(&tx, h).await?
        {
            return Err(StoreError::HomeNotFound(h));
        }
        let row = tx
            .query_one(
                "INSERT INTO devices (name, home_id, device_class, tag, key_hash, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[&new.name, &new.home.map(home_id), &new.device_class, &new.tag, &&new.key_hash[..], &now.millis()],
            )
            .await?;
        let id = DeviceId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("device id"))?;
        create_store(&tx, StoreRef::Device(id)).await?;
        tx.commit().await?;
        Ok(new.into_record(id, now))
    }

    async fn devices(&self, home: Option<HomeId>) -> Result<Vec<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let rows = match home {
            Some(h) => {
                // One statement: the home's existence and its devices in one view.
                let rows = client
                    .query(
                        "SELECT d.id, d.name, d.home_id, d.device_class, d.tag, d.created_ms, d.last_connect_ms,
                                d.last_disconnect_ms
                         FROM homes h LEFT JOIN devices d ON d.home_id = h.id WHERE h.id = $1 ORDER BY d.id",
                        &[&home_id(h)],
                    )
                    .await?;
                if rows.is_empty() {
                    return Err(StoreError::HomeNotFound(h));
                }
                rows.into_iter().filter(|r| matches!(r.try_get::<_, Option<i64>>(0), Ok(Some(_)))).collect()
            }
            None => client.query(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"), &[]).await?,
        };
        rows.iter().map(device_row).collect()
    }

    async fn device(&self, id: DeviceId) -> Result<DeviceRecord, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1")).await?;
        match client.query_opt(&stmt, &[&sql_id(id.get())]).await? {
            Some(row) => device_row(&row),
            None => Err(StoreError::DeviceNotFound(id)),
        }
    }

    async fn update_device(&self, id: DeviceId, update: DeviceUpdate) -> Result<DeviceRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1 FOR UPDATE"), &[&sql_id(id.get())])
            .await?;
        let mut device = match row {
            Some(row) => device_row(&row)?,
            None => return Err(StoreError::DeviceNotFound(id)),
        };
        let mut moved = None;
        if let Some(to) = update.home {
            if let Some(h) = to {
                if !lock_home(&tx, h).await? {
                    return Err(StoreError::HomeNotFound(h));
                }
                if device.home == Some(h) {
                    return Err(StoreError::DeviceAlreadyInHome { device: id, home: h });
                }
            }
            if device.home != to {
                tx.execute("UPDATE devices SET home_id = $2 WHERE id = $1", &[&sql_id(id.get()), &to.map(home_id)])
                    .await?;
                let change = AdminChange::DeviceMoved { device: id, from: device.home, to };
                log_admin(&tx, &change, Timestamp::now()).await?;
                moved = Some(change);
                device.home = to;
            }
        }
        if let Some(name) = update.name {
            tx.execute("UPDATE devices SET name = $2 WHERE id = $1", &[&sql_id(id.get()), &name]).await?;
            device.name = name;
        }
        tx.commit().await?;
        if let Some(change) = moved {
            self.admin_committed(change);
        }
        Ok(device)
    }

    async fn rotate_device_key(&self, id: DeviceId, key_hash: [u8; 32]) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n =
            tx.execute("UPDATE devices SET key_hash = $2 WHERE id = $1", &[&sql_id(id.get()), &&key_hash[..]]).await?;
        if n == 0 {
            return Err(StoreError::DeviceNotFound(id));
        }
        self.commit_admin(tx, AdminChange::DeviceKeyRotated(id)).await
    }

    async fn delete_device(&self, id: DeviceId) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if tx.execute("DELETE FROM devices WHERE id = $1", &[&sql_id(id.get())]).await? == 0 {
            return Err(StoreError::DeviceNotFound(id));
        }
        delete_store(&tx, StoreRef::Device(id)).await?;
        tx.execute("DELETE FROM presence WHERE device_id = $1", &[&sql_id(id.get())]).await?;
        tx.execute("DELETE FROM device_sync WHERE device_id = $1", &[&sql_id(id.get())]).await?;
        self.commit_admin(tx, AdminChange::DeviceDeleted(id)).await
    }

    async fn session_opened(&self, device: DeviceId, max: usize, at: Timestamp) -> Result<SessionOpened, StoreError> {
        self.open_session(device, max, at).await
    }

    async fn session_closed(&self, device: DeviceId, at: Timestamp) -> Result<SessionClosed, StoreError> {
        self.close_session(device, at).await
    }

    async fn connected(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceId>, StoreError> {
        self.connected_devices(devices).await
    }

    async fn broadcast_event(&self, home: HomeId, json: String) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT ddp_event($1, $2, $3)").await?;
        client.execute(&stmt, &[&home_id(home), &json, &Timestamp::now().millis()]).await?;
        self.announcer.announce("event");
        self.feed.wake();
        Ok(())
    }

    async fn broadcast_command(&self, device: DeviceId, json: String) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT ddp_command($1, $2, $3)").await?;
        client.execute(&stmt, &[&sql_id(device.get()), &json, &Timestamp::now().millis()]).await?;
        self.announcer.announce("command");
        self.feed.wake();
        Ok(())
    }

    async fn record_sync(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError> {
        self.record_progress(progress).await
    }

    async fn device_sync(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceSync>, StoreError> {
        self.progress_of(devices).await
    }

    async fn broadcast_sync(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError> {
        self.announce_progress(progress).await
    }

    async fn find_devices(&self, query: DeviceQuery) -> Result<Vec<DeviceRecord>, StoreError> {
        self.find_devices_pg(query).await
    }

    async fn create_job(&self, new: NewJob) -> Result<JobRecord, StoreError> {
        self.create_job_pg(new).await
    }

    async fn jobs(&self, api_key: Option<ApiKeyId>) -> Result<Vec<JobRecord>, StoreError> {
        self.jobs_pg(api_key).await
    }

    async fn job(&self, id: JobId) -> Result<JobRecord, StoreError> {
        self.job_pg(id).await
    }

    async fn cancel_job(&self, id: JobId) -> Result<JobRecord, StoreError> {
        self.cancel_job_pg(id).await
    }

    async fn claim_job_work(&self, max: usize, lease_ms: i64, now: Timestamp) -> Result<ClaimOutcome, StoreError> {
        self.claim_pg(max, lease_ms, now).await
    }

    async fn job_results(&self, job: JobId, failed: Vec<(DeviceId, String)>) -> Result<JobState, StoreError> {
        self.job_results_pg(job, failed).await
    }

    async fn create_api_key(&self, new: NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        let mut client = self.client().await?;
        let now = Timestamp::now();
        let mut homes = new.homes.clone();
        if let Some(list) = homes.as_mut() {
            list.sort_unstable();
            list.dedup();
        }
        let tx = client.transaction().await?;
        for &h in homes.iter().flatten() {
            if !lock_home(&tx, h).await? {
                return Err(StoreError::HomeNotFound(h));
            }
        }
        let row = tx
            .query_one(
                "INSERT INTO api_keys (name, permission, all_homes, key_hash, created_ms)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&new.name, &new.permission.as_str(), &homes.is_none(), &&new.key_hash[..], &now.millis()],
            )
            .await?;
        let raw_id: i64 = row.try_get(0)?;
        let ids: Vec<i64> = homes.iter().flatten().map(|&h| home_id(h)).collect();
        tx.execute("INSERT INTO api_key_homes (key_id, home_id) SELECT $1, unnest($2::BIGINT[])", &[&raw_id, &ids])
            .await?;
        tx.commit().await?;
        let id = ApiKeyId::new(to_u64(raw_id)).ok_or_else(|| corrupt("api key id"))?;
        Ok(ApiKeyRecord { id, name: new.name, homes, permission: new.permission, created: now })
    }

    async fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(&format!("{API_KEY_QUERY} GROUP BY k.id ORDER BY k.id"), &[]).await?;
        rows.iter().map(api_key_row).collect()
    }

    async fn delete_api_key(&self, id: ApiKeyId) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if tx.execute("DELETE FROM api_keys WHERE id = $1", &[&sql_id(id.get())]).await? == 0 {
            return Err(StoreError::ApiKeyNotFound(id));
        }
        tx.execute("DELETE FROM api_key_homes WHERE key_id = $1", &[&sql_id(id.get())]).await?;
        self.commit_admin(tx, AdminChange::ApiKeyDeleted(id)).await
    }

    async fn principal_by_key_hash(&self, key_hash: [u8; 32]) -> Result<Option<KeyHolder>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT id FROM devices WHERE key_hash = $1").await?;
        if let Some(row) = client.query_opt(&stmt, &[&&key_hash[..]]).await?
            && let Some(id) = DeviceId::new(to_u64(row.try_get(0)?))
        {
            return Ok(Some(KeyHolder::Device(id)));
        }
        let stmt = client.prepare_cached(&format!("{API_KEY_QUERY} WHERE k.key_hash = $1 GROUP BY k.id")).await?;
        match client.query_opt(&stmt, &[&&key_hash[..]]).await? {
            Some(row) => Ok(Some(KeyHolder::Project(api_key_row(&row)?))),
            None => Ok(None),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.query_one("SELECT 1", &[]).await?;
        Ok(())
    }

    async fn trim_history(&self, keep_changes: u64, keep_age_ms: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let now = Timestamp::now().millis();
        let keep = sql_id(keep_changes.max(1));
        // For every store with more history than it must keep: the newest change old enough
        // and far enough from the head becomes the new history bound.
        let row = client
            .query_one(
                "WITH bound AS (
                    SELECT s.kind, s.owner, s.history_from,
                           (SELECT MAX(c.rev) FROM changes c WHERE c.kind = s.kind AND c.owner = s.owner
                                AND c.rev <= s.rev - $1 AND c.modified_ms <= $2) AS upto
                    FROM stores s WHERE s.rev - s.history_from > $1
                 ), moved AS (
                    UPDATE stores s SET history_from = b.upto FROM bound b
                    WHERE s.kind = b.kind AND s.owner = b.owner AND b.upto > b.history_from
                    RETURNING s.kind, s.owner, s.history_from
                 ), gone AS (
                    DELETE FROM changes c USING moved m
                    WHERE c.kind = m.kind AND c.owner = m.owner AND c.rev <= m.history_from
                    RETURNING 1
                 )
                 SELECT COUNT(*) FROM gone",
                &[&keep, &(now - keep_age_ms)],
            )
            .await?;
        let removed: i64 = row.try_get(0)?;
        client.execute("DELETE FROM admin_log WHERE created_ms < $1", &[&(now - LOG_KEEP_MS)]).await?;
        client.execute("DELETE FROM event_log WHERE created_ms < $1", &[&(now - LOG_KEEP_MS)]).await?;
        Ok(to_u64(removed))
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Queued writes are committed (and answered) first; later ones find the queue closed.
        if let Ok(mut writes) = self.writes.lock() {
            writes.take();
        }
        let writers = self.writers.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for task in writers {
            let _ = task.await;
        }
        let _ = self.stop.send(true);
        let tasks = self.tasks.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
        // This node's sessions are closed; leave no presence behind.
        match self.pool.get().await {
            Ok(client) => {
                let gone = async {
                    client.execute("DELETE FROM presence WHERE node_id = $1", &[&self.node]).await?;
                    client.execute("DELETE FROM nodes WHERE id = $1", &[&self.node]).await
                }
                .await;
                if let Err(e) = gone {
                    tracing::warn!(error = %e, "could not unregister this node; others will reap it");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not unregister this node; others will reap it"),
        }
        self.pool.close();
    }
}
