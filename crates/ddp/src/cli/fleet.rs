//! Fleets (PROTOCOL.md §12): `ddp device list` with filters and pages, and `ddp job …`, which
//! writes the same ops to every device a selection names and follows the job's progress.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Map, Value, json};

use super::api::{Api, Failure};
use super::{Connection, output};

/// Which devices: every filter given must hold (AND).
#[derive(Args, Clone, Default)]
pub struct Filters {
    /// Only the devices of this home.
    #[arg(long, value_name = "ID")]
    home: Option<u64>,
    /// Only devices of this class (their `deviceClass`).
    #[arg(long, value_name = "CLASS")]
    class: Option<String>,
    /// Only devices with this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Only devices with a live session: `--connected` (or `--connected true`);
    /// `--connected false` (or --disconnected): only devices without one.
    #[arg(long, value_name = "true|false", num_args = 0..=1, default_missing_value = "true")]
    connected: Option<bool>,
    /// Only devices without a live session (the same as --connected false).
    #[arg(long, conflicts_with = "connected")]
    disconnected: bool,
    /// A condition on the device's store; repeatable, all must hold. `KEY<OP>JSON` with OP one
    /// of = != < <= > >= (`fw<2.1`, `mode="eco"`: strings are JSON, so quoted), `KEY` (the key
    /// exists) or `!KEY` (it is absent). Quote the whole condition for the shell.
    #[arg(long = "where", value_name = "COND")]
    wheres: Vec<String>,
    /// Only devices that have not applied (acknowledged) their whole store: `--behind` (or
    /// `--behind true`); `--behind false` (or --not-behind): only devices that have.
    #[arg(long, value_name = "true|false", num_args = 0..=1, default_missing_value = "true")]
    behind: Option<bool>,
    /// Only devices that have applied their whole store (the same as --behind false).
    #[arg(long, conflicts_with = "behind")]
    not_behind: bool,
}

impl Filters {
    fn connected(&self) -> Option<bool> {
        self.connected.or(self.disconnected.then_some(false))
    }

    fn behind(&self) -> Option<bool> {
        self.behind.or(self.not_behind.then_some(false))
    }

    /// The filters as `GET /devices` query parameters.
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(h) = self.home {
            query.push(("homeId", h.to_string()));
        }
        if let Some(c) = &self.class {
            query.push(("deviceClass", c.clone()));
        }
        if let Some(t) = &self.tag {
            query.push(("tag", t.clone()));
        }
        if let Some(c) = self.connected() {
            query.push(("isConnected", c.to_string()));
        }
        for w in &self.wheres {
            query.push(("where", w.clone()));
        }
        if let Some(b) = self.behind() {
            query.push(("behind", b.to_string()));
        }
        query
    }

    /// The filters as a job's `select` object.
    fn select(&self) -> Map<String, Value> {
        let mut select = Map::new();
        if let Some(h) = self.home {
            select.insert("homeId".into(), json!(h));
        }
        if let Some(c) = &self.class {
            select.insert("deviceClass".into(), json!(c));
        }
        if let Some(t) = &self.tag {
            select.insert("tag".into(), json!(t));
        }
        if let Some(c) = self.connected() {
            select.insert("isConnected".into(), json!(c));
        }
        if !self.wheres.is_empty() {
            select.insert("where".into(), json!(self.wheres));
        }
        if let Some(b) = self.behind() {
            select.insert("behind".into(), json!(b));
        }
        select
    }
}

/// Which page of devices.
#[derive(Args, Clone, Default)]
pub struct Pages {
    /// Devices per page (1–1000; the server's default is 100, --all-pages asks for 1000).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Start after this device id (the next page: the last id of the one before).
    #[arg(long, value_name = "ID")]
    after: Option<u64>,
    /// Follow the pages to the end and print every device (without it: one page, and a note on
    /// stderr when more follow).
    #[arg(long)]
    all_pages: bool,
}

/// Devices per page when --all-pages follows them and --limit is not given.
const ALL_PAGES_LIMIT: u64 = 1000;

