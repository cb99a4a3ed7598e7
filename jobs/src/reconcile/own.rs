//! Entitle's own records of a window that need operations: webhook events
//! and emails that failed for good, and codes of no origin.

use uuid::Uuid;

use super::{BATCH, Run};
use crate::{error::JobError, finding::NewFinding};

/// A failed webhook event.
#[derive(Debug, sqlx::FromRow)]
struct FailedEvent {
    id: Uuid,
    event_id: String,
    event_type: String,
    error_code: Option<String>,
    last_error: Option<String>,
}

/// A failed email delivery.
#[derive(Debug, sqlx::FromRow)]
struct FailedDelivery {
    id: Uuid,
    order_id: Option<Uuid>,
    kind: String,
    attempts: i32,
    last_error: Option<String>,
}

impl Run<'_> {
    /// Webhook events of the channel that failed for good.
    pub(super) async fn failed_events(&mut self) -> Result<(), JobError> {
        loop {
            let page: Vec<FailedEvent> = sqlx::query_as(
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
            for FailedEvent {
                id,
                event_id,
                event_type,
                error_code: code,
                last_error: error,
            } in &page
            {
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
    pub(super) async fn failed_deliveries(&mut self) -> Result<(), JobError> {
        loop {
            let page: Vec<FailedDelivery> = sqlx::query_as(
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
            for FailedDelivery {
                id,
                order_id: order,
                kind,
                attempts,
                last_error: error,
            } in &page
            {
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
    pub(super) async fn codes_without_origin(&mut self) -> Result<(), JobError> {
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
}
