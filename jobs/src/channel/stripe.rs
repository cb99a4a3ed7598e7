//! Stripe Checkout: `Stripe-Signature` verification, event envelopes, and the
//! mapping of paid Checkout Sessions (with their line items, read from
//! Stripe's API), refunded charges and failed payments to commands.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Envelope, Screened, SignatureError, Unusable, any_matches};
use crate::{
    command::{Adjustment, AdjustmentScope, Command, Purchase, PurchaseLine, gift_from_pairs},
    config::StripeConfig,
    error::JobError,
};

/// Entitle's name for this channel.
pub const CHANNEL: &str = "stripe";

/// Verifies a `Stripe-Signature` header (`t=…,v1=…[,v1=…]`) over
/// `{t}.{body}`. Any `v1` may match any configured secret, so secrets can be
/// rotated; comparison is constant-time.
pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secrets: &[SecretString],
    tolerance: Duration,
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    if secrets.is_empty() {
        return Err(SignatureError::NotConfigured);
    }
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                )
            }
            "v1" => signatures.push(hex::decode(value).map_err(|_| SignatureError::Malformed)?),
            // v0 (test-mode legacy) and future schemes are not trusted.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.timestamp().abs_diff(timestamp) > tolerance.as_secs() {
        return Err(SignatureError::Stale);
    }
    let keys: Vec<Vec<u8>> = secrets
        .iter()
        .map(|s| s.expose_secret().as_bytes().to_vec())
        .collect();
    let t = timestamp.to_string();
    if any_matches(&keys, &[t.as_bytes(), b".", body], &signatures) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Computes a `Stripe-Signature` header for a body, as Stripe does; used by
/// tests and by the local demo.
pub fn sign(body: &[u8], secret: &str, timestamp: i64) -> String {
    let t = timestamp.to_string();
    let mac = super::hmac_sha256(secret.as_bytes(), &[t.as_bytes(), b".", body]);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[derive(Debug, Deserialize)]
struct EventHead {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
}

/// Names an event by Stripe's event id and type.
pub fn envelope(body: &str) -> Result<Envelope, String> {
    let head: EventHead =
        serde_json::from_str(body).map_err(|e| format!("the event is not a Stripe event: {e}"))?;
    Envelope::checked(&head.id, &head.event_type)
}

/// What intake makes of an authentic Stripe event: one that cannot be named
/// (not JSON, no id, an id the inbox cannot keep) is filed failed at once
/// and answered 2xx, since Stripe would otherwise retry it for three days.
/// The rest of the body is read by the worker, which needs Stripe's API for
/// the line items anyway; what it cannot use fails on that first attempt.
pub fn screen(body: &[u8]) -> Screened {
    match super::json_text(body).and_then(|text| envelope(text).map_err(Unusable::malformed)) {
        Ok(envelope) => Screened::Usable(envelope),
        Err(why) => Screened::Unusable {
            envelope: Envelope::unreadable(body),
            why,
        },
    }
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "type")]
    event_type: String,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct CheckoutSession {
    id: String,
    payment_status: Option<String>,
    customer_email: Option<String>,
    customer_details: Option<CustomerDetails>,
    client_reference_id: Option<String>,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
    amount_total: Option<i64>,
    currency: Option<String>,
    created: Option<i64>,
    payment_intent: Option<String>,
    #[serde(default)]
    custom_fields: Vec<CustomField>,
}

#[derive(Debug, Deserialize)]
struct CustomField {
    key: String,
    text: Option<TextValue>,
}

#[derive(Debug, Deserialize)]
struct TextValue {
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Charge {
    id: String,
    payment_intent: Option<String>,
    amount_refunded: i64,
    refunded: bool,
}

#[derive(Debug, Deserialize)]
struct CustomerDetails {
    email: Option<String>,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LineItemList {
    data: Vec<LineItem>,
    has_more: bool,
}

#[derive(Debug, Deserialize)]
struct LineItem {
    id: String,
    quantity: Option<u32>,
    amount_total: Option<i64>,
    price: Option<Price>,
}

#[derive(Debug, Deserialize)]
struct Price {
    id: String,
    unit_amount: Option<i64>,
}

/// A client of Stripe's REST API.
#[derive(Debug, Clone)]
pub struct StripeApi {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

impl StripeApi {
    pub fn new(config: &StripeConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.api_timeout_secs))
            .build()
            .context("Failed to build the Stripe HTTP client")?;
        Ok(Self {
            http,
            base: config.api_base.trim_end_matches('/').to_owned(),
            key: config.api_key.clone(),
        })
    }

