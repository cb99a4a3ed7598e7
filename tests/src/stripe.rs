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
