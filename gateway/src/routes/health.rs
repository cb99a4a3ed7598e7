//! Liveness, readiness (Postgres and Redis answer) and Prometheus metrics.

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use crate::AppState;

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = sqlx::query("SELECT 1").execute(&state.ctx.pool).await;
    let redis = state.ctx.queues.ping().await;
    let ready = postgres.is_ok() && redis.is_ok();
    let describe = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "status": describe(ready),
            "postgres": describe(postgres.is_ok()),
            "redis": describe(redis.is_ok()),
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}
