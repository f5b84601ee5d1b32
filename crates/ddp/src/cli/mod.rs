//! The client subcommands: administration, key-value stores, and following sync streams and
//! events — all over the server's public API.

mod api;
mod fleet;
mod follow;
mod output;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ddp_protocol::Value;
use ddp_protocol::batch::{Op, OpKind};
use ddp_protocol::sync::Item;
use reqwest::{Method, RequestBuilder};
use serde_json::json;

pub use api::Failure;
use api::{Api, etag_rev};
pub use fleet::{Job, job};

/// Where the server is and how to authenticate; shared by every client subcommand.
#[derive(Args, Clone)]
pub struct Connection {
    /// The server's HTTP address.
    #[arg(long, global = true, env = "DDP_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,

    /// The token: the admin key, a project API key or a device key. Without it, the admin key
    /// in ./ddp-data/admin.key (or $DDP_DATA_DIR/admin.key) is used when present.
    #[arg(long, global = true, env = "DDP_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Print JSON (the server's own answers) instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

impl Connection {
    fn api(&self) -> Result<Api, Failure> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let dir = std::env::var_os("DDP_DATA_DIR").map_or_else(|| PathBuf::from("./ddp-data"), PathBuf::from);
                let file = dir.join("admin.key");
                std::fs::read_to_string(&file).map(|k| k.trim().to_owned()).map_err(|_| {
                    Failure::new(format!(
                        "no token: pass --token (or set DDP_TOKEN); {} was not readable",
                        file.display()
                    ))
                })?
            }
        };
        Api::new(&self.server, token)
    }
}

/// `ddp home …`
#[derive(Subcommand)]
pub enum Home {
    /// Create a home.
    #[command(after_help = "Example:\n  ddp home create --name Kitchen")]
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
    },
    /// List homes.
    #[command(after_help = "Example:\n  ddp home list --json")]
    List,
    /// Show a home.
    #[command(after_help = "Example:\n  ddp home show 3")]
    Show {
        /// Home id.
        id: u64,
    },
    /// Delete a home: its devices leave it and its store is deleted.
    #[command(after_help = "Example:\n  ddp home delete 3")]
    Delete {
        /// Home id.
        id: u64,
    },
}

/// `ddp device …`
#[derive(Subcommand)]
pub enum Device {
    /// Create a device; its API key is printed this once.
    #[command(
        after_help = "Examples:\n  ddp device create --name Thermostat --home 3\n  ddp device create --name Sensor --json | jq -r .apiKey"
    )]
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
        /// The home to put it in.
        #[arg(long)]
        home: Option<u64>,
        /// Free-form class.
        #[arg(long)]
        class: Option<String>,
        /// Free-form tag.
        #[arg(long)]
        tag: Option<String>,
    },
    /// List devices, in id order: every device, or those the filters select (every filter given
    /// must hold), a page at a time (100 devices unless --limit says otherwise).
    #[command(
        after_help = "Examples:\n  ddp device list\n  ddp device list --home 3\n  ddp device list --where 'fw<2.1' --class thermostat --connected\n  ddp device list --where 'mode=\"eco\"' --where '!otaUrl' --tag eu --all-pages --json\n  ddp device list --behind --disconnected\n  ddp device list --limit 50 --after 1200"
    )]
    List {
        #[command(flatten)]
        filters: fleet::Filters,
        #[command(flatten)]
        pages: fleet::Pages,
    },
    /// Show a device (a device key may show its own).
    #[command(after_help = "Example:\n  ddp device show 7")]
    Show {
        /// Device id.
        id: u64,
    },
    /// Move a device to another home, or out of any home.
    #[command(after_help = "Examples:\n  ddp device move 7 --home 4\n  ddp device move 7 --no-home")]
    Move {
        /// Device id.
        id: u64,
        /// The new home.
        #[arg(long, conflicts_with = "no_home", required_unless_present = "no_home")]
        home: Option<u64>,
        /// Take it out of its home.
        #[arg(long)]
        no_home: bool,
    },
    /// Give a device a new API key (printed this once); the old one stops working at once.
    #[command(after_help = "Example:\n  ddp device rotate-key 7")]
    RotateKey {
        /// Device id.
        id: u64,
    },
    /// Delete a device and its store.
    #[command(after_help = "Example:\n  ddp device delete 7")]
    Delete {
        /// Device id.
        id: u64,
    },
    /// Where a device's sync stands: its store's rev, the rev delivered to its sessions and the
    /// rev it acknowledged having applied (the admin, a project key that may read it, or the
    /// device itself).
    #[command(after_help = "Examples:\n  ddp device sync 7\n  ddp device sync 7 --json")]
    Sync {
        /// Device id.
        id: u64,
    },
}

