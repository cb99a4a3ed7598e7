//! The platform's native checkout: Standard Webhooks signatures
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature`), and purchases,
//! refunds and cancellations in the JSON schema published in
//! `ops/schemas/native-webhook.schema.json` (the bodies and their rules are
//! in [`event`]).

pub mod event;

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};

use self::event::{Limits, NativeEvent};
use super::{
    Envelope, Headers, SignatureError, Unusable, any_matches, base64_decode, base64_encode,
};
use crate::command::{
    AdjustedLine, Adjustment, AdjustmentScope, Command, Gift, Purchase, PurchaseLine, parse_send_at,
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

/// Names an authentic event by its `webhook-id` and its body's `type`, once
/// the body meets every rule of [`event`]: an event refused here can never
/// be carried out, so it is answered `400` and not filed.
pub fn screen(headers: &dyn Headers, body: &[u8], limits: Limits) -> Result<Envelope, Unusable> {
    let event_id = headers.header("webhook-id").unwrap_or_default();
    event::check_event_id(event_id)?;
    let event = event::parse(body, limits)?;
    Envelope::checked(event_id, event.kind()).map_err(Unusable::malformed)
}

/// Blank optional text is no text.
fn given(text: Option<String>) -> Option<String> {
    text.filter(|t| !t.trim().is_empty())
}

/// Turns a stored native event into a command, by the same rules the
/// gateway applied when it was filed.
pub fn interpret(body: &[u8], limits: Limits) -> Result<Command, Unusable> {
    match event::parse(body, limits)? {
        NativeEvent::Paid(event) => {
            let gift = event.gift.map(|g| Gift {
                recipient_email: g.recipient_email,
                recipient_name: given(g.recipient_name),
                message: given(g.message),
                send_at: given(g.send_at).as_deref().and_then(parse_send_at),
            });
            let lines = event
                .lines
                .into_iter()
                .map(|l| {
                    // Checked: 1 ≤ quantity ≤ the unit cap, and the product fits.
                    let quantity = l.quantity as u32;
                    PurchaseLine {
                        references: vec![l.sku],
                        quantity,
                        unit_amount: l.unit_amount,
                        amount_total: l.unit_amount.map(|u| u * l.quantity),
                    }
                })
                .collect();
            Ok(Command::Purchase(Box::new(Purchase {
                channel: CHANNEL.to_owned(),
                channel_order_id: event.order_id,
                payment_reference: None,
                buyer_email: event.buyer.email,
                buyer_name: given(event.buyer.name),
                account_id: given(event.account_id),
                gift,
                currency: given(event.currency),
                amount_total: event.amount_total,
                paid_at: event.paid_at,
                lines,
            })))
        }
        NativeEvent::Refunded(event) => {
            let scope = if event.lines.is_empty() {
                AdjustmentScope::Full
            } else {
                AdjustmentScope::Lines {
                    lines: event
                        .lines
                        .into_iter()
                        .map(|l| AdjustedLine {
                            references: vec![l.sku],
                            quantity: l.quantity as u32,
                        })
                        .collect(),
                }
            };
            Ok(Command::Refund(Adjustment {
                channel: CHANNEL.to_owned(),
                order_key: event.order_id,
                adjustment_key: format!("refund:{}", event.refund_id),
                scope,
            }))
        }
        NativeEvent::Cancelled(event) => Ok(Command::Cancellation(Adjustment {
            channel: CHANNEL.to_owned(),
            adjustment_key: format!("order:{}:cancelled", event.order_id),
            order_key: event.order_id,
            scope: AdjustmentScope::Full,
        })),
        NativeEvent::Other(kind) => Ok(Command::Acknowledge {
            why: format!("event type {kind} needs no action"),
        }),
    }
}
