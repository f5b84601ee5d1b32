//! The state all transports share.

use std::sync::Arc;

use ddp_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kv::Kv;

/// The running service: configuration, storage and the gate.
pub(crate) struct App {
    /// The settings it was started with.
    pub(crate) config: Config,
    /// Storage (the admin API reads and writes it directly: admin key only).
    pub(crate) store: Arc<dyn Store>,
    /// The gate: every request and session of every transport goes through it.
    pub(crate) kv: Kv,
    /// Prometheus rendering.
    pub(crate) metrics: PrometheusHandle,
    /// Cancelled when the server starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Wakes this node's job runner when a job is created here (others poll).
    pub(crate) jobs_wake: tokio::sync::Notify,
}
