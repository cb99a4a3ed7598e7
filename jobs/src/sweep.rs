//! The scheduled sweeps that make sure nothing is lost: re-enqueue what
//! Postgres says is unfinished (whatever happened to Redis), expire old codes
//! in bounded batches that never block redemptions, and prune raw webhook
//! bodies after the retention period. Each tick runs once across all worker
//! processes: the first to claim its `sweep_run` row runs it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{audit, context::Context, error::JobError};

/// Claims a job's tick for this worker; false when another process has it.
pub async fn claim_tick(
    pool: &PgPool,
    job: &str,
    tick: DateTime<Utc>,
    worker: &str,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO sweep_run (job, tick_at, worker) VALUES ($1, $2, $3)
         ON CONFLICT (job, tick_at) DO NOTHING",
    )
    .bind(job)
    .bind(tick)
    .bind(worker)
    .execute(pool)
    .await?
    .rows_affected()
        == 1)
}

/// Records what a claimed run did.
pub async fn finish_tick(
    pool: &PgPool,
    job: &str,
    tick: DateTime<Utc>,
    summary: Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE sweep_run SET finished_at = now(), summary = $3 WHERE job = $1 AND tick_at = $2",
    )
    .bind(job)
    .bind(tick)
    .bind(summary)
    .execute(pool)
    .await?;
    Ok(())
}

/// Enqueues again every webhook event and delivery that should have finished
/// `grace` ago and has not: after Redis lost its queues, or a job ran out of
/// retries. Jobs are idempotent, so an extra run changes nothing.
pub async fn requeue(ctx: &Context, grace: Duration, limit: i64) -> Result<Value, JobError> {
    let grace = grace.as_secs_f64();
    let events: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE webhook_inbox SET requeued_at = now()
         WHERE id IN (SELECT id FROM webhook_inbox
                      WHERE status = 'pending' AND body IS NOT NULL
                        AND received_at < now() - make_interval(secs => $1)
                        AND (requeued_at IS NULL OR requeued_at < now() - make_interval(secs => $1))
                      ORDER BY received_at LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(grace)
    .bind(limit)
    .fetch_all(&ctx.pool)
    .await?;
    for id in &events {
        ctx.queues.process_event(*id).await?;
    }
    let deliveries: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE email_delivery SET requeued_at = now()
         WHERE id IN (SELECT id FROM email_delivery
                      WHERE ((status = 'pending' AND send_after < now() - make_interval(secs => $1))
                             OR (status = 'sending' AND claimed_until < now()))
                        AND (requeued_at IS NULL OR requeued_at < now() - make_interval(secs => $1))
                      ORDER BY send_after LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id, send_after",
    )
    .bind(grace)
    .bind(limit)
    .fetch_all(&ctx.pool)
    .await?;
    for (id, _) in &deliveries {
        ctx.queues.send_delivery(*id).await?;
    }
    // Runs asked for on demand whose job Redis lost.
    let runs: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM reconciliation_run
         WHERE status = 'queued' AND created_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT $2",
    )
    .bind(grace)
    .bind(limit)
    .fetch_all(&ctx.pool)
    .await?;
    for id in &runs {
        ctx.queues.run_reconciliation(*id).await?;
    }
    // A run whose worker died stays `running`; a run takes minutes, so one
    // started this long ago is marked failed (the next run covers its
    // window again).
    let abandoned = sqlx::query(
        "UPDATE reconciliation_run SET status = 'failed', finished_at = now(),
                error = 'abandoned: the worker running it stopped before it ended'
         WHERE status = 'running' AND started_at < now() - interval '6 hours'",
    )
    .execute(&ctx.pool)
    .await?
    .rows_affected();
    if !events.is_empty() || !deliveries.is_empty() || !runs.is_empty() {
        tracing::warn!(
            events = events.len(),
            deliveries = deliveries.len(),
            reconciliations = runs.len(),
            "unfinished work enqueued again"
        );
        metrics::counter!("entitle_sweep_requeued_total", "what" => "event")
            .increment(events.len() as u64);
        metrics::counter!("entitle_sweep_requeued_total", "what" => "delivery")
            .increment(deliveries.len() as u64);
    }
    Ok(json!({
        "events": events.len(),
        "deliveries": deliveries.len(),
        "reconciliations": runs.len(),
        "reconciliations_abandoned": abandoned,
    }))
}

