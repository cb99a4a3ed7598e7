//! Reconciliation: a run compares what a channel says was paid, refunded and
//! cancelled in a window of time with what Entitle fulfilled, and records
//! each mismatch as a finding. What has one right answer is healed through
//! the normal path (an unfulfilled paid order is fulfilled, an unapplied
//! refund revokes); the rest is left to operations. Both sides are streamed
//! a page at a time, so memory stays bounded however large the window.

pub mod api;
mod compare;
pub mod memory;
mod own;
mod shopify;
mod stripe;

use std::{collections::BTreeMap, time::Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    audit, channel,
    context::Context,
    error::JobError,
    finding::{self, NewFinding},
    handlers,
    inbox::{self, Filed, NewEvent},
};

/// The channels a run can be for. Native has no API to read: its runs only
/// check Entitle's own records (failed events and deliveries, stray codes).
pub const CHANNELS: [&str; 3] = [
    channel::stripe::CHANNEL,
    channel::shopify::CHANNEL,
    channel::native::CHANNEL,
];

/// Every kind of finding a run records.
pub const KINDS: [&str; 9] = [
    "paid_not_fulfilled",
    "fulfilled_not_paid",
    "unknown_to_channel",
    "refunded_codes_active",
    "amount_mismatch",
    "quantity_mismatch",
    "delivery_failed",
    "event_failed",
    "code_without_origin",
];

/// Findings and orphans are looked for this many rows at a time.
const BATCH: i64 = 500;

/// A span of time: from `start` (inclusive) to `end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// What a scheduled run covers: `hours` up to `lag` before `now`, since
    /// younger work may still be on its way through the queues.
    pub fn scheduled(now: DateTime<Utc>, hours: u32, lag_secs: u64) -> Self {
        let end = now - chrono::Duration::seconds(lag_secs as i64);
        Self {
            start: end - chrono::Duration::hours(i64::from(hours)),
            end,
        }
    }
}

/// An order as the channel reports it.
#[derive(Debug, Clone)]
pub struct ChannelOrder {
    /// The channel's order id (Entitle's `channel_order_id`).
    pub id: String,
    pub paid: bool,
    /// Fully refunded, voided or cancelled in the channel: nothing to fulfil.
    pub closed: bool,
    pub amount_total: Option<i64>,
    pub units: Option<i64>,
    /// The event that fulfils it, as the channel would have sent it.
    pub purchase: ChannelEvent,
}

/// An event rebuilt from what the channel's API says, carried out through
/// the normal path (the inbox, then the same handler as a webhook). Its id
/// starts with `reconcile:`, so healing twice files it once.
#[derive(Debug, Clone)]
pub struct ChannelEvent {
    pub event_id: String,
    pub event_type: String,
    pub body: String,
}

/// Records a run to do; returns its id.
pub async fn queue(
    db: impl sqlx::PgExecutor<'_>,
    channel: &str,
    window: Window,
    trigger: &str,
) -> sqlx::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO reconciliation_run (id, channel, window_start, window_end, trigger)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(channel)
    .bind(window.start)
    .bind(window.end)
    .bind(trigger)
    .execute(db)
    .await?;
    Ok(id)
}

/// Runs every channel over the scheduled window, one after the other.
pub async fn scheduled(ctx: &Context) -> Result<Value, JobError> {
    let config = &ctx.config.reconcile;
    let window = Window::scheduled(Utc::now(), config.window_hours, config.lag_secs);
    let mut summary = serde_json::Map::new();
    for channel in CHANNELS {
        let run = queue(&ctx.pool, channel, window, "schedule").await?;
        let outcome = execute(ctx, run).await?;
        summary.insert(channel.to_owned(), outcome.unwrap_or(Value::Null));
    }
    Ok(Value::Object(summary))
}

