//! Batches: codes created outside checkout (customer service, partner
//! distribution, test accounts, replacements), optionally emailed, and
//! exported as CSV (to one actor, again within a short window). The rules
//! are [`entitle_jobs::batch`]'s.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use entitle_jobs::{
    batch::{self, NewBatch},
    lifecycle::Who,
    token::Role,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    Answer, IdempotencyKey, ReasonOnly, answer_as, not_found,
    orders::CODE_JSON,
    outcomes, require_reason,
    views::{CodeSummary, Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Codes to create outside checkout, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "product_sku": "KIT-BASIC", "quantity": 1, "kind": "customer_service", "reason": "replacement kit" })))]
struct BatchRequest {
    product_sku: String,
    /// 1 to 10,000.
    quantity: u32,
    /// `customer_service`, `partner_distribution` or `test_account`
    /// (replacements are made by reissuing a code).
    kind: String,
    reason: String,
    /// The account the codes are meant for (it does not assign them).
    account_id: Option<String>,
    /// The order the codes make up for.
    order_id: Option<Uuid>,
    /// Email the codes to this address now.
    email: Option<String>,
}

/// Create codes outside checkout.
#[utoipa::path(
    post, path = "/admin/v1/batches", tag = "batches",
    params(IdempotencyKey),
    request_body = BatchRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 201, description = "Created; the codes are downloaded from `export` (by one actor, again within a short window)", body = outcomes::BatchCreated),
        (status = 404, description = "`not_found`: no such product or order", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_request` (quantity, kind), `invalid_email`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn create_batch(
    actor: Actor,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<BatchRequest>,
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
        .finish(answer_as::<outcomes::BatchCreated>(
            StatusCode::CREATED,
            created,
        )?)
        .await
}

/// A batch and its codes (masked).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchView {
    pub id: Uuid,
    pub product_sku: String,
    /// `customer_service`, `partner_distribution`, `test_account` or
    /// `replacement`.
    pub kind: String,
    pub quantity: i32,
    pub requested_by: String,
    pub reason: String,
    pub account_id: Option<String>,
    pub order_id: Option<Uuid>,
    /// When its codes were first downloaded (by one actor, who may again
    /// for a short window).
    pub exported_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub codes: Vec<CodeSummary>,
}

/// A batch and its codes (masked).
#[utoipa::path(
    get, path = "/admin/v1/batches/{id}", tag = "batches",
    params(("id" = Uuid, Path, description = "The batch's id")),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 404, description = "`not_found`: no such batch", body = ErrorBody),
    ),
)]
async fn show_batch(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<BatchView>, ApiError> {
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
    let view = view.ok_or_else(|| not_found("batch"))?;
    Ok(Json(conform("the batch view", view)?))
}

/// The batch's codes as CSV.
///
/// The only answer that shows whole codes: `code,product,state,valid_until`,
/// a line each. The first download takes the file: the same actor may
/// download it again for `codes.export_window_secs` (a dropped connection
/// loses nothing), nobody else ever; every download is audited
/// (`batch.exported`). See `entitle_jobs::batch::export`.
#[utoipa::path(
    post, path = "/admin/v1/batches/{id}/export", tag = "batches",
    params(("id" = Uuid, Path, description = "The batch's id")),
    request_body = ReasonOnly,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "The codes, as a CSV download", content_type = "text/csv", body = String),
        (status = 404, description = "`not_found`: no such batch", body = ErrorBody),
        (status = 409, description = "`export_taken_by_another`: another actor downloaded it; `export_window_closed`: the window to download it again has passed", body = ErrorBody),
        (status = 422, description = "`reason_required`", body = ErrorBody),
    ),
)]
async fn export_batch(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Response, ApiError> {
    actor.require(Role::Operator)?;
    require_reason(&request.reason)?;
    let mut tx = state.ctx.pool.begin().await?;
    let who = Who {
        actor: &actor.name,
        role: actor.role,
        reason: &request.reason,
    };
    let csv = batch::export(&mut tx, &state.ctx, who, id).await?;
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

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_batch))
        .routes(routes!(show_batch))
        .routes(routes!(export_batch))
}
