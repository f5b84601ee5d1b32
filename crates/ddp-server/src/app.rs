//! The state every transport shares.

use std::sync::Arc;

use ddp_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::events::EventBus;
use crate::hub::Hub;
use crate::kv::Kv;
use crate::ratelimit::RateLimiter;
use crate::sessions::Sessions;

/// The running service: configuration, storage, the write path and the session registries.
pub struct App {
    /// The settings it was started with.
    pub config: Config,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Token → principal.
    pub auth: Authenticator,
    /// The one write path and read path.
    pub kv: Kv,
    /// Per-key request rates.
    pub limiter: RateLimiter,
    /// Committed changes to live sessions.
    pub hub: Arc<Hub>,
    /// Home events to app listeners.
    pub events: Arc<EventBus>,
    /// Live sync sessions: caps, presence, connection times.
    pub sessions: Arc<Sessions>,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
}
