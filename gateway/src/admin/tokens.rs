//! Admin-only: API tokens and the product catalogue.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use entitle_jobs::{
    audit::{self, AuditEvent},
    catalogue::Catalogue,
    token::{self, CreateError, Role},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Answer, conflict, not_found, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

async fn list(actor: Actor, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Admin)?;
    let tokens: Value = sqlx::query_scalar(
        "SELECT coalesce(json_agg(json_build_object('name', name, 'role', role, 'created_by', created_by,
                    'created_at', created_at, 'revoked_at', revoked_at, 'last_used_at', last_used_at)
                    ORDER BY created_at), '[]') FROM api_token",
    )
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(json!({ "tokens": tokens })))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    role: Role,
    reason: String,
}

/// Not idempotent by key: the token is shown once and never stored, so a
/// replayed answer could not carry it. A retry with the same name is refused.
async fn create(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Admin)?;
    if request.name.trim().is_empty() || request.name.len() > 100 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "name must be 1 to 100 characters",
        ));
    }
    match token::create(
        &state.ctx.pool,
        &request.name,
        request.role,
        &actor.name,
        &request.reason,
    )
    .await
    {
        Ok(token) => Ok((
            StatusCode::CREATED,
            Json(json!({ "name": request.name, "role": request.role, "token": token })),
        )),
        Err(CreateError::NameTaken(name)) => Err(conflict(
            "token_name_taken",
            format!("an active token is named {name}"),
        )),
        Err(CreateError::Database(e)) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ReasonOnly {
    reason: String,
}

async fn revoke(
    actor: Actor,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let path = format!("POST /admin/v1/tokens/{name}/revoke");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let role: Option<String> = sqlx::query_scalar(
        "UPDATE api_token SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL RETURNING role",
    )
    .bind(&name)
    .fetch_optional(&mut *action.tx)
    .await?;
    let role = role.ok_or_else(|| not_found("active token with that name"))?;
    action
        .audit(
            "token.revoked",
            "token",
            name.clone(),
            json!({ "before": { "role": role, "active": true }, "after": { "active": false } }),
        )
        .await?;
    let answer = (
        StatusCode::OK,
        Json(json!({ "name": name, "revoked": true })),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
}

async fn products(actor: Actor, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    let products: Value = sqlx::query_scalar(
        "SELECT coalesce(json_agg(json_build_object('sku', p.sku, 'name', p.name,
                    'validity_days', p.validity_days, 'email_template', p.email_template, 'active', p.active,
                    'references', (SELECT coalesce(json_agg(json_build_object('channel', cp.channel,
                                        'reference', cp.reference) ORDER BY cp.channel, cp.reference), '[]')
                                   FROM channel_product cp WHERE cp.product_id = p.id)) ORDER BY p.sku), '[]')
         FROM product p",
    )
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(json!({ "products": products })))
}

/// Products live in the catalogue file; this re-reads it without a restart.
async fn reload(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let catalogue = Catalogue::load(&state.ctx.config.catalogue.file).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "catalogue_invalid",
            format!("{e:#}"),
        )
    })?;
    catalogue
        .sync(&state.ctx.pool)
        .await
        .map_err(ApiError::internal)?;
    let mut conn = state.ctx.pool.acquire().await?;
    audit::record(
        &mut conn,
        AuditEvent {
            actor: &actor.name,
            action: "catalogue.reloaded",
            subject_type: "catalogue",
            subject_id: state.ctx.config.catalogue.file.display().to_string(),
            reason: Some(&request.reason),
            data: json!({ "before": null, "after": { "products": catalogue.product.len() } }),
        },
    )
    .await?;
    Ok((
        StatusCode::OK,
        Json(json!({ "products": catalogue.product.len() })),
    ))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/tokens", get(list).post(create))
        .route("/admin/v1/tokens/{name}/revoke", post(revoke))
        .route("/admin/v1/products", get(products))
        .route("/admin/v1/products/reload", post(reload))
}
