//! Wiremock stand-ins for the channel APIs reconciliation reads: Stripe's
//! Checkout Sessions and refunds lists (`starting_after` pagination) and
//! Shopify's orders list (`Link` pagination with `page_info`, and the
//! call-limit header). Pages are small, so a few records span several.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{header, method, path},
};

/// The Admin API version Entitle is configured with.
pub const SHOPIFY_ORDERS_PATH: &str = "/admin/api/2025-01/orders.json";

type Records = Arc<Mutex<Vec<Value>>>;

/// What the stand-in APIs list; tests add records as the channel would.
#[derive(Clone, Default)]
pub struct ChannelApi {
    stripe_sessions: Records,
    stripe_refunds: Records,
    shopify_processed: Records,
    shopify_updated: Records,
}

impl ChannelApi {
    /// Mounts the lists on `server`, `page_size` records per page, for
    /// clients with the test configuration's keys.
    pub async fn mount(server: &MockServer, page_size: usize) -> Self {
        Self::mount_for(server, page_size, Some("Bearer sk_test_entitle")).await
    }

    /// Mounts the lists; Stripe's require `authorization` when given.
    pub async fn mount_for(
        server: &MockServer,
        page_size: usize,
        authorization: Option<&str>,
    ) -> Self {
        let api = Self::default();
        for (route, records) in [
            ("/v1/checkout/sessions", &api.stripe_sessions),
            ("/v1/refunds", &api.stripe_refunds),
        ] {
            let mut mock = Mock::given(method("GET")).and(path(route));
            if let Some(authorization) = authorization {
                mock = mock.and(header("authorization", authorization));
            }
            mock.respond_with(StripeList {
                records: records.clone(),
                page_size,
                url: route,
            })
            .mount(server)
            .await;
        }
        Mock::given(method("GET"))
            .and(path(SHOPIFY_ORDERS_PATH))
            .and(header("x-shopify-access-token", "shpat_test_entitle"))
            .respond_with(ShopifyList {
                processed: api.shopify_processed.clone(),
                updated: api.shopify_updated.clone(),
                page_size,
                base: server.uri(),
            })
            .mount(server)
            .await;
        api
    }

    pub fn stripe_session(&self, session: Value) {
        self.stripe_sessions.lock().unwrap().push(session);
    }

    /// A succeeded refund of `charge` (expanded, as reconciliation asks).
    pub fn stripe_refund(&self, refund_id: &str, amount: i64, charge: Value) {
        self.stripe_refunds.lock().unwrap().push(json!({
            "id": refund_id,
            "object": "refund",
            "amount": amount,
            "currency": "eur",
            "payment_intent": charge["payment_intent"],
            "status": "succeeded",
            "charge": charge,
        }));
    }

    /// An order processed in the window.
    pub fn shopify_order(&self, order: Value) {
        self.shopify_processed.lock().unwrap().push(order);
    }

    /// An order updated in the window (refunded, cancelled).
    pub fn shopify_updated_order(&self, order: Value) {
        self.shopify_updated.lock().unwrap().push(order);
    }
}

struct StripeList {
    records: Records,
    page_size: usize,
    url: &'static str,
}

impl Respond for StripeList {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let records = self.records.lock().unwrap().clone();
        let after = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "starting_after")
            .map(|(_, v)| v.into_owned());
        let start = match after {
            None => 0,
            Some(id) => match records.iter().position(|r| r["id"] == id.as_str()) {
                Some(i) => i + 1,
                None => {
                    return ResponseTemplate::new(400)
                        .set_body_json(json!({ "error": { "message": "No such object" } }));
                }
            },
        };
        let page: Vec<Value> = records
            .iter()
            .skip(start)
            .take(self.page_size)
            .cloned()
            .collect();
        let has_more = start + page.len() < records.len();
        ResponseTemplate::new(200).set_body_json(json!({
            "object": "list", "data": page, "has_more": has_more, "url": self.url,
        }))
    }
}

struct ShopifyList {
    processed: Records,
    updated: Records,
    page_size: usize,
    base: String,
}

impl Respond for ShopifyList {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let query: std::collections::HashMap<String, String> =
            request.url.query_pairs().into_owned().collect();
        // page_info is opaque to the client: here "<list>:<offset>".
        let (list, offset) = match query.get("page_info") {
            Some(info) => {
                let (list, offset) = info.split_once(':').unwrap_or(("processed", "0"));
                (list.to_owned(), offset.parse().unwrap_or(0))
            }
            None if query.contains_key("updated_at_min") => ("updated".to_owned(), 0),
            None => ("processed".to_owned(), 0),
        };
        if query.contains_key("page_info") && query.keys().any(|k| k.ends_with("_min")) {
            // Shopify refuses filters next to page_info.
            return ResponseTemplate::new(400)
                .set_body_json(json!({ "errors": "page_info with filters" }));
        }
        let records = if list == "updated" {
            &self.updated
        } else {
            &self.processed
        };
        let records = records.lock().unwrap().clone();
        let page: Vec<Value> = records
            .iter()
            .skip(offset)
            .take(self.page_size)
            .cloned()
            .collect();
        let mut response = ResponseTemplate::new(200)
            .insert_header("x-shopify-shop-api-call-limit", "1/40")
            .set_body_json(json!({ "orders": page }));
        if offset + page.len() < records.len() {
            response = response.insert_header(
                "link",
                format!(
                    "<{}{SHOPIFY_ORDERS_PATH}?limit=250&page_info={list}:{}>; rel=\"next\"",
                    self.base,
                    offset + page.len()
                ),
            );
        }
        response
    }
}
