//! Liveness and readiness (Postgres answers: it is all the gateway needs).
//! Metrics are served on their own listener (`gateway.metrics_listen`),
//! never on the public port.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::AppState;

/// The process answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    /// Always `ok`.
    pub status: String,
}

/// Whether the gateway can serve, and what it depends on.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ok` or `unavailable`.
    pub status: String,
    /// `ok` or `unavailable`.
    pub postgres: String,
}

/// Liveness: the process answers.
#[utoipa::path(
    get, path = "/healthz", tag = "health",
    extensions(("x-entitle-role" = json!("public"))),
    responses((status = 200, description = "Alive", body = Liveness)),
)]
async fn healthz() -> Json<Liveness> {
    Json(Liveness {
        status: "ok".to_owned(),
    })
}

/// Readiness: Postgres answers within a second.
///
/// The gateway never uses Redis (workers do), so a Redis outage does not
/// make it unready.
#[utoipa::path(
    get, path = "/readyz", tag = "health",
    extensions(("x-entitle-role" = json!("public"))),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready: Postgres did not answer", body = Readiness),
    ),
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let postgres = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        sqlx::query("SELECT 1").execute(&state.ctx.pool),
    )
    .await;
    let ready = matches!(postgres, Ok(Ok(_)));
    let describe = |ok: bool| if ok { "ok" } else { "unavailable" }.to_owned();
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: describe(ready),
            postgres: describe(ready),
        }),
    )
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}
