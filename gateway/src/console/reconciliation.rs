//! The reconciliation report (`/console/reconciliation`), the page
//! operations review: runs with window, counts and duration; findings
//! filtered by run, kind and status, each saying what was done
//! automatically and what needs a person; resolve or ignore with a reason;
//! CSV export.

use axum::{
    Router,
    extract::{Path, Query, State},
    response::{Html, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use entitle_jobs::{finding, token::Role};
use minijinja::context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Console, CsrfForm, PageError, StaffMember, actions::Confirmed, render};
use crate::admin::findings::{Filter, findings_csv};

/// Findings listed at most (the export has all of them).
const FINDINGS_SHOWN: i64 = 200;

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/reconciliation", get(page))
        .route("/console/reconciliation/findings.csv", get(export))
        .route("/console/findings/{id}/resolve", post(resolve))
        .route("/console/findings/{id}/ignore", post(ignore))
}

/// The filter as the page's form sends it: empty fields mean "any".
#[derive(Debug, Default, Deserialize, Serialize)]
struct ReportQuery {
    #[serde(default)]
    run: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    done: Option<String>,
}

impl ReportQuery {
    fn filter(&self) -> Filter {
        let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        Filter {
            // Open findings unless asked otherwise; "all" shows every status.
            status: match self.status.as_deref() {
                None => Some("open".to_owned()),
                Some("all") | Some("") => None,
                Some(s) => Some(s.to_owned()),
            },
            kind: some(&self.kind),
            run: self.run.trim().parse().ok(),
        }
    }
}

#[derive(Serialize, sqlx::FromRow)]
struct Run {
    id: Uuid,
    channel: String,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    trigger: String,
    status: String,
    started_at: Option<DateTime<Utc>>,
    duration_ms: Option<i64>,
    channel_records: i64,
    entitle_orders: i64,
    counts: serde_json::Value,
    error: Option<String>,
}

#[derive(Serialize, sqlx::FromRow)]
struct Finding {
    id: Uuid,
    run_id: Option<Uuid>,
    kind: String,
    status: String,
    order_id: Option<Uuid>,
    code_id: Option<Uuid>,
    channel: Option<String>,
    channel_reference: Option<String>,
    detail: String,
    action_taken: Option<String>,
    created_at: DateTime<Utc>,
    resolved_by: Option<String>,
    resolution_reason: Option<String>,
}

/// What a person should do about a finding of `kind` (the README's table).
fn needs(kind: &str) -> &'static str {
    match kind {
        "paid_not_fulfilled" => {
            "Nothing, usually: the run fulfilled it. Check the buyer got the email."
        }
        "refunded_codes_active" => {
            "Nothing, usually: the run revoked the codes. Redeemed ones need a decision."
        }
        "refunded_but_redeemed" => {
            "Decide: the customer uses what was refunded (revoke it, or accept it)."
        }
        "fulfilled_not_paid" => "Decide: the channel says unpaid; revoke the codes or get paid.",
        "unknown_to_channel" => "Check the order exists in the channel; revoke if it does not.",
        "amount_mismatch" | "quantity_mismatch" => {
            "Compare the order here with the channel's and correct by hand."
        }
        "delivery_failed" => "Resend the email to a corrected address (Failed work).",
        "event_failed" => "Fix the cause (for example map the product), then retry the event.",
        "refund_unallocated" => "Revoke the refunded units by hand: the refund names no lines.",
        _ => "Review it and resolve or ignore it with a reason.",
    }
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Query(query): Query<ReportQuery>,
) -> Result<Html<String>, PageError> {
    let pool = &console.ctx.pool;
    let filter = query.filter();
    let runs: Vec<Run> = sqlx::query_as(
        "SELECT id, channel, window_start, window_end, trigger, status, started_at, duration_ms,
                channel_records, entitle_orders, counts, error
         FROM reconciliation_run ORDER BY created_at DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await?;
    let findings: Vec<Finding> = sqlx::query_as(
        "SELECT id, run_id, kind, status, order_id, code_id, channel, channel_reference, detail,
                action_taken, created_at, resolved_by, resolution_reason
         FROM reconciliation_finding
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
           AND ($3::uuid IS NULL OR run_id = $3)
         ORDER BY created_at DESC LIMIT $4",
    )
    .bind(&filter.status)
    .bind(&filter.kind)
    .bind(filter.run)
    .bind(FINDINGS_SHOWN)
    .fetch_all(pool)
    .await?;
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT kind FROM reconciliation_finding ORDER BY kind")
            .fetch_all(pool)
            .await?;
    let findings: Vec<_> = findings
        .into_iter()
        .map(|f| {
            let needs = needs(&f.kind);
            context! { needs, ..minijinja::Value::from_serialize(&f) }
        })
        .collect();
    let export = serde_urlencoded::to_string([
        ("run", filter.run.map(|r| r.to_string()).unwrap_or_default()),
        ("kind", filter.kind.clone().unwrap_or_default()),
        (
            "status",
            filter.status.clone().unwrap_or_else(|| "all".into()),
        ),
    ])
    .unwrap_or_default();
    render(
        "reconciliation.html",
        Some(&staff),
        context! {
            active => "reconciliation", runs, findings, kinds,
            run => query.run.trim(), kind => filter.kind, status => filter.status.unwrap_or_else(|| "all".into()),
            shown => FINDINGS_SHOWN, export,
            can_operate => staff.role >= Role::Operator,
            done => query.done,
        },
    )
}

async fn export(
    State(console): State<Console>,
    _staff: StaffMember,
    Query(query): Query<ReportQuery>,
) -> Response {
    findings_csv(console.ctx.pool.clone(), query.filter())
}

#[derive(Debug, Deserialize, Serialize)]
struct DecideForm {
    #[serde(flatten)]
    confirmed: Confirmed,
}

async fn decide(
    console: Console,
    staff: StaffMember,
    id: Uuid,
    form: CsrfForm<DecideForm>,
    decision: finding::Decision,
) -> Result<Response, PageError> {
    let CsrfForm { form, form_key } = form;
    crate::console_action!(
        console,
        staff,
        Role::Operator,
        form_key,
        &form.confirmed,
        &form,
        format!("POST /console/findings/{id}/{}", decision.status()),
        "/console/reconciliation".to_owned(),
        decision.status(),
        |tx, who| finding::decide(tx, who, id, decision)
    )
}

async fn resolve(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    form: CsrfForm<DecideForm>,
) -> Result<Response, PageError> {
    decide(console, staff, id, form, finding::Decision::Resolve).await
}

async fn ignore(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    form: CsrfForm<DecideForm>,
) -> Result<Response, PageError> {
    decide(console, staff, id, form, finding::Decision::Ignore).await
}
