//! The write pipeline: group commit with the fsync overlapped.
//!
//! ```text
//!  callers ──jobs──▶ writer thread ──committed batches──▶ syncer thread ──▶ sink, then replies
//!                    BEGIN; apply all;                    fdatasync(WAL) once for every
//!                    COMMIT (no fsync)                    batch waiting; mark them durable
//! ```
//!
//! The writer takes every job waiting at that moment and applies them in one transaction. SQLite
//! runs with `synchronous=NORMAL`, so COMMIT writes the batch's pages to the WAL file without
//! waiting for the disk. The syncer then calls `fdatasync` on the WAL file — one call covers
//! every batch committed so far — and only then hands the batches, in order, to the
//! [`CommitSink`] and answers their callers. While one batch is being synced the writer already
//! applies the next, so the disk's flush latency no longer caps the write rate.
//!
//! Readers must never return data that is not yet durable (a crash could take it back and its
//! rev would be handed out again). [`Durability`] holds two counters: `committed` is raised just
//! *before* a batch's COMMIT, `durable` after its fsync; a read waits until `durable` has caught up
//! with the `committed` it saw when it finished.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::time::Instant;

use ddp_protocol::Timestamp;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::state::StoreStates;
use crate::model::Committed;
use crate::{CommitSink, StoreError};

/// A disk operation on the write path that takes this long is logged as a warning: it delays
/// every write waiting behind it.
const SLOW: std::time::Duration = std::time::Duration::from_millis(100);

/// A message to the writer thread.
pub(super) enum Msg {
    /// Apply a job in the next batch.
    Job(Box<dyn Job>),
    /// Commit everything queued before this, then stop.
    Shutdown,
}

/// What a job sees inside the batch transaction.
pub(super) struct Tx<'a> {
    /// The writer's connection, inside the batch transaction.
    pub conn: &'a Connection,
    /// The commit time of the batch.
    pub now: Timestamp,
    /// What the batch committed, for the sink.
    pub out: &'a mut Vec<Committed>,
    /// The writer's view of each store's rev, key count and home.
    pub states: &'a mut StoreStates,
}

