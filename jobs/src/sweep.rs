//! The scheduled sweeps: housekeeping of Redis (dead workers' registrations,
//! finished jobs), expiry of old codes in bounded batches that never block
//! redemptions, expiry reminders, and pruning of raw webhook bodies after
//! the retention period. Each tick runs once across all worker processes:
//! the first to claim its `sweep_run` row runs it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    audit,
    error::JobError,
    platform_event::{self, Kind},
    queue::Queues,
};

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

/// Housekeeping: forgets the Redis registrations of worker processes that
/// died (a clean stop removes its own), removes finished jobs from Redis,
/// and fails reconciliation runs whose worker died. Unfinished work needs
/// nothing here: its lease lapses and the feeder queues it again.
pub async fn housekeeping(
    pool: &PgPool,
    queues: &Queues,
    finished_retention: Duration,
) -> Result<Value, JobError> {
    // Three missed heartbeats (10 s apart) and a worker is gone.
    let workers = queues.forget_dead_workers(Duration::from_secs(30)).await?;
    let jobs = queues.vacuum(finished_retention).await?;
    // A run whose worker died stays `running`; a run takes minutes, so one
    // started this long ago is marked failed (the next run covers its
    // window again).
    let abandoned = sqlx::query(
        "UPDATE reconciliation_run SET status = 'failed', finished_at = now(),
                error = 'abandoned: the worker running it stopped before it ended'
         WHERE status = 'running' AND started_at < now() - interval '6 hours'",
    )
    .execute(pool)
    .await?
    .rows_affected();
    if workers > 0 {
        tracing::info!(
            workers,
            "registrations of stopped workers removed from Redis"
        );
    }
    let vacuumed = vacuum_queues_without_autovacuum(pool).await?;
    Ok(json!({
        "dead_workers_forgotten": workers,
        "finished_jobs_removed": jobs,
        "reconciliations_abandoned": abandoned,
        "queue_tables_vacuumed": vacuumed,
    }))
}

/// The tables work waits in: every row is updated a few times on its way
/// through, so their indexes need vacuuming as they drain.
const QUEUE_TABLES: [&str; 3] = ["webhook_inbox", "email_delivery", "reconciliation_run"];

/// Whether the server runs without autovacuum (some development and CI
/// servers do).
pub async fn autovacuum_off(pool: &PgPool) -> sqlx::Result<bool> {
    let setting: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
        .await?;
    Ok(setting == "off")
}

/// Vacuums (and analyzes) the queue tables when autovacuum will not: without
/// it, a drained backlog leaves its index entries behind and every feeding
/// round walks over them, and the planner never learns the tables grew.
async fn vacuum_queues_without_autovacuum(pool: &PgPool) -> sqlx::Result<bool> {
    if !autovacuum_off(pool).await? {
        return Ok(false);
    }
    for table in QUEUE_TABLES {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) {table}")))
            .execute(pool)
            .await?;
    }
    Ok(true)
}

/// One batch ($1 codes) of the expiry sweep: the codes whose expiry is
/// behind them and that the sweep has not passed, by the expiry index.
pub const EXPIRE_SQL: &str = "
    WITH due AS (SELECT id, state FROM activation_code
                 WHERE swept_at IS NULL AND expires_at <= now()
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
    UPDATE activation_code c
    SET swept_at = now(),
        state = CASE WHEN due.state = 'issued' THEN 'expired' ELSE c.state END,
        expired_at = CASE WHEN due.state = 'issued' THEN now() ELSE c.expired_at END
    FROM due WHERE c.id = due.id
    RETURNING c.id, c.last4, due.state = 'issued'";

/// Expires unredeemed codes past their expiry, `batch` per transaction, each
/// with its audit event. Rows a redemption holds are skipped, not waited
/// for, and picked up by the next batch or tick.
///
/// The sweep passes every code once its expiry is behind it, whatever its
/// state, and marks it `swept_at`: that takes it out of the expiry index,
/// which names no state so that redemption's update stays HOT (see the
/// migration `redemption_hot`). Only codes still issued change state.
pub async fn expire(pool: &PgPool, batch: i64) -> Result<Value, JobError> {
    let mut total = 0usize;
    loop {
        let mut tx = pool.begin().await?;
        let swept: Vec<(Uuid, String, bool)> = sqlx::query_as(EXPIRE_SQL)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await?;
        let passed = swept.len();
        let expired: Vec<(Uuid, String)> = swept
            .into_iter()
            .filter(|(_, _, was_issued)| *was_issued)
            .map(|(id, last4, _)| (id, last4))
            .collect();
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
        let ids: Vec<Uuid> = expired.iter().map(|(id, _)| *id).collect();
        platform_event::record_codes(&mut tx, Kind::CodeExpired, &ids, json!({})).await?;
        tx.commit().await?;
        total += expired.len();
        if (passed as i64) < batch {
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
    let mut events = 0u64;
    loop {
        // Events for the platform, once no delivery of theirs is pending,
        // go with their deliveries and attempts; the oldest first, by the
        // `seq` index. The audit log keeps what changed.
        let pruned = sqlx::query(
            "WITH doomed AS (
                 SELECT e.id FROM platform_event e
                 WHERE e.created_at < now() - make_interval(days => $1)
                   AND NOT EXISTS (SELECT 1 FROM platform_delivery d
                                   WHERE d.event_id = e.id AND d.status = 'pending')
                 ORDER BY e.seq LIMIT $2 FOR UPDATE SKIP LOCKED
             ), attempts AS (
                 DELETE FROM platform_attempt a USING platform_delivery d, doomed
                 WHERE a.delivery_id = d.id AND d.event_id = doomed.id
             ), deliveries AS (
                 DELETE FROM platform_delivery d USING doomed WHERE d.event_id = doomed.id
             )
             DELETE FROM platform_event e USING doomed WHERE e.id = doomed.id",
        )
        .bind(days as i32)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        events += pruned;
        if (pruned as i64) < batch {
            break;
        }
    }
    Ok(json!({ "bodies_pruned": total, "platform_events_pruned": events }))
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
                 WHERE c.swept_at IS NULL AND c.state = 'issued' AND c.reminded_at IS NULL
                   AND c.order_line_id IS NOT NULL
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
            let delivery = crate::delivery::NewDelivery {
                order_id: Some(order),
                kind: "expiry_reminder",
                recipient: &holder,
                recipient_name: name.as_deref(),
                send_after: Utc::now(),
                codes: crate::delivery::CodeSelection::These(order_codes),
                requested_by: None,
            };
            if let Some(id) = crate::delivery::create(&mut tx, &delivery, message_id_domain).await?
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
