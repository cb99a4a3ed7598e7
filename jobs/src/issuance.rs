//! Issuance: turns a [`Purchase`] into an order, its lines, one code per unit
//! and the email deliveries that carry them, exactly once however often or
//! concurrently the event is processed.
//!
//! It runs in three idempotent steps, so a partner order of thousands of units
//! never holds one huge transaction or all its codes in memory: the order and
//! its lines; the codes, a bounded batch per transaction (unique per line and
//! unit, so a repeated batch inserts nothing); and a final transaction that
//! applies refunds that arrived early, creates the deliveries and marks the
//! event processed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    adjustment,
    audit::{self, AuditEvent},
    code::{Code, CodeKeys},
    command::Purchase,
    error::JobError,
};

/// What issuance did for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub order_id: Uuid,
    /// Deliveries created now, with when each is due; empty when another run
    /// already created them.
    pub deliveries: Vec<(Uuid, DateTime<Utc>)>,
}

/// Settings issuance needs from the configuration.
#[derive(Debug, Clone)]
pub struct IssueSettings<'a> {
    pub message_id_domain: &'a str,
    pub batch_size: u32,
    pub notify_revocations: bool,
}

struct Product {
    id: Uuid,
    reference: String,
}

/// Resolves each line to a product by the first of its references the
/// catalogue maps, or reports every line nobody mapped.
async fn resolve_products(pool: &PgPool, purchase: &Purchase) -> Result<Vec<Product>, JobError> {
    let references: Vec<&str> = purchase
        .lines
        .iter()
        .flat_map(|l| l.references.iter().map(String::as_str))
        .collect();
    let rows = sqlx::query(
        "SELECT cp.reference, p.id
         FROM channel_product cp JOIN product p ON p.id = cp.product_id
         WHERE cp.channel = $1 AND cp.reference = ANY($2) AND p.active",
    )
    .bind(&purchase.channel)
    .bind(&references)
    .fetch_all(pool)
    .await?;
    let mapped: HashMap<String, Uuid> = rows
        .into_iter()
        .map(|r| (r.get("reference"), r.get("id")))
        .collect();
    let mut products = Vec::with_capacity(purchase.lines.len());
    let mut unknown = Vec::new();
    for line in &purchase.lines {
        match line.references.iter().find(|r| mapped.contains_key(*r)) {
            Some(reference) => products.push(Product {
                id: mapped[reference],
                reference: reference.clone(),
            }),
            None => unknown.push(line.references.join(" or ")),
        }
    }
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
    settings: &IssueSettings<'_>,
    inbox_id: Uuid,
    purchase: &Purchase,
) -> Result<Option<Issued>, JobError> {
    let products = resolve_products(pool, purchase).await?;
    let Some(order_id) = create_order(pool, inbox_id, purchase, &products).await? else {
        return Ok(None);
    };
    issue_missing_codes(pool, keys, order_id, settings.batch_size).await?;
    finish(pool, settings, inbox_id, order_id).await
}

/// Step 1: the order and its lines, or the order another event created.
async fn create_order(
    pool: &PgPool,
    inbox_id: Uuid,
    purchase: &Purchase,
    products: &[Product],
) -> Result<Option<Uuid>, JobError> {
    let mut tx = pool.begin().await?;
    // Holding the event's row serialises concurrent runs of the same job.
    if !lock_pending_event(&mut tx, inbox_id).await? {
        return Ok(None);
    }
    let gift = purchase.gift.as_ref();
    let new_order: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO orders (id, channel, channel_order_id, payment_reference, buyer_email,
                             buyer_name, account_id, gift_recipient_email, gift_recipient_name,
                             gift_message, gift_send_at, currency, amount_total, paid_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, COALESCE($14, now()))
         ON CONFLICT (channel, channel_order_id) DO NOTHING
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(&purchase.channel)
    .bind(&purchase.channel_order_id)
    .bind(&purchase.payment_reference)
    .bind(&purchase.buyer_email)
    .bind(&purchase.buyer_name)
    .bind(&purchase.account_id)
    .bind(gift.map(|g| &g.recipient_email))
    .bind(gift.and_then(|g| g.recipient_name.as_ref()))
    .bind(gift.and_then(|g| g.message.as_ref()))
    .bind(gift.and_then(|g| g.send_at))
    .bind(&purchase.currency)
    .bind(purchase.amount_total)
    .bind(purchase.paid_at)
    .fetch_optional(&mut *tx)
    .await?;

    let order_id = match new_order {
        Some(order_id) => {
            for (index, (line, product)) in purchase.lines.iter().zip(products).enumerate() {
                sqlx::query(
                    "INSERT INTO order_line (id, order_id, line_index, channel_reference,
                                             product_id, quantity, unit_amount, amount_total)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(Uuid::now_v7())
                .bind(order_id)
                .bind(index as i32)
                .bind(&product.reference)
                .bind(product.id)
                .bind(line.quantity as i32)
                .bind(line.unit_amount)
                .bind(line.amount_total)
                .execute(&mut *tx)
                .await?;
            }
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
                        "gift": gift.is_some(),
                    }),
                },
            )
            .await?;
            order_id
        }
        // Another event (a retry, or async_payment_succeeded after completed)
        // created it: carry on with that order; its steps are idempotent.
        None => {
            sqlx::query_scalar("SELECT id FROM orders WHERE channel = $1 AND channel_order_id = $2")
                .bind(&purchase.channel)
                .bind(&purchase.channel_order_id)
                .fetch_one(&mut *tx)
                .await?
        }
    };
    tx.commit().await?;
    Ok(Some(order_id))
}

