//! The backend-independent test suite. Every [`Store`] implementation runs [`run_all`] against a
//! fresh instance opened with a [`Recorder`] as its sink; a failing check panics with its name.
//!
//! ```ignore
//! let recorder = Arc::new(Recorder::default());
//! let store = SqliteStore::open(options, recorder.clone())?;
//! ddp_store::conformance::run_all(&store, &recorder).await;
//! ```

use std::sync::Mutex;

use ddp_protocol::{DeviceId, HomeId, Key, Rev, Value};

use ddp_protocol::fleet::Where;

use crate::fleet::{ClaimOutcome, DeviceQuery, JobClaim, JobState, NewJob};
use crate::model::*;
use crate::{CommitSink, Store, StoreError};

/// A [`CommitSink`] that remembers everything it was given, in order.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<Vec<Committed>>,
}

impl Recorder {
    /// Everything committed so far.
    pub fn all(&self) -> Vec<Committed> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The key-value changes committed so far to `store`, in the order the sink got them.
    pub fn changes_of(&self, store: StoreRef) -> Vec<Change> {
        self.all()
            .into_iter()
            .filter_map(|c| match c {
                Committed::Kv(ch) if ch.store == store => Some(ch),
                _ => None,
            })
            .collect()
    }

    /// The admin changes committed so far.
    pub fn admin_changes(&self) -> Vec<AdminChange> {
        self.all()
            .into_iter()
            .filter_map(|c| match c {
                Committed::Admin(a) => Some(a),
                _ => None,
            })
            .collect()
    }
}

impl CommitSink for Recorder {
    fn committed(&self, batch: &[Committed]) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.extend_from_slice(batch);
        }
    }
}

/// Waits (up to 5 s) until `check` holds: some backends hand commits to the sink a moment after
/// the writer returns.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// The keys whose values a store under test must index (`fw`, `m`); the fleet checks also
/// query a key without an index (`n`, `i`), so both query plans are checked.
pub const INDEXED_KEYS: &str = "fw,m";

/// Runs every check against `store`, whose sink is `recorder`, opened with
/// [`INDEXED_KEYS`] indexed.
pub async fn run_all(store: &dyn Store, recorder: &Recorder) {
    kv_roundtrip_and_revs(store, recorder).await;
    values_keep_their_text(store).await;
    conditional_writes(store).await;
    key_limit(store).await;
    missing_stores(store).await;
    change_history(store).await;
    homes_and_devices(store, recorder).await;
    api_keys_and_scopes(store, recorder).await;
    ids_are_never_reused(store).await;
    change_records_home_at_commit(store).await;
    concurrent_writers_get_contiguous_revs(store, recorder).await;
    sessions_are_counted_and_capped(store).await;
    events_reach_the_sink(store, recorder).await;
    commands_reach_the_sink_in_order(store, recorder).await;
    sync_progress_is_recorded_never_lowered_and_shared(store, recorder).await;
    batches_apply_in_order_with_consecutive_revs(store, recorder).await;
    a_failing_op_leaves_nothing(store, recorder).await;
    merges_follow_rfc_7396(store).await;
    concurrent_batches_get_contiguous_revs(store, recorder).await;
    device_queries_agree_with_the_reference(store).await;
    device_queries_page_scope_and_filter(store).await;
    jobs_write_each_device_once(store).await;
    cancelled_jobs_write_nothing_more(store).await;
    rated_jobs_claim_a_second_at_a_time(store).await;
}

/// A device of class `class` whose store holds `items`.
async fn fleet_device(store: &dyn Store, class: &str, home: Option<HomeId>, items: &[(&str, &str)]) -> DeviceId {
    let id = store
        .create_device(NewDevice {
            name: "fleet".into(),
            home,
            device_class: class.into(),
            tag: String::new(),
            key_hash: fresh_hash(),
        })
        .await
        .expect("create device")
        .id;
    if !items.is_empty() {
        let ops = items.iter().map(|(k, v)| op(k, KvAction::Set(val(v)), Condition::None)).collect();
        store.write_batch(batch(StoreRef::Device(id), ops)).await.expect("fill store");
    }
    id
}

fn query_of(class: &str, wheres: &[&str]) -> DeviceQuery {
    DeviceQuery {
        device_class: Some(class.into()),
        wheres: wheres.iter().map(|w| Where::parse(w).expect("where")).collect(),
        limit: 1000,
        ..DeviceQuery::default()
    }
}

async fn found(store: &dyn Store, q: DeviceQuery) -> Vec<DeviceId> {
    store.find_devices(q).await.expect("find devices").into_iter().map(|d| d.id).collect()
}

/// Every condition form, on values of every type, gives what [`Where::matches`] says — with
/// few matches (the condition drives the query) and with many (devices are walked).
async fn device_queries_agree_with_the_reference(store: &dyn Store) {
    let values = [
        "1",
        "2",
        "2.05",
        "2.1",
        "-3",
        "1e3",
        "12345678901234567",
        "\"2.0\"",
        "\"a\"",
        "\"b\"",
        "\"\\u00e9\"",
        "\"é\"",
        "true",
        "false",
        "[1,2]",
        "{\"a\":1}",
        "{\"b\":1,\"a\":1}",
    ];
    let mut devices = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let id = fleet_device(store, "conf-ref", None, &[("fw", v), ("n", &i.to_string())]).await;
        devices.push((id, Some(val(v))));
    }
    let none = fleet_device(store, "conf-ref", None, &[("n", "99")]).await;
    devices.push((none, None));
    // Enough other devices with fw numbers that `fw>0`-like conditions walk rather than drive.
    let conditions = [
        "fw=2",
        "fw!=2",
        "fw<2.1",
        "fw<=2.1",
        "fw>2.05",
        "fw>=1000",
        "fw>-4",
        "fw<12345678901234568",
        "fw=\"a\"",
        "fw!=\"a\"",
        "fw<\"b\"",
        "fw>=\"b\"",
        "fw=\"é\"",
        "fw>\"2\"",
        "fw=true",
        "fw!=true",
        "fw=false",
        "fw=[1,2]",
        "fw!=[1,2]",
        "fw={\"a\":1}",
        "fw!={\"a\":1}",
        "fw",
        "!fw",
        "fw>9",
    ];
    for c in conditions {
        let w = Where::parse(c).expect("where");
        let want: Vec<DeviceId> = devices.iter().filter(|(_, v)| w.matches(v.as_ref())).map(|(d, _)| *d).collect();
        assert_eq!(found(store, query_of("conf-ref", &[c])).await, want, "where={c}");
        // Combined with a condition on another key: both must hold.
        let both = found(store, query_of("conf-ref", &[c, "n<5"])).await;
        let n_lt_5: Vec<DeviceId> = devices.iter().take(5).map(|(d, _)| *d).collect();
        let want_both: Vec<DeviceId> = want.iter().copied().filter(|d| n_lt_5.contains(d)).collect();
        assert_eq!(both, want_both, "where={c}&where=n<5");
    }
    // Many matches (more than the driving threshold): devices are walked in id order, and the
    // answer is the same.
    let ids: Vec<DeviceId> = futures_util::future::join_all((0..crate::fleet::DRIVE_BELOW + 50).map(|i| async move {
        let v = (i % 7).to_string();
        fleet_device(store, "conf-many", None, &[("m", v.as_str())]).await
    }))
    .await;
    let mut ids_sorted = ids.clone();
    ids_sorted.sort_unstable();
    let mut values: Vec<(DeviceId, usize)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        values.push((*id, i % 7));
    }
    values.sort_unstable();
    for c in ["m>=0", "m<6", "m!=3", "m", "m=3", "m>5"] {
        let w = Where::parse(c).expect("where");
        let want: Vec<DeviceId> =
            values.iter().filter(|(_, v)| w.matches(Some(&val(&v.to_string())))).map(|(d, _)| *d).collect();
        let q = DeviceQuery { limit: 1000, ..query_of("conf-many", &[c]) };
        assert_eq!(found(store, q.clone()).await, want[..want.len().min(1000)].to_vec(), "where={c}");
        let page2 = found(store, DeviceQuery { after: want.get(999).copied(), ..q }).await;
        if want.len() > 1000 {
            assert_eq!(page2, want[1000..want.len().min(2000)].to_vec(), "where={c}, second page");
        }
    }
    assert_eq!(found(store, query_of("conf-many", &["!m"])).await, vec![]);
}

