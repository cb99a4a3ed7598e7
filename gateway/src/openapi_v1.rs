//! The channel webhooks as the OpenAPI document describes them, and the
//! platform API's router (its handlers carry their own operations). The
//! webhook bodies are the channels' formats, which `jobs/src/channel/*`
//! reads through private serde types, so their operations are declared here
//! on doc-only functions with documented mirrors of what Entitle reads; the
//! tests validate the channels' real bodies against them
//! (tests/tests/http_contract.rs).

#![allow(dead_code)] // The functions and mirrors here are only documentation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::{AppState, error::ErrorBody};

/// The platform API and the webhooks: the real routers, with the
/// operations that describe them.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(Described::openapi())
        .merge(crate::routes::redemptions::router())
        .merge(OpenApiRouter::from(crate::routes::webhooks::router()))
}

#[derive(OpenApi)]
#[openapi(paths(stripe_webhook, shopify_webhook, native_webhook))]
struct Described;

// ------------------------------------------------------------ webhooks

/// An event filed (mirrors the answer of `routes::webhooks`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookReceipt {
    /// Always true: the event is stored and will be processed.
    pub received: bool,
    /// Entitle's id of the event (`GET /admin/v1/events`).
    pub event: Uuid,
    /// The channel sent this event before; it is processed once.
    pub duplicate: bool,
}

/// An id a channel sends as text or as a number.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TextOrNumber {
    Text(String),
    Number(i64),
}

/// A Stripe event, as much of it as Entitle reads (Stripe sends more; the
/// rest is ignored and kept).
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeEvent {
    /// `evt_…`: duplicates are recognised by it.
    pub id: String,
    /// Acted on: `checkout.session.completed`,
    /// `checkout.session.async_payment_succeeded` (a purchase when paid),
    /// `checkout.session.async_payment_failed` (a cancellation),
    /// `charge.refunded` (a refund). Any other type is acknowledged and
    /// needs no action.
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: StripeEventData,
}

/// The object the event is about.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeEventData {
    pub object: StripeObject,
}

/// A Checkout Session for `checkout.session.*`, a Charge for
/// `charge.refunded`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StripeObject {
    CheckoutSession(Box<StripeCheckoutSession>),
    Charge(StripeCharge),
}

/// A Checkout Session. Its line items are read from Stripe's API with the
/// configured key, not from the event.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeCheckoutSession {
    /// `cs_…`: the order's id in Entitle's records of this channel.
    pub id: String,
    /// Which kind of object: Stripe always says.
    pub object: CheckoutSessionObject,
    /// `paid` or `no_payment_required` issue codes; `unpaid` waits for
    /// `async_payment_succeeded`.
    pub payment_status: Option<String>,
    pub customer_email: Option<String>,
    pub customer_details: Option<StripeCustomerDetails>,
    /// The buyer's platform account, when `metadata.account_id` is absent.
    pub client_reference_id: Option<String>,
    /// `account_id`; a gift: `gift_recipient_email`, `gift_recipient_name`,
    /// `gift_message`, `gift_send_at` (RFC 3339 or `YYYY-MM-DD`).
    #[serde(default)]
    pub metadata: std::collections::HashMap<String, String>,
    /// Minor units.
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    /// Unix seconds.
    pub created: Option<i64>,
    pub payment_intent: Option<String>,
    /// A gift through Checkout's custom fields: the keys
    /// `giftrecipientemail`, `giftrecipientname`, `giftmessage`, `giftsendat`.
    #[serde(default)]
    pub custom_fields: Vec<StripeCustomField>,
}

/// `checkout.session`.
#[derive(Debug, Deserialize, ToSchema)]
pub enum CheckoutSessionObject {
    #[serde(rename = "checkout.session")]
    CheckoutSession,
}

/// `charge`.
#[derive(Debug, Deserialize, ToSchema)]
pub enum ChargeObject {
    #[serde(rename = "charge")]
    Charge,
}

/// The buyer as Checkout collected them.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeCustomerDetails {
    pub email: Option<String>,
    pub name: Option<String>,
}

/// A Checkout custom field.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeCustomField {
    pub key: String,
    pub text: Option<StripeTextValue>,
}

/// A custom field's text.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeTextValue {
    pub value: Option<String>,
}

/// A refunded Charge.
#[derive(Debug, Deserialize, ToSchema)]
pub struct StripeCharge {
    pub id: String,
    /// Which kind of object: Stripe always says.
    pub object: ChargeObject,
    /// Names the session's order.
    pub payment_intent: Option<String>,
    /// Cumulative, minor units: a partial refund revokes as many units as
    /// it pays for (on an order of one line).
    pub amount_refunded: i64,
    /// Fully refunded: every unredeemed code is revoked.
    pub refunded: bool,
}

