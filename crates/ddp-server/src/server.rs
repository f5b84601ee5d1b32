//! Starting and stopping: [`Server::bind`] prepares everything and binds the listeners (so tests
//! can bind port 0 and read the address), [`Server::run`] serves until the shutdown future
//! completes, then finishes in-flight writes and closes storage.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::serve::ListenerExt;
use ddp_store::{PgOptions, PgStore, SqliteOptions, SqliteStore, Store, StoreError};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::{AuthCache, Authenticator};
use crate::config::Config;
use crate::events::EventBus;
use crate::fanout::Fanout;
use crate::hub::Hub;
use crate::kv::{Kv, Parts};
use crate::secret::{self, SecretKind};
use crate::sessions::Sessions;
use crate::{http, metrics};

/// The file in the data directory that holds the generated admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// The embedded database file in the data directory.
pub const DATABASE_FILE: &str = "ddp.sqlite3";
/// The lock file that keeps two servers off one data directory.
pub const LOCK_FILE: &str = "ddp.lock";

/// How long shutdown waits for live sessions to close.
const SESSION_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Listen backlog: a reconnect storm of thousands of devices must not overflow the accept queue.
/// The kernel caps it at `net.core.somaxconn`; the server says so at start when that is lower.
const LISTEN_BACKLOG: u32 = 16384;

/// Why the server could not start. Every message names the setting to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be created or used.
    #[error("cannot use the data directory {path} (--data-dir / DDP_DATA_DIR): {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another server holds the data directory.
    #[error("the data directory {0} is in use by another `ddp serve`; stop it or choose another --data-dir")]
    Locked(PathBuf),
    /// The admin key is unusable.
    #[error("admin key: {0}")]
    AdminKey(String),
    /// Storage cannot be opened.
    #[error("cannot open storage ({what}): {source}")]
    Storage {
        /// The database (never with a password).
        what: String,
        /// The cause.
        source: StoreError,
    },
    /// The TLS listener cannot be set up.
    #[error("MQTT over TLS: {0}")]
    Tls(String),
    /// A listener cannot be bound.
    #[error("cannot listen on {addr} (change it with {flag}): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The flag and variable that set it.
        flag: &'static str,
        /// The cause.
        source: io::Error,
    },
}

/// A bound, not yet running server.
pub struct Server {
    app: Arc<App>,
    http: TcpListener,
    http_addr: SocketAddr,
    mqtt: Option<(TcpListener, SocketAddr)>,
    mqtt_tls: Option<(TcpListener, SocketAddr, tokio_rustls::TlsAcceptor)>,
    admin: AdminKey,
    _lock: Option<std::fs::File>,
}

/// The admin key in force.
struct AdminKey {
    digest: [u8; 32],
    /// The key itself, when this node knows it (given, read from its file, or generated now).
    key: Option<String>,
    /// Where this start stored a key it generated.
    created_in: Option<String>,
}

