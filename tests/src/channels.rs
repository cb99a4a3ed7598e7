//! One driver per sales channel, so the same scenario runs against Stripe,
//! Shopify and the native checkout: each builds that channel's documented
//! payloads, signs them as the channel does and posts them to the gateway.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::{
    NATIVE_SECRET, SHOPIFY_PREVIOUS_SECRET, SHOPIFY_SECRET, STRIPE_WEBHOOK_SECRET, TestApp,
    stripe::{charge_refunded, line_items_page, mount_line_items, session_event},
};
use entitle_jobs::channel::{native, shopify, stripe as stripe_channel};

/// A sales channel under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stripe,
    Shopify,
    Native,
}

/// What the catalogue sells in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    Kit,
    Licence,
    /// Sold by the channel, but in no catalogue until a test adds it.
    Unmapped,
}

/// Unit price of everything in the fixtures, in cents.
pub const UNIT_PRICE: i64 = 2000;

/// A gift as the buyer enters it.
#[derive(Debug, Clone)]
pub struct GiftSpec {
    pub recipient_email: String,
    pub recipient_name: String,
    pub message: String,
    pub send_at: Option<DateTime<Utc>>,
}

/// An order a test places.
#[derive(Debug, Clone)]
pub struct Sale {
    /// Unique per test; the channel's order id derives from it.
    pub order: String,
    pub buyer: String,
    pub account_id: Option<String>,
    pub gift: Option<GiftSpec>,
    pub lines: Vec<(Product, u32)>,
}

impl Sale {
    pub fn new(order: &str, buyer: &str, lines: &[(Product, u32)]) -> Self {
        Self {
            order: order.to_owned(),
            buyer: buyer.to_owned(),
            account_id: None,
            gift: None,
            lines: lines.to_vec(),
        }
    }

    pub fn total(&self) -> i64 {
        self.lines
            .iter()
            .map(|(_, q)| i64::from(*q) * UNIT_PRICE)
            .sum()
    }

    /// Shopify's numeric order id for this sale.
    fn shopify_id(&self) -> u64 {
        numeric_id(&self.order)
    }
}

/// How a request is signed, to test each channel's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    /// With the current secret, now.
    Good,
    /// With a secret the channel was never given.
    WrongSecret,
    /// During rotation: with the secret being retired (or several signatures,
    /// one of them valid).
    Rotated,
    /// With the current secret, but too long ago.
    Stale,
}

fn stripe_price(product: Product) -> &'static str {
    match product {
        Product::Kit => "price_basic_kit",
        Product::Licence => "price_pro_licence",
        Product::Unmapped => "price_new_bundle",
    }
}

fn shopify_variant(product: Product) -> u64 {
    match product {
        Product::Kit => 44610000001,
        Product::Licence => 44610000002,
        Product::Unmapped => 44610000099,
    }
}

