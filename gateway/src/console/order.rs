//! The order page (`/console/orders/{id}`): buyer, gift recipient and
//! channel, lines, codes (a page at a time) with state, expiry and holder,
//! deliveries with resend, refunds and adjustments, the audit timeline, and
//! the order's actions; and the account page (`/console/accounts/{id}`):
//! the codes an account holds and its orders.

use axum::{
    Router,
    extract::{Path, Query, State},
    response::{Html, Response},
    routing::{get, post},
};
use entitle_jobs::{lifecycle, token::Role};
use minijinja::{Value, context};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    Console, CsrfForm, PageError, StaffMember, actions::Confirmed, code::ExpiryForm, render,
};
use crate::admin::orders::{Window, account_view, order_view_window};

/// Codes shown per page of an order.
const CODES_PER_PAGE: i64 = 100;
/// Audit events shown on an order's timeline (the latest).
const TIMELINE: i64 = 200;

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/orders/{id}", get(page))
        .route("/console/orders/{id}/expiry", post(expiry))
        .route("/console/deliveries/{id}/resend", post(resend))
        .route("/console/accounts/{account_id}", get(account))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    page: Option<i64>,
    done: Option<String>,
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    Query(query): Query<PageQuery>,
) -> Result<Html<String>, PageError> {
    // Past the last page shows nothing; far past it must not overflow.
    let page = query.page.unwrap_or(1).clamp(1, 1_000_000);
    let order = order_view_window(
        &console.ctx.pool,
        id,
        Window {
            codes_offset: (page - 1) * CODES_PER_PAGE,
            codes_limit: Some(CODES_PER_PAGE),
            timeline_limit: Some(TIMELINE),
        },
    )
    .await?
    .ok_or_else(|| PageError::not_found("order"))?;
    let codes = order["code_count"].as_i64().unwrap_or(0);
    let pages = (codes + CODES_PER_PAGE - 1) / CODES_PER_PAGE;
    render(
        "order.html",
        Some(&staff),
        context! {
            active => "search",
            order => Value::from_serialize(&order),
            page,
            pages => pages.max(1),
            first_code => (page - 1) * CODES_PER_PAGE,
            timeline_limit => TIMELINE,
            can_operate => staff.role >= Role::Operator,
            done => query.done,
        },
    )
}

async fn expiry(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<ExpiryForm>,
) -> Result<Response, PageError> {
    let expires_at = form.expires_at()?;
    crate::console_action!(
        console,
        staff,
        Role::Operator,
        form_key,
        &form.confirmed,
        &form,
        format!("POST /console/orders/{id}/expiry"),
        format!("/console/orders/{id}"),
        "expiry_changed",
        |tx, who| lifecycle::change_order_expiry(tx, who, id, expires_at)
    )
}

#[derive(Debug, Deserialize, Serialize)]
struct ResendForm {
    #[serde(flatten)]
    confirmed: Confirmed,
    /// A corrected address (empty: the original one).
    #[serde(default)]
    email: String,
    /// The page to come back to.
    #[serde(default)]
    back: String,
}

/// Support resends to the original address; another address needs an
/// operator and replaces the codes (the domain decides).
async fn resend(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<ResendForm>,
) -> Result<Response, PageError> {
    // Only back to a console page.
    let back = if form.back.starts_with("/console/") && !form.back.starts_with("//") {
        form.back.clone()
    } else {
        "/console/failed".to_owned()
    };
    let email = Some(form.email.trim()).filter(|e| !e.is_empty());
    let ctx = console.ctx.clone();
    crate::console_action!(
        console,
        staff,
        Role::Support,
        form_key,
        &form.confirmed,
        &form,
        format!("POST /console/deliveries/{id}/resend"),
        back,
        "resent",
        |tx, who| lifecycle::resend(tx, &ctx, who, id, email)
    )
}

async fn account(
    State(console): State<Console>,
    staff: StaffMember,
    Path(account_id): Path<String>,
) -> Result<Html<String>, PageError> {
    let view = account_view(&console.ctx.pool, &account_id).await?;
    render(
        "account.html",
        Some(&staff),
        context! { active => "search", account => Value::from_serialize(&view) },
    )
}