/// Paging with `after` and `limit`, home scopes, class, tag, ids and `behind`.
async fn device_queries_page_scope_and_filter(store: &dyn Store) {
    let h1 = store.create_home("q1".into()).await.expect("home").id;
    let h2 = store.create_home("q2".into()).await.expect("home").id;
    let mut all = Vec::new();
    for i in 0..7 {
        let home = if i % 2 == 0 { Some(h1) } else { Some(h2) };
        all.push(fleet_device(store, "conf-page", home, &[("i", &i.to_string())]).await);
    }
    let homeless = fleet_device(store, "conf-page", None, &[("i", "7")]).await;
    all.push(homeless);
    // Pages of three, in id order, each after the last.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = found(store, DeviceQuery { after, limit: 3, ..query_of("conf-page", &[]) }).await;
        assert!(page.len() <= 3);
        seen.extend(page.iter().copied());
        match page.last() {
            Some(last) if page.len() == 3 => after = Some(*last),
            _ => break,
        }
    }
    assert_eq!(seen, all);
    // A scope of one home: its devices only (never a homeless one); a scope of none: nothing.
    let in_h1: Vec<DeviceId> = all.iter().copied().step_by(2).take(4).collect();
    assert_eq!(found(store, DeviceQuery { scope: Some(vec![h1]), ..query_of("conf-page", &[]) }).await, in_h1);
    assert_eq!(found(store, DeviceQuery { scope: Some(vec![]), ..query_of("conf-page", &[]) }).await, vec![]);
    assert_eq!(
        found(store, DeviceQuery { home: Some(h2), ..query_of("conf-page", &["i>=3"]) }).await,
        vec![all[3], all[5]]
    );
    // Tag and class filters.
    assert_eq!(found(store, DeviceQuery { tag: Some("nope".into()), ..query_of("conf-page", &[]) }).await, vec![]);
    assert_eq!(found(store, query_of("conf-nobody", &[])).await, vec![]);
    // ids: only those, still in id order and paged.
    let ids = DeviceQuery { ids: Some(vec![all[5], all[1], all[5], all[6]]), limit: 2, ..query_of("conf-page", &[]) };
    assert_eq!(found(store, ids.clone()).await, vec![all[1], all[5]]);
    assert_eq!(found(store, DeviceQuery { after: Some(all[5]), ..ids }).await, vec![all[6]]);
    // behind: written devices are behind until their applied rev reaches the store's rev.
    let behind = DeviceQuery { behind: Some(true), ..query_of("conf-page", &[]) };
    assert_eq!(found(store, behind.clone()).await, all);
    let synced = SyncProgress { delivered: Rev(1), applied: Rev(1), applied_at: Some(ddp_protocol::Timestamp(1)) };
    store.record_sync(vec![(all[0], synced), (all[2], synced)]).await.expect("record sync");
    let rest: Vec<DeviceId> = all.iter().copied().filter(|d| *d != all[0] && *d != all[2]).collect();
    assert_eq!(found(store, behind).await, rest);
    assert_eq!(
        found(store, DeviceQuery { behind: Some(false), ..query_of("conf-page", &[]) }).await,
        vec![all[0], all[2]]
    );
}

fn job_batch(device: DeviceId, job: ddp_protocol::JobId, v: &str) -> KvBatch {
    KvBatch {
        job: Some(job),
        ..batch(StoreRef::Device(device), vec![op("ota", KvAction::Set(val(v)), Condition::None)])
    }
}

async fn claim_all(store: &dyn Store, max: usize) -> Vec<JobClaim> {
    let mut claims = Vec::new();
    loop {
        match store.claim_job_work(max, 60_000, ddp_protocol::Timestamp::now()).await.expect("claim") {
            ClaimOutcome::Claimed(c) => claims.push(c),
            ClaimOutcome::Wait { .. } | ClaimOutcome::Idle => return claims,
        }
    }
}