/// The Stripe webhook's headers.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct StripeSignature {
    /// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{body}">` under a
    /// secret of `stripe.webhook_secrets`; at most 300 s old.
    #[param(rename = "Stripe-Signature")]
    pub stripe_signature: String,
}

/// Stripe Checkout's webhook: purchases, failed payments and refunds.
///
/// The signature is checked on the raw body before anything is stored; an
/// authentic event is filed once (its id recognises duplicates) and
/// processed by a worker.
#[utoipa::path(
    post, path = "/webhooks/stripe", tag = "webhooks",
    params(StripeSignature),
    request_body = StripeEvent,
    extensions(("x-entitle-role" = json!("public")), ("x-entitle-signature" = json!("stripe"))),
    responses(
        (status = 200, description = "Filed (or filed before: `duplicate`)", body = WebhookReceipt),
        (status = 400, description = "`signature_missing`, `signature_malformed`, `signature_stale`, `signature_mismatch` (nothing stored); `event_malformed` (authentic, kept and marked failed)", body = ErrorBody),
        (status = 404, description = "`channel_not_configured`: no secret is configured for Stripe", body = ErrorBody),
    ),
)]
fn stripe_webhook() {}

/// A Shopify order, as much of it as Entitle reads (for `orders/paid` and
/// `orders/cancelled`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ShopifyOrder {
    /// The order's id in Entitle's records of this channel.
    pub id: TextOrNumber,
    pub email: Option<String>,
    pub contact_email: Option<String>,
    pub customer: Option<ShopifyCustomer>,
    /// Shopify always sends them (it tells an order from a refund).
    pub line_items: Vec<ShopifyLineItem>,
    /// A gift and the buyer's account: `gift_recipient_email`,
    /// `gift_recipient_name`, `gift_message`, `gift_send_at`, `account_id`.
    #[serde(default)]
    pub note_attributes: Vec<ShopifyNameValue>,
    /// Decimal text in the order's currency, e.g. `"49.00"`.
    pub total_price: Option<String>,
    pub currency: Option<String>,
    pub processed_at: Option<DateTime<Utc>>,
    /// `orders/paid` issues codes only for `paid` (and the like).
    pub financial_status: Option<String>,
    /// Set on a cancelled order; `orders/cancelled` needs it.
    pub cancelled_at: Option<DateTime<Utc>>,
}

/// The buyer.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ShopifyCustomer {
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// A line of a Shopify order: its variant or SKU names the product.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ShopifyLineItem {
    /// Mapped as `variant:<id>` in the catalogue.
    pub variant_id: Option<TextOrNumber>,
    /// Mapped as `sku:<sku>` in the catalogue.
    pub sku: Option<String>,
    pub quantity: u32,
    /// Decimal text.
    pub price: Option<String>,
    /// Line properties; gift fields may sit here too.
    #[serde(default)]
    pub properties: Vec<ShopifyNameValue>,
}

/// A name and a value (text or a number).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ShopifyNameValue {
    pub name: String,
    pub value: Option<TextOrNumber>,
}

/// A Shopify refund (for `refunds/create`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ShopifyRefund {
    pub id: TextOrNumber,
    pub order_id: TextOrNumber,
    /// The units refunded; a refund of none needs no action.
    pub refund_line_items: Vec<ShopifyRefundLineItem>,
}

/// Units of a line refunded.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ShopifyRefundLineItem {
    pub quantity: u32,
    pub line_item: ShopifyLineItem,
}

/// An order for `orders/paid` and `orders/cancelled`, a refund for
/// `refunds/create` (the `X-Shopify-Topic` header says which).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ShopifyBody {
    Order(Box<ShopifyOrder>),
    Refund(ShopifyRefund),
}

/// The Shopify webhook's headers.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ShopifyHeaders {
    /// Base64 HMAC-SHA256 of the body under a secret of
    /// `shopify.webhook_secrets`.
    #[param(rename = "X-Shopify-Hmac-Sha256")]
    pub hmac: String,
    /// `orders/paid`, `orders/cancelled` or `refunds/create`; other topics
    /// are acknowledged and need no action.
    #[param(rename = "X-Shopify-Topic")]
    pub topic: String,
    /// Duplicates are recognised by it.
    #[param(rename = "X-Shopify-Webhook-Id")]
    pub webhook_id: String,
    /// RFC 3339; an event older than `shopify.max_event_age_secs` is refused.
    #[param(rename = "X-Shopify-Triggered-At")]
    pub triggered_at: Option<String>,
}

