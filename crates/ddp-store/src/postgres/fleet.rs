//! Fleet queries and jobs (PROTOCOL.md §12) on PostgreSQL: the SQL of [`crate::fleet`]. Work is
//! claimed in the database: a claim locks the running jobs' rows (so claimers of all nodes take
//! turns, and a rated job's budget is shared by them) and takes unwritten devices with
//! `FOR UPDATE SKIP LOCKED`, leasing them for a while. A device is written at most once whatever
//! the leases do: `ddp_kv_apply` records the write as the job's in the write's own transaction,
//! and refuses it when the job wrote the device already or no longer runs.

use ddp_protocol::{ApiKeyId, DeviceId, JobId, Timestamp};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::PgStore;
use super::rows::*;
use crate::StoreError;
use crate::fleet::*;
use crate::model::DeviceRecord;
use crate::sql::{sql_id, to_u64};

fn bound(params: &[Param]) -> Vec<Box<dyn ToSql + Sync + Send>> {
    params
        .iter()
        .map(|p| -> Box<dyn ToSql + Sync + Send> {
            match p {
                Param::Int(i) => Box::new(*i),
                Param::Float(f) => Box::new(*f),
                Param::Text(s) => Box::new(s.clone()),
                Param::Ints(v) => Box::new(v.clone()),
            }
        })
        .collect()
}

async fn query(client: &impl GenericClient, sql: &Sql<'_>) -> Result<Vec<Row>, StoreError> {
    let params = bound(&sql.params);
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let stmt = client.prepare_cached(&sql.text).await?;
    Ok(client.query(&stmt, &refs).await?)
}

fn job_row(row: &Row) -> Result<JobRecord, StoreError> {
    Ok(JobRecord::from_row(
        JobId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("job id"))?,
        JobState::from_code(i64::from(row.try_get::<_, i16>(1)?)),
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get::<_, Option<i64>>(5)?.and_then(|k| ApiKeyId::new(to_u64(k))),
        Timestamp(row.try_get(6)?),
        row.try_get::<_, Option<i64>>(7)?.map(Timestamp),
    ))
}

async fn with_progress(client: &impl GenericClient, mut job: JobRecord) -> Result<JobRecord, StoreError> {
    let id = sql_id(job.id.get());
    let stmt = client.prepare_cached(JOB_COUNTS_SQL).await?;
    let row = client.query_one(&stmt, &[&id]).await?;
    let mut counts = [0u64; 5];
    for (i, c) in counts.iter_mut().enumerate() {
        *c = to_u64(row.try_get(i)?);
    }
    [job.selected, job.written, job.failed, job.delivered, job.applied] = counts;
    let stmt = client.prepare_cached(JOB_ERRORS_SQL).await?;
    for row in client.query(&stmt, &[&id]).await? {
        let device = DeviceId::new(to_u64(row.try_get(0)?)).ok_or_else(|| corrupt("device id"))?;
        job.errors.push((device, row.try_get::<_, Option<String>>(1)?.unwrap_or_default()));
    }
    Ok(job)
}

