//! Codes: look one up (by id, or as a customer typed it), and the support
//! actions on it: revoke, reissue, reassign, unassign, change expiry. The
//! rules are [`entitle_jobs::lifecycle`]'s; these handlers parse, call it
//! inside an idempotent action, and answer.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use entitle_jobs::{code::Code, lifecycle, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    Answer, IdempotencyKey, ReasonOnly, answer_as, not_found,
    orders::{CODE_JSON, DELIVERY_JSON, EVENT_JSON, ExpiryRequest},
    outcomes::{self, CodeState},
    views::{AuditEntry, DeliverySummary, Holding, Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Everything support needs to know about one code: its product, origin,
/// holders past and present, reissue chain, deliveries, refused
/// redemptions and history. Never the code, only its last four symbols.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CodeView {
    pub id: Uuid,
    pub last4: String,
    /// `••••-••••-••••-` and the last four symbols.
    pub masked: String,
    pub product_sku: String,
    pub state: CodeState,
    /// The unit of its order line; null for a batch's code.
    pub unit_index: Option<i32>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub redeemed_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub expired_at: Option<Timestamp>,
    /// The code this one replaced.
    pub replaces: Option<Uuid>,
    /// The code that replaced this one.
    pub replaced_by: Option<Uuid>,
    /// Who holds it now; null unless redeemed.
    pub assignment: Option<Holding>,
    pub product: ProductName,
    pub origin: Origin,
    /// Every holder it had, the current one last.
    pub assignments: Vec<PastHolding>,
    /// The codes it replaced and that replaced it, oldest first, itself
    /// included.
    pub reissue_chain: Vec<ChainLink>,
    pub deliveries: Vec<DeliverySummary>,
    /// Redemptions refused for it, latest first.
    pub refusals: Vec<Refusal>,
    /// Audit events about the code and its batch, oldest first.
    pub history: Vec<AuditEntry>,
}

/// A product's SKU and name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductName {
    pub sku: String,
    pub name: String,
}

/// Where a code came from: a unit of an order line, or a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Origin {
    /// Issued for a unit of a paid order.
    OrderLine {
        order_id: Uuid,
        channel: String,
        channel_order_id: String,
        line_index: i32,
        unit_index: i32,
    },
    /// Created outside checkout.
    Batch {
        batch_id: Uuid,
        /// `customer_service`, `partner_distribution`, `test_account` or
        /// `replacement`.
        kind: String,
        reason: String,
        requested_by: String,
        order_id: Option<Uuid>,
        account_id: Option<String>,
    },
    /// Neither (nothing in Entitle makes one; reconciliation reports it).
    None,
}

/// A holder a code had.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PastHolding {
    pub account_id: String,
    pub entity_ref: String,
    pub assigned_at: Timestamp,
    pub assigned_by: String,
    /// Null for the current holder.
    pub ended_at: Option<Timestamp>,
    /// `reassigned`, `unassigned`, `revoked`, ...
    pub ended_reason: Option<String>,
}

/// A code in a reissue chain.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChainLink {
    pub id: Uuid,
    pub last4: String,
    pub state: CodeState,
}

/// A redemption refused for a code.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Refusal {
    pub refused_at: Timestamp,
    /// The error code the redeemer got: `code_expired`, `code_revoked`,
    /// `code_already_redeemed`.
    pub reason: String,
    pub account_id: Option<String>,
    pub entity_ref: Option<String>,
}

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

/// A code: product, state, origin, expiry, assignment, reissue chain, deliveries, history.
#[utoipa::path(
    get, path = "/admin/v1/codes/{id}", tag = "codes",
    params(("id" = Uuid, Path, description = "The code's id (not the code)")),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The code's whole story", body = CodeView),
        (status = 404, description = "`not_found`: no such code", body = ErrorBody),
    ),
)]
async fn show_code(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<CodeView>, ApiError> {
    actor.require(Role::Support)?;
    let view = code_view(&state.ctx.pool, id)
        .await?
        .ok_or_else(|| not_found("code"))?;
    Ok(Json(conform("the code view", view)?))
}

/// A code as a customer typed it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "code": "0000-0000-0000-0000" })))]
struct CodeLookup {
    /// Any case, with or without spaces and dashes.
    code: String,
}

/// The same, for a code as a customer typed it.
///
/// By POST so a full code never lands in a URL or an access log.
#[utoipa::path(
    post, path = "/admin/v1/codes/lookup", tag = "codes",
    request_body = CodeLookup,
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The code's whole story", body = CodeView),
        (status = 404, description = "`not_found`: no code matches", body = ErrorBody),
        (status = 422, description = "`code_malformed`: not a code (its check symbol is wrong)", body = ErrorBody),
    ),
)]
async fn look_up_code(
    actor: Actor,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CodeLookup>,
) -> Result<Json<CodeView>, ApiError> {
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
    let view = code_view(&state.ctx.pool, id)
        .await?
        .ok_or_else(|| not_found("code"))?;
    Ok(Json(conform("the code view", view)?))
}

