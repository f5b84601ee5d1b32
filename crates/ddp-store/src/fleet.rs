//! Fleet queries and jobs (PROTOCOL.md §12): what the server asks of storage, and the one SQL
//! builder both SQL backends run device queries through.
//!
//! # How a device query reads
//! A query never reads every item of every store. The values of the keys the operator chose
//! ([`ValueIndex`], `ddp serve --index-keys`) are indexed by `(kind, key, number value, string
//! value)` — a partial index `items_by_value` over exactly those keys (SQLite: expressions of the
//! value text; PostgreSQL: the immutable functions `ddp_num`/`ddp_str`), so a condition on such a
//! key is an index range. Indexing costs writes of those keys an index update each (on
//! PostgreSQL it also makes their updates non-HOT), which is why it is chosen per key rather than
//! paid by every telemetry key. Devices come back in id order, a page at a time:
//! - a condition on an indexed key that matches few stores (the backend first reads up to
//!   [`DRIVE_BELOW`] owners from its index) *drives* the query: those owners are the only devices
//!   looked at ([`drive`]: they become the query's `ids`);
//! - otherwise devices are walked in id order from `after` and each condition is a primary-key
//!   probe of the device's item (`EXISTS (…)`), which stops as soon as a page is full — one item
//!   read per device walked, never a whole store.

use ddp_protocol::fleet::{Cmp, Number, Test, Where};
use ddp_protocol::{ApiKeyId, DeviceId, HomeId, JobId, Key, Timestamp};

/// Which keys' values are indexed for fleet queries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ValueIndex {
    /// None: conditions walk devices in id order (the default: no write pays for an index).
    #[default]
    Off,
    /// These keys.
    Keys(Vec<Key>),
    /// Every key.
    All,
}

impl ValueIndex {
    /// Parses `--index-keys`: key names separated by commas, `*` for every key, empty for none.
    pub fn parse(text: &str) -> Result<ValueIndex, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(ValueIndex::Off);
        }
        if text == "*" {
            return Ok(ValueIndex::All);
        }
        let mut keys = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            keys.push(Key::new(part).map_err(|e| format!("index key {part:?}: {e}"))?);
        }
        keys.sort();
        keys.dedup();
        Ok(if keys.is_empty() { ValueIndex::Off } else { ValueIndex::Keys(keys) })
    }

    /// Whether conditions on `key` can read the index.
    pub fn covers(&self, key: &Key) -> bool {
        match self {
            ValueIndex::Off => false,
            ValueIndex::Keys(keys) => keys.binary_search(key).is_ok(),
            ValueIndex::All => true,
        }
    }

    /// The partial indexes `items_by_value…` that index exactly these keys in `dialect`, by
    /// name. Key names are plain `A-Za-z0-9_-:.`, so they are written as literals: a planner may
    /// use a partial index only when the query's own literals prove its predicate (SQLite proves
    /// only terms it finds written out, hence one index per key there; PostgreSQL proves
    /// `key = 'fw'` ⇒ `key IN ('fw', …)`, hence one index).
    pub(crate) fn indexes(&self, dialect: Dialect) -> Vec<(String, String)> {
        let (num, str) = match dialect {
            Dialect::Sqlite => (SQLITE_NUM, SQLITE_STR),
            Dialect::Postgres => (PG_NUM, PG_STR),
        };
        // PostgreSQL leaves out of an index scan's bounds what the partial predicate implies
        // (`kind = 0`), so there a leading `kind` column would leave the scan unbounded.
        let columns = match dialect {
            Dialect::Sqlite => format!("kind, key, {num}, {str}"),
            Dialect::Postgres => format!("key, {num}, {str}"),
        };
        let index = |name: String, predicate: String| {
            let sql = format!("CREATE INDEX \"{name}\" ON items ({columns}) WHERE {predicate}");
            (name, sql)
        };
        match (self, dialect) {
            (ValueIndex::Off, _) => Vec::new(),
            (ValueIndex::All, _) => vec![index("items_by_value".into(), "kind = 0".into())],
            (ValueIndex::Keys(keys), Dialect::Sqlite) => {
                keys.iter().map(|k| index(format!("items_by_value:{k}"), format!("kind = 0 AND key = '{k}'"))).collect()
            }
            (ValueIndex::Keys(keys), Dialect::Postgres) => {
                let list: Vec<String> = keys.iter().map(|k| format!("'{k}'")).collect();
                vec![index("items_by_value".into(), format!("kind = 0 AND key IN ({})", list.join(", ")))]
            }
        }
    }

    /// How `--index-keys` would say it.
    pub fn describe(&self) -> String {
        match self {
            ValueIndex::Off => String::new(),
            ValueIndex::All => "*".to_owned(),
            ValueIndex::Keys(keys) => keys.iter().map(Key::as_str).collect::<Vec<_>>().join(","),
        }
    }
}

