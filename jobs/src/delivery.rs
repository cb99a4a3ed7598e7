//! Email deliveries: the one home of a delivery's state machine.
//!
//! ```text
//! pending ──accepted by SMTP──────────▶ sent
//!    │ │ ├─refused for good───────────▶ failed
//!    │ │ └─no code left to send───────▶ skipped
//!    │ └─deferred: due again after a backoff (failed once attempts run out)
//!    └─claimed by a sender: leased, an attempt counted (still pending)
//! ```
//!
//! A claim changes no indexed column, so with the table's free space
//! (fillfactor) it is a HOT update: no index entry, nothing for vacuum.
//! (`sending` is kept only for rows written before claims stayed pending.)
//!
//! A delivery is created once, with its Message-ID fixed then, so every
//! attempt sends the same message and a message sent twice after a crash
//! can be recognised as one. A pending delivery is fed to the queue under a
//! lease (see [`crate::feed`]); the sender claims it by the lease's token.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool, Postgres, pool::PoolConnection};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    finding::{self, NewFinding},
    retry::RetryPolicy,
};

/// Which codes a delivery carries.
#[derive(Debug, Clone)]
pub enum CodeSelection {
    /// None (a receipt).
    None,
    /// Every code of the order still issued, in line and unit order.
    ActiveOfOrder,
    /// These codes, in this order.
    These(Vec<Uuid>),
}

/// A delivery to create.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    pub order_id: Option<Uuid>,
    pub kind: &'a str,
    pub recipient: &'a str,
    pub recipient_name: Option<&'a str>,
    pub send_after: DateTime<Utc>,
    pub codes: CodeSelection,
    /// The support or operations actor who asked for it, if anyone did.
    pub requested_by: Option<&'a str>,
}

/// The Message-ID a delivery is sent with, on every attempt.
pub fn message_id(id: Uuid, domain: &str) -> String {
    format!("<{id}@{domain}>")
}

/// Creates a pending delivery with a Message-ID fixed now, so every attempt
/// sends the same message. Returns `None` when it would carry no code though
/// it should (every code was revoked), or when the order already has its
/// delivery of this kind. The feeder queues it when it is due.
pub async fn create(
    conn: &mut PgConnection,
    delivery: &NewDelivery<'_>,
    message_id_domain: &str,
) -> sqlx::Result<Option<Uuid>> {
    create_with_id(conn, Uuid::now_v7(), delivery, message_id_domain).await
}

