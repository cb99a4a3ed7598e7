//! Delivery: sends one pending email delivery, exactly once as far as
//! Postgres can tell, with its stable Message-ID on every attempt.

use anyhow::Context as _;
use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    code::CodeKeys,
    email::{CodeLine, Mailer, SendError},
    error::JobError,
};

/// How long a sender holds a delivery; a crashed sender's claim lapses then.
const CLAIM_SECS: i32 = 300;

/// What an attempt at a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Sent,
    /// Already sent, failed for good, or held by another sender right now.
    NothingToDo,
    /// Not due yet (a gift scheduled for later).
    NotDue,
    /// The server refused the message for good; marked failed.
    Failed,
}

/// Sends delivery `id` if it is due and nobody else holds it.
pub async fn send(
    pool: &PgPool,
    keys: &CodeKeys,
    mailer: &Mailer,
    id: Uuid,
) -> Result<Attempt, JobError> {
    let claimed = sqlx::query(
        "UPDATE email_delivery
         SET status = 'sending', attempts = attempts + 1,
             claimed_until = now() + make_interval(secs => $2)
         WHERE id = $1 AND send_after <= now()
           AND (status = 'pending' OR (status = 'sending' AND claimed_until < now()))
         RETURNING recipient_email, recipient_name, message_id, order_id",
    )
    .bind(id)
    .bind(f64::from(CLAIM_SECS))
    .fetch_optional(pool)
    .await?;
    let Some(row) = claimed else {
        let due: Option<bool> = sqlx::query_scalar(
            "SELECT send_after > now() FROM email_delivery WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        return Ok(if due == Some(true) {
            Attempt::NotDue
        } else {
            Attempt::NothingToDo
        });
    };
    let recipient: String = row.get("recipient_email");
    let recipient_name: Option<String> = row.get("recipient_name");
    let message_id: String = row.get("message_id");
    let order_id: Option<Uuid> = row.get("order_id");

    let to = match recipient.parse() {
        Ok(address) => lettre::message::Mailbox::new(recipient_name, address),
        Err(e) => {
            let detail = format!("recipient address {recipient:?} is not valid: {e}");
            fail(pool, id, order_id, &detail).await?;
            return Ok(Attempt::Failed);
        }
    };
    let letter = match build_letter(pool, keys, mailer, id, to, &message_id).await {
        Ok(letter) => letter,
        Err(e) => {
            let detail = format!("{e:#}");
            release(pool, id, &detail).await?;
            return Err(JobError::Transient(e));
        }
    };

    match mailer.send(letter).await {
        Ok(reply) => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "UPDATE email_delivery SET status = 'sent', sent_at = now(), claimed_until = NULL,
                        provider_response = $2, last_error = NULL
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&reply)
            .execute(&mut *tx)
            .await?;
            audit::record(
                &mut tx,
                AuditEvent {
                    actor: audit::WORKER,
                    action: "delivery.sent",
                    subject_type: "delivery",
                    subject_id: id.to_string(),
                    reason: None,
                    data: json!({ "order": order_id, "message_id": message_id, "reply": reply }),
                },
            )
            .await?;
            tx.commit().await?;
            metrics::counter!("entitle_emails_sent_total").increment(1);
            tracing::info!(delivery = %id, "email sent");
            Ok(Attempt::Sent)
        }
        Err(SendError::Permanent(detail)) => {
            fail(pool, id, order_id, &detail).await?;
            Ok(Attempt::Failed)
        }
        Err(SendError::Transient(detail)) => {
            release(pool, id, &detail).await?;
            metrics::counter!("entitle_email_attempts_failed_total").increment(1);
            Err(JobError::Transient(anyhow::anyhow!(detail)))
        }
    }
}

/// Marks a claimed delivery as failed for good, with its audit event.
async fn fail(pool: &PgPool, id: Uuid, order_id: Option<Uuid>, detail: &str) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE email_delivery SET status = 'failed', claimed_until = NULL, last_error = $2
         WHERE id = $1",
    )
    .bind(id)
    .bind(detail)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        AuditEvent {
            actor: audit::WORKER,
            action: "delivery.failed",
            subject_type: "delivery",
            subject_id: id.to_string(),
            reason: Some(detail),
            data: json!({ "order": order_id }),
        },
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("entitle_emails_failed_total").increment(1);
    tracing::warn!(delivery = %id, %detail, "email failed permanently");
    Ok(())
}

/// Gives a claimed delivery back so the next attempt can take it at once.
async fn release(pool: &PgPool, id: Uuid, detail: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE email_delivery SET status = 'pending', claimed_until = NULL, last_error = $2
         WHERE id = $1 AND status = 'sending'",
    )
    .bind(id)
    .bind(detail)
    .execute(pool)
    .await?;
    Ok(())
}

async fn build_letter(
    pool: &PgPool,
    keys: &CodeKeys,
    mailer: &Mailer,
    id: Uuid,
    to: lettre::message::Mailbox,
    message_id: &str,
) -> anyhow::Result<crate::email::Letter> {
    let rows = sqlx::query(
        "SELECT c.code_sealed, c.expires_at, p.name, p.email_template
         FROM email_delivery_code dc
         JOIN activation_code c ON c.id = dc.code_id
         JOIN product p ON p.id = c.product_id
         WHERE dc.delivery_id = $1
         ORDER BY dc.position",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .context("Failed to load the delivery's codes")?;
    let mut family = "default".to_owned();
    let mut codes = Vec::with_capacity(rows.len());
    for row in rows {
        let sealed: Vec<u8> = row.get("code_sealed");
        let expires_at: chrono::DateTime<chrono::Utc> = row.get("expires_at");
        family = row.get("email_template");
        codes.push(CodeLine {
            display: keys.unseal(&sealed)?.display(),
            product: row.get("name"),
            expires_on: expires_at.format("%Y-%m-%d").to_string(),
        });
    }
    mailer.codes_letter(&family, to, message_id, &codes)
}
