//! The append-only audit log: every state change writes its event in the same
//! transaction as the change.

use serde_json::Value;
use sqlx::PgConnection;

/// The worker's name in the audit log.
pub const WORKER: &str = "system:worker";
/// The actor of reconciliation runs.
pub const RECONCILER: &str = "system:reconciler";

/// One audit event about one subject.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub subject_type: &'a str,
    pub subject_id: String,
    pub reason: Option<&'a str>,
    pub data: Value,
}

/// Writes one event on the caller's connection (normally its transaction).
pub async fn record(conn: &mut PgConnection, event: AuditEvent<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_event (actor, action, subject_type, subject_id, reason, data)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(event.actor)
    .bind(event.action)
    .bind(event.subject_type)
    .bind(event.subject_id)
    .bind(event.reason)
    .bind(event.data)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes the same action for many subjects in one statement (issuing
/// thousands of codes must not mean thousands of round trips).
pub async fn record_many(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    subject_type: &str,
    subjects: &[(String, Value)],
) -> sqlx::Result<()> {
    if subjects.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = subjects.iter().map(|(id, _)| id.as_str()).collect();
    let data: Vec<&Value> = subjects.iter().map(|(_, d)| d).collect();
    sqlx::query(
        "INSERT INTO audit_event (actor, action, subject_type, subject_id, data)
         SELECT $1, $2, $3, s.id, s.data FROM UNNEST($4::text[], $5::jsonb[]) AS s(id, data)",
    )
    .bind(actor)
    .bind(action)
    .bind(subject_type)
    .bind(&ids)
    .bind(&data)
    .execute(conn)
    .await?;
    Ok(())
}