/// `ddp apikey …`
#[derive(Subcommand)]
pub enum ApiKey {
    /// Create a project API key for an app; the key is printed this once.
    #[command(
        after_help = "Examples:\n  ddp apikey create --name dashboard --home 3 --home 4 --read-only\n  ddp apikey create --name backend"
    )]
    Create {
        /// Its name.
        #[arg(long)]
        name: String,
        /// A home it may see (repeat for several; none means every home).
        #[arg(long = "home")]
        homes: Vec<u64>,
        /// Read only (default: read and write).
        #[arg(long)]
        read_only: bool,
    },
    /// List project API keys (never their secrets).
    #[command(after_help = "Example:\n  ddp apikey list")]
    List,
    /// Revoke a project API key; it stops working at once.
    #[command(after_help = "Example:\n  ddp apikey revoke 2")]
    Revoke {
        /// Key id.
        id: u64,
    },
}

/// Which store.
#[derive(Args, Clone, Copy)]
#[group(required = true, multiple = false)]
pub struct StoreArg {
    /// A device's store.
    #[arg(long)]
    device: Option<u64>,
    /// A home's store.
    #[arg(long)]
    home: Option<u64>,
}

impl StoreArg {
    fn path(self) -> String {
        match (self.device, self.home) {
            (Some(d), _) => format!("/devices/{d}/kv"),
            (None, Some(h)) => format!("/homes/{h}/kv"),
            (None, None) => "/devices/0/kv".into(),
        }
    }
}

