//! Findings for operations: list them, and resolve or ignore one with a reason.

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use entitle_jobs::{finding, token::Role};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::Answer;
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

/// Which findings: by status, kind and run (each optional).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub run: Option<Uuid>,
}

async fn list(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "findings": findings })))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    reason: String,
}

async fn decide(
    actor: Actor,
    state: AppState,
    id: Uuid,
    headers: HeaderMap,
    request: Decision,
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
    action.finish((StatusCode::OK, Json(json!(decided)))).await
}

async fn resolve(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<Decision>,
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

async fn ignore(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<Decision>,
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

async fn export(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Response, ApiError> {
    actor.require(Role::Support)?;
    Ok(findings_csv(state.ctx.pool.clone(), f))
}

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
    let header = csv_line(&[
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
    // The cursor: the last (created_at, id) written; None once done.
    let start = Some((chrono::DateTime::<chrono::Utc>::UNIX_EPOCH, Uuid::nil()));
    let pages = futures::stream::unfold(start, move |cursor| {
        let (pool, f) = (pool.clone(), f.clone());
        async move {
            let (after_at, after_id) = cursor?;
            let rows: Result<Vec<Row>, sqlx::Error> = sqlx::query_as(
                "SELECT id, run_id, kind, status, order_id, code_id, channel, channel_reference,
                        detail, action_taken, created_at, resolved_at, resolved_by, resolution_reason
                 FROM reconciliation_finding
                 WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
                   AND ($3::uuid IS NULL OR run_id = $3) AND (created_at, id) > ($4, $5)
                 ORDER BY created_at, id LIMIT $6",
            )
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
            let mut chunk = Vec::new();
            for r in &rows {
                chunk.extend(csv_line(&[
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
                ]));
            }
            Some((Ok::<_, std::io::Error>(chunk), next))
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

/// One CSV record (RFC 4180 quoting), with its line end.
fn csv_line(fields: &[&str]) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    // Writing to memory cannot fail.
    let _ = writer.write_record(fields);
    writer.into_inner().unwrap_or_default()
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/findings", get(list))
        .route("/admin/v1/findings/export", get(export))
        .route("/admin/v1/findings/{id}/resolve", post(resolve))
        .route("/admin/v1/findings/{id}/ignore", post(ignore))
}
