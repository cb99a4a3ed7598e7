//! Staff accounts: who may sign in to the console, with which role. Every
//! change (creation, disabling, enabling, a new role) writes its audit event
//! in the same transaction; disabling deletes the member's sessions too.

use chrono::{DateTime, Utc};
use entitle_jobs::{
    audit::{self, AuditEvent},
    token::Role,
};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{password, session_store};

/// A staff account as the Staff page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub role: Role,
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_sign_in_at: Option<DateTime<Utc>>,
}

type MemberRow = (
    Uuid,
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// The columns a [`MemberRow`] is read from.
macro_rules! columns {
    () => {
        "id, name, email, role, disabled_at, created_at, last_sign_in_at"
    };
}

fn member((id, name, email, role, disabled_at, created_at, last_sign_in_at): MemberRow) -> Member {
    Member {
        id,
        name,
        email,
        // The column's CHECK allows only the three roles.
        role: Role::parse(&role).unwrap_or(Role::Support),
        disabled_at,
        created_at,
        last_sign_in_at,
    }
}

/// Why a staff account could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("a staff member is already named {0}")]
    NameTaken(String),
    #[error("a staff member already has the email {0}")]
    EmailTaken(String),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("no such staff member")]
    NotFound,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A member to create.
#[derive(Debug, Clone)]
pub struct NewMember<'a> {
    pub name: &'a str,
    pub email: &'a str,
    pub role: Role,
    pub password: &'a str,
}

/// Creates a member, audited as `staff.created` by `actor`.
pub async fn create(
    pool: &PgPool,
    new: NewMember<'_>,
    actor: &str,
    reason: &str,
) -> Result<Member, MemberError> {
    let mut tx = pool.begin().await?;
    let created = create_in(&mut tx, new, actor, reason).await?;
    tx.commit().await?;
    Ok(created)
}

/// [`create`], in the caller's transaction (the console's invite, which
/// also records its form's one-time key there).
pub async fn create_in(
    tx: &mut sqlx::PgConnection,
    new: NewMember<'_>,
    actor: &str,
    reason: &str,
) -> Result<Member, MemberError> {
    let name = new.name.trim();
    let email = new.email.trim();
    // `system:`, `operator:`, `customer:` are the audit log's own actors.
    if name.is_empty()
        || name.len() > 100
        || name.contains(':')
        || name.contains(char::is_whitespace)
    {
        return Err(MemberError::Invalid(
            "a name is 1 to 100 characters without spaces or colons",
        ));
    }
    if !email.contains('@') || email.len() > 254 || email.contains(char::is_whitespace) {
        return Err(MemberError::Invalid("the email address is not valid"));
    }
    if new.password.chars().count() < password::MIN_LENGTH {
        return Err(MemberError::Invalid(
            "a password has at least 12 characters",
        ));
    }
    let hash = password::hash_blocking(new.password.to_owned()).await?;
    let row: MemberRow = sqlx::query_as(concat!(
        "INSERT INTO staff_member (id, name, email, role, password_hash)
         VALUES ($1, $2, $3, $4, $5) RETURNING ",
        columns!(),
        ""
    ))
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(email)
    .bind(new.role.as_str())
    .bind(hash)
    .fetch_one(&mut *tx)
    .await
    .map_err(
        |e| match e.as_database_error().and_then(|d| d.constraint()) {
            Some("staff_member_name_key") => MemberError::NameTaken(name.to_owned()),
            Some("staff_member_email_key") => MemberError::EmailTaken(email.to_owned()),
            _ => MemberError::Database(e),
        },
    )?;
    let created = member(row);
    audit::record(
        &mut *tx,
        AuditEvent {
            actor,
            action: "staff.created",
            subject_type: "staff_member",
            subject_id: created.name.clone(),
            reason: Some(reason),
            data: json!({
                "before": null,
                "after": { "email": created.email, "role": created.role.as_str() }
            }),
        },
    )
    .await?;
    Ok(created)
}

/// Every member, enabled first, by name.
pub async fn list(pool: &PgPool) -> sqlx::Result<Vec<Member>> {
    let rows: Vec<MemberRow> = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM staff_member ORDER BY disabled_at IS NOT NULL, name"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(member).collect())
}

/// An enabled member by id.
pub async fn enabled_by_id(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<Member>> {
    let row: Option<MemberRow> = sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM staff_member WHERE id = $1 AND disabled_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(member))
}

/// An enabled member by email (any case), with their password hash.
pub async fn enabled_by_email(
    pool: &PgPool,
    email: &str,
) -> sqlx::Result<Option<(Member, String)>> {
    let row: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT id, password_hash FROM staff_member
         WHERE lower(email) = lower($1) AND disabled_at IS NULL",
    )
    .bind(email.trim())
    .fetch_optional(pool)
    .await?;
    let Some((id, hash)) = row else {
        return Ok(None);
    };
    Ok(enabled_by_id(pool, id).await?.map(|m| (m, hash)))
}

/// Notes a successful sign-in.
pub async fn signed_in(pool: &PgPool, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("UPDATE staff_member SET last_sign_in_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Disables (`enabled = false`) or enables a member, audited as
/// `staff.disabled` or `staff.enabled`. Disabling deletes their sessions in
/// the same transaction: they are signed out at once, on every gateway.
pub async fn set_enabled(
    pool: &PgPool,
    id: Uuid,
    enabled: bool,
    actor: &str,
    reason: &str,
) -> Result<Member, MemberError> {
    let mut tx = pool.begin().await?;
    let row: Option<MemberRow> = sqlx::query_as(concat!(
        "UPDATE staff_member
         SET disabled_at = CASE WHEN $2 THEN NULL ELSE coalesce(disabled_at, now()) END
         WHERE id = $1 RETURNING ",
        columns!(),
        ""
    ))
    .bind(id)
    .bind(enabled)
    .fetch_optional(&mut *tx)
    .await?;
    let changed = member(row.ok_or(MemberError::NotFound)?);
    let sessions = if enabled {
        0
    } else {
        session_store::delete_for_staff(&mut tx, id).await?
    };
    audit::record(
        &mut tx,
        AuditEvent {
            actor,
            action: if enabled {
                "staff.enabled"
            } else {
                "staff.disabled"
            },
            subject_type: "staff_member",
            subject_id: changed.name.clone(),
            reason: Some(reason),
            data: json!({ "sessions_ended": sessions }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(changed)
}

/// Gives a member another role, audited as `staff.role_changed`. It applies
/// to their next request: the role is read on every request.
pub async fn set_role(
    pool: &PgPool,
    id: Uuid,
    role: Role,
    actor: &str,
    reason: &str,
) -> Result<Member, MemberError> {
    let mut tx = pool.begin().await?;
    let before: Option<String> =
        sqlx::query_scalar("SELECT role FROM staff_member WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let before = before.ok_or(MemberError::NotFound)?;
    let row: MemberRow = sqlx::query_as(concat!(
        "UPDATE staff_member SET role = $2 WHERE id = $1 RETURNING ",
        columns!(),
        ""
    ))
    .bind(id)
    .bind(role.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let changed = member(row);
    audit::record(
        &mut tx,
        AuditEvent {
            actor,
            action: "staff.role_changed",
            subject_type: "staff_member",
            subject_id: changed.name.clone(),
            reason: Some(reason),
            data: json!({ "before": { "role": before }, "after": { "role": role.as_str() } }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(changed)
}
