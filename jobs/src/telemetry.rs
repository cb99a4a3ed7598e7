//! Logs and metrics set-up shared by the binaries.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle;
/// later calls (several servers in one test process) share it.
pub fn metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Installs the recorder with its own HTTP listener on `address`, serving
/// the metrics as Prometheus text there (never on a public port). Call it
/// before anything records a metric; `setting` names the key for errors.
pub fn serve_metrics(address: std::net::SocketAddr, setting: &str) -> anyhow::Result<()> {
    let failed = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!("Failed to serve metrics on {address} ({setting}): {e}")
    };
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(address)
        .build()
        .map_err(|e| failed(&e))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| failed(&e))?;
    HANDLE
        .set(handle.clone())
        .map_err(|_| failed(&"a recorder was already installed"))?;
    // What `install` would do: a recorder built by hand needs its upkeep.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics listener stopped");
        }
    });
    Ok(())
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