/// `ddp kv …`
#[derive(Subcommand)]
pub enum Kv {
    /// Read a key.
    #[command(after_help = "Examples:\n  ddp kv get --device 7 targetTemp\n  ddp kv get --home 3 mode --json")]
    Get {
        #[command(flatten)]
        store: StoreArg,
        /// The key.
        key: String,
    },
    /// Set a key. VALUE is taken as JSON when it is valid JSON, else as a string.
    #[command(
        after_help = "Examples:\n  ddp kv set --device 7 targetTemp 21.5\n  ddp kv set --device 7 mode eco            # the string \"eco\"\n  ddp kv set --device 7 schedule '{\"on\":\"07:00\"}'\n  ddp kv set --device 7 mode away --if-rev 12\n  ddp kv set --device 7 mode away --wait applied --wait-timeout 30"
    )]
    Set {
        #[command(flatten)]
        store: StoreArg,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Only if the key is still at this rev (else REVISION_MISMATCH).
        #[arg(long)]
        if_rev: Option<u64>,
        /// Then wait until the device has `applied` (acknowledged) or been `delivered` the
        /// change; exits non-zero when it has not within --wait-timeout (the write stands).
        #[arg(long, value_enum, value_name = "WHAT")]
        wait: Option<WaitFor>,
        /// How long --wait waits, in seconds (0–60).
        #[arg(long, default_value_t = 10.0, value_name = "SECONDS", requires = "wait")]
        wait_timeout: f64,
    },
    /// Delete a key.
    #[command(
        after_help = "Examples:\n  ddp kv delete --device 7 mode\n  ddp kv delete --device 7 mode --if-rev 13\n  ddp kv delete --device 7 mode --wait delivered"
    )]
    Delete {
        #[command(flatten)]
        store: StoreArg,
        /// The key.
        key: String,
        /// Only if the key is still at this rev.
        #[arg(long)]
        if_rev: Option<u64>,
        /// Then wait until the device has `applied` (acknowledged) or been `delivered` the
        /// change; exits non-zero when it has not within --wait-timeout (the write stands).
        #[arg(long, value_enum, value_name = "WHAT")]
        wait: Option<WaitFor>,
        /// How long --wait waits, in seconds (0–60).
        #[arg(long, default_value_t = 10.0, value_name = "SECONDS", requires = "wait")]
        wait_timeout: f64,
    },
    /// Change several keys at once: every op or none, with consecutive revs (PROTOCOL.md §11).
    /// VALUEs are JSON when they parse, else strings; --merge takes a JSON object (RFC 7396:
    /// members set to null are removed). Ops go in the order --set, --merge, --delete; to order
    /// them freely (or name a key twice), use `ddp kv apply`.
    #[command(
        after_help = "Examples:\n  ddp kv patch --device 7 --set ssid=home --set password=s3cret\n  ddp kv patch --device 7 --merge 'net={\"dhcp\":true,\"dns\":null}' --delete oldNet\n  ddp kv patch --device 7 --set mode=eco --if-store-rev 41 --wait applied"
    )]
    Patch {
        #[command(flatten)]
        store: StoreArg,
        /// Set KEY to VALUE; repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Merge a JSON object into KEY's value; repeatable.
        #[arg(long = "merge", value_name = "KEY=JSON")]
        merges: Vec<String>,
        /// Delete KEY (it must exist); repeatable.
        #[arg(long = "delete", value_name = "KEY")]
        deletes: Vec<String>,
        #[command(flatten)]
        batch: BatchArgs,
    },
    /// Apply a file of ops as one atomic batch: `{"ops":[…]}` or just the array, each op
    /// `{"op":"set"|"delete"|"merge","key",…,"ifRev"?}`, in the order given (`-` reads stdin).
    #[command(
        after_help = "Examples:\n  ddp kv apply --device 7 wifi.json\n  echo '[{\"op\":\"set\",\"key\":\"mode\",\"value\":\"eco\"}]' | ddp kv apply --device 7 -"
    )]
    Apply {
        #[command(flatten)]
        store: StoreArg,
        /// The file (`-`: standard input).
        file: std::path::PathBuf,
        #[command(flatten)]
        batch: BatchArgs,
    },
    /// List a store's keys.
    #[command(after_help = "Examples:\n  ddp kv list --device 7\n  ddp kv list --home 3 --prefix zone:")]
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// What a batch is conditional on and waits for.
#[derive(Args)]
pub struct BatchArgs {
    /// Only if the store is still at this rev (else REVISION_MISMATCH and nothing changes).
    #[arg(long, value_name = "REV")]
    if_store_rev: Option<u64>,
    /// Then wait until the device has `applied` (acknowledged) or been `delivered` the batch;
    /// exits non-zero when it has not within --wait-timeout (the batch stands).
    #[arg(long, value_enum, value_name = "WHAT")]
    wait: Option<WaitFor>,
    /// How long --wait waits, in seconds (0–60).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", requires = "wait")]
    wait_timeout: f64,
}

/// The ops of `ddp kv patch` (and `ddp job create`), in the order --set, --merge, --delete;
/// `instead` says how to give ops in an order of one's own.
fn patch_ops(sets: &[String], merges: &[String], deletes: &[String], instead: &str) -> Result<Vec<Op>, Failure> {
    let key = |flag: &str, text: &str| {
        ddp_protocol::Key::new(text).map_err(|e| Failure::new(format!("--{flag}: {text:?} is not a key: {e}")))
    };
    let split = |flag: &str, text: &str| -> Result<(ddp_protocol::Key, String), Failure> {
        let (k, v) = text.split_once('=').ok_or_else(|| Failure::new(format!("--{flag} {text:?} is not KEY=VALUE")))?;
        Ok((key(flag, k)?, v.to_owned()))
    };
    let mut ops = Vec::new();
    for text in sets {
        let (key, value) = split("set", text)?;
        ops.push((Op { key, kind: OpKind::Set(parse_value(&value)?), if_rev: None }, "set"));
    }
    for text in merges {
        let (key, patch) = split("merge", text)?;
        let patch = Value::parse(&patch).map_err(|e| Failure::new(format!("--merge {key}=…: not JSON: {e}")))?;
        if !patch.is_object() {
            return Err(Failure::new(format!(
                "--merge {key}=…: a merge patch is a JSON object, like '{{\"on\":true}}'"
            )));
        }
        ops.push((Op { key, kind: OpKind::Merge(patch), if_rev: None }, "merge"));
    }
    for text in deletes {
        ops.push((Op { key: key("delete", text)?, kind: OpKind::Delete, if_rev: None }, "delete"));
    }
    for (i, (op, flag)) in ops.iter().enumerate() {
        if let Some((_, other)) = ops[..i].iter().find(|(o, f)| o.key == op.key && f != flag) {
            return Err(Failure::new(format!(
                "{} is named by --{other} and --{flag}: their order would be a guess; {instead}",
                op.key
            )));
        }
    }
    if ops.is_empty() {
        return Err(Failure::new("nothing to do: give --set, --merge or --delete"));
    }
    Ok(ops.into_iter().map(|(op, _)| op).collect())
}

