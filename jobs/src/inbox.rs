//! The webhook inbox: every authentic event is kept here before it is
//! acknowledged, keyed by channel and the channel's event id. This module is
//! the one home of an event's state machine:
//!
//! ```text
//! pending ──processed──▶ processed
//!    │ ├────ignored───▶ ignored     (nothing to do)
//!    │ └────failed────▶ failed      (permanent cause, or attempts exhausted)
//!    └─retry later─▶ pending (due after a backoff)
//! failed ──reopened by an operator──▶ pending
//! ```
//!
//! A pending event is fed to the queue under a lease (see [`crate::feed`]);
//! the worker claims it by the lease's token, which counts an attempt. An
//! event that can never be carried out may also be filed `failed` at once.
//!
//! A body is kept byte for byte, so its signature can be checked again: in
//! `body` (text) when text can hold it exactly, which is every body of valid
//! UTF-8 without NUL, as the channels' JSON is; otherwise in `body_bytes`,
//! with a readable rendering in `body` for people and the prune sweep.

use std::borrow::Cow;

use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    finding::{self, NewFinding},
    retry::RetryPolicy,
};

/// An event as the gateway files it.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub channel: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// Exactly as received.
    pub body: &'a [u8],
}

/// How a body is stored: its text, and its exact bytes when the text is not
/// them (invalid UTF-8 and NUL shown as U+FFFD).
fn stored_body(raw: &[u8]) -> (Cow<'_, str>, Option<&[u8]>) {
    match std::str::from_utf8(raw) {
        Ok(text) if !text.contains('\0') => (Cow::Borrowed(text), None),
        _ => (
            Cow::Owned(String::from_utf8_lossy(raw).replace('\0', "\u{FFFD}")),
            Some(raw),
        ),
    }
}

/// What filing an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filed {
    /// First time this event was seen.
    New(Uuid),
    /// Seen before; `finished` tells whether processing already ended.
    Duplicate { id: Uuid, finished: bool },
}

/// A stored event, as the worker reads it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: Uuid,
    pub channel: String,
    pub event_id: String,
    pub event_type: String,
    /// Exactly as received; `None` once pruned.
    pub body: Option<Vec<u8>>,
    pub status: String,
    /// Attempts so far, this one included when it was claimed.
    pub attempts: i32,
}

/// Files an event once; a duplicate is a no-op that reports the original.
/// One round trip for a new event: the webhook's answer waits on it.
pub async fn file(pool: &PgPool, event: NewEvent<'_>) -> sqlx::Result<Filed> {
    let (text, bytes) = stored_body(event.body);
    let inserted = sqlx::query(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body, body_bytes)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (channel, event_id) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(event.channel)
    .bind(event.event_id)
    .bind(event.event_type)
    .bind(text.as_ref())
    .bind(bytes)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = inserted {
        return Ok(Filed::New(row.get("id")));
    }
    original(pool, event).await
}

/// The event filed before under the same channel and event id.
async fn original(pool: &PgPool, event: NewEvent<'_>) -> sqlx::Result<Filed> {
    let row =
        sqlx::query("SELECT id, status FROM webhook_inbox WHERE channel = $1 AND event_id = $2")
            .bind(event.channel)
            .bind(event.event_id)
            .fetch_one(pool)
            .await?;
    let status: String = row.get("status");
    Ok(Filed::Duplicate {
        id: row.get("id"),
        finished: status != "pending",
    })
}

/// An event to file, owned, as the gateway's intake group holds it.
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    pub channel: &'static str,
    pub event_id: String,
    pub event_type: String,
    /// Exactly as received.
    pub body: Vec<u8>,
}

impl OwnedEvent {
    fn borrowed(&self) -> NewEvent<'_> {
        NewEvent {
            channel: self.channel,
            event_id: &self.event_id,
            event_type: &self.event_type,
            body: &self.body,
        }
    }
}

