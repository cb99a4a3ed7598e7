//! Issuance: turns [`Purchase`]s into orders, their lines, one code per unit
//! and the email deliveries that carry them, exactly once however often or
//! concurrently an event is processed.
//!
//! Two paths, one outcome:
//! - [`fulfil_many`]: the ordinary orders of a batch of events, all in one
//!   transaction of a few set-based statements (this is what a sale's
//!   backlog drains through);
//! - [`fulfil`]: one order in three idempotent steps, for partner orders of
//!   thousands of units (codes a bounded batch per transaction, never one
//!   huge transaction) and for events whose order already exists.
//!
//! Refunds and cancellations may arrive before their purchase. Whichever
//! transaction comes second must see the first: both take a transaction
//! lock on the order's keys ([`lock_order_keys`]) before they look.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    adjustment,
    audit::{self, AuditEvent},
    code::{Code, CodeKeys},
    command::Purchase,
    delivery::{self, CodeSelection, NewDelivery},
    error::JobError,
    inbox, platform_event,
};

/// What issuance did for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub order_id: Uuid,
    /// Deliveries created now; empty when another run already created them.
    pub deliveries: Vec<Uuid>,
}

/// Settings issuance needs from the configuration.
#[derive(Debug, Clone)]
pub struct IssueSettings<'a> {
    pub message_id_domain: &'a str,
    pub batch_size: u32,
    pub notify_revocations: bool,
}

/// The product a line was resolved to, and the reference that resolved it
/// (kept on the line, so refunds by line find it).
#[derive(Debug, Clone)]
struct Product {
    id: Uuid,
    reference: String,
}

/// The lock key of one of an order's names in a channel.
pub(crate) fn order_key(channel: &str, key: &str) -> String {
    format!("{channel}\u{1f}{key}")
}

/// The keys refunds may name an order by: its id, and its payment reference.
fn purchase_keys(purchase: &Purchase) -> Vec<String> {
    let mut keys = vec![order_key(&purchase.channel, &purchase.channel_order_id)];
    if let Some(reference) = &purchase.payment_reference {
        keys.push(order_key(&purchase.channel, reference));
    }
    keys
}

/// Takes a transaction lock on each of an order's keys, in a fixed order so
/// two transactions that share keys cannot deadlock. An issuance and an
/// adjustment of the same order run one after the other: the adjustment
/// sees the issued order, or the issuance sees the recorded adjustment.
pub(crate) async fn lock_order_keys(conn: &mut PgConnection, keys: &[String]) -> sqlx::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock(k)
         FROM (SELECT DISTINCT hashtextextended(key, 0) AS k FROM UNNEST($1::text[]) AS key
               ORDER BY k) AS sorted",
    )
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// The product of each line of each purchase, by the first of the line's
/// references the catalogue maps; a purchase with a line nobody mapped gets
/// an `unknown_product` error naming every such line.
async fn resolve_products(
    pool: &PgPool,
    purchases: &[&Purchase],
) -> Result<Vec<Result<Vec<Product>, JobError>>, JobError> {
    let mut channels = Vec::new();
    let mut references = Vec::new();
    for purchase in purchases {
        for line in &purchase.lines {
            for reference in &line.references {
                channels.push(purchase.channel.as_str());
                references.push(reference.as_str());
            }
        }
    }
    let rows = sqlx::query(
        "SELECT cp.channel, cp.reference, p.id
         FROM channel_product cp JOIN product p ON p.id = cp.product_id
         WHERE (cp.channel, cp.reference) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
           AND p.active",
    )
    .bind(&channels)
    .bind(&references)
    .fetch_all(pool)
    .await?;
    let mapped: HashMap<(String, String), Uuid> = rows
        .into_iter()
        .map(|r| ((r.get("channel"), r.get("reference")), r.get("id")))
        .collect();
    Ok(purchases
        .iter()
        .map(|purchase| {
            let mut products = Vec::with_capacity(purchase.lines.len());
            let mut unknown = Vec::new();
            for line in &purchase.lines {
                let found = line.references.iter().find_map(|r| {
                    mapped
                        .get(&(purchase.channel.clone(), r.clone()))
                        .map(|id| Product {
                            id: *id,
                            reference: r.clone(),
                        })
                });
                match found {
                    Some(product) => products.push(product),
                    None => unknown.push(line.references.join(" or ")),
                }
            }
            if unknown.is_empty() {
                Ok(products)
            } else {
                Err(JobError::permanent(
                    "unknown_product",
                    format!(
                        "no product is mapped to {} reference(s) {}",
                        purchase.channel,
                        unknown.join(", ")
                    ),
                ))
            }
        })
        .collect())
}