/// One unit of work in a batch transaction.
pub(super) trait Job: Send {
    /// Applies the job inside the batch transaction. An `Err` aborts the whole batch.
    fn apply(&mut self, tx: &mut Tx<'_>) -> rusqlite::Result<()>;
    /// Answers the caller once the batch's fate is known.
    fn finish(self: Box<Self>, batch: Result<(), StoreError>);
}

/// The closure of a [`FnJob`].
pub(super) type ApplyFn<T> = Box<dyn FnOnce(&mut Tx<'_>) -> rusqlite::Result<Result<T, StoreError>> + Send>;

/// A [`Job`] made of a closure; its result goes back through a oneshot channel.
pub(super) struct FnJob<T> {
    apply: Option<ApplyFn<T>>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> FnJob<T> {
    pub(super) fn new(apply: ApplyFn<T>, reply: oneshot::Sender<Result<T, StoreError>>) -> FnJob<T> {
        FnJob { apply: Some(apply), result: None, reply }
    }
}

impl<T: Send + 'static> Job for FnJob<T> {
    fn apply(&mut self, tx: &mut Tx<'_>) -> rusqlite::Result<()> {
        if let Some(f) = self.apply.take() {
            self.result = Some(f(tx)?);
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

/// How far commits and fsyncs have got, in batch numbers.
pub(super) struct Durability {
    committed: AtomicU64,
    durable: watch::Sender<u64>,
    failed: AtomicBool,
}

impl Durability {
    pub(super) fn new() -> Durability {
        Durability { committed: AtomicU64::new(0), durable: watch::Sender::new(0), failed: AtomicBool::new(false) }
    }

    /// Waits until every batch that a read just finished might have seen is on disk.
    pub(super) async fn wait_durable(&self) -> Result<(), StoreError> {
        let seen = self.committed.load(Ordering::Acquire);
        if *self.durable.borrow() < seen {
            let mut rx = self.durable.subscribe();
            rx.wait_for(|d| *d >= seen || self.has_failed()).await.map_err(|_| StoreError::Closed)?;
        }
        if self.has_failed() {
            return Err(StoreError::Backend("an fsync failed; reads could return data that is not on disk".into()));
        }
        Ok(())
    }

    /// Whether an fsync failed: from then on nothing is acknowledged.
    pub(super) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// A batch committed to SQLite, waiting for its fsync.
struct Pending {
    number: u64,
    jobs: Vec<Box<dyn Job>>,
    out: Vec<Committed>,
    result: Result<(), StoreError>,
}

/// Starts the writer and syncer threads. The writer stops on [`Msg::Shutdown`] or when every
/// sender is gone; the syncer stops after the writer, once it has answered every batch.
pub(super) fn start(
    conn: Connection,
    wal: File,
    receiver: mpsc::Receiver<Msg>,
    max_batch: usize,
    sink: Arc<dyn CommitSink>,
    durability: Arc<Durability>,
    tail: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    // Bounded: if the disk falls behind, the writer waits instead of piling up batches.
    let (to_syncer, from_writer) = std_mpsc::sync_channel::<Pending>(64);
    let syncer_durability = durability.clone();
    let syncer = std::thread::Builder::new()
        .name("ddp-sqlite-sync".into())
        .spawn(move || sync_loop(&wal, &from_writer, sink.as_ref(), &syncer_durability))
        .map_err(|e| StoreError::Backend(format!("cannot start the sync thread: {e}")))?;
    std::thread::Builder::new()
        .name("ddp-sqlite-writer".into())
        .spawn(move || {
            write_loop(&conn, receiver, max_batch, &to_syncer, &durability, &tail);
            drop(to_syncer);
            if syncer.join().is_err() {
                tracing::error!("storage sync thread panicked");
            }
            tracing::debug!("storage writer stopped");
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))
}

fn write_loop(
    conn: &Connection,
    mut receiver: mpsc::Receiver<Msg>,
    max_batch: usize,
    to_syncer: &std_mpsc::SyncSender<Pending>,
    durability: &Durability,
    tail: &AtomicBool,
) {
    let mut number = 0u64;
    let mut stopping = false;
    let mut states = StoreStates::default();
    while !stopping {
        let mut jobs: Vec<Box<dyn Job>> = Vec::new();
        match receiver.blocking_recv() {
            Some(Msg::Job(first)) => jobs.push(first),
            Some(Msg::Shutdown) | None => break,
        }
        if tail.swap(false, Ordering::AcqRel) {
            // Between batches nothing is appended: the checkpoint catches up with the WAL and
            // this batch starts it over from its beginning (see `checkpoint::Checkpointer`).
            let started = Instant::now();
            super::checkpoint::checkpoint_tail(conn);
            let took = started.elapsed();
            if took >= SLOW {
                tracing::warn!(ms = took.as_millis() as u64, "slow disk: the writer's checkpoint took long");
            }
        }
        while jobs.len() < max_batch {
            match receiver.try_recv() {
                Ok(Msg::Job(job)) => jobs.push(job),
                Ok(Msg::Shutdown) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        number += 1;
        let mut out = Vec::new();
        let result = if durability.has_failed() {
            Err(StoreError::Backend("an earlier fsync failed; the store no longer accepts writes".into()))
        } else {
            // Raised before COMMIT, so a reader that can see this batch also waits for its fsync.
            durability.committed.store(number, Ordering::Release);
            let started = Instant::now();
            let result = commit(conn, &mut jobs, Timestamp::now(), &mut out, &mut states);
            let took = started.elapsed();
            metrics::histogram!("ddp_store_batch_size").record(jobs.len() as f64);
            metrics::histogram!("ddp_store_commit_seconds").record(took.as_secs_f64());
            if took >= SLOW {
                tracing::warn!(ms = took.as_millis() as u64, writes = jobs.len(), "slow commit");
            }
            result.map_err(|e| {
                tracing::error!(error = %e, writes = jobs.len(), "storage commit failed; the batch was rolled back");
                if let Err(e) = conn.execute_batch("ROLLBACK") {
                    tracing::debug!(error = %e, "rollback after a failed commit");
                }
                // The rolled-back batch may have moved revs in the cache; it reloads from disk.
                states.clear();
                StoreError::Backend(e.to_string())
            })
        };
        if result.is_err() {
            out.clear();
        }
        if let Err(std_mpsc::SendError(p)) = to_syncer.send(Pending { number, jobs, out, result }) {
            // The syncer is gone (it panicked): nothing can be made durable any more.
            for job in p.jobs {
                job.finish(Err(StoreError::Backend("the storage sync thread stopped".into())));
            }
        }
    }
}

fn commit(
    conn: &Connection,
    jobs: &mut [Box<dyn Job>],
    now: Timestamp,
    out: &mut Vec<Committed>,
    states: &mut StoreStates,
) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let mut tx = Tx { conn, now, out, states };
    for job in jobs.iter_mut() {
        job.apply(&mut tx)?;
    }
    conn.execute_batch("COMMIT")
}

fn sync_loop(wal: &File, from_writer: &std_mpsc::Receiver<Pending>, sink: &dyn CommitSink, durability: &Durability) {
    while let Ok(first) = from_writer.recv() {
        let mut ready = vec![first];
        ready.extend(from_writer.try_iter());
        let started = Instant::now();
        // One fdatasync covers every batch already committed: they all wrote to this file.
        let synced = if ready.iter().any(|p| p.result.is_ok()) { wal.sync_data() } else { Ok(()) };
        let took = started.elapsed();
        metrics::histogram!("ddp_store_fsync_seconds").record(took.as_secs_f64());
        if took >= SLOW {
            tracing::warn!(ms = took.as_millis() as u64, "slow disk: fdatasync of the write-ahead log took long");
        }
        if let Err(e) = &synced {
            tracing::error!(error = %e, "fsync of the write-ahead log failed; refusing all further writes");
            durability.failed.store(true, Ordering::Release);
            durability.durable.send_modify(|_| ()); // wake waiting readers so they see the failure
        }
        let last = ready.last().map_or(0, |p| p.number);
        for p in ready {
            let result = match (&synced, p.result) {
                (Ok(()), Ok(())) => {
                    if !p.out.is_empty() {
                        sink.committed(&p.out);
                    }
                    Ok(())
                }
                (Err(e), Ok(())) => Err(StoreError::Backend(format!("fsync failed: {e}"))),
                (_, Err(e)) => Err(e),
            };
            for job in p.jobs {
                job.finish(result.clone());
            }
        }
        if synced.is_ok() {
            durability.durable.send_replace(last);
        }
    }
}