/// A condition that matches fewer index entries than this drives its query (see the module
/// docs).
pub const DRIVE_BELOW: usize = 2_000;

/// Which devices a query asks for, all its filters combined with AND.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceQuery {
    /// Only devices in these homes (the homes a scoped project key sees); `None`: any device.
    pub scope: Option<Vec<HomeId>>,
    /// `homeId`: only devices in this home.
    pub home: Option<HomeId>,
    /// `deviceClass`: only devices of this class.
    pub device_class: Option<String>,
    /// `tag`: only devices with this tag.
    pub tag: Option<String>,
    /// `where`: conditions on the device's store.
    pub wheres: Vec<Where>,
    /// `behind`: only devices whose recorded `appliedRev` is below (true) or at (false) their
    /// store's rev.
    pub behind: Option<bool>,
    /// `ids`: only these devices.
    pub ids: Option<Vec<DeviceId>>,
    /// Only devices with a greater id (paging).
    pub after: Option<DeviceId>,
    /// At most this many devices.
    pub limit: usize,
}

/// A value bound to a query's placeholder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Int(i64),
    Float(f64),
    Text(String),
    /// A list (PostgreSQL's `= ANY($n)`, so that a statement's text does not depend on its
    /// length; SQLite spells lists out).
    Ints(Vec<i64>),
}

/// The SQL spelling that differs between the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// The number a minified value's text holds, when it is a number: the expression the SQLite
/// indexes `items_by_value…` hold (made from this text, and the queries use it too).
pub(crate) const SQLITE_NUM: &str = "(CASE WHEN substr(value, 1, 1) IN ('-','0','1','2','3','4','5','6','7','8','9') \
     AND length(value) <= 100 THEN value ->> '$' END)";
/// The string a minified value's text holds, when it is a string (indexes `items_by_value…`).
pub(crate) const SQLITE_STR: &str =
    "(CASE WHEN substr(value, 1, 1) = '\"' AND length(CAST(value AS BLOB)) <= 1024 THEN value ->> '$' END)";
/// PostgreSQL's spelling of the same (functions defined by the schema, in its index).
pub(crate) const PG_NUM: &str = "ddp_num(value)";
/// PostgreSQL's string expression, compared by code point as SQLite does.
pub(crate) const PG_STR: &str = "(ddp_str(value) COLLATE \"C\")";

/// A statement being built: its text and its parameters, in order.
pub(crate) struct Sql<'i> {
    dialect: Dialect,
    index: &'i ValueIndex,
    pub(crate) text: String,
    pub(crate) params: Vec<Param>,
}

impl<'i> Sql<'i> {
    pub(crate) fn new(dialect: Dialect, index: &'i ValueIndex) -> Sql<'i> {
        Sql { dialect, index, text: String::new(), params: Vec::new() }
    }

    /// Appends a placeholder bound to `p`.
    fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        match self.dialect {
            Dialect::Sqlite => "?".to_owned(),
            Dialect::Postgres => format!("${}", self.params.len()),
        }
    }

