//! A stand-in for Stripe's API that generates its lists on the fly: session
//! `n` of `1..=orders` is `cs_bench_{n:08}`, so a million sessions cost no
//! memory. Every 10,000th session totals more than Entitle recorded (an
//! amount mismatch), which the seed mirrors.

use std::collections::HashMap;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    routing::get,
};
use chrono::{DateTime, Duration, Utc};
use entitle_jobs::reconcile::Window;
use serde_json::{Value, json};

/// The orders the stand-in lists, one second apart from `start`.
#[derive(Debug, Clone)]
pub struct Stripe {
    pub url: String,
    orders: i64,
    start: DateTime<Utc>,
}

/// Whether the channel's total for order `n` differs from Entitle's.
pub fn amount_differs(n: i64) -> bool {
    n % 10_000 == 3
}

/// When order `n` was paid.
pub fn paid_at(start: DateTime<Utc>, n: i64) -> DateTime<Utc> {
    start + Duration::milliseconds(n * 10)
}

impl Stripe {
    pub async fn start(orders: i64) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stripe = Self {
            url: format!("http://{}", listener.local_addr()?),
            orders,
            // Whole seconds, as Stripe's timestamps.
            start: DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_default()
                - Duration::days(30),
        };
        let app = Router::new()
            .route("/v1/checkout/sessions", get(sessions))
            .route("/v1/checkout/sessions/{id}/line_items", get(line_items))
            .route("/v1/refunds", get(refunds))
            .with_state(stripe.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(stripe)
    }

    /// A window holding every order.
    pub fn window(&self) -> Window {
        Window {
            start: self.start,
            end: paid_at(self.start, self.orders + 1) + Duration::hours(1),
        }
    }

    fn session(&self, n: i64) -> Value {
        json!({
            "id": format!("cs_bench_{n:08}"),
            "object": "checkout.session",
            "amount_total": if amount_differs(n) { 2500 } else { 2000 },
            "currency": "eur",
            "created": paid_at(self.start, n).timestamp(),
            "customer_details": { "email": format!("buyer{n}@bench.invalid"), "name": "Bench Buyer" },
            "metadata": {},
            "mode": "payment",
            "payment_intent": format!("pi_bench_{n}"),
            "payment_status": "paid",
            "status": "complete",
            "line_items": { "object": "list", "data": [line_item(n)], "has_more": false },
        })
    }
}

fn line_item(n: i64) -> Value {
    json!({
        "id": format!("li_bench_{n}"),
        "object": "item",
        "amount_total": 2000,
        "quantity": 1,
        "price": { "id": "price_basic_kit", "object": "price", "unit_amount": 2000 },
    })
}

fn list(data: Vec<Value>, has_more: bool) -> Json<Value> {
    Json(json!({ "object": "list", "data": data, "has_more": has_more }))
}

async fn sessions(
    State(stripe): State<Stripe>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Value> {
    let limit: i64 = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(10);
    let after = query
        .get("starting_after")
        .and_then(|id| id.strip_prefix("cs_bench_")?.parse::<i64>().ok())
        .unwrap_or(0);
    let last = (after + limit).min(stripe.orders);
    let data = (after + 1..=last).map(|n| stripe.session(n)).collect();
    list(data, last < stripe.orders)
}

async fn line_items(Path(id): Path<String>) -> Json<Value> {
    let n = id
        .strip_prefix("cs_bench_")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    list(vec![line_item(n)], false)
}

async fn refunds() -> Json<Value> {
    list(Vec::new(), false)
}
