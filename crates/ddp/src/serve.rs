//! `ddp serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ddp_server::{Config, History, HttpSettings, Limits, MqttSettings, RateLimits, Server, SessionLimits, TlsSettings};

/// Log output format.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Args)]
#[command(after_help = "Examples:
  ddp serve
  ddp serve --data-dir /var/lib/ddp --http-listen 0.0.0.0:8080 --mqtt-listen 0.0.0.0:1883 --log-format json
  ddp serve --https-listen 0.0.0.0:8443 --mqtt-tls-listen 0.0.0.0:8883 --tls-cert cert.pem --tls-key key.pem
  DDP_ADMIN_KEY=$(cat admin.key) ddp serve
  ddp serve --database postgres://ddp:secret@db.internal:5432/ddp --node-name node-a --http-listen 0.0.0.0:8080

Storage: by default an embedded SQLite database in --data-dir (one node). With --database, every
node started on the same PostgreSQL database serves the same data; put a load balancer in front.")]
pub struct ServeArgs {
    /// Directory for the database, the generated admin key and the lock file (created if missing).
    #[arg(long, env = "DDP_DATA_DIR", default_value = "./ddp-data")]
    data_dir: PathBuf,

    /// PostgreSQL URL (e.g. postgres://user:password@host:5432/db): store everything there, so
    /// several nodes can serve the same data. The schema is created or migrated at start. Without
    /// it, the embedded SQLite database in --data-dir is used.
    #[arg(long, env = "DDP_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,

    /// Most pooled connections to PostgreSQL (each node also holds one for its change feed).
    #[arg(long, env = "DDP_DB_POOL_SIZE", default_value_t = 32)]
    db_pool_size: usize,

    /// This node's name, in logs and in PostgreSQL's pg_stat_activity.
    #[arg(long, env = "DDP_NODE_NAME", default_value = "ddp")]
    node_name: String,

    /// Address for the REST and WebSocket API.
    #[arg(long, env = "DDP_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,

    /// Address for the same API over TLS (REST, every WebSocket, MQTT over WebSocket at /mqtt),
    /// e.g. 0.0.0.0:8443, or `off`; needs --tls-cert and --tls-key.
    #[arg(long, env = "DDP_HTTPS_LISTEN", default_value = "off", value_parser = parse_listen)]
    https_listen: Listen,

    /// Address for MQTT devices (MQTT 3.1.1 and 5), or `off`.
    #[arg(long, env = "DDP_MQTT_LISTEN", default_value = "127.0.0.1:1883", value_parser = parse_listen)]
    mqtt_listen: Listen,

    /// Address for MQTT over TLS (e.g. 0.0.0.0:8883), or `off`; needs --tls-cert and --tls-key.
    #[arg(long, env = "DDP_MQTT_TLS_LISTEN", default_value = "off", value_parser = parse_listen)]
    mqtt_tls_listen: Listen,

    /// Address for MQTT over WebSocket on a listener of its own, any path (e.g. 0.0.0.0:8081), or
    /// `off`. The HTTP listener always serves it at /mqtt.
    #[arg(long, env = "DDP_MQTT_WS_LISTEN", default_value = "off", value_parser = parse_listen)]
    mqtt_ws_listen: Listen,

    /// PEM certificate chain for the TLS listeners (--https-listen, --mqtt-tls-listen). A
    /// renewed file is picked up without a restart (see --tls-reload-every; also on SIGHUP).
    #[arg(long, env = "DDP_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for the TLS listeners.
    #[arg(long, env = "DDP_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// How often the TLS files are checked for a renewal (e.g. 10s, 1m); SIGHUP reads them at once.
    #[arg(long, env = "DDP_TLS_RELOAD_EVERY", default_value = "10s", value_parser = parse_duration)]
    tls_reload_every: Duration,

    /// Largest MQTT packet accepted, in bytes; a larger one closes the connection.
    #[arg(long, env = "DDP_MQTT_MAX_PACKET", default_value_t = MqttSettings::default().max_packet)]
    mqtt_max_packet: usize,

    /// The admin key (16+ characters). Without it the key stored in the data directory is used,
    /// or on first start a new one is generated, stored there (mode 0600) and printed once. With
    /// --database, the first node generates it, prints it once and stores its digest in the
    /// database for every node.
    #[arg(long, env = "DDP_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,

