//! WAL checkpoints on their own thread.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

use crate::StoreError;

/// Copies committed WAL frames back into the database file on its own connection and thread, so
/// the writer's commits never wait for the bulk of a checkpoint. PASSIVE checkpoints do not block
/// the writer; when the WAL has grown large anyway, a RESTART checkpoint (which briefly waits for
/// the writer) lets the WAL start over, and `journal_size_limit` then shrinks the file.
///
/// Under a steady stream of writes a PASSIVE checkpoint never quite catches up: frames are
/// appended while it copies, so the WAL is never wholly copied at the moment the next write
/// begins, and SQLite only starts the WAL over from its beginning in that case. The WAL then grows
/// for ever (until the RESTART valve), and every commit appends to new pages of the file: the
/// kernel zeroes each new page (a tenth of the writer's CPU at 20,000 writes/s) and every
/// `fdatasync` must also write the file's new size. So after each checkpoint of a WAL of more than
/// a few frames, this thread asks the writer (the [`tail`](Checkpointer::tail) flag) to copy the
/// frames that came meanwhile itself, between two batches; nothing is appended then, the WAL is
/// wholly copied, and the writer's next batch starts it over (and, past `journal_size_limit`,
/// truncates it). While the WAL grows fast, checkpoints come every 100 ms instead of every 2 s.
pub(super) struct Checkpointer {
    stop: Arc<StopFlag>,
    thread: Mutex<Option<JoinHandle<()>>>,
    tail: Arc<AtomicBool>,
}

#[derive(Default)]
struct StopFlag {
    stopped: Mutex<bool>,
    wake: std::sync::Condvar,
}

/// How often a checkpoint runs. Each checkpoint ends with an fsync of the database file, and on
/// the disks measured here that flush is what delays the WAL fsyncs running beside it; measured
/// at 1,000 writes/s, a checkpoint every 2 s kept write-to-device p99 near 2 ms where every 500 ms
/// let it swing up to 150 ms.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// WAL frames (pages) beyond which a RESTART checkpoint is used. PASSIVE checkpoints normally
/// keep up, and once one has copied every frame the next write starts the WAL over; RESTART
/// (which makes the writer wait) is only the safety valve for a WAL that keeps growing.
const WAL_RESTART_FRAMES: i64 = 500_000;
/// WAL frames beyond which a checkpoint asks the writer for the tail, so the WAL starts over.
const TAIL_FRAMES: i64 = 1_000;
/// WAL frames (64 MiB) beyond which the next checkpoint comes after [`CHECKPOINT_SOON`] rather
/// than [`CHECKPOINT_EVERY`]: under a heavy write load the WAL then starts over several times a
/// second and stays small.
const BUSY_FRAMES: i64 = 16_384;
/// The pause between checkpoints while the WAL grows fast.
const CHECKPOINT_SOON: std::time::Duration = std::time::Duration::from_millis(100);

impl Checkpointer {
    pub(super) fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| StoreError::Backend(format!("cannot open {} for checkpoints: {e}", path.display())))?;
        conn.execute_batch("PRAGMA busy_timeout=5000; PRAGMA journal_size_limit=67108864;")?;
        let stop = Arc::new(StopFlag::default());
        let tail = Arc::new(AtomicBool::new(false));
        let (flag, wanted) = (stop.clone(), tail.clone());
        let thread = std::thread::Builder::new()
            .name("ddp-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&conn, &flag, &wanted))
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop, thread: Mutex::new(Some(thread)), tail })
    }

    /// Set when the writer should checkpoint the WAL's last frames between two batches (see
    /// [`checkpoint_tail`]).
    pub(super) fn tail(&self) -> Arc<AtomicBool> {
        self.tail.clone()
    }

    /// Stops the thread after one last checkpoint. Idempotent; blocking.
    pub(super) fn stop(&self) {
        if let Ok(mut stopped) = self.stop.stopped.lock() {
            *stopped = true;
            self.stop.wake.notify_all();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take())
            && t.join().is_err()
        {
            tracing::error!("checkpoint thread panicked");
        }
    }
}

/// Run by the writer between two batches when [`Checkpointer::tail`] asks: copies the frames the
/// last background checkpoint left behind, so the next batch starts the WAL over.
pub(super) fn checkpoint_tail(conn: &Connection) {
    match checkpoint(conn, "PASSIVE") {
        Ok((log, done)) => tracing::trace!(log, done, "tail checkpoint"),
        Err(e) => tracing::debug!(error = %e, "tail checkpoint"),
    }
}

/// Runs a checkpoint in `mode`; returns the frames in the WAL and how many are copied.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get(1)?, r.get(2)?)))
}

fn checkpoint_loop(conn: &Connection, stop: &StopFlag, tail: &AtomicBool) {
    let mut frames = 0i64;
    loop {
        let mut pause = CHECKPOINT_EVERY;
        let mode = if frames > WAL_RESTART_FRAMES { "RESTART" } else { "PASSIVE" };
        match checkpoint(conn, mode) {
            Ok((log, done)) => {
                frames = log;
                metrics::histogram!("ddp_store_wal_frames").record(log as f64);
                tracing::trace!(mode, log, done, "checkpoint");
                // Frames were appended while this ran (the counts do not show them): have the
                // writer copy those between two batches, and its next batch starts the WAL over.
                if log > TAIL_FRAMES {
                    tail.store(true, Ordering::Release);
                }
                if log > BUSY_FRAMES {
                    pause = CHECKPOINT_SOON;
                }
            }
            Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
        }
        let Ok(stopped) = stop.stopped.lock() else { return };
        if *stopped {
            break;
        }
        match stop.wake.wait_timeout(stopped, pause) {
            Ok((stopped, _)) if !*stopped => {}
            _ => break,
        }
    }
    // A last full checkpoint leaves a small WAL behind for the next start.
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::debug!(error = %e, "final checkpoint");
    }
}
