//! Shopify's side of a window: orders processed in it, and orders updated in
//! it (for their refunds and cancellations), read from the Admin REST API
//! with `Link` pagination.

use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::{ChannelEvent, ChannelOrder, Window, api::Pager};
use crate::{channel::shopify::minor_units, config::ShopifyConfig, error::JobError};

/// Shopify's largest page.
const PAGE: &str = "250";

#[derive(Debug)]
enum Cursor {
    Start,
    Next(String),
    Done,
}

/// Pages through one window of a shop.
#[derive(Debug)]
pub struct Listing {
    http: reqwest::Client,
    orders_url: String,
    token: SecretString,
    pager: Pager,
    window: Window,
    processed: Cursor,
    updated: Cursor,
}

/// Whether reconciliation can read the shop.
pub fn configured(config: &ShopifyConfig) -> bool {
    !config.shop_url.is_empty() && !config.api_token.expose_secret().is_empty()
}

impl Listing {
    pub fn new(config: &ShopifyConfig, pager: Pager, window: Window) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.api_timeout_secs))
            .build()
            .context("Failed to build the Shopify HTTP client")?;
        Ok(Self {
            http,
            orders_url: format!(
                "{}/admin/api/{}/orders.json",
                config.shop_url.trim_end_matches('/'),
                config.api_version
            ),
            token: config.api_token.clone(),
            pager,
            window,
            processed: Cursor::Start,
            updated: Cursor::Start,
        })
    }

    pub fn pager(&self) -> &Pager {
        &self.pager
    }

    /// One page of orders filtered by `field` (processed_at or updated_at)
    /// within the window; later pages follow the `Link` header as given.
    async fn page(
        &self,
        field: &str,
        cursor: &Cursor,
    ) -> Result<Option<(Vec<Value>, Cursor)>, JobError> {
        let request = |url: &str, first: bool| {
            let mut r = self
                .http
                .get(url)
                .header("X-Shopify-Access-Token", self.token.expose_secret());
            if first {
                // Shopify's *_max is inclusive; the window's end is not.
                let last = self.window.end - chrono::Duration::seconds(1);
                r = r.query(&[
                    ("status", "any".to_owned()),
                    ("limit", PAGE.to_owned()),
                    (&format!("{field}_min"), self.window.start.to_rfc3339()),
                    (&format!("{field}_max"), last.to_rfc3339()),
                ]);
            }
            r
        };
        let fetched = match cursor {
            Cursor::Done => return Ok(None),
            Cursor::Start => {
                self.pager
                    .get("orders", || request(&self.orders_url, true))
                    .await?
            }
            Cursor::Next(url) => self.pager.get("orders", || request(url, false)).await?,
        };
        let orders = match fetched.body.get("orders").cloned() {
            Some(Value::Array(orders)) => orders,
            _ => {
                return Err(JobError::permanent(
                    "channel_api_malformed",
                    "Shopify's orders answer has no orders list",
                ));
            }
        };
        let next = fetched.next.map(Cursor::Next).unwrap_or(Cursor::Done);
        Ok(Some((orders, next)))
    }

    /// The next page of orders processed in the window.
    pub async fn next_orders(&mut self) -> Result<Option<Vec<ChannelOrder>>, JobError> {
        let Some((orders, next)) = self.page("processed_at", &self.processed).await? else {
            return Ok(None);
        };
        self.processed = next;
        Ok(Some(orders.into_iter().map(order).collect()))
    }

    /// The refunds and cancellations of the next page of orders updated in
    /// the window, as the `refunds/create` and `orders/cancelled` events
    /// Shopify sends for them.
    pub async fn next_adjustments(&mut self) -> Result<Option<Vec<ChannelEvent>>, JobError> {
        let Some((orders, next)) = self.page("updated_at", &self.updated).await? else {
            return Ok(None);
        };
        self.updated = next;
        let mut events = Vec::new();
        for order in orders {
            for refund in order["refunds"].as_array().into_iter().flatten() {
                if refund["refund_line_items"]
                    .as_array()
                    .is_none_or(|l| l.is_empty())
                {
                    // Money only (shipping, goodwill): no unit came back.
                    continue;
                }
                events.push(ChannelEvent {
                    event_id: format!("reconcile:refunds/create:{}", id_text(&refund["id"])),
                    event_type: "refunds/create".to_owned(),
                    body: refund.to_string(),
                });
            }
            if !order["cancelled_at"].is_null() {
                events.push(ChannelEvent {
                    event_id: format!("reconcile:orders/cancelled:{}", id_text(&order["id"])),
                    event_type: "orders/cancelled".to_owned(),
                    body: order.to_string(),
                });
            }
        }
        Ok(Some(events))
    }
}

/// Shopify ids are numbers; Entitle keeps them as text.
fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn order(order: Value) -> ChannelOrder {
    let status = order["financial_status"].as_str().unwrap_or_default();
    let id = id_text(&order["id"]);
    ChannelOrder {
        paid: matches!(status, "paid" | "partially_refunded" | "refunded"),
        closed: matches!(status, "refunded" | "voided") || !order["cancelled_at"].is_null(),
        amount_total: minor_units(order["total_price"].as_str()),
        units: order["line_items"].as_array().map(|items| {
            items
                .iter()
                .map(|i| i["quantity"].as_i64().unwrap_or(0))
                .sum()
        }),
        purchase: ChannelEvent {
            event_id: format!("reconcile:orders/paid:{id}"),
            event_type: "orders/paid".to_owned(),
            body: order.to_string(),
        },
        id,
    }
}
