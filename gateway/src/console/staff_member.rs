//! Who is using the console: the [`StaffMember`] extractor. It reads the
//! member from the SSO header (when configured and sent) or the session, and
//! re-reads their account on every request, so a disabled member is out and
//! a new role applies at once.

use axum::{extract::FromRequestParts, http::request::Parts};
use entitle_jobs::token::Role;
use tower_sessions::Session;
use uuid::Uuid;

use super::{Console, PageError, csrf, members, session_store::STAFF_ID_KEY};
use crate::auth::Actor;

/// A signed-in, enabled staff member. Handlers that take it are for staff
/// only; anyone else is sent to the sign-in page.
#[derive(Debug, Clone)]
pub struct StaffMember {
    pub id: Uuid,
    /// The actor in the audit log.
    pub name: String,
    pub email: String,
    pub role: Role,
    csrf_token: String,
}

impl StaffMember {
    /// Refuses (403, with a page) a member whose role is below `needed`.
    pub fn require(&self, needed: Role) -> Result<(), PageError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(PageError::forbidden(format!(
                "This needs the {} role; you ({}) have the {} role.",
                needed.as_str(),
                self.name,
                self.role.as_str()
            )))
        }
    }

    /// The member as the admin API's actor: console actions are audited
    /// exactly as API actions, with the member's name.
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.name.clone(),
            role: self.role,
        }
    }

    /// This session's CSRF token, for hidden form fields (the page renderer
    /// puts it in every template's context as `csrf_token`).
    pub fn csrf_token(&self) -> &str {
        &self.csrf_token
    }
}

impl FromRequestParts<Console> for StaffMember {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, PageError> {
        let session = Session::from_request_parts(parts, console)
            .await
            .map_err(|(_, e)| PageError::internal(e))?;
        let csrf_token = csrf::token(&session).await?;
        let pool = &console.ctx.pool;
        let sso_header = &console.ctx.config.console.sso_header;
        if !sso_header.is_empty()
            && let Some(email) = parts.headers.get(sso_header.as_str())
        {
            let email = email.to_str().unwrap_or_default();
            return match members::enabled_by_email(pool, email).await? {
                Some((member, _)) => Ok(StaffMember {
                    id: member.id,
                    name: member.name,
                    email: member.email,
                    role: member.role,
                    csrf_token,
                }),
                None => Err(PageError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "no_staff_account",
                    "No staff account",
                    "Your single sign-on identity has no enabled staff account here; \
                     ask an admin to invite you.",
                )),
            };
        }
        // After signing in, back to the page asked for; a form's target
        // would answer a GET with 405.
        let next = match parts.method {
            axum::http::Method::GET => parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/console"),
            _ => "/console",
        };
        let staff_id: Option<Uuid> = session
            .get(STAFF_ID_KEY)
            .await
            .map_err(PageError::internal)?;
        let Some(staff_id) = staff_id else {
            return Err(PageError::sign_in(next));
        };
        match members::enabled_by_id(pool, staff_id).await? {
            Some(member) => Ok(StaffMember {
                id: member.id,
                name: member.name,
                email: member.email,
                role: member.role,
                csrf_token,
            }),
            None => {
                // Disabled since: this session is over.
                session.flush().await.map_err(PageError::internal)?;
                Err(PageError::sign_in(next))
            }
        }
    }
}
