//! Codes: look one up (by id, or as a customer typed it), and the support
//! actions on it: revoke, reissue, reassign, unassign, change expiry. Each
//! locks the code, checks its state and changes it with one audit event.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use entitle_jobs::{
    code::Code,
    delivery::{self, CodeSelection, NewDelivery},
    issuance,
    token::Role,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{
    Answer, conflict, not_found,
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

/// A code locked for an action, with what the action needs to know.
struct Locked {
    state: String,
    last4: String,
    product_id: Uuid,
    order_id: Option<Uuid>,
    account_id: Option<String>,
    holder: Option<String>,
    holder_name: Option<String>,
}

async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Locked, ApiError> {
    let row = sqlx::query(
        "SELECT c.state, c.last4, c.product_id, coalesce(l.order_id, b.order_id) AS order_id,
                coalesce(o.account_id, b.account_id) AS account_id,
                coalesce(o.gift_recipient_email, o.buyer_email) AS holder,
                coalesce(o.gift_recipient_name, o.buyer_name) AS holder_name
         FROM activation_code c
         LEFT JOIN order_line l ON l.id = c.order_line_id
         LEFT JOIN code_batch b ON b.id = c.batch_id
         LEFT JOIN orders o ON o.id = coalesce(l.order_id, b.order_id)
         WHERE c.id = $1 FOR UPDATE OF c",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| not_found("code"))?;
    Ok(Locked {
        state: row.get("state"),
        last4: row.get("last4"),
        product_id: row.get("product_id"),
        order_id: row.get("order_id"),
        account_id: row.get("account_id"),
        holder: row.get("holder"),
        holder_name: row.get("holder_name"),
    })
}

fn state_conflict(state: &str) -> ApiError {
    match state {
        "redeemed" => conflict("code_already_redeemed", "the code is redeemed"),
        "revoked" => conflict("code_already_revoked", "the code is already revoked"),
        "expired" => conflict("code_expired", "the code has expired"),
        _ => conflict("code_issued", "the code is not redeemed"),
    }
}

async fn end_assignment(
    conn: &mut PgConnection,
    id: Uuid,
    why: &str,
) -> Result<Option<Value>, ApiError> {
    let ended: Option<(String, String)> = sqlx::query_as(
        "UPDATE assignment SET ended_at = now(), ended_reason = $2
         WHERE code_id = $1 AND ended_at IS NULL RETURNING account_id, entity_ref",
    )
    .bind(id)
    .bind(why)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(ended.map(
        |(account_id, entity_ref)| json!({ "account_id": account_id, "entity_ref": entity_ref }),
    ))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    reason: String,
    #[serde(default)]
    include_redeemed: bool,
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
    let code = lock(&mut action.tx, id).await?;
    let allowed = code.state == "issued" || (code.state == "redeemed" && request.include_redeemed);
    if !allowed {
        return Err(state_conflict(&code.state));
    }
    sqlx::query("UPDATE activation_code SET state = 'revoked', revoked_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *action.tx)
        .await?;
    let assignment = end_assignment(&mut action.tx, id, "revoked").await?;
    action
        .audit(
            "code.revoked",
            "code",
            id.to_string(),
            json!({
                "last4": code.last4,
                "before": { "state": code.state, "assignment": assignment },
                "after": { "state": "revoked" },
            }),
        )
        .await?;
    let answer = (
        StatusCode::OK,
        Json(json!({ "id": id, "last4": code.last4, "state": "revoked" })),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ReissueRequest {
    reason: String,
    /// A corrected address; by default the order's recipient.
    email: Option<String>,
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
    let code = lock(&mut action.tx, id).await?;
    if code.state == "redeemed" {
        return Err(state_conflict("redeemed"));
    }
    let recipient = request
        .email
        .clone()
        .or(code.holder.clone())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "email_required",
                "the code has no order to send the replacement to; give email",
            )
        })?;
    if recipient.parse::<lettre::Address>().is_err() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_email",
            "email is not an address",
        ));
    }
    if code.state == "issued" {
        sqlx::query(
            "UPDATE activation_code SET state = 'revoked', revoked_at = now() WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *action.tx)
        .await?;
    }
    let batch_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO code_batch (id, product_id, kind, quantity, requested_by, reason, account_id, order_id)
         VALUES ($1, $2, 'replacement', 1, $3, $4, $5, $6)",
    )
    .bind(batch_id)
    .bind(code.product_id)
    .bind(&actor.name)
    .bind(&request.reason)
    .bind(&code.account_id)
    .bind(code.order_id)
    .execute(&mut *action.tx)
    .await?;
    let issued = issuance::issue_batch_codes(
        &mut action.tx,
        &state.ctx.keys,
        code.product_id,
        batch_id,
        1,
        Some(id),
    )
    .await?;
    let (new_id, new_last4) = issued[0].clone();
    let name = if request.email.is_some() {
        None
    } else {
        code.holder_name.as_deref()
    };
    let delivery = delivery::create(
        &mut action.tx,
        &NewDelivery {
            order_id: code.order_id,
            kind: "reissue",
            recipient: &recipient,
            recipient_name: name,
            send_after: Utc::now(),
            codes: CodeSelection::These(vec![new_id]),
            requested_by: Some(&actor.name),
        },
        &state.ctx.config.email.message_id_domain,
    )
    .await?
    .ok_or_else(|| ApiError::internal("the replacement's delivery was not created"))?;
    action
        .audit("code.reissued", "code", id.to_string(), json!({
                "last4": code.last4,
                "before": { "state": code.state },
                "after": { "state": "revoked", "replacement": new_id, "replacement_last4": new_last4,
                           "delivery": delivery, "recipient": recipient },
            }))
        .await?;
    let answer = (
        StatusCode::CREATED,
        Json(
            json!({ "replaced": id, "code": { "id": new_id, "last4": new_last4 },
                     "delivery": delivery, "recipient": recipient }),
        ),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
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
    if request.account_id.trim().is_empty() || request.entity_ref.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "account_id and entity_ref are needed",
        ));
    }
    let path = format!("POST /admin/v1/codes/{id}/reassign");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let code = lock(&mut action.tx, id).await?;
    if code.state != "redeemed" {
        return Err(conflict(
            "code_not_redeemed",
            "only a redeemed code can be reassigned",
        ));
    }
    let before = end_assignment(&mut action.tx, id, "reassigned").await?;
    let assignment = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO assignment (id, code_id, account_id, entity_ref, assigned_by) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(assignment)
    .bind(id)
    .bind(&request.account_id)
    .bind(&request.entity_ref)
    .bind(&actor.name)
    .execute(&mut *action.tx)
    .await?;
    let after = json!({ "account_id": request.account_id, "entity_ref": request.entity_ref });
    action
        .audit(
            "code.reassigned",
            "code",
            id.to_string(),
            json!({ "last4": code.last4, "before": before, "after": after }),
        )
        .await?;
    let answer = (
        StatusCode::OK,
        Json(json!({ "id": id, "state": "redeemed", "assignment": after })),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
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
    let code = lock(&mut action.tx, id).await?;
    if code.state != "redeemed" {
        return Err(conflict(
            "code_not_redeemed",
            "only a redeemed code can be unassigned",
        ));
    }
    let before = end_assignment(&mut action.tx, id, "unassigned").await?;
    sqlx::query("UPDATE activation_code SET state = 'issued', redeemed_at = NULL WHERE id = $1")
        .bind(id)
        .execute(&mut *action.tx)
        .await?;
    action
        .audit(
            "code.unassigned",
            "code",
            id.to_string(),
            json!({
                "last4": code.last4,
                "before": { "state": "redeemed", "assignment": before },
                "after": { "state": "issued" },
            }),
        )
        .await?;
    let answer = (StatusCode::OK, Json(json!({ "id": id, "state": "issued" })));
    let answer = action.finish(answer).await?;
    Ok(answer)
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
    let code = lock(&mut action.tx, id).await?;
    if code.state == "revoked" {
        return Err(state_conflict("revoked"));
    }
    let before: DateTime<Utc> =
        sqlx::query_scalar("SELECT expires_at FROM activation_code WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *action.tx)
            .await?;
    // Extending an expired code brings it back.
    let state_after: String = sqlx::query_scalar(
        "UPDATE activation_code SET expires_at = $2,
             state = CASE WHEN state = 'expired' AND $2 > now() THEN 'issued' ELSE state END,
             expired_at = CASE WHEN state = 'expired' AND $2 > now() THEN NULL ELSE expired_at END
         WHERE id = $1 RETURNING state",
    )
    .bind(id)
    .bind(request.expires_at)
    .fetch_one(&mut *action.tx)
    .await?;
    action
        .audit(
            "code.expiry_changed",
            "code",
            id.to_string(),
            json!({
                "last4": code.last4,
                "before": { "expires_at": before, "state": code.state },
                "after": { "expires_at": request.expires_at, "state": state_after },
            }),
        )
        .await?;
    let answer = (
        StatusCode::OK,
        Json(json!({ "id": id, "expires_at": request.expires_at, "state": state_after })),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
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