/// Files many events in one statement, one result per event in order. When
/// the statement is refused as a whole (one event's data is), each event is
/// filed on its own, so only the bad one fails.
pub async fn file_many(pool: &PgPool, events: &[OwnedEvent]) -> Vec<sqlx::Result<Filed>> {
    match file_together(pool, events).await {
        Ok(filed) => filed,
        // Postgres is down or busy: one at a time would only wait again.
        Err(e) if crate::db::unavailable(&e) => {
            let mut all = vec![Err(e)];
            all.extend((1..events.len()).map(|_| Err(sqlx::Error::PoolTimedOut)));
            all
        }
        Err(e) if events.len() == 1 => vec![Err(e)],
        Err(e) => {
            if events.len() > 1 {
                tracing::debug!(error = %e, events = events.len(), "filing one at a time");
            }
            let mut filed = Vec::with_capacity(events.len());
            for event in events {
                filed.push(file(pool, event.borrowed()).await);
            }
            filed
        }
    }
}

/// One insert for the group; `Err` only when that insert was refused (so
/// nothing of the group was filed). Once it committed, each event's answer
/// stands on its own: a failed look-up of an earlier copy fails that event
/// alone.
async fn file_together(
    pool: &PgPool,
    events: &[OwnedEvent],
) -> sqlx::Result<Vec<sqlx::Result<Filed>>> {
    // The same event twice in one group: the first files it, the rest are
    // its duplicates.
    let mut first_of = std::collections::HashMap::new();
    let mut unique = Vec::new();
    let mut position = Vec::with_capacity(events.len());
    for event in events {
        let key = (event.channel, event.event_id.as_str());
        let at = *first_of.entry(key).or_insert_with(|| {
            unique.push((Uuid::now_v7(), event));
            unique.len() - 1
        });
        position.push(at);
    }
    let bodies: Vec<(Cow<'_, str>, Option<&[u8]>)> =
        unique.iter().map(|(_, e)| stored_body(&e.body)).collect();
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body, body_bytes)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[])
         ON CONFLICT (channel, event_id) DO NOTHING
         RETURNING id",
    )
    .bind(unique.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(unique.iter().map(|(_, e)| e.channel).collect::<Vec<_>>())
    .bind(
        unique
            .iter()
            .map(|(_, e)| e.event_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        unique
            .iter()
            .map(|(_, e)| e.event_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(bodies.iter().map(|(text, _)| text.as_ref()).collect::<Vec<_>>())
    .bind(bodies.iter().map(|(_, bytes)| *bytes).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    let mut outcome = Vec::with_capacity(unique.len());
    for (id, event) in &unique {
        outcome.push(if inserted.contains(id) {
            Ok(Filed::New(*id))
        } else {
            // Filed before (rare: a channel's retry): look the original up.
            original(pool, event.borrowed()).await
        });
    }
    let mut seen = vec![false; unique.len()];
    Ok(position
        .into_iter()
        .map(|at| {
            let again = std::mem::replace(&mut seen[at], true);
            match &outcome[at] {
                Ok(Filed::New(id)) if again => Ok(Filed::Duplicate {
                    id: *id,
                    finished: false,
                }),
                Ok(filed) => Ok(*filed),
                Err(e) => Err(sqlx::Error::Protocol(format!("filing the event: {e}"))),
            }
        })
        .collect())
}

/// The gateway's intake: concurrent webhooks filed in group commits (see
/// [`crate::group`]), each answered once its own row is committed.
#[derive(Clone)]
pub struct Intake(crate::group::Group<OwnedEvent, sqlx::Result<Filed>>);

impl Intake {
    /// Starts `writers` writers on the current runtime.
    pub fn start(pool: PgPool, writers: usize) -> Self {
        Intake(crate::group::Group::spawn(
            writers,
            MAX_GROUP,
            move |events: Vec<OwnedEvent>| {
                let pool = pool.clone();
                async move { file_many(&pool, &events).await }
            },
        ))
    }

    pub async fn file(&self, event: OwnedEvent) -> sqlx::Result<Filed> {
        self.0
            .submit(event)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

/// Events filed in one statement at most: enough to absorb a burst, few
/// enough that one refused event costs a short one-by-one retry.
const MAX_GROUP: usize = 64;

/// Files an event already leased to the caller for `lease`, so the caller
/// processes it now (a reconciliation run healing what it found) rather
/// than a feeder racing it into the queue. Returns the event and the lease's
/// token, or `None` for the token when the event was filed before.
pub async fn file_leased(
    pool: &PgPool,
    event: NewEvent<'_>,
    lease: std::time::Duration,
) -> sqlx::Result<(Filed, Option<Uuid>)> {
    let token = Uuid::now_v7();
    let (text, bytes) = stored_body(event.body);
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body, body_bytes,
                                    leased_until, lease_token)
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), $8)
         ON CONFLICT (channel, event_id) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(event.channel)
    .bind(event.event_id)
    .bind(event.event_type)
    .bind(text.as_ref())
    .bind(bytes)
    .bind(lease.as_secs_f64())
    .bind(token)
    .fetch_optional(pool)
    .await?;
    match inserted {
        Some(id) => Ok((Filed::New(id), Some(token))),
        None => Ok((original(pool, event).await?, None)),
    }
}

/// Reads a stored event.
pub async fn load(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<StoredEvent>> {
    let row = sqlx::query(
        "SELECT id, channel, event_id, event_type, body, body_bytes, status, attempts
         FROM webhook_inbox WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.as_ref().map(stored))
}

fn stored(r: &sqlx::postgres::PgRow) -> StoredEvent {
    // Rows filed before `body_bytes` existed have their text only.
    let text: Option<String> = r.get("body");
    let bytes: Option<Vec<u8>> = r.get("body_bytes");
    StoredEvent {
        id: r.get("id"),
        channel: r.get("channel"),
        event_id: r.get("event_id"),
        event_type: r.get("event_type"),
        body: bytes.or(text.map(String::into_bytes)),
        status: r.get("status"),
        attempts: r.get("attempts"),
    }
}

/// Claims the pending events among `ids` that were fed under `token`,
/// counting an attempt and renewing the lease for `lease` while they are
/// worked on. Events fed again under a newer token (this job's lease
/// lapsed), and finished ones, are left out.
pub async fn claim(
    pool: &PgPool,
    token: Uuid,
    ids: &[Uuid],
    lease: std::time::Duration,
) -> sqlx::Result<Vec<StoredEvent>> {
    let rows = sqlx::query(
        "UPDATE webhook_inbox
         SET attempts = attempts + 1, leased_until = now() + make_interval(secs => $3)
         WHERE id = ANY($1) AND lease_token = $2 AND status = 'pending'
         RETURNING id, channel, event_id, event_type, body, body_bytes, status, attempts",
    )
    .bind(ids)
    .bind(token)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(stored).collect())
}

/// Locks an inbox event for the caller's transaction; false when it is no
/// longer pending (another run finished it).
pub(crate) async fn lock_pending(conn: &mut PgConnection, inbox_id: Uuid) -> sqlx::Result<bool> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM webhook_inbox WHERE id = $1 FOR UPDATE")
            .bind(inbox_id)
            .fetch_optional(conn)
            .await?;
    Ok(status.as_deref() == Some("pending"))
}

/// Locks the events among `ids` that are still pending; returns those.
pub(crate) async fn lock_pending_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM webhook_inbox WHERE id = ANY($1) AND status = 'pending'
         ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Marks an event processed, linked to its order, with its audit event.
pub(crate) async fn mark_processed(
    conn: &mut PgConnection,
    inbox_id: Uuid,
    order_id: Option<Uuid>,
    detail: &str,
) -> sqlx::Result<()> {
    mark_processed_many(conn, &[(inbox_id, order_id)], detail).await
}

/// Marks events processed, each linked to its order, with their audit
/// events, in two statements however many there are.
pub(crate) async fn mark_processed_many(
    conn: &mut PgConnection,
    events: &[(Uuid, Option<Uuid>)],
    detail: &str,
) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|(id, _)| *id).collect();
    let orders: Vec<Option<Uuid>> = events.iter().map(|(_, order)| *order).collect();
    sqlx::query(
        "UPDATE webhook_inbox w
         SET status = 'processed', processed_at = now(), order_id = COALESCE(e.order_id, w.order_id),
             error_code = NULL, last_error = NULL, leased_until = NULL, lease_token = NULL
         FROM UNNEST($1::uuid[], $2::uuid[]) AS e(id, order_id)
         WHERE w.id = e.id",
    )
    .bind(&ids)
    .bind(&orders)
    .execute(&mut *conn)
    .await?;
    let audits: Vec<(String, serde_json::Value)> = events
        .iter()
        .map(|(id, order)| (id.to_string(), json!({ "order": order })))
        .collect();
    audit::record_many_with_reason(
        conn,
        audit::WORKER,
        "event.processed",
        "webhook_event",
        Some(detail),
        &audits,
    )
    .await
}