    /// Whether an API key is configured (reconciliation needs one).
    pub fn configured(&self) -> bool {
        !self.key.expose_secret().is_empty()
    }

    /// A GET of an API path, authenticated.
    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.key.expose_secret())
    }

    /// Units bought in a Checkout Session, from all its line items.
    pub(crate) async fn units(&self, session_id: &str) -> Result<i64, JobError> {
        Ok(self
            .line_items(session_id)
            .await?
            .iter()
            .map(|i| i64::from(i.quantity.unwrap_or(1)))
            .sum())
    }

    /// Every line item of a Checkout Session, following `has_more` pages.
    async fn line_items(&self, session_id: &str) -> Result<Vec<LineItem>, JobError> {
        let url = format!("{}/v1/checkout/sessions/{session_id}/line_items", self.base);
        let mut items = Vec::new();
        let mut starting_after: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100".to_owned())];
            if let Some(after) = &starting_after {
                query.push(("starting_after", after.clone()));
            }
            let response = self
                .http
                .get(&url)
                .bearer_auth(self.key.expose_secret())
                .query(&query)
                .send()
                .await
                .context("Failed to reach Stripe's API for line items")?;
            let status = response.status();
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                return Err(JobError::Transient(anyhow::anyhow!(
                    "Stripe answered {status} for line items of {session_id}"
                )));
            }
            if !status.is_success() {
                return Err(JobError::permanent(
                    "channel_api_rejected",
                    format!("Stripe answered {status} for line items of {session_id}"),
                ));
            }
            let page: LineItemList = response
                .json()
                .await
                .context("Failed to read Stripe's line items answer")?;
            starting_after = page.data.last().map(|i| i.id.clone());
            items.extend(page.data);
            if !page.has_more || starting_after.is_none() {
                return Ok(items);
            }
        }
    }

    /// Turns a stored Stripe event into a command.
    pub async fn interpret(&self, body: &str) -> Result<Command, JobError> {
        let event: Event = serde_json::from_str(body).map_err(malformed)?;
        match event.event_type.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {}
            "checkout.session.async_payment_failed" => {
                let session: CheckoutSession =
                    serde_json::from_value(event.data.object).map_err(malformed)?;
                return Ok(Command::Cancellation(Adjustment {
                    channel: CHANNEL.to_owned(),
                    adjustment_key: format!("session:{}:payment_failed", session.id),
                    order_key: session.id,
                    scope: AdjustmentScope::Full,
                }));
            }
            "charge.refunded" => {
                let charge: Charge =
                    serde_json::from_value(event.data.object).map_err(malformed)?;
                return refund(charge);
            }
            other => {
                return Ok(Command::Acknowledge {
                    why: format!("{other} needs no action"),
                });
            }
        }
        let session: CheckoutSession =
            serde_json::from_value(event.data.object).map_err(malformed)?;
        let paid = matches!(
            session.payment_status.as_deref(),
            Some("paid") | Some("no_payment_required")
        );
        if !paid {
            // Delayed methods complete unpaid; async_payment_succeeded follows.
            return Ok(Command::Acknowledge {
                why: format!(
                    "session {} is not paid yet (payment_status {:?})",
                    session.id, session.payment_status
                ),
            });
        }
        let details = session.customer_details.as_ref();
        let buyer_email = details
            .and_then(|d| d.email.clone())
            .or(session.customer_email.clone())
            .ok_or_else(|| {
                JobError::permanent(
                    "event_malformed",
                    format!("session {} has no customer email", session.id),
                )
            })?;
        let items = self.line_items(&session.id).await?;
        let mut lines = Vec::with_capacity(items.len());
        for item in items {
            let price = item.price.ok_or_else(|| {
                JobError::permanent(
                    "event_malformed",
                    format!("line item {} of {} has no price", item.id, session.id),
                )
            })?;
            let quantity = item.quantity.unwrap_or(1);
            if quantity == 0 {
                continue;
            }
            lines.push(PurchaseLine {
                references: vec![price.id],
                quantity,
                unit_amount: price.unit_amount,
                amount_total: item.amount_total,
            });
        }
        if lines.is_empty() {
            return Err(JobError::permanent(
                "event_malformed",
                format!("session {} has no line items", session.id),
            ));
        }
        Ok(Command::Purchase(Box::new(Purchase {
            channel: CHANNEL.to_owned(),
            channel_order_id: session.id,
            buyer_email,
            buyer_name: details.and_then(|d| d.name.clone()),
            account_id: session
                .metadata
                .get("account_id")
                .cloned()
                .or(session.client_reference_id),
            gift: gift_from_pairs(
                session
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .chain(session.custom_fields.iter().filter_map(|f| {
                        let value = f.text.as_ref()?.value.as_deref()?;
                        Some((f.key.as_str(), value))
                    })),
            ),
            payment_reference: session.payment_intent,
            currency: session.currency,
            amount_total: session.amount_total,
            paid_at: session
                .created
                .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0)),
            lines,
        })))
    }
}

