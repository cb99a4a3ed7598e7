//! The native checkout's event bodies, as the platform posts them (published
//! in `ops/schemas/native-webhook.schema.json`), and the rules an event must
//! meet to be carried out at all. Fields Entitle does not know are accepted
//! and ignored, so the platform may add one before Entitle reads it.
//!
//! The gateway applies these rules before it files an event, and answers
//! `400` with the first one broken, so the sender (who can fix it) hears of
//! it at once; the worker applies the same ones to what it finds filed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    channel::{Unusable, check_unit_cap, id_problem},
    command::parse_send_at,
};

/// The longest email address SMTP carries (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

/// `purchase.paid`: an order was paid; one activation code is issued per
/// unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchasePaid {
    /// `purchase.paid`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The checkout's order id, unique; refunds and cancellations name it.
    pub order_id: String,
    pub buyer: Buyer,
    /// The buyer's platform account: links the order, does not assign codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// Send the codes to someone else; the buyer gets a receipt without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gift: Option<GiftDetails>,
    /// ISO 4217 code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Minor units (cents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_total: Option<i64>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_at: Option<DateTime<Utc>>,
    /// At least one line.
    pub lines: Vec<PaidLine>,
}

/// Who paid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buyer {
    pub email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A gift: who receives the codes, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GiftDetails {
    pub recipient_email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339, or `YYYY-MM-DD` (midnight UTC): when the recipient's email
    /// is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
}

/// A line of a paid order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaidLine {
    /// Listed under `native_skus` in the catalogue.
    pub sku: String,
    /// From 1; the order's units together at most `worker.max_units_per_order`.
    pub quantity: i64,
    /// Minor units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_amount: Option<i64>,
}

/// `purchase.refunded`: money was returned, for the whole order (no
/// `lines`) or for so many units of each SKU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseRefunded {
    /// `purchase.refunded`.
    #[serde(rename = "type")]
    pub kind: String,
    pub order_id: String,
    /// Unique per refund: the same refund sent again is applied once.
    pub refund_id: String,
    /// Absent or empty: the whole order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<RefundedLine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Units of one SKU refunded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefundedLine {
    pub sku: String,
    /// From 1 to `worker.max_units_per_order` (no order holds more).
    pub quantity: i64,
}

/// `purchase.cancelled`: every unredeemed code of the order is revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseCancelled {
    /// `purchase.cancelled`.
    #[serde(rename = "type")]
    pub kind: String,
    pub order_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A native event, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum NativeEvent {
    Paid(PurchasePaid),
    Refunded(PurchaseRefunded),
    Cancelled(PurchaseCancelled),
    /// A type Entitle does not act on: recorded and acknowledged, so the
    /// platform may send new types before Entitle knows them.
    Other(String),
}

impl NativeEvent {
    /// The event's `type`.
    pub fn kind(&self) -> &str {
        match self {
            NativeEvent::Paid(e) => &e.kind,
            NativeEvent::Refunded(e) => &e.kind,
            NativeEvent::Cancelled(e) => &e.kind,
            NativeEvent::Other(kind) => kind,
        }
    }
}

/// What the rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `worker.max_units_per_order`.
    pub max_units_per_order: u32,
}

#[derive(Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: String,
}

/// Reads a native body and checks it against every rule; the first rule
/// broken is the answer.
pub fn parse(body: &[u8], limits: Limits) -> Result<NativeEvent, Unusable> {
    // serde would read a struct from an array too; an event is an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(Unusable::malformed(
            "the body is not a native event: it must be a JSON object",
        ));
    }
    let Kind { kind } = read(body)?;
    if let Some(problem) = id_problem("type", &kind) {
        return Err(Unusable::malformed(problem));
    }
    let event = match kind.as_str() {
        "purchase.paid" => NativeEvent::Paid(read(body)?),
        "purchase.refunded" => NativeEvent::Refunded(read(body)?),
        "purchase.cancelled" => NativeEvent::Cancelled(read(body)?),
        _ => NativeEvent::Other(kind),
    };
    match &event {
        NativeEvent::Paid(e) => e.check(limits)?,
        NativeEvent::Refunded(e) => e.check(limits)?,
        NativeEvent::Cancelled(e) => e.check()?,
        NativeEvent::Other(_) => {}
    }
    Ok(event)
}

/// Deserialises a body, naming the field that is wrong (`lines[0].quantity:
/// invalid type ...`).
fn read<T: DeserializeOwned>(body: &[u8]) -> Result<T, Unusable> {
    let mut json = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Unusable::malformed(match inner.classify() {
            serde_json::error::Category::Data if path != "." => format!("{path}: {inner}"),
            serde_json::error::Category::Data => {
                format!("the body is not a native event: {inner}")
            }
            _ => format!("the body is not JSON: {inner}"),
        })
    })?;
    json.end()
        .map_err(|e| Unusable::malformed(format!("the body goes on after the event: {e}")))?;
    Ok(value)
}

/// The rules each field is held to, the first broken one kept.
struct Rules(Result<(), Unusable>);

impl Rules {
    fn new() -> Self {
        Rules(Ok(()))
    }

