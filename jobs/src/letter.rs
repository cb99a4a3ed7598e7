//! Letters: what each claimed delivery says, rendered from its codes (opened
//! only here, and never logged) and its order. A whole batch is loaded in
//! three queries, however many deliveries it holds.

use std::collections::HashMap;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::{
    code::CodeKeys,
    delivery::Claimed,
    email::{Attachment, CodeLine, Letter, Mailer},
};

/// What a claimed delivery turned into.
#[derive(Debug)]
pub enum Rendered {
    /// Ready to send.
    Letter(Box<Letter>),
    /// Nothing to send: every code it carried is no longer usable.
    Nothing(String),
    /// It can never be sent as it is (a stable code and why).
    Refused(&'static str, String),
}

/// One code of a delivery, as stored.
#[derive(Clone)]
struct StoredCode {
    sealed: Vec<u8>,
    last4: String,
    expires_at: DateTime<Utc>,
    state: String,
    product: String,
    family: String,
}

/// The order a delivery belongs to, as its letter needs it.
struct OrderFacts {
    buyer_name: Option<String>,
    gift_message: Option<String>,
    gift_recipient_email: Option<String>,
    gift_recipient_name: Option<String>,
    gift_send_at: Option<DateTime<Utc>>,
    family: Option<String>,
}

/// Whether a kind of delivery lists codes that are no longer usable (a
/// revocation notice says which codes stopped working); every other kind
/// sends only codes still `issued` when it is sent.
fn lists_dead_codes(kind: &str) -> bool {
    kind == "revocation"
}

/// Renders every claimed delivery of a batch. Fails only when the database
/// does; a delivery that cannot be rendered comes back `Refused`.
pub async fn render_all(
    pool: &PgPool,
    keys: &CodeKeys,
    mailer: &Mailer,
    bulk_threshold: usize,
    claimed: &[Claimed],
) -> anyhow::Result<Vec<Rendered>> {
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    // Two lookups by primary key rather than one join: a join lets the
    // planner scan every code when its statistics are stale (a new table, or
    // autovacuum off), and a batch's letter would wait on it.
    let carried: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT delivery_id, code_id FROM email_delivery_code
         WHERE delivery_id = ANY($1) ORDER BY delivery_id, position",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .context("Failed to load the deliveries' codes")?;
    let code_ids: Vec<Uuid> = carried.iter().map(|(_, code)| *code).collect();
    let rows = sqlx::query(
        "SELECT c.id, c.code_sealed, c.last4, c.expires_at, c.state, p.name, p.email_template
         FROM activation_code c JOIN product p ON p.id = c.product_id
         WHERE c.id = ANY($1)",
    )
    .bind(&code_ids)
    .fetch_all(pool)
    .await
    .context("Failed to load the deliveries' codes")?;
    let stored: HashMap<Uuid, StoredCode> = rows
        .into_iter()
        .map(|row| {
            (
                row.get("id"),
                StoredCode {
                    sealed: row.get("code_sealed"),
                    last4: row.get("last4"),
                    expires_at: row.get("expires_at"),
                    state: row.get("state"),
                    product: row.get("name"),
                    family: row.get("email_template"),
                },
            )
        })
        .collect();
    let mut codes: HashMap<Uuid, Vec<StoredCode>> = HashMap::new();
    // Two deliveries of one batch may carry the same code (a resend beside
    // its original): each gets it.
    for (delivery, code) in carried {
        if let Some(code) = stored.get(&code).cloned() {
            codes.entry(delivery).or_default().push(code);
        }
    }
    let order_ids: Vec<Uuid> = claimed.iter().filter_map(|c| c.order_id).collect();
    let rows = sqlx::query(
        "SELECT o.id, o.buyer_name, o.gift_message, o.gift_recipient_email, o.gift_recipient_name,
                o.gift_send_at,
                (SELECT p.email_template FROM order_line l JOIN product p ON p.id = l.product_id
                 WHERE l.order_id = o.id ORDER BY l.line_index LIMIT 1) AS family
         FROM orders o WHERE o.id = ANY($1)",
    )
    .bind(&order_ids)
    .fetch_all(pool)
    .await
    .context("Failed to load the deliveries' orders")?;
    let orders: HashMap<Uuid, OrderFacts> = rows
        .into_iter()
        .map(|r| {
            (
                r.get("id"),
                OrderFacts {
                    buyer_name: r.get("buyer_name"),
                    gift_message: r.get("gift_message"),
                    gift_recipient_email: r.get("gift_recipient_email"),
                    gift_recipient_name: r.get("gift_recipient_name"),
                    gift_send_at: r.get("gift_send_at"),
                    family: r.get("family"),
                },
            )
        })
        .collect();
    // Receipts say how many codes the gift holds.
    let receipt_orders: Vec<Uuid> = claimed
        .iter()
        .filter(|c| c.kind == "gift_receipt")
        .filter_map(|c| c.order_id)
        .collect();
    let active: HashMap<Uuid, i64> = if receipt_orders.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as(
            "SELECT l.order_id, count(*) FROM order_line l
             JOIN activation_code c ON c.order_line_id = l.id
             WHERE l.order_id = ANY($1) AND c.state = 'issued'
               AND c.order_line_id = ANY(ARRAY(SELECT id FROM order_line WHERE order_id = ANY($1)))
             GROUP BY l.order_id",
        )
        .bind(&receipt_orders)
        .fetch_all(pool)
        .await
        .context("Failed to count the gifts' codes")?
        .into_iter()
        .collect()
    };
    Ok(claimed
        .iter()
        .map(|delivery| {
            let stored = codes.remove(&delivery.id).unwrap_or_default();
            let order = delivery.order_id.and_then(|id| orders.get(&id));
            let code_count = delivery
                .order_id
                .and_then(|id| active.get(&id).copied())
                .unwrap_or(0);
            render(
                keys,
                mailer,
                bulk_threshold,
                delivery,
                stored,
                order,
                code_count,
            )
        })
        .collect())
}