/// Carries out a queued run and records its outcome. Returns None when the
/// run was not queued (another worker has it, or it is done). A run that
/// fails is recorded as failed with its error, not retried: the next one
/// covers the window again.
pub async fn execute(ctx: &Context, run_id: Uuid) -> Result<Option<Value>, JobError> {
    let claimed: Option<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE reconciliation_run SET status = 'running', started_at = now()
         WHERE id = $1 AND status = 'queued'
         RETURNING channel, window_start, window_end",
    )
    .bind(run_id)
    .fetch_optional(&ctx.pool)
    .await?;
    let Some((channel, start, end)) = claimed else {
        return Ok(None);
    };
    let exact_peak = memory::reset_peak();
    let started = Instant::now();
    let mut run = Run {
        ctx,
        id: run_id,
        channel: CHANNELS
            .into_iter()
            .find(|c| *c == channel)
            .unwrap_or(channel::native::CHANNEL),
        window: Window { start, end },
        tally: Tally::default(),
    };
    let outcome = if CHANNELS.contains(&channel.as_str()) {
        run.go().await
    } else {
        Err(JobError::permanent(
            "channel_unknown",
            format!("no channel {channel}"),
        ))
    };
    let duration_ms = started.elapsed().as_millis() as i64;
    let peak = memory::peak_bytes().map(|b| b as i64);
    let (status, error) = match &outcome {
        Ok(()) => ("finished", None),
        Err(e) => ("failed", Some(e.to_string())),
    };
    run.tally.peak_exact = exact_peak;
    let counts = serde_json::to_value(&run.tally).unwrap_or_default();
    sqlx::query(
        "UPDATE reconciliation_run SET status = $2, finished_at = now(), duration_ms = $3,
                channel_records = $4, entitle_orders = $5, counts = $6, peak_memory_bytes = $7, error = $8
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(status)
    .bind(duration_ms)
    .bind(run.tally.channel_records as i64)
    .bind(run.tally.entitle_orders as i64)
    .bind(&counts)
    .bind(peak)
    .bind(&error)
    .execute(&ctx.pool)
    .await?;
    sqlx::query("DELETE FROM reconciliation_seen WHERE run_id = $1")
        .bind(run_id)
        .execute(&ctx.pool)
        .await?;
    metrics::counter!("entitle_reconcile_runs_total", "channel" => run.channel, "status" => status)
        .increment(1);
    metrics::histogram!("entitle_reconcile_run_seconds", "channel" => run.channel)
        .record(duration_ms as f64 / 1000.0);
    let new: u64 = run.tally.findings.values().sum();
    match &error {
        None => tracing::info!(
            %run_id, channel = run.channel, duration_ms, records = run.tally.channel_records,
            orders = run.tally.entitle_orders, new_findings = new, peak_bytes = peak,
            "reconciliation finished"
        ),
        Some(error) => tracing::error!(
            %run_id, channel = run.channel, %error, new_findings = new,
            "reconciliation failed"
        ),
    }
    Ok(Some(
        json!({ "run": run_id, "status": status, "new_findings": new, "error": error }),
    ))
}

/// What a run counted.
#[derive(Debug, Default, Serialize)]
struct Tally {
    /// New findings by kind.
    findings: BTreeMap<String, u64>,
    /// Mismatches already recorded by an earlier run (nothing done again).
    seen_again: u64,
    /// Healing actions taken (fulfilments, refunds applied).
    actions: u64,
    /// Whether the channel's API was read (not for native, or unconfigured).
    channel_compared: bool,
    channel_records: u64,
    channel_adjustments: u64,
    entitle_orders: u64,
    pages: u64,
    api_retries: u64,
    /// Whether the peak memory covers this run only.
    peak_exact: bool,
}

/// Entitle's view of one of the channel's orders.
#[derive(Debug, sqlx::FromRow)]
struct Fulfilled {
    id: Uuid,
    channel_order_id: String,
    payment_reference: Option<String>,
    amount_total: Option<i64>,
    issued: bool,
    units: i64,
    /// Codes issued or redeemed (not revoked or expired).
    active: i64,
}

const FULFILLED: &str = "SELECT o.id, o.channel_order_id, o.payment_reference, o.amount_total,
        o.issued_at IS NOT NULL AS issued,
        coalesce((SELECT sum(l.quantity) FROM order_line l WHERE l.order_id = o.id), 0)::bigint AS units,
        (SELECT count(*) FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
         WHERE l.order_id = o.id AND c.state IN ('issued', 'redeemed')) AS active
     FROM orders o WHERE o.channel = $1";

/// What carrying out a rebuilt event came to.
#[derive(Debug, sqlx::FromRow)]
struct Carried {
    id: Uuid,
    status: String,
    error_code: Option<String>,
    order_id: Option<Uuid>,
}

/// Which source a run reads.
enum Source {
    Stripe(stripe::Listing),
    Shopify(shopify::Listing),
}