    fn broken(&mut self, detail: String) {
        if self.0.is_ok() {
            self.0 = Err(Unusable::malformed(detail));
        }
    }

    /// A required id: present, at most
    /// [`MAX_ID_BYTES`](crate::channel::MAX_ID_BYTES), no control characters.
    fn id(&mut self, field: &str, value: &str) {
        if let Some(problem) = id_problem(field, value) {
            self.broken(problem);
        }
    }

    /// An optional id: the same, when present and not empty.
    fn optional_id(&mut self, field: &str, value: Option<&str>) {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            self.id(field, value);
        }
    }

    /// Free text (a name, a message): anything but NUL, which Postgres
    /// cannot store.
    fn text(&mut self, field: &str, value: Option<&str>) {
        if value.is_some_and(|v| v.contains('\0')) {
            self.broken(format!("{field} holds a NUL character"));
        }
    }

    /// An address the mailer can send to.
    fn email(&mut self, field: &str, value: &str) {
        if value.trim().is_empty() {
            self.broken(format!("{field} is empty"));
        } else if value.len() > MAX_EMAIL_BYTES {
            self.broken(format!(
                "{field} is {} bytes long; an email address has at most {MAX_EMAIL_BYTES}",
                value.len()
            ));
        } else if let Err(e) = value.parse::<lettre::Address>() {
            self.broken(format!("{field} {value:?} is not an email address: {e}"));
        }
    }

    /// A unit count: from 1 up to the unit cap.
    fn quantity(&mut self, field: &str, quantity: i64, cap: u32) {
        if quantity < 1 {
            self.broken(format!("{field} is {quantity}; it must be at least 1"));
        } else if quantity > i64::from(cap) {
            self.broken(format!(
                "{field} is {quantity}; no order holds more than {cap} units (worker.max_units_per_order)"
            ));
        }
    }

    fn done(self) -> Result<(), Unusable> {
        self.0
    }
}

impl PurchasePaid {
    /// Checks the purchase against every rule: ids, addresses, text,
    /// dates, at least one unit, at most the unit cap, amounts that add up
    /// without overflowing.
    pub fn check(&self, limits: Limits) -> Result<(), Unusable> {
        let mut rules = Rules::new();
        rules.id("order_id", &self.order_id);
        rules.email("buyer.email", &self.buyer.email);
        rules.text("buyer.name", self.buyer.name.as_deref());
        rules.optional_id("account_id", self.account_id.as_deref());
        rules.optional_id("currency", self.currency.as_deref());
        if let Some(gift) = &self.gift {
            rules.email("gift.recipient_email", &gift.recipient_email);
            rules.text("gift.recipient_name", gift.recipient_name.as_deref());
            rules.text("gift.message", gift.message.as_deref());
            if let Some(text) = gift.send_at.as_deref().filter(|t| !t.is_empty())
                && parse_send_at(text).is_none()
            {
                rules.broken(format!(
                    "gift.send_at {text:?} is not a date (RFC 3339, or YYYY-MM-DD)"
                ));
            }
        }
        if self.lines.is_empty() {
            rules.broken(format!("order {} has no lines, so no units", self.order_id));
        }
        let cap = limits.max_units_per_order;
        for (i, line) in self.lines.iter().enumerate() {
            rules.id(&format!("lines[{i}].sku"), &line.sku);
            // Above the cap is checked for the order as a whole, below.
            if line.quantity < 1 {
                rules.quantity(&format!("lines[{i}].quantity"), line.quantity, cap);
            }
            if let Some(unit) = line.unit_amount
                && unit.checked_mul(line.quantity).is_none()
            {
                rules.broken(format!(
                    "lines[{i}].unit_amount {unit} × quantity {} is beyond any amount",
                    line.quantity
                ));
            }
        }
        rules.done()?;
        // Above the cap is its own, documented refusal: the engine's.
        let units = self
            .lines
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.quantity as u64));
        check_unit_cap(&self.order_id, units, cap)
    }
}

impl PurchaseRefunded {
    pub fn check(&self, limits: Limits) -> Result<(), Unusable> {
        let mut rules = Rules::new();
        rules.id("order_id", &self.order_id);
        rules.id("refund_id", &self.refund_id);
        rules.text("reason", self.reason.as_deref());
        for (i, line) in self.lines.iter().enumerate() {
            rules.id(&format!("lines[{i}].sku"), &line.sku);
            rules.quantity(
                &format!("lines[{i}].quantity"),
                line.quantity,
                limits.max_units_per_order,
            );
        }
        rules.done()
    }
}

impl PurchaseCancelled {
    pub fn check(&self) -> Result<(), Unusable> {
        let mut rules = Rules::new();
        rules.id("order_id", &self.order_id);
        rules.text("reason", self.reason.as_deref());
        rules.done()
    }
}

