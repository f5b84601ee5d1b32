//! Delivery and acknowledgement across nodes (PROTOCOL.md §10): each node records what its
//! sessions delivered and what devices acknowledged in `device_sync` (batched, about once a
//! second, never lowering a value), and tells the other nodes at once through the event log
//! (rows of kind 1), like events and commands.

use std::sync::Arc;

use ddp_protocol::{DeviceId, Timestamp};

use super::PgStore;
use crate::StoreError;
use crate::model::{Committed, DeviceSync, SyncProgress};
use crate::sql::{rev_of, sql_id, to_u64};

/// Progress as the event log carries it: `[[device, delivered, applied, applied_ms|null], …]`.
pub(super) fn encode(progress: &[(DeviceId, SyncProgress)]) -> String {
    let mut out = String::with_capacity(2 + progress.len() * 32);
    out.push('[');
    for (i, (device, p)) in progress.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let at = p.applied_at.map_or_else(|| "null".to_owned(), |t| t.millis().to_string());
        out.push_str(&format!("[{},{},{},{at}]", device.get(), p.delivered.0, p.applied.0));
    }
    out.push(']');
    out
}

/// The progress of an event log row of kind 1.
pub(super) fn decode(json: &str) -> Result<Committed, StoreError> {
    let rows: Vec<(u64, u64, u64, Option<i64>)> =
        serde_json::from_str(json).map_err(|e| StoreError::Backend(format!("unreadable sync row: {e}")))?;
    let progress: Vec<(DeviceId, SyncProgress)> = rows
        .into_iter()
        .filter_map(|(d, delivered, applied, at)| {
            let progress = SyncProgress {
                delivered: ddp_protocol::Rev(delivered),
                applied: ddp_protocol::Rev(applied),
                applied_at: at.map(Timestamp),
            };
            DeviceId::new(d).map(|d| (d, progress))
        })
        .collect();
    Ok(Committed::Sync(Arc::from(progress)))
}

/// One entry per device (merged), in device order, so that concurrent upserts from several
/// nodes lock rows in the same order.
fn merged(mut progress: Vec<(DeviceId, SyncProgress)>) -> Vec<(DeviceId, SyncProgress)> {
    progress.sort_by_key(|(d, _)| *d);
    let mut out: Vec<(DeviceId, SyncProgress)> = Vec::with_capacity(progress.len());
    for (device, p) in progress {
        match out.last_mut() {
            Some((last, q)) if *last == device => {
                q.merge(&p);
            }
            _ => out.push((device, p)),
        }
    }
    out
}

impl PgStore {
    /// [`Store::record_sync`](crate::Store::record_sync): one `ddp_record_sync` call.
    pub(super) async fn record_progress(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        let progress = merged(progress);
        let devices: Vec<i64> = progress.iter().map(|(d, _)| sql_id(d.get())).collect();
        let delivered: Vec<i64> = progress.iter().map(|(_, p)| sql_id(p.delivered.0)).collect();
        let applied: Vec<i64> = progress.iter().map(|(_, p)| sql_id(p.applied.0)).collect();
        let applied_ms: Vec<Option<i64>> = progress.iter().map(|(_, p)| p.applied_at.map(Timestamp::millis)).collect();
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT ddp_record_sync($1, $2, $3, $4)").await?;
        client.execute(&stmt, &[&devices, &delivered, &applied, &applied_ms]).await?;
        Ok(())
    }

    /// [`Store::device_sync`](crate::Store::device_sync).
    pub(super) async fn progress_of(&self, devices: Vec<DeviceId>) -> Result<Vec<DeviceSync>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT s.owner, s.rev, d.delivered_rev, d.applied_rev, d.applied_ms
                 FROM stores s LEFT JOIN device_sync d ON d.device_id = s.owner
                 WHERE s.kind = 0 AND s.owner = ANY($1) ORDER BY s.owner",
            )
            .await?;
        let ids: Vec<i64> = devices.iter().map(|d| sql_id(d.get())).collect();
        let rows = client.query(&stmt, &[&ids]).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(device) = DeviceId::new(to_u64(row.try_get(0)?)) else { continue };
            out.push(DeviceSync {
                device,
                rev: rev_of(row.try_get(1)?),
                progress: SyncProgress {
                    delivered: rev_of(row.try_get::<_, Option<i64>>(2)?.unwrap_or(0)),
                    applied: rev_of(row.try_get::<_, Option<i64>>(3)?.unwrap_or(0)),
                    applied_at: row.try_get::<_, Option<i64>>(4)?.map(Timestamp),
                },
            });
        }
        Ok(out)
    }

    /// [`Store::broadcast_sync`](crate::Store::broadcast_sync): one event log row.
    pub(super) async fn announce_progress(&self, progress: Vec<(DeviceId, SyncProgress)>) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT ddp_sync($1, $2)").await?;
        client.execute(&stmt, &[&encode(&progress), &Timestamp::now().millis()]).await?;
        self.announcer.announce("sync");
        self.feed.wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddp_protocol::Rev;

    #[test]
    fn progress_survives_the_event_log() {
        let d = |n| DeviceId::new(n).expect("id");
        let progress = vec![
            (d(3), SyncProgress { delivered: Rev(9), applied: Rev(7), applied_at: Some(Timestamp(1_700_000_000_123)) }),
            (d(4), SyncProgress { delivered: Rev(2), applied: Rev(0), applied_at: None }),
        ];
        let json = encode(&progress);
        assert_eq!(json, "[[3,9,7,1700000000123],[4,2,0,null]]");
        assert_eq!(decode(&json).expect("decoded"), Committed::Sync(Arc::from(progress)));
        assert!(decode("nonsense").is_err());
    }

    #[test]
    fn a_batch_holds_each_device_once_in_order() {
        let d = |n| DeviceId::new(n).expect("id");
        let p =
            |delivered, applied| SyncProgress { delivered: Rev(delivered), applied: Rev(applied), applied_at: None };
        let out = merged(vec![(d(5), p(3, 1)), (d(2), p(1, 0)), (d(5), p(2, 2))]);
        assert_eq!(out, vec![(d(2), p(1, 0)), (d(5), p(3, 2))]);
    }
}
