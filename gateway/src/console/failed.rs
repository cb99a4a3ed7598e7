//! Failed work (`/console/failed`): webhook events that failed, with their
//! reason and a retry once the cause (such as a catalogue entry) is fixed;
//! emails that failed or still wait, with resend.

use axum::{
    Router,
    extract::{Path, Query, State},
    response::{Html, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use entitle_jobs::{inbox, token::Role};
use minijinja::context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    Console, CsrfForm, PageError, StaffMember, actions, actions::Confirmed, code::Done, render,
};

/// Rows listed at most in each table.
const SHOWN: i64 = 100;

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/failed", get(page))
        .route("/console/events/{id}/retry", post(retry_one))
        .route("/console/events/retry", post(retry_by_code))
}

#[derive(Serialize, sqlx::FromRow)]
struct FailedEvent {
    id: Uuid,
    channel: String,
    event_id: String,
    event_type: String,
    error_code: Option<String>,
    last_error: Option<String>,
    attempts: i32,
    received_at: DateTime<Utc>,
}

#[derive(Serialize, sqlx::FromRow)]
struct WaitingDelivery {
    id: Uuid,
    order_id: Option<Uuid>,
    kind: String,
    recipient_email: String,
    status: String,
    attempts: i32,
    error_code: Option<String>,
    last_error: Option<String>,
    due_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    /// Codes it carries (a receipt carries none: nothing to resend).
    codes: i64,
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Query(done): Query<Done>,
) -> Result<Html<String>, PageError> {
    let pool = &console.ctx.pool;
    let events: Vec<FailedEvent> = sqlx::query_as(
        "SELECT id, channel, event_id, event_type, error_code, last_error, attempts, received_at
         FROM webhook_inbox WHERE status = 'failed' ORDER BY received_at DESC LIMIT $1",
    )
    .bind(SHOWN)
    .fetch_all(pool)
    .await?;
    let codes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(error_code, 'unknown'), count(*) FROM webhook_inbox
         WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC",
    )
    .fetch_all(pool)
    .await?;
    let deliveries: Vec<WaitingDelivery> = sqlx::query_as(
        "SELECT d.*, (SELECT count(*) FROM email_delivery_code dc WHERE dc.delivery_id = d.id) AS codes
         FROM ((SELECT id, order_id, kind, recipient_email, status, attempts, error_code, last_error,
                       due_at, created_at
                FROM email_delivery WHERE status = 'failed' ORDER BY created_at DESC LIMIT $1)
               UNION ALL
               (SELECT id, order_id, kind, recipient_email, status, attempts, error_code, last_error,
                       due_at, created_at
                FROM email_delivery WHERE status IN ('pending', 'sending') AND attempts > 0
                ORDER BY due_at LIMIT $1)) d",
    )
    .bind(SHOWN)
    .fetch_all(pool)
    .await?;
    render(
        "failed.html",
        Some(&staff),
        context! {
            active => "failed", events, codes, deliveries, shown => SHOWN,
            can_operate => staff.role >= Role::Operator, done => done.done,
        },
    )
}

/// Queues failed events again; reopening is idempotent by nature (a
/// second post finds nothing failed), so it needs no one-time key.
async fn retry(
    console: &Console,
    staff: &StaffMember,
    confirmed: &Confirmed,
    filter: inbox::RetryFilter,
) -> Result<Response, PageError> {
    staff.require(Role::Operator)?;
    confirmed.check()?;
    let reopened = inbox::reopen_failed(
        &console.ctx.pool,
        &filter,
        &staff.name,
        confirmed.reason.trim(),
    )
    .await?;
    Ok(actions::back(
        "/console/failed",
        if reopened.is_empty() {
            "already_done"
        } else {
            "retried"
        },
    ))
}

async fn retry_one(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, .. }: CsrfForm<Confirmed>,
) -> Result<Response, PageError> {
    let filter = inbox::RetryFilter {
        id: Some(id),
        ..Default::default()
    };
    retry(&console, &staff, &form, filter).await
}

#[derive(Debug, Deserialize, Serialize)]
struct ByCode {
    #[serde(flatten)]
    confirmed: Confirmed,
    #[serde(default)]
    error_code: String,
}

async fn retry_by_code(
    State(console): State<Console>,
    staff: StaffMember,
    CsrfForm { form, .. }: CsrfForm<ByCode>,
) -> Result<Response, PageError> {
    if form.error_code.trim().is_empty() {
        return Err(PageError::invalid("Choose which failures to retry."));
    }
    let filter = inbox::RetryFilter {
        error_code: Some(form.error_code.trim().to_owned()),
        ..Default::default()
    };
    retry(&console, &staff, &form.confirmed, filter).await
}
