//! The pool of read-only connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::writer::Durability;
use crate::StoreError;

/// A few read-only connections used on the blocking thread pool. Every read waits, before it
/// returns, until what it may have seen is durable.
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
    durability: Arc<Durability>,
}

impl Readers {
    pub(super) fn open(path: &Path, count: usize, durability: Arc<Durability>) -> Result<Readers, StoreError> {
        let idle = (0..count).map(|_| open_reader(path)).collect::<Result<Vec<_>, _>>()?;
        Ok(Readers { path: path.to_owned(), idle: Mutex::new(idle), permits: Semaphore::new(count), durability })
    }

    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self.permits.acquire().await.map_err(|_| StoreError::Closed)?;
        let this = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || {
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
        .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))??;
        drop(permit);
        self.durability.wait_durable().await?;
        Ok(result)
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| StoreError::Backend(format!("cannot open {} for reading: {e}", path.display())))?;
    conn.execute_batch("PRAGMA busy_timeout=5000;")?;
    Ok(conn)
}
