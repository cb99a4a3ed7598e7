//! Entitle's HTTP gateway: verifies and files channel webhooks, serves
//! redemptions, health and metrics. Stateless: run as many as needed.

use std::future::Future;

use axum::{Router, extract::DefaultBodyLimit};
use entitle_jobs::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

pub mod admin;
pub mod auth;
pub mod error;
pub mod routes;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Context,
    pub metrics: PrometheusHandle,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let max_body = state.ctx.config.gateway.max_body_bytes;
    Router::new()
        .merge(routes::health::router())
        .merge(routes::webhooks::router())
        .merge(routes::redemptions::router())
        .merge(admin::router())
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves, then finishes in-flight
/// requests and returns.
pub async fn run(
    ctx: Context,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState {
        ctx,
        metrics: entitle_jobs::telemetry::metrics(),
    };
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
