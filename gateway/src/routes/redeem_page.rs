//! `GET`/`POST /redeem`: the minimal hosted redeem page, for the local demo
//! and for platforms without a page of their own (`gateway.redeem_page`).
//! The code emails link here with the code in the URL's fragment, which the
//! page's one line of script copies into the form; browsers never send a
//! fragment to a server, so no access log holds a code.

use axum::{
    Form, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use entitle_jobs::{
    code::Code,
    redemption::{RedeemError, Redeemed},
};
use minijinja::context;
use serde::Deserialize;

use super::redemptions::check_ref;
use crate::{AppState, console::page::render_raw, platform::ClientAddress};

pub fn router() -> Router<AppState> {
    Router::new().route("/redeem", get(page).post(redeem))
}

async fn page() -> Response {
    show(StatusCode::OK, context! {})
}

fn show(status: StatusCode, context: minijinja::Value) -> Response {
    match render_raw("redeem.html", context) {
        Ok(html) => (status, html).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RedeemForm {
    #[serde(default)]
    code: String,
    #[serde(default)]
    account_id: String,
    #[serde(default)]
    entity_ref: String,
}

/// Who redemptions through this page are recorded as.
pub const CALLER: &str = "redeem_page";

async fn redeem(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    Form(form): Form<RedeemForm>,
) -> Response {
    let refused = |status: StatusCode, code: &str, detail: &str| {
        show(
            status,
            context! { error => detail, error_code => code,
            account_id => &form.account_id, entity_ref => &form.entity_ref },
        )
    };
    // The page needs no key, so guessing codes through it is limited per
    // client address.
    if let Err(wait) = state.platform.count_redeem_page(address) {
        metrics::counter!("entitle_platform_rate_limited_total", "by" => "redeem_page")
            .increment(1);
        let mut page = refused(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("Too many attempts from here; please wait {wait} seconds and try again."),
        );
        page.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, wait.into());
        return page;
    }
    if let Err(e) = check_ref("account", &form.account_id)
        .and_then(|_| check_ref("who it is for", &form.entity_ref))
    {
        return refused(StatusCode::UNPROCESSABLE_ENTITY, e.code, &e.detail);
    }
    let code = match Code::parse(&form.code) {
        Ok(code) => code,
        Err(e) => {
            return refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                "code_malformed",
                &format!("That is not a code: {e}. Check it against your email."),
            );
        }
    };
    let outcome = state
        .redeemer
        .redeem(
            &state.ctx.keys,
            &code,
            form.account_id.trim(),
            form.entity_ref.trim(),
            CALLER,
        )
        .await;
    match outcome {
        Ok(Redeemed::New(r) | Redeemed::Existing(r)) => show(
            StatusCode::OK,
            context! { redeemed => context! {
                product => r.product_name, last4 => r.code_last4,
                account_id => r.account_id, entity_ref => r.entity_ref,
            } },
        ),
        Err(RedeemError::Database(e)) => {
            tracing::error!(error = %e, "hosted redemption failed");
            refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Something went wrong on our side; please try again in a minute.",
            )
        }
        Err(e) => {
            let (status, detail) = match e {
                RedeemError::NotFound => (StatusCode::NOT_FOUND, "No code matches."),
                RedeemError::AlreadyRedeemed => (
                    StatusCode::CONFLICT,
                    "This code was already redeemed by someone else.",
                ),
                RedeemError::Revoked => (StatusCode::GONE, "This code was revoked."),
                _ => (StatusCode::GONE, "This code has expired."),
            };
            metrics::counter!("entitle_redemptions_rejected_total", "code" => e.code())
                .increment(1);
            refused(status, e.code(), detail)
        }
    }
}