    /// Log format.
    #[arg(long, env = "DDP_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Log filter: a level (error, warn, info, debug, trace) or per-module directives such as
    /// `info,ddp_server=debug`.
    #[arg(long, env = "DDP_LOG", default_value = "info")]
    log: String,

    /// Largest value in bytes of JSON text; larger writes get 413 VALUE_TOO_LARGE.
    #[arg(long, env = "DDP_MAX_VALUE_BYTES", default_value_t = Limits::default().max_value_bytes)]
    max_value_bytes: usize,

    /// Most keys per store; a write of a new key beyond it gets 413 TOO_MANY_KEYS.
    #[arg(long, env = "DDP_MAX_KEYS_PER_STORE", default_value_t = Limits::default().max_keys_per_store)]
    max_keys_per_store: usize,

    /// Largest HTTP request body in bytes; larger bodies get 413 PAYLOAD_TOO_LARGE.
    #[arg(long, env = "DDP_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,

    /// Most ops in one atomic batch (PATCH …/kv, a device's batch frame); more get 413 PAYLOAD_TOO_LARGE.
    #[arg(long, env = "DDP_MAX_BATCH_OPS", default_value_t = Limits::default().max_batch_ops)]
    max_batch_ops: usize,

    /// Requests per second allowed to each device key (bursts of twice that); 0 = unlimited.
    /// Over it: 429 RATE_LIMIT_EXCEEDED with Retry-After.
    #[arg(long, env = "DDP_DEVICE_RATE_LIMIT", default_value_t = RateLimits::default().device_per_sec)]
    device_rate_limit: u32,

    /// Requests per second allowed to each project API key (bursts of twice that); 0 = unlimited.
    #[arg(long, env = "DDP_PROJECT_RATE_LIMIT", default_value_t = RateLimits::default().project_per_sec)]
    project_rate_limit: u32,

    /// Changes each store keeps for resuming sessions, whatever their age.
    #[arg(long, env = "DDP_HISTORY_CHANGES", default_value_t = History::default().keep_changes)]
    history_changes: u64,

    /// Age below which changes are kept for resuming sessions, whatever their number
    /// (e.g. 90s, 30m, 24h, 7d).
    #[arg(long, env = "DDP_HISTORY_AGE", default_value = "24h", value_parser = parse_duration)]
    history_age: Duration,

    /// Read connections to the embedded SQLite database.
    #[arg(long, env = "DDP_DB_READERS", default_value_t = 4)]
    db_readers: usize,

    /// Keys whose values fleet queries read from an index (`GET /devices?where=fw<2.1`, job
    /// selections), comma-separated, or `*` for every key. Each write of such a key also updates
    /// the index, so name the keys fleets are queried by (firmware, serial, model), not telemetry.
    /// Conditions on other keys still work, probing devices one by one in id order. Changing the
    /// list rebuilds the index at start-up; give every node the same list.
    #[arg(long, env = "DDP_INDEX_KEYS", default_value = "", value_parser = parse_index_keys)]
    index_keys: ddp_server::ValueIndex,

    /// An origin whose web pages may call the API from a browser (CORS), as
    /// `scheme://host[:port]`, e.g. https://app.example.com; repeat it (or separate with
    /// commas) for several, or give `*` for any. Preflights are answered and every answer,
    /// errors included, carries the headers. Default: none (the console at /console/ is on the
    /// server's own origin and needs none)
    #[arg(long = "cors-origin", env = "DDP_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,

    /// Live sync sessions (WebSocket and MQTT) one device key may hold at once; the next one is
    /// refused (429 TOO_MANY_CONNECTIONS).
    #[arg(long, env = "DDP_MAX_SESSIONS_PER_DEVICE", default_value_t = SessionLimits::default().max_per_device)]
    max_sessions_per_device: usize,

    /// Changes queued for a session that is not keeping up before it is given a fresh reload
    /// instead (writers never wait for a slow device).
    #[arg(long, env = "DDP_SESSION_QUEUE", default_value_t = SessionLimits::default().mailbox)]
    session_queue: usize,