    fn num(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => SQLITE_NUM,
            Dialect::Postgres => PG_NUM,
        }
    }

    fn str(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => SQLITE_STR,
            Dialect::Postgres => PG_STR,
        }
    }

    /// `<column> IN (<ids>)`: one array parameter on PostgreSQL, one placeholder each on SQLite.
    fn in_list(&mut self, column: &str, ids: Vec<i64>) -> String {
        if ids.is_empty() {
            return "FALSE".to_owned();
        }
        match self.dialect {
            Dialect::Postgres => format!("{column} = ANY({}::BIGINT[])", self.bind(Param::Ints(ids))),
            Dialect::Sqlite => {
                let each: Vec<String> = ids.into_iter().map(|i| self.bind(Param::Int(i))).collect();
                format!("{column} IN ({})", each.join(","))
            }
        }
    }

    /// What a condition asks of an item's `value`, or `None` when it asks only that the item
    /// exists (or not).
    fn test(&mut self, w: &Where) -> Option<String> {
        Some(match &w.test {
            Test::Exists | Test::Absent => return None,
            Test::Number(cmp, n) => {
                let lit = match (self.dialect, n) {
                    // Number literals travel as text and are read as `numeric`, the index's type.
                    (Dialect::Postgres, Number::Int(i)) => {
                        format!("CAST({}::TEXT AS NUMERIC)", self.bind(Param::Text(i.to_string())))
                    }
                    (Dialect::Postgres, Number::Float(f)) => {
                        format!("CAST({}::TEXT AS NUMERIC)", self.bind(Param::Text(format!("{f:e}"))))
                    }
                    (Dialect::Sqlite, Number::Int(i)) => self.bind(Param::Int(*i)),
                    (Dialect::Sqlite, Number::Float(f)) => self.bind(Param::Float(*f)),
                };
                format!("{} {} {lit}", self.num(), sql_cmp(*cmp))
            }
            Test::String(cmp, s) => {
                let lit = self.bind(Param::Text(s.clone()));
                format!("{} IS NULL AND {} {} {lit}", self.num(), self.str(), sql_cmp(*cmp))
            }
            Test::Json { equal, text } => {
                // Of the literal's type (booleans: `t` and `f` alike), then by text.
                let same_type = if text.starts_with(['t', 'f']) {
                    "substr(value, 1, 1) IN ('t', 'f')".to_owned()
                } else {
                    format!("substr(value, 1, 1) = {}", self.bind(Param::Text(text.chars().take(1).collect())))
                };
                let lit = self.bind(Param::Text(text.clone()));
                format!("{same_type} AND value {} {lit}", if *equal { "=" } else { "<>" })
            }
        })
    }

    /// `key = 'k' AND <test>` on `items`, to read the value index of an indexed key (the key is
    /// a literal, so that its partial index applies): reading owners to drive.
    pub(crate) fn condition(&mut self, w: &Where) -> String {
        let key = if self.index.covers(&w.key) {
            format!("'{}'", w.key.as_str())
        } else {
            self.bind(Param::Text(w.key.as_str().to_owned()))
        };
        match self.test(w) {
            Some(test) => format!("key = {key} AND {test}"),
            None => format!("key = {key}"),
        }
    }

    /// A condition as a probe of the walked device's own item: a scalar subquery whose `WHERE`
    /// is the whole primary key (so a planner reads that one item, never a value index range)
    /// and whose test is in its select list.
    fn probe(&mut self, w: &Where) -> String {
        let test = self.test(w);
        let key = self.bind(Param::Text(w.key.as_str().to_owned()));
        let item = format!("FROM items WHERE kind = 0 AND owner = d.id AND key = {key}");
        match (&w.test, test) {
            (Test::Absent, _) => format!("(SELECT 1 {item}) IS NULL"),
            (_, None) => format!("(SELECT 1 {item}) IS NOT NULL"),
            (_, Some(test)) => format!("COALESCE((SELECT CASE WHEN {test} THEN 1 ELSE 0 END {item}), 0) = 1"),
        }
    }

    /// The device query of `q` (after [`drive`] took a condition's owners into `q.ids`), every
    /// condition a probe of the walked device's own item.
    pub(crate) fn devices(mut self, q: &DeviceQuery, columns: &str) -> Sql<'i> {
        let mut parts: Vec<String> = Vec::new();
        if let Some(after) = q.after {
            parts.push(format!("d.id > {}", self.bind(Param::Int(sql_id(after.get())))));
        }
        if let Some(scope) = &q.scope {
            let homes = scope.iter().map(|h| sql_id(h.get())).collect();
            let cond = self.in_list("d.home_id", homes);
            parts.push(cond);
        }
        if let Some(home) = q.home {
            parts.push(format!("d.home_id = {}", self.bind(Param::Int(sql_id(home.get())))));
        }
        if let Some(class) = &q.device_class {
            parts.push(format!("d.device_class = {}", self.bind(Param::Text(class.clone()))));
        }
        if let Some(tag) = &q.tag {
            parts.push(format!("d.tag = {}", self.bind(Param::Text(tag.clone()))));
        }
        if let Some(ids) = &q.ids {
            let mut ids: Vec<DeviceId> = ids.iter().copied().filter(|id| q.after.is_none_or(|a| *id > a)).collect();
            ids.sort_unstable();
            ids.dedup();
            let others = q.scope.is_some()
                || q.home.is_some()
                || q.device_class.is_some()
                || q.tag.is_some()
                || !q.wheres.is_empty()
                || q.behind.is_some();
            if !others {
                // Nothing else filters: the page can only hold the first `limit` ids past `after`.
                ids.truncate(q.limit);
            }
            let cond = self.in_list("d.id", ids.iter().map(|d| sql_id(d.get())).collect());
            parts.push(cond);
        }
        for w in &q.wheres {
            let probe = self.probe(w);
            parts.push(probe);
        }
        if let Some(behind) = q.behind {
            let rev = match self.dialect {
                Dialect::Sqlite => {
                    "MAX(s.rev, COALESCE((SELECT MAX(c.rev) FROM changes c WHERE c.kind = 0 AND c.owner = s.owner), 0))"
                }
                Dialect::Postgres => "s.rev",
            };
            parts.push(format!(
                "{}EXISTS (SELECT 1 FROM stores s LEFT JOIN device_sync ds ON ds.device_id = s.owner
                  WHERE s.kind = 0 AND s.owner = d.id AND COALESCE(ds.applied_rev, 0) < {rev})",
                if behind { "" } else { "NOT " }
            ));
        }
        let limit = self.bind(Param::Int(i64::try_from(q.limit).unwrap_or(i64::MAX)));
        let filter = if parts.is_empty() { String::new() } else { format!(" WHERE {}", parts.join(" AND ")) };
        self.text = format!("SELECT {columns} FROM devices d{filter} ORDER BY d.id LIMIT {limit}");
        self
    }

    /// The owners of up to `cap` items matching `w`, read from its key's value index.
    pub(crate) fn owners(mut self, w: &Where, cap: usize) -> Sql<'i> {
        let cond = self.condition(w);
        let cap = self.bind(Param::Int(i64::try_from(cap).unwrap_or(i64::MAX)));
        self.text = format!("SELECT owner FROM items WHERE kind = 0 AND {cond} LIMIT {cap}");
        self
    }
}