/// What became of one event of a batch.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Fulfilled here.
    Fulfilled(Issued),
    /// Already finished by another run: nothing to do.
    AlreadyDone,
    /// Its order exists already (a second event for it, or an earlier run
    /// that stopped half way): carry it out with [`fulfil`].
    NeedsSinglePath,
    /// It cannot be fulfilled as it is.
    Failed(JobError),
}

/// New codes in the columns they are stored as (id, keyed hash, sealed copy,
/// last four symbols), ready to bind as arrays. The plain codes go no further.
#[derive(Default)]
struct Minted {
    ids: Vec<Uuid>,
    hashes: Vec<Vec<u8>>,
    sealed: Vec<Vec<u8>>,
    last4: Vec<String>,
}

impl Minted {
    fn with_capacity(n: usize) -> Self {
        Minted {
            ids: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            sealed: Vec::with_capacity(n),
            last4: Vec::with_capacity(n),
        }
    }

    fn mint(&mut self, keys: &CodeKeys) -> Uuid {
        let code = Code::generate();
        let id = Uuid::now_v7();
        self.ids.push(id);
        self.hashes.push(keys.hash(&code));
        self.sealed.push(keys.seal(&code));
        self.last4.push(code.last4().to_owned());
        id
    }

    fn new(keys: &CodeKeys, n: usize) -> Self {
        let mut minted = Self::with_capacity(n);
        for _ in 0..n {
            minted.mint(keys);
        }
        minted
    }
}

/// The columns of new deliveries and of the codes they carry.
#[derive(Default)]
struct NewDeliveries {
    ids: Vec<Uuid>,
    orders: Vec<Uuid>,
    kinds: Vec<&'static str>,
    recipients: Vec<String>,
    names: Vec<Option<String>>,
    send_after: Vec<DateTime<Utc>>,
    message_ids: Vec<String>,
    code_delivery: Vec<Uuid>,
    code_ids: Vec<Uuid>,
    positions: Vec<i32>,
}

impl NewDeliveries {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        domain: &str,
        order: Uuid,
        kind: &'static str,
        recipient: &str,
        name: Option<&str>,
        send_after: DateTime<Utc>,
        codes: &[Uuid],
    ) {
        let id = Uuid::now_v7();
        self.ids.push(id);
        self.orders.push(order);
        self.kinds.push(kind);
        self.recipients.push(recipient.to_owned());
        self.names.push(name.map(str::to_owned));
        self.send_after.push(send_after);
        self.message_ids.push(delivery::message_id(id, domain));
        for (position, code) in codes.iter().enumerate() {
            self.code_delivery.push(id);
            self.code_ids.push(*code);
            self.positions.push(position as i32 + 1);
        }
    }
}

