//! Sending the platform's events: a batch of deliveries fed under a lease
//! token is claimed, each is POSTed to its endpoint with Standard Webhooks
//! headers, and each attempt is recorded. A 2xx delivers; anything else is
//! tried again after an exponential backoff, for up to
//! `platform.retry_for_secs` (3 days by default), then it fails, with a
//! finding for operations to replay it.
//!
//! At least once: a worker that dies after the receiver answered and
//! before the attempt was recorded sends it again, under the same
//! `webhook-id`, which receivers deduplicate by.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt, future::BoxFuture, stream};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{endpoint, sign};
use crate::{
    Context, audit,
    feed::Work,
    finding::{self, NewFinding},
    lease::LeaseKeeper,
    retry::RetryPolicy,
};

/// One claimed delivery with what sending it needs.
struct Claimed {
    id: Uuid,
    attempts: i32,
    created_at: DateTime<Utc>,
    event_id: Uuid,
    body: Vec<u8>,
    code_id: Option<Uuid>,
    order_id: Option<Uuid>,
    endpoint: String,
    url: String,
    secrets: Result<Vec<sign::Secret>, crate::code::UnsealError>,
}

/// The body as sent: Standard Webhooks' `type`, `timestamp` and `data`,
/// with the event's `id` and its `seq` (increasing across all events; a
/// code's events are sent in `seq` order).
fn body(id: Uuid, kind: &str, seq: i64, at: DateTime<Utc>, data: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "type": kind, "timestamp": at, "seq": seq, "data": data,
    }))
    .expect("a JSON value serialises")
}

/// Claims the deliveries among `ids` fed under `token` and still pending,
/// renewing the lease, and returns them with the token they are held
/// under now: a fresh one, so the fed token claims them once (a job the
/// queue hands to two workers at once sends each event once).
async fn claim(
    ctx: &Context,
    token: Uuid,
    ids: &[Uuid],
    lease: Duration,
) -> sqlx::Result<(Uuid, Vec<Claimed>)> {
    let held = Uuid::now_v7();
    let rows = sqlx::query(
        "UPDATE platform_delivery d SET leased_until = now() + make_interval(secs => $3),
                                        lease_token = $4
         FROM platform_event e, platform_endpoint ep
         WHERE d.id = ANY ($1) AND d.lease_token = $2 AND d.status = 'pending'
           AND e.id = d.event_id AND ep.id = d.endpoint_id
         RETURNING d.id, d.attempts, d.created_at, e.id AS event_id, e.type, e.seq, e.data,
                   e.created_at AS event_at, e.code_id, e.order_id, ep.name, ep.url,
                   ep.secret_sealed, ep.previous_secret_sealed, ep.previous_until",
    )
    .bind(ids)
    .bind(token)
    .bind(lease.as_secs_f64())
    .bind(held)
    .fetch_all(&ctx.pool)
    .await?;
    let claimed = rows
        .into_iter()
        .map(|row| {
            let event_id: Uuid = row.get("event_id");
            let kind: String = row.get("type");
            let sealed: Vec<u8> = row.get("secret_sealed");
            let previous: Option<Vec<u8>> = row.get("previous_secret_sealed");
            Claimed {
                id: row.get("id"),
                attempts: row.get("attempts"),
                created_at: row.get("created_at"),
                event_id,
                body: body(
                    event_id,
                    &kind,
                    row.get("seq"),
                    row.get("event_at"),
                    row.get("data"),
                ),
                code_id: row.get("code_id"),
                order_id: row.get("order_id"),
                endpoint: row.get("name"),
                url: row.get("url"),
                secrets: endpoint::live_secrets(
                    &ctx.keys,
                    &sealed,
                    previous.as_deref(),
                    row.get("previous_until"),
                ),
            }
        })
        .collect();
    Ok((held, claimed))
}

/// What one attempt came to.
struct Attempt {
    status: Option<u16>,
    /// A stable code for a failure: `http_<status>`, `timeout`,
    /// `connect_failed`, `request_failed`, `secret_unreadable`.
    error: Option<String>,
    took: Duration,
}