/// A job's devices are claimed once each (a lease keeps others off), each is written once
/// (a second write of the same device by the job is refused and changes nothing), failures are
/// recorded, and the job ends `done` with its counts.
async fn jobs_write_each_device_once(store: &dyn Store) {
    let devices = [
        fleet_device(store, "conf-job", None, &[]).await,
        fleet_device(store, "conf-job", None, &[]).await,
        fleet_device(store, "conf-job", None, &[]).await,
    ];
    let new = NewJob {
        select: r#"{"ids":[]}"#.into(),
        ops: r#"[{"op":"set","key":"ota","value":1}]"#.into(),
        rate: None,
        api_key: None,
        devices: devices.to_vec(),
    };
    let job = store.create_job(new).await.expect("create job");
    assert_eq!((job.state, job.selected, job.written, job.failed), (JobState::Running, 3, 0, 0));
    let claims = claim_all(store, 2).await;
    let claimed: Vec<DeviceId> = claims.iter().filter(|c| c.job == job.id).flat_map(|c| c.devices.clone()).collect();
    assert_eq!(claimed, devices.to_vec(), "every device claimed once, in id order");
    assert_eq!(claims[0].ops, r#"[{"op":"set","key":"ota","value":1}]"#);
    // Two devices written, the third fails.
    for d in &devices[..2] {
        let changes = store.write_batch(job_batch(*d, job.id, "1")).await.expect("job write");
        assert_eq!(changes.len(), 1);
        // Written already: refused, and nothing changes.
        let again = store.write_batch(job_batch(*d, job.id, "2")).await;
        assert_eq!(again, Err(StoreError::JobNotPending(job.id)));
        assert_eq!(store.get(StoreRef::Device(*d), key("ota")).await.expect("get").value, val("1"));
    }
    let state = store.job_results(job.id, vec![(devices[2], "the batch failed".into())]).await.expect("results");
    assert_eq!(state, JobState::Done);
    let after = store.job(job.id).await.expect("job");
    assert_eq!((after.state, after.selected, after.written, after.failed), (JobState::Done, 3, 2, 1));
    assert_eq!(after.errors, vec![(devices[2], "the batch failed".to_owned())]);
    assert!(after.ended.is_some());
    // delivered/applied count written devices whose recorded progress reached the job's write.
    assert_eq!((after.delivered, after.applied), (0, 0));
    let rev = store.device_sync(vec![devices[0]]).await.expect("sync")[0].rev;
    let progress = SyncProgress { delivered: rev, applied: rev, applied_at: Some(ddp_protocol::Timestamp(5)) };
    store.record_sync(vec![(devices[0], progress)]).await.expect("record");
    store
        .record_sync(vec![(devices[1], SyncProgress { delivered: rev, ..SyncProgress::default() })])
        .await
        .expect("record");
    let after = store.job(job.id).await.expect("job");
    assert_eq!((after.delivered, after.applied), (2, 1));
    // Nothing left to claim; a job nobody knows is not found.
    assert!(claim_all(store, 10).await.iter().all(|c| c.job != job.id));
    assert!(store.jobs(None).await.expect("jobs").iter().any(|j| j.id == job.id));
    let missing = ddp_protocol::JobId::new(9_999_999).expect("id");
    assert_eq!(store.job(missing).await, Err(StoreError::JobNotFound(missing)));
    assert_eq!(store.cancel_job(missing).await, Err(StoreError::JobNotFound(missing)));
}

/// After a cancel nothing more is claimed or written; what was written stays counted.
async fn cancelled_jobs_write_nothing_more(store: &dyn Store) {
    let devices =
        [fleet_device(store, "conf-cancel", None, &[]).await, fleet_device(store, "conf-cancel", None, &[]).await];
    let key_id = store
        .create_api_key(NewApiKey {
            name: "jobs".into(),
            homes: None,
            permission: Permission::ReadWrite,
            key_hash: fresh_hash(),
        })
        .await
        .expect("key")
        .id;
    let new =
        NewJob { select: "{}".into(), ops: "[]".into(), rate: None, api_key: Some(key_id), devices: devices.to_vec() };
    let job = store.create_job(new).await.expect("create job");
    store.write_batch(job_batch(devices[0], job.id, "1")).await.expect("job write");
    let cancelled = store.cancel_job(job.id).await.expect("cancel");
    assert_eq!((cancelled.state, cancelled.written), (JobState::Cancelled, 1));
    assert!(cancelled.ended.is_some());
    assert_eq!(store.write_batch(job_batch(devices[1], job.id, "1")).await, Err(StoreError::JobNotPending(job.id)));
    assert!(claim_all(store, 10).await.iter().all(|c| c.job != job.id));
    // Cancelling again changes nothing; the key's own jobs list holds it.
    assert_eq!(store.cancel_job(job.id).await.expect("cancel").state, JobState::Cancelled);
    let mine = store.jobs(Some(key_id)).await.expect("jobs");
    assert_eq!(mine.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job.id]);
    assert_eq!(mine[0].api_key, Some(key_id));
}

/// A rated job gives a second's worth of devices per claim, then makes claimers wait.
async fn rated_jobs_claim_a_second_at_a_time(store: &dyn Store) {
    let mut devices = Vec::new();
    for _ in 0..5 {
        devices.push(fleet_device(store, "conf-rate", None, &[]).await);
    }
    let new =
        NewJob { select: "{}".into(), ops: "[]".into(), rate: Some(2.0), api_key: None, devices: devices.clone() };
    let job = store.create_job(new).await.expect("create job");
    let now = ddp_protocol::Timestamp::now();
    let first = store.claim_job_work(100, 60_000, now).await.expect("claim");
    let ClaimOutcome::Claimed(first) = first else { panic!("a rated job gives work at once: {first:?}") };
    assert_eq!((first.job, first.devices.clone()), (job.id, devices[..2].to_vec()));
    match store.claim_job_work(100, 60_000, now).await.expect("claim") {
        ClaimOutcome::Wait { until, running } => {
            assert!(until.millis() >= now.millis() + 900, "waits about a second");
            assert!(running >= 1);
        }
        other => panic!("a rated job's budget is spent: {other:?}"),
    }
    let later = ddp_protocol::Timestamp(now.millis() + 1_000);
    let ClaimOutcome::Claimed(second) = store.claim_job_work(100, 60_000, later).await.expect("claim") else {
        panic!("a second later, more work")
    };
    assert_eq!(second.devices, devices[2..4].to_vec());
    store.cancel_job(job.id).await.expect("cancel");
}

fn op(k: &str, action: KvAction, condition: Condition) -> KvOp {
    KvOp { key: key(k), action, condition }
}

fn batch(store: StoreRef, ops: Vec<KvOp>) -> KvBatch {
    KvBatch { store, ops, store_rev: None, max_keys: 1000, max_value_bytes: 65_536, origin: Origin::Admin, job: None }
}

async fn batches_apply_in_order_with_consecutive_revs(store: &dyn Store, recorder: &Recorder) {
    let d = StoreRef::Device(new_device(store, None).await);
    store.write(set(d, "old", "1")).await.expect("set");
    let changes = store
        .write_batch(batch(
            d,
            vec![
                op("ssid", KvAction::Set(val("\"home\"")), Condition::Absent),
                op("password", KvAction::Set(val("\"secret\"")), Condition::None),
                op("old", KvAction::Delete, Condition::RevIn(vec![Rev(1)])),
                op("ssid", KvAction::Set(val("\"home-5g\"")), Condition::RevIn(vec![Rev(2)])),
            ],
        ))
        .await
        .expect("batch");
    let got: Vec<(u64, &str, Option<&str>, Option<Rev>)> =
        changes.iter().map(|c| (c.rev.0, c.key.as_str(), c.value.as_ref().map(Value::as_json), c.batch_last)).collect();
    assert_eq!(
        got,
        [
            (2, "ssid", Some("\"home\""), Some(Rev(5))),
            (3, "password", Some("\"secret\""), Some(Rev(5))),
            (4, "old", None, Some(Rev(5))),
            (5, "ssid", Some("\"home-5g\""), Some(Rev(5)))
        ],
        "ops apply in order with consecutive revs; a key named twice ends with its last op"
    );
    let snap = store.snapshot(d, None).await.expect("snapshot");
    let items: Vec<(&str, &str, u64)> =
        snap.items.iter().map(|i| (i.key.as_str(), i.value.as_json(), i.rev.0)).collect();
    assert_eq!((snap.rev, items), (Rev(5), vec![("password", "\"secret\"", 3), ("ssid", "\"home-5g\"", 5)]));
    eventually("the sink saw the batch", || recorder.changes_of(d).len() >= 5).await;
    let seen: Vec<(u64, Option<Rev>)> = recorder.changes_of(d).iter().map(|c| (c.rev.0, c.batch_last)).collect();
    assert_eq!(
        seen,
        [(1, None), (2, Some(Rev(5))), (3, Some(Rev(5))), (4, Some(Rev(5))), (5, Some(Rev(5)))],
        "the sink saw the batch in rev order, each change knowing where its batch ends"
    );
    let history = store.changes_since(d, Rev(1)).await.expect("history").expect("complete");
    assert_eq!(history, changes_without_time(&recorder.changes_of(d)[1..], &history), "the history keeps the batch");
    let mut whole = batch(d, vec![op("n", KvAction::Set(val("1")), Condition::None)]);
    whole.store_rev = Some(Rev(5));
    let one = store.write_batch(whole).await.expect("If-Match on the store rev holds");
    assert_eq!((one[0].rev, one[0].batch_last), (Rev(6), None), "a batch of one is an ordinary change");
}