/// `ddp device list`: one page of the devices the filters select, or every page.
pub(super) async fn list_devices(
    conn: &Connection,
    api: &Api,
    filters: &Filters,
    pages: &Pages,
) -> Result<(), Failure> {
    let mut query = filters.query();
    if let Some(n) = pages.limit.or(pages.all_pages.then_some(ALL_PAGES_LIMIT)) {
        query.push(("limit", n.to_string()));
    }
    if let Some(a) = pages.after {
        query.push(("after", a.to_string()));
    }
    let mut request = api.request(Method::GET, "/devices").query(&query);
    let mut devices = Vec::new();
    let mut more = false;
    loop {
        let response = api.send(request).await?;
        let next = next_link(&response);
        let page: Value =
            response.json().await.map_err(|e| Failure::new(format!("the server's answer is not JSON: {e}")))?;
        let Value::Array(page) = page else {
            return Err(Failure::new("unexpected answer: the server's list of devices is not an array"));
        };
        let empty = page.is_empty();
        devices.extend(page);
        match next {
            Some(path) if pages.all_pages && !empty => {
                if !path.starts_with('/') {
                    return Err(Failure::new(format!("the server's link to the next page is not a path: {path}")));
                }
                request = api.request(Method::GET, &path);
            }
            Some(_) => {
                more = true;
                break;
            }
            None => break,
        }
    }
    let devices = Value::Array(devices);
    output::list(conn.json, &devices, &["ID", "NAME", "HOME", "CONNECTED", "LAST CONNECT"], |d| {
        vec![
            output::cell(&d["id"]),
            output::cell(&d["name"]),
            output::cell(&d["homeId"]),
            if d["isConnected"] == true { "yes".into() } else { "no".into() },
            output::cell(&d["lastConnectTime"]),
        ]
    });
    if more && !pages.all_pages {
        let last = devices.as_array().and_then(|d| d.last()).map(|d| output::cell(&d["id"])).unwrap_or_default();
        eprintln!("more devices follow: add --after {last} for the next page, or --all-pages for every page");
    }
    Ok(())
}

/// The target of a response's `Link: <…>; rel="next"`.
fn next_link(response: &Response) -> Option<String> {
    for value in response.headers().get_all("link") {
        let Ok(mut rest) = value.to_str() else { continue };
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = &after[..close];
            let params_end = after[close..].find('<').map_or(after.len(), |i| close + i);
            let params = &after[close + 1..params_end];
            let next = params.split([';', ',']).any(|p| {
                let p = p.trim();
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            });
            if next {
                return Some(target.to_owned());
            }
            rest = &after[params_end..];
        }
    }
    None
}

/// `ddp job …`
#[derive(Subcommand)]
pub enum Job {
    /// Create a job: write the same ops, as one atomic batch, to every device the selection
    /// names (admin key or a read-write project key). The devices are selected once, now; a
    /// selection with no filter is refused unless it says --all. VALUEs are JSON when they
    /// parse, else strings; ops go in the order --set, --merge, --delete (or exactly as given
    /// with --ops / --ops-file).
    #[command(
        after_help = "Examples:\n  ddp job create --where 'fw<2.1' --set otaUrl='\"https://fw.example/2.1\"' --rate 100 --wait\n  ddp job create --class thermostat --home 3 --merge 'schedule={\"on\":\"07:00\"}'\n  ddp job create --ids 4,7,9 --delete legacyMode --wait --json\n  ddp job create --all --set maintenance=true\n  ddp job create --tag eu --ops '[{\"op\":\"set\",\"key\":\"mode\",\"value\":\"eco\",\"ifRev\":0}]'\n  ddp job create --connected --not-behind --ops-file rollout.json --wait"
    )]
    Create(Box<CreateArgs>),
    /// List the jobs (the admin: every job; a project key: the jobs it created).
    #[command(after_help = "Examples:\n  ddp job list\n  ddp job list --json")]
    List,
    /// Show a job and its progress; --follow draws a progress bar until it ends.
    #[command(after_help = "Examples:\n  ddp job show 7\n  ddp job show 7 --follow\n  ddp job show 7 --json")]
    Show {
        /// Job id.
        id: u64,
        /// Follow the job's progress (a live progress bar on stderr) until it is done or
        /// cancelled, then print it; exits non-zero when it was cancelled.
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a job: nothing it has not written yet will be; a job that has ended stays as it
    /// was.
    #[command(after_help = "Example:\n  ddp job cancel 7")]
    Cancel {
        /// Job id.
        id: u64,
    },
}

