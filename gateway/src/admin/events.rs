//! Failed webhook events, queued again once their cause is fixed.

use axum::{
    Json,
    extract::{Query, State},
};
use entitle_jobs::{handlers, inbox::RetryFilter, token::Role};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    require_reason,
    views::{Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Which failed events to queue again (each filter optional), and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "reason": "catalogue fixed", "error_code": "unknown_product" })))]
struct RetryRequest {
    reason: String,
    /// One event, by Entitle's id of it.
    event_id: Option<Uuid>,
    channel: Option<String>,
    /// e.g. `unknown_product`, `event_malformed`.
    error_code: Option<String>,
}

/// The failed events queued again.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Retried {
    pub queued: usize,
    pub events: Vec<Uuid>,
}

/// Queue failed webhook events again.
///
/// Reopening is idempotent by nature: a second call finds nothing failed,
/// so it takes no `Idempotency-Key`.
#[utoipa::path(
    post, path = "/admin/v1/events/retry", tag = "events",
    request_body = RetryRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "The events queued again (none, when nothing matched)", body = Retried),
        (status = 422, description = "`reason_required`", body = ErrorBody),
    ),
)]
async fn retry_events(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RetryRequest>,
) -> Result<Json<Retried>, ApiError> {
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
    Ok(Json(Retried {
        queued: ids.len(),
        events: ids,
    }))
}

/// Which webhook events (each filter optional).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventFilter {
    /// `pending`, `processed`, `ignored` or `failed`.
    status: Option<String>,
    /// `stripe`, `shopify` or `native`.
    channel: Option<String>,
}

/// Webhook events, newest first (at most 500).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<WebhookEvent>,
}

/// A webhook event as filed (without its body).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookEvent {
    pub id: Uuid,
    pub channel: String,
    /// The channel's id of the event.
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `processed`, `ignored` or `failed`.
    pub status: String,
    pub attempts: i32,
    pub error_code: Option<String>,
    pub last_error: Option<String>,
    pub received_at: Timestamp,
    /// The order it made or changed, once processed.
    pub order_id: Option<Uuid>,
}

/// Webhook events (without their bodies), newest first: what failed and why.
#[utoipa::path(
    get, path = "/admin/v1/events", tag = "events",
    params(EventFilter),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "The events, newest first", body = EventList)),
)]
async fn list_events(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<EventFilter>,
) -> Result<Json<EventList>, ApiError> {
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
    Ok(Json(EventList {
        events: conform("the event list", events)?,
    }))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(retry_events))
}
