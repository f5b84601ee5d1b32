//! Group commit on PostgreSQL: key-value batches are queued, and a few batcher tasks each take
//! every batch waiting (up to a number of ops) and apply them with one `ddp_kv_apply` call — one
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
use super::rows::value_of;
use crate::StoreError;
use crate::model::*;
use crate::sql::{not_found, rev_of, sql_id, to_u64};

/// A batch waiting for its group, and where its answer goes.
pub(super) struct Pending {
    pub(super) batch: KvBatch,
    pub(super) reply: oneshot::Sender<Result<Vec<Change>, StoreError>>,
}

/// Starts `batchers` tasks taking up to `max_batch` ops each from the returned queue. They stop
/// once the queue's senders are gone and it is empty.
pub(super) fn start(
    pool: Pool,
    batchers: usize,
    max_batch: usize,
    queue: usize,
    feed: Arc<Feed>,
    announcer: Arc<Announcer>,
) -> (mpsc::Sender<Pending>, Vec<JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel::<Pending>(queue.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let tasks = (0..batchers.max(1))
        .map(|_| {
            let (rx, pool, feed, announcer) = (rx.clone(), pool.clone(), feed.clone(), announcer.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        // Up to `max_batch` ops (a batch is never split).
                        let mut ops = first.batch.ops.len();
                        let mut batch = vec![first];
                        while ops < max_batch {
                            match rx.try_recv() {
                                Ok(next) => {
                                    ops += next.batch.ops.len();
                                    batch.push(next);
                                }
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

const APPLY_SQL: &str = "SELECT out_unit, out_idx, out_status, out_rev, out_home, out_current, out_value
    FROM ddp_kv_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";

/// The parameters of one `ddp_kv_apply` call: one entry per op.
#[derive(Default)]
struct Params<'a> {
    units: Vec<i32>,
    kinds: Vec<i16>,
    owners: Vec<i64>,
    keys: Vec<&'a str>,
    ops: Vec<i16>,
    values: Vec<Option<&'a str>>,
    conds: Vec<i16>,
    revs: Vec<String>,
    store_revs: Vec<i64>,
    max_keys: Vec<i32>,
    max_bytes: Vec<i32>,
    origin_kinds: Vec<i16>,
    origin_ids: Vec<i64>,
    jobs: Vec<i64>,
}

impl<'a> Params<'a> {
    fn push(&mut self, unit: i32, p: &'a Pending) {
        let b = &p.batch;
        let (origin_kind, origin_id) = b.origin.to_parts();
        for op in &b.ops {
            self.units.push(unit);
            self.kinds.push(b.store.kind() as i16);
            self.owners.push(sql_id(b.store.owner()));
            self.keys.push(op.key.as_str());
            let (kind, value) = match &op.action {
                KvAction::Set(v) => (0, Some(v.as_json())),
                KvAction::Delete => (1, None),
                KvAction::Merge(patch) => (2, Some(patch.as_json())),
            };
            self.ops.push(kind);
            self.values.push(value);
            let (cond, revs) = match &op.condition {
                Condition::None => (0, String::new()),
                Condition::RevIn(revs) => {
                    (1, revs.iter().map(|r| sql_id(r.0).to_string()).collect::<Vec<_>>().join(","))
                }
                Condition::Exists => (2, String::new()),
                Condition::Absent => (3, String::new()),
            };
            self.conds.push(cond);
            self.revs.push(revs);
            self.store_revs.push(b.store_rev.map_or(-1, |r| sql_id(r.0)));
            self.max_keys.push(i32::try_from(b.max_keys).unwrap_or(i32::MAX));
            self.max_bytes.push(i32::try_from(b.max_value_bytes).unwrap_or(i32::MAX));
            self.origin_kinds.push(origin_kind as i16);
            self.origin_ids.push(sql_id(origin_id));
            self.jobs.push(b.job.map_or(0, |j| sql_id(j.get())));
        }
    }
}

/// Applies one group of batches and answers their writers.
async fn apply(pool: &Pool, group: Vec<Pending>, feed: &Feed, announcer: &Announcer) {
    let now = Timestamp::now();
    // By store (stable: one store's batches keep their order).
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.sort_by_key(|&i| (group[i].batch.store.kind(), group[i].batch.store.owner()));
    let mut params = Params::default();
    for &i in &order {
        params.push(i32::try_from(i).unwrap_or(i32::MAX), &group[i]);
    }
    let ops = params.units.len();
    let now_ms = now.millis();
    let args: [&(dyn ToSql + Sync); 15] = [
        &params.units,
        &params.kinds,
        &params.owners,
        &params.keys,
        &params.ops,
        &params.values,
        &params.conds,
        &params.revs,
        &params.store_revs,
        &params.max_keys,
        &params.max_bytes,
        &params.origin_kinds,
        &params.origin_ids,
        &params.jobs,
        &now_ms,
    ];
    let started = Instant::now();
    let rows = async {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(APPLY_SQL).await?;
        Ok::<_, StoreError>(client.query(&stmt, &args).await?)
    }
    .await;
    metrics::histogram!("ddp_store_batch_size").record(ops as f64);
    metrics::histogram!("ddp_store_commit_seconds").record(started.elapsed().as_secs_f64());

    let mut outcomes: Vec<Option<Result<Vec<Change>, StoreError>>> = (0..group.len()).map(|_| None).collect();
    match rows {
        Err(e) => outcomes.iter_mut().for_each(|o| *o = Some(Err(e.clone()))),
        Ok(rows) => {
            let mut announced = false;
            for row in &rows {
                let Some((i, outcome)) = decode(row, &group, now) else {
                    tracing::error!("ddp_kv_apply answered a row for no batch");
                    continue;
                };
                match outcome {
                    Ok(change) => {
                        announcer.announce(&format!(
                            "{}:{}:{}",
                            change.store.kind(),
                            change.store.owner(),
                            change.rev.0
                        ));
                        announced = true;
                        if let Some(Ok(changes)) = &mut outcomes[i] {
                            changes.push(change);
                        } else {
                            outcomes[i] = Some(Ok(vec![change]));
                        }
                    }
                    Err(e) => outcomes[i] = Some(Err(e)),
                }
            }
            if announced {
                feed.wake();
            }
        }
    }
    for (pending, outcome) in group.into_iter().zip(outcomes) {
        let outcome =
            outcome.unwrap_or_else(|| Err(StoreError::Backend("ddp_kv_apply gave no answer for a batch".into())));
        let _ = pending.reply.send(outcome);
    }
}

/// One answer row: the batch it belongs to, and one of its changes or its failure.
fn decode(row: &tokio_postgres::Row, group: &[Pending], now: Timestamp) -> Option<(usize, Result<Change, StoreError>)> {
    let unit: i32 = row.try_get(0).ok()?;
    let i = usize::try_from(unit).ok()?;
    let b = &group.get(i)?.batch;
    let outcome = (|| {
        let idx: i32 = row.try_get(1)?;
        let status: &str = row.try_get(2)?;
        let at = usize::try_from(idx).ok();
        let in_op = |e: StoreError| match at {
            Some(index) => e.in_op(index),
            None => e,
        };
        let current: Option<i64> = row.try_get(5)?;
        Ok::<_, StoreError>(match (status, at.and_then(|a| b.ops.get(a))) {
            ("ok", Some(op)) => Ok(Change {
                store: b.store,
                rev: rev_of(row.try_get(3)?),
                key: op.key.clone(),
                value: match &op.action {
                    KvAction::Set(v) => Some(v.clone()),
                    KvAction::Delete => None,
                    KvAction::Merge(_) => Some(value_of(row.try_get::<_, String>(6)?)?),
                },
                time: now,
                home: row.try_get::<_, Option<i64>>(4)?.and_then(|h| ddp_protocol::HomeId::new(to_u64(h))),
                origin: b.origin,
                batch_last: None, // set once every change of the batch is in (mark_batch)
            }),
            ("no_store", _) => Err(not_found(b.store)),
            ("job_gone", _) => match b.job {
                Some(job) => Err(StoreError::JobNotPending(job)),
                None => Err(StoreError::Backend("ddp_kv_apply answered job_gone for a write of no job".into())),
            },
            ("store_mismatch", _) => Err(StoreError::StoreRevMismatch { current: rev_of(current.unwrap_or(0)) }),
            ("mismatch", _) => Err(in_op(StoreError::RevisionMismatch { current: current.map(rev_of) })),
            ("no_key", _) => Err(in_op(StoreError::KeyNotFound)),
            ("too_many", _) => Err(in_op(StoreError::TooManyKeys { limit: b.max_keys })),
            ("too_large", _) => Err(in_op(StoreError::ValueTooLarge {
                size: usize::try_from(current.unwrap_or(0)).unwrap_or(usize::MAX),
                limit: b.max_value_bytes,
            })),
            ("bad_merge", _) => Err(in_op(StoreError::InvalidValue(
                "cannot merge: a member name is unreadable (it holds U+0000 or a lone surrogate)".into(),
            ))),
            (other, _) => Err(StoreError::Backend(format!("ddp_kv_apply answered {other:?}"))),
        })
    })();
    Some((i, outcome.unwrap_or_else(Err)))
}

/// Marks the changes of a batch of two or more with the batch's last rev.
pub(super) fn mark_batch(changes: &mut [Change]) {
    if changes.len() > 1 {
        let last = changes.last().map(|c| c.rev);
        for c in changes.iter_mut() {
            c.batch_last = last;
        }
    }
}
