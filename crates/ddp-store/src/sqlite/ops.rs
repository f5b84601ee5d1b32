//! The write transactions: what a key-value write and history trimming do inside SQLite.

use ddp_protocol::Value;
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::*;
use super::writer::Tx;
use crate::StoreError;
use crate::batch::plan;
use crate::model::*;

/// One batch (PROTOCOL.md §11): each key it names is read once, the whole batch is worked out
/// ([`plan`]), and only then written — per op, the item and a change row; nothing when an op
/// fails. The store's rev, key count and home come from the writer's
/// [`StoreStates`](super::state::StoreStates).
pub(super) fn apply_batch(tx: &mut Tx<'_>, batch: &KvBatch) -> rusqlite::Result<Result<Vec<Change>, StoreError>> {
    let conn = tx.conn;
    let (kind, owner) = (batch.store.kind(), sql_id(batch.store.owner()));
    let Some(state) = tx.states.get(conn, batch.store)? else {
        return Ok(Err(not_found(batch.store)));
    };
    let lookup = |key: &ddp_protocol::Key, with_value: bool| -> rusqlite::Result<_> {
        if with_value {
            conn.prepare_cached("SELECT rev, value FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
                .query_row(params![kind, owner, key.as_str()], |r| {
                    let value = Value::from_stored(r.get(1)?).map_err(|_| corrupt("value"))?;
                    Ok((rev_of(r.get(0)?), Some(value)))
                })
                .optional()
        } else {
            conn.prepare_cached("SELECT rev FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
                .query_row(params![kind, owner, key.as_str()], |r| Ok((rev_of(r.get(0)?), None)))
                .optional()
        }
    };
    let plan = match plan(batch, rev_of(state.rev), state.num_keys, lookup)? {
        Ok(plan) => plan,
        Err(e) => return Ok(Err(e)),
    };
    let home = state.home;
    let (origin_kind, origin_id) = batch.origin.to_parts();
    let last = plan.writes.last().map(|w| w.2);
    let batch_last = if plan.writes.len() > 1 { last } else { None };
    let mut changes = Vec::with_capacity(plan.writes.len());
    for (key, value, rev) in plan.writes {
        let new_rev = sql_id(rev.0);
        match &value {
            Some(value) => {
                conn.prepare_cached(
                    "INSERT INTO items (kind, owner, key, value, rev, modified_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (kind, owner, key) DO UPDATE SET value = excluded.value, rev = excluded.rev,
                     modified_ms = excluded.modified_ms",
                )?
                .execute(params![
                    kind,
                    owner,
                    key.as_str(),
                    value.as_json(),
                    new_rev,
                    tx.now.millis()
                ])?;
            }
            None => {
                conn.prepare_cached("DELETE FROM items WHERE kind = ?1 AND owner = ?2 AND key = ?3")?
                    .execute(params![kind, owner, key.as_str()])?;
            }
        }
        conn.prepare_cached(
            "INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id, batch_last)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            kind,
            owner,
            new_rev,
            key.as_str(),
            value.as_ref().map(Value::as_json),
            tx.now.millis(),
            home.map(|h| sql_id(h.get())),
            origin_kind,
            sql_id(origin_id),
            batch_last.map(|r| sql_id(r.0))
        ])?;
        let change =
            Change { store: batch.store, rev, key, value, time: tx.now, home, origin: batch.origin, batch_last };
        tx.out.push(Committed::Kv(change.clone()));
        changes.push(change);
    }
    if let Some(last) = last {
        state.advance(sql_id(last.0), plan.num_keys);
    }
    Ok(Ok(changes))
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
