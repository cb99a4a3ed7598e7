//! Batches: codes created outside checkout (customer service, partner
//! distribution, test accounts, replacements), optionally emailed, and
//! exportable once as CSV.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use entitle_jobs::{
    audit::{self, AuditEvent},
    delivery::{self, CodeSelection, NewDelivery},
    issuance,
    token::Role,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use uuid::Uuid;

use super::{Answer, conflict, not_found, orders::CODE_JSON, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

/// The most codes one batch may hold.
const MAX_BATCH: u32 = 10_000;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    product_sku: String,
    quantity: u32,
    /// customer_service, partner_distribution, test_account or replacement.
    kind: String,
    reason: String,
    account_id: Option<String>,
    order_id: Option<Uuid>,
    /// Email the codes to this address now.
    email: Option<String>,
}

async fn create(
    actor: Actor,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CreateRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    require_reason(&request.reason)?;
    let invalid = |detail: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            detail.to_owned(),
        )
    };
    if !(1..=MAX_BATCH).contains(&request.quantity) {
        return Err(invalid("quantity must be 1 to 10000"));
    }
    if ![
        "customer_service",
        "partner_distribution",
        "test_account",
        "replacement",
    ]
    .contains(&request.kind.as_str())
    {
        return Err(invalid(
            "kind must be customer_service, partner_distribution, test_account or replacement",
        ));
    }
    if let Some(email) = &request.email
        && email.parse::<lettre::Address>().is_err()
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_email",
            "email is not an address",
        ));
    }
    let mut action = crate::begin_action!(
        &state,
        &actor,
        &headers,
        &request.reason,
        "POST /admin/v1/batches",
        &request
    );
    let product: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM product WHERE sku = $1 AND active")
            .bind(&request.product_sku)
            .fetch_optional(&mut *action.tx)
            .await?;
    let product = product.ok_or_else(|| not_found("active product with that sku"))?;
    if let Some(order_id) = request.order_id {
        let found: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_optional(&mut *action.tx)
            .await?;
        found.ok_or_else(|| not_found("order"))?;
    }
    let batch_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO code_batch (id, product_id, kind, quantity, requested_by, reason, account_id, order_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(batch_id)
    .bind(product)
    .bind(&request.kind)
    .bind(request.quantity as i32)
    .bind(&actor.name)
    .bind(&request.reason)
    .bind(&request.account_id)
    .bind(request.order_id)
    .execute(&mut *action.tx)
    .await?;
    let codes = issuance::issue_batch_codes(
        &mut action.tx,
        &state.ctx.keys,
        product,
        batch_id,
        request.quantity,
        None,
    )
    .await?;
    let delivery = match &request.email {
        Some(email) => {
            delivery::create(
                &mut action.tx,
                &NewDelivery {
                    order_id: request.order_id,
                    kind: "batch_codes",
                    recipient: email,
                    recipient_name: None,
                    send_after: Utc::now(),
                    codes: CodeSelection::These(codes.iter().map(|(id, _)| *id).collect()),
                    requested_by: Some(&actor.name),
                },
                &state.ctx.config.email.message_id_domain,
            )
            .await?
        }
        None => None,
    };
    action
        .audit("batch.created", "batch", batch_id.to_string(), json!({
                "before": null,
                "after": { "product": request.product_sku, "quantity": request.quantity, "kind": request.kind,
                           "account_id": request.account_id, "order_id": request.order_id,
                           "emailed_to": request.email, "delivery": delivery },
            }))
        .await?;
    let shown: Vec<Value> = codes
        .iter()
        .take(100)
        .map(|(id, last4)| json!({ "id": id, "last4": last4 }))
        .collect();
    let answer = (
        StatusCode::CREATED,
        Json(
            json!({ "id": batch_id, "quantity": request.quantity, "kind": request.kind,
                     "codes": shown, "delivery": delivery,
                     "export": format!("/admin/v1/batches/{batch_id}/export") }),
        ),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
}

async fn show(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    let sql = format!(
        "SELECT json_build_object('id', b.id, 'product_sku', p.sku, 'kind', b.kind, 'quantity', b.quantity,
                'requested_by', b.requested_by, 'reason', b.reason, 'account_id', b.account_id,
                'order_id', b.order_id, 'exported_at', b.exported_at, 'created_at', b.created_at,
                'codes', (SELECT coalesce(json_agg({CODE_JSON} ORDER BY c.id), '[]')
                          FROM activation_code c WHERE c.batch_id = b.id))
         FROM code_batch b JOIN product p ON p.id = b.product_id WHERE b.id = $1"
    );
    let view: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&state.ctx.pool)
        .await?;
    view.map(Json).ok_or_else(|| not_found("batch"))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    reason: String,
}

/// The batch's codes as CSV, once: a second export is refused, so a partner
/// file exists in one copy.
async fn export(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<ExportRequest>,
) -> Result<Response, ApiError> {
    actor.require(Role::Operator)?;
    require_reason(&request.reason)?;
    let mut tx = state.ctx.pool.begin().await?;
    let exists: Option<Option<chrono::DateTime<Utc>>> =
        sqlx::query_scalar("SELECT exported_at FROM code_batch WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match exists {
        None => return Err(not_found("batch")),
        Some(Some(at)) => {
            return Err(conflict(
                "batch_already_exported",
                format!("exported at {at}"),
            ));
        }
        Some(None) => {}
    }
    sqlx::query("UPDATE code_batch SET exported_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(
        "SELECT c.code_sealed, c.state, c.expires_at, p.sku FROM activation_code c
         JOIN product p ON p.id = c.product_id WHERE c.batch_id = $1 ORDER BY c.id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let mut csv = String::from("code,product,state,valid_until\r\n");
    for row in &rows {
        let code = state
            .ctx
            .keys
            .unseal(&row.get::<Vec<u8>, _>("code_sealed"))
            .map_err(ApiError::internal)?;
        let expires: chrono::DateTime<Utc> = row.get("expires_at");
        csv.push_str(&format!(
            "{},{},{},{}\r\n",
            code.display(),
            row.get::<String, _>("sku"),
            row.get::<String, _>("state"),
            expires.format("%Y-%m-%d")
        ));
    }
    audit::record(
        &mut tx,
        AuditEvent {
            actor: &actor.name,
            action: "batch.exported",
            subject_type: "batch",
            subject_id: id.to_string(),
            reason: Some(&request.reason),
            data: json!({ "before": { "exported": false }, "after": { "exported": true, "codes": rows.len() } }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"batch-{id}.csv\""),
            ),
        ],
        csv,
    )
        .into_response())
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/batches", post(create))
        .route("/admin/v1/batches/{id}", get(show))
        .route("/admin/v1/batches/{id}/export", post(export))
}