/// Fulfils the purchases of a batch of events (`inbox id`, purchase), each
/// of at most `settings.batch_size` units, in one transaction. The caller
/// holds the events' leases. An error is the whole batch's: a transient one
/// means try again; a permanent one means some event's data was refused,
/// and each should be tried alone to find which.
pub async fn fulfil_many(
    pool: &PgPool,
    keys: &CodeKeys,
    settings: &IssueSettings<'_>,
    events: &[(Uuid, &Purchase)],
) -> Result<Vec<(Uuid, BatchOutcome)>, JobError> {
    let purchases: Vec<&Purchase> = events.iter().map(|(_, p)| *p).collect();
    let resolved = resolve_products(pool, &purchases).await?;
    let mut outcomes = Vec::with_capacity(events.len());
    // Events to fulfil here: the first event of each order in the batch.
    let mut batch: Vec<(Uuid, &Purchase, Vec<Product>)> = Vec::new();
    let mut orders_seen = HashSet::new();
    for ((inbox_id, purchase), products) in events.iter().zip(resolved) {
        match products {
            Err(e) => outcomes.push((*inbox_id, BatchOutcome::Failed(e))),
            Ok(_) if !orders_seen.insert((&purchase.channel, &purchase.channel_order_id)) => {
                outcomes.push((*inbox_id, BatchOutcome::NeedsSinglePath))
            }
            Ok(products) => batch.push((*inbox_id, purchase, products)),
        }
    }
    if batch.is_empty() {
        return Ok(outcomes);
    }

    let mut tx = pool.begin().await?;
    let ids: Vec<Uuid> = batch.iter().map(|(id, _, _)| *id).collect();
    let pending: HashSet<Uuid> = inbox::lock_pending_many(&mut tx, &ids)
        .await?
        .into_iter()
        .collect();
    batch.retain(|(id, _, _)| {
        let keep = pending.contains(id);
        if !keep {
            outcomes.push((*id, BatchOutcome::AlreadyDone));
        }
        keep
    });
    let lock_keys: Vec<String> = batch
        .iter()
        .flat_map(|(_, p, _)| purchase_keys(p))
        .collect();
    lock_order_keys(&mut tx, &lock_keys).await?;

    // The orders; one that exists already goes the single path.
    let order_ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
    let created: Vec<Uuid> = {
        let col = |f: fn(&Purchase) -> Option<String>| -> Vec<Option<String>> {
            batch.iter().map(|(_, p, _)| f(p)).collect()
        };
        let gifts: Vec<Option<&crate::command::Gift>> =
            batch.iter().map(|(_, p, _)| p.gift.as_ref()).collect();
        sqlx::query_scalar(
            "INSERT INTO orders (id, channel, channel_order_id, payment_reference, buyer_email,
                                 buyer_name, account_id, gift_recipient_email, gift_recipient_name,
                                 gift_message, gift_send_at, currency, amount_total, paid_at, issued_at)
             SELECT u.id, u.channel, u.channel_order_id, u.payment_reference, u.buyer_email,
                    u.buyer_name, u.account_id, u.gift_recipient_email, u.gift_recipient_name,
                    u.gift_message, u.gift_send_at, u.currency, u.amount_total,
                    COALESCE(u.paid_at, now()), now()
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[],
                         $12::text[], $13::int8[], $14::timestamptz[])
                  AS u(id, channel, channel_order_id, payment_reference, buyer_email, buyer_name,
                       account_id, gift_recipient_email, gift_recipient_name, gift_message,
                       gift_send_at, currency, amount_total, paid_at)
             ON CONFLICT (channel, channel_order_id) DO NOTHING
             RETURNING id",
        )
        .bind(&order_ids)
        .bind(col(|p| Some(p.channel.clone())))
        .bind(col(|p| Some(p.channel_order_id.clone())))
        .bind(col(|p| p.payment_reference.clone()))
        .bind(col(|p| Some(p.buyer_email.clone())))
        .bind(col(|p| p.buyer_name.clone()))
        .bind(col(|p| p.account_id.clone()))
        .bind(
            gifts
                .iter()
                .map(|g| g.map(|g| g.recipient_email.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(
            gifts
                .iter()
                .map(|g| g.and_then(|g| g.recipient_name.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(
            gifts
                .iter()
                .map(|g| g.and_then(|g| g.message.clone()))
                .collect::<Vec<_>>(),
        )
        .bind(
            gifts
                .iter()
                .map(|g| g.and_then(|g| g.send_at))
                .collect::<Vec<_>>(),
        )
        .bind(col(|p| p.currency.clone()))
        .bind(
            batch
                .iter()
                .map(|(_, p, _)| p.amount_total)
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|(_, p, _)| p.paid_at)
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await?
    };
    let created: HashSet<Uuid> = created.into_iter().collect();
    let mut fresh = Vec::with_capacity(batch.len());
    for ((inbox_id, purchase, products), order_id) in batch.into_iter().zip(order_ids) {
        if created.contains(&order_id) {
            fresh.push((inbox_id, purchase, products, order_id));
        } else {
            outcomes.push((inbox_id, BatchOutcome::NeedsSinglePath));
        }
    }

    // Lines and one code per unit.
    let mut line_ids = Vec::new();
    let mut line_orders = Vec::new();
    let mut line_index = Vec::new();
    let mut line_reference = Vec::new();
    let mut line_product = Vec::new();
    let mut line_quantity = Vec::new();
    let mut line_unit_amount = Vec::new();
    let mut line_amount = Vec::new();
    let units: usize = fresh
        .iter()
        .flat_map(|(_, p, _, _)| p.lines.iter().map(|l| l.quantity as usize))
        .sum();
    let mut minted = Minted::with_capacity(units);
    let mut code_product = Vec::with_capacity(units);
    let mut code_line = Vec::with_capacity(units);
    let mut code_unit = Vec::with_capacity(units);
    let mut codes_of_order: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (_, purchase, products, order_id) in &fresh {
        for (index, (line, product)) in purchase.lines.iter().zip(products).enumerate() {
            let line_id = Uuid::now_v7();
            line_ids.push(line_id);
            line_orders.push(*order_id);
            line_index.push(index as i32);
            line_reference.push(product.reference.clone());
            line_product.push(product.id);
            line_quantity.push(line.quantity as i32);
            line_unit_amount.push(line.unit_amount);
            line_amount.push(line.amount_total);
            for unit in 0..line.quantity as i32 {
                let code = minted.mint(keys);
                code_product.push(product.id);
                code_line.push(line_id);
                code_unit.push(unit);
                codes_of_order.entry(*order_id).or_default().push(code);
            }
        }
    }
    sqlx::query(
        "INSERT INTO order_line (id, order_id, line_index, channel_reference, product_id,
                                 quantity, unit_amount, amount_total)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::uuid[],
                              $6::int4[], $7::int8[], $8::int8[])",
    )
    .bind(&line_ids)
    .bind(&line_orders)
    .bind(&line_index)
    .bind(&line_reference)
    .bind(&line_product)
    .bind(&line_quantity)
    .bind(&line_unit_amount)
    .bind(&line_amount)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4,
                                      order_line_id, unit_index, expires_at)
         SELECT u.id, u.product_id, u.hash, u.sealed, u.last4, u.line_id, u.unit,
                now() + make_interval(days => p.validity_days)
         FROM UNNEST($1::uuid[], $2::uuid[], $3::bytea[], $4::bytea[], $5::text[], $6::uuid[],
                     $7::int4[]) AS u(id, product_id, hash, sealed, last4, line_id, unit)
         JOIN product p ON p.id = u.product_id",
    )
    .bind(&minted.ids)
    .bind(&code_product)
    .bind(&minted.hashes)
    .bind(&minted.sealed)
    .bind(&minted.last4)
    .bind(&code_line)
    .bind(&code_unit)
    .execute(&mut *tx)
    .await?;

    // Refunds or cancellations that arrived before their purchase.
    let all_keys: Vec<String> = fresh
        .iter()
        .flat_map(|(_, p, _, _)| purchase_keys(p))
        .collect();
    let adjusted: HashSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT channel || chr(31) || order_key FROM order_adjustment
         WHERE applied_at IS NULL AND channel || chr(31) || order_key = ANY($1)",
    )
    .bind(&all_keys)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();

    let now = Utc::now();
    let mut deliveries = NewDeliveries::default();
    let mut issued: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (_, purchase, _, order_id) in &fresh {
        if purchase_keys(purchase).iter().any(|k| adjusted.contains(k)) {
            // Rare: take the refunds back first, then send what is left.
            let created = adjust_then_deliver(&mut tx, settings, *order_id, purchase, now).await?;
            issued.insert(*order_id, created);
            continue;
        }
        let codes = codes_of_order.remove(order_id).unwrap_or_default();
        let domain = settings.message_id_domain;
        let first = deliveries.ids.len();
        match &purchase.gift {
            Some(gift) => {
                let send_at = gift.send_at.map_or(now, |t| t.max(now));
                deliveries.add(
                    domain,
                    *order_id,
                    "gift_codes",
                    &gift.recipient_email,
                    gift.recipient_name.as_deref(),
                    send_at,
                    &codes,
                );
                deliveries.add(
                    domain,
                    *order_id,
                    "gift_receipt",
                    &purchase.buyer_email,
                    purchase.buyer_name.as_deref(),
                    now,
                    &[],
                );
            }
            None => deliveries.add(
                domain,
                *order_id,
                "order_codes",
                &purchase.buyer_email,
                purchase.buyer_name.as_deref(),
                now,
                &codes,
            ),
        }
        issued.insert(*order_id, deliveries.ids[first..].to_vec());
    }
    sqlx::query(
        "INSERT INTO email_delivery (id, order_id, kind, recipient_email, recipient_name,
                                     send_after, due_at, message_id)
         SELECT u.id, u.order_id, u.kind, u.recipient, u.name, u.send_after, u.send_after, u.message_id
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                     $6::timestamptz[], $7::text[])
              AS u(id, order_id, kind, recipient, name, send_after, message_id)",
    )
    .bind(&deliveries.ids)
    .bind(&deliveries.orders)
    .bind(&deliveries.kinds)
    .bind(&deliveries.recipients)
    .bind(&deliveries.names)
    .bind(&deliveries.send_after)
    .bind(&deliveries.message_ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO email_delivery_code (delivery_id, code_id, position)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[])",
    )
    .bind(&deliveries.code_delivery)
    .bind(&deliveries.code_ids)
    .bind(&deliveries.positions)
    .execute(&mut *tx)
    .await?;

    // The history: each order, each code, each delivery, each event.
    let order_events: Vec<(String, serde_json::Value)> = fresh
        .iter()
        .map(|(inbox_id, purchase, _, order_id)| {
            (
                order_id.to_string(),
                json!({
                    "channel": purchase.channel,
                    "channel_order_id": purchase.channel_order_id,
                    "inbox_event": inbox_id,
                    "lines": purchase.lines.len(),
                    "units": purchase.lines.iter().map(|l| u64::from(l.quantity)).sum::<u64>(),
                    "gift": purchase.gift.is_some(),
                }),
            )
        })
        .collect();
    audit::record_many(
        &mut tx,
        audit::WORKER,
        "order.created",
        "order",
        &order_events,
    )
    .await?;
    let code_events: Vec<(String, serde_json::Value)> = minted
        .ids
        .iter()
        .zip(&code_line)
        .zip(&code_unit)
        .zip(&minted.last4)
        .map(|(((id, line), unit), last4)| {
            (
                id.to_string(),
                json!({ "order_line": line, "unit_index": unit, "last4": last4, "state": "issued" }),
            )
        })
        .collect();
    audit::record_many(&mut tx, audit::WORKER, "code.issued", "code", &code_events).await?;
    let mut carried: HashMap<Uuid, usize> = HashMap::new();
    for id in &deliveries.code_delivery {
        *carried.entry(*id).or_default() += 1;
    }
    let delivery_events: Vec<(String, serde_json::Value)> = deliveries
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.to_string(),
                json!({
                    "order": deliveries.orders[i],
                    "kind": deliveries.kinds[i],
                    "codes": carried.get(id).copied().unwrap_or(0),
                    "send_after": deliveries.send_after[i],
                }),
            )
        })
        .collect();
    audit::record_many(
        &mut tx,
        audit::WORKER,
        "delivery.created",
        "delivery",
        &delivery_events,
    )
    .await?;
    let processed: Vec<(Uuid, Option<Uuid>)> = fresh
        .iter()
        .map(|(inbox_id, _, _, order_id)| (*inbox_id, Some(*order_id)))
        .collect();
    let fulfilled: Vec<Uuid> = fresh.iter().map(|(_, _, _, order_id)| *order_id).collect();
    platform_event::record_fulfilled(&mut tx, &fulfilled).await?;
    inbox::mark_processed_many(&mut tx, &processed, "order fulfilled").await?;
    tx.commit().await?;

    metrics::counter!("entitle_orders_fulfilled_total").increment(fresh.len() as u64);
    metrics::counter!("entitle_codes_issued_total").increment(minted.ids.len() as u64);
    for (inbox_id, _, _, order_id) in fresh {
        outcomes.push((
            inbox_id,
            BatchOutcome::Fulfilled(Issued {
                order_id,
                deliveries: issued.remove(&order_id).unwrap_or_default(),
            }),
        ));
    }
    Ok(outcomes)
}