/// `ddp job create`
#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    filters: Filters,
    /// Only these devices (comma-separated, or repeat the flag).
    #[arg(long, value_delimiter = ',', value_name = "ID,…")]
    ids: Vec<u64>,
    /// Every device the token sees: needed when no filter is given (other filters still apply).
    #[arg(long)]
    all: bool,
    /// Set KEY to VALUE; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Merge a JSON object into KEY's value (RFC 7396: members set to null are removed);
    /// repeatable.
    #[arg(long = "merge", value_name = "KEY=JSON")]
    merges: Vec<String>,
    /// Delete KEY (a device without it fails); repeatable.
    #[arg(long = "delete", value_name = "KEY")]
    deletes: Vec<String>,
    /// The ops as JSON, in order: `[{"op":"set"|"delete"|"merge","key",…,"ifRev"?}, …]` (or
    /// `{"ops":[…]}`), instead of --set/--merge/--delete.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["sets", "merges", "deletes", "ops_file"])]
    ops: Option<String>,
    /// The ops from a file (`-`: standard input), like --ops.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["sets", "merges", "deletes"])]
    ops_file: Option<PathBuf>,
    /// Write at most this many devices a second (over all nodes); default: as fast as it goes.
    #[arg(long, value_name = "PER_SECOND")]
    rate: Option<f64>,
    /// Then follow the job (a live progress bar on stderr) until it is done or cancelled, and
    /// print it as it ended; exits non-zero when it was cancelled.
    #[arg(long)]
    wait: bool,
}

/// A job as the server answered it: its text (printed exactly with --json) and its fields.
struct JobAnswer {
    text: String,
    value: Value,
}

impl JobAnswer {
    fn count(&self, field: &str) -> u64 {
        self.value[field].as_u64().unwrap_or(0)
    }

    fn state(&self) -> &str {
        self.value["state"].as_str().unwrap_or("unknown")
    }
}

/// Sends `request` and reads its JSON answer, keeping the text.
async fn answer(api: &Api, request: RequestBuilder) -> Result<JobAnswer, Failure> {
    let response = api.send(request).await?;
    let text = response.text().await.map_err(|e| Failure::new(format!("cannot read the answer: {e}")))?;
    let value =
        serde_json::from_str(&text).map_err(|e| Failure::new(format!("the server's answer is not JSON: {e}")))?;
    Ok(JobAnswer { text, value })
}

pub async fn job(conn: &Connection, command: Job) -> Result<(), Failure> {
    let api = conn.api()?;
    match command {
        Job::Create(args) => {
            let args = *args;
            let body = create_body(&args)?;
            let request = api.request(Method::POST, "/jobs").header("Content-Type", "application/json").body(body);
            let job = answer(&api, request).await?;
            if args.wait {
                follow(conn, &api, job).await?;
            } else {
                print_job(conn, &job);
            }
        }
        Job::List => {
            let jobs = answer(&api, api.request(Method::GET, "/jobs")).await?;
            if conn.json {
                println!("{}", jobs.text);
            } else {
                let headers = ["ID", "STATE", "SELECTED", "WRITTEN", "FAILED", "DELIVERED", "APPLIED", "CREATED"];
                output::list(false, &jobs.value, &headers, |j| {
                    ["id", "state", "selected", "written", "failed", "delivered", "applied", "creationTime"]
                        .iter()
                        .map(|f| output::cell(&j[*f]))
                        .collect()
                });
            }
        }
        Job::Show { id, follow: following } => {
            let job = answer(&api, api.request(Method::GET, &format!("/jobs/{id}"))).await?;
            if following {
                follow(conn, &api, job).await?;
            } else {
                print_job(conn, &job);
            }
        }
        Job::Cancel { id } => {
            let job = answer(&api, api.request(Method::DELETE, &format!("/jobs/{id}"))).await?;
            if conn.json {
                println!("{}", job.text);
            } else {
                let (written, selected, failed) = (job.count("written"), job.count("selected"), job.count("failed"));
                match job.state() {
                    "cancelled" => println!(
                        "cancelled job {id}: {written} of {selected} device(s) written, {failed} failed; no more will be"
                    ),
                    state => {
                        println!("job {id} had already ended ({state}): {written} of {selected} device(s) written")
                    }
                }
            }
        }
    }
    Ok(())
}

