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
    record_many_with_reason(conn, actor, action, subject_type, None, subjects).await
}

/// [`record_many`], every event with the same reason.
pub async fn record_many_with_reason(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    subject_type: &str,
    reason: Option<&str>,
    subjects: &[(String, Value)],
) -> sqlx::Result<()> {
    if subjects.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = subjects.iter().map(|(id, _)| id.as_str()).collect();
    let data: Vec<&Value> = subjects.iter().map(|(_, d)| d).collect();
    sqlx::query(
        "INSERT INTO audit_event (actor, action, subject_type, subject_id, reason, data)
         SELECT $1, $2, $3, s.id, $6, s.data FROM UNNEST($4::text[], $5::jsonb[]) AS s(id, data)",
    )
    .bind(actor)
    .bind(action)
    .bind(subject_type)
    .bind(&ids)
    .bind(&data)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes any events, in order, in one statement.
pub async fn record_all(conn: &mut PgConnection, events: &[AuditEvent<'_>]) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let actors: Vec<&str> = events.iter().map(|e| e.actor).collect();
    let actions: Vec<&str> = events.iter().map(|e| e.action).collect();
    let types: Vec<&str> = events.iter().map(|e| e.subject_type).collect();
    let ids: Vec<&str> = events.iter().map(|e| e.subject_id.as_str()).collect();
    let reasons: Vec<Option<&str>> = events.iter().map(|e| e.reason).collect();
    let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
    sqlx::query(
        "INSERT INTO audit_event (actor, action, subject_type, subject_id, reason, data)
         SELECT e.actor, e.action, e.subject_type, e.subject_id, e.reason, e.data
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[])
              WITH ORDINALITY AS e(actor, action, subject_type, subject_id, reason, data, n)
         ORDER BY e.n",
    )
    .bind(&actors)
    .bind(&actions)
    .bind(&types)
    .bind(&ids)
    .bind(&reasons)
    .bind(&data)
    .execute(conn)
    .await?;
    Ok(())
}