fn sql_cmp(cmp: Cmp) -> &'static str {
    match cmp {
        Cmp::Ne => "<>",
        other => other.as_str(),
    }
}

fn sql_id(n: u64) -> i64 {
    crate::sql::sql_id(n)
}

/// Whether a condition can drive its query: its key is indexed, and it asks for the key.
pub(crate) fn can_drive(index: &ValueIndex, w: &Where) -> bool {
    index.covers(&w.key) && w.test != Test::Absent
}

/// Drives `q` by the condition whose index read found the fewest owners, if one found fewer than
/// [`DRIVE_BELOW`]: its owners become (or narrow) `q.ids` and the condition, met by them all, is
/// dropped. `owners[i]`: what condition `i`'s index read found (`None`: it cannot drive). Two
/// steps rather than one join, so that no planner estimate can turn a few index entries into a
/// walk over every item of the key.
pub(crate) fn drive(mut q: DeviceQuery, owners: Vec<Option<Vec<DeviceId>>>) -> DeviceQuery {
    let best = owners
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().map(|o| (o.len(), i)))
        .filter(|(n, _)| *n < DRIVE_BELOW)
        .min()
        .map(|(_, i)| i);
    if let Some(i) = best
        && let Some(found) = owners.into_iter().nth(i).flatten()
    {
        q.wheres.remove(i);
        q.ids = Some(match q.ids.take() {
            Some(asked) => {
                let found: std::collections::HashSet<DeviceId> = found.into_iter().collect();
                asked.into_iter().filter(|d| found.contains(d)).collect()
            }
            None => found,
        });
    }
    q
}

