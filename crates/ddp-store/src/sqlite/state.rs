//! The writer's view of every store it has touched: rev, key count, home.
//!
//! A write needs its store's rev (to assign the next), key count (for the key limit) and, for a
//! device store, the device's home (recorded on the change). Reading and rewriting a `stores` row
//! on every write would dirty one more random page per write, and pages are what the WAL and its
//! fsync pay for. So the writer keeps these in memory. Nothing here needs saving for correctness:
//! a store's rev is the rev of its newest change (trimming always keeps it), its key count is the
//! number of its items. [`StoreStates::flush`] writes revs back to `stores` only so that history
//! trimming can find the stores worth looking at.

use std::collections::HashMap;

use ddp_protocol::HomeId;
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{home_col, sql_id};
use crate::model::StoreRef;

/// What the writer knows of one store.
pub(crate) struct StoreState {
    /// The store's rev.
    pub rev: i64,
    /// How many keys it holds.
    pub num_keys: i64,
    /// For a device store, the device's home; for a home store, the home.
    pub home: Option<HomeId>,
    /// Whether `rev` moved since it was last written to `stores`.
    dirty: bool,
}

impl StoreState {
    /// Records a committed change that leaves the store at `rev` with `num_keys` keys.
    pub fn advance(&mut self, rev: i64, num_keys: i64) {
        self.rev = rev;
        self.num_keys = num_keys;
        self.dirty = true;
    }
}

/// Stores the writer has touched since it started (bounded).
#[derive(Default)]
pub(crate) struct StoreStates {
    map: HashMap<StoreRef, StoreState>,
}

/// Entries kept before the map is flushed and emptied.
const MAX_ENTRIES: usize = 200_000;

impl StoreStates {
    /// The state of `store`, loaded from disk on first use; `None` when the store does not exist.
    pub fn get(&mut self, conn: &Connection, store: StoreRef) -> rusqlite::Result<Option<&mut StoreState>> {
        if !self.map.contains_key(&store) {
            if self.map.len() >= MAX_ENTRIES {
                self.flush(conn)?;
                self.map.clear();
            }
            let Some(state) = load(conn, store)? else { return Ok(None) };
            self.map.insert(store, state);
        }
        Ok(self.map.get_mut(&store))
    }

    /// Drops what is known of `store` (deleted, or its device moved).
    pub fn forget(&mut self, store: StoreRef) {
        self.map.remove(&store);
    }

    /// Drops everything (after a rollback, or a change touching many stores).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Writes the revs that moved back to `stores`.
    pub fn flush(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let mut update =
            conn.prepare_cached("UPDATE stores SET rev = ?3 WHERE kind = ?1 AND owner = ?2 AND rev < ?3")?;
        for (store, state) in self.map.iter_mut().filter(|(_, s)| s.dirty) {
            update.execute(params![store.kind(), sql_id(store.owner()), state.rev])?;
            state.dirty = false;
        }
        Ok(())
    }
}

fn load(conn: &Connection, store: StoreRef) -> rusqlite::Result<Option<StoreState>> {
    let (kind, owner) = (store.kind(), sql_id(store.owner()));
    let Some(rev) = super::rows::store_rev(conn, store)? else { return Ok(None) };
    let num_keys: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM items WHERE kind = ?1 AND owner = ?2")?
        .query_row(params![kind, owner], |r| r.get(0))?;
    let home = match store {
        StoreRef::Device(_) => conn
            .prepare_cached("SELECT home_id FROM devices WHERE id = ?1")?
            .query_row([owner], |r| home_col(r, 0))
            .optional()?
            .flatten(),
        StoreRef::Home(h) => Some(h),
    };
    Ok(Some(StoreState { rev: sql_id(rev.0), num_keys, home, dirty: false }))
}