/// `history` with the times of `seen` (the sink and the history agree on everything else).
fn changes_without_time(seen: &[Change], history: &[Change]) -> Vec<Change> {
    seen.iter().zip(history).map(|(s, h)| Change { time: h.time, ..s.clone() }).collect()
}

async fn a_failing_op_leaves_nothing(store: &dyn Store, recorder: &Recorder) {
    let d = StoreRef::Device(new_device(store, None).await);
    store.write(set(d, "a", "1")).await.expect("set");
    let before = store.snapshot(d, None).await.expect("snapshot");
    let failing: [(Vec<KvOp>, Option<usize>, StoreError); 4] = [
        (
            vec![op("b", KvAction::Set(val("2")), Condition::None), op("zz", KvAction::Delete, Condition::None)],
            Some(1),
            StoreError::KeyNotFound,
        ),
        (
            vec![
                op("b", KvAction::Set(val("2")), Condition::None),
                op("a", KvAction::Set(val("3")), Condition::RevIn(vec![Rev(7)])),
            ],
            Some(1),
            StoreError::RevisionMismatch { current: Some(Rev(1)) },
        ),
        (
            vec![
                op("a", KvAction::Delete, Condition::None),
                op("c", KvAction::Set(val("1")), Condition::None),
                op("a", KvAction::Set(val("1")), Condition::Exists),
            ],
            Some(2),
            StoreError::RevisionMismatch { current: None },
        ),
        (
            vec![op("b", KvAction::Set(val("1")), Condition::None), op("c", KvAction::Set(val("1")), Condition::None)],
            Some(1),
            StoreError::TooManyKeys { limit: 2 },
        ),
    ];
    for (ops, index, error) in failing {
        let mut b = batch(d, ops);
        b.max_keys = 2;
        assert_eq!(store.write_batch(b).await.map_err(StoreError::split_op), Err((index, error)));
    }
    let mut stale = batch(d, vec![op("b", KvAction::Set(val("2")), Condition::None)]);
    stale.store_rev = Some(Rev(0));
    assert_eq!(store.write_batch(stale).await, Err(StoreError::StoreRevMismatch { current: Rev(1) }));
    let merge = batch(
        d,
        vec![op("m", KvAction::Merge(val(&format!("{{\"big\":\"{}\"}}", "x".repeat(70_000)))), Condition::None)],
    );
    assert!(matches!(
        store.write_batch(merge).await.map_err(StoreError::split_op),
        Err((Some(0), StoreError::ValueTooLarge { limit: 65_536, .. }))
    ));
    let missing =
        batch(StoreRef::Device(DeviceId::new(999_999).expect("id")), vec![op("a", KvAction::Delete, Condition::None)]);
    assert!(matches!(store.write_batch(missing).await, Err(StoreError::DeviceNotFound(_))));
    assert_eq!(store.snapshot(d, None).await.expect("snapshot"), before, "no failing batch left anything");
    store.write(set(d, "after", "1")).await.expect("set");
    eventually("the sink saw the write after", || recorder.changes_of(d).len() >= 2).await;
    let revs: Vec<u64> = recorder.changes_of(d).iter().map(|c| c.rev.0).collect();
    assert_eq!(revs, [1, 2], "failed batches used no rev and reached no sink");
}