// ---- jobs ----

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Devices remain to be written.
    Running,
    /// Every selected device was written or failed.
    Done,
    /// Cancelled: what was not yet written never will be.
    Cancelled,
}

impl JobState {
    /// Wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
        }
    }

    pub(crate) fn from_code(code: i64) -> JobState {
        match code {
            0 => JobState::Running,
            1 => JobState::Done,
            _ => JobState::Cancelled,
        }
    }
}

/// A job to create: the devices it writes were selected when it was asked for.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The selection as asked (JSON), shown back.
    pub select: String,
    /// The ops (JSON, PROTOCOL.md §11), applied as one batch to each device.
    pub ops: String,
    /// Devices per second, when limited.
    pub rate: Option<f64>,
    /// The project key that created it (`None`: the admin).
    pub api_key: Option<ApiKeyId>,
    /// The selected devices.
    pub devices: Vec<DeviceId>,
}

/// A job and its progress.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// Where it stands.
    pub state: JobState,
    /// The selection as asked (JSON).
    pub select: String,
    /// The ops (JSON).
    pub ops: String,
    /// Devices per second, when limited.
    pub rate: Option<f64>,
    /// The project key that created it (`None`: the admin).
    pub api_key: Option<ApiKeyId>,
    /// Devices selected.
    pub selected: u64,
    /// Devices written.
    pub written: u64,
    /// Devices whose write failed.
    pub failed: u64,
    /// Written devices whose recorded `deliveredRev` reached the job's write.
    pub delivered: u64,
    /// Written devices whose recorded `appliedRev` reached the job's write.
    pub applied: u64,
    /// The first failures (at most [`MAX_JOB_ERRORS`]), by device id.
    pub errors: Vec<(DeviceId, String)>,
    /// When it was created.
    pub created: Timestamp,
    /// When it ended (done or cancelled).
    pub ended: Option<Timestamp>,
}

/// A job's columns, in the order [`JobRecord`]s are read (both backends; `$n` placeholders
/// work in SQLite too).
pub(crate) const JOB_COLUMNS: &str = "id, state, select_json, ops_json, rate, api_key_id, created_ms, ended_ms";
/// A job's progress: selected, written, failed, delivered, applied.
pub(crate) const JOB_COUNTS_SQL: &str = "SELECT COUNT(*),
        COALESCE(SUM(CASE WHEN jd.state = 1 THEN 1 ELSE 0 END), 0),
        COALESCE(SUM(CASE WHEN jd.state = 2 THEN 1 ELSE 0 END), 0),
        COALESCE(SUM(CASE WHEN jd.state = 1 AND COALESCE(ds.delivered_rev, 0) >= jd.rev THEN 1 ELSE 0 END), 0),
        COALESCE(SUM(CASE WHEN jd.state = 1 AND COALESCE(ds.applied_rev, 0) >= jd.rev THEN 1 ELSE 0 END), 0)
    FROM job_devices jd LEFT JOIN device_sync ds ON ds.device_id = jd.device_id WHERE jd.job_id = $1";
