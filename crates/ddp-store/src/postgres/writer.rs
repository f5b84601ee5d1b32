//! Group commit on PostgreSQL: key-value writes are queued, and a few batcher tasks each take
//! every write waiting (up to a limit) and apply them with one `ddp_kv_write_batch` call — one
//! round trip and one commit for the lot. While one batch commits, the next is being collected by
//! another batcher. A batch is ordered by store before it is sent, so batches (of this node and
//! of others) lock stores in the same order and cannot deadlock; writes to one store keep their
//! arrival order.

use std::sync::Arc;
use std::time::Instant;

use ddp_protocol::Timestamp;
use deadpool_postgres::Pool;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;

use super::feed::{Announcer, Feed};
use crate::StoreError;
use crate::model::*;
use crate::sql::{not_found, rev_of, sql_id, to_u64};

/// A write waiting for its batch.
pub(super) struct Pending {
    pub(super) write: KvWrite,
    pub(super) reply: oneshot::Sender<Result<Change, StoreError>>,
}

/// Starts `batchers` tasks taking up to `max_batch` writes each from the returned queue. They stop
/// once the queue's senders are gone and it is empty.
pub(super) fn start(
    pool: Pool,
    batchers: usize,
    max_batch: usize,
    queue: usize,
    feed: Arc<Feed>,
    announcer: Arc<Announcer>,
) -> (mpsc::Sender<Pending>, Vec<JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let tasks = (0..batchers.max(1))
        .map(|_| {
            let (rx, pool, feed, announcer) = (rx.clone(), pool.clone(), feed.clone(), announcer.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < max_batch {
                            match rx.try_recv() {
                                Ok(next) => batch.push(next),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    apply(&pool, batch, &feed, &announcer).await;
                }
            })
        })
        .collect();
    (tx, tasks)
}

const BATCH_SQL: &str = "SELECT out_idx, out_status, out_rev, out_home, out_current
    FROM ddp_kv_write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// Applies one batch and answers its writers.
async fn apply(pool: &Pool, batch: Vec<Pending>, feed: &Feed, announcer: &Announcer) {
    let now = Timestamp::now();
    // By store (stable: one store's writes keep their order).
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| (batch[i].write.store.kind(), batch[i].write.store.owner()));
    let writes: Vec<&KvWrite> = order.iter().map(|&i| &batch[i].write).collect();
    let kinds: Vec<i16> = writes.iter().map(|w| w.store.kind() as i16).collect();
    let owners: Vec<i64> = writes.iter().map(|w| sql_id(w.store.owner())).collect();
    let keys: Vec<&str> = writes.iter().map(|w| w.key.as_str()).collect();
    let values: Vec<Option<&str>> = writes
        .iter()
        .map(|w| match &w.action {
            KvAction::Set(v) => Some(v.as_json()),
            KvAction::Delete => None,
        })
        .collect();
    let (conds, revs): (Vec<i16>, Vec<String>) = writes
        .iter()
        .map(|w| match &w.condition {
            Condition::None => (0, String::new()),
            Condition::RevIn(revs) => (1, revs.iter().map(|r| sql_id(r.0).to_string()).collect::<Vec<_>>().join(",")),
            Condition::Exists => (2, String::new()),
            Condition::Absent => (3, String::new()),
        })
        .unzip();
    let max_keys: Vec<i32> = writes.iter().map(|w| i32::try_from(w.max_keys).unwrap_or(i32::MAX)).collect();
    let (origin_kinds, origin_ids): (Vec<i16>, Vec<i64>) = writes
        .iter()
        .map(|w| {
            let (kind, id) = w.origin.to_parts();
            (kind as i16, sql_id(id))
        })
        .unzip();
    let now_ms = now.millis();
    let params: [&(dyn ToSql + Sync); 10] =
        [&kinds, &owners, &keys, &values, &conds, &revs, &max_keys, &origin_kinds, &origin_ids, &now_ms];
    let started = Instant::now();
    let rows = async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(BATCH_SQL).await?;
        Ok::<_, StoreError>(client.query(&stmt, &params).await?)
    }
    .await;
    metrics::histogram!("ddp_store_batch_size").record(batch.len() as f64);
    metrics::histogram!("ddp_store_commit_seconds").record(started.elapsed().as_secs_f64());

    let mut outcomes: Vec<Option<Result<Change, StoreError>>> = (0..batch.len()).map(|_| None).collect();
    match rows {
        Err(e) => outcomes.iter_mut().for_each(|o| *o = Some(Err(e.clone()))),
        Ok(rows) => {
            let mut announced = false;
            for row in &rows {
                let decoded = decode(row, &batch, &order, now);
                if let Some((i, outcome)) = decoded {
                    if let Ok(change) = &outcome {
                        announcer.announce(&format!(
                            "{}:{}:{}",
                            change.store.kind(),
                            change.store.owner(),
                            change.rev.0
                        ));
                        announced = true;
                    }
                    outcomes[i] = Some(outcome);
                }
            }
            if announced {
                feed.wake();
            }
        }
    }
    for (pending, outcome) in batch.into_iter().zip(outcomes) {
        let outcome =
            outcome.unwrap_or_else(|| Err(StoreError::Backend("ddp_kv_write_batch gave no answer for a write".into())));
        let _ = pending.reply.send(outcome);
    }
}

/// One answer row: the batch index it belongs to and the write's outcome.
fn decode(
    row: &tokio_postgres::Row,
    batch: &[Pending],
    order: &[usize],
    now: Timestamp,
) -> Option<(usize, Result<Change, StoreError>)> {
    let idx: i32 = row.try_get(0).ok()?;
    let i = *order.get(usize::try_from(idx).ok()?.checked_sub(1)?)?;
    let w = &batch[i].write;
    let outcome = (|| {
        let status: &str = row.try_get(1)?;
        match status {
            "ok" => Ok(Change {
                store: w.store,
                rev: rev_of(row.try_get(2)?),
                key: w.key.clone(),
                value: match &w.action {
                    KvAction::Set(v) => Some(v.clone()),
                    KvAction::Delete => None,
                },
                time: now,
                home: row.try_get::<_, Option<i64>>(3)?.and_then(|h| ddp_protocol::HomeId::new(to_u64(h))),
                origin: w.origin,
            }),
            "no_store" => Err(not_found(w.store)),
            "mismatch" => Err(StoreError::RevisionMismatch { current: row.try_get::<_, Option<i64>>(4)?.map(rev_of) }),
            "no_key" => Err(StoreError::KeyNotFound),
            "too_many" => Err(StoreError::TooManyKeys { limit: w.max_keys }),
            other => Err(StoreError::Backend(format!("ddp_kv_write_batch answered {other:?}"))),
        }
    })();
    Some((i, outcome))
}