/// Step 2: a code for every unit that has none, `batch` per transaction.
async fn issue_missing_codes(
    pool: &PgPool,
    keys: &CodeKeys,
    order_id: Uuid,
    batch: u32,
) -> Result<(), JobError> {
    let lines: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
        "SELECT l.id, l.product_id, l.quantity FROM order_line l WHERE l.order_id = $1 ORDER BY l.line_index",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let mut issued = 0usize;
    for (line_id, product_id, quantity) in lines {
        loop {
            let missing: Vec<i32> = sqlx::query_scalar(
                "SELECT u FROM generate_series(0, $2 - 1) AS u
                 WHERE NOT EXISTS (SELECT 1 FROM activation_code c
                                   WHERE c.order_line_id = $1 AND c.unit_index = u)
                 ORDER BY u LIMIT $3",
            )
            .bind(line_id)
            .bind(quantity)
            .bind(i64::from(batch))
            .fetch_all(pool)
            .await?;
            if missing.is_empty() {
                break;
            }
            let mut tx = pool.begin().await?;
            issued += issue_codes(&mut tx, keys, product_id, line_id, &missing).await?;
            tx.commit().await?;
        }
    }
    metrics::counter!("entitle_codes_issued_total").increment(issued as u64);
    Ok(())
}

/// New codes in the columns they are stored as (id, keyed hash, sealed copy,
/// last four symbols), ready to bind as arrays. The plain codes go no further.
struct Minted {
    ids: Vec<Uuid>,
    hashes: Vec<Vec<u8>>,
    sealed: Vec<Vec<u8>>,
    last4: Vec<String>,
}

impl Minted {
    fn new(keys: &CodeKeys, n: usize) -> Self {
        let mut minted = Minted {
            ids: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            sealed: Vec::with_capacity(n),
            last4: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let code = Code::generate();
            minted.ids.push(Uuid::now_v7());
            minted.hashes.push(keys.hash(&code));
            minted.sealed.push(keys.seal(&code));
            minted.last4.push(code.last4().to_owned());
        }
        minted
    }
}

/// Issues one code for each unit index that still has none, with its audit
/// events; returns how many were new (a concurrent run may have won some).
async fn issue_codes(
    conn: &mut PgConnection,
    keys: &CodeKeys,
    product_id: Uuid,
    line_id: Uuid,
    units: &[i32],
) -> Result<usize, JobError> {
    let Minted {
        ids,
        hashes,
        sealed,
        last4,
    } = Minted::new(keys, units.len());
    let inserted: Vec<(Uuid, i32, String)> = sqlx::query_as(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4,
                                      order_line_id, unit_index, expires_at)
         SELECT u.id, $1, u.hash, u.sealed, u.last4, $2, u.unit,
                now() + make_interval(days => p.validity_days)
         FROM UNNEST($3::uuid[], $4::bytea[], $5::bytea[], $6::text[], $7::int4[])
              AS u(id, hash, sealed, last4, unit)
         JOIN product p ON p.id = $1
         ON CONFLICT (order_line_id, unit_index) DO NOTHING
         RETURNING id, unit_index, last4",
    )
    .bind(product_id)
    .bind(line_id)
    .bind(&ids)
    .bind(&hashes)
    .bind(&sealed)
    .bind(&last4)
    .bind(units)
    .fetch_all(&mut *conn)
    .await?;
    let events: Vec<(String, serde_json::Value)> = inserted
        .iter()
        .map(|(id, unit, last4)| {
            (
                id.to_string(),
                json!({ "order_line": line_id, "unit_index": unit, "last4": last4, "state": "issued" }),
            )
        })
        .collect();
    audit::record_many(conn, audit::WORKER, "code.issued", "code", &events).await?;
    Ok(inserted.len())
}