fn malformed(e: impl std::fmt::Display) -> JobError {
    JobError::permanent("event_malformed", e.to_string())
}

/// A refunded charge: wholly, or by its cumulative refunded amount. Keyed by
/// that amount, so the same refund reported twice applies once and a later,
/// larger refund applies the difference.
fn refund(charge: Charge) -> Result<Command, JobError> {
    let order_key = charge
        .payment_intent
        .clone()
        .ok_or_else(|| malformed(format!("charge {} names no payment_intent", charge.id)))?;
    Ok(Command::Refund(Adjustment {
        channel: CHANNEL.to_owned(),
        order_key,
        adjustment_key: format!("charge:{}:refunded:{}", charge.id, charge.amount_refunded),
        scope: if charge.refunded {
            AdjustmentScope::Full
        } else {
            AdjustmentScope::Amount {
                cumulative: charge.amount_refunded,
            }
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(s: &[&str]) -> Vec<SecretString> {
        s.iter()
            .map(|s| SecretString::from(s.to_string()))
            .collect()
    }

    const TOL: Duration = Duration::from_secs(300);

    #[test]
    fn a_signature_made_with_the_secret_verifies() {
        let now = Utc::now();
        let header = sign(b"{}", "whsec_a", now.timestamp());
        assert_eq!(
            verify_signature(Some(&header), b"{}", &secrets(&["whsec_a"]), TOL, now),
            Ok(())
        );
    }

    #[test]
    fn any_v1_under_any_secret_may_match_during_rotation() {
        let now = Utc::now();
        let t = now.timestamp();
        let old = sign(b"x", "whsec_old", t);
        let new = sign(b"x", "whsec_new", t);
        let header = format!("{},v1={}", new, old.split("v1=").nth(1).unwrap());
        let configured = secrets(&["whsec_other", "whsec_old"]);
        assert_eq!(
            verify_signature(Some(&header), b"x", &configured, TOL, now),
            Ok(())
        );
    }

    #[test]
    fn a_changed_body_or_secret_is_a_mismatch() {
        let now = Utc::now();
        let header = sign(b"x", "whsec_a", now.timestamp());
        assert_eq!(
            verify_signature(Some(&header), b"y", &secrets(&["whsec_a"]), TOL, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(Some(&header), b"x", &secrets(&["whsec_b"]), TOL, now),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn timestamps_beyond_the_tolerance_are_stale() {
        let now = Utc::now();
        let header = sign(b"x", "whsec_a", now.timestamp() - 301);
        assert_eq!(
            verify_signature(Some(&header), b"x", &secrets(&["whsec_a"]), TOL, now),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn broken_headers_are_malformed_or_missing() {
        let s = secrets(&["whsec_a"]);
        let now = Utc::now();
        assert_eq!(
            verify_signature(None, b"", &s, TOL, now),
            Err(SignatureError::Missing)
        );
        for h in ["", "t=abc,v1=00", "v1=00", "t=1", "t=1,v1=zz"] {
            assert_eq!(
                verify_signature(Some(h), b"", &s, TOL, now),
                Err(SignatureError::Malformed),
                "{h}"
            );
        }
    }
}
