//! Reconciliation runs for operations: start one on demand, list runs and
//! read one with a summary of what it found.

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Duration, Utc};
use entitle_jobs::{reconcile, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    Answer, IdempotencyKey, answer, not_found,
    views::{Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// The longest window one run may cover.
const MAX_WINDOW_DAYS: i64 = 366;

/// A run to start: a channel and a window, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "channel": "stripe", "from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "reason": "webhook outage" })))]
struct ReconciliationRequest {
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

/// A run, queued.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunQueued {
    pub id: Uuid,
    /// `queued`: a worker starts it within moments.
    pub status: String,
    pub channel: String,
    pub window_start: DateTime<Utc>,
    /// Exclusive.
    pub window_end: DateTime<Utc>,
}

/// Start a reconciliation run for a channel and window (default: the scheduled window).
///
/// The run waits queued in Postgres; a worker's feeder starts it. Poll
/// `GET /admin/v1/reconciliations/{id}` for its outcome.
#[utoipa::path(
    post, path = "/admin/v1/reconciliations", tag = "reconciliations",
    params(IdempotencyKey),
    request_body = ReconciliationRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 202, description = "Queued", body = RunQueued),
        (status = 422, description = "`unknown_channel`, `invalid_window` (from not before to, or over 366 days), `reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn start_reconciliation(
    actor: Actor,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReconciliationRequest>,
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
    let queued = RunQueued {
        id,
        status: "queued".to_owned(),
        channel: request.channel.clone(),
        window_start: window.start,
        window_end: window.end,
    };
    // The run waits queued in Postgres; a worker's feeder queues it.
    action.finish(answer(StatusCode::ACCEPTED, queued)?).await
}

const RUN_JSON: &str = "jsonb_build_object('id', r.id, 'channel', r.channel,
    'window_start', r.window_start, 'window_end', r.window_end, 'trigger', r.trigger,
    'status', r.status, 'created_at', r.created_at, 'started_at', r.started_at,
    'finished_at', r.finished_at, 'duration_ms', r.duration_ms,
    'channel_records', r.channel_records, 'entitle_orders', r.entitle_orders,
    'counts', r.counts, 'peak_memory_bytes', r.peak_memory_bytes, 'error', r.error)";

/// Which runs (each filter optional).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RunFilter {
    /// `stripe`, `shopify` or `native`.
    channel: Option<String>,
    /// `queued`, `running`, `finished` or `failed`.
    status: Option<String>,
}

/// Runs, newest first (at most 200).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<Run>,
}

/// A reconciliation run: what it compared and what it counted.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: Uuid,
    pub channel: String,
    pub window_start: Timestamp,
    /// Exclusive.
    pub window_end: Timestamp,
    /// `schedule`, or who asked for it.
    pub trigger: String,
    /// `queued`, `running`, `finished` or `failed`.
    pub status: String,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub duration_ms: Option<i64>,
    /// Records the channel listed for the window.
    pub channel_records: i64,
    /// Entitle's orders in the window.
    pub entitle_orders: i64,
    /// New findings by kind, actions, mismatches already on record, pages,
    /// API retries.
    #[schema(value_type = Object)]
    pub counts: Value,
    /// The worker process's peak memory during the run.
    pub peak_memory_bytes: Option<i64>,
    /// Why a failed run failed.
    pub error: Option<String>,
}

/// A run with its findings counted by kind and status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    pub id: Uuid,
    pub channel: String,
    pub window_start: Timestamp,
    pub window_end: Timestamp,
    pub trigger: String,
    pub status: String,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub duration_ms: Option<i64>,
    pub channel_records: i64,
    pub entitle_orders: i64,
    #[schema(value_type = Object)]
    pub counts: Value,
    pub peak_memory_bytes: Option<i64>,
    pub error: Option<String>,
    pub findings: Vec<FindingCount>,
}

/// How many of a run's findings are of a kind and status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FindingCount {
    pub kind: String,
    pub status: String,
    pub count: i64,
}

/// Reconciliation runs, newest first, with duration, counts and peak memory.
#[utoipa::path(
    get, path = "/admin/v1/reconciliations", tag = "reconciliations",
    params(RunFilter),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses((status = 200, description = "The runs, newest first", body = RunList)),
)]
async fn list_reconciliations(
    actor: Actor,
    State(state): State<AppState>,
    Query(f): Query<RunFilter>,
) -> Result<Json<RunList>, ApiError> {
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
    Ok(Json(RunList {
        runs: conform("the run list", runs)?,
    }))
}

/// A reconciliation run and its findings by kind and status.
#[utoipa::path(
    get, path = "/admin/v1/reconciliations/{id}", tag = "reconciliations",
    params(("id" = Uuid, Path, description = "The run's id")),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The run", body = RunView),
        (status = 404, description = "`not_found`: no such run", body = ErrorBody),
    ),
)]
async fn show_reconciliation(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<RunView>, ApiError> {
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
    let run = run.ok_or_else(|| not_found("reconciliation run"))?;
    Ok(Json(conform("the run view", run)?))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_reconciliations, start_reconciliation))
        .routes(routes!(show_reconciliation))
}
