//! The webhook inbox: every authentic event is kept here before it is
//! acknowledged, keyed by channel and the channel's event id.

use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::audit::{self, AuditEvent};

/// An event as the gateway files it.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub channel: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub body: &'a str,
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
    pub body: Option<String>,
    pub status: String,
}

/// Files an event once; a duplicate is a no-op that reports the original.
pub async fn file(pool: &PgPool, event: NewEvent<'_>) -> sqlx::Result<Filed> {
    let inserted = sqlx::query(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (channel, event_id) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(event.channel)
    .bind(event.event_id)
    .bind(event.event_type)
    .bind(event.body)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = inserted {
        return Ok(Filed::New(row.get("id")));
    }
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

/// Reads a stored event.
pub async fn load(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<StoredEvent>> {
    let row = sqlx::query(
        "SELECT id, channel, event_id, event_type, body, status FROM webhook_inbox WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| StoredEvent {
        id: r.get("id"),
        channel: r.get("channel"),
        event_id: r.get("event_id"),
        event_type: r.get("event_type"),
        body: r.get("body"),
        status: r.get("status"),
    }))
}

/// Counts an attempt and remembers why it failed, leaving the event pending so
/// a retry (or the sweep) picks it up again.
pub async fn note_transient_failure(pool: &PgPool, id: Uuid, error: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE webhook_inbox SET attempts = attempts + 1, error_code = 'transient', last_error = $2
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends processing of a pending event with `status` (`ignored` or `failed`),
/// with its audit event.
pub async fn finish(
    pool: &PgPool,
    id: Uuid,
    status: &str,
    error_code: Option<&str>,
    detail: &str,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE webhook_inbox
         SET status = $2, attempts = attempts + 1, error_code = $3, last_error = $4, processed_at = now()
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(status)
    .bind(error_code)
    .bind(detail)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 1 {
        audit::record(
            &mut tx,
            AuditEvent {
                actor: audit::WORKER,
                action: if status == "failed" {
                    "event.failed"
                } else {
                    "event.ignored"
                },
                subject_type: "webhook_event",
                subject_id: id.to_string(),
                reason: Some(detail),
                data: json!({ "error_code": error_code }),
            },
        )
        .await?;
    }
    tx.commit().await
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

/// Puts matching failed events back to pending, with one audit event for
/// the whole action (naming every event it reopened).
pub async fn reopen_failed(
    pool: &PgPool,
    filter: &RetryFilter,
    actor: &str,
    reason: &str,
) -> sqlx::Result<Vec<Uuid>> {
    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE webhook_inbox SET status = 'pending', processed_at = NULL, requeued_at = NULL
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
