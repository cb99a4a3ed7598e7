//! Failed webhook events, queued again once their cause is fixed.

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use entitle_jobs::{handlers, inbox::RetryFilter, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{Answer, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    reason: String,
    event_id: Option<Uuid>,
    channel: Option<String>,
    error_code: Option<String>,
}

/// Reopening is idempotent by nature: a second call finds nothing failed.
async fn retry(
    actor: Actor,
    State(state): State<AppState>,
    _headers: HeaderMap,
    ApiJson(request): ApiJson<RetryRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    require_reason(&request.reason)?;
    let filter = RetryFilter {
        id: request.event_id,
        channel: request.channel,
        error_code: request.error_code,
    };
    let ids = handlers::retry_failed_events(&state.ctx, &filter, &actor.name, &request.reason)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::OK,
        Json(json!({ "queued": ids.len(), "events": ids })),
    ))
}

#[derive(Debug, Deserialize)]
struct Filter {
    status: Option<String>,
    channel: Option<String>,
}

/// Webhook events (without their bodies), newest first: what failed and why.
async fn list(
    actor: Actor,
    State(state): State<AppState>,
    axum::extract::Query(f): axum::extract::Query<Filter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    actor.require(Role::Support)?;
    let events: serde_json::Value = sqlx::query_scalar(
        "SELECT coalesce(json_agg(json_build_object('id', w.id, 'channel', w.channel,
                    'event_id', w.event_id, 'event_type', w.event_type, 'status', w.status,
                    'attempts', w.attempts, 'error_code', w.error_code, 'last_error', w.last_error,
                    'received_at', w.received_at, 'order_id', w.order_id) ORDER BY w.received_at DESC), '[]')
         FROM (SELECT * FROM webhook_inbox w
               WHERE ($1::text IS NULL OR w.status = $1) AND ($2::text IS NULL OR w.channel = $2)
               ORDER BY w.received_at DESC LIMIT 500) w",
    )
    .bind(&f.status)
    .bind(&f.channel)
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(json!({ "events": events })))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/events", axum::routing::get(list))
        .route("/admin/v1/events/retry", post(retry))
}
