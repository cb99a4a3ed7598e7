//! Stripe fixtures shaped like Stripe's documented payloads: events, Checkout
//! Sessions and line-item lists, and a wiremock stand-in for the API.

use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method, path},
};

/// A `checkout.session.completed` (or other `event_type`) event for a session.
pub fn checkout_event(
    event_id: &str,
    event_type: &str,
    session_id: &str,
    buyer_email: &str,
    payment_status: &str,
) -> String {
    json!({
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": event_type,
        "data": {
            "object": {
                "id": session_id,
                "object": "checkout.session",
                "amount_subtotal": 6000,
                "amount_total": 6000,
                "client_reference_id": "acct_42",
                "created": chrono::Utc::now().timestamp(),
                "currency": "eur",
                "customer": null,
                "customer_details": {
                    "email": buyer_email,
                    "name": "Ada Buyer",
                    "phone": null,
                    "tax_exempt": "none",
                    "address": { "country": "DE" }
                },
                "customer_email": null,
                "livemode": false,
                "metadata": {},
                "mode": "payment",
                "payment_intent": "pi_3Test",
                "payment_status": payment_status,
                "status": "complete",
                "url": null
            }
        }
    })
    .to_string()
}

/// A Checkout Session event as Stripe sends it, with the session's metadata
/// (gift fields), its PaymentIntent and its total.
pub fn session_event(
    event_id: &str,
    event_type: &str,
    session_id: &str,
    buyer_email: &str,
    metadata: Value,
    amount_total: i64,
) -> String {
    let mut event: Value = serde_json::from_str(&checkout_event(
        event_id,
        event_type,
        session_id,
        buyer_email,
        "paid",
    ))
    .unwrap();
    let session = &mut event["data"]["object"];
    session["metadata"] = metadata;
    session["payment_intent"] = json!(payment_intent(session_id));
    session["amount_total"] = json!(amount_total);
    session["amount_subtotal"] = json!(amount_total);
    event.to_string()
}

/// The PaymentIntent the fixtures give a session.
pub fn payment_intent(session_id: &str) -> String {
    format!("pi_{session_id}")
}

/// A `charge.refunded` event for a session's charge: `amount_refunded` is
/// cumulative, `refunded` tells whether the whole charge is refunded.
pub fn charge_refunded(
    event_id: &str,
    session_id: &str,
    amount: i64,
    amount_refunded: i64,
) -> String {
    json!({
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "type": "charge.refunded",
        "data": {
            "object": {
                "id": format!("ch_{session_id}"),
                "object": "charge",
                "amount": amount,
                "amount_captured": amount,
                "amount_refunded": amount_refunded,
                "currency": "eur",
                "paid": true,
                "payment_intent": payment_intent(session_id),
                "refunded": amount_refunded >= amount,
                "status": "succeeded"
            }
        }
    })
    .to_string()
}

/// A paid `checkout.session.completed`.
pub fn paid_session(event_id: &str, session_id: &str, buyer_email: &str) -> String {
    checkout_event(
        event_id,
        "checkout.session.completed",
        session_id,
        buyer_email,
        "paid",
    )
}

/// One page of a session's line items: `(price id, quantity)` pairs.
pub fn line_items_page(session_id: &str, items: &[(&str, u32)], has_more: bool) -> Value {
    let data: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, (price, quantity))| {
            json!({
                "id": format!("li_{session_id}_{price}_{i}"),
                "object": "item",
                "amount_discount": 0,
                "amount_subtotal": 2000 * quantity,
                "amount_tax": 0,
                "amount_total": 2000 * quantity,
                "currency": "eur",
                "description": "Test kit",
                "price": {
                    "id": price,
                    "object": "price",
                    "active": true,
                    "currency": "eur",
                    "product": "prod_Test",
                    "type": "one_time",
                    "unit_amount": 2000
                },
                "quantity": quantity
            })
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "url": format!("/v1/checkout/sessions/{session_id}/line_items")
    })
}

/// The API path of a session's line items.
pub fn line_items_path(session_id: &str) -> String {
    format!("/v1/checkout/sessions/{session_id}/line_items")
}

/// Makes the stand-in Stripe API answer a session's line items in one page.
pub async fn mount_line_items(server: &MockServer, session_id: &str, items: &[(&str, u32)]) {
    Mock::given(method("GET"))
        .and(path(line_items_path(session_id)))
        .and(header("authorization", "Bearer sk_test_entitle"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(line_items_page(session_id, items, false)),
        )
        .mount(server)
        .await;
}
