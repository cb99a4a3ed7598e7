//! The delivery log: each event's delivery to each endpoint, its attempts
//! (when, what came back, how long), and the replay action that sends an
//! event again.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::audit::{self, AuditEvent};

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DeliveryEntry {
    pub id: Uuid,
    pub event_id: Uuid,
    /// The event's type, e.g. `code.redeemed`.
    pub event_type: String,
    pub seq: i64,
    pub code_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    pub endpoint: String,
    /// `pending`, `delivered` or `failed` (given up; replay it).
    pub status: String,
    pub attempts: i32,
    /// The last HTTP status, if an answer came.
    pub last_status: Option<i32>,
    /// Why the last attempt failed: `http_<status>`, `timeout`,
    /// `connect_failed`, `request_failed`.
    pub last_error: Option<String>,
    /// When it is next tried (pending).
    pub due_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// One attempt to deliver.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AttemptEntry {
    pub attempted_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub duration_ms: i32,
}

const ENTRY: &str = "SELECT d.id, d.event_id, e.type AS event_type, d.seq, d.code_id, e.order_id,
        ep.name AS endpoint, d.status, d.attempts, d.last_status, d.last_error, d.due_at,
        d.delivered_at, d.created_at
    FROM platform_delivery d
    JOIN platform_event e ON e.id = d.event_id
    JOIN platform_endpoint ep ON ep.id = d.endpoint_id";

/// What to list.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub status: Option<String>,
    pub endpoint: Option<String>,
    pub code_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    pub event_id: Option<Uuid>,
    pub limit: i64,
}

/// Deliveries, newest first.
pub async fn list(pool: &PgPool, filter: &Filter) -> sqlx::Result<Vec<DeliveryEntry>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ENTRY}
         WHERE ($1::text IS NULL OR d.status = $1)
           AND ($2::text IS NULL OR ep.name = $2)
           AND ($3::uuid IS NULL OR d.code_id = $3)
           AND ($4::uuid IS NULL OR e.order_id = $4)
           AND ($5::uuid IS NULL OR d.event_id = $5)
         ORDER BY d.seq DESC, ep.name LIMIT $6"
    )))
    .bind(&filter.status)
    .bind(&filter.endpoint)
    .bind(filter.code_id)
    .bind(filter.order_id)
    .bind(filter.event_id)
    .bind(filter.limit)
    .fetch_all(pool)
    .await
}

/// A delivery, its attempts (oldest first) and the event's data as sent.
pub async fn get(
    pool: &PgPool,
    id: Uuid,
) -> sqlx::Result<Option<(DeliveryEntry, Vec<AttemptEntry>, Value)>> {
    let Some(entry) =
        sqlx::query_as::<_, DeliveryEntry>(sqlx::AssertSqlSafe(format!("{ENTRY} WHERE d.id = $1")))
            .bind(id)
            .fetch_optional(pool)
            .await?
    else {
        return Ok(None);
    };
    let attempts = sqlx::query_as(
        "SELECT attempted_at, status_code, error, duration_ms FROM platform_attempt
         WHERE delivery_id = $1 ORDER BY attempted_at, id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let data: Value = sqlx::query_scalar("SELECT data FROM platform_event WHERE id = $1")
        .bind(entry.event_id)
        .fetch_one(pool)
        .await?;
    Ok(Some((entry, attempts, data)))
}

/// Sends a delivery again now, whatever its state (a receiver that lost
/// an event asks for it again); it keeps its place in its code's order.
/// Audited. `None` when there is no such delivery.
pub async fn replay(
    conn: &mut PgConnection,
    id: Uuid,
    actor: &str,
    reason: &str,
) -> sqlx::Result<Option<DeliveryEntry>> {
    let before: Option<String> =
        sqlx::query_scalar("SELECT status FROM platform_delivery WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(before) = before else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE platform_delivery
         SET status = 'pending', due_at = now(), leased_until = NULL, lease_token = NULL,
             delivered_at = NULL
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    // Replaying a given-up delivery settles its finding: it is being
    // dealt with.
    sqlx::query(
        "UPDATE reconciliation_finding SET status = 'resolved', resolved_at = now(), resolved_by = $2
         WHERE dedupe_key = 'platform_delivery_failed:' || $1::text AND status = 'open'",
    )
    .bind(id)
    .bind(actor)
    .execute(&mut *conn)
    .await?;
    audit::record(
        conn,
        AuditEvent {
            actor,
            action: "platform_delivery.replayed",
            subject_type: "platform_delivery",
            subject_id: id.to_string(),
            reason: Some(reason),
            data: json!({ "before": { "status": before }, "after": { "status": "pending" } }),
        },
    )
    .await?;
    let entry = sqlx::query_as(sqlx::AssertSqlSafe(format!("{ENTRY} WHERE d.id = $1")))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some(entry))
}

/// How many deliveries wait, and the age in seconds of the oldest
/// undelivered event: what operations alert on.
pub async fn backlog(pool: &PgPool) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
         FROM platform_delivery WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await
}
