//! The platform's endpoints: where events are sent, which types each hears,
//! and the secrets they are signed with. Endpoints come from the
//! configuration file (kept in step at each worker start) or from the admin
//! API; every change through the API is audited.

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Kind, sign::Secret};
use crate::{
    audit::{self, AuditEvent},
    code::CodeKeys,
    config::EndpointConfig,
};

/// An endpoint as listed (never its secrets).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EndpointInfo {
    pub id: Uuid,
    pub name: String,
    pub url: String,
    /// `config` (from the configuration file) or `admin` (the admin API).
    pub source: String,
    /// The event types it hears; empty: every type.
    pub event_types: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// Until then the previous secret signs too (after a rotation).
    pub previous_until: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
}

const INFO: &str = "id, name, url, source, event_types, created_by, created_at,
    CASE WHEN previous_until > now() THEN previous_until END AS previous_until, disabled_at";

/// Why an endpoint was not created or changed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("an endpoint is already named {0}")]
    NameTaken(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("the endpoint {0} comes from the configuration file: change it there")]
    FromConfig(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl EndpointError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            EndpointError::NameTaken(_) => "endpoint_name_taken",
            EndpointError::NotFound => "not_found",
            EndpointError::Invalid(_) => "invalid_request",
            EndpointError::FromConfig(_) => "endpoint_from_config",
            EndpointError::Database(_) => "database_unavailable",
        }
    }
}

/// What an endpoint is: checked the same way from the file and the API.
pub struct Target<'a> {
    pub name: &'a str,
    pub url: &'a str,
    pub event_types: &'a [String],
}

impl Target<'_> {
    fn check(&self) -> Result<(), EndpointError> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 100 || name.contains('\0') {
            return Err(EndpointError::Invalid(
                "an endpoint's name must be 1 to 100 characters".into(),
            ));
        }
        match reqwest::Url::parse(self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(EndpointError::Invalid(format!(
                    "{name}: url must be an http or https address"
                )));
            }
        }
        if let Some(unknown) = self.event_types.iter().find(|t| Kind::parse(t).is_none()) {
            let known: Vec<_> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            return Err(EndpointError::Invalid(format!(
                "{name}: unknown event type {unknown:?} (known: {})",
                known.join(", ")
            )));
        }
        Ok(())
    }
}

/// Every endpoint, disabled ones too.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<EndpointInfo>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INFO} FROM platform_endpoint ORDER BY name"
    )))
    .fetch_all(pool)
    .await
}

async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    info: &EndpointInfo,
    reason: &str,
    data: Value,
) -> sqlx::Result<()> {
    audit::record(
        conn,
        AuditEvent {
            actor,
            action,
            subject_type: "platform_endpoint",
            subject_id: info.id.to_string(),
            reason: Some(reason),
            data,
        },
    )
    .await
}

/// Creates an endpoint with a new secret, returned this once; audited.
/// Events written from now on are due to it.
pub async fn create(
    conn: &mut PgConnection,
    keys: &CodeKeys,
    target: &Target<'_>,
    actor: &str,
    reason: &str,
) -> Result<(EndpointInfo, Secret), EndpointError> {
    target.check()?;
    let secret = Secret::generate();
    let info: EndpointInfo = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO platform_endpoint (id, name, url, source, event_types, secret_sealed, created_by)
         VALUES ($1, $2, $3, 'admin', $4, $5, $6)
         ON CONFLICT (name) DO NOTHING RETURNING {INFO}"
    )))
    .bind(Uuid::now_v7())
    .bind(target.name.trim())
    .bind(target.url)
    .bind(target.event_types)
    .bind(keys.seal_bytes(secret.bytes()))
    .bind(actor)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| EndpointError::NameTaken(target.name.trim().to_owned()))?;
    audit(
        conn,
        actor,
        "platform_endpoint.created",
        &info,
        reason,
        json!({ "before": null, "after": { "name": info.name, "url": info.url, "event_types": info.event_types } }),
    )
    .await?;
    Ok((info, secret))
}

/// Locks an endpoint the admin API may change.
async fn lock_admin(conn: &mut PgConnection, id: Uuid) -> Result<EndpointInfo, EndpointError> {
    let info: EndpointInfo = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {INFO} FROM platform_endpoint WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(EndpointError::NotFound)?;
    if info.source == "config" {
        return Err(EndpointError::FromConfig(info.name));
    }
    Ok(info)
}

/// Gives an endpoint a new secret (returned this once); the old one keeps
/// signing beside it for `overlap`, so the receiver can switch without
/// refusing an event. Audited.
pub async fn rotate(
    conn: &mut PgConnection,
    keys: &CodeKeys,
    id: Uuid,
    overlap: std::time::Duration,
    actor: &str,
    reason: &str,
) -> Result<(EndpointInfo, Secret), EndpointError> {
    lock_admin(conn, id).await?;
    let secret = Secret::generate();
    let info: EndpointInfo = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE platform_endpoint
         SET previous_secret_sealed = secret_sealed, secret_sealed = $2,
             previous_until = now() + make_interval(secs => $3)
         WHERE id = $1 RETURNING {INFO}"
    )))
    .bind(id)
    .bind(keys.seal_bytes(secret.bytes()))
    .bind(overlap.as_secs_f64())
    .fetch_one(&mut *conn)
    .await?;
    audit(
        conn,
        actor,
        "platform_endpoint.rotated",
        &info,
        reason,
        json!({ "after": { "previous_secret_signs_until": info.previous_until } }),
    )
    .await?;
    Ok((info, secret))
}