/// A job's first failures.
pub(crate) const JOB_ERRORS_SQL: &str =
    "SELECT device_id, reason FROM job_devices WHERE job_id = $1 AND state = 2 ORDER BY device_id LIMIT 100";
/// Records a device's failure (unless it was written or failed already).
pub(crate) const JOB_FAIL_SQL: &str =
    "UPDATE job_devices SET state = 2, reason = $3 WHERE job_id = $1 AND device_id = $2 AND state = 0";
/// Ends a running job with nothing left to write.
pub(crate) const JOB_FINISH_SQL: &str = "UPDATE jobs SET state = 1, ended_ms = $2
    WHERE id = $1 AND state = 0 AND NOT EXISTS (SELECT 1 FROM job_devices WHERE job_id = $1 AND state = 0)";
/// Cancels a running job.
pub(crate) const JOB_CANCEL_SQL: &str = "UPDATE jobs SET state = 2, ended_ms = $2 WHERE id = $1 AND state = 0";
/// Marks a device as written by its job, inside the write's transaction: no row changes when
/// the job is not running or has written (or failed) the device already.
pub(crate) const JOB_MARK_SQL: &str = "UPDATE job_devices SET state = 1, rev = $3
    WHERE job_id = $1 AND device_id = $2 AND state = 0 AND (SELECT state FROM jobs WHERE id = $1) = 0";

/// How many devices a claim of a job at `rate` devices per second takes (at most `max`), and
/// how long until the job's next claim, in milliseconds.
pub(crate) fn rated_claim(rate: f64, max: usize) -> (usize, i64) {
    let n = (rate.ceil() as usize).clamp(1, max.max(1));
    (n, ((n as f64) * 1000.0 / rate).ceil() as i64)
}

impl JobRecord {
    /// A job as its row holds it, before its progress is counted.
    #[allow(clippy::too_many_arguments)] // the columns of a job row, in order
    pub(crate) fn from_row(
        id: JobId,
        state: JobState,
        select: String,
        ops: String,
        rate: Option<f64>,
        api_key: Option<ApiKeyId>,
        created: Timestamp,
        ended: Option<Timestamp>,
    ) -> JobRecord {
        JobRecord {
            id,
            state,
            select,
            ops,
            rate,
            api_key,
            selected: 0,
            written: 0,
            failed: 0,
            delivered: 0,
            applied: 0,
            errors: Vec::new(),
            created,
            ended,
        }
    }
}

/// Failures a job record lists.
pub const MAX_JOB_ERRORS: usize = 100;

/// Devices of a running job claimed by one node for a while (its lease).
#[derive(Debug, Clone)]
pub struct JobClaim {
    /// The job.
    pub job: JobId,
    /// Its ops (JSON).
    pub ops: String,
    /// The project key that created it (`None`: the admin).
    pub api_key: Option<ApiKeyId>,
    /// The devices to write, in id order.
    pub devices: Vec<DeviceId>,
    /// Jobs running when it was claimed (for metrics).
    pub running: usize,
}

/// What [`Store::claim_job_work`](crate::Store::claim_job_work) found.
#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    /// Devices to write now.
    Claimed(JobClaim),
    /// Work remains, but its rate (or others' leases) lets none be taken before `until`.
    Wait {
        /// When to ask again.
        until: Timestamp,
        /// Jobs running.
        running: usize,
    },
    /// No running job has work left to claim.
    Idle,
}
