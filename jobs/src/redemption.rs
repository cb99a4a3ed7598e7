//! Redemption: assigns a code to an account and an entity in one atomic
//! conditional update, idempotently for the same holder.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    code::{Code, CodeKeys},
    lifecycle::{self, CodeState},
};

/// A code's assignment, as answered to the redeemer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Redemption {
    /// The assignment's id.
    pub id: Uuid,
    pub code_id: Uuid,
    /// Last four symbols of the code, for display.
    pub code_last4: String,
    pub product_sku: String,
    pub product_name: String,
    pub account_id: String,
    pub entity_ref: String,
    pub redeemed_at: DateTime<Utc>,
}

/// The outcome of a successful redemption request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// Assigned now.
    New(Redemption),
    /// Assigned earlier to the same account and entity: the same answer again.
    Existing(Redemption),
}

/// Why a well-formed code was not redeemed.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("no such code")]
    NotFound,
    #[error("the code was already redeemed")]
    AlreadyRedeemed,
    #[error("the code was revoked")]
    Revoked,
    #[error("the code has expired")]
    Expired,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl RedeemError {
    /// The stable error code a redeemer gets.
    pub fn code(&self) -> &'static str {
        match self {
            RedeemError::NotFound => "code_not_found",
            RedeemError::AlreadyRedeemed => "code_already_redeemed",
            RedeemError::Revoked => "code_revoked",
            RedeemError::Expired => "code_expired",
            RedeemError::Database(_) => "database_unavailable",
        }
    }
}

const SELECT_REDEMPTION: &str = "
    SELECT a.id, c.id AS code_id, c.last4, p.sku, p.name, a.account_id, a.entity_ref, a.assigned_at
    FROM assignment a
    JOIN activation_code c ON c.id = a.code_id
    JOIN product p ON p.id = c.product_id
    WHERE a.id = $1";

fn redemption(row: &PgRow) -> Redemption {
    Redemption {
        id: row.get("id"),
        code_id: row.get("code_id"),
        code_last4: row.get("last4"),
        product_sku: row.get("sku"),
        product_name: row.get("name"),
        account_id: row.get("account_id"),
        entity_ref: row.get("entity_ref"),
        redeemed_at: row.get("assigned_at"),
    }
}

/// Redeems `code` for `account_id` and `entity_ref`.
pub async fn redeem(
    pool: &PgPool,
    keys: &CodeKeys,
    code: &Code,
    account_id: &str,
    entity_ref: &str,
) -> Result<Redeemed, RedeemError> {
    let hash = keys.hash(code);
    let mut tx = pool.begin().await?;
    // The state check and the change are one statement: of two concurrent
    // redemptions (or a redemption and a revocation) exactly one wins.
    let claimed: Option<(Uuid, String)> = sqlx::query_as(
        "UPDATE activation_code SET state = 'redeemed', redeemed_at = now()
         WHERE code_hash = $1 AND state = 'issued' AND expires_at > now()
         RETURNING id, last4",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;

    if let Some((code_id, last4)) = claimed {
        let assignment_id = Uuid::now_v7();
        let actor = format!("account:{account_id}");
        sqlx::query(
            "INSERT INTO assignment (id, code_id, account_id, entity_ref, assigned_by)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(assignment_id)
        .bind(code_id)
        .bind(account_id)
        .bind(entity_ref)
        .bind(&actor)
        .execute(&mut *tx)
        .await?;
        audit::record(
            &mut tx,
            AuditEvent {
                actor: &actor,
                action: "code.redeemed",
                subject_type: "code",
                subject_id: code_id.to_string(),
                reason: None,
                data: json!({
                    "last4": last4,
                    "before": { "state": "issued" },
                    "after": { "state": "redeemed", "account_id": account_id, "entity_ref": entity_ref },
                    "assignment": assignment_id,
                }),
            },
        )
        .await?;
        let row = sqlx::query(SELECT_REDEMPTION)
            .bind(assignment_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::counter!("entitle_codes_redeemed_total").increment(1);
        return Ok(Redeemed::New(redemption(&row)));
    }

    let found = sqlx::query(
        "SELECT c.id, c.state, c.expires_at <= now() AS past_expiry, a.id AS assignment_id,
                a.account_id, a.entity_ref
         FROM activation_code c
         LEFT JOIN assignment a ON a.code_id = c.id AND a.ended_at IS NULL
         WHERE c.code_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(found) = found else {
        return Err(RedeemError::NotFound);
    };
    let state: String = found.get("state");
    let refusal = match CodeState::parse(&state) {
        Some(CodeState::Redeemed) => {
            let assignment: Option<Uuid> = found.get("assignment_id");
            let same_holder = found.get::<Option<String>, _>("account_id").as_deref()
                == Some(account_id)
                && found.get::<Option<String>, _>("entity_ref").as_deref() == Some(entity_ref);
            match assignment {
                Some(assignment) if same_holder => {
                    let row = sqlx::query(SELECT_REDEMPTION)
                        .bind(assignment)
                        .fetch_one(&mut *tx)
                        .await?;
                    return Ok(Redeemed::Existing(redemption(&row)));
                }
                _ => RedeemError::AlreadyRedeemed,
            }
        }
        Some(CodeState::Revoked) => RedeemError::Revoked,
        Some(CodeState::Expired) => RedeemError::Expired,
        // Issued but past its expiry: the sweep has not reached it yet.
        Some(CodeState::Issued) if found.get::<bool, _>("past_expiry") => RedeemError::Expired,
        other => {
            return Err(RedeemError::Database(sqlx::Error::Protocol(format!(
                "code in unexpected state {other:?}"
            ))));
        }
    };
    // Support answers "my code doesn't work" from this record.
    lifecycle::record_refusal(
        &mut tx,
        found.get("id"),
        refusal.code(),
        account_id,
        entity_ref,
    )
    .await?;
    tx.commit().await?;
    Err(refusal)
}
