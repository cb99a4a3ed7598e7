//! Findings: exceptions for operations to review (a refunded code that was
//! already redeemed, a refund that cannot be matched to units, and later the
//! mismatches reconciliation finds). The same finding is recorded once.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::audit::{self, AuditEvent};

/// A finding to record.
#[derive(Debug, Clone)]
pub struct NewFinding<'a> {
    pub kind: &'a str,
    pub order_id: Option<Uuid>,
    pub code_id: Option<Uuid>,
    pub channel: Option<&'a str>,
    pub channel_reference: Option<&'a str>,
    pub detail: String,
    pub action_taken: Option<&'a str>,
    /// What makes two findings the same one.
    pub dedupe_key: String,
    /// The reconciliation run that found it, if one did.
    pub run_id: Option<Uuid>,
}

/// Records a finding unless it already exists; returns whether it was new.
pub async fn record(conn: &mut PgConnection, actor: &str, f: NewFinding<'_>) -> sqlx::Result<bool> {
    let id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO reconciliation_finding
            (id, kind, order_id, code_id, channel, channel_reference, detail, action_taken, dedupe_key, run_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(id)
    .bind(f.kind)
    .bind(f.order_id)
    .bind(f.code_id)
    .bind(f.channel)
    .bind(f.channel_reference)
    .bind(&f.detail)
    .bind(f.action_taken)
    .bind(&f.dedupe_key)
    .bind(f.run_id)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        audit::record(
            conn,
            AuditEvent {
                actor,
                action: "finding.opened",
                subject_type: "finding",
                subject_id: id.to_string(),
                reason: Some(&f.detail),
                data: json!({ "kind": f.kind, "order": f.order_id, "code": f.code_id, "run": f.run_id, "action_taken": f.action_taken }),
            },
        )
        .await?;
        metrics::counter!("entitle_findings_opened_total", "kind" => f.kind.to_owned())
            .increment(1);
    }
    Ok(inserted)
}

/// What a person decides about an open finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Dealt with (by the action taken, or by hand).
    Resolve,
    /// Nothing to do (a test order, a known difference).
    Ignore,
}

impl Decision {
    /// The finding's status afterwards.
    pub fn status(self) -> &'static str {
        match self {
            Decision::Resolve => "resolved",
            Decision::Ignore => "ignored",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Decision::Resolve => "finding.resolved",
            Decision::Ignore => "finding.ignored",
        }
    }
}

/// What deciding did.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Decided {
    pub id: Uuid,
    /// `resolved` or `ignored`.
    pub status: &'static str,
}

/// Resolves or ignores an open finding, with the decider and their reason.
pub async fn decide(
    conn: &mut PgConnection,
    who: crate::lifecycle::Who<'_>,
    id: Uuid,
    decision: Decision,
) -> Result<Decided, crate::lifecycle::Refused> {
    use crate::lifecycle::Refused;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM reconciliation_finding WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let status = status.ok_or(Refused::NotFound("finding"))?;
    if status != "open" {
        return Err(Refused::conflict(
            "finding_closed",
            format!("the finding is already {status}"),
        ));
    }
    sqlx::query(
        "UPDATE reconciliation_finding SET status = $2, resolved_at = now(), resolved_by = $3,
                resolution_reason = $4 WHERE id = $1",
    )
    .bind(id)
    .bind(decision.status())
    .bind(who.actor)
    .bind(who.reason)
    .execute(&mut *conn)
    .await?;
    who.audit(
        conn,
        decision.action(),
        "finding",
        id.to_string(),
        json!({ "before": { "status": "open" }, "after": { "status": decision.status() } }),
    )
    .await?;
    Ok(Decided {
        id,
        status: decision.status(),
    })
}
