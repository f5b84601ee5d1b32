//! Prometheus metrics (`GET /metrics`).
//!
//! The `metrics` facade is process-wide, so the recorder is installed once per process and shared
//! by every server in it (tests start several). Metric names:
//! - `ddp_http_requests_total{method,route,status}`, `ddp_http_request_seconds{method,route}`
//! - `ddp_writes_total{transport,op,outcome}`
//! - `ddp_store_commit_seconds`, `ddp_store_batch_size` (group commits, on both backends),
//!   `ddp_store_fsync_seconds`, `ddp_store_wal_frames` (SQLite)
//! - `ddp_feed_rows_total`, `ddp_feed_reconnects_total` (PostgreSQL: what this node's change feed
//!   read, and how often its connection was re-established)
//! - `ddp_sessions{transport}` (live sessions), `ddp_sync_messages_sent_total{transport}`,
//!   `ddp_lag_reloads_total`
//! - `ddp_connections{listener}`, `ddp_connections_shed_total{listener}`,
//!   `ddp_connections_refused_total{listener}` (the connection caps)
//! - `ddp_mqtt_rejected_publishes_total`, `ddp_mqtt_dropped_publishes_total` (QoS 0 publishes of
//!   a 3.1.1 device far over its rate)
//! - `ddp_events_total`, `ddp_event_listeners`, `ddp_event_listeners_dropped_total`
//! - `ddp_commit_to_applied_seconds` (a Prometheus histogram with [`APPLIED_BUCKETS`]: how long
//!   after its commit a change was acknowledged by its device), `ddp_acks_total{outcome}`
//!   (`advanced`, `unchanged`, `refused`), `ddp_connected_devices_behind` (devices watching
//!   their store here whose acknowledged rev is behind it), `ddp_sync_tracked_devices`,
//!   `ddp_sync_record_failures_total`
//!
//! Every label comes from a fixed set (route templates, known methods or `other`, transports,
//! listeners), so no client can add label sets.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of `ddp_commit_to_applied_seconds`, in seconds: from a device on the same LAN to
/// one that was offline for an hour.
pub(crate) const APPLIED_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];

/// The process's Prometheus handle, installing the recorder on first use.
pub(crate) fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("ddp_commit_to_applied_seconds".into()), APPLIED_BUCKETS);
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                Err(e) => {
                    tracing::warn!(error = %e, "histogram buckets refused; commit → applied is a summary");
                    PrometheusBuilder::new().build_recorder()
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
            }
            // Histograms must be drained periodically or they grow without bound.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("ddp-metrics-upkeep".into()).spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
            }
            handle
        })
        .clone()
}
