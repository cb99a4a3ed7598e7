//! Admin-only: the platform's API keys (`/admin/v1/platform-keys`). Like
//! staff tokens they are shown once, listed by name and revoked, every
//! change audited; unlike them they can call only `/v1`.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use entitle_jobs::{
    platform_key::{self, KeyError, KeyInfo},
    token::Role,
};
use serde::{Deserialize, Serialize};

use super::{conflict, not_found, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

/// Every platform key, active and revoked.
#[derive(Debug, Serialize)]
pub struct KeyList {
    pub platform_keys: Vec<KeyInfo>,
}

async fn list(actor: Actor, State(state): State<AppState>) -> Result<Json<KeyList>, ApiError> {
    actor.require(Role::Admin)?;
    Ok(Json(KeyList {
        platform_keys: platform_key::list(&state.ctx.pool).await?,
    }))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Recorded as `platform:<name>` on each redemption made with the key.
    pub name: String,
    pub reason: String,
}

/// A new key: the only answer that ever carries it.
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: KeyInfo,
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

/// Not idempotent by key, as for staff tokens: the key is never stored, so
/// a replayed answer could not carry it. A retry with the same name is
/// refused.
async fn create(
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
    Ok((StatusCode::CREATED, Json(CreatedKey { info, key })))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeKey {
    pub reason: String,
}

async fn revoke(
    actor: Actor,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<RevokeKey>,
) -> Result<super::Answer, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let path = format!("POST /admin/v1/platform-keys/{name}/revoke");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let info = platform_key::revoke(&mut action.tx, &name, &actor.name, &request.reason)
        .await
        .map_err(refused)?;
    let answer = (
        StatusCode::OK,
        Json(serde_json::to_value(&info).map_err(ApiError::internal)?),
    );
    action.finish(answer).await
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/platform-keys", get(list).post(create))
        .route("/admin/v1/platform-keys/{name}/revoke", post(revoke))
}
