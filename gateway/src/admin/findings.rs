//! Findings for operations: list them, and resolve or ignore one with a reason.

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use entitle_jobs::token::Role;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Answer, conflict, not_found};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

#[derive(Debug, Deserialize)]
struct Filter {
    status: Option<String>,
    kind: Option<String>,
    run: Option<Uuid>,
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
    to: &'static str,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/findings/{id}/{to}");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM reconciliation_finding WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *action.tx)
            .await?;
    let status = status.ok_or_else(|| not_found("finding"))?;
    if status != "open" {
        return Err(conflict(
            "finding_closed",
            format!("the finding is already {status}"),
        ));
    }
    let after = if to == "resolve" {
        "resolved"
    } else {
        "ignored"
    };
    sqlx::query(
        "UPDATE reconciliation_finding SET status = $2, resolved_at = now(), resolved_by = $3,
                resolution_reason = $4 WHERE id = $1",
    )
    .bind(id)
    .bind(after)
    .bind(&actor.name)
    .bind(&request.reason)
    .execute(&mut *action.tx)
    .await?;
    action
        .audit(
            if to == "resolve" {
                "finding.resolved"
            } else {
                "finding.ignored"
            },
            "finding",
            id.to_string(),
            json!({ "before": { "status": "open" }, "after": { "status": after } }),
        )
        .await?;
    let answer = (StatusCode::OK, Json(json!({ "id": id, "status": after })));
    let answer = action.finish(answer).await?;
    Ok(answer)
}

async fn resolve(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<Decision>,
) -> Result<Answer, ApiError> {
    decide(actor, state, id, headers, request, "resolve").await
}

async fn ignore(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<Decision>,
) -> Result<Answer, ApiError> {
    decide(actor, state, id, headers, request, "ignore").await
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/findings", get(list))
        .route("/admin/v1/findings/{id}/resolve", post(resolve))
        .route("/admin/v1/findings/{id}/ignore", post(ignore))
}
