//! Issuance: turns a [`Purchase`] into an order, its lines, one code per unit
//! and the email delivery that carries them, in one transaction that a
//! duplicated or concurrent job cannot repeat.

use std::collections::HashMap;

use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    code::{Code, CodeKeys},
    command::Purchase,
    error::JobError,
};

/// Codes are inserted this many per statement, so a partner order of
/// thousands of units never builds one enormous statement.
const CODES_PER_STATEMENT: usize = 500;

/// What issuance did for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub order_id: Uuid,
    /// Deliveries created now; empty when the order already existed.
    pub deliveries: Vec<Uuid>,
}

struct Product {
    id: Uuid,
    validity_days: i32,
}

/// Resolves every line's channel reference to a product, or reports all the
/// references nobody mapped.
async fn resolve_products(
    pool: &PgPool,
    purchase: &Purchase,
) -> Result<HashMap<String, Product>, JobError> {
    let references: Vec<&str> = purchase
        .lines
        .iter()
        .map(|l| l.reference.as_str())
        .collect();
    let rows = sqlx::query(
        "SELECT cp.reference, p.id, p.validity_days
         FROM channel_product cp JOIN product p ON p.id = cp.product_id
         WHERE cp.channel = $1 AND cp.reference = ANY($2) AND p.active",
    )
    .bind(&purchase.channel)
    .bind(&references)
    .fetch_all(pool)
    .await?;
    let products: HashMap<String, Product> = rows
        .into_iter()
        .map(|r| {
            (
                r.get("reference"),
                Product {
                    id: r.get("id"),
                    validity_days: r.get("validity_days"),
                },
            )
        })
        .collect();
    let mut unknown: Vec<&str> = references
        .iter()
        .copied()
        .filter(|r| !products.contains_key(*r))
        .collect();
    unknown.dedup();
    if !unknown.is_empty() {
        return Err(JobError::permanent(
            "unknown_product",
            format!(
                "no product is mapped to {} reference(s) {}",
                purchase.channel,
                unknown.join(", ")
            ),
        ));
    }
    Ok(products)
}

/// Fulfils the purchase carried by inbox event `inbox_id`, exactly once.
///
/// Returns `None` when the event was already finished by another run.
pub async fn fulfil(
    pool: &PgPool,
    keys: &CodeKeys,
    message_id_domain: &str,
    inbox_id: Uuid,
    purchase: &Purchase,
) -> Result<Option<Issued>, JobError> {
    let products = resolve_products(pool, purchase).await?;
    let mut tx = pool.begin().await?;
    // Holding the event's row serialises concurrent runs of the same job.
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM webhook_inbox WHERE id = $1 FOR UPDATE")
            .bind(inbox_id)
            .fetch_optional(&mut *tx)
            .await?;
    if status.as_deref() != Some("pending") {
        return Ok(None);
    }

    let new_order: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO orders (id, channel, channel_order_id, buyer_email, buyer_name, account_id,
                             gift_recipient_email, gift_recipient_name, gift_message, gift_send_at,
                             currency, amount_total, paid_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, COALESCE($13, now()))
         ON CONFLICT (channel, channel_order_id) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(&purchase.channel)
    .bind(&purchase.channel_order_id)
    .bind(&purchase.buyer_email)
    .bind(&purchase.buyer_name)
    .bind(&purchase.account_id)
    .bind(purchase.gift.as_ref().map(|g| &g.recipient_email))
    .bind(
        purchase
            .gift
            .as_ref()
            .and_then(|g| g.recipient_name.as_ref()),
    )
    .bind(purchase.gift.as_ref().and_then(|g| g.message.as_ref()))
    .bind(purchase.gift.as_ref().and_then(|g| g.send_at))
    .bind(&purchase.currency)
    .bind(purchase.amount_total)
    .bind(purchase.paid_at)
    .fetch_optional(&mut *tx)
    .await?;

    let Some(order_id) = new_order else {
        // Another event (a retry, or async_payment_succeeded after completed)
        // already fulfilled this order: record the link and change nothing.
        let existing: Uuid = sqlx::query_scalar(
            "SELECT id FROM orders WHERE channel = $1 AND channel_order_id = $2",
        )
        .bind(&purchase.channel)
        .bind(&purchase.channel_order_id)
        .fetch_one(&mut *tx)
        .await?;
        mark_processed(&mut tx, inbox_id, existing, "order already fulfilled").await?;
        tx.commit().await?;
        return Ok(Some(Issued {
            order_id: existing,
            deliveries: Vec::new(),
        }));
    };

    let units: u32 = purchase.lines.iter().map(|l| l.quantity).sum();
    audit::record(
        &mut tx,
        AuditEvent {
            actor: audit::WORKER,
            action: "order.created",
            subject_type: "order",
            subject_id: order_id.to_string(),
            reason: None,
            data: json!({
                "channel": purchase.channel,
                "channel_order_id": purchase.channel_order_id,
                "inbox_event": inbox_id,
                "lines": purchase.lines.len(),
                "units": units,
            }),
        },
    )
    .await?;

    let mut codes = Vec::with_capacity(units as usize);
    for (index, line) in purchase.lines.iter().enumerate() {
        let product = &products[&line.reference];
        let line_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO order_line (id, order_id, line_index, channel_reference, product_id,
                                     quantity, unit_amount, amount_total)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(line_id)
        .bind(order_id)
        .bind(index as i32)
        .bind(&line.reference)
        .bind(product.id)
        .bind(line.quantity as i32)
        .bind(line.unit_amount)
        .bind(line.amount_total)
        .execute(&mut *tx)
        .await?;
        let units: Vec<i32> = (0..line.quantity as i32).collect();
        for chunk in units.chunks(CODES_PER_STATEMENT) {
            let ids = issue_codes(&mut tx, keys, product, line_id, chunk).await?;
            codes.extend(ids);
        }
    }

    let delivery = create_delivery(
        &mut tx,
        order_id,
        "order_codes",
        &purchase.buyer_email,
        purchase.buyer_name.as_deref(),
        &codes,
        message_id_domain,
    )
    .await?;
    mark_processed(&mut tx, inbox_id, order_id, "order fulfilled").await?;
    tx.commit().await?;
    metrics::counter!("entitle_codes_issued_total").increment(codes.len() as u64);
    metrics::counter!("entitle_orders_fulfilled_total", "channel" => purchase.channel.clone())
        .increment(1);
    tracing::info!(%order_id, %inbox_id, codes = codes.len(), "order fulfilled");
    Ok(Some(Issued {
        order_id,
        deliveries: vec![delivery],
    }))
}

