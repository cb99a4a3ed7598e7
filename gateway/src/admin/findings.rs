//! Findings for operations: list them, and resolve or ignore one with a reason.

use axum::{
    Json,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use entitle_jobs::{csv_cells::Sheet, finding, token::Role};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    Answer, IdempotencyKey, ReasonOnly, answer,
    views::{Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Which findings: by status, kind and run (each optional).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Filter {
    /// `open`, `resolved` or `ignored`.
    pub status: Option<String>,
    /// e.g. `paid_not_fulfilled`, `refunded_codes_active`, `delivery_failed`.
    pub kind: Option<String>,
    /// The reconciliation run that found them.
    pub run: Option<Uuid>,
}

/// Findings, newest first (at most 1000; the CSV export has all).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FindingList {
    pub findings: Vec<Finding>,
}

/// A mismatch a reconciliation run found, and what became of it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Finding {
    pub id: Uuid,
    /// Null for findings made outside a run (a failed delivery or event).
    pub run_id: Option<Uuid>,
    pub kind: String,
    /// `open`, `resolved` or `ignored`.
    pub status: String,
    pub order_id: Option<Uuid>,
    pub code_id: Option<Uuid>,
    pub channel: Option<String>,
    /// The channel's id of what differs (an order, a refund).
    pub channel_reference: Option<String>,
    pub detail: String,
    /// What the run did about it, if anything.
    pub action_taken: Option<String>,
    pub created_at: Timestamp,
    pub resolved_at: Option<Timestamp>,
    pub resolved_by: Option<String>,
    pub resolution_reason: Option<String>,
}

/// Findings for operations, filtered by kind, status or run.
#[utoipa::path(
    get, path = "/admin/v1/findings", tag = "findings",
    params(Filter),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "The findings, newest first", body = FindingList)),
)]
async fn list_findings(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Json<FindingList>, ApiError> {
    actor.require(Role::Support)?;
    let findings: Value = sqlx::query_scalar(
        "SELECT coalesce(json_agg(json_build_object('id', f.id, 'run_id', f.run_id, 'kind', f.kind,
                    'status', f.status, 'order_id', f.order_id, 'code_id', f.code_id, 'channel', f.channel,
                    'channel_reference', f.channel_reference, 'detail', f.detail,
                    'action_taken', f.action_taken, 'created_at', f.created_at,
                    'resolved_at', f.resolved_at, 'resolved_by', f.resolved_by,
                    'resolution_reason', f.resolution_reason) ORDER BY f.created_at DESC), '[]')
         FROM (SELECT * FROM reconciliation_finding f
               WHERE ($1::text IS NULL OR f.status = $1) AND ($2::text IS NULL OR f.kind = $2)
                 AND ($3::uuid IS NULL OR f.run_id = $3)
               ORDER BY f.created_at DESC LIMIT 1000) f",
    )
    .bind(&f.status)
    .bind(&f.kind)
    .bind(f.run)
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(FindingList {
        findings: conform("the finding list", findings)?,
    }))
}

async fn decide(
    actor: Actor,
    state: AppState,
    id: Uuid,
    headers: HeaderMap,
    request: ReasonOnly,
    decision: finding::Decision,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let verb = match decision {
        finding::Decision::Resolve => "resolve",
        finding::Decision::Ignore => "ignore",
    };
    let path = format!("POST /admin/v1/findings/{id}/{verb}");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let decided = finding::decide(&mut action.tx, who, id, decision).await?;
    action.finish(answer(StatusCode::OK, decided)?).await
}