/// Step 3: apply early refunds, create the deliveries once, mark the event.
async fn finish(
    pool: &PgPool,
    settings: &IssueSettings<'_>,
    inbox_id: Uuid,
    order_id: Uuid,
) -> Result<Option<Issued>, JobError> {
    let mut tx = pool.begin().await?;
    if !lock_pending_event(&mut tx, inbox_id).await? {
        return Ok(None);
    }
    let order = sqlx::query(
        "SELECT buyer_email, buyer_name, gift_recipient_email, gift_recipient_name, gift_send_at,
                issued_at IS NOT NULL AS issued
         FROM orders WHERE id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_one(&mut *tx)
    .await?;
    let mut deliveries = Vec::new();
    if !order.get::<bool, _>("issued") {
        sqlx::query("UPDATE orders SET issued_at = now() WHERE id = $1")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        // Refunds or cancellations that arrived before the purchase.
        deliveries.extend(adjustment::apply_pending(&mut tx, settings, order_id).await?);
        let buyer: String = order.get("buyer_email");
        let buyer_name: Option<String> = order.get("buyer_name");
        let now = Utc::now();
        match order.get::<Option<String>, _>("gift_recipient_email") {
            Some(recipient) => {
                let send_at = order
                    .get::<Option<DateTime<Utc>>, _>("gift_send_at")
                    .map_or(now, |t| t.max(now));
                let recipient_name: Option<String> = order.get("gift_recipient_name");
                let gift = NewDelivery {
                    order_id: Some(order_id),
                    kind: "gift_codes",
                    recipient: &recipient,
                    recipient_name: recipient_name.as_deref(),
                    send_after: send_at,
                    codes: CodeSelection::ActiveOfOrder,
                    requested_by: None,
                };
                if let Some(id) =
                    create_delivery(&mut tx, &gift, settings.message_id_domain).await?
                {
                    deliveries.push((id, send_at));
                }
                let receipt = NewDelivery {
                    order_id: Some(order_id),
                    kind: "gift_receipt",
                    recipient: &buyer,
                    recipient_name: buyer_name.as_deref(),
                    send_after: now,
                    codes: CodeSelection::None,
                    requested_by: None,
                };
                if let Some(id) =
                    create_delivery(&mut tx, &receipt, settings.message_id_domain).await?
                {
                    deliveries.push((id, now));
                }
            }
            None => {
                let codes = NewDelivery {
                    order_id: Some(order_id),
                    kind: "order_codes",
                    recipient: &buyer,
                    recipient_name: buyer_name.as_deref(),
                    send_after: now,
                    codes: CodeSelection::ActiveOfOrder,
                    requested_by: None,
                };
                if let Some(id) =
                    create_delivery(&mut tx, &codes, settings.message_id_domain).await?
                {
                    deliveries.push((id, now));
                }
            }
        }
    }
    mark_processed(&mut tx, inbox_id, Some(order_id), "order fulfilled").await?;
    tx.commit().await?;
    if !deliveries.is_empty() {
        metrics::counter!("entitle_orders_fulfilled_total").increment(1);
        tracing::info!(%order_id, %inbox_id, deliveries = deliveries.len(), "order fulfilled");
    }
    Ok(Some(Issued {
        order_id,
        deliveries,
    }))
}

/// Locks an inbox event; false when it is no longer pending.
pub(crate) async fn lock_pending_event(
    conn: &mut PgConnection,
    inbox_id: Uuid,
) -> sqlx::Result<bool> {
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM webhook_inbox WHERE id = $1 FOR UPDATE")
            .bind(inbox_id)
            .fetch_optional(conn)
            .await?;
    Ok(status.as_deref() == Some("pending"))
}

/// Which codes a delivery carries.
#[derive(Debug, Clone)]
pub enum CodeSelection {
    /// None (a receipt).
    None,
    /// Every code of the order still issued, in line and unit order.
    ActiveOfOrder,
    /// These codes, in this order.
    These(Vec<Uuid>),
}

/// A delivery to create.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    pub order_id: Option<Uuid>,
    pub kind: &'a str,
    pub recipient: &'a str,
    pub recipient_name: Option<&'a str>,
    pub send_after: DateTime<Utc>,
    pub codes: CodeSelection,
    /// The support or operations actor who asked for it, if anyone did.
    pub requested_by: Option<&'a str>,
}

