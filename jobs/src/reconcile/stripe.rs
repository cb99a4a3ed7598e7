//! Stripe's side of a window: Checkout Sessions created in it (with their
//! line items) and refunds made in it (with their charges), read with
//! `starting_after` pagination.

use serde_json::{Value, json};

use super::{ChannelEvent, ChannelOrder, Window, api::Pager};
use crate::{channel::stripe::StripeApi, error::JobError};

/// Stripe's largest page.
const PAGE: &str = "100";

#[derive(Debug)]
enum Cursor {
    Start,
    After(String),
    Done,
}

/// Pages through one window of Stripe.
#[derive(Debug)]
pub struct Listing {
    api: StripeApi,
    pager: Pager,
    window: Window,
    sessions: Cursor,
    refunds: Cursor,
}

impl Listing {
    pub fn new(api: StripeApi, pager: Pager, window: Window) -> Self {
        Self {
            api,
            pager,
            window,
            sessions: Cursor::Start,
            refunds: Cursor::Start,
        }
    }

    pub fn pager(&self) -> &Pager {
        &self.pager
    }

    /// One page of a list endpoint, or None when it is exhausted.
    async fn page(
        &self,
        path: &str,
        expand: &str,
        cursor: &Cursor,
    ) -> Result<Option<(Vec<Value>, bool)>, JobError> {
        let mut query = vec![
            ("limit", PAGE.to_owned()),
            ("created[gte]", self.window.start.timestamp().to_string()),
            ("created[lt]", self.window.end.timestamp().to_string()),
            ("expand[]", expand.to_owned()),
        ];
        match cursor {
            Cursor::Done => return Ok(None),
            Cursor::After(id) => query.push(("starting_after", id.clone())),
            Cursor::Start => {}
        }
        let fetched = self
            .pager
            .get(path, || self.api.get(path).query(&query))
            .await?;
        let has_more = fetched.body["has_more"].as_bool().unwrap_or(false);
        let data = match fetched.body.get("data").cloned() {
            Some(Value::Array(data)) => data,
            _ => {
                return Err(JobError::permanent(
                    "channel_api_malformed",
                    format!("Stripe's {path} answer has no data list"),
                ));
            }
        };
        Ok(Some((data, has_more)))
    }

    fn advance(cursor: &mut Cursor, data: &[Value], has_more: bool) {
        *cursor = match data.last().and_then(|v| v["id"].as_str()) {
            Some(last) if has_more => Cursor::After(last.to_owned()),
            _ => Cursor::Done,
        };
    }

    /// The next page of Checkout Sessions.
    pub async fn next_orders(&mut self) -> Result<Option<Vec<ChannelOrder>>, JobError> {
        let Some((sessions, has_more)) = self
            .page("/v1/checkout/sessions", "data.line_items", &self.sessions)
            .await?
        else {
            return Ok(None);
        };
        Self::advance(&mut self.sessions, &sessions, has_more);
        let mut orders = Vec::with_capacity(sessions.len());
        for session in sessions {
            orders.push(self.order(session).await?);
        }
        Ok(Some(orders))
    }

    async fn order(&self, session: Value) -> Result<ChannelOrder, JobError> {
        let id = session["id"].as_str().unwrap_or_default().to_owned();
        let items = &session["line_items"];
        let units = if items["has_more"].as_bool() == Some(true) || !items.is_object() {
            // Not all (or none) expanded: read them all.
            self.api.units(&id).await?
        } else {
            items["data"]
                .as_array()
                .map(|d| d.iter().map(|i| i["quantity"].as_i64().unwrap_or(1)).sum())
                .unwrap_or(0)
        };
        let event_id = format!("reconcile:{id}");
        Ok(ChannelOrder {
            paid: matches!(
                session["payment_status"].as_str(),
                Some("paid" | "no_payment_required")
            ),
            closed: false,
            amount_total: session["amount_total"].as_i64(),
            units: Some(units),
            purchase: ChannelEvent {
                body: event_body(&event_id, "checkout.session.completed", session),
                event_id,
                event_type: "checkout.session.completed".to_owned(),
            },
            id,
        })
    }

    /// The next page of refunds, as the `charge.refunded` events of their
    /// charges (one per charge and refunded total).
    pub async fn next_adjustments(&mut self) -> Result<Option<Vec<ChannelEvent>>, JobError> {
        let Some((refunds, has_more)) = self
            .page("/v1/refunds", "data.charge", &self.refunds)
            .await?
        else {
            return Ok(None);
        };
        Self::advance(&mut self.refunds, &refunds, has_more);
        let mut events: Vec<ChannelEvent> = Vec::new();
        for refund in refunds {
            if refund["status"].as_str() != Some("succeeded") || !refund["charge"].is_object() {
                continue;
            }
            let charge = refund["charge"].clone();
            let event_id = format!(
                "reconcile:charge:{}:refunded:{}",
                charge["id"].as_str().unwrap_or_default(),
                charge["amount_refunded"].as_i64().unwrap_or_default()
            );
            if events.iter().any(|e| e.event_id == event_id) {
                continue;
            }
            events.push(ChannelEvent {
                body: event_body(&event_id, "charge.refunded", charge),
                event_id,
                event_type: "charge.refunded".to_owned(),
            });
        }
        Ok(Some(events))
    }
}

/// An event shaped as Stripe sends it, around an object read from the API.
fn event_body(event_id: &str, event_type: &str, object: Value) -> String {
    json!({
        "id": event_id,
        "object": "event",
        "type": event_type,
        "data": { "object": object },
    })
    .to_string()
}
