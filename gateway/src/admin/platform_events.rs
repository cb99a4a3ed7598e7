//! The platform's events (`/admin/v1/platform/...`): the endpoints they go
//! to (admin: create, rotate a secret, disable, enable), the delivery log
//! with every attempt (support), and replay (operator). Every change is
//! audited.

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use entitle_jobs::{
    platform_event::{
        endpoint::{self, EndpointError, EndpointInfo, Target},
        log::{self, AttemptEntry, DeliveryEntry, Filter},
    },
    token::Role,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Answer, IdempotencyKey, ReasonOnly, answer, not_found, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

fn refused(e: EndpointError) -> ApiError {
    let status = match &e {
        EndpointError::NameTaken(_) | EndpointError::FromConfig(_) => StatusCode::CONFLICT,
        EndpointError::NotFound => StatusCode::NOT_FOUND,
        EndpointError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        EndpointError::Database(e) => return ApiError::database(e),
    };
    ApiError::new(status, e.code(), e.to_string())
}

/// Every endpoint, disabled ones too.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointList {
    pub endpoints: Vec<EndpointInfo>,
}

/// The platform's endpoints (never their secrets).
#[utoipa::path(
    get, path = "/admin/v1/platform/endpoints", tag = "platform_events",
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "Every endpoint", body = EndpointList)),
)]
async fn list_endpoints(
    actor: Actor,
    State(state): State<AppState>,
) -> Result<Json<EndpointList>, ApiError> {
    actor.require(Role::Support)?;
    Ok(Json(EndpointList {
        endpoints: endpoint::list(&state.ctx.pool).await?,
    }))
}

/// An endpoint to create, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "name": "platform", "url": "https://platform.example/entitle/events",
    "event_types": [], "reason": "the platform's event receiver"
})))]
pub struct CreateEndpoint {
    pub name: String,
    /// Where events are POSTed (http or https).
    pub url: String,
    /// The event types it hears; empty or absent: every type.
    #[serde(default)]
    pub event_types: Vec<String>,
    pub reason: String,
}

/// An endpoint and its signing secret: the only answer that carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointWithSecret {
    pub endpoint: EndpointInfo,
    /// `whsec_…`: the receiver verifies `webhook-signature` with it.
    pub secret: String,
}

/// Create an endpoint; events written from now on are sent to it.
///
/// Not idempotent by key: the secret is never stored in the clear, so a
/// replayed answer could not carry it. A retry with the same name is
/// refused.
#[utoipa::path(
    post, path = "/admin/v1/platform/endpoints", tag = "platform_events",
    request_body = CreateEndpoint,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 201, description = "Created, with its secret", body = EndpointWithSecret),
        (status = 409, description = "`endpoint_name_taken`", body = ErrorBody),
        (status = 422, description = "`invalid_request` (name, url, event types), `reason_required`", body = ErrorBody),
    ),
)]
async fn create_endpoint(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateEndpoint>,
) -> Result<(StatusCode, Json<EndpointWithSecret>), ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let mut tx = state.ctx.pool.begin().await?;
    let target = Target {
        name: &request.name,
        url: &request.url,
        event_types: &request.event_types,
    };
    let (endpoint, secret) = endpoint::create(
        &mut tx,
        &state.ctx.keys,
        &target,
        &actor.name,
        &request.reason,
    )
    .await
    .map_err(refused)?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(EndpointWithSecret {
            endpoint,
            secret: secret.expose(),
        }),
    ))
}

/// Give an endpoint a new secret; the previous one keeps signing beside it
/// for `platform.rotation_overlap_secs`, so the receiver can switch.
///
/// Not idempotent by key (the answer carries the new secret): each call
/// rotates again.
#[utoipa::path(
    post, path = "/admin/v1/platform/endpoints/{id}/rotate", tag = "platform_events",
    params(("id" = Uuid, Path, description = "The endpoint's id")),
    request_body = ReasonOnly,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 200, description = "Rotated, with the new secret", body = EndpointWithSecret),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`endpoint_from_config`: change its secret in the file", body = ErrorBody),
        (status = 422, description = "`reason_required`", body = ErrorBody),
    ),
)]
async fn rotate_endpoint(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Json<EndpointWithSecret>, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let overlap = std::time::Duration::from_secs(state.ctx.config.platform.rotation_overlap_secs);
    let mut tx = state.ctx.pool.begin().await?;
    let (endpoint, secret) = endpoint::rotate(
        &mut tx,
        &state.ctx.keys,
        id,
        overlap,
        &actor.name,
        &request.reason,
    )
    .await
    .map_err(refused)?;
    tx.commit().await?;
    Ok(Json(EndpointWithSecret {
        endpoint,
        secret: secret.expose(),
    }))
}

