//! Codes: look one up (by id, or as a customer typed it), and the support
//! actions on it: revoke, reissue, reassign, unassign, change expiry. The
//! rules are [`entitle_jobs::lifecycle`]'s; these handlers parse, call it
//! inside an idempotent action, and answer.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use entitle_jobs::{code::Code, lifecycle, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    Answer, not_found,
    orders::{CODE_JSON, DELIVERY_JSON, EVENT_JSON, ExpiryRequest},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

/// Everything support needs to know about one code.
pub async fn code_view(pool: &sqlx::PgPool, id: Uuid) -> Result<Option<Value>, sqlx::Error> {
    let sql = format!(
        "SELECT ({CODE_JSON})::jsonb || jsonb_build_object(
            'product', json_build_object('sku', p.sku, 'name', p.name),
            'origin', CASE
                WHEN c.order_line_id IS NOT NULL THEN json_build_object('type', 'order_line',
                    'order_id', o.id, 'channel', o.channel, 'channel_order_id', o.channel_order_id,
                    'line_index', l.line_index, 'unit_index', c.unit_index)
                WHEN c.batch_id IS NOT NULL THEN json_build_object('type', 'batch', 'batch_id', b.id,
                    'kind', b.kind, 'reason', b.reason, 'requested_by', b.requested_by,
                    'order_id', b.order_id, 'account_id', b.account_id)
                ELSE json_build_object('type', 'none') END,
            'assignments', (SELECT coalesce(json_agg(json_build_object('account_id', a.account_id,
                                'entity_ref', a.entity_ref, 'assigned_at', a.assigned_at,
                                'assigned_by', a.assigned_by, 'ended_at', a.ended_at,
                                'ended_reason', a.ended_reason) ORDER BY a.assigned_at), '[]')
                            FROM assignment a WHERE a.code_id = c.id),
            'reissue_chain', (WITH RECURSIVE back(id, replaces, depth) AS (
                                  SELECT x.id, x.replaces, 0 FROM activation_code x WHERE x.id = c.id
                                  UNION ALL
                                  SELECT y.id, y.replaces, back.depth - 1 FROM activation_code y
                                  JOIN back ON y.id = back.replaces),
                              fwd(id, depth) AS (
                                  SELECT x.id, 0 FROM activation_code x WHERE x.id = c.id
                                  UNION ALL
                                  SELECT y.id, fwd.depth + 1 FROM activation_code y
                                  JOIN fwd ON y.replaces = fwd.id),
                              chain AS (SELECT id, depth FROM back UNION SELECT id, depth FROM fwd)
                              SELECT json_agg(json_build_object('id', z.id, 'last4', z.last4,
                                         'state', z.state) ORDER BY chain.depth)
                              FROM chain JOIN activation_code z ON z.id = chain.id),
            'deliveries', (SELECT coalesce(json_agg({DELIVERY_JSON} ORDER BY d.created_at), '[]')
                           FROM email_delivery d JOIN email_delivery_code dc ON dc.delivery_id = d.id
                           WHERE dc.code_id = c.id),
            'refusals', (SELECT coalesce(json_agg(json_build_object('refused_at', r.refused_at,
                                'reason', r.reason, 'account_id', r.account_id,
                                'entity_ref', r.entity_ref) ORDER BY r.id DESC), '[]')
                         FROM redemption_refusal r WHERE r.code_id = c.id),
            'history', (SELECT coalesce(json_agg({EVENT_JSON} ORDER BY e.id), '[]') FROM audit_event e
                        WHERE (e.subject_type = 'code' AND e.subject_id = c.id::text)
                           OR (e.subject_type = 'batch' AND e.subject_id = c.batch_id::text)))
         FROM activation_code c
         JOIN product p ON p.id = c.product_id
         LEFT JOIN order_line l ON l.id = c.order_line_id
         LEFT JOIN orders o ON o.id = l.order_id
         LEFT JOIN code_batch b ON b.id = c.batch_id
         WHERE c.id = $1"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await
}

async fn show(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    code_view(&state.ctx.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found("code"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Lookup {
    code: String,
}

/// By POST so a full code never lands in a URL or an access log.
async fn lookup(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<Lookup>,
) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    let code = Code::parse(&request.code).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "code_malformed",
            e.to_string(),
        )
    })?;
    let id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM activation_code WHERE code_hash = $1")
            .bind(state.ctx.keys.hash(&code))
            .fetch_optional(&state.ctx.pool)
            .await?;
    let id = id.ok_or_else(|| not_found("code"))?;
    code_view(&state.ctx.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found("code"))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    reason: String,
    #[serde(default)]
    include_redeemed: bool,
}

/// An action's outcome as its answer.
fn answer(status: StatusCode, outcome: impl Serialize) -> Answer {
    (status, Json(json!(outcome)))
}

async fn revoke(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<RevokeRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/codes/{id}/revoke");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let revoked = lifecycle::revoke(&mut action.tx, who, id, request.include_redeemed).await?;
    action.finish(answer(StatusCode::OK, revoked)).await
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ReissueRequest {
    reason: String,
    /// A corrected address; by default the order's recipient.
    email: Option<String>,
    /// Reissue a code already replaced, or revoked by a refund.
    #[serde(default)]
    force: bool,
}

async fn reissue(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReissueRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/codes/{id}/reissue");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let reissued = lifecycle::reissue(
        &mut action.tx,
        &state.ctx,
        who,
        id,
        request.email.as_deref(),
        request.force,
    )
    .await?;
    action.finish(answer(StatusCode::CREATED, reissued)).await
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ReassignRequest {
    reason: String,
    account_id: String,
    entity_ref: String,
}

async fn reassign(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReassignRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/codes/{id}/reassign");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let to = lifecycle::Holder {
        account_id: request.account_id.clone(),
        entity_ref: request.entity_ref.clone(),
    };
    let reassigned = lifecycle::reassign(&mut action.tx, who, id, to).await?;
    action.finish(answer(StatusCode::OK, reassigned)).await
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ReasonOnly {
    reason: String,
}

async fn unassign(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/codes/{id}/unassign");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let unassigned = lifecycle::unassign(&mut action.tx, who, id).await?;
    action.finish(answer(StatusCode::OK, unassigned)).await
}

async fn expiry(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ExpiryRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/codes/{id}/expiry");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let changed = lifecycle::change_expiry(&mut action.tx, who, id, request.expires_at).await?;
    action.finish(answer(StatusCode::OK, changed)).await
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/codes/{id}", get(show))
        .route("/admin/v1/codes/lookup", post(lookup))
        .route("/admin/v1/codes/{id}/revoke", post(revoke))
        .route("/admin/v1/codes/{id}/reissue", post(reissue))
        .route("/admin/v1/codes/{id}/reassign", post(reassign))
        .route("/admin/v1/codes/{id}/unassign", post(unassign))
        .route("/admin/v1/codes/{id}/expiry", post(expiry))
}
