//! Comparing the channel's side of a window with Entitle's: orders paid,
//! unpaid, unknown or different; refunds and cancellations not applied.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{BATCH, ChannelEvent, ChannelOrder, FULFILLED, Fulfilled, Run, Source};
use crate::{command::Command, error::JobError, finding::NewFinding, handlers};

impl Run<'_> {
    pub(super) async fn compare_channel(&mut self, source: &mut Source) -> Result<(), JobError> {
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
        // Applied, not merely recorded: a recorded adjustment whose order
        // is issued with codes still active was lost on the way, and is
        // taken back below like one never heard of.
        let applied: Vec<String> = sqlx::query_scalar(
            "SELECT adjustment_key FROM order_adjustment
             WHERE channel = $1 AND adjustment_key = ANY($2) AND applied_at IS NOT NULL",
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
}