/// The SKU shared by Shopify and the native checkout.
pub fn sku(product: Product) -> &'static str {
    match product {
        Product::Kit => "KIT-BASIC",
        Product::Licence => "LIC-PRO-1Y",
        Product::Unmapped => "BUNDLE-NEW",
    }
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Stripe, Channel::Shopify, Channel::Native];

    /// Entitle's name of the channel.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Stripe => stripe_channel::CHANNEL,
            Channel::Shopify => shopify::CHANNEL,
            Channel::Native => native::CHANNEL,
        }
    }

    /// The catalogue entry that maps `product` for this channel.
    pub fn catalogue_line(self, product: Product) -> String {
        match self {
            Channel::Stripe => format!("stripe_prices = [\"{}\"]", stripe_price(product)),
            Channel::Shopify => format!("shopify_variants = [\"{}\"]", shopify_variant(product)),
            Channel::Native => format!("native_skus = [\"{}\"]", sku(product)),
        }
    }

    /// The order id Entitle records for the sale.
    pub fn channel_order_id(self, sale: &Sale) -> String {
        match self {
            Channel::Shopify => sale.shopify_id().to_string(),
            _ => sale.order.clone(),
        }
    }

    /// The sale is paid: the channel's purchase webhook.
    pub async fn purchase(self, app: &TestApp, sale: &Sale) -> reqwest::Response {
        self.purchase_signed(app, sale, Signing::Good).await
    }

    pub async fn purchase_signed(
        self,
        app: &TestApp,
        sale: &Sale,
        signing: Signing,
    ) -> reqwest::Response {
        match self {
            Channel::Stripe => {
                mount_line_items(&app.stripe, &sale.order, &stripe_items(sale)).await;
                let event_id = format!("evt_paid_{}", sale.order);
                let body = stripe_session_event(sale, &event_id, "checkout.session.completed");
                self.post(app, &event_id, "checkout.session.completed", &body, signing)
                    .await
            }
            Channel::Shopify => {
                let body = shopify_order(sale).to_string();
                self.post(
                    app,
                    &format!("wh_paid_{}", sale.order),
                    "orders/paid",
                    &body,
                    signing,
                )
                .await
            }
            Channel::Native => {
                let body = native_purchase(sale);
                self.post(
                    app,
                    &format!("msg_paid_{}", sale.order),
                    "purchase.paid",
                    &body.to_string(),
                    signing,
                )
                .await
            }
        }
    }

    /// The whole order is refunded.
    pub async fn refund_all(
        self,
        app: &TestApp,
        sale: &Sale,
        refund_id: &str,
    ) -> reqwest::Response {
        match self {
            Channel::Stripe => {
                let body = charge_refunded(
                    &format!("evt_{refund_id}"),
                    &sale.order,
                    sale.total(),
                    sale.total(),
                );
                self.post(
                    app,
                    &format!("evt_{refund_id}"),
                    "charge.refunded",
                    &body,
                    Signing::Good,
                )
                .await
            }
            Channel::Shopify => {
                let all: Vec<(Product, u32)> = sale.lines.clone();
                self.shopify_refund(app, sale, refund_id, &all).await
            }
            Channel::Native => {
                let body = json!({ "type": "purchase.refunded", "order_id": sale.order, "refund_id": refund_id });
                self.post(
                    app,
                    &format!("msg_{refund_id}"),
                    "purchase.refunded",
                    &body.to_string(),
                    Signing::Good,
                )
                .await
            }
        }
    }

    /// `units` of `product` are refunded; `refunded_before` units of the
    /// order were refunded earlier (Stripe reports cumulative amounts).
    pub async fn refund_units(
        self,
        app: &TestApp,
        sale: &Sale,
        refund_id: &str,
        product: Product,
        units: u32,
        refunded_before: u32,
    ) -> reqwest::Response {
        match self {
            Channel::Stripe => {
                let cumulative = i64::from(units + refunded_before) * UNIT_PRICE;
                let body = charge_refunded(
                    &format!("evt_{refund_id}"),
                    &sale.order,
                    sale.total(),
                    cumulative,
                );
                self.post(
                    app,
                    &format!("evt_{refund_id}"),
                    "charge.refunded",
                    &body,
                    Signing::Good,
                )
                .await
            }
            Channel::Shopify => {
                self.shopify_refund(app, sale, refund_id, &[(product, units)])
                    .await
            }
            Channel::Native => {
                let body = json!({
                    "type": "purchase.refunded",
                    "order_id": sale.order,
                    "refund_id": refund_id,
                    "lines": [{ "sku": sku(product), "quantity": units }],
                });
                self.post(
                    app,
                    &format!("msg_{refund_id}"),
                    "purchase.refunded",
                    &body.to_string(),
                    Signing::Good,
                )
                .await
            }
        }
    }

    /// The order is cancelled (Stripe: its delayed payment failed).
    pub async fn cancel(self, app: &TestApp, sale: &Sale) -> reqwest::Response {
        match self {
            Channel::Stripe => {
                let body = session_event(
                    &format!("evt_failed_{}", sale.order),
                    "checkout.session.async_payment_failed",
                    &sale.order,
                    &sale.buyer,
                    json!({}),
                    sale.total(),
                );
                self.post(
                    app,
                    &format!("evt_failed_{}", sale.order),
                    "checkout.session.async_payment_failed",
                    &body,
                    Signing::Good,
                )
                .await
            }
            Channel::Shopify => {
                let body = json!({
                    "id": sale.shopify_id(),
                    "email": sale.buyer,
                    "cancelled_at": Utc::now().to_rfc3339(),
                    "cancel_reason": "customer",
                    "financial_status": "voided",
                    "line_items": shopify_lines(sale),
                })
                .to_string();
                self.post(
                    app,
                    &format!("wh_cancel_{}", sale.order),
                    "orders/cancelled",
                    &body,
                    Signing::Good,
                )
                .await
            }
            Channel::Native => {
                let body = json!({ "type": "purchase.cancelled", "order_id": sale.order, "reason": "customer" });
                self.post(
                    app,
                    &format!("msg_cancel_{}", sale.order),
                    "purchase.cancelled",
                    &body.to_string(),
                    Signing::Good,
                )
                .await
            }
        }
    }

    async fn shopify_refund(
        self,
        app: &TestApp,
        sale: &Sale,
        refund_id: &str,
        lines: &[(Product, u32)],
    ) -> reqwest::Response {
        let body = shopify_refund(sale, refund_id, lines);
        self.post(
            app,
            &format!("wh_{refund_id}"),
            "refunds/create",
            &body.to_string(),
            Signing::Good,
        )
        .await
    }

    /// Posts a body to this channel's webhook, signed as asked. `event_id`
    /// is the channel's delivery id (what its retries share).
    pub async fn post(
        self,
        app: &TestApp,
        event_id: &str,
        topic: &str,
        body: &str,
        signing: Signing,
    ) -> reqwest::Response {
        self.post_bytes(app, event_id, topic, body.as_bytes(), signing)
            .await
    }

    /// [`Channel::post`] for a body that need not be text.
    pub async fn post_bytes(
        self,
        app: &TestApp,
        event_id: &str,
        topic: &str,
        body: &[u8],
        signing: Signing,
    ) -> reqwest::Response {
        let now = Utc::now();
        let url = format!("{}/webhooks/{}", app.address, self.name());
        let request = app
            .http
            .post(url)
            .header("content-type", "application/json");
        let request = match self {
            Channel::Stripe => {
                let (secret, t) = match signing {
                    Signing::Good | Signing::Rotated => (STRIPE_WEBHOOK_SECRET, now.timestamp()),
                    Signing::WrongSecret => ("whsec_not_ours", now.timestamp()),
                    Signing::Stale => (STRIPE_WEBHOOK_SECRET, now.timestamp() - 600),
                };
                let mut header = stripe_channel::sign(body, secret, t);
                if signing == Signing::Rotated {
                    // Stripe sends one v1 per active secret while rolling.
                    let other = stripe_channel::sign(body, "whsec_new_unknown", t);
                    header = format!("{other},{}", header.split(',').nth(1).unwrap());
                }
                request.header("stripe-signature", header)
            }
            Channel::Shopify => {
                let (secret, triggered) = match signing {
                    Signing::Good => (SHOPIFY_SECRET, now),
                    Signing::Rotated => (SHOPIFY_PREVIOUS_SECRET, now),
                    Signing::WrongSecret => ("shpss_not_ours", now),
                    Signing::Stale => (SHOPIFY_SECRET, now - chrono::Duration::days(3)),
                };
                request
                    .header("x-shopify-hmac-sha256", shopify::sign(body, secret))
                    .header("x-shopify-topic", topic)
                    .header("x-shopify-webhook-id", event_id)
                    .header("x-shopify-shop-domain", "entitle-test.myshopify.com")
                    .header("x-shopify-api-version", "2025-01")
                    .header("x-shopify-triggered-at", triggered.to_rfc3339())
            }
            Channel::Native => {
                let t = match signing {
                    Signing::Stale => now.timestamp() - 600,
                    _ => now.timestamp(),
                };
                let signature = match signing {
                    Signing::WrongSecret => {
                        native::sign(event_id, t, body, "whsec_bm90LW91cnMtYXQtYWxs")
                    }
                    Signing::Rotated => format!(
                        "{} {}",
                        native::sign(event_id, t, body, "whsec_bmV4dC1zZWNyZXQtbm90LXlldA=="),
                        native::sign(event_id, t, body, NATIVE_SECRET)
                    ),
                    _ => native::sign(event_id, t, body, NATIVE_SECRET),
                };
                request
                    .header("webhook-id", event_id)
                    .header("webhook-timestamp", t.to_string())
                    .header("webhook-signature", signature)
            }
        };
        request
            .body(body.to_vec())
            .send()
            .await
            .expect("the gateway answers")
    }
}

