//! The channel-neutral commands every channel adapter maps its events to.
//! Fulfillment reads only these, never a channel's own JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What an authentic channel event asks Entitle to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// An order was paid: issue one code per unit.
    Purchase(Box<Purchase>),
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
    pub send_at: Option<DateTime<Utc>>,
}

/// One purchased line: the channel's reference for what was bought, and how many.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurchaseLine {
    /// Price id, variant id or SKU: mapped to a product through the catalogue.
    pub reference: String,
    pub quantity: u32,
    pub unit_amount: Option<i64>,
    pub amount_total: Option<i64>,
}