/// The id rules, for the gateway's check of `webhook-id`.
pub fn check_event_id(event_id: &str) -> Result<(), Unusable> {
    match id_problem("webhook-id", event_id) {
        Some(problem) => Err(Unusable::malformed(problem)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_units_per_order: 100,
    };

    fn paid(extra: serde_json::Value) -> Vec<u8> {
        let mut body = serde_json::json!({
            "type": "purchase.paid", "order_id": "ord_1",
            "buyer": { "email": "ada@example.com" },
            "lines": [{ "sku": "KIT-BASIC", "quantity": 2 }],
        });
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body.to_string().into_bytes()
    }

    fn refusal(body: &[u8]) -> Unusable {
        parse(body, LIMITS).expect_err("refused")
    }

    #[test]
    fn unknown_fields_are_accepted_anywhere() {
        let body = paid(serde_json::json!({
            "coupon": "X",
            "buyer": { "email": "ada@example.com", "loyalty": 3 },
            "lines": [{ "sku": "KIT-BASIC", "quantity": 2, "colour": "red" }],
        }));
        assert!(matches!(parse(&body, LIMITS), Ok(NativeEvent::Paid(_))));
    }

    #[test]
    fn an_unknown_type_is_accepted_as_other() {
        let event = parse(br#"{"type": "purchase.disputed", "whatever": 1}"#, LIMITS);
        assert_eq!(event, Ok(NativeEvent::Other("purchase.disputed".into())));
    }

    #[test]
    fn each_refusal_names_its_field() {
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (b"{".to_vec(), "event_malformed", "not JSON"),
            (br#"{"type": 1}"#.to_vec(), "event_malformed", "type: invalid type"),
            (b"[1]".to_vec(), "event_malformed", "not a native event"),
            (br#"{"order_id": "x"}"#.to_vec(), "event_malformed", "type"),
            (paid(serde_json::json!({ "order_id": "" })), "event_malformed", "order_id is empty"),
            (paid(serde_json::json!({ "order_id": "a".repeat(256) })), "event_malformed", "order_id is 256 bytes"),
            (paid(serde_json::json!({ "buyer": { "email": "ada", "name": "A" } })), "event_malformed", "buyer.email"),
            (paid(serde_json::json!({ "buyer": { "email": "a@b.c", "name": "A\u{0}" } })), "event_malformed", "buyer.name holds a NUL"),
            (paid(serde_json::json!({ "lines": [] })), "event_malformed", "no lines"),
            (paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": 0 }] })), "event_malformed", "lines[0].quantity is 0"),
            (paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": -3 }] })), "event_malformed", "lines[0].quantity is -3"),
            (paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": 1.5 }] })), "event_malformed", "lines[0].quantity"),
            (paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": 101 }] })), "order_too_large", "101 units"),
            (paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": 60 }, { "sku": "L", "quantity": 41 }] })), "order_too_large", "101 units"),
            (paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": 2, "unit_amount": i64::MAX }] })), "event_malformed", "unit_amount"),
            (paid(serde_json::json!({ "paid_at": "yesterday" })), "event_malformed", "paid_at"),
            (paid(serde_json::json!({ "gift": { "recipient_email": "r@example.com", "send_at": "soon" } })), "event_malformed", "gift.send_at"),
            (br#"{"type": "purchase.refunded", "order_id": "o"}"#.to_vec(), "event_malformed", "refund_id"),
            (br#"{"type": "purchase.refunded", "order_id": "o", "refund_id": "r", "lines": [{"sku": "K", "quantity": 0}]}"#.to_vec(), "event_malformed", "lines[0].quantity is 0"),
            (br#"{"type": "purchase.cancelled", "order_id": "o\u0000"}"#.to_vec(), "event_malformed", "order_id"),
        ];
        for (body, code, field) in cases {
            let refused = refusal(&body);
            assert_eq!(
                refused.code,
                code,
                "{}: {refused:?}",
                String::from_utf8_lossy(&body)
            );
            assert!(
                refused.detail.contains(field),
                "{}: {:?} should name {field}",
                String::from_utf8_lossy(&body),
                refused.detail
            );
        }
    }

    #[test]
    fn the_documented_examples_are_read() {
        for example in [
            r#"{"type": "purchase.paid", "order_id": "ord_123",
                "buyer": {"email": "ada@example.com", "name": "Ada"}, "account_id": "acct_1",
                "gift": {"recipient_email": "rae@example.com", "recipient_name": "Rae",
                         "message": "Happy birthday", "send_at": "2026-12-24"},
                "currency": "EUR", "amount_total": 6000,
                "lines": [{"sku": "KIT-BASIC", "quantity": 3, "unit_amount": 2000}]}"#,
            r#"{"type": "purchase.refunded", "order_id": "ord_123", "refund_id": "rf_1",
                "lines": [{"sku": "KIT-BASIC", "quantity": 1}]}"#,
            r#"{"type": "purchase.cancelled", "order_id": "ord_123"}"#,
        ] {
            let event = parse(example.as_bytes(), LIMITS);
            assert!(
                matches!(
                    event,
                    Ok(NativeEvent::Paid(_) | NativeEvent::Refunded(_) | NativeEvent::Cancelled(_))
                ),
                "{example}: {event:?}"
            );
        }
    }

    #[test]
    fn the_unit_cap_itself_is_accepted() {
        let body = paid(serde_json::json!({ "lines": [{ "sku": "K", "quantity": 100 }] }));
        assert!(parse(&body, LIMITS).is_ok());
    }
}
