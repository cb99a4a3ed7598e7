//! Signing in and out: `GET/POST /console/sign-in`, `POST /console/sign-out`.
//! Attempts are limited per client address and per email (in this process's
//! memory, see `console.sign_in_per_minute_*`), and a refusal never says
//! whether the email has an account.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
};

use axum::{
    Router,
    extract::{ConnectInfo, FromRequestParts, Query, State},
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use entitle_jobs::config::ConsoleConfig;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use minijinja::context;
use serde::Deserialize;
use tower_sessions::Session;

use super::{
    Console, CsrfForm, PageError, csrf, members, page, password, session_store::PgSessionStore,
    session_store::STAFF_ID_KEY,
};

/// Sign-in attempts allowed per minute, by client address and by email.
pub struct SignInLimits {
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    by_email: DefaultKeyedRateLimiter<String>,
}

/// Keys remembered before the limiters forget the ones that are back to a
/// full allowance (a flood of addresses must not grow memory for ever).
const MAX_KEYS: usize = 10_000;

impl SignInLimits {
    pub fn new(config: &ConsoleConfig) -> Self {
        let per_minute = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Self {
            by_address: RateLimiter::keyed(per_minute(config.sign_in_per_minute_per_address)),
            by_email: RateLimiter::keyed(per_minute(config.sign_in_per_minute_per_email)),
        }
    }

    /// Counts an attempt; `Err(seconds to wait)` when over either limit.
    pub fn attempt(&self, address: Option<IpAddr>, email: &str) -> Result<(), u64> {
        for limiter_len in [self.by_address.len(), self.by_email.len()] {
            if limiter_len > MAX_KEYS {
                self.by_address.retain_recent();
                self.by_email.retain_recent();
            }
        }
        let now = DefaultClock::default().now();
        let wait = |not_until: governor::NotUntil<_>| not_until.wait_time_from(now).as_secs() + 1;
        if let Some(address) = address {
            self.by_address.check_key(&address).map_err(wait)?;
        }
        self.by_email
            .check_key(&email.trim().to_lowercase())
            .map_err(wait)
    }
}

/// The client's address, as the connection shows it.
pub struct ClientAddress(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/sign-in", get(show).post(submit))
        .route("/console/sign-out", post(sign_out))
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

/// Only a console page is a place to go back to (no open redirect).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/console") && !n.contains("//") && !n.contains('\\') => n,
        _ => "/console",
    }
}

fn sign_in_page(
    status: StatusCode,
    csrf_token: &str,
    next: &str,
    email: &str,
    error: Option<&str>,
) -> Result<Response, PageError> {
    let html = page::render_raw("sign_in.html", context! { csrf_token, next, email, error })?;
    Ok((status, html).into_response())
}

/// `GET /console/sign-in`
async fn show(session: Session, Query(query): Query<Next>) -> Result<Response, PageError> {
    let next = safe_next(query.next.as_deref());
    if session
        .get::<uuid::Uuid>(STAFF_ID_KEY)
        .await
        .map_err(PageError::internal)?
        .is_some()
    {
        return Ok(Redirect::to(next).into_response());
    }
    let token = csrf::token(&session).await?;
    sign_in_page(StatusCode::OK, &token, next, "", None)
}

#[derive(Deserialize)]
struct SignInForm {
    email: String,
    password: String,
    next: Option<String>,
}

/// `POST /console/sign-in`
async fn submit(
    State(console): State<Console>,
    ClientAddress(address): ClientAddress,
    session: Session,
    CsrfForm { form, .. }: CsrfForm<SignInForm>,
) -> Result<Response, PageError> {
    let next = safe_next(form.next.as_deref());
    if let Err(wait) = console.limits.attempt(address, &form.email) {
        tracing::warn!(?address, "console sign-in attempts over the limit");
        return Err(PageError::too_many(
            format!(
                "Too many sign-in attempts. Wait {wait} seconds, then try again. \
                 If you forgot your password, ask an admin."
            ),
            wait,
        ));
    }
    let pool = &console.ctx.pool;
    let found = members::enabled_by_email(pool, &form.email).await?;
    let hash = found.as_ref().map(|(_, hash)| hash.clone());
    let matches = password::verify_or_pretend(form.password, hash).await;
    let member = match found {
        Some((member, _)) if matches => member,
        _ => {
            let token = csrf::token(&session).await?;
            return sign_in_page(
                StatusCode::UNAUTHORIZED,
                &token,
                next,
                &form.email,
                Some("That email and password do not match an enabled staff account."),
            );
        }
    };
    // A new session id at sign-in: an id planted before it is worthless.
    session.cycle_id().await.map_err(PageError::internal)?;
    session
        .insert(STAFF_ID_KEY, member.id)
        .await
        .map_err(PageError::internal)?;
    csrf::renew(&session).await?;
    members::signed_in(pool, member.id).await?;
    if let Err(e) = PgSessionStore::new(pool.clone()).delete_expired().await {
        tracing::warn!(error = %e, "could not delete expired console sessions");
    }
    tracing::info!(staff = %member.name, "staff member signed in to the console");
    Ok(Redirect::to(next).into_response())
}

/// The sign-out form has only its hidden fields.
#[derive(Deserialize)]
struct NoFields {}

/// `POST /console/sign-out`
async fn sign_out(
    session: Session,
    CsrfForm { .. }: CsrfForm<NoFields>,
) -> Result<Response, PageError> {
    session.flush().await.map_err(PageError::internal)?;
    Ok(Redirect::to("/console/sign-in").into_response())
}