/// A file's text (`-`: standard input).
fn read_input(file: &std::path::Path) -> Result<String, Failure> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| Failure::new(format!("cannot read stdin: {e}")))
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::new(format!("cannot read {}: {e}", file.display())))
    }
}

/// The ops array's text of `text`, which is `{"ops":[…]}` or just the array (`origin` names it
/// in errors). Kept as text: values travel exactly as written.
fn ops_text(text: &str, origin: &str) -> Result<String, Failure> {
    #[derive(serde::Deserialize)]
    struct Doc<'a> {
        #[serde(borrow)]
        ops: &'a serde_json::value::RawValue,
    }
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return Ok(trimmed.trim_end().to_owned());
    }
    let doc: Doc<'_> = serde_json::from_str(text)
        .map_err(|e| Failure::new(format!("{origin} is not {{\"ops\":[…]}} or an array of ops: {e}")))?;
    Ok(doc.ops.get().to_owned())
}

/// Sends `ops` (a JSON array's text) as one batch and reports the outcome.
async fn send_batch(conn: &Connection, api: &Api, store: StoreArg, ops: &str, batch: BatchArgs) -> Result<(), Failure> {
    let waiting = Waiting::of(store, batch.wait, batch.wait_timeout)?;
    let request = api
        .request(Method::PATCH, &store.path())
        .header("Content-Type", "application/json")
        .body(format!("{{\"ops\":{ops}}}"));
    let request = conditional(request, batch.if_store_rev, waiting.as_ref());
    let started = std::time::Instant::now();
    let body = api.json(request).await?;
    let rev = body["rev"].as_u64().unwrap_or_default();
    let results = body["results"].as_array().cloned().unwrap_or_default();
    if conn.json {
        println!("{body}");
        let confirmed = waiting.as_ref().is_none_or(|w| body[w.what.as_str()] == true);
        if !confirmed {
            return Err(Failure::new(format!("the device had not confirmed rev {rev} in time; the batch stands")));
        }
        return Ok(());
    }
    for r in &results {
        println!("rev {:<6} {}", r["rev"].as_u64().unwrap_or_default(), output::cell(&r["key"]));
    }
    let done = format!("applied {} ops at once", results.len());
    let written = Written { rev, waited: waiting.as_ref().map(|_| body.clone()) };
    report(conn, api, "", &done, written, waiting.as_ref(), started).await
}

/// What a write waits for (PROTOCOL.md §10).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitFor {
    /// The device acknowledged having applied it.
    Applied,
    /// A session of the device was handed it.
    Delivered,
}

impl WaitFor {
    const fn as_str(self) -> &'static str {
        match self {
            WaitFor::Applied => "applied",
            WaitFor::Delivered => "delivered",
        }
    }
}

/// `ddp command …`
#[derive(Subcommand)]
pub enum CommandCmd {
    /// Send a device a command (admin key or a read-write project key). Commands are not stored:
    /// a device with no live session is refused (DEVICE_OFFLINE).
    #[command(
        after_help = "Examples:\n  ddp command send --device 7 reboot\n  ddp command send --device 7 setLevel --param level=3 --param unit=percent\n  ddp command send --device 7 schedule --parameters '{\"on\":\"07:00\",\"days\":[1,2,3]}'"
    )]
    Send {
        /// The device.
        #[arg(long)]
        device: u64,
        /// The command's action.
        action: String,
        /// A parameter, KEY=VALUE (VALUE is JSON when it parses, else a string); repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// All parameters as one JSON object (instead of --param).
        #[arg(long, conflicts_with = "params")]
        parameters: Option<String>,
    },
}

