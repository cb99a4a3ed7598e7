//! Shopify: `X-Shopify-Hmac-Sha256` verification (base64 HMAC-SHA256 of the
//! raw body), events named by `X-Shopify-Webhook-Id` and `X-Shopify-Topic`,
//! and the mapping of `orders/paid`, `orders/cancelled` and `refunds/create`.
//!
//! Shopify signs the body but not the topic, so a body is carried out only
//! when it says what its topic says: a captured `orders/paid` body posted
//! again under `orders/cancelled` must not revoke a paid order's codes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{
    Envelope, Headers, Screened, SignatureError, Unusable, any_matches, base64_decode,
    base64_encode,
};
use crate::command::{
    AdjustedLine, Adjustment, AdjustmentScope, Command, Purchase, PurchaseLine, gift_from_pairs,
};

/// Entitle's name for this channel.
pub const CHANNEL: &str = "shopify";

/// The catalogue reference of a Shopify variant.
pub fn variant_reference(variant_id: &str) -> String {
    format!("variant:{variant_id}")
}

/// The catalogue reference of a Shopify SKU.
pub fn sku_reference(sku: &str) -> String {
    format!("sku:{sku}")
}

/// Verifies `X-Shopify-Hmac-Sha256` against every configured secret (the
/// current and, during rotation, the previous one). Shopify signs only the
/// body, so an event older than `max_age` by its `X-Shopify-Triggered-At`
/// (past Shopify's own retry window) is refused as stale.
pub fn verify(
    headers: &dyn Headers,
    body: &[u8],
    secrets: &[SecretString],
    max_age: Duration,
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NotConfigured);
    }
    let signature = headers
        .header("x-shopify-hmac-sha256")
        .ok_or(SignatureError::Missing)?;
    let signature = base64_decode(signature).ok_or(SignatureError::Malformed)?;
    let keys: Vec<Vec<u8>> = secrets
        .iter()
        .map(|s| s.expose_secret().as_bytes().to_vec())
        .collect();
    if !any_matches(&keys, &[body], &[signature]) {
        return Err(SignatureError::Mismatch);
    }
    if let Some(triggered) = headers.header("x-shopify-triggered-at") {
        let triggered = DateTime::parse_from_rfc3339(triggered)
            .map_err(|_| SignatureError::Malformed)?
            .with_timezone(&Utc);
        if (now - triggered).num_seconds() > max_age.as_secs() as i64 {
            return Err(SignatureError::Stale);
        }
    }
    Ok(())
}

/// The `X-Shopify-Hmac-Sha256` value Shopify would send for a body.
pub fn sign(body: &[u8], secret: &str) -> String {
    base64_encode(
        &super::hmac_sha256(secret.as_bytes(), &[body])
            .finalize()
            .into_bytes(),
    )
}

/// Names an event by its webhook id (what Shopify's retries share) and topic.
pub fn envelope(headers: &dyn Headers) -> Result<Envelope, String> {
    let event_id = headers
        .header("x-shopify-webhook-id")
        .filter(|v| !v.is_empty())
        .ok_or("X-Shopify-Webhook-Id is missing")?;
    let topic = headers
        .header("x-shopify-topic")
        .filter(|v| !v.is_empty())
        .ok_or("X-Shopify-Topic is missing")?;
    Envelope::checked(event_id, topic)
}

/// What intake makes of an authentic Shopify event: it is read now, as the
/// worker will read it, so one that can never be carried out (unnamed, not
/// JSON, a body that contradicts its topic) is filed failed at once and
/// answered 2xx; Shopify would otherwise retry it for hours, then drop the
/// subscription.
pub fn screen(headers: &dyn Headers, body: &[u8]) -> Screened {
    let envelope = match envelope(headers) {
        Ok(envelope) => envelope,
        Err(problem) => {
            return Screened::Unusable {
                envelope: Envelope::unreadable(body),
                why: Unusable::malformed(problem),
            };
        }
    };
    match super::json_text(body).and_then(|text| interpret(&envelope.event_type, text)) {
        Ok(_) => Screened::Usable(envelope),
        Err(why) => Screened::Unusable { envelope, why },
    }
}

#[derive(Debug, Deserialize)]
struct NameValue {
    name: String,
    #[serde(deserialize_with = "text_or_number")]
    value: String,
}

/// Shopify sends ids as numbers and some values as numbers or text.
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(match value {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

fn opt_text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.is_empty() => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    })
}

