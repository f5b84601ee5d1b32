//! Reading rows into records, and the statements several operations share.

use std::time::Duration;

use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Key, Timestamp, Value};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::feed;
use crate::StoreError;
use crate::model::*;
use crate::sql::{sql_id, to_u64};

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("unreadable {what} in the database"))
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn key_of(s: String) -> Result<Key, StoreError> {
    Key::try_from(s).map_err(|_| corrupt("key"))
}

pub(super) fn value_of(s: String) -> Result<Value, StoreError> {
    Value::from_stored(s).map_err(|_| corrupt("value"))
}

pub(super) fn home_of(n: Option<i64>) -> Option<HomeId> {
    n.and_then(|n| HomeId::new(to_u64(n)))
}

pub(super) fn home_id(h: HomeId) -> i64 {
    sql_id(h.get())
}

pub(super) const DEVICE_COLUMNS: &str =
    "id, name, home_id, device_class, tag, created_ms, last_connect_ms, last_disconnect_ms";

pub(super) fn device_row(row: &Row) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        id: DeviceId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("device id"))?,
        name: row.try_get(1)?,
        home: home_of(row.try_get(2)?),
        device_class: row.try_get(3)?,
        tag: row.try_get(4)?,
        created: Timestamp(row.try_get(5)?),
        last_connect: row.try_get::<_, Option<i64>>(6)?.map(Timestamp),
        last_disconnect: row.try_get::<_, Option<i64>>(7)?.map(Timestamp),
    })
}

pub(super) fn home_row(row: &Row) -> Result<HomeRecord, StoreError> {
    Ok(HomeRecord {
        id: HomeId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("home id"))?,
        name: row.try_get(1)?,
        created: Timestamp(row.try_get(2)?),
    })
}

pub(super) const API_KEY_QUERY: &str = "SELECT k.id, k.name, k.permission, k.all_homes, k.created_ms,
        COALESCE(array_agg(h.home_id ORDER BY h.home_id) FILTER (WHERE h.home_id IS NOT NULL), '{}')
    FROM api_keys k LEFT JOIN api_key_homes h ON h.key_id = k.id";

pub(super) fn api_key_row(row: &Row) -> Result<ApiKeyRecord, StoreError> {
    let all_homes: bool = row.try_get(3)?;
    let homes: Vec<i64> = row.try_get(5)?;
    let permission: String = row.try_get(2)?;
    Ok(ApiKeyRecord {
        id: ApiKeyId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("api key id"))?,
        name: row.try_get(1)?,
        homes: if all_homes { None } else { Some(homes.into_iter().filter_map(|h| home_of(Some(h))).collect()) },
        permission: Permission::parse(&permission).ok_or_else(|| corrupt("permission"))?,
        created: Timestamp(row.try_get(4)?),
    })
}

/// Whether home `h` exists, locking it against deletion until the transaction ends.
pub(super) async fn lock_home(tx: &impl GenericClient, h: HomeId) -> Result<bool, StoreError> {
    let stmt = tx.prepare_cached("SELECT 1 FROM homes WHERE id = $1 FOR SHARE").await?;
    Ok(tx.query_opt(&stmt, &[&home_id(h)]).await?.is_some())
}

pub(super) async fn create_store(tx: &impl GenericClient, store: StoreRef) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached("INSERT INTO stores (kind, owner, rev, num_keys, history_from) VALUES ($1, $2, 0, 0, 0)")
        .await?;
    tx.execute(&stmt, &[&(store.kind() as i16), &sql_id(store.owner())]).await?;
    Ok(())
}

pub(super) async fn delete_store(tx: &impl GenericClient, store: StoreRef) -> Result<(), StoreError> {
    let (kind, owner) = (store.kind() as i16, sql_id(store.owner()));
    for sql in [
        "DELETE FROM items WHERE kind = $1 AND owner = $2",
        "DELETE FROM changes WHERE kind = $1 AND owner = $2",
        "DELETE FROM stores WHERE kind = $1 AND owner = $2",
    ] {
        let stmt = tx.prepare_cached(sql).await?;
        tx.execute(&stmt, &[&kind, &owner]).await?;
    }
    Ok(())
}

/// Logs an admin change for the other nodes, in the caller's transaction.
pub(super) async fn log_admin(tx: &impl GenericClient, change: &AdminChange, now: Timestamp) -> Result<(), StoreError> {
    let (kind, a, b, c) = feed::admin_to_row(change);
    let stmt =
        tx.prepare_cached("INSERT INTO admin_log (kind, a, b, c, created_ms) VALUES ($1, $2, $3, $4, $5)").await?;
    tx.execute(&stmt, &[&kind, &a, &b, &c, &now.millis()]).await?;
    Ok(())
}