pub async fn command(conn: &Connection, command: CommandCmd) -> Result<(), Failure> {
    let api = conn.api()?;
    match command {
        CommandCmd::Send { device, action, params, parameters } => {
            let parameters = match parameters {
                Some(text) => {
                    let value =
                        Value::parse(&text).map_err(|e| Failure::new(format!("--parameters is not JSON: {e}")))?;
                    if !value.as_json().starts_with('{') {
                        return Err(Failure::new("--parameters must be a JSON object, like '{\"level\":3}'"));
                    }
                    value.as_json().to_owned()
                }
                None => {
                    let mut fields = Vec::with_capacity(params.len());
                    for p in &params {
                        let Some((key, value)) = p.split_once('=') else {
                            return Err(Failure::new(format!("--param {p:?} is not KEY=VALUE")));
                        };
                        let key = serde_json::Value::String(key.to_owned()).to_string();
                        fields.push(format!("{key}:{}", parse_value(value)?.as_json()));
                    }
                    format!("{{{}}}", fields.join(","))
                }
            };
            let action_json = serde_json::Value::String(action.clone()).to_string();
            let body = format!(r#"{{"action":{action_json},"parameters":{parameters}}}"#);
            api.send(
                api.request(Method::PUT, &format!("/devices/{device}/command"))
                    .header("Content-Type", "application/json")
                    .body(body),
            )
            .await?;
            if conn.json {
                output::json(&json!({ "deviceId": device, "action": action, "sent": true }));
            } else {
                println!("sent {action} to device {device}");
            }
        }
    }
    Ok(())
}

/// What a VALUE argument means: JSON when it parses, else a string.
pub fn parse_value(text: &str) -> Result<Value, Failure> {
    if let Ok(value) = Value::parse(text) {
        return Ok(value);
    }
    let quoted = serde_json::Value::String(text.to_owned()).to_string();
    Value::parse(&quoted).map_err(|e| Failure::new(format!("cannot use {text:?} as a value: {e}")))
}

pub async fn home(conn: &Connection, command: Home) -> Result<(), Failure> {
    let api = conn.api()?;
    match command {
        Home::Create { name } => {
            let home = api.json(api.request(Method::POST, "/homes").json(&json!({ "name": name }))).await?;
            if conn.json {
                output::json(&home);
            } else {
                println!("created home {} ({})", home["id"], output::cell(&home["name"]));
            }
        }
        Home::List => {
            let homes = api.json(api.request(Method::GET, "/homes")).await?;
            output::list(conn.json, &homes, &["ID", "NAME", "CREATED"], |h| {
                vec![output::cell(&h["id"]), output::cell(&h["name"]), output::cell(&h["creationTime"])]
            });
        }
        Home::Show { id } => {
            let home = api.json(api.request(Method::GET, &format!("/homes/{id}"))).await?;
            if conn.json {
                output::json(&home);
            } else {
                output::fields(&home, &[("id", "id"), ("name", "name"), ("creationTime", "created")]);
            }
        }
        Home::Delete { id } => {
            api.send(api.request(Method::DELETE, &format!("/homes/{id}"))).await?;
            if !conn.json {
                println!("deleted home {id}");
            }
        }
    }
    Ok(())
}

const DEVICE_FIELDS: &[(&str, &str)] = &[
    ("id", "id"),
    ("name", "name"),
    ("homeId", "home"),
    ("deviceClass", "class"),
    ("tag", "tag"),
    ("isConnected", "connected"),
    ("lastConnectTime", "last connect"),
    ("lastDisconnectTime", "last disconnect"),
    ("creationTime", "created"),
];

pub async fn device(conn: &Connection, command: Device) -> Result<(), Failure> {
    let api = conn.api()?;
    match command {
        Device::Create { name, home, class, tag } => {
            let mut body = json!({ "name": name });
            if let Some(h) = home {
                body["homeId"] = json!(h);
            }
            if let Some(c) = class {
                body["deviceClass"] = json!(c);
            }
            if let Some(t) = tag {
                body["tag"] = json!(t);
            }
            let device = api.json(api.request(Method::POST, "/devices").json(&body)).await?;
            if conn.json {
                output::json(&device);
            } else {
                println!("created device {} ({})", device["id"], output::cell(&device["name"]));
                println!("API key (shown only now): {}", output::cell(&device["apiKey"]));
            }
        }
        Device::List { filters, pages } => fleet::list_devices(conn, &api, &filters, &pages).await?,
        Device::Show { id } => {
            let device = api.json(api.request(Method::GET, &format!("/devices/{id}"))).await?;
            if conn.json {
                output::json(&device);
            } else {
                output::fields(&device, DEVICE_FIELDS);
            }
        }
        Device::Move { id, home, no_home } => {
            let body = if no_home { json!({ "homeId": null }) } else { json!({ "homeId": home }) };
            let device = api.json(api.request(Method::PATCH, &format!("/devices/{id}")).json(&body)).await?;
            if conn.json {
                output::json(&device);
            } else if device["homeId"].is_null() {
                println!("device {id} is in no home now");
            } else {
                println!("device {id} is in home {} now", device["homeId"]);
            }
        }
        Device::RotateKey { id } => {
            let answer = api.json(api.request(Method::POST, &format!("/devices/{id}/apiKey"))).await?;
            if conn.json {
                output::json(&answer);
            } else {
                println!("new API key for device {id} (shown only now; the old one no longer works):");
                println!("{}", output::cell(&answer["apiKey"]));
            }
        }
        Device::Delete { id } => {
            api.send(api.request(Method::DELETE, &format!("/devices/{id}"))).await?;
            if !conn.json {
                println!("deleted device {id}");
            }
        }
        Device::Sync { id } => {
            let sync = api.json(api.request(Method::GET, &format!("/devices/{id}/sync"))).await?;
            if conn.json {
                output::json(&sync);
            } else {
                output::fields(&sync, SYNC_FIELDS);
                let (rev, applied) = (sync["rev"].as_u64().unwrap_or(0), sync["appliedRev"].as_u64().unwrap_or(0));
                if applied >= rev {
                    println!("the device has applied its whole store");
                } else {
                    println!("the device has not acknowledged the last {} change(s)", rev - applied);
                }
            }
        }
    }
    Ok(())
}

const SYNC_FIELDS: &[(&str, &str)] = &[
    ("rev", "store rev"),
    ("deliveredRev", "delivered rev"),
    ("appliedRev", "applied rev"),
    ("appliedTime", "applied at"),
    ("isConnected", "connected"),
];

pub async fn apikey(conn: &Connection, command: ApiKey) -> Result<(), Failure> {
    let api = conn.api()?;
    match command {
        ApiKey::Create { name, homes, read_only } => {
            let mut body = json!({ "name": name, "permission": if read_only { "read" } else { "readWrite" } });
            if !homes.is_empty() {
                body["homes"] = json!(homes);
            }
            let key = api.json(api.request(Method::POST, "/apiKeys").json(&body)).await?;
            if conn.json {
                output::json(&key);
            } else {
                println!(
                    "created API key {} ({}, {})",
                    key["id"],
                    output::cell(&key["name"]),
                    output::cell(&key["permission"])
                );
                println!("key (shown only now): {}", output::cell(&key["key"]));
            }
        }
        ApiKey::List => {
            let keys = api.json(api.request(Method::GET, "/apiKeys")).await?;
            output::list(conn.json, &keys, &["ID", "NAME", "PERMISSION", "HOMES"], |k| {
                let homes = if k["homes"].is_null() { "all".into() } else { output::cell(&k["homes"]) };
                vec![output::cell(&k["id"]), output::cell(&k["name"]), output::cell(&k["permission"]), homes]
            });
        }
        ApiKey::Revoke { id } => {
            api.send(api.request(Method::DELETE, &format!("/apiKeys/{id}"))).await?;
            if !conn.json {
                println!("revoked API key {id}");
            }
        }
    }
    Ok(())
}

fn key_path(store: StoreArg, key: &str) -> Result<String, Failure> {
    ddp_protocol::Key::validate(key)
        .map_err(|e| Failure { reason: Some("INVALID_KEY".into()), message: e.to_string() })?;
    Ok(format!("{}/{key}", store.path()))
}

/// A write's `--wait`, `--wait-timeout`.
struct Waiting {
    what: WaitFor,
    seconds: f64,
    device: u64,
}

impl Waiting {
    fn of(store: StoreArg, wait: Option<WaitFor>, seconds: f64) -> Result<Option<Waiting>, Failure> {
        let Some(what) = wait else { return Ok(None) };
        let Some(device) = store.device else {
            return Err(Failure::new("--wait is for device stores (--device): a home has no device to confirm"));
        };
        if !(0.0..=60.0).contains(&seconds) {
            return Err(Failure::new(format!("--wait-timeout must be 0–60 seconds, got {seconds}")));
        }
        Ok(Some(Waiting { what, seconds, device }))
    }
}

/// A committed write: its rev, and the server's answer to `--wait` when it waited.
struct Written {
    rev: u64,
    waited: Option<serde_json::Value>,
}

/// `request` with `If-Match: "<rev>"` when `if_rev` is given and `?wait=` with `--wait`.
fn conditional(mut request: RequestBuilder, if_rev: Option<u64>, waiting: Option<&Waiting>) -> RequestBuilder {
    if let Some(rev) = if_rev {
        request = request.header("If-Match", format!("\"{rev}\""));
    }
    if let Some(w) = waiting {
        request = request.query(&[("wait", w.what.as_str().to_owned()), ("waitTimeout", w.seconds.to_string())]);
    }
    request
}

/// Sends a key-value write, with `If-Match` when `--if-rev` was given and `?wait=` with
/// `--wait`.
async fn write(
    api: &Api,
    request: RequestBuilder,
    if_rev: Option<u64>,
    waiting: Option<&Waiting>,
) -> Result<Written, Failure> {
    let response = api.send(conditional(request, if_rev, waiting)).await?;
    let rev = etag_rev(&response).unwrap_or_default();
    let waited = match waiting {
        None => None,
        Some(_) => Some(
            response.json::<serde_json::Value>().await.map_err(|e| Failure::new(format!("unexpected answer: {e}")))?,
        ),
    };
    Ok(Written { rev, waited })
}

/// Reports what `--wait` found (`done`: what the write did, e.g. "set mode = 3"); a device that
/// did not confirm in time is a failure (the write stands).
async fn report(
    conn: &Connection,
    api: &Api,
    key: &str,
    done: &str,
    written: Written,
    waiting: Option<&Waiting>,
    started: std::time::Instant,
) -> Result<(), Failure> {
    let (Some(body), Some(w)) = (written.waited, waiting) else {
        if conn.json {
            println!("{}", json!({ "key": key, "rev": written.rev }));
        } else {
            println!("{done} at rev {}", written.rev);
        }
        return Ok(());
    };
    let what = w.what.as_str();
    let confirmed = body[what] == true;
    let reached = &body[if w.what == WaitFor::Applied { "appliedRev" } else { "deliveredRev" }];
    if conn.json {
        let mut body = body.clone();
        body["key"] = json!(key);
        println!("{body}");
    } else if confirmed {
        let took = started.elapsed().as_secs_f64();
        let at = match w.what {
            WaitFor::Applied => {
                match api.json(api.request(Method::GET, &format!("/devices/{}/sync", w.device))).await {
                    Ok(sync) => format!(" at {}", output::cell(&sync["appliedTime"])),
                    Err(_) => String::new(),
                }
            }
            WaitFor::Delivered => String::new(),
        };
        println!("{done} at rev {}; device {} {what} it within {took:.2} s{at}", written.rev, w.device);
    } else {
        println!("{done} at rev {}", written.rev);
    }
    if confirmed {
        return Ok(());
    }
    Err(Failure::new(format!(
        "device {} had not {what} rev {} within {} s (it is at rev {reached}); the write stands",
        w.device, written.rev, w.seconds
    )))
}

pub async fn kv(conn: &Connection, command: Kv) -> Result<(), Failure> {
    let api = conn.api()?;
    match command {
        Kv::Get { store, key } => {
            let response = api.send(api.request(Method::GET, &key_path(store, &key)?)).await?;
            let rev = etag_rev(&response);
            let text = response.text().await.map_err(|e| Failure::new(format!("cannot read the answer: {e}")))?;
            if conn.json {
                println!("{text}");
            } else {
                let item: Item =
                    serde_json::from_str(&text).map_err(|e| Failure::new(format!("unexpected answer: {e}")))?;
                println!("{}", item.value.as_json());
                eprintln!("(rev {}, modified {})", rev.unwrap_or_default(), item.modification_time);
            }
        }
        Kv::Set { store, key, value, if_rev, wait, wait_timeout } => {
            let waiting = Waiting::of(store, wait, wait_timeout)?;
            let value = parse_value(&value)?;
            let body = format!("{{\"value\":{}}}", value.as_json());
            let request =
                api.request(Method::PUT, &key_path(store, &key)?).header("Content-Type", "application/json").body(body);
            let started = std::time::Instant::now();
            let written = write(&api, request, if_rev, waiting.as_ref()).await?;
            let done = format!("set {key} = {}", value.as_json());
            report(conn, &api, &key, &done, written, waiting.as_ref(), started).await?;
        }
        Kv::Delete { store, key, if_rev, wait, wait_timeout } => {
            let waiting = Waiting::of(store, wait, wait_timeout)?;
            let request = api.request(Method::DELETE, &key_path(store, &key)?);
            let started = std::time::Instant::now();
            let written = write(&api, request, if_rev, waiting.as_ref()).await?;
            report(conn, &api, &key, &format!("deleted {key}"), written, waiting.as_ref(), started).await?;
        }
        Kv::Patch { store, sets, merges, deletes, batch } => {
            let ops = patch_ops(&sets, &merges, &deletes, "use `ddp kv apply` with a file")?;
            send_batch(conn, &api, store, &Op::list_json(&ops), batch).await?;
        }
        Kv::Apply { store, file, batch } => {
            let ops = ops_text(&read_input(&file)?, &file.display().to_string())?;
            send_batch(conn, &api, store, &ops, batch).await?;
        }
        Kv::List { store, prefix } => {
            let mut request = api.request(Method::GET, &store.path());
            if let Some(p) = &prefix {
                request = request.query(&[("keyPrefix", p)]);
            }
            let response = api.send(request).await?;
            let rev = etag_rev(&response).unwrap_or_default();
            let text = response.text().await.map_err(|e| Failure::new(format!("cannot read the answer: {e}")))?;
            if conn.json {
                println!("{text}");
            } else {
                let items: Vec<Item> =
                    serde_json::from_str(&text).map_err(|e| Failure::new(format!("unexpected answer: {e}")))?;
                let rows: Vec<Vec<String>> = items
                    .iter()
                    .map(|i| vec![i.key.to_string(), i.value.as_json().to_owned(), i.modification_time.to_string()])
                    .collect();
                output::table(&["KEY", "VALUE", "MODIFIED"], &rows);
                println!("({} keys, store at rev {rev})", items.len());
            }
        }
    }
    Ok(())
}

/// `ddp watch`
#[derive(Args)]
#[command(
    after_help = "Examples:\n  ddp watch --device 7 --token ddpd_…\n  ddp watch --device 7 --since-rev 120 --json"
)]
pub struct WatchArgs {
    /// The device whose store to follow.
    #[arg(long)]
    device: u64,
    /// Resume after this rev (only the changes since are sent, when the server still has them).
    #[arg(long)]
    since_rev: Option<u64>,
}

