//! The session cookie: `HttpOnly`, `SameSite=Lax`, scoped to `/console`,
//! `Secure` as configured, with an idle timeout. Sessions live in
//! [`PgSessionStore`].

use axum::{
    Router,
    extract::Request,
    http::{HeaderValue, header},
    middleware::{self, Next},
    response::Response,
};
use entitle_jobs::config::{ConsoleConfig, SecureCookies};
use sqlx::PgPool;
use tower_sessions::{
    Expiry, SessionManagerLayer,
    cookie::{SameSite, time::Duration},
};

use super::{Console, session_store::PgSessionStore};

/// The session cookie's name.
pub const COOKIE: &str = "entitle_console";

/// `pages` with sessions: loaded before a handler runs, saved after it (on
/// every request, which moves the idle timeout forward).
pub fn wrap(pages: Router<Console>, pool: PgPool, config: &ConsoleConfig) -> Router<Console> {
    let layer = SessionManagerLayer::new(PgSessionStore::new(pool))
        .with_name(COOKIE)
        .with_path("/console")
        .with_http_only(true)
        .with_same_site(SameSite::Lax)
        .with_secure(config.secure_cookies == SecureCookies::Always)
        .with_expiry(Expiry::OnInactivity(Duration::minutes(i64::from(
            config.idle_timeout_mins,
        ))))
        .with_always_save(true);
    let pages = pages.layer(layer);
    if config.secure_cookies == SecureCookies::Auto {
        pages.layer(middleware::from_fn(secure_over_tls))
    } else {
        pages
    }
}

/// The gateway speaks plain HTTP behind a proxy that terminates TLS; the
/// proxy's `X-Forwarded-Proto` says whether the browser used TLS. Trusting
/// it is harmless: a forged header only makes the cookie stricter.
async fn secure_over_tls(request: Request, next: Next) -> Response {
    let over_tls = request.uri().scheme_str() == Some("https")
        || request
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let mut response = next.run(request).await;
    if over_tls {
        mark_secure(&mut response);
    }
    response
}

fn mark_secure(response: &mut Response) {
    let cookies: Vec<HeaderValue> = response
        .headers_mut()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|value| {
            let text = value.to_str().unwrap_or_default();
            let ours = text.starts_with(&format!("{COOKIE}="));
            let secure = text
                .split(';')
                .any(|part| part.trim().eq_ignore_ascii_case("secure"));
            if ours && !secure {
                HeaderValue::from_str(&format!("{text}; Secure")).unwrap_or_else(|_| value.clone())
            } else {
                value.clone()
            }
        })
        .collect();
    response.headers_mut().remove(header::SET_COOKIE);
    for cookie in cookies {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
}