#[derive(Debug, Deserialize)]
struct Order {
    #[serde(deserialize_with = "text_or_number")]
    id: String,
    financial_status: Option<String>,
    cancelled_at: Option<String>,
    email: Option<String>,
    contact_email: Option<String>,
    customer: Option<Customer>,
    #[serde(default)]
    line_items: Vec<LineItem>,
    #[serde(default)]
    note_attributes: Vec<NameValue>,
    total_price: Option<String>,
    currency: Option<String>,
    processed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
struct Customer {
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LineItem {
    #[serde(default, deserialize_with = "opt_text_or_number")]
    variant_id: Option<String>,
    #[serde(default, deserialize_with = "opt_text_or_number")]
    sku: Option<String>,
    quantity: u32,
    price: Option<String>,
    #[serde(default)]
    properties: Vec<NameValue>,
}

#[derive(Debug, Deserialize)]
struct Refund {
    #[serde(deserialize_with = "text_or_number")]
    id: String,
    #[serde(deserialize_with = "text_or_number")]
    order_id: String,
    #[serde(default)]
    refund_line_items: Vec<RefundLineItem>,
}

#[derive(Debug, Deserialize)]
struct RefundLineItem {
    quantity: u32,
    line_item: LineItem,
}

/// Money as Shopify writes it ("19.99") in minor units.
pub(crate) fn minor_units(amount: Option<&str>) -> Option<i64> {
    let amount = amount?.trim();
    let (whole, fraction) = amount.split_once('.').unwrap_or((amount, "0"));
    let fraction = format!("{fraction:0<2}");
    Some(whole.parse::<i64>().ok()? * 100 + fraction.get(..2)?.parse::<i64>().ok()?)
}

fn references(line: &LineItem) -> Vec<String> {
    line.variant_id
        .iter()
        .map(|v| variant_reference(v))
        .chain(line.sku.iter().map(|s| sku_reference(s)))
        .collect()
}

fn malformed(e: impl std::fmt::Display) -> Unusable {
    Unusable::malformed(e.to_string())
}

/// What `orders/paid` fulfils: an order paid in full, possibly partly
/// refunded since (its refunds revoke their units; reconciliation fulfils
/// such orders too). `partially_paid` is not paid in full, `refunded` has
/// nothing paid left, `pending`, `authorized`, `voided` and `expired` were
/// never paid.
const PAID: [&str; 2] = ["paid", "partially_refunded"];

fn topic_mismatch(topic: &str, detail: String) -> Unusable {
    Unusable {
        code: "topic_mismatch",
        detail: format!("{topic} refused: {detail} (a body signed for another topic?)"),
    }
}

/// Turns a stored Shopify event into a command.
pub fn interpret(topic: &str, body: &str) -> Result<Command, Unusable> {
    match topic {
        "orders/paid" => {
            let order: Order = serde_json::from_str(body).map_err(malformed)?;
            let status = order.financial_status.as_deref().unwrap_or("");
            if !PAID.contains(&status) {
                return Err(topic_mismatch(
                    topic,
                    format!(
                        "order {} has financial_status {status:?}, not paid or partially_refunded",
                        order.id
                    ),
                ));
            }
            if let Some(at) = &order.cancelled_at {
                return Err(topic_mismatch(
                    topic,
                    format!("order {} was cancelled at {at}", order.id),
                ));
            }
            purchase(order).map(|p| Command::Purchase(Box::new(p)))
        }
        "orders/cancelled" => {
            let order: Order = serde_json::from_str(body).map_err(malformed)?;
            if order
                .cancelled_at
                .as_deref()
                .is_none_or(|at| at.trim().is_empty())
            {
                return Err(topic_mismatch(
                    topic,
                    format!("order {} has no cancelled_at", order.id),
                ));
            }
            Ok(Command::Cancellation(Adjustment {
                channel: CHANNEL.to_owned(),
                adjustment_key: format!("order:{}:cancelled", order.id),
                order_key: order.id,
                scope: AdjustmentScope::Full,
            }))
        }
        "refunds/create" => {
            let refund: Refund = serde_json::from_str(body).map_err(malformed)?;
            if refund.refund_line_items.is_empty() {
                // Shipping or goodwill money: no unit was taken back.
                return Ok(Command::Acknowledge {
                    why: format!("refund {} returns no line items", refund.id),
                });
            }
            Ok(Command::Refund(Adjustment {
                channel: CHANNEL.to_owned(),
                order_key: refund.order_id,
                adjustment_key: format!("refund:{}", refund.id),
                scope: AdjustmentScope::Lines {
                    lines: refund
                        .refund_line_items
                        .iter()
                        .map(|r| AdjustedLine {
                            references: references(&r.line_item),
                            quantity: r.quantity,
                        })
                        .collect(),
                },
            }))
        }
        other => Ok(Command::Acknowledge {
            why: format!("topic {other} needs no action"),
        }),
    }
}

fn purchase(order: Order) -> Result<Purchase, Unusable> {
    let customer = order.customer.as_ref();
    let buyer_email = order
        .email
        .clone()
        .filter(|e| !e.is_empty())
        .or(order.contact_email.clone())
        .or(customer.and_then(|c| c.email.clone()))
        .ok_or_else(|| malformed(format!("order {} has no email", order.id)))?;
    let buyer_name = customer.and_then(|c| {
        let name = [c.first_name.as_deref(), c.last_name.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        (!name.is_empty()).then_some(name)
    });
    let attributes = order
        .note_attributes
        .iter()
        .chain(order.line_items.iter().flat_map(|l| l.properties.iter()))
        .map(|p| (p.name.as_str(), p.value.as_str()));
    let gift = gift_from_pairs(attributes.clone());
    let account_id = attributes
        .clone()
        .find(|(name, _)| name.eq_ignore_ascii_case("account_id"))
        .map(|(_, value)| value.to_owned());
    let lines: Vec<PurchaseLine> = order
        .line_items
        .iter()
        .filter(|l| l.quantity > 0)
        .map(|l| {
            let unit = minor_units(l.price.as_deref());
            PurchaseLine {
                references: references(l),
                quantity: l.quantity,
                unit_amount: unit,
                amount_total: unit.map(|u| u * i64::from(l.quantity)),
            }
        })
        .collect();
    if lines.is_empty() {
        return Err(malformed(format!("order {} has no line items", order.id)));
    }
    Ok(Purchase {
        channel: CHANNEL.to_owned(),
        payment_reference: None,
        buyer_email,
        buyer_name,
        account_id,
        gift,
        currency: order.currency,
        amount_total: minor_units(order.total_price.as_deref()),
        paid_at: order.processed_at,
        lines,
        channel_order_id: order.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shopify_money_becomes_minor_units() {
        assert_eq!(minor_units(Some("19.99")), Some(1999));
        assert_eq!(minor_units(Some("20")), Some(2000));
        assert_eq!(minor_units(Some("0.5")), Some(50));
        assert_eq!(minor_units(Some("abc")), None);
    }
}
