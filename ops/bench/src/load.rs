//! The load the pipeline benchmarks send: signed native `purchase.paid`
//! webhooks (which the worker fulfils) and signed Stripe events (which
//! intake files), prepared before the clock starts, posted by many
//! connections at once (as fast as the gateway answers) or at a steady rate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use entitle_jobs::channel::{native, shopify, stripe};
use hdrhistogram::Histogram;

use crate::stack::{NATIVE_SECRET, SHOPIFY_SECRET, STRIPE_SECRET};

/// One webhook ready to post.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The channel's webhook route, e.g. `/webhooks/native`.
    pub path: &'static str,
    pub event_id: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// `n` one-unit purchases, ids prefixed with `run` so phases never collide.
pub fn purchases(run: &str, n: usize) -> Vec<Webhook> {
    let timestamp = chrono::Utc::now().timestamp();
    (0..n)
        .map(|i| native_purchase(run, i, 1, timestamp))
        .collect()
}

/// One signed native `purchase.paid` of `units` units of the basic kit,
/// order `ord_{run}_{i}`, signed at `timestamp`.
pub fn native_purchase(run: &str, i: usize, units: u32, timestamp: i64) -> Webhook {
    let event_id = format!("evt_{run}_{i}");
    let total = 2000 * i64::from(units);
    let body = format!(
        r#"{{"type":"purchase.paid","order_id":"ord_{run}_{i}","buyer":{{"email":"buyer{i}@example.com","name":"Buyer {i}"}},"currency":"EUR","amount_total":{total},"lines":[{{"sku":"KIT-BASIC","quantity":{units},"unit_amount":2000}}]}}"#
    );
    let signature = native::sign(&event_id, timestamp, body.as_bytes(), NATIVE_SECRET);
    Webhook {
        path: "/webhooks/native",
        headers: vec![
            ("webhook-id", event_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ],
        event_id,
        body,
    }
}

/// One signed Shopify `orders/paid` for order `id` of `units` units of the
/// basic kit (by variant id and SKU, as Shopify sends both).
pub fn shopify_paid(run: &str, id: u64, i: usize, units: u32) -> Webhook {
    let event_id = format!("wh_{run}_{i}");
    let body = serde_json::json!({
        "id": id,
        "name": format!("#{id}"),
        "email": format!("buyer{i}@example.com"),
        "financial_status": "paid",
        "cancelled_at": null,
        "currency": "EUR",
        "total_price": format!("{}.00", 20 * units),
        "processed_at": chrono::Utc::now().to_rfc3339(),
        "customer": {"email": format!("buyer{i}@example.com"), "first_name": "Buyer", "last_name": i.to_string()},
        "note_attributes": [],
        "line_items": [{
            "id": id * 10 + 1,
            "variant_id": 44610000001u64,
            "sku": "KIT-BASIC",
            "title": "Basic test kit",
            "quantity": units,
            "price": "20.00",
            "properties": []
        }]
    })
    .to_string();
    let signature = shopify::sign(body.as_bytes(), SHOPIFY_SECRET);
    Webhook {
        path: "/webhooks/shopify",
        headers: vec![
            ("x-shopify-hmac-sha256", signature),
            ("x-shopify-webhook-id", event_id.clone()),
            ("x-shopify-topic", "orders/paid".to_owned()),
            ("x-shopify-triggered-at", chrono::Utc::now().to_rfc3339()),
        ],
        event_id,
        body,
    }
}

/// `n` signed Stripe `checkout.session.completed` events of about 1.6 KB,
/// the size of the floor's row and of a real Stripe event.
pub fn stripe_events(run: &str, n: usize) -> Vec<Webhook> {
    let timestamp = chrono::Utc::now().timestamp();
    (0..n)
        .map(|i| {
            let session = format!("cs_test_{run}_{i:08}_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8");
            stripe_session_completed(run, i, &session, timestamp)
        })
        .collect()
}

/// One signed `checkout.session.completed` for Checkout Session `session`
/// (its line items, and so its units, come from Stripe's API).
pub fn stripe_session_completed(run: &str, i: usize, session: &str, timestamp: i64) -> Webhook {
    let event_id = format!("evt_{run}_{i:08}");
    let body = serde_json::json!({
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": timestamp,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": session,
            "object": "checkout.session",
            "amount_subtotal": 2000,
            "amount_total": 2000,
            "currency": "eur",
            "customer": format!("cus_{run}{i:08}"),
            "customer_details": {
                "address": {"city": "Berlin", "country": "DE", "line1": "Hauptstraße 1",
                            "line2": null, "postal_code": "10115", "state": null},
                "email": format!("buyer{i}@example.com"),
                "name": format!("Buyer {i}"),
                "phone": null,
                "tax_exempt": "none",
                "tax_ids": []
            },
            "client_reference_id": null,
            "created": timestamp,
            "expires_at": timestamp + 86_400,
            "livemode": false,
            "locale": "auto",
            "metadata": {"campaign": "benchmark", "gift": "false"},
            "mode": "payment",
            "payment_intent": format!("pi_{run}_{i:08}_3Pq9Rs2Tu1Vw0Xy"),
            "payment_method_types": ["card"],
            "payment_status": "paid",
            "status": "complete",
            "success_url": "https://shop.example.com/thanks?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://shop.example.com/cart",
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "automatic_tax": {"enabled": false, "liability": null, "status": null},
            "billing_address_collection": null,
            "consent": null,
            "consent_collection": null,
            "custom_fields": [],
            "custom_text": {"after_submit": null, "shipping_address": null, "submit": null,
                            "terms_of_service_acceptance": null},
            "customer_creation": "if_required",
            "invoice": null,
            "invoice_creation": {"enabled": false, "invoice_data": {"account_tax_ids": null,
                "custom_fields": null, "description": null, "footer": null, "metadata": {}}},
            "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
            "phone_number_collection": {"enabled": false},
            "shipping_address_collection": null,
            "shipping_cost": null,
            "shipping_details": null,
            "ui_mode": "hosted",
            "url": null
        }}
    })
    .to_string();
    let signature = stripe::sign(body.as_bytes(), STRIPE_SECRET, timestamp);
    Webhook {
        path: "/webhooks/stripe",
        headers: vec![("stripe-signature", signature)],
        event_id,
        body,
    }
}

