//! Console actions: a form's role check, reason, confirmation and one-time
//! key, then the domain's function inside the admin API's idempotent
//! action (the same transaction, audit event and `idempotency_key` row), then
//! back to the page with what was done. A double-clicked or resubmitted form
//! sends the same key, so it acts once.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Console, PageError};
use crate::{
    admin::{Action, Begun},
    auth::Actor,
    error::ApiError,
};

/// The fields every action form has.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Confirmed {
    #[serde(default)]
    pub reason: String,
    /// The "I confirm" checkbox.
    #[serde(default)]
    pub confirm: Option<String>,
}

impl Confirmed {
    /// Refuses a form whose reason is empty or whose confirmation is not
    /// ticked.
    pub fn check(&self) -> Result<(), PageError> {
        if self.reason.trim().is_empty() {
            return Err(PageError::invalid(
                "Give a reason: it goes into the audit log.",
            ));
        }
        if self.confirm.is_none() {
            return Err(PageError::invalid(
                "Tick the confirmation box to confirm the action.",
            ));
        }
        Ok(())
    }
}

/// An action begun from a form by `actor` (check the member's role first):
/// the transaction to act in, or `None` when this form was already acted on
/// (its one-time key was used).
pub async fn begin<'a>(
    console: &Console,
    actor: &'a Actor,
    form_key: Option<Uuid>,
    confirmed: &'a Confirmed,
    request: &str,
    body: &impl Serialize,
) -> Result<Option<Action<'a>>, PageError> {
    confirmed.check()?;
    // Without its key (a hand-made form) a form still acts, once per post.
    let key = form_key.map(|k| format!("console:{k}"));
    match Action::begin_keyed(
        &console.ctx,
        actor,
        key,
        confirmed.reason.trim(),
        request,
        body,
    )
    .await?
    {
        Begun::Fresh(action) => Ok(Some(action)),
        Begun::Replayed(_) => Ok(None),
    }
}

/// Commits `action` with `outcome` stored as its answer.
pub async fn finish(action: Action<'_>, outcome: impl Serialize) -> Result<(), PageError> {
    let _stored = action
        .finish((StatusCode::OK, Json(serde_json::json!(outcome))))
        .await?;
    Ok(())
}

/// Back to `page`, saying what was done (`done` is a stable word the page
/// shows as a notice).
pub fn back(page: &str, done: &str) -> Response {
    let separator = if page.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{page}{separator}done={done}")).into_response()
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let title = match e.status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::CONFLICT => "Not possible now",
            _ if e.status.is_server_error() => "Something went wrong",
            _ => "Please check the form",
        };
        PageError::new(e.status, e.code, title, e.detail)
    }
}

impl From<entitle_jobs::lifecycle::Refused> for PageError {
    fn from(refused: entitle_jobs::lifecycle::Refused) -> Self {
        PageError::from(ApiError::from(refused))
    }
}

/// A whole console action: the member's role, then [`begin`], the domain
/// call `$act` (given the transaction and who acts), [`finish`], and back to
/// `$back` saying `$done`, or that the form was already sent.
#[macro_export]
macro_rules! console_action {
    ($console:expr, $staff:expr, $role:expr, $form_key:expr, $confirmed:expr, $body:expr,
     $request:expr, $back:expr, $done:expr, |$tx:ident, $who:ident| $act:expr) => {{
        $staff.require($role)?;
        let actor = $staff.actor();
        let back: String = $back;
        match $crate::console::actions::begin(
            &$console, &actor, $form_key, $confirmed, &$request, $body,
        )
        .await?
        {
            None => Ok($crate::console::actions::back(&back, "already_done")),
            Some(mut action) => {
                let $who = action.who();
                let $tx = &mut *action.tx;
                let outcome = $act.await?;
                $crate::console::actions::finish(action, outcome).await?;
                Ok($crate::console::actions::back(&back, $done))
            }
        }
    }};
}
