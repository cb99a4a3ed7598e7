//! Entitle's HTTP gateway: verifies and files channel webhooks, serves
//! redemptions, health and metrics, the admin API and the support console. Stateless: run as many as needed.

use std::future::Future;

use axum::{Router, extract::DefaultBodyLimit};
use entitle_jobs::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

pub mod admin;
pub mod auth;
pub mod console;
pub mod error;
pub mod openapi;
pub mod openapi_v1;
pub mod routes;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Context,
    pub metrics: PrometheusHandle,
    /// Webhooks are filed through group commits.
    pub intake: entitle_jobs::inbox::Intake,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let max_body = state.ctx.config.gateway.max_body_bytes;
    // The API's routes come with their OpenAPI operations (see `openapi`);
    // the console's HTML pages are not part of the API.
    let (api, _) = openapi::api().split_for_parts();
    let mut router = Router::new().merge(api).merge(console::router(&state));
    if state.ctx.config.gateway.redeem_page {
        router = router.merge(routes::redeem_page::router());
    }
    router
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::map_response(error::json_errors))
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
    // A few writers keep Postgres busy while the next group gathers; the
    // rest of the pool serves redemptions and the admin API.
    // Measured on 2 cores: two writers beat one and four (ops/bench.sh).
    let writers = (ctx.config.database.max_connections as usize / 4).max(1);
    let state = AppState {
        intake: entitle_jobs::inbox::Intake::start(ctx.pool.clone(), writers),
        ctx,
        metrics: entitle_jobs::telemetry::metrics(),
    };
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    // The console limits sign-in attempts per client address.
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Answers go out at once: with Nagle's algorithm a response written in
    // two parts waits for the client's delayed ACK (~40 ms).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY could not be set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
