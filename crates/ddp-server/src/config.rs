//! Server settings. The binary fills these from flags and `DDP_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `ddp serve` can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for the embedded database, the admin key and the lock file (unused with
    /// PostgreSQL).
    pub data_dir: PathBuf,
    /// A PostgreSQL URL: store everything there, so several nodes can share it. `None`: the
    /// embedded SQLite database in `data_dir`.
    pub database: Option<String>,
    /// Most pooled PostgreSQL connections.
    pub db_pool: usize,
    /// This node's name (in logs, `pg_stat_activity` and the database's node table).
    pub node_name: String,
    /// Where the REST and WebSocket API listens.
    pub http_listen: SocketAddr,
    /// The same API over TLS (`None`: off); needs `tls`.
    pub https_listen: Option<SocketAddr>,
    /// The certificate and key of the TLS listeners (HTTPS and MQTT over TLS).
    pub tls: TlsSettings,
    /// The admin key; `None` reads (or on first start generates) `admin.key` in the data
    /// directory, or with PostgreSQL the key digest stored in the database.
    pub admin_key: Option<String>,
    /// Size and count limits.
    pub limits: Limits,
    /// Request rates per key.
    pub rate_limits: RateLimits,
    /// How much change history each store keeps for resuming sessions.
    pub history: History,
    /// Read connections to the embedded database.
    pub db_readers: usize,
    /// The keys whose values fleet queries (`GET /devices?where=…`, job selections) read from an
    /// index; other keys are probed device by device. Every node should be given the same.
    pub index_keys: ddp_store::ValueIndex,
    /// Origins whose web pages may call the API (CORS, PROTOCOL.md §13): `scheme://host[:port]`
    /// each, or the single `*` for any. Empty: none (same-origin pages only, such as the
    /// console).
    pub cors_origins: Vec<String>,
    /// Live sync sessions.
    pub sessions: SessionLimits,
    /// The MQTT listener.
    pub mqtt: MqttSettings,
    /// HTTP timeouts.
    pub http: HttpSettings,
    /// Most connections each listener holds at once (`None`: derived from the open-file limit,
    /// leaving room for the database). All listeners also share that derived budget.
    pub max_connections: Option<usize>,
}

