//! The channel-neutral commands every channel adapter maps its events to.
//! Fulfillment reads only these, never a channel's own JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What an authentic channel event asks Entitle to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// An order was paid: issue one code per unit.
    Purchase(Box<Purchase>),
    /// Money was returned: revoke the codes it paid for.
    Refund(Adjustment),
    /// The order was cancelled (or its payment failed): revoke every code.
    Cancellation(Adjustment),
    /// The event is recorded but needs no action (unpaid session, other topic).
    Acknowledge { why: String },
}

/// A paid order, in Entitle's words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Purchase {
    /// The channel the order came through, as Entitle names it.
    pub channel: String,
    /// The channel's identifier of the order; unique per channel.
    pub channel_order_id: String,
    /// The channel's payment identifier, when refunds name it instead.
    pub payment_reference: Option<String>,
    pub buyer_email: String,
    pub buyer_name: Option<String>,
    /// The platform account of the buyer, when the channel knows it.
    pub account_id: Option<String>,
    pub gift: Option<Gift>,
    pub currency: Option<String>,
    pub amount_total: Option<i64>,
    pub paid_at: Option<DateTime<Utc>>,
    pub lines: Vec<PurchaseLine>,
}

/// Someone the buyer is giving the codes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gift {
    pub recipient_email: String,
    pub recipient_name: Option<String>,
    pub message: Option<String>,
    /// Send the recipient's email then, not now.
    pub send_at: Option<DateTime<Utc>>,
}

/// One purchased line: the channel's references for what was bought, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseLine {
    /// Price id, variant or SKU, most specific first: the first one the
    /// catalogue maps decides the product.
    pub references: Vec<String>,
    pub quantity: u32,
    pub unit_amount: Option<i64>,
    pub amount_total: Option<i64>,
}

/// A refund or cancellation as the channel reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adjustment {
    pub channel: String,
    /// The order id or payment reference the channel names.
    pub order_key: String,
    /// Identifies this adjustment within the channel (the refund id): the
    /// same adjustment reported twice is applied once.
    pub adjustment_key: String,
    pub scope: AdjustmentScope,
}

/// How much of an order an adjustment covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "scope")]
pub enum AdjustmentScope {
    /// Every unit.
    Full,
    /// So many units of the lines bought under these references.
    Lines { lines: Vec<AdjustedLine> },
    /// The channel's cumulative refunded amount, in minor units.
    Amount { cumulative: i64 },
}

/// Units of one line taken back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdjustedLine {
    pub references: Vec<String>,
    pub quantity: u32,
}

/// Reads a gift's send date: RFC 3339, or a plain date (midnight UTC).
pub fn parse_send_at(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// Gift fields from name/value pairs (Stripe metadata or custom fields,
/// Shopify note attributes or line-item properties). Names are compared
/// without case, spaces or underscores, so `gift_recipient_email`,
/// `giftrecipientemail` and `Gift recipient email` are one field.
pub fn gift_from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Gift> {
    let mut email = None;
    let mut name = None;
    let mut message = None;
    let mut send_at = None;
    for (key, value) in pairs {
        let key: String = key
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.as_str() {
            "giftrecipientemail" => email = Some(value.to_owned()),
            "giftrecipientname" => name = Some(value.to_owned()),
            "giftmessage" => message = Some(value.to_owned()),
            "giftsendat" | "giftsenddate" => send_at = parse_send_at(value),
            _ => {}
        }
    }
    email.map(|recipient_email| Gift {
        recipient_email,
        recipient_name: name,
        message,
        send_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gift_fields_are_read_whatever_their_spelling() {
        let gift = gift_from_pairs([
            ("giftrecipientemail", "rae@example.com"),
            ("Gift recipient name", "Rae"),
            ("gift_message", "Happy birthday"),
            ("gift_send_at", "2030-01-02"),
        ])
        .unwrap();
        assert_eq!(gift.recipient_email, "rae@example.com");
        assert_eq!(gift.recipient_name.as_deref(), Some("Rae"));
        assert_eq!(gift.message.as_deref(), Some("Happy birthday"));
        assert_eq!(gift.send_at, parse_send_at("2030-01-02T00:00:00Z"));
    }

    #[test]
    fn no_recipient_means_no_gift() {
        assert_eq!(gift_from_pairs([("gift_message", "hi")]), None);
    }
}