/// Mark a finding resolved.
#[utoipa::path(
    post, path = "/admin/v1/findings/{id}/resolve", tag = "findings",
    params(("id" = Uuid, Path, description = "The finding's id"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Resolved", body = finding::Decided),
        (status = 404, description = "`not_found`: no such finding", body = ErrorBody),
        (status = 409, description = "`finding_closed`: already resolved or ignored", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn resolve_finding(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    decide(
        actor,
        state,
        id,
        headers,
        request,
        finding::Decision::Resolve,
    )
    .await
}

/// Mark a finding ignored.
#[utoipa::path(
    post, path = "/admin/v1/findings/{id}/ignore", tag = "findings",
    params(("id" = Uuid, Path, description = "The finding's id"), IdempotencyKey),
    request_body = ReasonOnly,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "Ignored", body = finding::Decided),
        (status = 404, description = "`not_found`: no such finding", body = ErrorBody),
        (status = 409, description = "`finding_closed`: already resolved or ignored", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn ignore_finding(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReasonOnly>,
) -> Result<Answer, ApiError> {
    decide(
        actor,
        state,
        id,
        headers,
        request,
        finding::Decision::Ignore,
    )
    .await
}

/// Findings as CSV (same filters), all of them, streamed.
#[utoipa::path(
    get, path = "/admin/v1/findings/export", tag = "findings",
    params(Filter),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "Every matching finding, oldest first, as a CSV download with the list's columns", content_type = "text/csv", body = String),
    ),
)]
async fn export_findings(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Response, ApiError> {
    actor.require(Role::Support)?;
    Ok(findings_csv(state.ctx.pool.clone(), f))
}

/// One page of the findings export: filters `$1` status, `$2` kind, `$3`
/// run; after the cursor `($4, $5)`; `$6` rows. Each page is one look-up in
/// `reconciliation_finding_export_idx` (or `_run_idx` for a run), however
/// far into the findings it is (the test of the migration checks the plan).
pub const EXPORT_PAGE_SQL: &str =
    "SELECT id, run_id, kind, status, order_id, code_id, channel, channel_reference,
            detail, action_taken, created_at, resolved_at, resolved_by, resolution_reason
     FROM reconciliation_finding
     WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
       AND ($3::uuid IS NULL OR run_id = $3) AND (created_at, id) > ($4, $5)
     ORDER BY created_at, id LIMIT $6";

/// Findings matching the filter as CSV, oldest first, read from Postgres a
/// page at a time as the response is written: however many there are, all
/// of them, in bounded memory. The API and the console both answer this.
pub fn findings_csv(pool: sqlx::PgPool, f: Filter) -> Response {
    const PAGE: i64 = 1000;
    type Row = (
        Uuid,
        Option<Uuid>,
        String,
        String,
        Option<Uuid>,
        Option<Uuid>,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
        chrono::DateTime<chrono::Utc>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<String>,
        Option<String>,
    );
    let mut header = Sheet::new();
    header.row([
        "id",
        "run_id",
        "kind",
        "status",
        "order_id",
        "code_id",
        "channel",
        "channel_reference",
        "detail",
        "action_taken",
        "created_at",
        "resolved_at",
        "resolved_by",
        "resolution_reason",
    ]);
    let header = header.into_bytes();
    // The cursor: the last (created_at, id) written; None once done.
    let start = Some((chrono::DateTime::<chrono::Utc>::UNIX_EPOCH, Uuid::nil()));
    let pages = futures::stream::unfold(start, move |cursor| {
        let (pool, f) = (pool.clone(), f.clone());
        async move {
            let (after_at, after_id) = cursor?;
            let rows: Result<Vec<Row>, sqlx::Error> = sqlx::query_as(EXPORT_PAGE_SQL)
                .bind(&f.status)
                .bind(&f.kind)
                .bind(f.run)
                .bind(after_at)
                .bind(after_id)
                .bind(PAGE)
                .fetch_all(&pool)
                .await;
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "findings export broke off");
                    return Some((Err(std::io::Error::other(e)), None));
                }
            };
            let next = match rows.last() {
                Some(last) if rows.len() as i64 == PAGE => Some((last.10, last.0)),
                _ => None,
            };
            if rows.is_empty() {
                return None;
            }
            let text = |v: &Option<String>| v.clone().unwrap_or_default();
            let id = |v: &Option<Uuid>| v.map(|u| u.to_string()).unwrap_or_default();
            let time = |v: &Option<chrono::DateTime<chrono::Utc>>| {
                v.map(|t| t.to_rfc3339()).unwrap_or_default()
            };
            let mut chunk = Sheet::new();
            for r in &rows {
                chunk.row([
                    &r.0.to_string(),
                    &id(&r.1),
                    &r.2,
                    &r.3,
                    &id(&r.4),
                    &id(&r.5),
                    &text(&r.6),
                    &text(&r.7),
                    &r.8,
                    &text(&r.9),
                    &r.10.to_rfc3339(),
                    &time(&r.11),
                    &text(&r.12),
                    &text(&r.13),
                ]);
            }
            Some((Ok::<_, std::io::Error>(chunk.into_bytes()), next))
        }
    });
    let body = futures::stream::once(async move { Ok(header) }).chain(pages);
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"findings.csv\"",
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_findings))
        .routes(routes!(export_findings))
        .routes(routes!(resolve_finding))
        .routes(routes!(ignore_finding))
}