    /// The server pings WebSocket peers this often and closes those silent for twice as long
    /// (e.g. 30s, 2m).
    #[arg(long, env = "DDP_WS_IDLE", default_value = "30s", value_parser = parse_duration)]
    ws_idle: Duration,

    /// Once the first byte of an HTTP request arrives, its head must be complete within this
    /// (slow or trickling clients are closed).
    #[arg(long, env = "DDP_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    http_header_timeout: Duration,

    /// An HTTP connection with no request in progress (new, between keep-alive requests, or not
    /// reading its response) is closed after this.
    #[arg(long, env = "DDP_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    http_idle_timeout: Duration,

    /// A request body must arrive within this, else 408 REQUEST_TIMEOUT.
    #[arg(long, env = "DDP_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    http_body_timeout: Duration,

    /// Most connections each listener (HTTP, MQTT, MQTT over TLS) holds at once. Default: the
    /// open-file limit (raised to its hard maximum at start) minus room for the database, which
    /// all listeners also share. At the cap the oldest connection that has not authenticated is
    /// closed to make room.
    #[arg(long, env = "DDP_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
}

/// A listen address, or `off`.
#[derive(Clone, Copy)]
pub struct Listen(Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<Listen, String> {
    if text.eq_ignore_ascii_case("off") || text.is_empty() {
        return Ok(Listen(None));
    }
    text.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:1883, nor `off`"))
}

/// `90s`, `30m`, `24h`, `7d`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 90s, 30m, 24h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use s, m, h or d")),
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).with_context(|| format!("bad --log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format, &args.log)?;
    let mut config = Config::new(&args.data_dir, args.http_listen);
    config.admin_key = args.admin_key;
    config.database = args.database.filter(|url| !url.trim().is_empty());
    config.db_pool = args.db_pool_size;
    config.node_name = args.node_name;
    config.limits = Limits {
        max_value_bytes: args.max_value_bytes,
        max_keys_per_store: args.max_keys_per_store,
        max_body_bytes: args.max_body_bytes,
        max_batch_ops: args.max_batch_ops,
    };
    config.rate_limits =
        RateLimits { device_per_sec: args.device_rate_limit, project_per_sec: args.project_rate_limit };
    config.history = History { keep_changes: args.history_changes, keep_age: args.history_age, ..History::default() };
    config.db_readers = args.db_readers;
    config.index_keys = args.index_keys;
    config.cors_origins = args.cors_origins;
    config.mqtt = MqttSettings {
        listen: args.mqtt_listen.0,
        tls_listen: args.mqtt_tls_listen.0,
        ws_listen: args.mqtt_ws_listen.0,
        max_packet: args.mqtt_max_packet,
        ..MqttSettings::default()
    };
    config.https_listen = args.https_listen.0;
    config.tls = TlsSettings { cert: args.tls_cert, key: args.tls_key, reload_every: args.tls_reload_every };
    config.http = HttpSettings {
        header_timeout: args.http_header_timeout,
        idle_timeout: args.http_idle_timeout,
        body_timeout: args.http_body_timeout,
    };
    config.max_connections = args.max_connections;
    raise_open_file_limit();
    config.sessions = SessionLimits {
        max_per_device: args.max_sessions_per_device,
        mailbox: args.session_queue,
        idle: args.ws_idle,
        ..SessionLimits::default()
    };

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(config).await?;
        if let (Some(place), Some(key)) = (server.admin_key_created(), server.admin_key()) {
            println!("Generated an admin key and stored it in {place}:");
            println!();
            println!("    {key}");
            println!();
            println!(
                "Use it as a token, e.g.:  curl -H 'Authorization: ModeCloud {key}' http://{}/homes",
                server.http_addr()
            );
            println!("It is not printed again.");
        }
        server.run(shutdown_signal()).await.context("the HTTP server failed")
    })
}

/// Raises the process's soft open-file limit to its hard limit: every connection is a file, and
/// the connection caps are derived from this limit.
fn raise_open_file_limit() {
    let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else { return };
    if soft < hard {
        match rlimit::increase_nofile_limit(hard) {
            Ok(now) => tracing::info!(from = soft, to = now, "raised the open-file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

fn parse_index_keys(text: &str) -> Result<ddp_server::ValueIndex, String> {
    ddp_server::ValueIndex::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
