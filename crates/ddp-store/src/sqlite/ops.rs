//! The write transactions: what a key-value write and history trimming do inside SQLite.

use std::collections::HashMap;

use ddp_protocol::{Rev, Value};
use rusqlite::{Connection, params};

use super::rows::*;
use super::writer::Tx;
use crate::StoreError;
use crate::batch::plan;
use crate::model::*;

/// Rows per multi-row statement, largest first: a batch's rows go out in as few statements as
/// these sizes allow (a few statement texts, so the statement cache holds them all).
const CHUNKS: [usize; 3] = [32, 8, 1];

/// Runs `sql(n)` (a statement over `n` rows) for `rows`, in chunks of [`CHUNKS`]; `bind` adds a
/// row's parameters.
fn chunked<'r, T>(
    conn: &Connection,
    rows: &'r [T],
    sql: impl Fn(usize) -> String,
    mut bind: impl FnMut(&'r T, &mut Vec<&'r dyn rusqlite::ToSql>),
    mut each: impl FnMut(&mut rusqlite::CachedStatement<'_>, &[&'r dyn rusqlite::ToSql]) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let mut rest = rows;
    while !rest.is_empty() {
        let n = CHUNKS.into_iter().find(|&c| c <= rest.len()).unwrap_or(1);
        let (now, later) = rest.split_at(n);
        let mut params = Vec::new();
        for row in now {
            bind(row, &mut params);
        }
        let mut stmt = conn.prepare_cached(&sql(n))?;
        each(&mut stmt, &params)?;
        rest = later;
    }
    Ok(())
}

/// `(?,?,…)` repeated `rows` times, `width` placeholders each, comma-separated.
fn placeholders(rows: usize, width: usize) -> String {
    let one = format!("({})", vec!["?"; width].join(","));
    vec![one; rows].join(",")
}

/// One batch (PROTOCOL.md §11): the keys it names are read in a statement or two, the whole
/// batch is worked out ([`plan`]), and only then written: each key's final state in `items`
/// (upserts and deletes, many rows a statement) and a change row per op; nothing when an op
/// fails. The store's rev, key count and home come from the writer's
/// [`StoreStates`](super::state::StoreStates).
pub(super) fn apply_batch(tx: &mut Tx<'_>, batch: &KvBatch) -> rusqlite::Result<Result<Vec<Change>, StoreError>> {
    let conn = tx.conn;
    let (kind, owner) = (batch.store.kind(), sql_id(batch.store.owner()));
    let Some(state) = tx.states.get(conn, batch.store)? else {
        return Ok(Err(not_found(batch.store)));
    };
    // What storage holds of every key the batch names (values only when it merges).
    let mut keys: Vec<&str> = batch.ops.iter().map(|op| op.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let merges = batch.ops.iter().any(|op| matches!(op.action, KvAction::Merge(_)));
    let mut stored: HashMap<ddp_protocol::Key, (Rev, Option<Value>)> = HashMap::with_capacity(keys.len());
    let (kind_p, owner_p) = (kind, owner);
    chunked(
        conn,
        &keys,
        |n| {
            let columns = if merges { "key, rev, value" } else { "key, rev" };
            format!("SELECT {columns} FROM items WHERE kind = ? AND owner = ? AND key IN ({})", vec!["?"; n].join(","))
        },
        |key, params| {
            if params.is_empty() {
                params.push(&kind_p);
                params.push(&owner_p);
            }
            params.push(key);
        },
        |stmt, params| {
            let mut rows = stmt.query(params)?;
            while let Some(row) = rows.next()? {
                let value =
                    if merges { Some(Value::from_stored(row.get(2)?).map_err(|_| corrupt("value"))?) } else { None };
                stored.insert(key_col(row, 0)?, (rev_of(row.get(1)?), value));
            }
            Ok(())
        },
    )?;
    let lookup = |key: &ddp_protocol::Key, _with_value: bool| -> rusqlite::Result<_> { Ok(stored.get(key).cloned()) };
    let plan = match plan(batch, rev_of(state.rev), state.num_keys, lookup)? {
        Ok(plan) => plan,
        Err(e) => return Ok(Err(e)),
    };
    let home = state.home.map(|h| sql_id(h.get()));
    let (origin_kind, origin_id) = batch.origin.to_parts();
    let origin_id = sql_id(origin_id);
    let now = tx.now.millis();
    let last = plan.writes.last().map(|w| w.2);
    let batch_last = if plan.writes.len() > 1 { last.map(|r| sql_id(r.0)) } else { None };
    if let Some(job) = batch.job
        && let Err(e) = super::fleet::mark_written(conn, job, owner, last.map_or(0, |r| sql_id(r.0)))?
    {
        return Ok(Err(e));
    }

    // Each key's final state: the last op on it decides.
    struct Row<'a> {
        key: &'a str,
        value: Option<&'a str>,
        rev: i64,
    }
    let rows: Vec<Row<'_>> = plan
        .writes
        .iter()
        .map(|(k, v, r)| Row { key: k.as_str(), value: v.as_ref().map(Value::as_json), rev: sql_id(r.0) })
        .collect();
    let mut last_of: HashMap<&str, usize> = HashMap::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        last_of.insert(row.key, i);
    }
    let mut finals: Vec<&Row<'_>> = last_of.values().map(|&i| &rows[i]).collect();
    finals.sort_unstable_by_key(|r| r.rev);
    let upserts: Vec<&Row<'_>> = finals.iter().copied().filter(|r| r.value.is_some()).collect();
    let deletes: Vec<&Row<'_>> = finals.iter().copied().filter(|r| r.value.is_none()).collect();
    let execute =
        |stmt: &mut rusqlite::CachedStatement<'_>, params: &[&dyn rusqlite::ToSql]| stmt.execute(params).map(|_| ());
    chunked(
        conn,
        &upserts,
        |n| {
            format!(
                "INSERT INTO items (kind, owner, key, value, rev, modified_ms) VALUES {}
                 ON CONFLICT (kind, owner, key) DO UPDATE SET value = excluded.value, rev = excluded.rev,
                 modified_ms = excluded.modified_ms",
                placeholders(n, 6)
            )
        },
        |row, params| {
            params.extend([&kind as &dyn rusqlite::ToSql, &owner, &row.key, &row.value, &row.rev, &now]);
        },
        execute,
    )?;
    chunked(
        conn,
        &deletes,
        |n| format!("DELETE FROM items WHERE kind = ? AND owner = ? AND key IN ({})", vec!["?"; n].join(",")),
        |row, params| {
            if params.is_empty() {
                params.push(&kind);
                params.push(&owner);
            }
            params.push(&row.key);
        },
        execute,
    )?;
    chunked(
        conn,
        &rows,
        |n| {
            format!(
                "INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id,
                 batch_last) VALUES {}",
                placeholders(n, 10)
            )
        },
        |row, params| {
            params.extend([
                &kind as &dyn rusqlite::ToSql,
                &owner,
                &row.rev,
                &row.key,
                &row.value,
                &now,
                &home,
                &origin_kind,
                &origin_id,
                &batch_last,
            ]);
        },
        execute,
    )?;

    let batch_last = batch_last.map(rev_of);
    let mut changes = Vec::with_capacity(plan.writes.len());
    for (key, value, rev) in plan.writes {
        let change = Change {
            store: batch.store,
            rev,
            key,
            value,
            time: tx.now,
            home: state.home,
            origin: batch.origin,
            batch_last,
        };
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