/// Ends processing of a pending event as `ignored` (nothing to do), with
/// its audit event.
pub async fn ignore(pool: &PgPool, id: Uuid, why: &str) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE webhook_inbox
         SET status = 'ignored', processed_at = now(), error_code = NULL, last_error = $2,
             leased_until = NULL, lease_token = NULL
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(why)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 1 {
        audit::record(
            &mut tx,
            AuditEvent {
                actor: audit::WORKER,
                action: "event.ignored",
                subject_type: "webhook_event",
                subject_id: id.to_string(),
                reason: Some(why),
                data: json!({}),
            },
        )
        .await?;
    }
    tx.commit().await
}

/// Why an event failed for good.
#[derive(Debug, Clone)]
pub struct Failure {
    pub id: Uuid,
    /// Stable code: `unknown_product`, `event_malformed`, `order_too_large`,
    /// `attempts_exhausted`, ...
    pub code: &'static str,
    pub detail: String,
}

/// Ends pending events as `failed`, each with its audit event and an
/// `event_failed` finding for operations, in one transaction.
pub async fn fail(pool: &PgPool, failures: &[Failure]) -> sqlx::Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    for failure in failures {
        let failed: Option<(String, String, String)> = sqlx::query_as(
            "UPDATE webhook_inbox
             SET status = 'failed', processed_at = now(), error_code = $2, last_error = $3,
                 leased_until = NULL, lease_token = NULL
             WHERE id = $1 AND status = 'pending'
             RETURNING channel, event_id, event_type",
        )
        .bind(failure.id)
        .bind(failure.code)
        .bind(&failure.detail)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((channel, event_id, event_type)) = failed else {
            continue;
        };
        record_failure(
            &mut tx,
            failure,
            NewEvent {
                channel: &channel,
                event_id: &event_id,
                event_type: &event_type,
                body: &[],
            },
        )
        .await?;
    }
    tx.commit().await
}