impl Config {
    /// Checks the whole configuration before anything starts: durations above zero, limits of
    /// at least one, no contradictory settings. The message names the flag to change.
    pub fn validate(&self) -> Result<(), String> {
        fn positive(what: &str, d: Duration) -> Result<(), String> {
            if d.is_zero() { Err(format!("{what} must be longer than 0")) } else { Ok(()) }
        }
        fn at_least(what: &str, n: usize, min: usize) -> Result<(), String> {
            if n < min { Err(format!("{what} must be at least {min}, got {n}")) } else { Ok(()) }
        }
        positive("--ws-idle", self.sessions.idle)?;
        positive("--http-header-timeout", self.http.header_timeout)?;
        positive("--http-idle-timeout", self.http.idle_timeout)?;
        positive("--http-body-timeout", self.http.body_timeout)?;
        if let Some(n) = self.max_connections {
            at_least("--max-connections", n, 1)?;
        }
        positive("the MQTT CONNECT timeout", self.mqtt.connect_timeout)?;
        positive("the history trimming interval", self.history.trim_every)?;
        at_least("--max-value-bytes", self.limits.max_value_bytes, 1)?;
        at_least("--max-keys-per-store", self.limits.max_keys_per_store, 1)?;
        at_least("--max-body-bytes", self.limits.max_body_bytes, 1)?;
        at_least("--max-batch-ops", self.limits.max_batch_ops, 1)?;
        at_least("--max-sessions-per-device", self.sessions.max_per_device, 1)?;
        at_least("--session-queue", self.sessions.mailbox, 1)?;
        at_least("the event stream queue", self.sessions.event_queue, 1)?;
        at_least("the WebSocket read buffer", self.sessions.ws_read_buffer, 1)?;
        at_least("--db-readers", self.db_readers, 1)?;
        at_least("--db-pool-size", self.db_pool, 2)?;
        for origin in &self.cors_origins {
            if origin == "*" {
                if self.cors_origins.len() > 1 {
                    return Err("--cors-origin *: any origin already; give * alone, or list origins".into());
                }
            } else if !is_origin(origin) {
                return Err(format!(
                    "--cors-origin {origin:?} is not an origin: give scheme://host[:port] with no path \
                     (e.g. https://app.example.com), or * for any"
                ));
            }
        }
        // A CONNECT with a device id and a 48-character key must fit.
        at_least("--mqtt-max-packet", self.mqtt.max_packet, 128)?;
        if self.node_name.trim().is_empty() {
            return Err("--node-name must not be empty".into());
        }
        positive("--tls-reload-every", self.tls.reload_every)?;
        let mqtt = &self.mqtt;
        let tls_listener = mqtt.tls_listen.is_some() || self.https_listen.is_some();
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
            (Some(_), Some(_)) if !tls_listener => {
                return Err(
                    "--tls-cert and --tls-key are given but no TLS listener is on (--https-listen, --mqtt-tls-listen)"
                        .into(),
                );
            }
            (None, None) if tls_listener => {
                let flag = if self.https_listen.is_some() { "--https-listen" } else { "--mqtt-tls-listen" };
                return Err(format!("{flag} needs --tls-cert and --tls-key"));
            }
            _ => {}
        }
        let listeners = [
            ("--http-listen", Some(self.http_listen)),
            ("--https-listen", self.https_listen),
            ("--mqtt-listen", mqtt.listen),
            ("--mqtt-tls-listen", mqtt.tls_listen),
            ("--mqtt-ws-listen", mqtt.ws_listen),
        ];
        for (i, (a, addr_a)) in listeners.iter().enumerate() {
            for (b, addr_b) in &listeners[i + 1..] {
                if let (Some(x), Some(y)) = (addr_a, addr_b)
                    && x.port() != 0
                    && x == y
                {
                    return Err(format!("{a} and {b} are both {x}: give each listener its own address"));
                }
            }
        }
        Ok(())
    }

    /// Defaults, with data in `data_dir` and HTTP on `http_listen`.
    pub fn new(data_dir: impl Into<PathBuf>, http_listen: SocketAddr) -> Config {
        Config {
            data_dir: data_dir.into(),
            database: None,
            db_pool: 32,
            node_name: "ddp".into(),
            http_listen,
            https_listen: None,
            tls: TlsSettings::default(),
            admin_key: None,
            limits: Limits::default(),
            rate_limits: RateLimits::default(),
            history: History::default(),
            db_readers: 4,
            index_keys: ddp_store::ValueIndex::Off,
            cors_origins: Vec::new(),
            sessions: SessionLimits::default(),
            mqtt: MqttSettings::default(),
            http: HttpSettings::default(),
            max_connections: None,
        }
    }
}

/// `scheme://host[:port]`, as browsers send it in `Origin` (no path, no trailing slash).
fn is_origin(text: &str) -> bool {
    let Some((scheme, authority)) = text.split_once("://") else { return false };
    let scheme_ok = scheme.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let Some((address, after)) = v6.split_once(']') else { return false };
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                return false;
            }
            match after {
                "" => ("v6", None),
                after => match after.strip_prefix(':') {
                    Some(port) => ("v6", Some(port)),
                    None => return false,
                },
            }
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    let host_ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
    scheme_ok && host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod origin_tests {
    use super::is_origin;

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for good in ["https://app.example.com", "http://127.0.0.1:8080", "http://[::1]:3000", "http://localhost"] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a.com/x",
            "https://",
            "http://h:99999",
            "://h",
            "http://[zz]:1",
            "http://a b",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    #[test]
    fn validate_names_a_bad_origin() {
        let mut config = super::Config::new("d", "127.0.0.1:0".parse().expect("addr"));
        config.cors_origins = vec!["https://ok.example".into(), "ok.example".into()];
        let err = config.validate().expect_err("refused");
        assert!(err.contains("--cors-origin \"ok.example\""), "{err}");
        config.cors_origins = vec!["*".into(), "https://ok.example".into()];
        assert!(config.validate().is_err());
        config.cors_origins = vec!["*".into()];
        assert_eq!(config.validate(), Ok(()));
    }
}

