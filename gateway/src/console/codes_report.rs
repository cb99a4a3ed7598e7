//! The codes report (`/console/codes-report`), for governance: which codes
//! were issued over a period and where they came from (each checkout
//! channel, each batch purpose), counted by their state now (issued,
//! redeemed, revoked, expired, replaced); with CSV export.

use axum::{
    Router,
    extract::{Query, State},
    response::{Html, Response},
    routing::get,
};
use chrono::{Duration, NaiveDate, Utc};
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::{Console, PageError, StaffMember, render};
use crate::admin::batches::csv_attachment;

/// The states the report counts; `replaced` is a revoked code that a
/// reissue replaced.
const STATES: [&str; 5] = ["issued", "redeemed", "revoked", "expired", "replaced"];

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/codes-report", get(page))
        .route("/console/codes-report.csv", get(export))
}

#[derive(Debug, Deserialize)]
struct Period {
    from: Option<String>,
    to: Option<String>,
}

/// One origin's counts.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct Row {
    origin: String,
    issued: i64,
    redeemed: i64,
    revoked: i64,
    expired: i64,
    replaced: i64,
    total: i64,
}

impl Period {
    /// The period's first and last day (the last 30 days by default).
    fn days(&self) -> Result<(NaiveDate, NaiveDate), PageError> {
        let parse = |s: &Option<String>, default: NaiveDate| match s.as_deref().map(str::trim) {
            None | Some("") => Ok(default),
            Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|_| PageError::invalid("Dates are YYYY-MM-DD.")),
        };
        let today = Utc::now().date_naive();
        let to = parse(&self.to, today)?;
        let from = parse(&self.from, to - Duration::days(29))?;
        if from > to {
            return Err(PageError::invalid("The period starts after it ends."));
        }
        Ok((from, to))
    }
}

async fn counts(console: &Console, from: NaiveDate, to: NaiveDate) -> Result<Vec<Row>, PageError> {
    let start = from.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let end = (to + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    Ok(sqlx::query_as(
        "WITH c AS (
             SELECT CASE WHEN c.order_line_id IS NOT NULL THEN 'checkout: ' || o.channel
                         WHEN c.batch_id IS NOT NULL THEN 'batch: ' || b.kind
                         ELSE 'no origin' END AS origin,
                    CASE WHEN EXISTS (SELECT 1 FROM activation_code r WHERE r.replaces = c.id)
                         THEN 'replaced' ELSE c.state END AS state
             FROM activation_code c
             LEFT JOIN order_line l ON l.id = c.order_line_id
             LEFT JOIN orders o ON o.id = l.order_id
             LEFT JOIN code_batch b ON b.id = c.batch_id
             WHERE c.issued_at >= $1 AND c.issued_at < $2)
         SELECT origin,
                count(*) FILTER (WHERE state = 'issued') AS issued,
                count(*) FILTER (WHERE state = 'redeemed') AS redeemed,
                count(*) FILTER (WHERE state = 'revoked') AS revoked,
                count(*) FILTER (WHERE state = 'expired') AS expired,
                count(*) FILTER (WHERE state = 'replaced') AS replaced,
                count(*) AS total
         FROM c GROUP BY origin ORDER BY origin",
    )
    .bind(start)
    .bind(end)
    .fetch_all(&console.ctx.pool)
    .await?)
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Query(period): Query<Period>,
) -> Result<Html<String>, PageError> {
    let (from, to) = period.days()?;
    let rows = counts(&console, from, to).await?;
    let total = |f: fn(&Row) -> i64| rows.iter().map(f).sum::<i64>();
    let totals = context! {
        issued => total(|r| r.issued), redeemed => total(|r| r.redeemed),
        revoked => total(|r| r.revoked), expired => total(|r| r.expired),
        replaced => total(|r| r.replaced), total => total(|r| r.total),
    };
    render(
        "codes_report.html",
        Some(&staff),
        context! {
            active => "codes_report", rows, totals, states => STATES,
            from => from.to_string(), to => to.to_string(),
        },
    )
}

async fn export(
    State(console): State<Console>,
    _staff: StaffMember,
    Query(period): Query<Period>,
) -> Result<Response, PageError> {
    let (from, to) = period.days()?;
    let rows = counts(&console, from, to).await?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let fail = |e: csv::Error| PageError::internal(e);
    csv.write_record([
        "from", "to", "origin", "issued", "redeemed", "revoked", "expired", "replaced", "total",
    ])
    .map_err(fail)?;
    for r in &rows {
        csv.write_record([
            from.to_string(),
            to.to_string(),
            r.origin.clone(),
            r.issued.to_string(),
            r.redeemed.to_string(),
            r.revoked.to_string(),
            r.expired.to_string(),
            r.replaced.to_string(),
            r.total.to_string(),
        ])
        .map_err(fail)?;
    }
    let body = csv.into_inner().map_err(PageError::internal)?;
    Ok(csv_attachment(&format!("codes-{from}-{to}.csv"), body))
}
