//! API tokens for support and operations: random, shown once, stored as a
//! SHA-256 hash, each with a name (the actor in the audit log) and a role.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::{self, AuditEvent};

/// What a token may do; each role includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything, resend deliveries.
    Support,
    /// Support, and create, revoke, reissue, reassign, change expiry, retry.
    Operator,
    /// Operator, and manage tokens and products.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Support => "support",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "support" => Some(Role::Support),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The stored form of a token.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A new token: `ent_` and 32 random bytes.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!(
        "ent_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Why a token could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("an active token is already named {0}")]
    NameTaken(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Creates a token and returns it (the only time it is seen), with its audit
/// event.
pub async fn create(
    pool: &PgPool,
    name: &str,
    role: Role,
    created_by: &str,
    reason: &str,
) -> Result<String, CreateError> {
    let token = generate();
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO api_token (id, name, role, token_hash, created_by) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(name)
    .bind(role.as_str())
    .bind(hash(&token))
    .bind(created_by)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(CreateError::NameTaken(name.to_owned()));
    }
    audit::record(
        &mut tx,
        AuditEvent {
            actor: created_by,
            action: "token.created",
            subject_type: "token",
            subject_id: name.to_owned(),
            reason: Some(reason),
            data: json!({ "before": null, "after": { "role": role.as_str() } }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(token)
}

/// The name and role of an active token, noting its use.
pub async fn authenticate(pool: &PgPool, token: &str) -> sqlx::Result<Option<(String, Role)>> {
    let row: Option<(String, String)> = sqlx::query_as(
        "UPDATE api_token SET last_used_at = now()
         WHERE token_hash = $1 AND revoked_at IS NULL RETURNING name, role",
    )
    .bind(hash(token))
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(name, role)| Role::parse(&role).map(|r| (name, r))))
}