/// The price ids and quantities of a sale's Stripe line items.
fn stripe_items(sale: &Sale) -> Vec<(&'static str, u32)> {
    sale.lines
        .iter()
        .map(|(p, q)| (stripe_price(*p), *q))
        .collect()
}

/// A Checkout Session event for the sale, as Stripe sends it.
pub fn stripe_session_event(sale: &Sale, event_id: &str, event_type: &str) -> String {
    let mut metadata = json!({});
    if let Some(account) = &sale.account_id {
        metadata["account_id"] = json!(account);
    }
    if let Some(g) = &sale.gift {
        metadata["gift_recipient_email"] = json!(g.recipient_email);
        metadata["gift_recipient_name"] = json!(g.recipient_name);
        metadata["gift_message"] = json!(g.message);
        if let Some(t) = g.send_at {
            metadata["gift_send_at"] = json!(t.to_rfc3339());
        }
    }
    session_event(
        event_id,
        event_type,
        &sale.order,
        &sale.buyer,
        metadata,
        sale.total(),
    )
}

/// The sale's Checkout Session as Stripe's API lists it, with its line items
/// expanded.
pub fn stripe_session(sale: &Sale) -> Value {
    let event: Value = serde_json::from_str(&stripe_session_event(
        sale,
        "evt_listed",
        "checkout.session.completed",
    ))
    .expect("fixtures are JSON");
    let mut session = event["data"]["object"].clone();
    session["line_items"] = line_items_page(&sale.order, &stripe_items(sale), false);
    session
}