async fn merges_follow_rfc_7396(store: &dyn Store) {
    let d = StoreRef::Device(new_device(store, None).await);
    store.write(set(d, "net", r#"{"ssid":"a","dhcp":false,"dns":["1.1.1.1"],"mtu":1500.0}"#)).await.expect("set");
    store.write(set(d, "n", "7")).await.expect("set");
    let changes = store
        .write_batch(batch(
            d,
            vec![
                op("net", KvAction::Merge(val(r#"{"dhcp":true,"dns":null,"ipv6":{"on":true}}"#)), Condition::None),
                op("net", KvAction::Merge(val(r#"{"ipv6":{"prefix":64}}"#)), Condition::RevIn(vec![Rev(3)])),
                op("n", KvAction::Merge(val(r#"{"x":1}"#)), Condition::None),
                op("fresh", KvAction::Merge(val(r#"{"a":{"b":null}}"#)), Condition::Absent),
            ],
        ))
        .await
        .expect("merges");
    let values: Vec<&str> = changes.iter().filter_map(|c| c.value.as_ref().map(Value::as_json)).collect();
    assert_eq!(
        values,
        [
            r#"{"ssid":"a","dhcp":true,"mtu":1500.0,"ipv6":{"on":true}}"#,
            r#"{"ssid":"a","dhcp":true,"mtu":1500.0,"ipv6":{"on":true,"prefix":64}}"#,
            r#"{"x":1}"#,
            r#"{"a":{}}"#
        ]
    );
    let net = store.get(d, key("net")).await.expect("get");
    assert_eq!((net.value.as_json(), net.rev), (values[1], Rev(4)), "stored as a set of the result");
    // Names no JSON reader agrees on refuse that batch only, on either backend; a batch
    // committed with it goes through, and a name given twice counts once (last value).
    store.write(set(d, "nul", r#"{"a\u0000b":1,"x":2}"#)).await.expect("set");
    let (bad, good) = futures_util::join!(
        store.write_batch(batch(d, vec![op("nul", KvAction::Merge(val(r#"{"y":3}"#)), Condition::None)])),
        store.write_batch(batch(d, vec![op("dup", KvAction::Merge(val(r#"{"a":1,"a":2}"#)), Condition::None)])),
    );
    assert!(matches!(bad.map_err(StoreError::split_op), Err((Some(0), StoreError::InvalidValue(_)))));
    assert_eq!(good.expect("merged")[0].value.as_ref().map(Value::as_json), Some(r#"{"a":2}"#));
    let nul = store.get(d, key("nul")).await.expect("get");
    assert_eq!(nul.value.as_json(), r#"{"a\u0000b":1,"x":2}"#, "the refused merge left the value alone");
    store.write(set(d, "odd", r#"{"é":1e400,"a\"b":2,"q":{"z":[1,{"y":null}]}}"#)).await.expect("set");
    let odd = store
        .write_batch(batch(
            d,
            vec![op("odd", KvAction::Merge(val(r#"{"a\"b":null,"c\nd":"x\u00e9","q":{"z":-0.0}}"#)), Condition::None)],
        ))
        .await
        .expect("merge");
    assert_eq!(
        odd[0].value.as_ref().map(Value::as_json),
        Some(r#"{"é":1e400,"q":{"z":-0.0},"c\nd":"x\u00e9"}"#),
        "names are written back escaped, values keep their exact text"
    );
}

async fn concurrent_batches_get_contiguous_revs(store: &dyn Store, recorder: &Recorder) {
    let d = StoreRef::Device(new_device(store, None).await);
    store.write(set(d, "counter", r#"{"n":0}"#)).await.expect("set");
    const N: usize = 40;
    let batches = (0..N).map(|i| {
        store.write_batch(batch(
            d,
            vec![
                op(&format!("k{}", i % 7), KvAction::Set(val(&i.to_string())), Condition::None),
                op("counter", KvAction::Merge(val(&format!(r#"{{"w{i}":true}}"#))), Condition::None),
                op(&format!("k{}", i % 7), KvAction::Delete, Condition::None),
            ],
        ))
    });
    let results = futures_util::future::join_all(batches).await;
    let mut firsts = Vec::new();
    for r in results {
        let changes = r.expect("concurrent batch");
        let revs: Vec<u64> = changes.iter().map(|c| c.rev.0).collect();
        assert_eq!(revs, [revs[0], revs[0] + 1, revs[0] + 2], "a batch's revs are consecutive");
        firsts.push(revs[0]);
    }
    firsts.sort_unstable();
    assert_eq!(firsts, (0..N as u64).map(|i| 2 + 3 * i).collect::<Vec<_>>(), "batches never interleave");
    let counter = store.get(d, key("counter")).await.expect("get");
    let merged: serde_json::Value = serde_json::from_str(counter.value.as_json()).expect("json");
    assert_eq!(merged.as_object().map(|o| o.len()), Some(N + 1), "no concurrent merge was lost: {merged}");
    let total = 1 + 3 * N;
    eventually("the sink saw every batch", || recorder.changes_of(d).len() >= total).await;
    let seen: Vec<u64> = recorder.changes_of(d).iter().map(|c| c.rev.0).collect();
    assert_eq!(seen, (1..=total as u64).collect::<Vec<_>>(), "the sink saw every change once, in rev order");
}

async fn sync_progress_is_recorded_never_lowered_and_shared(store: &dyn Store, recorder: &Recorder) {
    use ddp_protocol::Timestamp;
    let dev = new_device(store, None).await;
    let other = new_device(store, None).await;
    let ghost = DeviceId::new(u64::MAX - 5).expect("id");
    let at = |ms: i64| Some(Timestamp(1_700_000_000_000 + ms));
    let p =
        |delivered, applied, applied_at| SyncProgress { delivered: Rev(delivered), applied: Rev(applied), applied_at };
    let blank = |device| DeviceSync { device, rev: Rev::ZERO, progress: SyncProgress::default() };
    assert_eq!(
        store.device_sync(vec![dev, ghost, other]).await,
        Ok(vec![blank(dev), blank(other)]),
        "nothing recorded yet; a missing device is left out"
    );

    for i in 1..=3 {
        store.write(set(StoreRef::Device(dev), &format!("k{i}"), "1")).await.expect("write");
    }
    store.record_sync(vec![(dev, p(3, 2, at(1))), (ghost, p(9, 9, at(1)))]).await.expect("record");
    let recorded = store.device_sync(vec![dev]).await.expect("read");
    assert_eq!(
        recorded,
        vec![DeviceSync { device: dev, rev: Rev(3), progress: p(3, 2, at(1)) }],
        "the store's rev beside the progress"
    );

    // Lower values (a slower node, a late batch) never lower what is recorded; higher ones raise it.
    store.record_sync(vec![(dev, p(1, 1, at(5)))]).await.expect("record lower");
    assert_eq!(store.device_sync(vec![dev]).await.expect("read")[0].progress, p(3, 2, at(1)), "never lowered");
    store.record_sync(vec![(dev, p(2, 3, at(7))), (other, p(4, 0, None))]).await.expect("record higher");
    let both = store.device_sync(vec![other, dev]).await.expect("read");
    assert_eq!(
        both.iter().find(|s| s.device == dev).map(|s| s.progress),
        Some(p(3, 3, at(7))),
        "each field on its own"
    );
    assert_eq!(both.iter().find(|s| s.device == other).map(|s| s.progress), Some(p(4, 0, None)));
    assert_eq!(store.device_sync(vec![ghost]).await, Ok(vec![]), "a missing device is never recorded");

    // Shared with every node's sink.
    let shared = vec![(dev, p(3, 3, at(7))), (other, p(5, 1, at(9)))];
    store.broadcast_sync(shared.clone()).await.expect("broadcast");
    eventually("sync progress reaches the sink", || {
        recorder.all().iter().any(|c| matches!(c, Committed::Sync(list) if **list == *shared))
    })
    .await;

    // A deleted device's progress goes with it.
    store.delete_device(dev).await.expect("delete");
    assert_eq!(store.device_sync(vec![dev]).await, Ok(vec![]));
}

async fn sessions_are_counted_and_capped(store: &dyn Store) {
    let dev = new_device(store, None).await;
    let other = new_device(store, None).await;
    let t = |ms: i64| ddp_protocol::Timestamp(1_700_000_000_000 + ms);
    let first = Ok(SessionOpened::Opened { first: true, home: None });
    assert_eq!(store.session_opened(dev, 2, t(1)).await, first);
    assert_eq!(store.session_opened(dev, 2, t(2)).await, Ok(SessionOpened::Opened { first: false, home: None }));
    assert_eq!(store.session_opened(dev, 2, t(3)).await, Ok(SessionOpened::Refused), "the cap");
    assert_eq!(store.connected(vec![dev, other]).await, Ok(vec![dev]));
    assert_eq!(store.device(dev).await.expect("device").last_connect, Some(t(1)), "the first session's time");
    assert_eq!(store.session_closed(dev, t(4)).await, Ok(SessionClosed::Others));
    assert_eq!(store.session_closed(dev, t(5)).await, Ok(SessionClosed::Last { home: None }), "the last one");
    let seen = store.device(dev).await.expect("device");
    assert_eq!((seen.last_connect, seen.last_disconnect), (Some(t(1)), Some(t(5))));
    assert_eq!(store.connected(vec![dev, other]).await, Ok(vec![]));
    assert_eq!(store.session_opened(dev, 2, t(6)).await, first, "room again");
    assert_eq!(store.session_closed(dev, t(7)).await, Ok(SessionClosed::Last { home: None }));
    let ghost = DeviceId::new(u64::MAX - 4).expect("id");
    assert_eq!(store.session_opened(ghost, 2, t(8)).await, Err(StoreError::DeviceNotFound(ghost)));
    // A device in a home: its first and last sessions tell the home, for presence events.
    let home = store.create_home("presence".into()).await.expect("home").id;
    let homed = new_device(store, Some(home)).await;
    assert_eq!(store.session_opened(homed, 2, t(9)).await, Ok(SessionOpened::Opened { first: true, home: Some(home) }));
    assert_eq!(store.session_closed(homed, t(10)).await, Ok(SessionClosed::Last { home: Some(home) }));
}

async fn commands_reach_the_sink_in_order(store: &dyn Store, recorder: &Recorder) {
    let dev = new_device(store, None).await;
    for i in 0..5 {
        store.broadcast_command(dev, format!(r#"{{"action":"c{i}","parameters":{{}}}}"#)).await.expect("broadcast");
    }
    let commands = || -> Vec<String> {
        recorder
            .all()
            .into_iter()
            .filter_map(|c| match c {
                Committed::Command { device, json } if device == dev => Some(json.to_string()),
                _ => None,
            })
            .collect()
    };
    for _ in 0..200 {
        if commands().len() >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let expected: Vec<String> = (0..5).map(|i| format!(r#"{{"action":"c{i}","parameters":{{}}}}"#)).collect();
    assert_eq!(commands(), expected, "every command reached the sink once, in the order sent");
}

async fn events_reach_the_sink(store: &dyn Store, recorder: &Recorder) {
    let home = store.create_home("events".into()).await.expect("home").id;
    store.broadcast_event(home, r#"{"eventType":"x"}"#.into()).await.expect("broadcast");
    let mut seen = false;
    for _ in 0..200 {
        seen = recorder.all().iter().any(
            |c| matches!(c, Committed::Event { home: h, json } if *h == home && &**json == r#"{"eventType":"x"}"#),
        );
        if seen {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(seen, "the event reached the sink");
}

fn key(s: &str) -> Key {
    Key::new(s).expect("test key is valid")
}

fn val(s: &str) -> Value {
    Value::parse(s).expect("test value is valid")
}

/// A digest unique within one run of the suite.
fn fresh_hash() -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut h = [0xA5u8; 32];
    h[1..9].copy_from_slice(&n.to_le_bytes());
    h[9..17].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
    h
}

async fn new_device(store: &dyn Store, home: Option<HomeId>) -> DeviceId {
    store
        .create_device(NewDevice {
            name: "dev".into(),
            home,
            device_class: String::new(),
            tag: String::new(),
            key_hash: fresh_hash(),
        })
        .await
        .expect("create device")
        .id
}

fn set(store: StoreRef, k: &str, v: &str) -> KvWrite {
    KvWrite {
        store,
        key: key(k),
        action: KvAction::Set(val(v)),
        condition: Condition::None,
        max_keys: 1000,
        origin: Origin::Admin,
    }
}

fn del(store: StoreRef, k: &str) -> KvWrite {
    KvWrite {
        store,
        key: key(k),
        action: KvAction::Delete,
        condition: Condition::None,
        max_keys: 1000,
        origin: Origin::Admin,
    }
}

async fn kv_roundtrip_and_revs(store: &dyn Store, recorder: &Recorder) {
    let d = StoreRef::Device(new_device(store, None).await);
    let empty = store.snapshot(d, None).await.expect("snapshot");
    assert_eq!(empty, Snapshot { rev: Rev(0), items: vec![] }, "a new store is empty at rev 0");

    assert_eq!(store.write(set(d, "b", "1")).await.expect("set").rev, Rev(1));
    assert_eq!(store.write(set(d, "a", "\"x\"")).await.expect("set").rev, Rev(2));
    assert_eq!(store.write(set(d, "b", "2")).await.expect("overwrite").rev, Rev(3));
    let b = store.get(d, key("b")).await.expect("get");
    assert_eq!((b.value.as_json(), b.rev), ("2", Rev(3)));

    let removed = store.write(del(d, "a")).await.expect("delete");
    assert_eq!((removed.rev, removed.value.clone()), (Rev(4), None));
    assert_eq!(store.get(d, key("a")).await, Err(StoreError::KeyNotFound));
    assert_eq!(store.write(del(d, "a")).await, Err(StoreError::KeyNotFound), "deleting a missing key fails");
    assert_eq!(store.snapshot(d, None).await.expect("snapshot").rev, Rev(4), "a failed write leaves rev alone");

    for k in ["zone:b", "zone:a", "zonal", "other"] {
        store.write(set(d, k, "true")).await.expect("set");
    }
    let all = store.snapshot(d, None).await.expect("snapshot");
    assert_eq!(all.rev, Rev(8));
    let keys: Vec<&str> = all.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["b", "other", "zonal", "zone:a", "zone:b"], "items are sorted by key");
    let zone = store.snapshot(d, Some("zone:".into())).await.expect("prefix");
    let keys: Vec<&str> = zone.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!((keys, zone.rev), (vec!["zone:a", "zone:b"], Rev(8)), "prefix filter keeps the store rev");

    eventually("the sink saw 8 changes", || recorder.changes_of(d).len() >= 8).await;
    let revs: Vec<u64> = recorder.changes_of(d).iter().map(|c| c.rev.0).collect();
    assert_eq!(revs, (1..=8).collect::<Vec<_>>(), "the sink saw every change once, in rev order");
}

async fn values_keep_their_text(store: &dyn Store) {
    let d = StoreRef::Device(new_device(store, None).await);
    for (i, text) in
        ["12345678901234567890", "1.10", "-0.0", r#"{"a":[1,2.50,{"b":null}]}"#, r#""é \" \\""#].into_iter().enumerate()
    {
        let k = format!("k{i}");
        store.write(set(d, &k, text)).await.expect("set");
        assert_eq!(store.get(d, key(&k)).await.expect("get").value.as_json(), text);
    }
}

async fn conditional_writes(store: &dyn Store) {
    let d = StoreRef::Device(new_device(store, None).await);
    let with = |c: Condition| KvWrite { condition: c, ..set(d, "k", "1") };
    assert_eq!(store.write(with(Condition::Exists)).await, Err(StoreError::RevisionMismatch { current: None }));
    assert_eq!(
        store.write(with(Condition::RevIn(vec![Rev(1)]))).await,
        Err(StoreError::RevisionMismatch { current: None })
    );
    assert_eq!(store.write(with(Condition::Absent)).await.expect("create only").rev, Rev(1));
    assert_eq!(store.write(with(Condition::Absent)).await, Err(StoreError::RevisionMismatch { current: Some(Rev(1)) }));
    assert_eq!(
        store.write(with(Condition::RevIn(vec![Rev(7)]))).await,
        Err(StoreError::RevisionMismatch { current: Some(Rev(1)) })
    );
    assert_eq!(store.write(with(Condition::RevIn(vec![Rev(7), Rev(1)]))).await.expect("match").rev, Rev(2));
    assert_eq!(store.write(with(Condition::Exists)).await.expect("exists").rev, Rev(3));
    let stale_delete = KvWrite { condition: Condition::RevIn(vec![Rev(2)]), ..del(d, "k") };
    assert_eq!(store.write(stale_delete).await, Err(StoreError::RevisionMismatch { current: Some(Rev(3)) }));
    let delete = KvWrite { condition: Condition::RevIn(vec![Rev(3)]), ..del(d, "k") };
    assert_eq!(store.write(delete).await.expect("conditional delete").rev, Rev(4));
    assert_eq!(store.snapshot(d, None).await.expect("snapshot").rev, Rev(4));
}

async fn key_limit(store: &dyn Store) {
    let d = StoreRef::Device(new_device(store, None).await);
    let limited = |k: &str| KvWrite { max_keys: 2, ..set(d, k, "0") };
    store.write(limited("a")).await.expect("first");
    store.write(limited("b")).await.expect("second");
    assert_eq!(store.write(limited("c")).await, Err(StoreError::TooManyKeys { limit: 2 }));
    store.write(limited("a")).await.expect("overwriting is not a new key");
    store.write(del(d, "b")).await.expect("delete");
    store.write(limited("c")).await.expect("room again after a delete");
    assert_eq!(store.snapshot(d, None).await.expect("snapshot").rev, Rev(5), "the refused write took no rev");
}

async fn missing_stores(store: &dyn Store) {
    let ghost_device = DeviceId::new(u64::MAX - 1).expect("id");
    let ghost_home = HomeId::new(u64::MAX - 1).expect("id");
    let dev = StoreRef::Device(ghost_device);
    assert_eq!(store.write(set(dev, "k", "1")).await, Err(StoreError::DeviceNotFound(ghost_device)));
    assert_eq!(store.get(dev, key("k")).await, Err(StoreError::DeviceNotFound(ghost_device)));
    assert_eq!(store.snapshot(StoreRef::Home(ghost_home), None).await, Err(StoreError::HomeNotFound(ghost_home)));
    assert_eq!(store.device(ghost_device).await, Err(StoreError::DeviceNotFound(ghost_device)));
    assert_eq!(store.home(ghost_home).await, Err(StoreError::HomeNotFound(ghost_home)));
    assert_eq!(store.devices(Some(ghost_home)).await, Err(StoreError::HomeNotFound(ghost_home)));
}

async fn change_history(store: &dyn Store) {
    let d = StoreRef::Device(new_device(store, None).await);
    for i in 0..10 {
        store.write(set(d, &format!("k{}", i % 3), &i.to_string())).await.expect("set");
    }
    store.write(del(d, "k0")).await.expect("delete");
    let since = store.changes_since(d, Rev(7)).await.expect("changes").expect("history covers rev 7");
    let revs: Vec<u64> = since.iter().map(|c| c.rev.0).collect();
    assert_eq!(revs, [8, 9, 10, 11]);
    assert_eq!(since.last().map(|c| (c.key.as_str(), c.value.is_none())), Some(("k0", true)));
    assert_eq!(store.changes_since(d, Rev(11)).await.expect("changes"), Some(vec![]), "nothing after the head");
    assert_eq!(store.changes_since(d, Rev(12)).await.expect("changes"), None, "a rev from the future is not resumable");

    // Keep the last 4 changes of every store, whatever their age.
    store.trim_history(4, 0).await.expect("trim");
    assert_eq!(store.changes_since(d, Rev(6)).await.expect("changes"), None, "trimmed history cannot resume");
    let kept = store.changes_since(d, Rev(7)).await.expect("changes").expect("last four kept");
    assert_eq!(kept.len(), 4);
    // Young changes are kept whatever their number.
    let young = StoreRef::Device(new_device(store, None).await);
    for i in 0..6 {
        store.write(set(young, "k", &i.to_string())).await.expect("set");
    }
    store.trim_history(1, 3_600_000).await.expect("trim");
    assert_eq!(store.changes_since(young, Rev(0)).await.expect("changes").map(|c| c.len()), Some(6));
}

async fn homes_and_devices(store: &dyn Store, recorder: &Recorder) {
    let home = store.create_home("Kitchen".into()).await.expect("home");
    assert_eq!(store.home(home.id).await.expect("get home"), home);
    assert!(store.homes().await.expect("homes").contains(&home));
    let other = store.create_home("Garage".into()).await.expect("home");

    let ghost = HomeId::new(u64::MAX - 2).expect("id");
    let refused = store
        .create_device(NewDevice {
            name: "x".into(),
            home: Some(ghost),
            device_class: String::new(),
            tag: String::new(),
            key_hash: fresh_hash(),
        })
        .await;
    assert_eq!(refused.map(|d| d.id), Err(StoreError::HomeNotFound(ghost)));

    let key_hash = fresh_hash();
    let dev = store
        .create_device(NewDevice {
            name: "Thermostat".into(),
            home: Some(home.id),
            device_class: "thermo".into(),
            tag: "t1".into(),
            key_hash,
        })
        .await
        .expect("device");
    assert_eq!((dev.home, dev.device_class.as_str(), dev.tag.as_str()), (Some(home.id), "thermo", "t1"));
    assert_eq!(store.device(dev.id).await.expect("get"), dev);
    assert_eq!(store.devices(Some(home.id)).await.expect("list"), vec![dev.clone()]);
    assert!(store.devices(None).await.expect("list all").contains(&dev));
    assert_eq!(store.principal_by_key_hash(key_hash).await.expect("lookup"), Some(KeyHolder::Device(dev.id)));

    // Rename; move; moving to the same home again is a conflict that changes nothing.
    let renamed =
        store.update_device(dev.id, DeviceUpdate { name: Some("T2".into()), home: None }).await.expect("rename");
    assert_eq!((renamed.name.as_str(), renamed.home), ("T2", Some(home.id)));
    let moved =
        store.update_device(dev.id, DeviceUpdate { name: None, home: Some(Some(other.id)) }).await.expect("move");
    assert_eq!(moved.home, Some(other.id));
    eventually("admin change", || {
        recorder.admin_changes().contains(&AdminChange::DeviceMoved {
            device: dev.id,
            from: Some(home.id),
            to: Some(other.id),
        })
    })
    .await;
    let again =
        store.update_device(dev.id, DeviceUpdate { name: Some("ignored".into()), home: Some(Some(other.id)) }).await;
    assert_eq!(again, Err(StoreError::DeviceAlreadyInHome { device: dev.id, home: other.id }));
    assert_eq!(store.device(dev.id).await.expect("get").name, "T2", "a refused update changes nothing");
    let to_ghost = store.update_device(dev.id, DeviceUpdate { name: None, home: Some(Some(ghost)) }).await;
    assert_eq!(to_ghost, Err(StoreError::HomeNotFound(ghost)));

    // Rotation: the old digest stops naming the device at once.
    let new_hash = fresh_hash();
    store.rotate_device_key(dev.id, new_hash).await.expect("rotate");
    assert_eq!(store.principal_by_key_hash(key_hash).await.expect("lookup"), None);
    assert_eq!(store.principal_by_key_hash(new_hash).await.expect("lookup"), Some(KeyHolder::Device(dev.id)));
    eventually("admin change", || recorder.admin_changes().contains(&AdminChange::DeviceKeyRotated(dev.id))).await;

    // Deleting a home: its devices leave it, its store is gone.
    store.write(set(StoreRef::Home(other.id), "mode", "\"away\"")).await.expect("home store write");
    store.delete_home(other.id).await.expect("delete home");
    assert_eq!(store.home(other.id).await, Err(StoreError::HomeNotFound(other.id)));
    assert_eq!(store.device(dev.id).await.expect("device stays").home, None);
    assert_eq!(store.snapshot(StoreRef::Home(other.id), None).await, Err(StoreError::HomeNotFound(other.id)));
    assert_eq!(store.delete_home(other.id).await, Err(StoreError::HomeNotFound(other.id)));
    eventually("admin change", || recorder.admin_changes().contains(&AdminChange::HomeDeleted(other.id))).await;

    // Deleting a device: its store and key are gone.
    store.write(set(StoreRef::Device(dev.id), "k", "1")).await.expect("write");
    store.delete_device(dev.id).await.expect("delete device");
    assert_eq!(store.device(dev.id).await, Err(StoreError::DeviceNotFound(dev.id)));
    assert_eq!(store.get(StoreRef::Device(dev.id), key("k")).await, Err(StoreError::DeviceNotFound(dev.id)));
    assert_eq!(store.principal_by_key_hash(new_hash).await.expect("lookup"), None);
    assert_eq!(store.delete_device(dev.id).await, Err(StoreError::DeviceNotFound(dev.id)));
    eventually("admin change", || recorder.admin_changes().contains(&AdminChange::DeviceDeleted(dev.id))).await;
}

async fn api_keys_and_scopes(store: &dyn Store, recorder: &Recorder) {
    let a = store.create_home("A".into()).await.expect("home");
    let b = store.create_home("B".into()).await.expect("home");
    let scoped_hash = fresh_hash();
    let scoped = store
        .create_api_key(NewApiKey {
            name: "app".into(),
            homes: Some(vec![b.id, a.id, a.id]),
            permission: Permission::Read,
            key_hash: scoped_hash,
        })
        .await
        .expect("key");
    assert_eq!(scoped.homes, Some(vec![a.id, b.id]), "homes are kept sorted and unique");
    let all_hash = fresh_hash();
    let all = store
        .create_api_key(NewApiKey {
            name: "ops".into(),
            homes: None,
            permission: Permission::ReadWrite,
            key_hash: all_hash,
        })
        .await
        .expect("key");
    assert_eq!(
        store.principal_by_key_hash(scoped_hash).await.expect("lookup"),
        Some(KeyHolder::Project(scoped.clone()))
    );
    let listed = store.api_keys().await.expect("list");
    assert!(listed.contains(&scoped) && listed.contains(&all));

    let ghost = HomeId::new(u64::MAX - 3).expect("id");
    let refused = store
        .create_api_key(NewApiKey {
            name: "x".into(),
            homes: Some(vec![ghost]),
            permission: Permission::Read,
            key_hash: fresh_hash(),
        })
        .await;
    assert_eq!(refused.map(|k| k.id), Err(StoreError::HomeNotFound(ghost)));

    // A key whose every home is deleted sees nothing — it never widens to "all homes".
    store.delete_home(a.id).await.expect("delete");
    store.delete_home(b.id).await.expect("delete");
    match store.principal_by_key_hash(scoped_hash).await.expect("lookup") {
        Some(KeyHolder::Project(k)) => assert_eq!(k.homes, Some(vec![])),
        other => panic!("scoped key lookup gave {other:?}"),
    }

    store.delete_api_key(all.id).await.expect("revoke");
    assert_eq!(store.principal_by_key_hash(all_hash).await.expect("lookup"), None);
    assert_eq!(store.delete_api_key(all.id).await, Err(StoreError::ApiKeyNotFound(all.id)));
    eventually("admin change", || recorder.admin_changes().contains(&AdminChange::ApiKeyDeleted(all.id))).await;
}

async fn ids_are_never_reused(store: &dyn Store) {
    let first = new_device(store, None).await;
    store.delete_device(first).await.expect("delete");
    let second = new_device(store, None).await;
    assert!(second > first, "device id {first} was handed out again");
    let h1 = store.create_home("h".into()).await.expect("home").id;
    store.delete_home(h1).await.expect("delete");
    let h2 = store.create_home("h".into()).await.expect("home").id;
    assert!(h2 > h1, "home id {h1} was handed out again");
}

async fn change_records_home_at_commit(store: &dyn Store) {
    let h1 = store.create_home("one".into()).await.expect("home").id;
    let h2 = store.create_home("two".into()).await.expect("home").id;
    let dev = new_device(store, Some(h1)).await;
    let d = StoreRef::Device(dev);
    let origin = Origin::Device(dev);
    let first = store.write(KvWrite { origin, ..set(d, "k", "1") }).await.expect("set");
    assert_eq!((first.home, first.origin), (Some(h1), origin));
    store.update_device(dev, DeviceUpdate { name: None, home: Some(Some(h2)) }).await.expect("move");
    assert_eq!(store.write(set(d, "k", "2")).await.expect("set").home, Some(h2));
    store.update_device(dev, DeviceUpdate { name: None, home: Some(None) }).await.expect("leave");
    assert_eq!(store.write(set(d, "k", "3")).await.expect("set").home, None);
    let home_change = store.write(set(StoreRef::Home(h2), "k", "1")).await.expect("home set");
    assert_eq!(home_change.home, Some(h2));
    let history = store.changes_since(d, Rev(0)).await.expect("history").expect("complete");
    let homes: Vec<Option<HomeId>> = history.iter().map(|c| c.home).collect();
    assert_eq!(homes, [Some(h1), Some(h2), None], "the history remembers the home at commit");
    assert_eq!(history[0].origin, origin);
}

async fn concurrent_writers_get_contiguous_revs(store: &dyn Store, recorder: &Recorder) {
    let dev = new_device(store, None).await;
    let d = StoreRef::Device(dev);
    const N: u64 = 200;
    let writes = (0..N).map(|i| store.write(set(d, &format!("k{}", i % 17), &i.to_string())));
    let results = futures_util::future::join_all(writes).await;
    let mut revs: Vec<u64> = results.into_iter().map(|r| r.expect("concurrent write").rev.0).collect();
    revs.sort_unstable();
    assert_eq!(revs, (1..=N).collect::<Vec<_>>(), "every write got its own rev, with no gap");
    eventually("the sink saw every concurrent change", || recorder.changes_of(d).len() >= N as usize).await;
    let seen: Vec<u64> = recorder.changes_of(d).iter().map(|c| c.rev.0).collect();
    assert_eq!(seen, (1..=N).collect::<Vec<_>>(), "the sink saw the changes in rev order");
    let snap = store.snapshot(d, None).await.expect("snapshot");
    assert_eq!(snap.rev, Rev(N));
    for item in &snap.items {
        let last = recorder.changes_of(d).into_iter().rev().find(|c| c.key == item.key).expect("history has the key");
        assert_eq!((item.rev, Some(&item.value)), (last.rev, last.value.as_ref()), "items hold their last write");
    }
}
