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
use entitle_jobs::channel::{native, stripe};
use hdrhistogram::Histogram;

use crate::stack::{NATIVE_SECRET, STRIPE_SECRET};

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
        .map(|i| {
            let event_id = format!("evt_{run}_{i}");
            let body = format!(
                r#"{{"type":"purchase.paid","order_id":"ord_{run}_{i}","buyer":{{"email":"buyer{i}@example.com","name":"Buyer {i}"}},"currency":"EUR","amount_total":2000,"lines":[{{"sku":"KIT-BASIC","quantity":1,"unit_amount":2000}}]}}"#
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
        })
        .collect()
}

/// `n` signed Stripe `checkout.session.completed` events of about 1.6 KB,
/// the size of the floor's row and of a real Stripe event.
pub fn stripe_events(run: &str, n: usize) -> Vec<Webhook> {
    let timestamp = chrono::Utc::now().timestamp();
    (0..n)
        .map(|i| {
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
                    "id": format!("cs_test_{run}_{i:08}_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
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
        })
        .collect()
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