impl Server {
    /// Prepares storage (the data directory and its lock, or the PostgreSQL database) and the
    /// admin key, and binds the listeners.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let auth_cache = Arc::new(AuthCache::default());
        let hub = Arc::new(Hub::new(config.sessions.mailbox));
        let fanout = Arc::new(Fanout::new(auth_cache.clone(), hub.clone()));
        let sink = fanout.clone();
        let (store, admin, lock): (Arc<dyn Store>, AdminKey, _) = match &config.database {
            None => {
                let data_dir = config.data_dir.clone();
                create_data_dir(&data_dir)?;
                let lock = lock_data_dir(&data_dir)?;
                let admin = admin_key_file(&config)?;
                let db_path = data_dir.join(DATABASE_FILE);
                let what = db_path.display().to_string();
                let mut options = SqliteOptions::new(&db_path);
                options.readers = config.db_readers.max(1);
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(options, sink))
                    .await
                    .map_err(|e| StartError::Storage {
                        what: what.clone(),
                        source: StoreError::Backend(e.to_string()),
                    })?
                    .map_err(|source| StartError::Storage { what, source })?;
                (Arc::new(store), admin, Some(lock))
            }
            Some(url) => {
                let mut options = PgOptions::new(url);
                options.pool_size = config.db_pool.max(2);
                options.node_name = config.node_name.clone();
                let what = options.describe();
                let store = PgStore::open(options, sink)
                    .await
                    .map_err(|source| StartError::Storage { what: what.clone(), source })?;
                let admin = admin_key_shared(&config, &store, &what).await?;
                (Arc::new(store), admin, None)
            }
        };

        let (http, http_addr) = listen(config.http_listen, "--http-listen / DDP_HTTP_LISTEN")?;
        check_somaxconn();
        let mqtt = config.mqtt.listen.map(|addr| listen(addr, "--mqtt-listen / DDP_MQTT_LISTEN")).transpose()?;
        let mqtt_tls = match config.mqtt.tls_listen {
            None => None,
            Some(addr) => {
                let (Some(cert), Some(key)) = (&config.mqtt.tls_cert, &config.mqtt.tls_key) else {
                    return Err(StartError::Tls("--mqtt-tls-listen needs --tls-cert and --tls-key".into()));
                };
                let acceptor = crate::mqtt::tls_acceptor(cert, key).map_err(StartError::Tls)?;
                let (listener, bound) = listen(addr, "--mqtt-tls-listen / DDP_MQTT_TLS_LISTEN")?;
                Some((listener, bound, acceptor))
            }
        };

        let events = Arc::new(EventBus::new(store.clone(), config.sessions.event_queue));
        let sessions = Arc::new(Sessions::new(store.clone(), events.clone(), config.sessions.max_per_device));
        fanout.connect(events.clone(), sessions.clone());
        let kv = Kv::new(Parts {
            store: store.clone(),
            limits: config.limits,
            rate_limits: config.rate_limits,
            auth: Authenticator::new(admin.digest, store.clone(), auth_cache),
            hub,
            sessions,
            events,
        });
        let app = Arc::new(App { kv, metrics: metrics::handle(), shutdown: CancellationToken::new(), store, config });
        Ok(Server { app, http, http_addr, mqtt, mqtt_tls, admin, _lock: lock })
    }

    /// Where the REST and WebSocket API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the MQTT listener listens, when it is on.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().map(|(_, a)| *a)
    }

    /// Where the MQTT TLS listener listens, when it is on.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls.as_ref().map(|(_, a, _)| *a)
    }

    /// The admin key in force, when this node knows it (with PostgreSQL, a node that did not
    /// generate the shared key knows only its digest).
    pub fn admin_key(&self) -> Option<&str> {
        self.admin.key.as_deref()
    }

    /// Where this start stored the admin key it generated, if it generated one.
    pub fn admin_key_created(&self) -> Option<&str> {
        self.admin.created_in.as_deref()
    }

    /// Serves until `shutdown` completes; then stops accepting, finishes in-flight requests and
    /// writes, closes live sessions and storage, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let Server { app, http, http_addr, mqtt, mqtt_tls, _lock, .. } = self;
        match &app.config.database {
            None => tracing::info!(data_dir = %app.config.data_dir.display(), "storage: embedded SQLite"),
            Some(url) => {
                tracing::info!(database = %PgOptions::new(url).describe(), node = %app.config.node_name, "storage: PostgreSQL")
            }
        }
        tracing::info!(addr = %http_addr, transport = "http", "listening");
        let mut listeners = Vec::new();
        if let Some((listener, addr)) = mqtt {
            tracing::info!(addr = %addr, transport = "mqtt", "listening");
            listeners.push(tokio::spawn(crate::mqtt::accept_loop(app.clone(), listener, None)));
        }
        if let Some((listener, addr, acceptor)) = mqtt_tls {
            tracing::info!(addr = %addr, transport = "mqtts", "listening");
            listeners.push(tokio::spawn(crate::mqtt::accept_loop(app.clone(), listener, Some(acceptor))));
        }
        let trimmer = tokio::spawn(trim_history(app.clone()));
        let cancel = app.shutdown.clone();
        let signal = async move {
            tokio::select! {
                () = shutdown => {}
                () = cancel.cancelled() => {}
            }
            tracing::info!("shutting down: no new connections; finishing in-flight requests");
            cancel.cancel();
        };
        let listener = http.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, http::router(app.clone())).with_graceful_shutdown(signal).await;
        for l in listeners {
            let _ = l.await;
        }
        // Upgraded and MQTT sessions are not HTTP requests: they saw the cancellation and are closing.
        if tokio::time::timeout(SESSION_DRAIN, app.kv.sessions().drained()).await.is_err() {
            tracing::warn!(
                left = app.kv.sessions().live(),
                "sessions still open after {SESSION_DRAIN:?}; closing storage anyway"
            );
        }
        trimmer.abort();
        app.store.close().await;
        tracing::info!("stopped; every acknowledged write is on disk");
        served
    }
}