/// Files an authentic event that can never be carried out as `failed` at
/// once (a Shopify body contradicting its topic, a Stripe event that cannot
/// be named), with its audit event and finding, in one transaction: it is
/// never pending, so no worker acts on it. The same event filed again is a
/// duplicate, as any event is.
pub async fn file_failed(
    pool: &PgPool,
    event: NewEvent<'_>,
    code: &'static str,
    detail: &str,
) -> sqlx::Result<Filed> {
    let (text, bytes) = stored_body(event.body);
    let mut tx = pool.begin().await?;
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body, body_bytes,
                                    status, processed_at, error_code, last_error)
         VALUES ($1, $2, $3, $4, $5, $6, 'failed', now(), $7, $8)
         ON CONFLICT (channel, event_id) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(event.channel)
    .bind(event.event_id)
    .bind(event.event_type)
    .bind(text.as_ref())
    .bind(bytes)
    .bind(code)
    .bind(detail)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = inserted else {
        tx.rollback().await?;
        return original(pool, event).await;
    };
    let failure = Failure {
        id,
        code,
        detail: detail.to_owned(),
    };
    record_failure(&mut tx, &failure, event).await?;
    tx.commit().await?;
    Ok(Filed::New(id))
}

/// The audit event, finding, log line and metric of an event that failed.
async fn record_failure(
    tx: &mut PgConnection,
    failure: &Failure,
    event: NewEvent<'_>,
) -> sqlx::Result<()> {
    let NewEvent {
        channel,
        event_id,
        event_type,
        ..
    } = event;
    audit::record(
        &mut *tx,
        AuditEvent {
            actor: audit::WORKER,
            action: "event.failed",
            subject_type: "webhook_event",
            subject_id: failure.id.to_string(),
            reason: Some(&failure.detail),
            data: json!({ "error_code": failure.code }),
        },
    )
    .await?;
    finding::record(
        &mut *tx,
        audit::WORKER,
        NewFinding {
            kind: "event_failed",
            order_id: None,
            code_id: None,
            channel: Some(channel),
            channel_reference: Some(event_id),
            detail: format!(
                "{event_type} event {event_id} failed with {}: {}",
                failure.code, failure.detail
            ),
            action_taken: None,
            dedupe_key: format!("event_failed:{}", failure.id),
            run_id: None,
        },
    )
    .await?;
    tracing::warn!(inbox_id = %failure.id, code = failure.code, detail = %failure.detail,
        "webhook event failed");
    metrics::counter!("entitle_events_failed_total", "code" => failure.code).increment(1);
    Ok(())
}