/// [`create`], with an id the caller chose (to name the delivery in an
/// audit event written before it).
pub async fn create_with_id(
    conn: &mut PgConnection,
    id: Uuid,
    delivery: &NewDelivery<'_>,
    message_id_domain: &str,
) -> sqlx::Result<Option<Uuid>> {
    let created = sqlx::query(
        "INSERT INTO email_delivery (id, order_id, kind, recipient_email, recipient_name,
                                     send_after, due_at, message_id, requested_by)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(delivery.order_id)
    .bind(delivery.kind)
    .bind(delivery.recipient)
    .bind(delivery.recipient_name)
    .bind(delivery.send_after)
    .bind(message_id(id, message_id_domain))
    .bind(delivery.requested_by)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if created == 0 {
        return Ok(None);
    }
    let carried = match &delivery.codes {
        CodeSelection::None => 0,
        // The lines are looked up first so the codes are found by their
        // line's index whatever the planner thinks of the table's size.
        CodeSelection::ActiveOfOrder => sqlx::query(
            "INSERT INTO email_delivery_code (delivery_id, code_id, position)
             SELECT $1, c.id, (row_number() OVER (ORDER BY l.line_index, c.unit_index))::int4
             FROM order_line l JOIN activation_code c ON c.order_line_id = l.id
             WHERE l.order_id = $2
               AND c.order_line_id = ANY(ARRAY(SELECT id FROM order_line WHERE order_id = $2))
               AND c.state = 'issued'",
        )
        .bind(id)
        .bind(delivery.order_id)
        .execute(&mut *conn)
        .await?
        .rows_affected(),
        CodeSelection::These(codes) => {
            let positions: Vec<i32> = (0..codes.len() as i32).collect();
            sqlx::query(
                "INSERT INTO email_delivery_code (delivery_id, code_id, position)
                 SELECT $1, c.id, c.position FROM UNNEST($2::uuid[], $3::int4[]) AS c(id, position)",
            )
            .bind(id)
            .bind(codes)
            .bind(&positions)
            .execute(&mut *conn)
            .await?
            .rows_affected()
        }
    };
    if carried == 0 && !matches!(delivery.codes, CodeSelection::None) {
        // Nothing left to send (an early refund revoked every code).
        sqlx::query("DELETE FROM email_delivery WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        return Ok(None);
    }
    if delivery.requested_by.is_some() {
        // The support action that asked for it writes the audit event.
        return Ok(Some(id));
    }
    audit::record(
        conn,
        AuditEvent {
            actor: audit::WORKER,
            action: "delivery.created",
            subject_type: "delivery",
            subject_id: id.to_string(),
            reason: None,
            data: json!({
                "order": delivery.order_id,
                "kind": delivery.kind,
                "codes": carried,
                "send_after": delivery.send_after,
            }),
        },
    )
    .await?;
    Ok(Some(id))
}

/// A delivery claimed for sending.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub kind: String,
    pub order_id: Option<Uuid>,
    pub recipient_email: String,
    pub recipient_name: Option<String>,
    pub message_id: String,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

/// Deliveries claimed by one sender, held under a token of their own.
#[derive(Debug)]
pub struct Claim {
    /// The token the claimed rows are held under now: the sender's alone.
    pub token: Uuid,
    pub deliveries: Vec<Claimed>,
}

/// Claims the deliveries among `ids` fed under `token` that are due and not
/// sent: an attempt is counted and the lease renewed for `lease`.
///
/// The claim moves the rows to a fresh token, so the fed token claims them
/// once: when the queue hands the same job to two senders (a redelivered
/// job whose first run is still going), the second finds nothing to send.
pub async fn claim(
    pool: &PgPool,
    token: Uuid,
    ids: &[Uuid],
    lease: std::time::Duration,
) -> sqlx::Result<Claim> {
    let held = Uuid::now_v7();
    let mut deliveries: Vec<Claimed> = sqlx::query_as(
        "UPDATE email_delivery
         SET attempts = attempts + 1, leased_until = now() + make_interval(secs => $3),
             lease_token = $4
         WHERE id = ANY($1) AND lease_token = $2 AND status IN ('pending', 'sending')
           AND due_at <= now()
         RETURNING id, kind, order_id, recipient_email, recipient_name, message_id, attempts",
    )
    .bind(ids)
    .bind(token)
    .bind(lease.as_secs_f64())
    .bind(held)
    .fetch_all(pool)
    .await?;
    deliveries.sort_by_key(|c| c.id);
    Ok(Claim {
        token: held,
        deliveries,
    })
}

/// Records that the SMTP server accepted these deliveries (id and the
/// server's reply), with their audit events, in one statement. Returns how
/// many were recorded (a delivery already recorded is not again).
///
/// One statement in its own implicit transaction, on purpose: once
/// Postgres has received it, it commits whether or not this process lives
/// to read the answer, so a worker killed after that moment does not send
/// the email again. (An explicit transaction would need a further round
/// trip for its COMMIT, which the kill could beat.)
pub async fn mark_sent(conn: &mut PgConnection, sent: &[(Uuid, String)]) -> sqlx::Result<u64> {
    if sent.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = sent.iter().map(|(id, _)| *id).collect();
    let replies: Vec<&str> = sent.iter().map(|(_, reply)| reply.as_str()).collect();
    Ok(sqlx::query(
        "WITH accepted AS (SELECT * FROM UNNEST($1::uuid[], $2::text[]) AS a(id, reply)),
         sent AS (
             UPDATE email_delivery d
             SET status = 'sent', sent_at = now(), leased_until = NULL, lease_token = NULL,
                 provider_response = a.reply, last_error = NULL, error_code = NULL
             FROM accepted a
             WHERE d.id = a.id AND d.status IN ('pending', 'sending')
             RETURNING d.id, d.order_id, d.message_id, a.reply)
         INSERT INTO audit_event (actor, action, subject_type, subject_id, data)
         SELECT $3, 'delivery.sent', 'delivery', id::text,
                jsonb_build_object('order', order_id, 'message_id', message_id, 'reply', reply)
         FROM sent ORDER BY id",
    )
    .bind(&ids)
    .bind(&replies)
    .bind(audit::WORKER)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Connections for [`record_sent_as_accepted`], taken before the first
/// message goes and known to answer (the pool does not test connections
/// it hands out, and one left from before a Postgres restart fails its
/// first statement): one waited for, and a second when the pool has one
/// idle (never waited for: a batch holding one must not wait on batches
/// holding theirs).
pub async fn recording_connections(pool: &PgPool) -> sqlx::Result<Vec<PoolConnection<Postgres>>> {
    let mut lanes = vec![answering(pool).await?];
    if let Some(mut second) = pool.try_acquire() {
        if second.ping().await.is_ok() {
            lanes.push(second);
        } else {
            second.close_on_drop();
        }
    }
    Ok(lanes)
}

/// Records accepted deliveries as they come in, on `lanes` (from
/// [`recording_connections`]): an accepted message never waits for the
/// pool, nor for another write's commit while a lane is free, since the
/// time between "accepted" and "recorded" is when a killed worker sends an
/// email twice. Each write takes whatever was accepted while the lanes were
/// busy (group commit), so at low load a message is recorded the moment
/// it is accepted, and at high load one statement records many. A write
/// that fails because Postgres does (restarting, say) is tried again on
/// fresh connections from `pool` for up to `patience` (the deliveries'
/// lease, which the batch's keeper renews once Postgres is back): given up
/// sooner, the lease would lapse and the emails go again.
/// Returns how many were recorded.
pub async fn record_sent_as_accepted(
    pool: PgPool,
    lanes: Vec<PoolConnection<Postgres>>,
    accepted: tokio::sync::mpsc::UnboundedReceiver<(Uuid, String)>,
    patience: std::time::Duration,
) -> u64 {
    let accepted = std::sync::Arc::new(tokio::sync::Mutex::new(accepted));
    let mut writers = tokio::task::JoinSet::new();
    for conn in lanes {
        writers.spawn(record_on(pool.clone(), conn, accepted.clone(), patience));
    }
    let mut recorded = 0;
    while let Some(lane) = writers.join_next().await {
        match lane {
            Ok(n) => recorded += n,
            Err(e) => tracing::error!(error = %e, "a recording lane ended abnormally"),
        }
    }
    recorded
}

/// One lane of [`record_sent_as_accepted`]: gathers what was accepted
/// (one lane gathers at a time, while the others write) and writes it.
async fn record_on(
    pool: PgPool,
    conn: PoolConnection<Postgres>,
    accepted: std::sync::Arc<
        tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(Uuid, String)>>,
    >,
    patience: std::time::Duration,
) -> u64 {
    let mut recorded = 0;
    let mut conn = Some(conn);
    loop {
        let group = {
            let mut accepted = accepted.lock().await;
            let Some(first) = accepted.recv().await else {
                break;
            };
            let mut group = vec![first];
            while let Ok(next) = accepted.try_recv() {
                group.push(next);
            }
            group
        };
        match record_until_written(&pool, &mut conn, &group, patience).await {
            Ok(n) => recorded += n,
            // Sent but not recorded: the lease lapses and they are sent
            // again, with the same Message-IDs.
            Err(e) => tracing::error!(error = %e, emails = group.len(),
                "emails sent but not recorded; they will be sent again"),
        }
    }
    recorded
}

/// Writes one group on the lane's connection and, while Postgres fails
/// (restarting, say), on fresh connections from `pool`, each checked with a
/// ping, for up to `patience`; the one that wrote becomes the lane's. A
/// connection that failed is closed, not returned to the pool.
async fn record_until_written(
    pool: &PgPool,
    conn: &mut Option<PoolConnection<Postgres>>,
    group: &[(Uuid, String)],
    patience: std::time::Duration,
) -> sqlx::Result<u64> {
    let mut lane = conn.take();
    let (written, writer) =
        crate::retry::while_unavailable(patience, "emails sent but not yet recorded", || {
            let lane = lane.take();
            async move {
                let mut writer = match lane {
                    Some(lane) => lane,
                    None => answering(pool).await?,
                };
                match mark_sent(&mut writer, group).await {
                    Ok(n) => Ok((n, writer)),
                    Err(e) => {
                        writer.close_on_drop();
                        Err(e)
                    }
                }
            }
        })
        .await?;
    *conn = Some(writer);
    Ok(written)
}

/// A connection from `pool` that answers a ping: connections left idle
/// from before a Postgres restart are closed and passed over.
async fn answering(pool: &PgPool) -> sqlx::Result<PoolConnection<Postgres>> {
    loop {
        let mut conn = pool.acquire().await?;
        match conn.ping().await {
            Ok(()) => return Ok(conn),
            Err(e) if !crate::db::unavailable(&e) => return Err(e),
            Err(_) => conn.close_on_drop(),
        }
    }
}

/// Records that a claimed delivery had nothing left to send (every code it
/// carried was revoked, expired or redeemed before it was due).
pub async fn skip(pool: &PgPool, id: Uuid, why: &str) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    let order: Option<Option<Uuid>> = sqlx::query_scalar(
        "UPDATE email_delivery
         SET status = 'skipped', leased_until = NULL, lease_token = NULL, last_error = $2,
             error_code = 'no_live_codes'
         WHERE id = $1 AND status IN ('pending', 'sending') RETURNING order_id",
    )
    .bind(id)
    .bind(why)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(order) = order {
        audit::record(
            &mut tx,
            AuditEvent {
                actor: audit::WORKER,
                action: "delivery.skipped",
                subject_type: "delivery",
                subject_id: id.to_string(),
                reason: Some(why),
                data: json!({ "order": order }),
            },
        )
        .await?;
    }
    tx.commit().await
}

/// Why a claimed delivery was not sent.
#[derive(Debug, Clone)]
pub struct Problem {
    pub id: Uuid,
    /// Stable code: `smtp_unavailable`, `recipient_refused`,
    /// `recipient_invalid`, `template_failed`, `code_unsealable`, ...
    pub code: &'static str,
    pub detail: String,
    /// Attempts so far, the failed one included.
    pub attempts: i32,
}

/// Ends claimed deliveries as `failed`, each with its audit event and a
/// `delivery_failed` finding for operations.
pub async fn fail(pool: &PgPool, problems: &[Problem]) -> sqlx::Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    for problem in problems {
        let failed: Option<(Option<Uuid>, String, Option<String>)> = sqlx::query_as(
            "UPDATE email_delivery d
             SET status = 'failed', leased_until = NULL, lease_token = NULL, last_error = $2,
                 error_code = $3
             WHERE d.id = $1 AND d.status IN ('pending', 'sending')
             RETURNING d.order_id, d.kind,
                       (SELECT o.channel FROM orders o WHERE o.id = d.order_id)",
        )
        .bind(problem.id)
        .bind(&problem.detail)
        .bind(problem.code)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((order_id, kind, channel)) = failed else {
            continue;
        };
        audit::record(
            &mut tx,
            AuditEvent {
                actor: audit::WORKER,
                action: "delivery.failed",
                subject_type: "delivery",
                subject_id: problem.id.to_string(),
                reason: Some(&problem.detail),
                data: json!({ "order": order_id, "error_code": problem.code }),
            },
        )
        .await?;
        finding::record(
            &mut tx,
            audit::WORKER,
            NewFinding {
                kind: "delivery_failed",
                order_id,
                code_id: None,
                channel: channel.as_deref(),
                channel_reference: None,
                detail: format!(
                    "the {kind} email (delivery {}) failed for good after {} attempt(s): {}: {}",
                    problem.id, problem.attempts, problem.code, problem.detail
                ),
                action_taken: None,
                dedupe_key: format!("delivery_failed:{}", problem.id),
                run_id: None,
            },
        )
        .await?;
        metrics::counter!("entitle_emails_failed_total", "code" => problem.code).increment(1);
        tracing::warn!(delivery = %problem.id, code = problem.code, detail = %problem.detail,
            "email failed for good");
    }
    tx.commit().await
}

/// Gives failed attempts back: each delivery is due again after its
/// backoff, or fails for good once it has used up its attempts.
pub async fn retry_later(
    pool: &PgPool,
    problems: &[Problem],
    policy: &RetryPolicy,
) -> sqlx::Result<()> {
    let (again, exhausted): (Vec<&Problem>, Vec<&Problem>) =
        problems.iter().partition(|p| policy.may_retry(p.attempts));
    if !again.is_empty() {
        let ids: Vec<Uuid> = again.iter().map(|p| p.id).collect();
        let waits: Vec<f64> = again
            .iter()
            .map(|p| policy.backoff(p.attempts).as_secs_f64())
            .collect();
        let errors: Vec<&str> = again.iter().map(|p| p.detail.as_str()).collect();
        let codes: Vec<&str> = again.iter().map(|p| p.code).collect();
        sqlx::query(
            "UPDATE email_delivery d
             SET status = 'pending', due_at = now() + make_interval(secs => r.wait),
                 last_error = r.error, error_code = r.code, leased_until = NULL, lease_token = NULL
             FROM UNNEST($1::uuid[], $2::float8[], $3::text[], $4::text[]) AS r(id, wait, error, code)
             WHERE d.id = r.id AND d.status IN ('pending', 'sending')",
        )
        .bind(&ids)
        .bind(&waits)
        .bind(&errors)
        .bind(&codes)
        .execute(pool)
        .await?;
        metrics::counter!("entitle_email_attempts_failed_total").increment(again.len() as u64);
    }
    let exhausted: Vec<Problem> = exhausted
        .into_iter()
        .map(|p| Problem {
            code: "attempts_exhausted",
            detail: format!(
                "gave up after {} attempts; last: {}: {}",
                p.attempts, p.code, p.detail
            ),
            ..p.clone()
        })
        .collect();
    if !exhausted.is_empty() {
        metrics::counter!("entitle_attempts_exhausted_total", "what" => "delivery")
            .increment(exhausted.len() as u64);
    }
    fail(pool, &exhausted).await
}

/// The SMTP server answers again: emails that were waiting out a backoff
/// because it did not are due now, instead of whenever their backoff ends.
/// Returns how many.
pub async fn retry_waiting_for_smtp(pool: &PgPool) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "UPDATE email_delivery SET due_at = now()
         WHERE status = 'pending' AND error_code = 'smtp_unavailable' AND due_at > now()
           AND due_at > send_after",
    )
    .execute(pool)
    .await?
    .rows_affected())
}