impl Source {
    async fn next_orders(&mut self) -> Result<Option<Vec<ChannelOrder>>, JobError> {
        match self {
            Source::Stripe(s) => s.next_orders().await,
            Source::Shopify(s) => s.next_orders().await,
        }
    }

    async fn next_adjustments(&mut self) -> Result<Option<Vec<ChannelEvent>>, JobError> {
        match self {
            Source::Stripe(s) => s.next_adjustments().await,
            Source::Shopify(s) => s.next_adjustments().await,
        }
    }

    fn retries(&self) -> u64 {
        match self {
            Source::Stripe(s) => s.pager().retries(),
            Source::Shopify(s) => s.pager().retries(),
        }
    }
}

struct Run<'a> {
    ctx: &'a Context,
    id: Uuid,
    channel: &'static str,
    window: Window,
    tally: Tally,
}

impl Run<'_> {
    async fn go(&mut self) -> Result<(), JobError> {
        if let Some(mut source) = self.source()? {
            let compared = self.compare_channel(&mut source).await;
            self.tally.api_retries = source.retries();
            compared?;
            self.tally.channel_compared = true;
        }
        self.failed_events().await?;
        self.failed_deliveries().await?;
        self.codes_without_origin().await?;
        self.tally.entitle_orders = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM orders WHERE channel = $1 AND paid_at >= $2 AND paid_at < $3",
        )
        .bind(self.channel)
        .bind(self.window.start)
        .bind(self.window.end)
        .fetch_one(&self.ctx.pool)
        .await? as u64;
        Ok(())
    }

    /// The channel's API, when it is configured.
    fn source(&self) -> Result<Option<Source>, JobError> {
        let config = &self.ctx.config;
        let pager = api::Pager::new(self.channel, &config.reconcile);
        Ok(match self.channel {
            channel::stripe::CHANNEL if self.ctx.stripe.configured() => Some(Source::Stripe(
                stripe::Listing::new(self.ctx.stripe.clone(), pager, self.window),
            )),
            channel::shopify::CHANNEL if shopify::configured(&config.shopify) => Some(
                Source::Shopify(shopify::Listing::new(&config.shopify, pager, self.window)?),
            ),
            _ => None,
        })
    }

    /// Whether an earlier run recorded this mismatch (then nothing is done
    /// again).
    async fn already_found(&mut self, dedupe_key: &str) -> sqlx::Result<bool> {
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM reconciliation_finding WHERE dedupe_key = $1)",
        )
        .bind(dedupe_key)
        .fetch_one(&self.ctx.pool)
        .await?;
        if found {
            self.tally.seen_again += 1;
        }
        Ok(found)
    }

    /// Records a finding of this run, once.
    async fn flag(&mut self, finding: NewFinding<'_>) -> Result<(), JobError> {
        let kind = finding.kind.to_owned();
        let acted = finding.action_taken.is_some();
        let mut conn = self.ctx.pool.acquire().await?;
        if finding::record(&mut conn, audit::RECONCILER, finding).await? {
            *self.tally.findings.entry(kind).or_default() += 1;
            self.tally.actions += u64::from(acted);
        } else {
            self.tally.seen_again += 1;
        }
        Ok(())
    }

    /// Files a rebuilt event in the inbox (once) and carries it out now
    /// with the webhook handler; the deliveries it creates are fed as usual.
    async fn carry_out(&self, event: &ChannelEvent) -> Result<Carried, JobError> {
        let (filed, token) = inbox::file_leased(
            &self.ctx.pool,
            NewEvent {
                channel: self.channel,
                event_id: &event.event_id,
                event_type: &event.event_type,
                body: event.body.as_bytes(),
            },
            self.ctx.config.lease(),
        )
        .await?;
        let id = match filed {
            Filed::New(id) | Filed::Duplicate { id, .. } => id,
        };
        // What cannot be done now stays pending: the feeder queues it.
        let done = match token {
            Some(token) => handlers::process_events(self.ctx, token, &[id]).await,
            None => handlers::process_now(self.ctx, &[id]).await,
        };
        if let Err(e) = done {
            tracing::warn!(run = %self.id, event = %id, error = %e, "healing will be retried");
        }
        Ok(sqlx::query_as(
            "SELECT id, status, error_code, order_id FROM webhook_inbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.ctx.pool)
        .await?)
    }
}