/// What posting measured.
pub struct Posted {
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    /// When each webhook was sent (it was answered 200), by event id.
    pub sent_at: Vec<(String, Instant)>,
}

impl Posted {
    pub fn p(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client")
}

/// Posts one webhook; returns when it was sent and how long the answer took.
async fn post_one(
    http: &reqwest::Client,
    gateway: &str,
    hook: &Webhook,
) -> anyhow::Result<(Instant, Duration)> {
    let started = Instant::now();
    let mut request = http
        .post(format!("{gateway}{}", hook.path))
        .header("content-type", "application/json");
    for (name, value) in &hook.headers {
        request = request.header(*name, value);
    }
    let response = request.body(hook.body.clone()).send().await?;
    let status = response.status();
    let _ = response.bytes().await?;
    if !status.is_success() {
        bail!("the gateway answered {status} to {}", hook.event_id);
    }
    Ok((started, started.elapsed()))
}

/// Posts every webhook over `connections` connections as fast as answers
/// come back.
pub async fn post_all(
    gateway: &str,
    hooks: Vec<Webhook>,
    connections: usize,
) -> anyhow::Result<Posted> {
    let url = gateway.to_owned();
    let http = client(connections);
    let hooks = Arc::new(hooks);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (http, url, hooks, next) = (http.clone(), url.clone(), hooks.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("a histogram");
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(hook) = hooks.get(i) else { break };
                let (at, took) = post_one(&http, &url, hook).await?;
                histogram.record(took.as_micros() as u64).ok();
                sent.push((hook.event_id.clone(), at));
            }
            anyhow::Ok((histogram, sent))
        }));
    }
    let mut latency = Histogram::<u64>::new(3).expect("a histogram");
    let mut sent_at = Vec::new();
    for task in tasks {
        let (histogram, sent) = task.await??;
        latency.add(histogram).ok();
        sent_at.extend(sent);
    }
    Ok(Posted {
        elapsed: started.elapsed(),
        latency,
        sent_at,
    })
}

/// Posts the webhooks at `rate` a second (each on its own task, so a slow
/// answer does not slow the rate).
pub async fn post_at_rate(gateway: &str, hooks: Vec<Webhook>, rate: f64) -> anyhow::Result<Posted> {
    let url = gateway.to_owned();
    let http = client(64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(hooks.len());
    for (i, hook) in hooks.into_iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (at, took) = post_one(&http, &url, &hook).await?;
            anyhow::Ok((hook.event_id, took, at))
        }));
    }
    let mut latency = Histogram::<u64>::new(3).expect("a histogram");
    let mut sent_at = Vec::new();
    for task in tasks {
        let (event_id, took, at) = task.await??;
        latency.record(took.as_micros() as u64).ok();
        sent_at.push((event_id, at));
    }
    Ok(Posted {
        elapsed: started.elapsed(),
        latency,
        sent_at,
    })
}
