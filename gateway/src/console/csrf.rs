//! Forms: every console POST carries the session's CSRF token in a hidden
//! `csrf_token` field, checked by [`CsrfForm`] before the handler runs; and
//! a one-time `form_key` per rendered form, so a double-clicked or
//! resubmitted form can be recognised (it is meant for the admin API's
//! idempotency keys, table `idempotency_key`).
//!
//! In a template: `{% import "forms.html" as forms %}` and, inside each
//! `<form method="post">`, `{{ forms.hidden(csrf_token) }}`.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::StatusCode,
};
use serde::{Deserialize, de::DeserializeOwned};
use tower_sessions::Session;
use uuid::Uuid;

use super::{Console, PageError};

const TOKEN_KEY: &str = "csrf_token";
/// Largest form body accepted.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The session's CSRF token, made on first use.
pub async fn token(session: &Session) -> Result<String, PageError> {
    if let Some(token) = session
        .get::<String>(TOKEN_KEY)
        .await
        .map_err(PageError::internal)?
    {
        return Ok(token);
    }
    renew(session).await
}

/// A new CSRF token for the session (at sign-in, with the new session id).
pub async fn renew(session: &Session) -> Result<String, PageError> {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token = hex::encode(bytes);
    session
        .insert(TOKEN_KEY, &token)
        .await
        .map_err(PageError::internal)?;
    Ok(token)
}

/// A new one-time form key: render it in a hidden `form_key` field (the
/// templates' `form_key()` function does), read it back as
/// [`CsrfForm::form_key`].
pub fn form_key() -> Uuid {
    Uuid::new_v4()
}

/// 403 `csrf_invalid`.
pub fn invalid() -> PageError {
    PageError::new(
        StatusCode::FORBIDDEN,
        "csrf_invalid",
        "This form has expired",
        "The form was sent without this session's security token (or with \
         another session's). Go back, reload the page and send it again.",
    )
}

#[derive(Deserialize)]
struct Hidden {
    csrf_token: Option<String>,
    form_key: Option<String>,
}

/// A URL-encoded form body whose `csrf_token` matches the session's, parsed
/// as `T` (which ignores the hidden fields). Take it as a handler's last
/// argument, after [`super::StaffMember`].
#[derive(Debug)]
pub struct CsrfForm<T> {
    pub form: T,
    /// The form's one-time key, when it was rendered with one.
    pub form_key: Option<Uuid>,
}

impl<T: DeserializeOwned> FromRequest<Console> for CsrfForm<T> {
    type Rejection = PageError;

    async fn from_request(request: Request, console: &Console) -> Result<Self, PageError> {
        let (mut parts, body) = request.into_parts();
        let session = Session::from_request_parts(&mut parts, console)
            .await
            .map_err(|(_, e)| PageError::internal(e))?;
        let request = Request::from_parts(parts, body);
        let body = axum::body::to_bytes(request.into_body(), MAX_FORM_BYTES)
            .await
            .map_err(|_| PageError::invalid("The form is too large."))?;
        check(&session, &body).await?;
        let hidden: Hidden = serde_urlencoded::from_bytes(&body)
            .map_err(|_| PageError::invalid("Unreadable form."))?;
        let form = serde_urlencoded::from_bytes(&body)
            .map_err(|e| PageError::invalid(format!("The form is incomplete: {e}.")))?;
        Ok(CsrfForm {
            form,
            form_key: hidden.form_key.and_then(|k| k.parse().ok()),
        })
    }
}

async fn check(session: &Session, body: &Bytes) -> Result<(), PageError> {
    let sent = serde_urlencoded::from_bytes::<Hidden>(body)
        .ok()
        .and_then(|h| h.csrf_token)
        .ok_or_else(invalid)?;
    let expected = session
        .get::<String>(TOKEN_KEY)
        .await
        .map_err(PageError::internal)?
        .ok_or_else(invalid)?;
    if constant_time_eq(sent.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