fn render(
    keys: &CodeKeys,
    mailer: &Mailer,
    bulk_threshold: usize,
    delivery: &Claimed,
    stored: Vec<StoredCode>,
    order: Option<&OrderFacts>,
    code_count: i64,
) -> Rendered {
    let to = match delivery.recipient_email.parse() {
        Ok(address) => lettre::message::Mailbox::new(delivery.recipient_name.clone(), address),
        Err(e) => {
            return Rendered::Refused(
                "recipient_invalid",
                format!(
                    "recipient address {:?} is not valid: {e}",
                    delivery.recipient_email
                ),
            );
        }
    };
    let carried = stored.len();
    let mut family = order
        .and_then(|o| o.family.clone())
        .unwrap_or_else(|| "default".to_owned());
    let mut codes = Vec::with_capacity(carried);
    for code in stored {
        if !lists_dead_codes(&delivery.kind) && code.state != "issued" {
            continue;
        }
        let display = match keys.unseal(&code.sealed) {
            Ok(plain) => plain.display(),
            Err(e) => return Rendered::Refused("code_unsealable", e.to_string()),
        };
        family = code.family;
        codes.push(CodeLine {
            display,
            last4: code.last4,
            product: code.product,
            expires_on: code.expires_at.format("%Y-%m-%d").to_string(),
        });
    }
    if carried > 0 && codes.is_empty() {
        return Rendered::Nothing(format!(
            "none of its {carried} code(s) is usable any more (revoked, expired or redeemed)"
        ));
    }
    let (template, attachment) = match delivery.kind.as_str() {
        "gift_receipt" => ("receipt", None),
        "revocation" => ("revoked", None),
        "expiry_reminder" => ("reminder", None),
        _ if codes.len() > bulk_threshold => ("bulk", Some(csv(&codes))),
        "gift_codes" => ("gift", None),
        _ => ("codes", None),
    };
    let text = |pick: fn(&OrderFacts) -> &Option<String>| order.and_then(|o| pick(o).clone());
    let send_at = order.and_then(|o| o.gift_send_at);
    let context = minijinja::context! {
        codes => codes,
        buyer_name => text(|o| &o.buyer_name),
        message => text(|o| &o.gift_message),
        gift_recipient_email => text(|o| &o.gift_recipient_email),
        gift_recipient_name => text(|o| &o.gift_recipient_name),
        code_count => code_count,
        sent => send_at.is_none_or(|t| t <= Utc::now()),
        send_on => send_at.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
    };
    match mailer.letter(
        &family,
        template,
        to,
        &delivery.message_id,
        context,
        attachment,
    ) {
        Ok(letter) => Rendered::Letter(Box::new(letter)),
        Err(e) => Rendered::Refused("template_failed", format!("{e:#}")),
    }
}

/// The codes as a CSV file: one row per code. Product names come from the
/// catalogue and may hold commas, quotes or a leading `=`: the shared sheet
/// quotes and neutralises them.
fn csv(codes: &[CodeLine]) -> Attachment {
    let mut sheet = crate::csv_cells::Sheet::new();
    sheet.row(["code", "product", "valid_until"]);
    for code in codes {
        sheet.row([&code.display, &code.product, &code.expires_on]);
    }
    Attachment {
        filename: "activation-codes.csv".to_owned(),
        content_type: "text/csv; charset=utf-8",
        body: sheet.into_bytes(),
    }
}
