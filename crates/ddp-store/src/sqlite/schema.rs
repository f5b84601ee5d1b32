//! The SQLite schema and its migrations.

use rusqlite::Connection;

use crate::StoreError;

pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE homes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE devices (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT NOT NULL,
    home_id             INTEGER,
    device_class        TEXT NOT NULL,
    tag                 TEXT NOT NULL,
    key_hash            BLOB NOT NULL UNIQUE,
    created_ms          INTEGER NOT NULL,
    last_connect_ms     INTEGER,
    last_disconnect_ms  INTEGER
);
CREATE INDEX devices_by_home ON devices(home_id);
CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    permission  TEXT NOT NULL,
    all_homes   INTEGER NOT NULL,
    key_hash    BLOB NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE api_key_homes (
    key_id   INTEGER NOT NULL,
    home_id  INTEGER NOT NULL,
    PRIMARY KEY (key_id, home_id)
) WITHOUT ROWID;
CREATE INDEX api_key_homes_by_home ON api_key_homes(home_id);
-- kind: 0 device store, 1 home store. history_from: every change with rev > history_from is kept.
-- rev may lag: a store's rev is the greater of it and its newest change's rev (see state.rs).
CREATE TABLE stores (
    kind          INTEGER NOT NULL,
    owner         INTEGER NOT NULL,
    rev           INTEGER NOT NULL,
    history_from  INTEGER NOT NULL,
    PRIMARY KEY (kind, owner)
) WITHOUT ROWID;
CREATE TABLE items (
    kind         INTEGER NOT NULL,
    owner        INTEGER NOT NULL,
    key          TEXT NOT NULL,
    value        TEXT NOT NULL,
    rev          INTEGER NOT NULL,
    modified_ms  INTEGER NOT NULL,
    PRIMARY KEY (kind, owner, key)
) WITHOUT ROWID;
-- The change history. value NULL: a delete. origin_kind: 0 admin, 1 project key, 2 device.
-- Rows are appended in commit order under a global sequence, so a batch of writes to many stores
-- touches few table pages; only the small index is updated at random places.
CREATE TABLE changes (
    seq          INTEGER PRIMARY KEY,
    kind         INTEGER NOT NULL,
    owner        INTEGER NOT NULL,
    rev          INTEGER NOT NULL,
    key          TEXT NOT NULL,
    value        TEXT,
    modified_ms  INTEGER NOT NULL,
    home_id      INTEGER,
    origin_kind  INTEGER NOT NULL,
    origin_id    INTEGER NOT NULL
);
CREATE UNIQUE INDEX changes_by_store ON changes(kind, owner, rev);
"#,
    r#"
-- Delivery and acknowledgement (PROTOCOL.md §10), per device: the highest rev handed to its own
-- sessions and the highest it acknowledged, with when. Recorded about once a second; never lowered.
CREATE TABLE device_sync (
    device_id      INTEGER PRIMARY KEY,
    delivered_rev  INTEGER NOT NULL,
    applied_rev    INTEGER NOT NULL,
    applied_ms     INTEGER
);
"#,
    r#"
-- Atomic batches (PROTOCOL.md §11): a change made by a batch of two or more ops carries the rev
-- of the batch's last change, so that sessions that take batches get them whole, live or resumed.
ALTER TABLE changes ADD COLUMN batch_last INTEGER;
"#,
    r#"
-- Fleet (PROTOCOL.md §12). The value indexes of fleet queries (items_by_value…) follow the
-- operator's --index-keys and are made at start-up (sqlite::fleet::reconcile_value_index).
-- Jobs: state 0 running, 1 done, 2 cancelled; next_ms: when a rated job may claim again.
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    state        INTEGER NOT NULL,
    select_json  TEXT NOT NULL,
    ops_json     TEXT NOT NULL,
    rate         REAL,
    api_key_id   INTEGER,
    next_ms      INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    ended_ms     INTEGER
);
-- The devices a job selected: state 0 to write, 1 written (rev: the write's last rev, set in the
-- write's own transaction), 2 failed (reason). claim_until_ms: a claim's lease.
CREATE TABLE job_devices (
    job_id          INTEGER NOT NULL,
    device_id       INTEGER NOT NULL,
    state           INTEGER NOT NULL,
    rev             INTEGER,
    claim_until_ms  INTEGER NOT NULL,
    reason          TEXT,
    PRIMARY KEY (job_id, device_id)
) WITHOUT ROWID;
CREATE INDEX job_devices_to_write ON job_devices(job_id, device_id) WHERE state = 0;
"#,
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Backend(format!(
            "the database has schema version {version}, newer than this ddp knows ({known}); use a newer ddp"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
        tx.commit()?;
        tracing::info!(version = i + 1, "storage schema migrated");
    }
    Ok(())
}