impl PgStore {
    pub(super) async fn find_devices_pg(&self, q: DeviceQuery) -> Result<Vec<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let mut owners = Vec::with_capacity(q.wheres.len());
        let index = &*self.value_index;
        for w in &q.wheres {
            owners.push(if can_drive(index, w) {
                let rows = query(&client, &Sql::new(Dialect::Postgres, index).owners(w, DRIVE_BELOW)).await?;
                let found: Vec<i64> = rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
                Some(found.into_iter().filter_map(|d| DeviceId::new(to_u64(d))).collect())
            } else {
                None
            });
        }
        let q = drive(q, owners);
        let sql = Sql::new(Dialect::Postgres, index).devices(&q, DEVICE_COLUMNS);
        let rows = query(&client, &sql).await?;
        rows.iter().map(device_row).collect()
    }

    pub(super) async fn create_job_pg(&self, new: NewJob) -> Result<JobRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = Timestamp::now().millis();
        let api_key = new.api_key.map(|k| sql_id(k.get()));
        let row = tx
            .query_one(
                "INSERT INTO jobs (state, select_json, ops_json, rate, api_key_id, next_ms, created_ms)
                 VALUES (0, $1, $2, $3, $4, $5, $5) RETURNING id",
                &[&new.select, &new.ops, &new.rate, &api_key, &now],
            )
            .await?;
        let id: i64 = row.try_get(0)?;
        let devices: Vec<i64> = new.devices.iter().map(|d| sql_id(d.get())).collect();
        tx.execute(
            "INSERT INTO job_devices (job_id, device_id, state, claim_until_ms)
             SELECT $1, d, 0, 0 FROM unnest($2::BIGINT[]) d ON CONFLICT DO NOTHING",
            &[&id, &devices],
        )
        .await?;
        tx.commit().await?;
        let id = JobId::new(to_u64(id)).ok_or_else(|| corrupt("job id"))?;
        self.job_pg(id).await
    }

    pub(super) async fn jobs_pg(&self, api_key: Option<ApiKeyId>) -> Result<Vec<JobRecord>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        let key = api_key.map(|k| sql_id(k.get()));
        let rows = tx
            .query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE $1::BIGINT IS NULL OR api_key_id = $1 ORDER BY id"),
                &[&key],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(with_progress(&tx, job_row(row)?).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn job_pg(&self, id: JobId) -> Result<JobRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.build_transaction().read_only(true).start().await?;
        let row = tx
            .query_opt(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"), &[&sql_id(id.get())])
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        let job = with_progress(&tx, job_row(&row)?).await?;
        tx.commit().await?;
        Ok(job)
    }

    pub(super) async fn cancel_job_pg(&self, id: JobId) -> Result<JobRecord, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(JOB_CANCEL_SQL).await?;
        client.execute(&stmt, &[&sql_id(id.get()), &Timestamp::now().millis()]).await?;
        drop(client);
        self.job_pg(id).await
    }

    pub(super) async fn claim_pg(&self, max: usize, lease_ms: i64, now: Timestamp) -> Result<ClaimOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = now.millis();
        let running = tx
            .query(
                "SELECT id, ops_json, api_key_id, rate, next_ms FROM jobs WHERE state = 0 ORDER BY id FOR UPDATE",
                &[],
            )
            .await?;
        let mut wait: Option<i64> = None;
        let count = running.len();
        for job in &running {
            let id: i64 = job.try_get(0)?;
            let rate: Option<f64> = job.try_get(3)?;
            let next_ms: i64 = job.try_get(4)?;
            if rate.is_some() && next_ms > now {
                wait = Some(wait.map_or(next_ms, |w| w.min(next_ms)));
                continue;
            }
            let (n, gap) = rate.map_or((max, 0), |r| rated_claim(r, max));
            let devices: Vec<i64> = tx
                .query(
                    "SELECT device_id FROM job_devices WHERE job_id = $1 AND state = 0 AND claim_until_ms <= $2
                     ORDER BY device_id LIMIT $3 FOR UPDATE SKIP LOCKED",
                    &[&id, &now, &i64::try_from(n).unwrap_or(i64::MAX)],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if devices.is_empty() {
                let lease_end: Option<i64> = tx
                    .query_one("SELECT MIN(claim_until_ms) FROM job_devices WHERE job_id = $1 AND state = 0", &[&id])
                    .await?
                    .try_get(0)?;
                match lease_end {
                    Some(end) => wait = Some(wait.map_or(end, |w| w.min(end))),
                    None => {
                        tx.execute(JOB_FINISH_SQL, &[&id, &now]).await?;
                    }
                }
                continue;
            }
            tx.execute(
                "UPDATE job_devices SET claim_until_ms = $1 WHERE job_id = $2 AND device_id = ANY($3)",
                &[&(now + lease_ms), &id, &devices],
            )
            .await?;
            if rate.is_some() {
                tx.execute("UPDATE jobs SET next_ms = GREATEST(next_ms, $2) + $3 WHERE id = $1", &[&id, &now, &gap])
                    .await?;
            }
            tx.commit().await?;
            return Ok(ClaimOutcome::Claimed(JobClaim {
                job: JobId::new(to_u64(id)).ok_or_else(|| corrupt("job id"))?,
                ops: job.try_get(1)?,
                api_key: job.try_get::<_, Option<i64>>(2)?.and_then(|k| ApiKeyId::new(to_u64(k))),
                devices: devices.into_iter().filter_map(|d| DeviceId::new(to_u64(d))).collect(),
                running: count,
            }));
        }
        tx.commit().await?;
        Ok(wait.map_or(ClaimOutcome::Idle, |w| ClaimOutcome::Wait { until: Timestamp(w), running: count }))
    }

    pub(super) async fn job_results_pg(
        &self,
        job: JobId,
        failed: Vec<(DeviceId, String)>,
    ) -> Result<JobState, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = sql_id(job.get());
        if !failed.is_empty() {
            let stmt = tx.prepare_cached(JOB_FAIL_SQL).await?;
            for (device, reason) in &failed {
                tx.execute(&stmt, &[&id, &sql_id(device.get()), reason]).await?;
            }
        }
        tx.execute(JOB_FINISH_SQL, &[&id, &Timestamp::now().millis()]).await?;
        let state: Option<i16> =
            tx.query_opt("SELECT state FROM jobs WHERE id = $1", &[&id]).await?.map(|r| r.try_get(0)).transpose()?;
        tx.commit().await?;
        state.map(|s| JobState::from_code(i64::from(s))).ok_or(StoreError::JobNotFound(job))
    }
}