/// Stops (or resumes) sending to an endpoint. While disabled, new events
/// are not due to it; its pending deliveries wait. Audited.
pub async fn set_disabled(
    conn: &mut PgConnection,
    id: Uuid,
    disabled: bool,
    actor: &str,
    reason: &str,
) -> Result<EndpointInfo, EndpointError> {
    let before = lock_admin(conn, id).await?;
    let info: EndpointInfo = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE platform_endpoint
         SET disabled_at = CASE WHEN $2 THEN coalesce(disabled_at, now()) END
         WHERE id = $1 RETURNING {INFO}"
    )))
    .bind(id)
    .bind(disabled)
    .fetch_one(&mut *conn)
    .await?;
    let action = if disabled {
        "platform_endpoint.disabled"
    } else {
        "platform_endpoint.enabled"
    };
    audit(
        conn,
        actor,
        action,
        &info,
        reason,
        json!({ "before": { "disabled": before.disabled_at.is_some() }, "after": { "disabled": disabled } }),
    )
    .await?;
    Ok(info)
}

/// Brings the configuration file's endpoints into the database: each is
/// created or updated by name, and file endpoints no longer in the file are
/// disabled. An endpoint of the admin API with a file endpoint's name is a
/// configuration error.
pub async fn sync_config(
    pool: &PgPool,
    keys: &CodeKeys,
    endpoints: &[EndpointConfig],
) -> Result<(), EndpointError> {
    let mut tx = pool.begin().await?;
    // One process at a time, so two starting workers do not both insert.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('entitle platform endpoints'))")
        .execute(&mut *tx)
        .await?;
    let mut names = Vec::new();
    for endpoint in endpoints {
        let target = Target {
            name: &endpoint.name,
            url: &endpoint.url,
            event_types: &endpoint.events,
        };
        target.check()?;
        let secret = Secret::parse(endpoint.secret.expose_secret()).map_err(|e| {
            EndpointError::Invalid(format!("platform.endpoints {}: secret: {e}", endpoint.name))
        })?;
        let previous = match &endpoint.previous_secret {
            Some(previous) => Some(Secret::parse(previous.expose_secret()).map_err(|e| {
                EndpointError::Invalid(format!(
                    "platform.endpoints {}: previous_secret: {e}",
                    endpoint.name
                ))
            })?),
            None => None,
        };
        let name = endpoint.name.trim();
        let kept: Option<String> = sqlx::query_scalar(
            "INSERT INTO platform_endpoint
                 (id, name, url, source, event_types, secret_sealed, previous_secret_sealed,
                  previous_until, created_by)
             VALUES ($1, $2, $3, 'config', $4, $5, $6,
                     CASE WHEN $6::bytea IS NOT NULL THEN 'infinity'::timestamptz END, 'config')
             ON CONFLICT (name) DO UPDATE
             SET url = excluded.url, event_types = excluded.event_types,
                 secret_sealed = excluded.secret_sealed,
                 previous_secret_sealed = excluded.previous_secret_sealed,
                 previous_until = excluded.previous_until, disabled_at = NULL
             WHERE platform_endpoint.source = 'config'
             RETURNING source",
        )
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(&endpoint.url)
        .bind(&endpoint.events)
        .bind(keys.seal_bytes(secret.bytes()))
        .bind(previous.map(|p| keys.seal_bytes(p.bytes())))
        .fetch_optional(&mut *tx)
        .await?;
        if kept.is_none() {
            return Err(EndpointError::Invalid(format!(
                "platform.endpoints {name}: an endpoint made through the admin API has this name"
            )));
        }
        names.push(name.to_owned());
    }
    sqlx::query(
        "UPDATE platform_endpoint SET disabled_at = now()
         WHERE source = 'config' AND disabled_at IS NULL AND NOT (name = ANY ($1))",
    )
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The secrets an endpoint signs with now: its own, and the previous one
/// while a rotation overlaps.
pub fn live_secrets(
    keys: &CodeKeys,
    sealed: &[u8],
    previous: Option<&[u8]>,
    previous_until: Option<DateTime<Utc>>,
) -> Result<Vec<Secret>, crate::code::UnsealError> {
    let mut secrets = vec![Secret::from_bytes(keys.unseal_bytes(sealed)?)];
    if let (Some(previous), Some(until)) = (previous, previous_until)
        && until > Utc::now()
    {
        secrets.push(Secret::from_bytes(keys.unseal_bytes(previous)?));
    }
    Ok(secrets)
}