/// Issues one code for each unit index, with its audit events; returns the
/// new code ids in unit order.
async fn issue_codes(
    conn: &mut PgConnection,
    keys: &CodeKeys,
    product: &Product,
    line_id: Uuid,
    units: &[i32],
) -> Result<Vec<Uuid>, JobError> {
    let mut ids = Vec::with_capacity(units.len());
    let mut hashes = Vec::with_capacity(units.len());
    let mut sealed = Vec::with_capacity(units.len());
    let mut last4 = Vec::with_capacity(units.len());
    for _ in units {
        let code = Code::generate();
        ids.push(Uuid::now_v7());
        hashes.push(keys.hash(&code));
        sealed.push(keys.seal(&code));
        last4.push(code.last4().to_owned());
    }
    sqlx::query(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4,
                                      order_line_id, unit_index, expires_at)
         SELECT u.id, $1, u.hash, u.sealed, u.last4, $2, u.unit, now() + make_interval(days => $3)
         FROM UNNEST($4::uuid[], $5::bytea[], $6::bytea[], $7::text[], $8::int4[])
              AS u(id, hash, sealed, last4, unit)",
    )
    .bind(product.id)
    .bind(line_id)
    .bind(product.validity_days)
    .bind(&ids)
    .bind(&hashes)
    .bind(&sealed)
    .bind(&last4)
    .bind(units)
    .execute(&mut *conn)
    .await?;
    let events: Vec<(String, serde_json::Value)> = ids
        .iter()
        .zip(units)
        .zip(&last4)
        .map(|((id, unit), last4)| {
            (
                id.to_string(),
                json!({ "order_line": line_id, "unit_index": unit, "last4": last4, "state": "issued" }),
            )
        })
        .collect();
    audit::record_many(conn, audit::WORKER, "code.issued", "code", &events).await?;
    Ok(ids)
}

/// Creates a pending delivery of `codes` to `recipient`, with a Message-ID
/// fixed now so every attempt sends the same message.
pub async fn create_delivery(
    conn: &mut PgConnection,
    order_id: Uuid,
    kind: &str,
    recipient: &str,
    recipient_name: Option<&str>,
    codes: &[Uuid],
    message_id_domain: &str,
) -> sqlx::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO email_delivery (id, order_id, kind, recipient_email, recipient_name, message_id)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(order_id)
    .bind(kind)
    .bind(recipient)
    .bind(recipient_name)
    .bind(format!("<{id}@{message_id_domain}>"))
    .execute(&mut *conn)
    .await?;
    let positions: Vec<i32> = (0..codes.len() as i32).collect();
    sqlx::query(
        "INSERT INTO email_delivery_code (delivery_id, code_id, position)
         SELECT $1, c.id, c.position FROM UNNEST($2::uuid[], $3::int4[]) AS c(id, position)",
    )
    .bind(id)
    .bind(codes)
    .bind(&positions)
    .execute(&mut *conn)
    .await?;
    audit::record(
        conn,
        AuditEvent {
            actor: audit::WORKER,
            action: "delivery.created",
            subject_type: "delivery",
            subject_id: id.to_string(),
            reason: None,
            data: json!({ "order": order_id, "kind": kind, "codes": codes.len() }),
        },
    )
    .await?;
    Ok(id)
}

async fn mark_processed(
    conn: &mut PgConnection,
    inbox_id: Uuid,
    order_id: Uuid,
    detail: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE webhook_inbox SET status = 'processed', attempts = attempts + 1, processed_at = now(),
                order_id = $2, error_code = NULL, last_error = NULL
         WHERE id = $1",
    )
    .bind(inbox_id)
    .bind(order_id)
    .execute(&mut *conn)
    .await?;
    audit::record(
        conn,
        AuditEvent {
            actor: audit::WORKER,
            action: "event.processed",
            subject_type: "webhook_event",
            subject_id: inbox_id.to_string(),
            reason: Some(detail),
            data: json!({ "order": order_id }),
        },
    )
    .await
}