/// Shopify's webhook: paid and cancelled orders, refunds.
#[utoipa::path(
    post, path = "/webhooks/shopify", tag = "webhooks",
    params(ShopifyHeaders),
    request_body = ShopifyBody,
    extensions(("x-entitle-role" = json!("public")), ("x-entitle-signature" = json!("shopify"))),
    responses(
        (status = 200, description = "Filed (or filed before: `duplicate`)", body = WebhookReceipt),
        (status = 400, description = "`signature_missing`, `signature_malformed`, `signature_stale`, `signature_mismatch` (nothing stored); `event_malformed` (authentic, kept and marked failed)", body = ErrorBody),
        (status = 404, description = "`channel_not_configured`: no secret is configured for Shopify", body = ErrorBody),
    ),
)]
fn shopify_webhook() {}

/// The native checkout's event: its schema is the one published in
/// `ops/schemas/native-webhook.schema.json`, which the document carries
/// (see [`native_schemas`]).
pub struct NativeEvent;

impl utoipa::PartialSchema for NativeEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .description(Some(
                "The published native webhook schema; see the document's components.",
            ))
            .into()
    }
}

impl ToSchema for NativeEvent {}

/// The native checkout webhook's headers (Standard Webhooks).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct StandardWebhooks {
    /// Unique per event (retries reuse it): duplicates are recognised by it.
    #[param(rename = "webhook-id")]
    pub id: String,
    /// Unix seconds, within 300 s.
    #[param(rename = "webhook-timestamp")]
    pub timestamp: String,
    /// Space-separated `v1,<base64 HMAC-SHA256 of
    /// "{webhook-id}.{webhook-timestamp}.{body}">` under the base64 key
    /// after `whsec_` of a secret of `native.webhook_secrets`.
    #[param(rename = "webhook-signature")]
    pub signature: String,
}

/// The native checkout's webhook: purchases, refunds and cancellations.
#[utoipa::path(
    post, path = "/webhooks/native", tag = "webhooks",
    params(StandardWebhooks),
    request_body = NativeEvent,
    extensions(("x-entitle-role" = json!("public")), ("x-entitle-signature" = json!("standard-webhooks"))),
    responses(
        (status = 200, description = "Filed (or filed before: `duplicate`)", body = WebhookReceipt),
        (status = 400, description = "`signature_missing`, `signature_malformed`, `signature_stale`, `signature_mismatch` (nothing stored); `event_malformed` (authentic, kept and marked failed)", body = ErrorBody),
        (status = 404, description = "`channel_not_configured`: no secret is configured for the native checkout", body = ErrorBody),
    ),
)]
fn native_webhook() {}

/// The published native webhook schema, as component schemas: `NativeEvent`
/// (its top level) and one `Native…` per definition, with its references
/// pointed at them. Published once, in `ops/schemas`, for the platform's
/// checkout to validate against; the document carries the same text.
pub fn native_schemas() -> Vec<(String, Value)> {
    let published: Value =
        serde_json::from_str(include_str!("../../ops/schemas/native-webhook.schema.json"))
            .expect("ops/schemas/native-webhook.schema.json is JSON");
    let component = |definition: &str| {
        let mut name = String::from("Native");
        let mut chars = definition.chars();
        if let Some(first) = chars.next() {
            name.extend(first.to_uppercase());
            name.extend(chars);
        }
        name
    };
    let mut schemas = Vec::new();
    let mut top = published.clone();
    if let Some(object) = top.as_object_mut() {
        object.remove("$schema");
        object.remove("$id");
        if let Some(Value::Object(definitions)) = object.remove("$defs") {
            for (definition, mut schema) in definitions {
                repoint(&mut schema, &component);
                schemas.push((component(&definition), schema));
            }
        }
    }
    repoint(&mut top, &component);
    schemas.insert(0, ("NativeEvent".to_owned(), top));
    schemas
}

/// Points `#/$defs/x` references at the component named `component(x)`.
fn repoint(schema: &mut Value, component: &dyn Fn(&str) -> String) {
    match schema {
        Value::Object(object) => {
            for (key, value) in object.iter_mut() {
                match (key.as_str(), value.as_str()) {
                    ("$ref", Some(target)) => {
                        if let Some(definition) = target.strip_prefix("#/$defs/") {
                            *value =
                                json!(format!("#/components/schemas/{}", component(definition)));
                        }
                    }
                    _ => repoint(value, component),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| repoint(item, component)),
        _ => {}
    }
}
