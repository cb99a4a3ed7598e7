//! Admin-only: the platform's API keys (`/admin/v1/platform-keys`). Like
//! staff tokens they are shown once, listed by name and revoked, every
//! change audited; unlike them they can call only `/v1`.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use entitle_jobs::{
    platform_key::{self, KeyError, KeyInfo},
    token::Role,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{IdempotencyKey, ReasonOnly, answer, conflict, not_found, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Every platform key, active and revoked.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub platform_keys: Vec<KeyInfo>,
}

/// Platform keys (names, last use; never the keys).
#[utoipa::path(
    get, path = "/admin/v1/platform-keys", tag = "platform_keys",
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses((status = 200, description = "Every key, revoked ones too", body = KeyList)),
)]
async fn list_platform_keys(
    actor: Actor,
    State(state): State<AppState>,
) -> Result<Json<KeyList>, ApiError> {
    actor.require(Role::Admin)?;
    Ok(Json(KeyList {
        platform_keys: platform_key::list(&state.ctx.pool).await?,
    }))
}

/// A platform key to create, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "name": "shop-app", "reason": "the shop's redeem form" })))]
pub struct CreateKey {
    /// Recorded as `platform:<name>` on each redemption made with the key.
    pub name: String,
    pub reason: String,
}

/// A new key: the only answer that ever carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub platform_key: KeyInfo,
    /// `entp_…`: the platform sends it as `Authorization: Bearer <key>`.
    /// Only its keyed hash is kept.
    pub key: String,
}

fn refused(e: KeyError) -> ApiError {
    match e {
        KeyError::NameTaken(name) => conflict(
            "platform_key_name_taken",
            format!("an active platform key is named {name}"),
        ),
        KeyError::NotFound(_) => not_found("active platform key with that name"),
        KeyError::BadName => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            e.to_string(),
        ),
        KeyError::Database(e) => e.into(),
    }
}

/// Create a platform key; it is shown once.
///
/// Not idempotent by key, as for staff tokens: the key is never stored, so
/// a replayed answer could not carry it. A retry with the same name is
/// refused.
#[utoipa::path(
    post, path = "/admin/v1/platform-keys", tag = "platform_keys",
    request_body = CreateKey,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 201, description = "Created", body = CreatedKey),
        (status = 409, description = "`platform_key_name_taken`: an active key has that name", body = ErrorBody),
        (status = 422, description = "`invalid_request` (name), `reason_required`", body = ErrorBody),
    ),
)]
async fn create_platform_key(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let (info, key) = platform_key::create(
        &state.ctx.pool,
        &state.ctx.keys,
        &request.name,
        &actor.name,
        &request.reason,
    )
    .await
    .map_err(refused)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            platform_key: info,
            key,
        }),
    ))
}

/// Revoke a platform key: gateways refuse it within
/// `gateway.platform_key_cache_secs`.
#[utoipa::path(
    post, path = "/admin/v1/platform-keys/{name}/revoke", tag = "platform_keys",
    params(("name" = String, Path, description = "The key's name"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 200, description = "Revoked", body = KeyInfo),
        (status = 404, description = "`not_found`: no active key has that name", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn revoke_platform_key(
    actor: Actor,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<super::Answer, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let path = format!("POST /admin/v1/platform-keys/{name}/revoke");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let info = platform_key::revoke(&mut action.tx, &name, &actor.name, &request.reason)
        .await
        .map_err(refused)?;
    action.finish(answer(StatusCode::OK, info)?).await
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_platform_keys, create_platform_key))
        .routes(routes!(revoke_platform_key))
}