/// Creates a pending delivery with a Message-ID fixed now, so every attempt
/// sends the same message. Returns `None` when it would carry no code though
/// it should (every code was revoked), or when the order already has its
/// delivery of this kind.
pub async fn create_delivery(
    conn: &mut PgConnection,
    delivery: &NewDelivery<'_>,
    message_id_domain: &str,
) -> sqlx::Result<Option<Uuid>> {
    let id = Uuid::now_v7();
    let created = sqlx::query(
        "INSERT INTO email_delivery (id, order_id, kind, recipient_email, recipient_name,
                                     send_after, message_id, requested_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(delivery.order_id)
    .bind(delivery.kind)
    .bind(delivery.recipient)
    .bind(delivery.recipient_name)
    .bind(delivery.send_after)
    .bind(format!("<{id}@{message_id_domain}>"))
    .bind(delivery.requested_by)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if created == 0 {
        return Ok(None);
    }
    let carried = match &delivery.codes {
        CodeSelection::None => 0,
        CodeSelection::ActiveOfOrder => sqlx::query(
            "INSERT INTO email_delivery_code (delivery_id, code_id, position)
             SELECT $1, c.id, (row_number() OVER (ORDER BY l.line_index, c.unit_index))::int4
             FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
             WHERE l.order_id = $2 AND c.state = 'issued'",
        )
        .bind(id)
        .bind(delivery.order_id)
        .execute(&mut *conn)
        .await?
        .rows_affected(),
        CodeSelection::These(codes) => {
            let positions: Vec<i32> = (0..codes.len() as i32).collect();
            sqlx::query(
                "INSERT INTO email_delivery_code (delivery_id, code_id, position)
                 SELECT $1, c.id, c.position FROM UNNEST($2::uuid[], $3::int4[]) AS c(id, position)",
            )
            .bind(id)
            .bind(codes)
            .bind(&positions)
            .execute(&mut *conn)
            .await?
            .rows_affected()
        }
    };
    if carried == 0 && !matches!(delivery.codes, CodeSelection::None) {
        // Nothing left to send (an early refund revoked every code).
        sqlx::query("DELETE FROM email_delivery WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        return Ok(None);
    }
    if delivery.requested_by.is_some() {
        // The support action that asked for it writes the audit event.
        return Ok(Some(id));
    }
    audit::record(
        conn,
        AuditEvent {
            actor: audit::WORKER,
            action: "delivery.created",
            subject_type: "delivery",
            subject_id: id.to_string(),
            reason: None,
            data: json!({
                "order": delivery.order_id,
                "kind": delivery.kind,
                "codes": carried,
                "send_after": delivery.send_after,
            }),
        },
    )
    .await?;
    Ok(Some(id))
}

/// Marks an event processed, linked to its order, with its audit event.
pub(crate) async fn mark_processed(
    conn: &mut PgConnection,
    inbox_id: Uuid,
    order_id: Option<Uuid>,
    detail: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE webhook_inbox SET status = 'processed', attempts = attempts + 1, processed_at = now(),
                order_id = COALESCE($2, order_id), error_code = NULL, last_error = NULL
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

/// Issues `count` codes of a product outside checkout, for batch `batch_id`
/// (customer service, partners, test accounts, replacements), in statements
/// of a bounded size. The caller's action writes the audit event. Returns
/// each new code's id and last four symbols.
pub async fn issue_batch_codes(
    conn: &mut PgConnection,
    keys: &CodeKeys,
    product_id: Uuid,
    batch_id: Uuid,
    count: u32,
    replaces: Option<Uuid>,
) -> sqlx::Result<Vec<(Uuid, String)>> {
    let mut issued = Vec::with_capacity(count as usize);
    let mut left = count as usize;
    while left > 0 {
        let n = left.min(500);
        let Minted {
            ids,
            hashes,
            sealed,
            last4,
        } = Minted::new(keys, n);
        sqlx::query(
            "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4, batch_id,
                                          replaces, expires_at)
             SELECT u.id, $1, u.hash, u.sealed, u.last4, $2, $3,
                    now() + make_interval(days => p.validity_days)
             FROM UNNEST($4::uuid[], $5::bytea[], $6::bytea[], $7::text[]) AS u(id, hash, sealed, last4)
             JOIN product p ON p.id = $1",
        )
        .bind(product_id)
        .bind(batch_id)
        .bind(replaces)
        .bind(&ids)
        .bind(&hashes)
        .bind(&sealed)
        .bind(&last4)
        .execute(&mut *conn)
        .await?;
        issued.extend(ids.into_iter().zip(last4));
        left -= n;
    }
    metrics::counter!("entitle_codes_issued_total").increment(u64::from(count));
    Ok(issued)
}
