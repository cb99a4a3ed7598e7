//! Delivery: sends one pending email delivery, exactly once as far as
//! Postgres can tell, with its stable Message-ID on every attempt.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    code::CodeKeys,
    email::{Attachment, CodeLine, Mailer, SendError},
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
    /// Not due until then (a gift scheduled for later).
    NotDue(DateTime<Utc>),
    /// The server refused the message for good; marked failed.
    Failed,
}

/// Sends delivery `id` if it is due and nobody else holds it.
pub async fn send(
    pool: &PgPool,
    keys: &CodeKeys,
    mailer: &Mailer,
    bulk_threshold: usize,
    id: Uuid,
) -> Result<Attempt, JobError> {
    let claimed = sqlx::query(
        "UPDATE email_delivery
         SET status = 'sending', attempts = attempts + 1,
             claimed_until = now() + make_interval(secs => $2)
         WHERE id = $1 AND send_after <= now()
           AND (status = 'pending' OR (status = 'sending' AND claimed_until < now()))
         RETURNING recipient_email, recipient_name, message_id, order_id, kind",
    )
    .bind(id)
    .bind(f64::from(CLAIM_SECS))
    .fetch_optional(pool)
    .await?;
    let Some(row) = claimed else {
        // Still pending means not due when the claim ran (it may be due by
        // now): the caller schedules it again, so it is never left behind.
        let pending: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT send_after FROM email_delivery WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        return Ok(pending.map_or(Attempt::NothingToDo, Attempt::NotDue));
    };
    tracing::debug!(delivery = %id, "delivery claimed");
    let recipient: String = row.get("recipient_email");
    let recipient_name: Option<String> = row.get("recipient_name");
    let message_id: String = row.get("message_id");
    let order_id: Option<Uuid> = row.get("order_id");
    let kind: String = row.get("kind");

    let to = match recipient.parse() {
        Ok(address) => lettre::message::Mailbox::new(recipient_name, address),
        Err(e) => {
            let detail = format!("recipient address {recipient:?} is not valid: {e}");
            fail(pool, id, order_id, &detail).await?;
            return Ok(Attempt::Failed);
        }
    };
    let letter = match build_letter(
        pool,
        keys,
        mailer,
        bulk_threshold,
        Addressed {
            id,
            kind: &kind,
            order_id,
            to,
            message_id: &message_id,
        },
    )
    .await
    {
        Ok(letter) => letter,
        Err(e) => {
            let detail = format!("{e:#}");
            release(pool, id, &detail).await?;
            return Err(JobError::Transient(e));
        }
    };

    tracing::debug!(delivery = %id, "sending");
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

/// Who and what a delivery is.
struct Addressed<'a> {
    id: Uuid,
    kind: &'a str,
    order_id: Option<Uuid>,
    to: lettre::message::Mailbox,
    message_id: &'a str,
}

/// Renders a delivery: its codes (unsealed only here, never logged), as a
/// list or, above `bulk_threshold`, as a CSV attachment.
async fn build_letter(
    pool: &PgPool,
    keys: &CodeKeys,
    mailer: &Mailer,
    bulk_threshold: usize,
    delivery: Addressed<'_>,
) -> anyhow::Result<crate::email::Letter> {
    let rows = sqlx::query(
        "SELECT c.code_sealed, c.last4, c.expires_at, p.name, p.email_template
         FROM email_delivery_code dc
         JOIN activation_code c ON c.id = dc.code_id
         JOIN product p ON p.id = c.product_id
         WHERE dc.delivery_id = $1
         ORDER BY dc.position",
    )
    .bind(delivery.id)
    .fetch_all(pool)
    .await
    .context("Failed to load the delivery's codes")?;
    let mut family = "default".to_owned();
    let mut codes = Vec::with_capacity(rows.len());
    for row in rows {
        let sealed: Vec<u8> = row.get("code_sealed");
        let expires_at: DateTime<Utc> = row.get("expires_at");
        family = row.get("email_template");
        codes.push(CodeLine {
            display: keys.unseal(&sealed)?.display(),
            last4: row.get("last4"),
            product: row.get("name"),
            expires_on: expires_at.format("%Y-%m-%d").to_string(),
        });
    }
    let order = match delivery.order_id {
        Some(order_id) => Some(
            sqlx::query(
                "SELECT o.buyer_name, o.gift_message, o.gift_recipient_email, o.gift_recipient_name,
                        o.gift_send_at,
                        (SELECT count(*) FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
                         WHERE l.order_id = o.id AND c.state = 'issued') AS active_codes,
                        (SELECT p.email_template FROM order_line l JOIN product p ON p.id = l.product_id
                         WHERE l.order_id = o.id ORDER BY l.line_index LIMIT 1) AS family
                 FROM orders o WHERE o.id = $1",
            )
            .bind(order_id)
            .fetch_one(pool)
            .await
            .context("Failed to load the delivery's order")?,
        ),
        None => None,
    };
    let text = |name: &str| -> Option<String> { order.as_ref().and_then(|o| o.get(name)) };
    if codes.is_empty() {
        family = text("family").unwrap_or(family);
    }
    let (template, attachment) = match delivery.kind {
        "gift_receipt" => ("receipt", None),
        "revocation" => ("revoked", None),
        "expiry_reminder" => ("reminder", None),
        _ if codes.len() > bulk_threshold => ("bulk", Some(csv(&codes))),
        "gift_codes" => ("gift", None),
        _ => ("codes", None),
    };
    let send_at: Option<DateTime<Utc>> = order.as_ref().and_then(|o| o.get("gift_send_at"));
    let context = minijinja::context! {
        codes => codes,
        buyer_name => text("buyer_name"),
        message => text("gift_message"),
        gift_recipient_email => text("gift_recipient_email"),
        gift_recipient_name => text("gift_recipient_name"),
        code_count => order.as_ref().map_or(0, |o| o.get::<i64, _>("active_codes")),
        sent => send_at.is_none_or(|t| t <= Utc::now()),
        send_on => send_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
    };
    mailer.letter(
        &family,
        template,
        delivery.to,
        delivery.message_id,
        context,
        attachment,
    )
}

/// The codes as a CSV file: one row per code.
fn csv(codes: &[CodeLine]) -> Attachment {
    let mut body = String::with_capacity(codes.len() * 48 + 32);
    body.push_str("code,product,valid_until\r\n");
    for code in codes {
        // Product names are ours, but quote them anyway: they may hold commas.
        body.push_str(&format!(
            "{},\"{}\",{}\r\n",
            code.display,
            code.product.replace('"', "\"\""),
            code.expires_on
        ));
    }
    Attachment {
        filename: "activation-codes.csv".to_owned(),
        content_type: "text/csv; charset=utf-8",
        body: body.into_bytes(),
    }
}
