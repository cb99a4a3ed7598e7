//! `GET /console/search?q=…`: the header's search box. For now it finds
//! orders by buyer or gift recipient email, order id or channel order id.
//! (A typed code must be sent by POST, never put in a URL; that look-up
//! and the order and code pages come with them.)

use axum::{
    Router,
    extract::{Query, State},
    response::Html,
    routing::get,
};
use chrono::{DateTime, Utc};
use minijinja::context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Console, PageError, StaffMember, render};

/// Orders listed at most.
const LIMIT: i64 = 50;

pub fn router() -> Router<Console> {
    Router::new().route("/console/search", get(page))
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    q: String,
}

#[derive(Serialize, sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    channel: String,
    channel_order_id: String,
    buyer_email: String,
    gift_recipient_email: Option<String>,
    state: String,
    created_at: DateTime<Utc>,
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Query(search): Query<Search>,
) -> Result<Html<String>, PageError> {
    let q = search.q.trim();
    let orders: Vec<OrderRow> = if q.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT id, channel, channel_order_id, buyer_email, gift_recipient_email, state,
                        created_at
                 FROM orders
                 WHERE ($1::uuid IS NOT NULL AND id = $1)
                    OR channel_order_id = $2
                    OR ($3 AND (lower(buyer_email) = lower($2)
                                OR lower(gift_recipient_email) = lower($2)))
                 ORDER BY created_at DESC LIMIT $4",
        )
        .bind(q.parse::<Uuid>().ok())
        .bind(q)
        .bind(q.contains('@'))
        .bind(LIMIT)
        .fetch_all(&console.ctx.pool)
        .await?
    };
    render(
        "search.html",
        Some(&staff),
        context! { active => "search", q, orders, limit => LIMIT },
    )
}