/// An order of the batch whose refund or cancellation came first: applies
/// it (revoking the codes it covers), then creates the deliveries of what
/// is left, the slow way.
async fn adjust_then_deliver(
    conn: &mut PgConnection,
    settings: &IssueSettings<'_>,
    order_id: Uuid,
    purchase: &Purchase,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, JobError> {
    let mut created = adjustment::apply_pending(conn, settings, order_id).await?;
    created.extend(initial_deliveries(conn, settings, order_id, purchase, now).await?);
    Ok(created)
}

/// The first deliveries of an issued order: the codes to the buyer, or to
/// the gift's recipient (on its date) with a receipt to the buyer. Each is
/// created once, whichever run gets there.
async fn initial_deliveries(
    conn: &mut PgConnection,
    settings: &IssueSettings<'_>,
    order_id: Uuid,
    purchase: &Purchase,
    now: DateTime<Utc>,
) -> sqlx::Result<Vec<Uuid>> {
    let domain = settings.message_id_domain;
    let mut wanted = Vec::new();
    match &purchase.gift {
        Some(gift) => {
            wanted.push(NewDelivery {
                order_id: Some(order_id),
                kind: "gift_codes",
                recipient: &gift.recipient_email,
                recipient_name: gift.recipient_name.as_deref(),
                send_after: gift.send_at.map_or(now, |t| t.max(now)),
                codes: CodeSelection::ActiveOfOrder,
                requested_by: None,
            });
            wanted.push(NewDelivery {
                order_id: Some(order_id),
                kind: "gift_receipt",
                recipient: &purchase.buyer_email,
                recipient_name: purchase.buyer_name.as_deref(),
                send_after: now,
                codes: CodeSelection::None,
                requested_by: None,
            });
        }
        None => wanted.push(NewDelivery {
            order_id: Some(order_id),
            kind: "order_codes",
            recipient: &purchase.buyer_email,
            recipient_name: purchase.buyer_name.as_deref(),
            send_after: now,
            codes: CodeSelection::ActiveOfOrder,
            requested_by: None,
        }),
    }
    let mut created = Vec::new();
    for delivery in &wanted {
        if let Some(id) = delivery::create(conn, delivery, domain).await? {
            created.push(id);
        }
    }
    Ok(created)
}

/// Fulfils the purchase carried by inbox event `inbox_id`, exactly once, in
/// bounded steps (see the module's documentation).
///
/// Returns `None` when the event was already finished by another run.
pub async fn fulfil(
    pool: &PgPool,
    keys: &CodeKeys,
    settings: &IssueSettings<'_>,
    inbox_id: Uuid,
    purchase: &Purchase,
) -> Result<Option<Issued>, JobError> {
    let products = resolve_products(pool, &[purchase])
        .await?
        .pop()
        .expect("one purchase, one answer")?;
    let Some(order_id) = create_order(pool, inbox_id, purchase, &products).await? else {
        return Ok(None);
    };
    issue_missing_codes(pool, keys, order_id, settings.batch_size).await?;
    finish(pool, settings, inbox_id, order_id, purchase).await
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
    if !inbox::lock_pending(&mut tx, inbox_id).await? {
        return Ok(None);
    }
    lock_order_keys(&mut tx, &purchase_keys(purchase)).await?;
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
            let units: u64 = purchase.lines.iter().map(|l| u64::from(l.quantity)).sum();
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
    purchase: &Purchase,
) -> Result<Option<Issued>, JobError> {
    let mut tx = pool.begin().await?;
    if !inbox::lock_pending(&mut tx, inbox_id).await? {
        return Ok(None);
    }
    lock_order_keys(&mut tx, &purchase_keys(purchase)).await?;
    let issued: bool =
        sqlx::query_scalar("SELECT issued_at IS NOT NULL FROM orders WHERE id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_one(&mut *tx)
            .await?;
    let mut deliveries = Vec::new();
    if !issued {
        sqlx::query("UPDATE orders SET issued_at = now() WHERE id = $1")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        deliveries = adjust_then_deliver(&mut tx, settings, order_id, purchase, Utc::now()).await?;
        platform_event::record_fulfilled(&mut tx, &[order_id]).await?;
    }
    inbox::mark_processed(&mut tx, inbox_id, Some(order_id), "order fulfilled").await?;
    tx.commit().await?;
    if !issued {
        metrics::counter!("entitle_orders_fulfilled_total").increment(1);
        tracing::info!(%order_id, %inbox_id, deliveries = deliveries.len(), "order fulfilled");
    }
    Ok(Some(Issued {
        order_id,
        deliveries,
    }))
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