/// The sale's charge after `amount_refunded` (cumulative) came back, as
/// Stripe's API shows it.
pub fn stripe_charge(sale: &Sale, amount_refunded: i64) -> Value {
    let event: Value = serde_json::from_str(&charge_refunded(
        "evt_listed",
        &sale.order,
        sale.total(),
        amount_refunded,
    ))
    .expect("fixtures are JSON");
    event["data"]["object"].clone()
}

/// The sale as the native checkout's `purchase.paid` body.
pub fn native_purchase(sale: &Sale) -> Value {
    let mut body = json!({
        "type": "purchase.paid",
        "order_id": sale.order,
        "buyer": { "email": sale.buyer, "name": "Ada Buyer" },
        "currency": "EUR",
        "amount_total": sale.total(),
        "lines": sale.lines.iter().map(|(p, q)| json!({ "sku": sku(*p), "quantity": q, "unit_amount": UNIT_PRICE })).collect::<Vec<_>>(),
    });
    if let Some(account) = &sale.account_id {
        body["account_id"] = json!(account);
    }
    if let Some(g) = &sale.gift {
        body["gift"] = json!({
            "recipient_email": g.recipient_email,
            "recipient_name": g.recipient_name,
            "message": g.message,
        });
        if let Some(t) = g.send_at {
            body["gift"]["send_at"] = json!(t.to_rfc3339());
        }
    }
    body
}