/// The certificate of the TLS listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// How often the files are checked for a renewal (they are also read again on SIGHUP).
    pub reload_every: Duration,
}

impl Default for TlsSettings {
    fn default() -> TlsSettings {
        TlsSettings { cert: None, key: None, reload_every: Duration::from_secs(10) }
    }
}

/// How long the HTTP listener waits for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// Once a request's first byte arrives, its head must be complete within this.
    pub header_timeout: Duration,
    /// A connection with no request in progress is closed after this (new, between keep-alive
    /// requests, or not reading its response).
    pub idle_timeout: Duration,
    /// A request body must arrive within this (else `408 REQUEST_TIMEOUT`).
    pub body_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> HttpSettings {
        HttpSettings {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Size and count limits (PROTOCOL.md §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value, in bytes of its (minified) JSON text.
    pub max_value_bytes: usize,
    /// Most keys in one store.
    pub max_keys_per_store: usize,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// Most ops in one atomic batch (PROTOCOL.md §11).
    pub max_batch_ops: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_value_bytes: 64 * 1024, max_keys_per_store: 1000, max_body_bytes: 1024 * 1024, max_batch_ops: 100 }
    }
}

/// Request rates per key; 0 turns a limit off. The admin key is never limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per second for each device key (bursts of twice that are allowed).
    pub device_per_sec: u32,
    /// Requests per second for each project API key (bursts of twice that are allowed).
    pub project_per_sec: u32,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits { device_per_sec: 100, project_per_sec: 0 }
    }
}

/// Change-history retention: a store keeps at least its last `keep_changes` changes and every
/// change younger than `keep_age`, whichever is more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// Changes kept per store regardless of age.
    pub keep_changes: u64,
    /// Age below which changes are kept regardless of number.
    pub keep_age: Duration,
    /// How often old history is trimmed.
    pub trim_every: Duration,
}

impl Default for History {
    fn default() -> History {
        History { keep_changes: 10_000, keep_age: Duration::from_secs(24 * 3600), trim_every: Duration::from_secs(300) }
    }
}

/// Live sync sessions (WebSocket and MQTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Live sessions one device key may hold at once; the next is refused.
    pub max_per_device: usize,
    /// Changes queued for a session before it is considered lagging and gets a fresh reload.
    pub mailbox: usize,
    /// The server pings a WebSocket peer this often and closes it after twice this of silence.
    pub idle: Duration,
    /// Read buffer of a WebSocket session, in bytes (larger frames still fit; this is what an
    /// idle session holds).
    pub ws_read_buffer: usize,
    /// Events queued for an app's event stream before it is closed as too far behind.
    pub event_queue: usize,
}

impl Default for SessionLimits {
    fn default() -> SessionLimits {
        SessionLimits {
            max_per_device: 5,
            mailbox: 256,
            idle: Duration::from_secs(30),
            ws_read_buffer: 1024,
            event_queue: 1024,
        }
    }
}

/// The MQTT listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// Plain TCP listener (`None`: off).
    pub listen: Option<SocketAddr>,
    /// TLS listener (`None`: off); needs [`Config::tls`].
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket on a listener of its own, any path (`None`: off). The HTTP listener
    /// always serves it at `/mqtt`.
    pub ws_listen: Option<SocketAddr>,
    /// Largest MQTT packet accepted, in bytes.
    pub max_packet: usize,
    /// How long a client has to send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for MqttSettings {
    fn default() -> MqttSettings {
        MqttSettings {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 1883))),
            tls_listen: None,
            ws_listen: None,
            max_packet: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}
