//! Reconciliation runs for operations: start one on demand, list runs and
//! read one with a summary of what it found.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::get,
};
use chrono::{DateTime, Duration, Utc};
use entitle_jobs::{reconcile, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Answer, not_found};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

/// The longest window one run may cover.
const MAX_WINDOW_DAYS: i64 = 366;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// stripe, shopify or native.
    channel: String,
    /// Window start; default: `reconcile.window_hours` before its end.
    from: Option<DateTime<Utc>>,
    /// Window end (exclusive); default: now less `reconcile.lag_secs`.
    to: Option<DateTime<Utc>>,
    reason: String,
}

fn invalid(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

async fn start(
    actor: Actor,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<StartRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    if !reconcile::CHANNELS.contains(&request.channel.as_str()) {
        return Err(invalid(
            "unknown_channel",
            format!("channel must be one of {}", reconcile::CHANNELS.join(", ")),
        ));
    }
    let config = &state.ctx.config.reconcile;
    let default = reconcile::Window::scheduled(Utc::now(), config.window_hours, config.lag_secs);
    let end = request.to.unwrap_or(default.end);
    let window = reconcile::Window {
        start: request
            .from
            .unwrap_or(end - Duration::hours(i64::from(config.window_hours))),
        end,
    };
    if window.start >= window.end {
        return Err(invalid("invalid_window", "from must be before to"));
    }
    if window.end - window.start > Duration::days(MAX_WINDOW_DAYS) {
        return Err(invalid(
            "invalid_window",
            format!("a run covers at most {MAX_WINDOW_DAYS} days"),
        ));
    }
    let mut action = crate::begin_action!(
        &state,
        &actor,
        &headers,
        &request.reason,
        "POST /admin/v1/reconciliations",
        &request
    );
    let id = reconcile::queue(&mut *action.tx, &request.channel, window, &actor.name).await?;
    action
        .audit(
            "reconciliation.requested",
            "reconciliation_run",
            id.to_string(),
            json!({ "channel": request.channel, "from": window.start, "to": window.end }),
        )
        .await?;
    let answer = (
        StatusCode::ACCEPTED,
        Json(json!({
            "id": id, "status": "queued", "channel": request.channel,
            "window_start": window.start, "window_end": window.end,
        })),
    );
    // The run waits queued in Postgres; a worker's feeder queues it.
    action.finish(answer).await
}

const RUN_JSON: &str = "jsonb_build_object('id', r.id, 'channel', r.channel,
    'window_start', r.window_start, 'window_end', r.window_end, 'trigger', r.trigger,
    'status', r.status, 'created_at', r.created_at, 'started_at', r.started_at,
    'finished_at', r.finished_at, 'duration_ms', r.duration_ms,
    'channel_records', r.channel_records, 'entitle_orders', r.entitle_orders,
    'counts', r.counts, 'peak_memory_bytes', r.peak_memory_bytes, 'error', r.error)";

#[derive(Debug, Deserialize)]
struct Filter {
    channel: Option<String>,
    status: Option<String>,
}

async fn list(
    actor: Actor,
    State(state): State<AppState>,
    axum::extract::Query(f): axum::extract::Query<Filter>,
) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    let runs: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT coalesce(jsonb_agg({RUN_JSON} ORDER BY r.created_at DESC), '[]')
         FROM (SELECT * FROM reconciliation_run r
               WHERE ($1::text IS NULL OR r.channel = $1) AND ($2::text IS NULL OR r.status = $2)
               ORDER BY r.created_at DESC LIMIT 200) r"
    )))
    .bind(&f.channel)
    .bind(&f.status)
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(json!({ "runs": runs })))
}

/// A run, with its findings counted by kind and status.
async fn show(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    actor.require(Role::Support)?;
    let run: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_JSON} || jsonb_build_object('findings',
                (SELECT coalesce(jsonb_agg(jsonb_build_object('kind', kind, 'status', status, 'count', n)
                                           ORDER BY kind, status), '[]')
                 FROM (SELECT kind, status, count(*) AS n FROM reconciliation_finding
                       WHERE run_id = r.id GROUP BY kind, status) k))
         FROM reconciliation_run r WHERE r.id = $1"
    )))
    .bind(id)
    .fetch_optional(&state.ctx.pool)
    .await?;
    Ok(Json(run.ok_or_else(|| not_found("reconciliation run"))?))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/reconciliations", get(list).post(start))
        .route("/admin/v1/reconciliations/{id}", get(show))
}
