//! Conversions between rows and records, and small queries shared by reads and writes.

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Key, Rev, Timestamp, Value};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::model::*;

pub(crate) use crate::sql::{not_found, rev_of, sql_id, to_u64};

pub(super) fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, what.to_owned(), rusqlite::types::Type::Null)
}

pub(super) fn key_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Key> {
    let s: String = row.get(i)?;
    Key::try_from(s).map_err(|_| corrupt("key"))
}

pub(super) fn value_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Value> {
    let s: String = row.get(i)?;
    Value::from_stored(s).map_err(|_| corrupt("value"))
}

pub(super) fn home_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<HomeId>> {
    Ok(row.get::<_, Option<i64>>(i)?.and_then(|n| HomeId::new(to_u64(n))))
}

pub(super) fn ts_col(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<Timestamp>> {
    Ok(row.get::<_, Option<i64>>(i)?.map(Timestamp))
}

pub(super) const DEVICE_COLUMNS: &str =
    "id, name, home_id, device_class, tag, created_ms, last_connect_ms, last_disconnect_ms";

pub(super) fn device_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: DeviceId::new(to_u64(row.get(0)?)).ok_or_else(|| corrupt("device id"))?,
        name: row.get(1)?,
        home: home_col(row, 2)?,
        device_class: row.get(3)?,
        tag: row.get(4)?,
        created: Timestamp(row.get(5)?),
        last_connect: ts_col(row, 6)?,
        last_disconnect: ts_col(row, 7)?,
    })
}

pub(super) fn home_row(row: &Row<'_>) -> rusqlite::Result<HomeRecord> {
    Ok(HomeRecord {
        id: HomeId::new(to_u64(row.get(0)?)).ok_or_else(|| corrupt("home id"))?,
        name: row.get(1)?,
        created: Timestamp(row.get(2)?),
    })
}

pub(super) fn change_row(store: StoreRef, row: &Row<'_>) -> rusqlite::Result<Change> {
    let value: Option<String> = row.get(2)?;
    Ok(Change {
        store,
        rev: rev_of(row.get(0)?),
        key: key_col(row, 1)?,
        value: value.map(Value::from_stored).transpose().map_err(|_| corrupt("value"))?,
        time: Timestamp(row.get(3)?),
        home: home_col(row, 4)?,
        origin: Origin::from_parts(row.get(5)?, to_u64(row.get(6)?)),
        batch_last: row.get::<_, Option<i64>>(7)?.map(rev_of),
    })
}

/// A store's rev and history bound, or `None` when it does not exist. The rev is that of the
/// store's newest change (kept by every trim); `stores.rev` only lags behind it.
pub(super) fn store_rev_and_history(conn: &Connection, store: StoreRef) -> rusqlite::Result<Option<(Rev, i64)>> {
    conn.prepare_cached(
        "SELECT MAX(s.rev, COALESCE((SELECT MAX(c.rev) FROM changes c WHERE c.kind = s.kind AND c.owner = s.owner), 0)),
                s.history_from
         FROM stores s WHERE s.kind = ?1 AND s.owner = ?2",
    )?
    .query_row(params![store.kind(), sql_id(store.owner())], |r| Ok((rev_of(r.get(0)?), r.get(1)?)))
    .optional()
}

/// A store's rev, or `None` when it does not exist.
pub(super) fn store_rev(conn: &Connection, store: StoreRef) -> rusqlite::Result<Option<Rev>> {
    Ok(store_rev_and_history(conn, store)?.map(|(rev, _)| rev))
}

pub(super) fn store_exists(conn: &Connection, store: StoreRef) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM stores WHERE kind = ?1 AND owner = ?2")?
        .query_row(params![store.kind(), sql_id(store.owner())], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

pub(super) fn home_exists(conn: &Connection, id: HomeId) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM homes WHERE id = ?1")?
        .query_row([sql_id(id.get())], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

pub(super) fn device_in(conn: &Connection, id: DeviceId) -> rusqlite::Result<Option<DeviceRecord>> {
    conn.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"))?
        .query_row([sql_id(id.get())], device_row)
        .optional()
}

pub(super) fn delete_store(conn: &Connection, store: StoreRef) -> rusqlite::Result<()> {
    let (kind, owner) = (store.kind(), sql_id(store.owner()));
    conn.prepare_cached("DELETE FROM items WHERE kind = ?1 AND owner = ?2")?.execute(params![kind, owner])?;
    conn.prepare_cached("DELETE FROM changes WHERE kind = ?1 AND owner = ?2")?.execute(params![kind, owner])?;
    conn.prepare_cached("DELETE FROM stores WHERE kind = ?1 AND owner = ?2")?.execute(params![kind, owner])?;
    Ok(())
}

pub(super) fn create_store(conn: &Connection, store: StoreRef) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO stores (kind, owner, rev, history_from) VALUES (?1, ?2, 0, 0)")?
        .execute(params![store.kind(), sql_id(store.owner())])?;
    Ok(())
}

pub(super) fn api_key_homes(conn: &Connection, id: i64) -> rusqlite::Result<Vec<HomeId>> {
    let mut stmt = conn.prepare_cached("SELECT home_id FROM api_key_homes WHERE key_id = ?1 ORDER BY home_id")?;
    let rows = stmt.query_map([id], |r| r.get::<_, i64>(0))?;
    let mut homes = Vec::new();
    for h in rows {
        homes.extend(HomeId::new(to_u64(h?)));
    }
    Ok(homes)
}

pub(super) fn api_key_row(conn: &Connection, row: &Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    let id: i64 = row.get(0)?;
    let all_homes: bool = row.get(3)?;
    let permission: String = row.get(2)?;
    Ok(ApiKeyRecord {
        id: ApiKeyId::new(to_u64(id)).ok_or_else(|| corrupt("api key id"))?,
        name: row.get(1)?,
        homes: if all_homes { None } else { Some(api_key_homes(conn, id)?) },
        permission: Permission::parse(&permission).ok_or_else(|| corrupt("permission"))?,
        created: Timestamp(row.get(4)?),
    })
}
