//! The write transactions: what a key-value write and history trimming do inside SQLite.

use ddp_protocol::Value;
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::*;
use super::writer::Tx;
use crate::StoreError;
use crate::model::*;

/// One set or delete: three statements (read the item's rev, write the item, append the change);
/// the store's rev, key count and home come from the writer's [`StoreStates`](super::state::StoreStates).
pub(super) fn apply_kv(tx: &mut Tx<'_>, w: &KvWrite) -> rusqlite::Result<Result<Change, StoreError>> {
    let conn = tx.conn;
    let (kind, owner) = (w.store.kind(), sql_id(w.store.owner()));
    let Some(state) = tx.states.get(conn, w.store)? else {
        return Ok(Err(not_found(w.store)));
    };
    let current: Option<i64> = conn
        .prepare_cached("SELECT rev FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
        .query_row(params![kind, owner, w.key.as_str()], |r| r.get(0))
        .optional()?;
    let current_rev = current.map(rev_of);
    if !w.condition.holds(current_rev) {
        return Ok(Err(StoreError::RevisionMismatch { current: current_rev }));
    }
    let new_rev = state.rev + 1;
    let (value, num_keys) = match &w.action {
        KvAction::Set(value) => {
            if current.is_none() && usize::try_from(state.num_keys).unwrap_or(usize::MAX) >= w.max_keys {
                return Ok(Err(StoreError::TooManyKeys { limit: w.max_keys }));
            }
            conn.prepare_cached(
                "INSERT INTO items (kind, owner, key, value, rev, modified_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (kind, owner, key) DO UPDATE SET value = excluded.value, rev = excluded.rev,
                 modified_ms = excluded.modified_ms",
            )?
            .execute(params![kind, owner, w.key.as_str(), value.as_json(), new_rev, tx.now.millis()])?;
            (Some(value.clone()), state.num_keys + i64::from(current.is_none()))
        }
        KvAction::Delete => {
            if current.is_none() {
                return Ok(Err(StoreError::KeyNotFound));
            }
            conn.prepare_cached("DELETE FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?.execute(params![
                kind,
                owner,
                w.key.as_str()
            ])?;
            (None, state.num_keys - 1)
        }
    };
    let home = state.home;
    let (origin_kind, origin_id) = w.origin.to_parts();
    conn.prepare_cached(
        "INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        kind,
        owner,
        new_rev,
        w.key.as_str(),
        value.as_ref().map(Value::as_json),
        tx.now.millis(),
        home.map(|h| sql_id(h.get())),
        origin_kind,
        sql_id(origin_id)
    ])?;
    state.advance(new_rev, num_keys);
    let change = Change {
        store: w.store,
        rev: rev_of(new_rev),
        key: w.key.clone(),
        value,
        time: tx.now,
        home,
        origin: w.origin,
    };
    tx.out.push(Committed::Kv(change.clone()));
    Ok(Ok(change))
}

/// Drops history outside the retention rule. The newest change of every store is always kept:
/// it is what a store's rev is read from.
pub(super) fn trim(tx: &mut Tx<'_>, keep_changes: u64, cutoff_ms: i64) -> rusqlite::Result<u64> {
    let conn: &Connection = tx.conn;
    tx.states.flush(conn)?;
    let keep = sql_id(keep_changes.max(1));
    let candidates: Vec<(i64, i64, i64, i64)> = {
        let mut stmt =
            conn.prepare_cached("SELECT kind, owner, rev, history_from FROM stores WHERE rev - history_from > ?1")?;
        let rows = stmt.query_map([keep], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut removed = 0u64;
    for (kind, owner, rev, history_from) in candidates {
        let newest_droppable: Option<i64> = conn
            .prepare_cached(
                "SELECT MAX(rev) FROM changes WHERE kind = ?1 AND owner = ?2 AND rev <= ?3 AND modified_ms <= ?4",
            )?
            .query_row(params![kind, owner, rev - keep, cutoff_ms], |r| r.get(0))?;
        let Some(upto) = newest_droppable.filter(|&m| m > history_from) else { continue };
        removed += conn
            .prepare_cached("DELETE FROM changes WHERE kind = ?1 AND owner = ?2 AND rev <= ?3")?
            .execute(params![kind, owner, upto])? as u64;
        conn.prepare_cached("UPDATE stores SET history_from = ?3 WHERE kind = ?1 AND owner = ?2")?
            .execute(params![kind, owner, upto])?;
    }
    Ok(removed)
}