fn create_data_dir(path: &Path) -> Result<(), StartError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path).map_err(|source| StartError::DataDir { path: path.to_owned(), source })
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::DataDir { path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(StartError::DataDir { path, source }),
    }
}

fn check_admin_key(key: &str, from: &str) -> Result<(), StartError> {
    if key.len() < 16 || key.chars().any(char::is_whitespace) {
        Err(StartError::AdminKey(format!("the admin key from {from} must be at least 16 characters with no spaces")))
    } else {
        Ok(())
    }
}

fn given_admin_key(config: &Config) -> Result<Option<AdminKey>, StartError> {
    let Some(key) = &config.admin_key else { return Ok(None) };
    check_admin_key(key, "--admin-key / DDP_ADMIN_KEY")?;
    Ok(Some(AdminKey { digest: secret::digest(key), key: Some(key.clone()), created_in: None }))
}

/// The embedded store's admin key: given, stored in the data directory, or generated now (then
/// written there mode 0600 and reported).
fn admin_key_file(config: &Config) -> Result<AdminKey, StartError> {
    if let Some(given) = given_admin_key(config)? {
        return Ok(given);
    }
    let path = config.data_dir.join(ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = text.trim().to_owned();
            check_admin_key(&key, &path.display().to_string())?;
            Ok(AdminKey { digest: secret::digest(&key), key: Some(key), created_in: None })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = secret::generate(SecretKind::Admin);
            write_private(&path, &format!("{key}\n"))
                .map_err(|e| StartError::AdminKey(format!("cannot write {}: {e}", path.display())))?;
            let place = format!("{} (readable only by its owner; later starts read it from there)", path.display());
            Ok(AdminKey { digest: secret::digest(&key), key: Some(key), created_in: Some(place) })
        }
        Err(e) => Err(StartError::AdminKey(format!("cannot read {}: {e}", path.display()))),
    }
}

/// The setting that holds the shared admin key's digest in PostgreSQL.
const ADMIN_DIGEST_SETTING: &str = "admin_key_sha256";

/// The shared admin key of the nodes on one PostgreSQL database: given, or the one whose digest
/// the first node stored (that node generated it and reports it once).
async fn admin_key_shared(config: &Config, store: &PgStore, what: &str) -> Result<AdminKey, StartError> {
    if let Some(given) = given_admin_key(config)? {
        return Ok(given);
    }
    let key = secret::generate(SecretKind::Admin);
    let digest = secret::digest(&key);
    let stored = store
        .setting_or_insert(ADMIN_DIGEST_SETTING, &digest)
        .await
        .map_err(|source| StartError::Storage { what: what.to_owned(), source })?;
    let stored = <[u8; 32]>::try_from(stored.as_slice()).map_err(|_| {
        StartError::AdminKey(format!("the database's {ADMIN_DIGEST_SETTING} setting is not a SHA-256 digest"))
    })?;
    Ok(if stored == digest {
        AdminKey { digest, key: Some(key), created_in: Some("the database (as a digest; every node uses it)".into()) }
    } else {
        AdminKey { digest: stored, key: None, created_in: None }
    })
}

/// Writes a new file readable by its owner only, and makes it durable.
fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn listen(addr: SocketAddr, flag: &'static str) -> Result<(TcpListener, SocketAddr), StartError> {
    let fail = |source| StartError::Listen { addr, flag, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    Ok((listener, bound))
}

/// Says at start when the kernel caps the listen backlog below [`LISTEN_BACKLOG`]: connections
/// beyond the cap that arrive at the same moment (a reconnect storm) wait for a SYN retransmit.
fn check_somaxconn() {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/core/somaxconn") else { return };
    if let Ok(cap) = text.trim().parse::<u32>()
        && cap < LISTEN_BACKLOG
    {
        tracing::info!(
            somaxconn = cap,
            wanted = LISTEN_BACKLOG,
            "the kernel caps the listen backlog at net.core.somaxconn; for reconnect storms of more \
             devices than that at once, raise it (sysctl -w net.core.somaxconn={LISTEN_BACKLOG})"
        );
    }
}

/// Trims change history now and then, until shutdown.
async fn trim_history(app: Arc<App>) {
    let history = app.config.history;
    let mut every = tokio::time::interval(history.trim_every);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = app.shutdown.cancelled() => return,
        }
        let age_ms = i64::try_from(history.keep_age.as_millis()).unwrap_or(i64::MAX);
        match app.store.trim_history(history.keep_changes, age_ms).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "trimmed change history"),
            Err(e) => tracing::warn!(error = %e, "trimming change history failed"),
        }
    }
}
