//! `GET /console`: what needs attention now. Work waiting (webhook events
//! and email deliveries, with the age of the oldest), open findings by kind,
//! the last reconciliation run, and codes issued and redeemed today (UTC).

use axum::{extract::State, response::Html};
use chrono::{DateTime, Utc};
use minijinja::context;
use serde::Serialize;

use super::{Console, PageError, StaffMember, render};

#[derive(Serialize)]
struct Backlog {
    count: i64,
    /// Of the deliveries, those waiting for a later date (scheduled gifts):
    /// waiting, not late.
    scheduled: i64,
    oldest: Option<DateTime<Utc>>,
    oldest_age: Option<String>,
}

#[derive(Serialize, sqlx::FromRow)]
struct Run {
    channel: String,
    status: String,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    duration_ms: Option<i64>,
    channel_records: i64,
    entitle_orders: i64,
    error: Option<String>,
}

/// "3 h 5 min", "42 s": how long something has waited.
fn age(since: Option<DateTime<Utc>>) -> Option<String> {
    let secs = (Utc::now() - since?).num_seconds().max(0);
    Some(match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    })
}

pub async fn page(
    State(console): State<Console>,
    staff: StaffMember,
) -> Result<Html<String>, PageError> {
    let pool = &console.ctx.pool;
    let (events, events_oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(received_at) FROM webhook_inbox WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    // Due deliveries are late from their send date; scheduled ones are not.
    let (deliveries, scheduled, deliveries_oldest): (i64, i64, Option<DateTime<Utc>>) =
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE send_after > now()),
                    min(send_after) FILTER (WHERE send_after <= now())
             FROM email_delivery WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(pool)
        .await?;
    let findings: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, count(*) FROM reconciliation_finding WHERE status = 'open'
         GROUP BY kind ORDER BY count(*) DESC, kind",
    )
    .fetch_all(pool)
    .await?;
    let run: Option<Run> = sqlx::query_as(
        "SELECT channel, status, window_start, window_end, started_at, duration_ms,
                channel_records, entitle_orders, error
         FROM reconciliation_run ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let (issued, redeemed): (i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM activation_code
            WHERE issued_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),
           -- The day's redemptions by the audit log's time index (codes keep
           -- no index on redeemed_at: redemption's update stays HOT); a
           -- code redeemed, unassigned and redeemed again counts once.
           (SELECT count(DISTINCT subject_id) FROM audit_event
            WHERE action = 'code.redeemed'
              AND occurred_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')",
    )
    .fetch_one(pool)
    .await?;
    let open_findings: i64 = findings.iter().map(|(_, n)| n).sum();
    render(
        "dashboard.html",
        Some(&staff),
        context! {
            active => "dashboard",
            events => Backlog {
                count: events,
                scheduled: 0,
                oldest: events_oldest,
                oldest_age: age(events_oldest),
            },
            deliveries => Backlog {
                count: deliveries,
                scheduled,
                oldest: deliveries_oldest,
                oldest_age: age(deliveries_oldest),
            },
            findings,
            open_findings,
            run,
            issued_today => issued,
            redeemed_today => redeemed,
        },
    )
}
