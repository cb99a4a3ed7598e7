//! The platform's native checkout: Standard Webhooks signatures
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature`), and purchases,
//! refunds and cancellations in the JSON schema published in
//! `ops/schemas/native-webhook.schema.json`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Envelope, Headers, SignatureError, any_matches, base64_decode, base64_encode};
use crate::{
    command::{
        AdjustedLine, Adjustment, AdjustmentScope, Command, Gift, Purchase, PurchaseLine,
        parse_send_at,
    },
    error::JobError,
};

/// Entitle's name for this channel.
pub const CHANNEL: &str = "native";

/// The HMAC key of a Standard Webhooks secret: base64 after `whsec_`.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    base64_decode(secret.strip_prefix("whsec_").unwrap_or(secret))
}

/// Verifies a Standard Webhooks signature: HMAC-SHA256 over
/// `{webhook-id}.{webhook-timestamp}.{body}`; `webhook-signature` holds
/// space-separated `v1,<base64>` entries, any of which may match any secret.
pub fn verify(
    headers: &dyn Headers,
    body: &[u8],
    secrets: &[SecretString],
    tolerance: Duration,
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NotConfigured);
    }
    let (Some(id), Some(timestamp), Some(signatures)) = (
        headers.header("webhook-id"),
        headers.header("webhook-timestamp"),
        headers.header("webhook-signature"),
    ) else {
        return Err(SignatureError::Missing);
    };
    let sent: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed)?;
    let candidates: Vec<Vec<u8>> = signatures
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(base64_decode)
        .collect();
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.timestamp().abs_diff(sent) > tolerance.as_secs() {
        return Err(SignatureError::Stale);
    }
    let keys: Vec<Vec<u8>> = secrets
        .iter()
        .filter_map(|s| secret_key(s.expose_secret()))
        .collect();
    let parts: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.trim().as_bytes(), b".", body];
    if any_matches(&keys, &parts, &candidates) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The `webhook-signature` value for a body (`v1,<base64>`).
pub fn sign(id: &str, timestamp: i64, body: &[u8], secret: &str) -> String {
    let key = secret_key(secret).expect("a whsec_ base64 secret");
    let ts = timestamp.to_string();
    let mac = super::hmac_sha256(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    format!("v1,{}", base64_encode(&mac.finalize().into_bytes()))
}

#[derive(Debug, Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: String,
}

/// Names an event by its `webhook-id` and the body's `type`.
pub fn envelope(headers: &dyn Headers, body: &str) -> Result<Envelope, String> {
    let event_id = headers
        .header("webhook-id")
        .filter(|v| !v.is_empty())
        .ok_or("webhook-id is missing")?;
    let kind: Kind = serde_json::from_str(body).map_err(|e| format!("no event type: {e}"))?;
    Ok(Envelope {
        event_id: event_id.to_owned(),
        event_type: kind.kind,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurchaseEvent {
    #[serde(rename = "type")]
    _kind: String,
    order_id: String,
    buyer: Buyer,
    account_id: Option<String>,
    gift: Option<GiftFields>,
    currency: Option<String>,
    amount_total: Option<i64>,
    paid_at: Option<DateTime<Utc>>,
    lines: Vec<Line>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Buyer {
    email: String,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GiftFields {
    recipient_email: String,
    recipient_name: Option<String>,
    message: Option<String>,
    send_at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    sku: String,
    quantity: u32,
    unit_amount: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustmentEvent {
    #[serde(rename = "type")]
    _kind: String,
    order_id: String,
    /// The refund's id; absent for cancellations.
    refund_id: Option<String>,
    /// Refunded lines; absent (or empty) for a full refund.
    #[serde(default)]
    lines: Vec<RefundLine>,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundLine {
    sku: String,
    quantity: u32,
}

fn malformed(e: impl std::fmt::Display) -> JobError {
    JobError::permanent("event_malformed", e.to_string())
}

/// Turns a stored native event into a command.
pub fn interpret(kind: &str, body: &str) -> Result<Command, JobError> {
    match kind {
        "purchase.paid" => {
            let event: PurchaseEvent = serde_json::from_str(body).map_err(malformed)?;
            if event.lines.iter().all(|l| l.quantity == 0) {
                return Err(malformed(format!("order {} has no units", event.order_id)));
            }
            let gift = match event.gift {
                Some(g) => Some(Gift {
                    recipient_email: g.recipient_email,
                    recipient_name: g.recipient_name,
                    message: g.message,
                    send_at: match g.send_at {
                        Some(text) => Some(parse_send_at(&text).ok_or_else(|| {
                            malformed(format!("gift.send_at {text:?} is not a date"))
                        })?),
                        None => None,
                    },
                }),
                None => None,
            };
            Ok(Command::Purchase(Box::new(Purchase {
                channel: CHANNEL.to_owned(),
                channel_order_id: event.order_id,
                payment_reference: None,
                buyer_email: event.buyer.email,
                buyer_name: event.buyer.name,
                account_id: event.account_id,
                gift,
                currency: event.currency,
                amount_total: event.amount_total,
                paid_at: event.paid_at,
                lines: event
                    .lines
                    .into_iter()
                    .filter(|l| l.quantity > 0)
                    .map(|l| PurchaseLine {
                        references: vec![l.sku],
                        quantity: l.quantity,
                        unit_amount: l.unit_amount,
                        amount_total: l.unit_amount.map(|u| u * i64::from(l.quantity)),
                    })
                    .collect(),
            })))
        }
        "purchase.refunded" => {
            let event: AdjustmentEvent = serde_json::from_str(body).map_err(malformed)?;
            let refund_id = event
                .refund_id
                .ok_or_else(|| malformed("purchase.refunded needs refund_id"))?;
            let scope = if event.lines.is_empty() {
                AdjustmentScope::Full
            } else {
                AdjustmentScope::Lines {
                    lines: event
                        .lines
                        .into_iter()
                        .map(|l| AdjustedLine {
                            references: vec![l.sku],
                            quantity: l.quantity,
                        })
                        .collect(),
                }
            };
            Ok(Command::Refund(Adjustment {
                channel: CHANNEL.to_owned(),
                order_key: event.order_id,
                adjustment_key: format!("refund:{refund_id}"),
                scope,
            }))
        }
        "purchase.cancelled" => {
            let event: AdjustmentEvent = serde_json::from_str(body).map_err(malformed)?;
            let _ = event.reason;
            Ok(Command::Cancellation(Adjustment {
                channel: CHANNEL.to_owned(),
                adjustment_key: format!("order:{}:cancelled", event.order_id),
                order_key: event.order_id,
                scope: AdjustmentScope::Full,
            }))
        }
        other => Ok(Command::Acknowledge {
            why: format!("event type {other} needs no action"),
        }),
    }
}
