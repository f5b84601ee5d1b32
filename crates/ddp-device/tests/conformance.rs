//! The mirror conformance suite (conformance/README.md): every file in `conformance/mirror/` is a
//! sequence of raw server messages with the mirror expected after each. Each message is parsed as
//! the SDK's connection parses a frame (`serde_json::from_str::<ServerMessage>`; a message that
//! does not parse leaves the mirror unchanged) and applied to a [`Mirror`] that starts empty.
//!
//! One test runs every file and reports every failing file and step, not just the first.
//! `DDP_CONFORMANCE_PRINT=1` prints, for every step, the `expect` block the SDK's mirror actually
//! reaches (to fill in a new case: the committed expectations are reviewed by hand against
//! PROTOCOL.md, never copied blindly).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ddp_device::{Mirror, Value};
use ddp_protocol::sync::ServerMessage;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Fewer cases than this means a broken checkout, not a passing suite.
const MIN_CASES: usize = 40;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    description: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    message: String,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    rev: u64,
    items: BTreeMap<String, Box<RawValue>>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/mirror")
}

/// The case files, sorted by name.
fn files() -> Vec<PathBuf> {
    let dir = dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display())).path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Whether `name` is `NNN-short-name.json`.
fn well_named(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else { return false };
    let bytes = stem.as_bytes();
    bytes.len() > 4
        && bytes[..3].iter().all(u8::is_ascii_digit)
        && bytes[3] == b'-'
        && bytes[4..].iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// The mirror's live keys and their values' JSON text.
fn state(m: &Mirror) -> (u64, BTreeMap<String, String>) {
    (m.rev().0, m.iter().map(|(k, v)| (k.to_string(), v.as_json().to_owned())).collect())
}

/// A value's JSON text minified (the SDK's own minifier, which keeps numbers and escapes as
/// written).
fn minified(raw: &RawValue) -> Result<String, String> {
    Value::parse(raw.get()).map(|v| v.as_json().to_owned()).map_err(|e| format!("{}: {e}", raw.get()))
}

/// What differs between the expected state and the actual one; empty when they agree.
fn diff(expect: &Expect, rev: u64, items: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    if expect.rev != rev {
        out.push(format!("rev: expected {}, got {rev}", expect.rev));
    }
    for (key, raw) in &expect.items {
        let want = match minified(raw) {
            Ok(w) => w,
            Err(e) => {
                out.push(format!("expected value of {key:?} is not a value: {e}"));
                continue;
            }
        };
        match items.get(key) {
            None => out.push(format!("{key:?}: expected {want}, missing")),
            Some(got) if *got != want => out.push(format!("{key:?}: expected {want}, got {got}")),
            Some(_) => {}
        }
    }
    for (key, got) in items {
        if !expect.items.contains_key(key) {
            out.push(format!("{key:?}: not expected, got {got}"));
        }
    }
    out
}

/// The `expect` block of the mirror's actual state, for `DDP_CONFORMANCE_PRINT`.
fn expect_json(rev: u64, items: &BTreeMap<String, String>) -> String {
    let members: Vec<String> = items
        .iter()
        .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap_or_else(|_| unreachable!("a string"))))
        .collect();
    format!("{{\"rev\":{rev},\"items\":{{{}}}}}", members.join(","))
}

/// Runs one case file; returns its failures (empty when it passes).
fn run(path: &Path, print: bool) -> Vec<String> {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut failures = Vec::new();
    if !well_named(&file) {
        failures.push(format!("{file}: the name is not NNN-short-name.json"));
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![format!("{file}: cannot read: {e}")],
    };
    let case: Case = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => return vec![format!("{file}: not a case file: {e}")],
    };
    if case.name.trim().is_empty() || case.description.trim().is_empty() || case.steps.is_empty() {
        failures.push(format!("{file}: a case needs a name, a description and at least one step"));
    }
    if print {
        println!("{file}: {}", case.name);
    }
    let mut mirror = Mirror::new();
    for (i, step) in case.steps.iter().enumerate() {
        // As the connection does: a message that does not parse is logged and changes nothing.
        let parsed = serde_json::from_str::<ServerMessage>(&step.message);
        if let Ok(message) = &parsed {
            mirror.apply(message);
        }
        let (rev, items) = state(&mirror);
        if print {
            let how = match &parsed {
                Ok(_) => "applied".to_owned(),
                Err(e) => format!("refused: {e}"),
            };
            println!("  step {}: {how}\n    {}", i + 1, expect_json(rev, &items));
        }
        let problems = diff(&step.expect, rev, &items);
        if !problems.is_empty() {
            let mut report = format!("{file} ({}), step {} of {}:\n", case.name, i + 1, case.steps.len());
            let _ = writeln!(report, "    message:  {}", step.message);
            let _ = writeln!(report, "    parsed:   {}", if parsed.is_ok() { "yes (applied)" } else { "no (ignored)" });
            for p in problems {
                let _ = writeln!(report, "    {p}");
            }
            failures.push(report);
        }
    }
    failures
}

#[test]
fn every_conformance_case_passes() {
    let files = files();
    assert!(
        files.len() >= MIN_CASES,
        "{} holds {} case files; the suite has at least {MIN_CASES}",
        dir().display(),
        files.len()
    );
    let print = std::env::var_os("DDP_CONFORMANCE_PRINT").is_some();
    let failures: Vec<String> = files.iter().flat_map(|f| run(f, print)).collect();
    assert!(
        failures.is_empty(),
        "{} failure(s) in {} conformance case files:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