impl Attempt {
    fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

async fn send(http: &reqwest::Client, delivery: &Claimed) -> Attempt {
    let started = Instant::now();
    let secrets = match &delivery.secrets {
        Ok(secrets) => secrets,
        Err(_) => {
            return Attempt {
                status: None,
                error: Some("secret_unreadable".into()),
                took: started.elapsed(),
            };
        }
    };
    let id = delivery.event_id.to_string();
    let timestamp = Utc::now().timestamp();
    let signature = sign::signature_header(secrets, &id, timestamp, &delivery.body);
    let sent = http
        .post(&delivery.url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(delivery.body.clone())
        .send()
        .await;
    let (status, error) = match sent {
        Ok(answer) if answer.status().is_success() => (Some(answer.status().as_u16()), None),
        Ok(answer) => (
            Some(answer.status().as_u16()),
            Some(format!("http_{}", answer.status().as_u16())),
        ),
        Err(e) if e.is_timeout() => (None, Some("timeout".into())),
        Err(e) if e.is_connect() => (None, Some("connect_failed".into())),
        Err(_) => (None, Some("request_failed".into())),
    };
    Attempt {
        status,
        error,
        took: started.elapsed(),
    }
}

/// Records an attempt and the delivery's next state, if the lease is still
/// this batch's (a lapsed lease means another worker has it now).
async fn record(
    pool: &PgPool,
    token: Uuid,
    delivery: &Claimed,
    attempt: &Attempt,
    policy: &RetryPolicy,
    retry_for: Duration,
) -> sqlx::Result<&'static str> {
    let attempts = delivery.attempts + 1;
    let wait = policy.backoff(attempts);
    let age = (Utc::now() - delivery.created_at)
        .to_std()
        .unwrap_or_default();
    let outcome = if attempt.delivered() {
        "delivered"
    } else if age + wait > retry_for {
        "failed"
    } else {
        "pending"
    };
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE platform_delivery
         SET attempts = attempts + 1, status = $3, last_status = $4, last_error = $5,
             delivered_at = CASE WHEN $3 = 'delivered' THEN now() END,
             due_at = CASE WHEN $3 = 'pending' THEN now() + make_interval(secs => $6) ELSE due_at END,
             leased_until = NULL, lease_token = NULL
         WHERE id = $1 AND lease_token = $2 AND status = 'pending'",
    )
    .bind(delivery.id)
    .bind(token)
    .bind(outcome)
    .bind(attempt.status.map(i32::from))
    .bind(&attempt.error)
    .bind(wait.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        return Ok("lapsed");
    }
    sqlx::query(
        "INSERT INTO platform_attempt (id, delivery_id, status_code, error, duration_ms)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(delivery.id)
    .bind(attempt.status.map(i32::from))
    .bind(&attempt.error)
    .bind(attempt.took.as_millis().min(i32::MAX as u128) as i32)
    .execute(&mut *tx)
    .await?;
    if outcome == "failed" {
        finding::record(
            &mut tx,
            audit::WORKER,
            NewFinding {
                kind: "platform_delivery_failed",
                order_id: delivery.order_id,
                code_id: delivery.code_id,
                channel: None,
                channel_reference: None,
                detail: format!(
                    "event {} was not delivered to the endpoint {} after {attempts} attempts \
                     (last: {}); replay it from the delivery log",
                    delivery.event_id,
                    delivery.endpoint,
                    attempt.error.as_deref().unwrap_or("?")
                ),
                action_taken: None,
                dedupe_key: format!("platform_delivery_failed:{}", delivery.id),
                run_id: None,
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// What a batch came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub claimed: usize,
    pub delivered: usize,
    pub retrying: usize,
    pub failed: usize,
}

/// Sends a batch of deliveries fed under `token`, several at once (a
/// batch never holds two events of one code: the feeder leases a code's
/// next event only once the earlier ones are done).
pub async fn send_batch(ctx: &Context, token: Uuid, ids: &[Uuid]) -> sqlx::Result<Sent> {
    let settings = &ctx.config.platform;
    let lease = ctx.config.lease();
    let (token, claimed) = claim(ctx, token, ids, lease).await?;
    let mut sent = Sent {
        claimed: claimed.len(),
        ..Sent::default()
    };
    if claimed.is_empty() {
        return Ok(sent);
    }
    let keeper = LeaseKeeper::start(
        ctx.pool.clone(),
        Work::Platform,
        token,
        claimed.iter().map(|c| c.id).collect(),
        lease,
    );
    let policy = settings.retry_policy();
    let retry_for = Duration::from_secs(settings.retry_for_secs);
    // Owned, boxed futures: a stream of borrowing closures trips the
    // compiler's proof that the job's future is `Send`.
    let sends: Vec<BoxFuture<'static, sqlx::Result<&'static str>>> = claimed
        .into_iter()
        .map(|delivery| {
            let ctx = ctx.clone();
            async move {
                let attempt = send(&ctx.http, &delivery).await;
                metrics::histogram!("entitle_platform_attempt_seconds")
                    .record(attempt.took.as_secs_f64());
                if let Some(error) = &attempt.error {
                    tracing::info!(delivery = %delivery.id, event = %delivery.event_id,
                        endpoint = %delivery.endpoint, error, "platform event not delivered");
                }
                // The platform has its answer: the record waits out a
                // short Postgres outage rather than let the lease lapse.
                crate::retry::while_unavailable(
                    lease,
                    "platform event sent but its attempt not yet recorded",
                    || record(&ctx.pool, token, &delivery, &attempt, &policy, retry_for),
                )
                .await
            }
            .boxed()
        })
        .collect();
    let outcomes: Vec<sqlx::Result<&'static str>> = stream::iter(sends)
        .buffer_unordered(settings.concurrency.max(1))
        .collect()
        .await;
    keeper.stop().await;
    for outcome in outcomes {
        let outcome = outcome?;
        match outcome {
            "delivered" => sent.delivered += 1,
            "failed" => sent.failed += 1,
            "pending" => sent.retrying += 1,
            _ => {}
        }
        metrics::counter!("entitle_platform_deliveries_total", "outcome" => outcome).increment(1);
    }
    Ok(sent)
}
