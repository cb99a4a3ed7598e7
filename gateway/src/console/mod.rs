//! The support console under `/console`: server-rendered pages for support
//! and operations staff, signed in with a password (or an SSO proxy's
//! header), each action audited with the staff member's name.
//!
//! A page is a handler taking [`StaffMember`] (which signs the visitor in or
//! sends them to the sign-in page), calling the domain, and answering
//! [`page::render`]. A form posts through [`CsrfForm`], which refuses a
//! missing or wrong CSRF token before the handler runs.

pub mod actions;
pub mod batches;
pub mod code;
pub mod codes_report;
pub mod csrf;
pub mod dashboard;
pub mod failed;
pub mod members;
pub mod order;
pub mod page;
pub mod password;
pub mod reconciliation;
pub mod search;
pub mod session_store;
pub mod sessions;
pub mod sign_in;
pub mod staff;
pub mod staff_member;

use std::sync::Arc;

use axum::{Router, extract::FromRef, routing::get};
use entitle_jobs::Context;

pub use csrf::{CsrfForm, form_key};
pub use page::{PageError, render};
pub use staff_member::StaffMember;

use crate::AppState;

/// What console handlers reach: the app's context and the sign-in limits of
/// this process.
#[derive(Clone)]
pub struct Console {
    pub ctx: Context,
    pub limits: Arc<sign_in::SignInLimits>,
}

impl FromRef<Console> for Context {
    fn from_ref(console: &Console) -> Context {
        console.ctx.clone()
    }
}

/// Every console route, with its session layer.
pub fn router(state: &AppState) -> Router<AppState> {
    let config = &state.ctx.config.console;
    let console = Console {
        ctx: state.ctx.clone(),
        limits: Arc::new(sign_in::SignInLimits::new(config)),
    };
    let pages = Router::new()
        .route("/console", get(dashboard::page))
        .route("/console/static/console.css", get(page::stylesheet))
        .merge(sign_in::router())
        .merge(search::router())
        .merge(staff::router())
        .merge(code::router())
        .merge(order::router())
        .merge(reconciliation::router())
        .merge(failed::router())
        .merge(batches::router())
        .merge(codes_report::router());
    sessions::wrap(pages, state.ctx.pool.clone(), config).with_state(console)
}