/// Revoke a code, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "reason": "fraud", "include_redeemed": false })))]
struct RevokeRequest {
    reason: String,
    /// Revoke it even if redeemed: its holder loses it.
    #[serde(default)]
    include_redeemed: bool,
}

/// Revoke a code (a redeemed one only with include_redeemed).
#[utoipa::path(
    post, path = "/admin/v1/codes/{id}/revoke", tag = "codes",
    params(("id" = Uuid, Path, description = "The code's id"), IdempotencyKey),
    request_body = RevokeRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Revoked", body = outcomes::Revoked),
        (status = 404, description = "`not_found`: no such code", body = ErrorBody),
        (status = 409, description = "`code_already_revoked`, `code_already_redeemed` (without include_redeemed), `code_expired`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn revoke_code(
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
    action
        .finish(answer_as::<outcomes::Revoked>(StatusCode::OK, revoked)?)
        .await
}

/// Reissue a code, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "reason": "lost", "email": "new@example.com" })))]
struct ReissueRequest {
    reason: String,
    /// A corrected address; by default the order's recipient.
    email: Option<String>,
    /// Reissue a code already replaced, or revoked by a refund.
    #[serde(default)]
    force: bool,
}

/// Revoke a code and email a replacement linked to it.
#[utoipa::path(
    post, path = "/admin/v1/codes/{id}/reissue", tag = "codes",
    params(("id" = Uuid, Path, description = "The code's id"), IdempotencyKey),
    request_body = ReissueRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 201, description = "Replaced; the replacement is on its way", body = outcomes::Reissued),
        (status = 404, description = "`not_found`: no such code", body = ErrorBody),
        (status = 409, description = "`code_already_replaced` or `code_revoked_by_refund` (without force), `code_already_redeemed`, `code_already_revoked`, `code_expired`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `email_required` (a code of no order), `invalid_email`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn reissue_code(
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
    action
        .finish(answer_as::<outcomes::Reissued>(
            StatusCode::CREATED,
            reissued,
        )?)
        .await
}

/// Move a redeemed code, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "reason": "wrong profile", "account_id": "acct_2", "entity_ref": "child_1" })))]
struct ReassignRequest {
    reason: String,
    account_id: String,
    entity_ref: String,
}

/// Move a redeemed code to another account or entity.
#[utoipa::path(
    post, path = "/admin/v1/codes/{id}/reassign", tag = "codes",
    params(("id" = Uuid, Path, description = "The code's id"), IdempotencyKey),
    request_body = ReassignRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Reassigned", body = outcomes::Reassigned),
        (status = 404, description = "`not_found`: no such code", body = ErrorBody),
        (status = 409, description = "`code_not_redeemed`, `code_already_revoked`, `code_expired`: only a redeemed code moves", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_request`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn reassign_code(
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
    action
        .finish(answer_as::<outcomes::Reassigned>(
            StatusCode::OK,
            reassigned,
        )?)
        .await
}

/// Return a redeemed code to issued.
#[utoipa::path(
    post, path = "/admin/v1/codes/{id}/unassign", tag = "codes",
    params(("id" = Uuid, Path, description = "The code's id"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Issued again: anyone holding it can redeem it", body = outcomes::Unassigned),
        (status = 404, description = "`not_found`: no such code", body = ErrorBody),
        (status = 409, description = "`code_not_redeemed`, `code_already_revoked`, `code_expired`: only a redeemed code is unassigned", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn unassign_code(
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
    action
        .finish(answer_as::<outcomes::Unassigned>(
            StatusCode::OK,
            unassigned,
        )?)
        .await
}

/// Change a code's expiry.
#[utoipa::path(
    post, path = "/admin/v1/codes/{id}/expiry", tag = "codes",
    params(("id" = Uuid, Path, description = "The code's id"), IdempotencyKey),
    request_body = ExpiryRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Moved to the new expiry", body = outcomes::ExpiryChanged),
        (status = 404, description = "`not_found`: no such code", body = ErrorBody),
        (status = 409, description = "`code_already_revoked` (a revoked code keeps its expiry), `code_already_replaced` (change its replacement's)", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn change_code_expiry(
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
    action
        .finish(answer_as::<outcomes::ExpiryChanged>(
            StatusCode::OK,
            changed,
        )?)
        .await
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show_code))
        .routes(routes!(look_up_code))
        .routes(routes!(revoke_code))
        .routes(routes!(reissue_code))
        .routes(routes!(reassign_code))
        .routes(routes!(unassign_code))
        .routes(routes!(change_code_expiry))
}