/// A claimed event whose attempt failed in a way a retry may get past.
#[derive(Debug, Clone)]
pub struct Setback {
    pub id: Uuid,
    /// Attempts so far, the failed one included.
    pub attempts: i32,
    pub detail: String,
}

/// Gives failed attempts back: each event is due again after its backoff,
/// or, once it has used up its attempts, fails for good.
pub async fn retry_later(
    pool: &PgPool,
    setbacks: &[Setback],
    policy: &RetryPolicy,
) -> sqlx::Result<()> {
    let (again, exhausted): (Vec<&Setback>, Vec<&Setback>) =
        setbacks.iter().partition(|s| policy.may_retry(s.attempts));
    if !again.is_empty() {
        let ids: Vec<Uuid> = again.iter().map(|s| s.id).collect();
        let waits: Vec<f64> = again
            .iter()
            .map(|s| policy.backoff(s.attempts).as_secs_f64())
            .collect();
        let errors: Vec<&str> = again.iter().map(|s| s.detail.as_str()).collect();
        sqlx::query(
            "UPDATE webhook_inbox w
             SET due_at = now() + make_interval(secs => r.wait), error_code = 'transient',
                 last_error = r.error, leased_until = NULL, lease_token = NULL
             FROM UNNEST($1::uuid[], $2::float8[], $3::text[]) AS r(id, wait, error)
             WHERE w.id = r.id AND w.status = 'pending'",
        )
        .bind(&ids)
        .bind(&waits)
        .bind(&errors)
        .execute(pool)
        .await?;
        for setback in &again {
            tracing::warn!(inbox_id = %setback.id, attempts = setback.attempts,
                error = %setback.detail, "webhook event will be retried");
        }
    }
    let failures: Vec<Failure> = exhausted
        .into_iter()
        .map(|s| Failure {
            id: s.id,
            code: "attempts_exhausted",
            detail: format!("gave up after {} attempts; last: {}", s.attempts, s.detail),
        })
        .collect();
    if !failures.is_empty() {
        metrics::counter!("entitle_attempts_exhausted_total", "what" => "event")
            .increment(failures.len() as u64);
    }
    fail(pool, &failures).await
}

/// Which failed events to reopen.
#[derive(Debug, Clone, Default)]
pub struct RetryFilter {
    /// Only this event (inbox id).
    pub id: Option<Uuid>,
    /// Only events of this channel.
    pub channel: Option<String>,
    /// Only events that failed with this error code (e.g. `unknown_product`).
    pub error_code: Option<String>,
}

/// Puts matching failed events back to pending, due now with fresh
/// attempts, with one audit event for the whole action (naming every event
/// it reopened). The feeder queues them within moments.
pub async fn reopen_failed(
    pool: &PgPool,
    filter: &RetryFilter,
    actor: &str,
    reason: &str,
) -> sqlx::Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE webhook_inbox
         SET status = 'pending', processed_at = NULL, due_at = now(), attempts = 0,
             leased_until = NULL, lease_token = NULL
         WHERE status = 'failed' AND body IS NOT NULL
           AND ($1::uuid IS NULL OR id = $1)
           AND ($2::text IS NULL OR channel = $2)
           AND ($3::text IS NULL OR error_code = $3)
         RETURNING id",
    )
    .bind(filter.id)
    .bind(&filter.channel)
    .bind(&filter.error_code)
    .fetch_all(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        AuditEvent {
            actor,
            action: "event.retried",
            subject_type: "webhook_event",
            subject_id: filter
                .id
                .map_or_else(|| "failed".to_owned(), |id| id.to_string()),
            reason: Some(reason),
            data: json!({
                "filter": { "channel": filter.channel, "error_code": filter.error_code },
                "before": { "status": "failed" },
                "after": { "status": "pending", "events": ids },
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(ids)
}
