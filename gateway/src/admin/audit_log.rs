//! The audit log, filtered by subject, actor, action and time, a page at a
//! time (newest first; `before` continues from the last id seen).

use axum::{
    Json,
    extract::{Query, State},
};
use chrono::{DateTime, Utc};
use entitle_jobs::token::Role;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    orders::EVENT_JSON,
    views::{AuditEntry, conform},
};
use crate::{AppState, auth::Actor, error::ApiError};

/// Which audit events (each filter optional), and which page.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditFilter {
    /// `order`, `code`, `batch`, `delivery`, `webhook_event`, `token`, ...
    subject_type: Option<String>,
    subject_id: Option<String>,
    /// A token's or staff member's name, `checkout`, `redemption`, ...
    actor: Option<String>,
    /// e.g. `code.revoked`.
    action: Option<String>,
    /// From this instant (inclusive).
    since: Option<DateTime<Utc>>,
    /// Until this instant (exclusive).
    until: Option<DateTime<Utc>>,
    /// The next page: the `next_before` of the last one.
    before: Option<i64>,
    /// Events a page: 1 to 1000, 100 by default.
    limit: Option<i64>,
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub events: Vec<AuditEntry>,
    /// Pass as `before` for the next page; null on the last one.
    pub next_before: Option<i64>,
}

/// The audit log, filtered by subject, actor, action and time; paginated.
#[utoipa::path(
    get, path = "/admin/v1/audit", tag = "audit",
    params(AuditFilter),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "A page of events, newest first", body = AuditPage)),
)]
async fn list_audit_events(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<AuditFilter>,
) -> Result<Json<AuditPage>, ApiError> {
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
    let events: Vec<AuditEntry> = conform("the audit log", events)?;
    let full_page = events.len() as i64 == limit;
    Ok(Json(AuditPage {
        events,
        next_before: if full_page { last } else { None },
    }))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit_events))
}
