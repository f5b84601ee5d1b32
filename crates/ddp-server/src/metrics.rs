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
//!
//! Every label comes from a fixed set (route templates, known methods or `other`, transports,
//! listeners), so no client can add label sets.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
pub(crate) fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
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