/// Expires unredeemed codes past their expiry, `batch` per transaction, each
/// with its audit event. Rows a redemption holds are skipped, not waited
/// for, and picked up by the next batch or tick.
pub async fn expire(pool: &PgPool, batch: i64) -> Result<Value, JobError> {
    let mut total = 0usize;
    loop {
        let mut tx = pool.begin().await?;
        let expired: Vec<(Uuid, String)> = sqlx::query_as(
            "UPDATE activation_code SET state = 'expired', expired_at = now()
             WHERE id IN (SELECT id FROM activation_code
                          WHERE state = 'issued' AND expires_at <= now()
                          ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
               AND state = 'issued'
             RETURNING id, last4",
        )
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<(String, Value)> = expired
            .iter()
            .map(|(id, last4)| {
                (
                    id.to_string(),
                    json!({ "last4": last4, "before": { "state": "issued" }, "after": { "state": "expired" } }),
                )
            })
            .collect();
        audit::record_many(&mut tx, audit::WORKER, "code.expired", "code", &events).await?;
        tx.commit().await?;
        total += expired.len();
        if (expired.len() as i64) < batch {
            break;
        }
    }
    if total > 0 {
        metrics::counter!("entitle_codes_expired_total").increment(total as u64);
        tracing::info!(codes = total, "codes expired");
    }
    Ok(json!({ "expired": total }))
}

/// Removes raw bodies of finished webhook events older than `days`: they hold
/// personal data. The events' records, orders, codes and audit stay.
pub async fn prune(pool: &PgPool, days: u32, batch: i64) -> Result<Value, JobError> {
    let mut total = 0u64;
    loop {
        let pruned = sqlx::query(
            "UPDATE webhook_inbox SET body = NULL
             WHERE id IN (SELECT id FROM webhook_inbox
                          WHERE body IS NOT NULL AND status <> 'pending'
                            AND received_at < now() - make_interval(days => $1)
                          LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(days as i32)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        total += pruned;
        if (pruned as i64) < batch {
            break;
        }
    }
    Ok(json!({ "bodies_pruned": total }))
}

/// Emails each holder the unredeemed codes of their orders that expire within
/// `days`, once per code, `batch` codes per transaction. Returns deliveries
/// to enqueue.
pub async fn remind(
    pool: &PgPool,
    message_id_domain: &str,
    days: u32,
    batch: i64,
) -> Result<(Value, Vec<Uuid>), JobError> {
    let mut deliveries = Vec::new();
    let mut codes = 0usize;
    loop {
        let mut tx = pool.begin().await?;
        let due: Vec<(Uuid, Uuid, String, Option<String>)> = sqlx::query_as(
            "WITH due AS (
                 SELECT c.id FROM activation_code c
                 WHERE c.state = 'issued' AND c.reminded_at IS NULL AND c.order_line_id IS NOT NULL
                   AND c.expires_at > now() AND c.expires_at <= now() + make_interval(days => $1)
                 ORDER BY c.expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE activation_code c SET reminded_at = now()
             FROM due, order_line l, orders o
             WHERE c.id = due.id AND l.id = c.order_line_id AND o.id = l.order_id
             RETURNING c.id, o.id, coalesce(o.gift_recipient_email, o.buyer_email),
                       coalesce(o.gift_recipient_name, o.buyer_name)",
        )
        .bind(days as i32)
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut by_order: std::collections::BTreeMap<Uuid, (String, Option<String>, Vec<Uuid>)> =
            std::collections::BTreeMap::new();
        for (code, order, holder, name) in &due {
            by_order
                .entry(*order)
                .or_insert_with(|| (holder.clone(), name.clone(), Vec::new()))
                .2
                .push(*code);
        }
        for (order, (holder, name, order_codes)) in by_order {
            let delivery = crate::issuance::NewDelivery {
                order_id: Some(order),
                kind: "expiry_reminder",
                recipient: &holder,
                recipient_name: name.as_deref(),
                send_after: Utc::now(),
                codes: crate::issuance::CodeSelection::These(order_codes),
                requested_by: None,
            };
            if let Some(id) =
                crate::issuance::create_delivery(&mut tx, &delivery, message_id_domain).await?
            {
                deliveries.push(id);
            }
        }
        tx.commit().await?;
        codes += due.len();
        if (due.len() as i64) < batch {
            break;
        }
    }
    Ok((
        json!({ "codes_reminded": codes, "emails": deliveries.len() }),
        deliveries,
    ))
}
