//! Admin-only: API tokens and the product catalogue.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use entitle_jobs::{
    catalogue::Catalogue,
    token::{self, CreateError, Role},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    Answer, IdempotencyKey, ReasonOnly, answer, conflict, not_found, require_reason,
    views::{Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Every API token, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenSummary>,
}

/// An API token: its name and role, never the token.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenSummary {
    /// The actor in the audit events of whoever uses it.
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
}

/// API tokens (names, roles, last use).
#[utoipa::path(
    get, path = "/admin/v1/tokens", tag = "tokens",
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses((status = 200, description = "Every token, revoked ones too", body = TokenList)),
)]
async fn list_tokens(
    actor: Actor,
    State(state): State<AppState>,
) -> Result<Json<TokenList>, ApiError> {
    actor.require(Role::Admin)?;
    let tokens: Value = sqlx::query_scalar(
        "SELECT coalesce(json_agg(json_build_object('name', name, 'role', role, 'created_by', created_by,
                    'created_at', created_at, 'revoked_at', revoked_at, 'last_used_at', last_used_at)
                    ORDER BY created_at), '[]') FROM api_token",
    )
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(TokenList {
        tokens: conform("the token list", tokens)?,
    }))
}

/// A token to create, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "name": "alice", "role": "support", "reason": "new support agent" })))]
struct TokenRequest {
    /// 1 to 100 characters, unique among active tokens.
    name: String,
    role: Role,
    reason: String,
}

/// A new token: the only time it is shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub name: String,
    pub role: Role,
    /// `ent_…`: send as `Authorization: Bearer <token>`. Only its hash is
    /// kept.
    pub token: String,
}

/// Create a token; it is shown once.
///
/// Not idempotent by key: the token is shown once and never stored, so a
/// replayed answer could not carry it. A retry with the same name is refused.
#[utoipa::path(
    post, path = "/admin/v1/tokens", tag = "tokens",
    request_body = TokenRequest,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 201, description = "Created", body = TokenCreated),
        (status = 409, description = "`token_name_taken`: an active token has that name", body = ErrorBody),
        (status = 422, description = "`invalid_request` (name), `reason_required`", body = ErrorBody),
    ),
)]
async fn create_token(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
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
            Json(TokenCreated {
                name: request.name,
                role: request.role,
                token,
            }),
        )),
        Err(CreateError::NameTaken(name)) => Err(conflict(
            "token_name_taken",
            format!("an active token is named {name}"),
        )),
        Err(CreateError::Database(e)) => Err(e.into()),
    }
}

/// A token revoked.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenRevoked {
    pub name: String,
    pub revoked: bool,
}

/// Revoke a token.
#[utoipa::path(
    post, path = "/admin/v1/tokens/{name}/revoke", tag = "tokens",
    params(("name" = String, Path, description = "The token's name"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 200, description = "Revoked: it no longer works", body = TokenRevoked),
        (status = 404, description = "`not_found`: no active token has that name", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn revoke_token(
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
    let revoked = TokenRevoked {
        name,
        revoked: true,
    };
    action.finish(answer(StatusCode::OK, revoked)?).await
}

/// The catalogue's products.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductList {
    pub products: Vec<Product>,
}

/// What a code entitles to, and the channels' references that name it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Product {
    pub sku: String,
    pub name: String,
    /// Codes expire this many days after issue.
    pub validity_days: i32,
    pub email_template: String,
    pub active: bool,
    pub references: Vec<ChannelReference>,
}

/// A channel's name for a product (a Stripe price, a Shopify variant or
/// SKU, a native SKU).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChannelReference {
    pub channel: String,
    pub reference: String,
}

/// Products and their channel references.
#[utoipa::path(
    get, path = "/admin/v1/products", tag = "products",
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "Every product, by SKU", body = ProductList)),
)]
async fn list_products(
    actor: Actor,
    State(state): State<AppState>,
) -> Result<Json<ProductList>, ApiError> {
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
    Ok(Json(ProductList {
        products: conform("the product list", products)?,
    }))
}

/// The catalogue, reloaded.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CatalogueReloaded {
    /// Products in the file.
    pub products: usize,
}

/// Reload the catalogue file into the database.
///
/// Products live in the catalogue file; this re-reads it without a restart.
#[utoipa::path(
    post, path = "/admin/v1/products/reload", tag = "products",
    request_body = ReasonOnly,
    security(("bearer" = ["admin"])),
    extensions(("x-entitle-role" = json!("admin"))),
    responses(
        (status = 200, description = "Reloaded", body = CatalogueReloaded),
        (status = 422, description = "`catalogue_invalid`, `reason_required`", body = ErrorBody),
    ),
)]
async fn reload_products(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Json<CatalogueReloaded>, ApiError> {
    actor.require(Role::Admin)?;
    require_reason(&request.reason)?;
    let catalogue = Catalogue::load(&state.ctx.config.catalogue.file).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "catalogue_invalid",
            format!("{e:#}"),
        )
    })?;
    // Audited as `catalogue.synced`, with the version before and after.
    catalogue
        .sync(&state.ctx.pool, &actor.name, &request.reason)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(CatalogueReloaded {
        products: catalogue.product.len(),
    }))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(list_products))
        .routes(routes!(reload_products))
}
