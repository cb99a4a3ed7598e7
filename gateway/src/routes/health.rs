//! Liveness and readiness (Postgres answers: it is all the gateway needs).
//! Metrics are served on their own listener (`gateway.metrics_listen`),
//! never on the public port.

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde_json::{Value, json};

use crate::AppState;

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Postgres answers within a second. The gateway never uses
/// Redis (workers do), so a Redis outage does not make it unready.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        sqlx::query("SELECT 1").execute(&state.ctx.pool),
    )
    .await;
    let ready = matches!(postgres, Ok(Ok(_)));
    let describe = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "status": describe(ready),
            "postgres": describe(ready),
        })),
    )
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}
