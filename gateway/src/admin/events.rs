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

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/v1/events/retry", post(retry))
}
