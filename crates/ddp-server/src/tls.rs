//! TLS for the HTTP listener (`--https-listen`) and the MQTT one (`--mqtt-tls-listen`), from one
//! certificate chain and key in PEM files (`--tls-cert`, `--tls-key`).
//!
//! The files are **picked up again without a restart** when they change — as an ACME client
//! renews them, by rewriting or by replacing a symlink — checked every
//! `--tls-reload-every`, and at once on SIGHUP. Each new connection is handshaken with the
//! certificate in force when it arrives; open connections keep theirs. A renewal that cannot be
//! read (half-written files, a key that does not match) is logged and the running certificate
//! stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use crate::locks;

/// What the files looked like when last read: a change of either is a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    cert: Option<(SystemTime, u64)>,
    key: Option<(SystemTime, u64)>,
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    // `metadata` follows symlinks: a renewed `live/…` link counts as a change.
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// The acceptors for HTTPS and MQTT over TLS, from the same files.
struct Acceptors {
    https: TlsAcceptor,
    mqtt: TlsAcceptor,
}

/// A certificate and key in PEM files, reloaded when they change. See the [module docs](self).
pub(crate) struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Acceptors>,
    stamp: Mutex<Stamp>,
}

/// Builds a TLS server configuration from the files; `alpn` is what it offers (HTTP/1.1 for
/// HTTPS, nothing for MQTT).
fn server_config(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {} (--tls-cert): {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in {} (--tls-cert): {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {} (--tls-cert)", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the private key {} (--tls-key): {e}", key.display()))?;
    // The provider is named, not left to process-wide defaults that another crate could make
    // ambiguous by enabling a second one.
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not make a TLS configuration: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn acceptors(cert: &Path, key: &Path) -> Result<Acceptors, String> {
    Ok(Acceptors {
        https: TlsAcceptor::from(Arc::new(server_config(cert, key, &[b"http/1.1"])?)),
        mqtt: TlsAcceptor::from(Arc::new(server_config(cert, key, &[])?)),
    })
}

impl TlsFiles {
    /// Reads the files; an error names the flag to fix.
    pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<TlsFiles>, String> {
        let stamp = Stamp { cert: stamp_of(cert), key: stamp_of(key) };
        let current = acceptors(cert, key)?;
        Ok(Arc::new(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(current),
            stamp: Mutex::new(stamp),
        }))
    }

    /// The acceptor for HTTPS, with the certificate in force now.
    pub(crate) fn https(&self) -> TlsAcceptor {
        self.read().https.clone()
    }

    /// The acceptor for MQTT over TLS, with the certificate in force now.
    pub(crate) fn mqtt(&self) -> TlsAcceptor {
        self.read().mqtt.clone()
    }

    /// Handing out the acceptor in force takes nothing away, so a poisoned lock is used as is.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Acceptors> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the files again if they changed since last read (`force`: whatever their stamps);
    /// keeps the running certificate when the new files do not make one.
    pub(crate) fn reload(&self, force: bool) {
        let now = Stamp { cert: stamp_of(&self.cert), key: stamp_of(&self.key) };
        let mut stamp = locks::recover(&self.stamp);
        if !force && *stamp == now {
            return;
        }
        match acceptors(&self.cert, &self.key) {
            Ok(fresh) => {
                *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                *stamp = now;
                tracing::info!(cert = %self.cert.display(), "TLS certificate (re)loaded");
            }
            Err(e) => {
                // Half-written files look like this too: try again at the next check.
                tracing::warn!(error = %e, "the TLS files changed but cannot be used; keeping the running certificate");
            }
        }
    }
}

/// Reloads `files` when they change (checked every `every`) and on SIGHUP, until `stop`.
pub(crate) async fn watch(files: Arc<TlsFiles>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still checked every {every:?}");
            None
        }
    };
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = tick.tick() => files.reload(false),
            Some(()) = hup => {
                tracing::info!("SIGHUP: reloading the TLS certificate");
                files.reload(true);
            }
            () = stop.cancelled() => return,
        }
    }
}
