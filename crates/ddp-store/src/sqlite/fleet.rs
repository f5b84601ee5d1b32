//! Fleet queries and jobs (PROTOCOL.md §12) in SQLite: the SQL of [`crate::fleet`], run on a
//! read connection (queries, job progress) or in the writer's transaction (everything that
//! changes a job).

use ddp_protocol::{ApiKeyId, DeviceId, JobId, Timestamp};
use rusqlite::types::ToSqlOutput;
use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};

use super::rows::*;
use super::writer::Tx;
use crate::StoreError;
use crate::fleet::*;
use crate::model::DeviceRecord;

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Param::Int(i) => i.to_sql(),
            Param::Float(f) => f.to_sql(),
            Param::Text(s) => s.to_sql(),
            // The builder spells lists out for SQLite.
            Param::Ints(_) => Err(rusqlite::Error::ToSqlConversionFailure("a list parameter in SQLite".into())),
        }
    }
}

/// A statement of [`crate::fleet`] (`$n` placeholders) in SQLite's numbered spelling (`?n`).
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// Makes the value indexes (`items_by_value…`) what `index` asks for: drops those it does not
/// name (or names differently), builds the missing ones. Returns (built, dropped).
pub(super) fn reconcile_value_index(conn: &Connection, index: &ValueIndex) -> rusqlite::Result<(usize, usize)> {
    let wanted = index.indexes(Dialect::Sqlite);
    let existing: Vec<(String, String)> = {
        let mut stmt = conn.prepare(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name LIKE 'items\\_by\\_value%' ESCAPE '\\'",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.unwrap_or_default())))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut dropped = 0;
    for (name, sql) in &existing {
        if !wanted.iter().any(|(n, s)| n == name && s == sql) {
            conn.execute_batch(&format!("DROP INDEX \"{name}\""))?;
            dropped += 1;
        }
    }
    let mut built = 0;
    for (name, sql) in &wanted {
        if !existing.iter().any(|(n, s)| n == name && s == sql) {
            conn.execute_batch(sql)?;
            built += 1;
        }
    }
    Ok((built, dropped))
}

/// The devices `q` selects, in id order.
pub(super) fn find_devices(
    conn: &Connection,
    index: &ValueIndex,
    q: &DeviceQuery,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let mut owners = Vec::with_capacity(q.wheres.len());
    for w in &q.wheres {
        owners.push(if can_drive(index, w) {
            let sql = Sql::new(Dialect::Sqlite, index).owners(w, DRIVE_BELOW);
            let mut stmt = conn.prepare_cached(&sql.text)?;
            let rows = stmt.query_map(params_from_iter(&sql.params), |r| r.get::<_, i64>(0))?;
            let found: Vec<i64> = rows.collect::<rusqlite::Result<_>>()?;
            Some(found.into_iter().filter_map(|d| DeviceId::new(to_u64(d))).collect())
        } else {
            None
        });
    }
    let q = drive(q.clone(), owners);
    let sql = Sql::new(Dialect::Sqlite, index).devices(&q, DEVICE_COLUMNS);
    let mut stmt = conn.prepare_cached(&sql.text)?;
    let rows = stmt.query_map(params_from_iter(&sql.params), device_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord::from_row(
        JobId::new(to_u64(row.get(0)?)).ok_or_else(|| corrupt("job id"))?,
        JobState::from_code(row.get(1)?),
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get::<_, Option<i64>>(5)?.and_then(|k| ApiKeyId::new(to_u64(k))),
        Timestamp(row.get(6)?),
        ts_col(row, 7)?,
    ))
}

/// Fills in a job's progress.
fn with_progress(conn: &Connection, mut job: JobRecord) -> rusqlite::Result<JobRecord> {
    let id = sql_id(job.id.get());
    let counts: [i64; 5] = conn
        .prepare_cached(&numbered(JOB_COUNTS_SQL))?
        .query_row([id], |r| Ok([r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?]))?;
    [job.selected, job.written, job.failed, job.delivered, job.applied] = counts.map(to_u64);
    let mut stmt = conn.prepare_cached(&numbered(JOB_ERRORS_SQL))?;
    let errors = stmt.query_map([id], |r| {
        Ok((DeviceId::new(to_u64(r.get(0)?)).ok_or_else(|| corrupt("device id"))?, r.get::<_, Option<String>>(1)?))
    })?;
    for e in errors {
        let (device, reason) = e?;
        job.errors.push((device, reason.unwrap_or_default()));
    }
    Ok(job)
}

/// One job with its progress.
pub(super) fn job(conn: &mut Connection, id: JobId) -> Result<JobRecord, StoreError> {
    let tx = conn.transaction()?;
    let job = tx
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([sql_id(id.get())], job_row)
        .optional()?
        .ok_or(StoreError::JobNotFound(id))?;
    Ok(with_progress(&tx, job)?)
}

/// Every job (of `api_key`, when given), with its progress.
pub(super) fn jobs(conn: &mut Connection, api_key: Option<ApiKeyId>) -> Result<Vec<JobRecord>, StoreError> {
    let tx = conn.transaction()?;
    let list: Vec<JobRecord> = {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR api_key_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([api_key.map(|k| sql_id(k.get()))], job_row)?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    Ok(list.into_iter().map(|j| with_progress(&tx, j)).collect::<rusqlite::Result<_>>()?)
}

/// At start-up: one node, so no claim made before it can still be at work; its devices may be
/// claimed again at once instead of when their leases run out.
pub(super) fn release_claims(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute("UPDATE job_devices SET claim_until_ms = 0 WHERE state = 0 AND claim_until_ms > 0", [])
}

/// Inserts a running job and its devices.
pub(super) fn create_job(tx: &mut Tx<'_>, new: &NewJob) -> rusqlite::Result<Result<JobId, StoreError>> {
    let conn = tx.conn;
    let now = tx.now.millis();
    conn.prepare_cached(
        "INSERT INTO jobs (state, select_json, ops_json, rate, api_key_id, next_ms, created_ms)
         VALUES (0, ?1, ?2, ?3, ?4, ?5, ?5)",
    )?
    .execute(params![new.select, new.ops, new.rate, new.api_key.map(|k| sql_id(k.get())), now])?;
    let id = conn.last_insert_rowid();
    let Some(job) = JobId::new(to_u64(id)) else { return Err(corrupt("job id")) };
    for chunk in new.devices.chunks(256) {
        let sql = format!(
            "INSERT OR IGNORE INTO job_devices (job_id, device_id, state, claim_until_ms) VALUES {}",
            vec!["(?, ?, 0, 0)"; chunk.len()].join(",")
        );
        let ids: Vec<i64> = chunk.iter().flat_map(|d| [id, sql_id(d.get())]).collect();
        conn.prepare_cached(&sql)?.execute(params_from_iter(ids))?;
    }
    Ok(Ok(job))
}

/// Cancels a running job; false when there is no such job.
pub(super) fn cancel_job(tx: &mut Tx<'_>, id: JobId) -> rusqlite::Result<bool> {
    let conn = tx.conn;
    conn.prepare_cached(&numbered(JOB_CANCEL_SQL))?.execute(params![sql_id(id.get()), tx.now.millis()])?;
    let exists = conn.prepare_cached("SELECT 1 FROM jobs WHERE id = ?1")?.exists([sql_id(id.get())])?;
    Ok(exists)
}

/// Claims work of the first running job that has some to give now.
pub(super) fn claim(tx: &mut Tx<'_>, max: usize, lease_ms: i64, now: Timestamp) -> rusqlite::Result<ClaimOutcome> {
    let conn = tx.conn;
    let now = now.millis();
    /// A running job: id, ops, API key, rate, next claim.
    type Running = (i64, String, Option<i64>, Option<f64>, i64);
    let running: Vec<Running> = {
        let mut stmt = conn
            .prepare_cached("SELECT id, ops_json, api_key_id, rate, next_ms FROM jobs WHERE state = 0 ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut wait: Option<i64> = None;
    let count = running.len();
    for (id, ops, api_key, rate, next_ms) in running {
        if rate.is_some() && next_ms > now {
            wait = Some(wait.map_or(next_ms, |w| w.min(next_ms)));
            continue;
        }
        let (n, gap) = rate.map_or((max, 0), |r| rated_claim(r, max));
        let devices: Vec<i64> = {
            let mut stmt = conn.prepare_cached(
                "SELECT device_id FROM job_devices WHERE job_id = ?1 AND state = 0 AND claim_until_ms <= ?2
                 ORDER BY device_id LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![id, now, i64::try_from(n).unwrap_or(i64::MAX)], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if devices.is_empty() {
            // All claimed by others (their lease ends at the earliest then), or none left.
            let lease_end: Option<i64> = conn
                .prepare_cached("SELECT MIN(claim_until_ms) FROM job_devices WHERE job_id = ?1 AND state = 0")?
                .query_row([id], |r| r.get(0))?;
            match lease_end {
                Some(end) => wait = Some(wait.map_or(end, |w| w.min(end))),
                None => {
                    conn.prepare_cached(&numbered(JOB_FINISH_SQL))?.execute(params![id, now])?;
                }
            }
            continue;
        }
        for chunk in devices.chunks(256) {
            let sql = format!(
                "UPDATE job_devices SET claim_until_ms = ?1 WHERE job_id = ?2 AND device_id IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut p: Vec<i64> = vec![now + lease_ms, id];
            p.extend_from_slice(chunk);
            conn.prepare_cached(&sql)?.execute(params_from_iter(p))?;
        }
        if rate.is_some() {
            conn.prepare_cached("UPDATE jobs SET next_ms = MAX(next_ms, ?2) + ?3 WHERE id = ?1")?
                .execute(params![id, now, gap])?;
        }
        let Some(job) = JobId::new(to_u64(id)) else { return Err(corrupt("job id")) };
        return Ok(ClaimOutcome::Claimed(JobClaim {
            job,
            ops,
            api_key: api_key.and_then(|k| ApiKeyId::new(to_u64(k))),
            devices: devices.into_iter().filter_map(|d| DeviceId::new(to_u64(d))).collect(),
            running: count,
        }));
    }
    Ok(wait.map_or(ClaimOutcome::Idle, |w| ClaimOutcome::Wait { until: Timestamp(w), running: count }))
}

/// Records failures and ends the job when nothing is left to write; its state after.
pub(super) fn results(
    tx: &mut Tx<'_>,
    job: JobId,
    failed: &[(DeviceId, String)],
) -> rusqlite::Result<Result<JobState, StoreError>> {
    let conn = tx.conn;
    let id = sql_id(job.get());
    for (device, reason) in failed {
        conn.prepare_cached(&numbered(JOB_FAIL_SQL))?.execute(params![id, sql_id(device.get()), reason])?;
    }
    conn.prepare_cached(&numbered(JOB_FINISH_SQL))?.execute(params![id, tx.now.millis()])?;
    let state: Option<i64> =
        conn.prepare_cached("SELECT state FROM jobs WHERE id = ?1")?.query_row([id], |r| r.get(0)).optional()?;
    Ok(state.map(JobState::from_code).ok_or(StoreError::JobNotFound(job)))
}

/// Inside a job's write: marks the device written by the job (with the batch's last rev), or
/// refuses the write when the job no longer waits for it.
pub(super) fn mark_written(
    conn: &Connection,
    job: JobId,
    device: i64,
    last_rev: i64,
) -> rusqlite::Result<Result<(), StoreError>> {
    let marked = conn.prepare_cached(&numbered(JOB_MARK_SQL))?.execute(params![sql_id(job.get()), device, last_rev])?;
    Ok(if marked == 0 { Err(StoreError::JobNotPending(job)) } else { Ok(()) })
}

#[cfg(test)]
mod tests {
    use ddp_protocol::fleet::Where;

    use super::*;

    fn plan(conn: &Connection, sql: &Sql) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {}", sql.text)).expect("explain");
        let rows = stmt.query_map(params_from_iter(&sql.params), |r| r.get::<_, String>(3)).expect("plan");
        rows.collect::<rusqlite::Result<Vec<_>>>().expect("plan rows").join("; ")
    }

    /// The conditions read the expression index, not the items: the index's expressions and the
    /// queries' are the same text.
    #[test]
    fn conditions_are_index_ranges() {
        let mut conn = Connection::open_in_memory().expect("open");
        super::super::schema::migrate(&mut conn).expect("migrate");
        let index = ValueIndex::parse("fw,s").expect("keys");
        assert_eq!(reconcile_value_index(&conn, &index).expect("index"), (2, 0));
        assert_eq!(reconcile_value_index(&conn, &index).expect("index"), (0, 0), "kept as it is");
        for (c, range) in [
            ("fw<2.1", "<expr><?"),
            ("fw>=3", "<expr>>?"),
            ("fw=\"a\"", "<expr>=?"),
            ("s<\"b\"", "<expr><?"),
            ("fw", "key=?"),
        ] {
            let w = Where::parse(c).expect("where");
            let owners = plan(&conn, &Sql::new(Dialect::Sqlite, &index).owners(&w, DRIVE_BELOW));
            assert!(owners.contains(&format!("USING COVERING INDEX items_by_value:{}", w.key)), "{c}: {owners}");
            assert!(owners.contains(range), "{c}: {owners}");
            let q = DeviceQuery { wheres: vec![w], limit: 100, ..DeviceQuery::default() };
            let walked = plan(&conn, &Sql::new(Dialect::Sqlite, &index).devices(&q, DEVICE_COLUMNS));
            // Walking devices: each condition is a point probe of the device's own item.
            let text = Sql::new(Dialect::Sqlite, &index).devices(&q, DEVICE_COLUMNS).text;
            assert!(walked.contains("PRIMARY KEY (kind=? AND owner=? AND key=?)"), "{c}: {walked} {text}");
        }
        // Another key has no index: its conditions are probes of each device's item.
        let w = Where::parse("other<2").expect("where");
        let q = DeviceQuery { wheres: vec![w], limit: 100, ..DeviceQuery::default() };
        let walked = plan(&conn, &Sql::new(Dialect::Sqlite, &index).devices(&q, DEVICE_COLUMNS));
        assert!(walked.contains("PRIMARY KEY (kind=? AND owner=? AND key=?)"), "{walked}");
        // Changing the keys drops and builds what changed; no keys, no index.
        assert_eq!(reconcile_value_index(&conn, &ValueIndex::parse("fw,x").expect("keys")).expect("index"), (1, 1));
        assert_eq!(reconcile_value_index(&conn, &ValueIndex::Off).expect("index"), (0, 2));
        assert_eq!(reconcile_value_index(&conn, &ValueIndex::All).expect("index"), (1, 0));
    }
}