/// The body of `POST /jobs`; the ops travel as text, exactly as given.
fn create_body(args: &CreateArgs) -> Result<String, Failure> {
    let ops = match (&args.ops, &args.ops_file) {
        (Some(text), _) => json_ops(text, "--ops")?,
        (None, Some(file)) => json_ops(&super::read_input(file)?, &file.display().to_string())?,
        (None, None) => {
            if args.sets.is_empty() && args.merges.is_empty() && args.deletes.is_empty() {
                return Err(Failure::new("nothing to do: give --set, --merge, --delete, --ops or --ops-file"));
            }
            let ops = super::patch_ops(&args.sets, &args.merges, &args.deletes, "give the ops in order with --ops")?;
            ddp_protocol::batch::Op::list_json(&ops)
        }
    };
    let mut select = args.filters.select();
    if !args.ids.is_empty() {
        select.insert("ids".into(), json!(args.ids));
    }
    if args.all {
        select.insert("all".into(), json!(true));
    }
    let rate = match args.rate {
        None => String::new(),
        Some(r) => {
            let r = serde_json::Number::from_f64(r)
                .ok_or_else(|| Failure::new(format!("--rate is devices per second, a number; got {r}")))?;
            format!(",\"rate\":{r}")
        }
    };
    Ok(format!("{{\"select\":{},\"ops\":{ops}{rate}}}", Value::Object(select)))
}

/// The ops array's text from `text` (the array, or `{"ops":[…]}`), checked to be JSON.
fn json_ops(text: &str, origin: &str) -> Result<String, Failure> {
    let ops = super::ops_text(text, origin)?;
    serde_json::from_str::<&serde_json::value::RawValue>(&ops)
        .map_err(|e| Failure::new(format!("{origin}: the ops are not JSON: {e}")))?;
    Ok(ops)
}

/// Prints a job: the server's JSON with --json, else its fields.
fn print_job(conn: &Connection, job: &JobAnswer) {
    if conn.json {
        println!("{}", job.text);
        return;
    }
    /// `select` and `ops` exactly as stored (values as written).
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        select: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        ops: Option<&'a serde_json::value::RawValue>,
    }
    let raw: Option<Raw<'_>> = serde_json::from_str(&job.text).ok();
    let exact = |field: Option<&serde_json::value::RawValue>, name: &str| {
        field.map_or_else(|| output::cell(&job.value[name]), |v| v.get().to_owned())
    };
    let v = &job.value;
    let rate = v["rate"].as_f64().map_or_else(|| "as fast as it goes".to_owned(), |r| format!("{r} devices/s"));
    let rows = [
        ("id", output::cell(&v["id"])),
        ("state", output::cell(&v["state"])),
        ("select", exact(raw.as_ref().and_then(|r| r.select), "select")),
        ("ops", exact(raw.as_ref().and_then(|r| r.ops), "ops")),
        ("rate", rate),
        ("selected", output::cell(&v["selected"])),
        ("written", output::cell(&v["written"])),
        ("failed", output::cell(&v["failed"])),
        ("delivered", output::cell(&v["delivered"])),
        ("applied", output::cell(&v["applied"])),
        ("created", output::cell(&v["creationTime"])),
        ("ended", output::cell(&v["endTime"])),
    ];
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    for (label, value) in &rows {
        println!("{label:<width$}  {value}");
    }
    let errors = v["errors"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !errors.is_empty() {
        println!("errors (the first {} of {} failed device(s)):", errors.len(), job.count("failed"));
        for e in errors {
            println!("  device {:<8} {}", output::cell(&e["deviceId"]), output::cell(&e["reason"]));
        }
    }
}

/// How often --wait and --follow ask how a job stands.
const POLL: Duration = Duration::from_millis(300);

