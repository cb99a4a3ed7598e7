//! Logs and metrics set-up shared by the binaries.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the process-wide Prometheus recorder once and returns its handle;
/// later calls (several servers in one test process) share it.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Serves this process's metrics as Prometheus text on `address` (the worker
/// has no HTTP server of its own).
pub fn serve_metrics(address: std::net::SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .install()
        .map_err(|e| {
            anyhow::anyhow!("Failed to serve metrics on {address} (worker.metrics_listen): {e}")
        })
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); JSON when
/// `ENTITLE_LOG_FORMAT=json`.
pub fn init_logging() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if std::env::var("ENTITLE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
