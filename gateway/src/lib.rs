//! Entitle's HTTP gateway: verifies and files channel webhooks, serves
//! redemptions, health and metrics, the admin API and the support console. Stateless: run as many as needed.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::DefaultBodyLimit, http::StatusCode};
use entitle_jobs::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::{
    timeout::{RequestBodyTimeoutLayer, TimeoutLayer},
    trace::TraceLayer,
};

pub mod admin;
pub mod auth;
pub mod auth_limit;
pub mod console;
pub mod error;
pub mod openapi;
pub mod openapi_v1;
pub mod platform;
pub mod routes;
pub mod serve;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Context,
    pub metrics: PrometheusHandle,
    /// Webhooks are filed through group commits.
    pub intake: entitle_jobs::inbox::Intake,
    /// Redemptions are claimed through group commits.
    pub redeemer: entitle_jobs::redemption::Redeemer,
    /// Platform keys verified lately, and the platform API's rate limits.
    pub platform: Arc<platform::Gate>,
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let gateway = &state.ctx.config.gateway;
    let max_body = gateway.max_body_bytes;
    let timeouts = &gateway.timeouts;
    // The API's routes come with their OpenAPI operations (see `openapi`);
    // the console's HTML pages are not part of the API.
    let (api, _) = openapi::api().split_for_parts();
    let mut router = Router::new().merge(api).merge(console::router(&state));
    if gateway.redeem_page {
        router = router.merge(routes::redeem_page::router());
    }
    router
        .layer(DefaultBodyLimit::max(max_body))
        .layer(RequestBodyTimeoutLayer::new(Duration::from_millis(
            timeouts.body_ms,
        )))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_millis(timeouts.request_ms),
        ))
        // The platform API has an in-flight limit of its own, so that a
        // flood of redemptions is refused early rather than queued.
        .layer(axum::middleware::from_fn_with_state(
            serve::InFlight::under(
                "/v1/",
                gateway.limits.max_in_flight_platform,
                "platform API",
            ),
            serve::limit_in_flight,
        ))
        .layer(axum::middleware::from_fn_with_state(
            serve::InFlight::new(gateway.limits.max_in_flight, "gateway"),
            serve::limit_in_flight,
        ))
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
    // A few writers keep Postgres busy while the next group gathers.
    // Measured on 2 cores: two writers beat one and four (ops/bench.sh).
    // They have connections of their own: however busy the platform API or
    // the admin API keep the main pool, webhooks are filed without waiting.
    // Requests wait for a connection no longer than the gateway's own
    // timeout (the binary connects with it; a caller that shares its
    // context with a worker gets a pool of the gateway's own).
    let database = ctx.config.gateway_database();
    let ctx = if ctx.config.database.acquire_timeout_ms == database.acquire_timeout_ms {
        ctx
    } else {
        ctx.with_pool(entitle_jobs::db::connect(&database).await?)
    };
    let writers = (ctx.config.database.max_connections / 4).max(1);
    let intake_pool = entitle_jobs::db::connect_sized(&database, writers).await?;
    // Redemptions share commits the same way, on connections of their own
    // that never wait long for a held code (the request then waits for it
    // on the main pool).
    let redemption_writers = ctx.config.gateway.redemption_writers.max(1);
    // Twice as many connections as writers: a connection goes back to the
    // pool a moment after its statement, and a writer must not wait for it
    // (with one connection a writer, redemption was 0.37 × the floor
    // against 0.41 × with spares).
    let redemption_pool = entitle_jobs::db::connect_with_settings(
        &database,
        2 * redemption_writers as u32,
        entitle_jobs::redemption::Redeemer::WRITER_SETTINGS,
    )
    .await?;
    let redeemer = entitle_jobs::redemption::Redeemer::start(
        redemption_pool,
        ctx.pool.clone(),
        redemption_writers,
    );
    let state = AppState {
        intake: entitle_jobs::inbox::Intake::start(intake_pool, writers as usize),
        redeemer,
        platform: Arc::new(platform::Gate::new(&ctx.config.gateway)),
        metrics: entitle_jobs::telemetry::metrics(),
        ctx,
    };
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let timeouts = state.ctx.config.gateway.timeouts.clone();
    serve::serve(listener, router(state), &timeouts, shutdown).await
}
