//! Platform API keys: what the platform calls `/v1` with. Random, shown
//! once, stored as a keyed hash (one indexed lookup per check, not a
//! password hash), named (the caller recorded on each redemption), and
//! revocable.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    code::CodeKeys,
};

/// Keeps a key's hash apart from every code's hash under the same key.
const HASH_DOMAIN: &str = "entitle platform key";

/// Every key starts so; a staff token (`ent_`) never does.
pub const PREFIX: &str = "entp_";

/// The stored form of a key.
pub fn hash(keys: &CodeKeys, key: &str) -> Vec<u8> {
    keys.hash_secret(HASH_DOMAIN, key.as_bytes())
}

/// A new key: `entp_` and 32 random bytes.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: Uuid,
    pub name: String,
}

impl Caller {
    /// How the caller appears in the audit log and on assignments.
    pub fn actor(&self) -> String {
        format!("platform:{}", self.name)
    }
}

/// A key as listed (never the key itself).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Why a key was not created or revoked.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("an active platform key is already named {0}")]
    NameTaken(String),
    #[error("no active platform key is named {0}")]
    NotFound(String),
    #[error("a key's name must be 1 to 100 characters")]
    BadName,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Creates a key and returns it (the only time it is seen), audited.
pub async fn create(
    pool: &PgPool,
    keys: &CodeKeys,
    name: &str,
    created_by: &str,
    reason: &str,
) -> Result<(KeyInfo, String), KeyError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 || name.contains('\0') {
        return Err(KeyError::BadName);
    }
    let key = generate();
    let mut tx = pool.begin().await?;
    let info: Option<KeyInfo> = sqlx::query_as::<_, (Uuid, String, String, DateTime<Utc>)>(
        "INSERT INTO platform_key (id, name, key_hash, created_by) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING RETURNING id, name, created_by, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(hash(keys, &key))
    .bind(created_by)
    .fetch_optional(&mut *tx)
    .await?
    .map(|(id, name, created_by, created_at)| KeyInfo {
        id,
        name,
        created_by,
        created_at,
        revoked_at: None,
        last_used_at: None,
    });
    let info = info.ok_or_else(|| KeyError::NameTaken(name.to_owned()))?;
    audit::record(
        &mut tx,
        AuditEvent {
            actor: created_by,
            action: "platform_key.created",
            subject_type: "platform_key",
            subject_id: info.name.clone(),
            reason: Some(reason),
            data: json!({ "before": null, "after": { "id": info.id, "active": true } }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((info, key))
}

/// Every key, oldest first.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<KeyInfo>> {
    sqlx::query_as(
        "SELECT id, name, created_by, created_at, revoked_at, last_used_at
         FROM platform_key ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await
}

/// Revokes the active key named `name`, audited, in the caller's
/// transaction. Gateways stop accepting it within their cache's lifetime
/// (`gateway.platform_key_cache_secs`).
pub async fn revoke(
    tx: &mut PgConnection,
    name: &str,
    actor: &str,
    reason: &str,
) -> Result<KeyInfo, KeyError> {
    let info: KeyInfo = sqlx::query_as(
        "UPDATE platform_key SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL
         RETURNING id, name, created_by, created_at, revoked_at, last_used_at",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| KeyError::NotFound(name.to_owned()))?;
    audit::record(
        tx,
        AuditEvent {
            actor,
            action: "platform_key.revoked",
            subject_type: "platform_key",
            subject_id: info.name.clone(),
            reason: Some(reason),
            data: json!({ "before": { "id": info.id, "active": true }, "after": { "active": false } }),
        },
    )
    .await?;
    Ok(info)
}

/// The active key with this hash, noting its use (callers cache the answer,
/// so this runs once per key per cache lifetime, not per request).
pub async fn verify(pool: &PgPool, key_hash: &[u8]) -> sqlx::Result<Option<Caller>> {
    // `last_used_at` is kept to the minute: when a cache lapses, every
    // request in flight verifies at once, and they must not queue on the
    // key's row to write the same time.
    let row: Option<(Uuid, String)> = sqlx::query_as(
        "WITH key AS (
             SELECT id, name, last_used_at FROM platform_key
             WHERE key_hash = $1 AND revoked_at IS NULL
         ), touched AS (
             UPDATE platform_key p SET last_used_at = now() FROM key
             WHERE p.id = key.id
               AND (key.last_used_at IS NULL OR key.last_used_at < now() - interval '1 minute')
         )
         SELECT id, name FROM key",
    )
    .bind(key_hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, name)| Caller { id, name }))
}