/// `ddp events`
#[derive(Args)]
#[command(after_help = "Examples:\n  ddp events\n  ddp events --home 3 --json")]
pub struct EventsArgs {
    /// Only this home's events (repeat for several).
    #[arg(long = "home")]
    homes: Vec<u64>,
}

pub async fn watch(conn: &Connection, args: WatchArgs) -> Result<(), Failure> {
    let api = conn.api()?;
    let query = args.since_rev.map(|r| format!("?sinceRev={r}")).unwrap_or_default();
    follow::follow(&api, &format!("/devices/{}/kv{query}", args.device), conn.json, follow::print_sync).await
}

pub async fn events(conn: &Connection, args: EventsArgs) -> Result<(), Failure> {
    let api = conn.api()?;
    let query = if args.homes.is_empty() {
        String::new()
    } else {
        format!("?homeId={}", args.homes.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
    };
    follow::follow(&api, &format!("/events/websocket{query}"), conn.json, follow::print_event).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_when_they_parse_else_strings() {
        let v = |t: &str| parse_value(t).map(|v| v.as_json().to_owned()).unwrap_or_default();
        assert_eq!(v("21.50"), "21.50");
        assert_eq!(v("true"), "true");
        assert_eq!(v(r#"{"a":[1]}"#), r#"{"a":[1]}"#);
        assert_eq!(v("eco"), r#""eco""#);
        assert_eq!(v("null"), r#""null""#, "null is not a value, so it is the string");
        assert_eq!(v(r#"say "hi""#), r#""say \"hi\"""#);
        assert_eq!(v(""), r#""""#);
    }
}
