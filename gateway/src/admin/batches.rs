//! Batches: codes created outside checkout (customer service, partner
//! distribution, test accounts, replacements), optionally emailed, and
//! exportable once as CSV. The rules are [`entitle_jobs::batch`]'s.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use entitle_jobs::{
    batch::{self, NewBatch},
    lifecycle::Who,
    token::Role,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Answer, not_found, orders::CODE_JSON, require_reason};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

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
    let mut action = crate::begin_action!(
        &state,
        &actor,
        &headers,
        &request.reason,
        "POST /admin/v1/batches",
        &request
    );
    let who = action.who();
    let created = batch::create(
        &mut action.tx,
        &state.ctx,
        who,
        &NewBatch {
            product_sku: &request.product_sku,
            quantity: request.quantity,
            kind: &request.kind,
            account_id: request.account_id.as_deref(),
            order_id: request.order_id,
            email: request.email.as_deref(),
        },
    )
    .await?;
    action
        .finish((StatusCode::CREATED, Json(json!(created))))
        .await
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

/// The batch's codes as CSV, once (see [`batch::export`]).
async fn export(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ExportRequest>,
) -> Result<Response, ApiError> {
    actor.require(Role::Operator)?;
    require_reason(&request.reason)?;
    let mut tx = state.ctx.pool.begin().await?;
    let who = Who {
        actor: &actor.name,
        role: actor.role,
        reason: &request.reason,
    };
    // The same request again (its Idempotency-Key) gets the file again.
    let key = super::idempotency_key(&headers)?.map(|k| format!("{}:{k}", actor.name));
    let csv = batch::export(&mut tx, &state.ctx, who, id, key.as_deref()).await?;
    tx.commit().await?;
    Ok(csv_attachment(&format!("batch-{id}.csv"), csv))
}

/// A CSV answered as a file download named `filename`.
pub fn csv_attachment(filename: &str, csv: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        csv.into(),
    )
        .into_response()
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/batches", post(create))
        .route("/admin/v1/batches/{id}", get(show))
        .route("/admin/v1/batches/{id}/export", post(export))
}
