//! Presence across nodes: live sessions counted per device and node, node heartbeats, and the
//! reaping of nodes that stopped. Presence is soft state: its commits do not wait for the disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddp_protocol::{DeviceId, Timestamp};
use deadpool_postgres::Pool;
use tokio::sync::watch;

use super::PgStore;
use super::rows::{home_of, ms};
use crate::StoreError;
use crate::model::{SessionClosed, SessionOpened};
use crate::sql::{sql_id, to_u64};

/// A node whose heartbeat is older than this no longer counts for presence.
const NODE_ALIVE: Duration = Duration::from_secs(15);
/// A node silent for this long has its presence rows removed.
const NODE_DEAD: Duration = Duration::from_secs(120);
/// How often a node heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(3);

impl PgStore {
    /// [`Store::session_opened`](crate::Store::session_opened): `ddp_session_open` locks the
    /// device's row, sums its sessions over nodes with a fresh heartbeat, and counts one more
    /// for this node unless that reaches `max`.
    pub(super) async fn open_session(
        &self,
        device: DeviceId,
        max: usize,
        at: Timestamp,
    ) -> Result<SessionOpened, StoreError> {
        let client = self.client().await?;
        let stmt =
            client.prepare_cached("SELECT out_status, out_home FROM ddp_session_open($1, $2, $3, $4, $5)").await?;
        let max = i32::try_from(max).unwrap_or(i32::MAX);
        let row =
            client.query_one(&stmt, &[&sql_id(device.get()), &self.node, &max, &at.millis(), &ms(NODE_ALIVE)]).await?;
        let outcome: &str = row.try_get(0)?;
        let opened = match outcome {
            "first" => SessionOpened::Opened { first: true, home: home_of(row.try_get(1)?) },
            "more" => SessionOpened::Opened { first: false, home: None },
            "refused" => return Ok(SessionOpened::Refused),
            "no_device" => return Err(StoreError::DeviceNotFound(device)),
            other => return Err(StoreError::Backend(format!("ddp_session_open answered {other:?}"))),
        };
        self.local_sessions(device, 1);
        Ok(opened)
    }

    /// [`Store::session_closed`](crate::Store::session_closed).
    pub(super) async fn close_session(&self, device: DeviceId, at: Timestamp) -> Result<SessionClosed, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT out_last, out_home FROM ddp_session_close($1, $2, $3, $4)").await?;
        let row = client.query_one(&stmt, &[&sql_id(device.get()), &self.node, &at.millis(), &ms(NODE_ALIVE)]).await?;
        self.local_sessions(device, -1);
        Ok(if row.try_get(0)? { SessionClosed::Last { home: home_of(row.try_get(1)?) } } else { SessionClosed::Others })
    }

    /// [`Store::connected`](crate::Store::connected): devices with sessions on a live node.
    pub(super) async fn connected_devices(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceId>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT DISTINCT p.device_id FROM presence p JOIN nodes n ON n.id = p.node_id
                 WHERE p.device_id = ANY($1) AND p.sessions > 0
                   AND n.heartbeat > clock_timestamp() - $2::BIGINT * INTERVAL '1 millisecond'",
            )
            .await?;
        let ids: Vec<i64> = devices.iter().map(|d| sql_id(d.get())).collect();
        let rows = client.query(&stmt, &[&ids, &ms(NODE_ALIVE)]).await?;
        let mut live = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            live.insert(to_u64(row.try_get(0)?));
        }
        Ok(devices.into_iter().filter(|d| live.contains(&d.get())).collect())
    }

    fn local_sessions(&self, device: DeviceId, delta: i32) {
        if let Ok(mut local) = self.local.lock() {
            let n = local.entry(device).or_insert(0);
            *n += delta;
            if *n <= 0 {
                local.remove(&device);
            }
        }
    }
}

/// Keeps this node's heartbeat fresh, re-registers it (with its live sessions) if it was reaped
/// while unreachable, and reaps nodes that stopped.
pub(super) async fn heartbeat_loop(
    pool: Pool,
    node: i64,
    name: String,
    local: Arc<Mutex<HashMap<DeviceId, i32>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(HEARTBEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats: u64 = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        beats += 1;
        let result: Result<(), StoreError> = async {
            let mut client = pool.get().await?;
            let n = client.execute("UPDATE nodes SET heartbeat = clock_timestamp() WHERE id = $1", &[&node]).await?;
            if n == 0 {
                let (devices, counts): (Vec<i64>, Vec<i32>) =
                    local.lock().map(|l| l.iter().map(|(d, n)| (sql_id(d.get()), *n)).unzip()).unwrap_or_default();
                let tx = client.transaction().await?;
                tx.execute(
                    "INSERT INTO nodes (id, name, heartbeat) VALUES ($1, $2, clock_timestamp())
                     ON CONFLICT (id) DO UPDATE SET heartbeat = EXCLUDED.heartbeat",
                    &[&node, &name],
                )
                .await?;
                tx.execute(
                    "INSERT INTO presence (device_id, node_id, sessions)
                     SELECT d, $1, n FROM unnest($2::BIGINT[], $3::INT[]) AS t(d, n)
                     WHERE EXISTS (SELECT 1 FROM devices WHERE id = d)
                     ON CONFLICT (device_id, node_id) DO UPDATE SET sessions = EXCLUDED.sessions",
                    &[&node, &devices, &counts],
                )
                .await?;
                tx.commit().await?;
                tracing::warn!(
                    node,
                    sessions = counts.iter().sum::<i32>(),
                    "this node had been presumed dead; re-registered its live sessions"
                );
            }
            if beats.is_multiple_of(10) {
                let reaped: i32 = client.query_one("SELECT ddp_reap_nodes($1)", &[&ms(NODE_DEAD)]).await?.try_get(0)?;
                if reaped > 0 {
                    tracing::info!(nodes = reaped, "removed the sessions of nodes that stopped heartbeating");
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "node heartbeat failed; other nodes stop counting this node's sessions after {NODE_ALIVE:?}");
        }
    }
}