async fn set_disabled(
    state: &AppState,
    actor: &Actor,
    headers: &HeaderMap,
    id: Uuid,
    disabled: bool,
    request: &ReasonOnly,
) -> Result<Answer, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let verb = if disabled { "disable" } else { "enable" };
    let path = format!("POST /admin/v1/platform/endpoints/{id}/{verb}");
    let mut action = crate::begin_action!(state, actor, headers, &request.reason, &path, request);
    let info = endpoint::set_disabled(&mut action.tx, id, disabled, &actor.name, &request.reason)
        .await
        .map_err(refused)?;
    action.finish(answer(StatusCode::OK, info)?).await
}

/// Stop sending to an endpoint: new events are not due to it, and its
/// pending deliveries wait until it is enabled again.
#[utoipa::path(
    post, path = "/admin/v1/platform/endpoints/{id}/disable", tag = "platform_events",
    params(("id" = Uuid, Path, description = "The endpoint's id"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 200, description = "Disabled", body = EndpointInfo),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`endpoint_from_config`: remove it from the file", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn disable_endpoint(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    set_disabled(&state, &actor, &headers, id, true, &request).await
}

/// Send to a disabled endpoint again, its waiting deliveries first.
#[utoipa::path(
    post, path = "/admin/v1/platform/endpoints/{id}/enable", tag = "platform_events",
    params(("id" = Uuid, Path, description = "The endpoint's id"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 200, description = "Enabled", body = EndpointInfo),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`endpoint_from_config`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn enable_endpoint(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    set_disabled(&state, &actor, &headers, id, false, &request).await
}

/// Which deliveries (each filter optional).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeliveryFilter {
    /// `pending`, `delivered` or `failed`.
    status: Option<String>,
    /// The endpoint's name.
    endpoint: Option<String>,
    code_id: Option<Uuid>,
    order_id: Option<Uuid>,
    event_id: Option<Uuid>,
    /// At most this many (default 100, at most 500).
    limit: Option<i64>,
}

/// Deliveries, newest event first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryEntry>,
}

/// The delivery log: each event's delivery to each endpoint, newest first.
#[utoipa::path(
    get, path = "/admin/v1/platform/deliveries", tag = "platform_events",
    params(DeliveryFilter),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "Deliveries, newest event first", body = DeliveryList)),
)]
async fn list_deliveries(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<DeliveryFilter>,
) -> Result<Json<DeliveryList>, ApiError> {
    actor.require(Role::Support)?;
    let filter = Filter {
        status: f.status,
        endpoint: f.endpoint,
        code_id: f.code_id,
        order_id: f.order_id,
        event_id: f.event_id,
        limit: f.limit.unwrap_or(100).clamp(1, 500),
    };
    Ok(Json(DeliveryList {
        deliveries: log::list(&state.ctx.pool, &filter).await?,
    }))
}

/// A delivery with every attempt and the event's data.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryDetail {
    pub delivery: DeliveryEntry,
    /// Oldest first.
    pub attempts: Vec<AttemptEntry>,
    /// The event's `data`, as sent.
    pub data: Value,
}

/// One delivery: every attempt (when, the status that came back, how long
/// it took) and the event's data.
#[utoipa::path(
    get, path = "/admin/v1/platform/deliveries/{id}", tag = "platform_events",
    params(("id" = Uuid, Path, description = "The delivery's id")),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The delivery", body = DeliveryDetail),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ),
)]
async fn get_delivery(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    actor.require(Role::Support)?;
    let (delivery, attempts, data) = log::get(&state.ctx.pool, id)
        .await?
        .ok_or_else(|| not_found("platform delivery"))?;
    Ok(Json(DeliveryDetail {
        delivery,
        attempts,
        data,
    }))
}

/// Send a delivery again now, whatever its state (under the same
/// `webhook-id`); a failed one's finding is resolved.
#[utoipa::path(
    post, path = "/admin/v1/platform/deliveries/{id}/replay", tag = "platform_events",
    params(("id" = Uuid, Path, description = "The delivery's id"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Due again now", body = DeliveryEntry),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn replay_delivery(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    require_reason(&request.reason)?;
    let path = format!("POST /admin/v1/platform/deliveries/{id}/replay");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let entry = log::replay(&mut action.tx, id, &actor.name, &request.reason)
        .await?
        .ok_or_else(|| not_found("platform delivery"))?;
    action.finish(answer(StatusCode::OK, entry)?).await
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_endpoints, create_endpoint))
        .routes(routes!(rotate_endpoint))
        .routes(routes!(disable_endpoint))
        .routes(routes!(enable_endpoint))
        .routes(routes!(list_deliveries))
        .routes(routes!(get_delivery))
        .routes(routes!(replay_delivery))
}