/// The sale as a Shopify order (the `orders/paid` body, and what the Admin
/// API lists).
pub fn shopify_order(sale: &Sale) -> Value {
    let mut attributes = Vec::new();
    if let Some(account) = &sale.account_id {
        attributes.push(json!({ "name": "account_id", "value": account }));
    }
    if let Some(g) = &sale.gift {
        attributes.push(json!({ "name": "gift_recipient_email", "value": g.recipient_email }));
        attributes.push(json!({ "name": "gift_recipient_name", "value": g.recipient_name }));
        attributes.push(json!({ "name": "gift_message", "value": g.message }));
        if let Some(t) = g.send_at {
            attributes.push(json!({ "name": "gift_send_at", "value": t.to_rfc3339() }));
        }
    }
    json!({
        "id": sale.shopify_id(),
        "admin_graphql_api_id": format!("gid://shopify/Order/{}", sale.shopify_id()),
        "name": format!("#{}", sale.shopify_id() % 10000),
        "email": sale.buyer,
        "contact_email": sale.buyer,
        "created_at": Utc::now().to_rfc3339(),
        "processed_at": Utc::now().to_rfc3339(),
        "updated_at": Utc::now().to_rfc3339(),
        "cancelled_at": null,
        "currency": "EUR",
        "financial_status": "paid",
        "total_price": format!("{}.00", sale.total() / 100),
        "customer": { "id": 115310627314723954u64, "email": sale.buyer, "first_name": "Ada", "last_name": "Buyer" },
        "note_attributes": attributes,
        "line_items": shopify_lines(sale),
        "refunds": [],
    })
}

/// A Shopify refund of `lines` of the sale (the `refunds/create` body, and
/// an entry of the order's `refunds`).
pub fn shopify_refund(sale: &Sale, refund_id: &str, lines: &[(Product, u32)]) -> Value {
    let refund_lines: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(i, (product, quantity))| {
            json!({
                "id": 100 + i,
                "quantity": quantity,
                "line_item_id": 5000 + shopify_variant(*product) % 1000,
                "restock_type": "no_restock",
                "subtotal": (i64::from(*quantity) * UNIT_PRICE) as f64 / 100.0,
                "line_item": shopify_line(*product, *quantity),
            })
        })
        .collect();
    // Shopify's refund id is numeric: derive one from the test's refund id.
    json!({
        "id": numeric_id(refund_id),
        "order_id": sale.shopify_id(),
        "created_at": Utc::now().to_rfc3339(),
        "note": "test refund",
        "restock": false,
        "refund_line_items": refund_lines,
        "transactions": [{ "kind": "refund", "status": "success", "gateway": "bogus" }],
    })
}

/// A stable Shopify-style numeric id for a test's name (FNV-1a).
fn numeric_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    }) % 10_000_000_000
}

fn shopify_line(product: Product, quantity: u32) -> Value {
    json!({
        "id": 5000 + shopify_variant(product) % 1000,
        "variant_id": shopify_variant(product),
        "product_id": 8800000000u64 + shopify_variant(product) % 1000,
        "sku": sku(product),
        "title": sku(product),
        "quantity": quantity,
        "price": format!("{}.00", UNIT_PRICE / 100),
        "properties": [],
        "requires_shipping": false,
        "gift_card": false,
    })
}

fn shopify_lines(sale: &Sale) -> Vec<Value> {
    sale.lines
        .iter()
        .map(|(p, q)| shopify_line(*p, *q))
        .collect()
}

/// Operations map the product the catalogue lacked (`Product::Unmapped`,
/// as BUNDLE-NEW for `channel`) and load the catalogue again.
pub async fn map_unmapped_product(app: &crate::TestApp, channel: Channel) {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ops/catalogue.toml"
    ))
    .expect("the shipped catalogue");
    let fixed = format!(
        "{shipped}\n[[product]]\nsku = \"BUNDLE-NEW\"\nname = \"New bundle\"\nvalidity_days = 90\n{}\n",
        channel.catalogue_line(Product::Unmapped)
    );
    let file =
        std::env::temp_dir().join(format!("entitle-catalogue-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, fixed).expect("the fixed catalogue is written");
    entitle_jobs::catalogue::Catalogue::load(&file)
        .expect("the fixed catalogue loads")
        .sync(&app.pool, "test:operator", "the product was missing")
        .await
        .expect("the fixed catalogue is synchronised");
    let _ = std::fs::remove_file(&file);
}