/// Follows a job with a progress bar on stderr until it ends, then prints it: `Ok` when it is
/// done (with a warning when devices failed), a failure when it was cancelled.
async fn follow(conn: &Connection, api: &Api, mut job: JobAnswer) -> Result<(), Failure> {
    let id = job.value["id"].as_u64().ok_or_else(|| Failure::new("unexpected answer: the job has no id"))?;
    let mut progress = Progress::new();
    while job.state() == "running" {
        progress.show(&job);
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = tokio::signal::ctrl_c() => {
                progress.break_line();
                return Err(Failure::new(format!(
                    "stopped following job {id}; it keeps running: `ddp job show {id} --follow` follows it again, \
                     `ddp job cancel {id}` cancels it"
                )));
            }
        }
        job = match answer(api, api.request(Method::GET, &format!("/jobs/{id}"))).await {
            Ok(job) => job,
            Err(e) => {
                progress.break_line();
                return Err(Failure {
                    reason: e.reason,
                    message: format!("{}; job {id} keeps running (`ddp job show {id} --follow`)", e.message),
                });
            }
        };
    }
    progress.finish(&job);
    print_job(conn, &job);
    let (selected, written, failed) = (job.count("selected"), job.count("written"), job.count("failed"));
    match job.state() {
        "done" => {
            if failed > 0 {
                eprintln!(
                    "warning: job {id} is done, but {failed} of {selected} device(s) failed (their reasons: `ddp job show {id}`)"
                );
            }
            Ok(())
        }
        "cancelled" => Err(Failure::new(format!(
            "job {id} was cancelled: {written} of {selected} device(s) written, {failed} failed"
        ))),
        other => Err(Failure::new(format!("job {id} ended {other}"))),
    }
}

/// Cells of the progress bar.
const BAR: usize = 20;

/// A job's progress on stderr: one line redrawn in place on a terminal; elsewhere (logs,
/// pipes) a line when it changed, at most once a second, and the line it ends with.
struct Progress {
    terminal: bool,
    /// Characters of the line drawn on the terminal (0: none is open).
    drawn: usize,
    /// When the last plain line was printed, and what it said.
    printed: Option<(Instant, String)>,
}

impl Progress {
    fn new() -> Progress {
        Progress { terminal: std::io::stderr().is_terminal(), drawn: 0, printed: None }
    }

    fn show(&mut self, job: &JobAnswer) {
        let line = progress_line(job);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = line.chars().count();
            let pad = self.drawn.saturating_sub(width);
            let _ = write!(err, "\r{line}{:pad$}", "");
            let _ = err.flush();
            self.drawn = width;
        } else {
            let due =
                self.printed.as_ref().is_none_or(|(at, last)| *last != line && at.elapsed() >= Duration::from_secs(1));
            if due {
                let _ = writeln!(err, "{line}");
                self.printed = Some((Instant::now(), line));
            }
        }
    }

    /// Shows how the job ended.
    fn finish(&mut self, job: &JobAnswer) {
        if self.terminal {
            self.show(job);
            self.break_line();
            return;
        }
        let line = progress_line(job);
        if self.printed.as_ref().is_none_or(|(_, last)| *last != line) {
            eprintln!("{line}");
            self.printed = Some((Instant::now(), line));
        }
    }

    /// Ends the line being redrawn, so that what follows starts on its own.
    fn break_line(&mut self) {
        if self.terminal && self.drawn > 0 {
            eprintln!();
            self.drawn = 0;
        }
    }
}

/// `job 7 running    [#########-----------]  written 450/1000  delivered 300  applied 120  failed 2`
fn progress_line(job: &JobAnswer) -> String {
    let (selected, written, failed) = (job.count("selected"), job.count("written"), job.count("failed"));
    let filled = bar_cells(written.saturating_add(failed), selected);
    format!(
        "job {} {:<9}  [{}{}]  written {written}/{selected}  delivered {}  applied {}  failed {failed}",
        output::cell(&job.value["id"]),
        job.state(),
        "#".repeat(filled),
        "-".repeat(BAR - filled),
        job.count("delivered"),
        job.count("applied"),
    )
}

/// How many of the bar's cells `done` of `of` fills.
fn bar_cells(done: u64, of: u64) -> usize {
    if of == 0 {
        return BAR;
    }
    let cells = done.min(of).saturating_mul(BAR as u64) / of;
    usize::try_from(cells).map_or(BAR, |c| c.min(BAR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_what_is_done() {
        assert_eq!(bar_cells(0, 1000), 0);
        assert_eq!(bar_cells(450, 1000), 9);
        assert_eq!(bar_cells(1000, 1000), BAR);
        assert_eq!(bar_cells(5, 3), BAR, "never more than full");
        assert_eq!(bar_cells(0, 0), BAR, "a job of no devices is all done");
        let job = JobAnswer {
            text: String::new(),
            value: json!({"id": 7, "state": "running", "selected": 1000, "written": 448, "failed": 2,
                "delivered": 300, "applied": 120}),
        };
        assert_eq!(
            progress_line(&job),
            "job 7 running    [#########-----------]  written 448/1000  delivered 300  applied 120  failed 2"
        );
    }
}
