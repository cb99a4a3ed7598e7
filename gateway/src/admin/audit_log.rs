//! The audit log, filtered by subject, actor, action and time, a page at a
//! time (newest first; `before` continues from the last id seen).

use axum::{
    Json, Router,
    extract::{Query, State},
    routing::get,
};
use chrono::{DateTime, Utc};
use entitle_jobs::token::Role;
use serde::Deserialize;
use serde_json::{Value, json};

use super::orders::EVENT_JSON;
use crate::{AppState, auth::Actor, error::ApiError};

#[derive(Debug, Deserialize)]
struct Filter {
    subject_type: Option<String>,
    subject_id: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    before: Option<i64>,
    limit: Option<i64>,
}

async fn list(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<Filter>,
) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    let limit = f.limit.unwrap_or(100).clamp(1, 1000);
    let sql = format!(
        "SELECT coalesce(json_agg({EVENT_JSON} ORDER BY e.id DESC), '[]'), min(e.id) FROM (
            SELECT * FROM audit_event e
            WHERE ($1::text IS NULL OR e.subject_type = $1)
              AND ($2::text IS NULL OR e.subject_id = $2)
              AND ($3::text IS NULL OR e.actor = $3)
              AND ($4::text IS NULL OR e.action = $4)
              AND ($5::timestamptz IS NULL OR e.occurred_at >= $5)
              AND ($6::timestamptz IS NULL OR e.occurred_at < $6)
              AND ($7::bigint IS NULL OR e.id < $7)
            ORDER BY e.id DESC LIMIT $8) e"
    );
    let (events, last): (Value, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&f.subject_type)
        .bind(&f.subject_id)
        .bind(&f.actor)
        .bind(&f.action)
        .bind(f.since)
        .bind(f.until)
        .bind(f.before)
        .bind(limit)
        .fetch_one(&state.ctx.pool)
        .await?;
    let full_page = events.as_array().is_some_and(|a| a.len() as i64 == limit);
    Ok(Json(
        json!({ "events": events, "next_before": if full_page { last } else { None } }),
    ))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/v1/audit", get(list))
}
