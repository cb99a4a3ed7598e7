//! Reconciliation: a run compares what a channel says was paid, refunded and
//! cancelled in a window of time with what Entitle fulfilled, and records
//! each mismatch as a finding. What has one right answer is healed through
//! the normal path (an unfulfilled paid order is fulfilled, an unapplied
//! refund revokes); the rest is left to operations. Both sides are streamed
//! a page at a time, so memory stays bounded however large the window.

pub mod api;
pub mod memory;
mod shopify;
mod stripe;

use std::{collections::BTreeMap, time::Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    audit, channel,
    command::Command,
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

    async fn compare_channel(&mut self, source: &mut Source) -> Result<(), JobError> {
        while let Some(orders) = source.next_orders().await? {
            self.tally.pages += 1;
            self.compare_orders(orders).await?;
        }
        // Only once the channel's whole window was read can an order it
        // did not mention be called unknown to it.
        self.unknown_to_channel().await?;
        while let Some(events) = source.next_adjustments().await? {
            self.tally.pages += 1;
            self.compare_adjustments(events).await?;
        }
        Ok(())
    }

    async fn compare_orders(&mut self, orders: Vec<ChannelOrder>) -> Result<(), JobError> {
        let ids: Vec<String> = orders.iter().map(|o| o.id.clone()).collect();
        sqlx::query(
            "INSERT INTO reconciliation_seen (run_id, channel_order_id)
             SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(self.id)
        .bind(&ids)
        .execute(&self.ctx.pool)
        .await?;
        let known: Vec<Fulfilled> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{FULFILLED} AND o.channel_order_id = ANY($2)"
        )))
        .bind(self.channel)
        .bind(&ids)
        .fetch_all(&self.ctx.pool)
        .await?;
        let known: std::collections::HashMap<&str, &Fulfilled> = known
            .iter()
            .map(|f| (f.channel_order_id.as_str(), f))
            .collect();
        for order in &orders {
            self.tally.channel_records += 1;
            match known.get(order.id.as_str()) {
                Some(ours) if ours.issued => self.compare_order(order, ours).await?,
                _ if order.paid && !order.closed => self.fulfil(order).await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// An order both sides know: paid, for the same money and units?
    async fn compare_order(
        &mut self,
        theirs: &ChannelOrder,
        ours: &Fulfilled,
    ) -> Result<(), JobError> {
        let channel = self.channel;
        let id = &theirs.id;
        if !theirs.paid && ours.active > 0 {
            self.flag(NewFinding {
                kind: "fulfilled_not_paid",
                order_id: Some(ours.id),
                code_id: None,
                channel: Some(channel),
                channel_reference: Some(id),
                detail: format!(
                    "{channel} says order {id} is not paid, but Entitle fulfilled it and {} code(s) are active",
                    ours.active
                ),
                action_taken: None,
                dedupe_key: format!("fulfilled_not_paid:{channel}:{id}"),
                run_id: Some(self.id),
            })
            .await?;
        }
        if let (Some(paid), Some(recorded)) = (theirs.amount_total, ours.amount_total)
            && paid != recorded
        {
            self.flag(NewFinding {
                kind: "amount_mismatch",
                order_id: Some(ours.id),
                code_id: None,
                channel: Some(channel),
                channel_reference: Some(id),
                detail: format!(
                    "{channel} says order {id} totals {paid}; Entitle recorded {recorded} (minor units)"
                ),
                action_taken: None,
                dedupe_key: format!("amount_mismatch:{channel}:{id}"),
                run_id: Some(self.id),
            })
            .await?;
        }
        if let Some(units) = theirs.units
            && units != ours.units
        {
            self.flag(NewFinding {
                kind: "quantity_mismatch",
                order_id: Some(ours.id),
                code_id: None,
                channel: Some(channel),
                channel_reference: Some(id),
                detail: format!(
                    "{channel} says order {id} has {units} unit(s); Entitle fulfilled {}",
                    ours.units
                ),
                action_taken: None,
                dedupe_key: format!("quantity_mismatch:{channel}:{id}"),
                run_id: Some(self.id),
            })
            .await?;
        }
        Ok(())
    }

    /// Paid in the channel, not fulfilled here (a webhook lost or never
    /// sent): fulfil it through the normal path, which emails the buyer.
    async fn fulfil(&mut self, order: &ChannelOrder) -> Result<(), JobError> {
        let channel = self.channel;
        let key = format!("paid_not_fulfilled:{channel}:{}", order.id);
        if self.already_found(&key).await? {
            return Ok(());
        }
        let carried = self.carry_out(&order.purchase).await?;
        let action = match carried.status.as_str() {
            "processed" => {
                let codes: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
                     WHERE l.order_id = $1",
                )
                .bind(carried.order_id)
                .fetch_one(&self.ctx.pool)
                .await?;
                format!(
                    "fulfilled through the normal path (event {}): {codes} code(s) issued, email queued",
                    carried.id
                )
            }
            "failed" => format!(
                "fulfilling failed with {} (event {}); retry the event once the cause is fixed",
                carried.error_code.as_deref().unwrap_or("an error"),
                carried.id
            ),
            "ignored" => format!(
                "the channel's order needed no fulfilment (event {})",
                carried.id
            ),
            _ => format!("fulfilment queued for a retry (event {})", carried.id),
        };
        self.flag(NewFinding {
            kind: "paid_not_fulfilled",
            order_id: carried.order_id,
            code_id: None,
            channel: Some(channel),
            channel_reference: Some(&order.id),
            detail: format!(
                "{channel} says order {} was paid{}, but Entitle had not fulfilled it",
                order.id,
                order
                    .amount_total
                    .map(|a| format!(" ({a} minor units)"))
                    .unwrap_or_default()
            ),
            action_taken: Some(&action),
            dedupe_key: key,
            run_id: Some(self.id),
        })
        .await
    }

    /// Entitle's orders in the window that the channel did not list.
    async fn unknown_to_channel(&mut self) -> Result<(), JobError> {
        let channel = self.channel;
        let mut after = (self.window.start, Uuid::nil());
        loop {
            let page: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
                "SELECT o.id, o.channel_order_id, o.paid_at FROM orders o
                 WHERE o.channel = $1 AND o.paid_at >= $2 AND o.paid_at < $3
                   AND o.issued_at IS NOT NULL AND (o.paid_at, o.id) > ($4, $5)
                   AND NOT EXISTS (SELECT 1 FROM reconciliation_seen s
                                   WHERE s.run_id = $6 AND s.channel_order_id = o.channel_order_id)
                 ORDER BY o.paid_at, o.id LIMIT $7",
            )
            .bind(channel)
            .bind(self.window.start)
            .bind(self.window.end)
            .bind(after.0)
            .bind(after.1)
            .bind(self.id)
            .bind(BATCH)
            .fetch_all(&self.ctx.pool)
            .await?;
            for (id, reference, _) in &page {
                self.flag(NewFinding {
                    kind: "unknown_to_channel",
                    order_id: Some(*id),
                    code_id: None,
                    channel: Some(channel),
                    channel_reference: Some(reference),
                    detail: format!(
                        "Entitle fulfilled order {reference}, but {channel} does not list it for the window"
                    ),
                    action_taken: None,
                    dedupe_key: format!("unknown_to_channel:{channel}:{reference}"),
                    run_id: Some(self.id),
                })
                .await?;
            }
            match page.last() {
                Some((id, _, paid_at)) if page.len() as i64 == BATCH => after = (*paid_at, *id),
                _ => return Ok(()),
            }
        }
    }

    /// Refunds and cancellations the channel made that Entitle never
    /// applied, while the order's codes are still active: apply them through
    /// the normal path (unredeemed codes revoked, redeemed ones flagged).
    async fn compare_adjustments(&mut self, events: Vec<ChannelEvent>) -> Result<(), JobError> {
        let mut adjustments = Vec::with_capacity(events.len());
        for event in events {
            self.tally.channel_adjustments += 1;
            match handlers::interpret(self.ctx, self.channel, &event.event_type, &event.body).await
            {
                Ok(Command::Refund(a)) => adjustments.push(("refund", a, event)),
                Ok(Command::Cancellation(a)) => adjustments.push(("cancellation", a, event)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(run = %self.id, event = event.event_id, error = %e, "a channel adjustment could not be read");
                }
            }
        }
        if adjustments.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = adjustments
            .iter()
            .map(|(_, a, _)| a.adjustment_key.as_str())
            .collect();
        let applied: Vec<String> = sqlx::query_scalar(
            "SELECT adjustment_key FROM order_adjustment WHERE channel = $1 AND adjustment_key = ANY($2)",
        )
        .bind(self.channel)
        .bind(&keys)
        .fetch_all(&self.ctx.pool)
        .await?;
        let order_keys: Vec<&str> = adjustments
            .iter()
            .map(|(_, a, _)| a.order_key.as_str())
            .collect();
        let orders: Vec<Fulfilled> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{FULFILLED} AND (o.channel_order_id = ANY($2) OR o.payment_reference = ANY($2))"
        )))
        .bind(self.channel)
        .bind(&order_keys)
        .fetch_all(&self.ctx.pool)
        .await?;
        for (kind, adjustment, event) in &adjustments {
            if applied.contains(&adjustment.adjustment_key) {
                continue;
            }
            let Some(order) = orders.iter().find(|o| {
                o.channel_order_id == adjustment.order_key
                    || o.payment_reference.as_deref() == Some(adjustment.order_key.as_str())
            }) else {
                // Not fulfilled here: no code to take back.
                continue;
            };
            if !order.issued || order.active == 0 {
                continue;
            }
            self.take_back(kind, &adjustment.adjustment_key, event, order)
                .await?;
        }
        Ok(())
    }

    async fn take_back(
        &mut self,
        kind: &str,
        adjustment_key: &str,
        event: &ChannelEvent,
        order: &Fulfilled,
    ) -> Result<(), JobError> {
        let channel = self.channel;
        let key = format!("refunded_codes_active:{channel}:{adjustment_key}");
        if self.already_found(&key).await? {
            return Ok(());
        }
        let issued_before = self.codes_in(order.id, "issued").await?;
        let carried = self.carry_out(event).await?;
        let action = if carried.status == "processed" {
            let revoked = issued_before - self.codes_in(order.id, "issued").await?;
            let flagged: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM reconciliation_finding
                 WHERE order_id = $1 AND kind = 'refunded_but_redeemed'",
            )
            .bind(order.id)
            .fetch_one(&self.ctx.pool)
            .await?;
            format!(
                "{kind} applied through the normal path (event {}): {revoked} unredeemed code(s) revoked, {flagged} redeemed code(s) kept and flagged",
                carried.id
            )
        } else {
            format!(
                "applying the {kind} ended {} (event {}){}",
                carried.status,
                carried.id,
                carried
                    .error_code
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            )
        };
        self.flag(NewFinding {
            kind: "refunded_codes_active",
            order_id: Some(order.id),
            code_id: None,
            channel: Some(channel),
            channel_reference: Some(&order.channel_order_id),
            detail: format!(
                "{channel} records {kind} {adjustment_key} of order {}, but Entitle had not applied it; {} code(s) were active",
                order.channel_order_id, order.active
            ),
            action_taken: Some(&action),
            dedupe_key: key,
            run_id: Some(self.id),
        })
        .await
    }

    async fn codes_in(&self, order: Uuid, state: &str) -> sqlx::Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
             WHERE l.order_id = $1 AND c.state = $2",
        )
        .bind(order)
        .bind(state)
        .fetch_one(&self.ctx.pool)
        .await
    }

    /// Webhook events of the channel that failed for good.
    async fn failed_events(&mut self) -> Result<(), JobError> {
        loop {
            let page: Vec<(Uuid, String, String, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT w.id, w.event_id, w.event_type, w.error_code, w.last_error FROM webhook_inbox w
                 WHERE w.channel = $1 AND w.status = 'failed' AND w.received_at >= $2 AND w.received_at < $3
                   AND NOT EXISTS (SELECT 1 FROM reconciliation_finding f
                                   WHERE f.dedupe_key = 'event_failed:' || w.id::text)
                 ORDER BY w.received_at LIMIT $4",
            )
            .bind(self.channel)
            .bind(self.window.start)
            .bind(self.window.end)
            .bind(BATCH)
            .fetch_all(&self.ctx.pool)
            .await?;
            for (id, event_id, event_type, code, error) in &page {
                self.flag(NewFinding {
                    kind: "event_failed",
                    order_id: None,
                    code_id: None,
                    channel: Some(self.channel),
                    channel_reference: Some(event_id),
                    detail: format!(
                        "{event_type} event {event_id} failed with {}: {}",
                        code.as_deref().unwrap_or("an error"),
                        error.as_deref().unwrap_or("")
                    ),
                    action_taken: None,
                    dedupe_key: format!("event_failed:{id}"),
                    run_id: Some(self.id),
                })
                .await?;
            }
            if (page.len() as i64) < BATCH {
                return Ok(());
            }
        }
    }

    /// Emails of the channel's orders (and deliveries of no order) that
    /// failed for good.
    async fn failed_deliveries(&mut self) -> Result<(), JobError> {
        loop {
            let page: Vec<(Uuid, Option<Uuid>, String, i32, Option<String>)> = sqlx::query_as(
                "SELECT d.id, d.order_id, d.kind, d.attempts, d.last_error FROM email_delivery d
                 LEFT JOIN orders o ON o.id = d.order_id
                 WHERE d.status = 'failed' AND d.created_at >= $2 AND d.created_at < $3
                   AND (o.channel = $1 OR d.order_id IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM reconciliation_finding f
                                   WHERE f.dedupe_key = 'delivery_failed:' || d.id::text)
                 ORDER BY d.created_at LIMIT $4",
            )
            .bind(self.channel)
            .bind(self.window.start)
            .bind(self.window.end)
            .bind(BATCH)
            .fetch_all(&self.ctx.pool)
            .await?;
            for (id, order, kind, attempts, error) in &page {
                self.flag(NewFinding {
                    kind: "delivery_failed",
                    order_id: *order,
                    code_id: None,
                    channel: order.map(|_| self.channel),
                    channel_reference: None,
                    detail: format!(
                        "the {kind} email (delivery {id}) failed for good after {attempts} attempt(s): {}",
                        error.as_deref().unwrap_or("")
                    ),
                    action_taken: None,
                    dedupe_key: format!("delivery_failed:{id}"),
                    run_id: Some(self.id),
                })
                .await?;
            }
            if (page.len() as i64) < BATCH {
                return Ok(());
            }
        }
    }

    /// Codes that came from neither an order nor a batch: nothing Entitle
    /// does makes one, so something outside it did.
    async fn codes_without_origin(&mut self) -> Result<(), JobError> {
        loop {
            let page: Vec<(Uuid, String, String)> = sqlx::query_as(
                "SELECT c.id, c.last4, c.state FROM activation_code c
                 WHERE c.order_line_id IS NULL AND c.batch_id IS NULL
                   AND c.issued_at >= $1 AND c.issued_at < $2
                   AND NOT EXISTS (SELECT 1 FROM reconciliation_finding f
                                   WHERE f.dedupe_key = 'code_without_origin:' || c.id::text)
                 ORDER BY c.issued_at LIMIT $3",
            )
            .bind(self.window.start)
            .bind(self.window.end)
            .bind(BATCH)
            .fetch_all(&self.ctx.pool)
            .await?;
            for (id, last4, state) in &page {
                self.flag(NewFinding {
                    kind: "code_without_origin",
                    order_id: None,
                    code_id: Some(*id),
                    channel: None,
                    channel_reference: None,
                    detail: format!("code …{last4} ({state}) belongs to no order and no batch"),
                    action_taken: None,
                    dedupe_key: format!("code_without_origin:{id}"),
                    run_id: Some(self.id),
                })
                .await?;
            }
            if (page.len() as i64) < BATCH {
                return Ok(());
            }
        }
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
    /// with the webhook handler; deliveries it creates are queued as usual.
    async fn carry_out(&self, event: &ChannelEvent) -> Result<Carried, JobError> {
        let filed = inbox::file(
            &self.ctx.pool,
            NewEvent {
                channel: self.channel,
                event_id: &event.event_id,
                event_type: &event.event_type,
                body: &event.body,
            },
        )
        .await?;
        let id = match filed {
            Filed::New(id) | Filed::Duplicate { id, .. } => id,
        };
        if let Err(e) = handlers::process_event(self.ctx, id).await {
            // Transient: the queue retries it, and the requeue sweep after.
            tracing::warn!(run = %self.id, event = %id, error = %e, "healing will be retried");
            if let Err(e) = self.ctx.queues.process_event(id).await {
                tracing::warn!(event = %id, error = format!("{e:#}"), "not enqueued; the requeue sweep will");
            }
        }
        Ok(sqlx::query_as(
            "SELECT id, status, error_code, order_id FROM webhook_inbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.ctx.pool)
        .await?)
    }
}
