//! Who is calling the admin API: a bearer token, looked up by its hash, gives
//! a name (the actor in every audit event) and a role. Failed attempts are
//! limited per client address (see [`crate::auth_limit`]).

use axum::{
    extract::FromRequestParts,
    http::{StatusCode, request::Parts},
};
use entitle_jobs::token::{self, Role};

use crate::{AppState, error::ApiError};

/// An authenticated support or operations caller.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

impl Actor {
    /// Refuses (403) a caller whose role is below `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "this needs the {} role; token {} has {}",
                    needed.as_str(),
                    self.name,
                    self.role.as_str()
                ),
            ))
        }
    }
}

impl FromRequestParts<AppState> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let unauthorized = |detail: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail.to_owned())
        };
        // An address over its failures is refused before any look-up, a
        // good token too: a guess that happens to be right must not show.
        let address = crate::platform::client_address(parts);
        let failures = crate::auth_limit::of(state);
        failures.admit(address)?;
        let token = bearer(parts).ok_or_else(|| {
            unauthorized("send Authorization: Bearer <token> (the scheme in any case)")
        })?;
        if token.starts_with(entitle_jobs::platform_key::PREFIX) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a platform key cannot call the admin API; use a staff token",
            ));
        }
        // Only a token that was checked and is wrong counts as a failure: a
        // missing header or a platform key tells nothing about any token.
        match token::authenticate(&state.ctx.pool, token).await? {
            Some((name, role)) => Ok(Actor { name, role }),
            None => {
                failures.failed(address)?;
                Err(unauthorized("unknown or revoked token"))
            }
        }
    }
}

/// The credential of an `Authorization: Bearer <credential>` header. The
/// scheme is case-insensitive (RFC 9110): `bearer` works too.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let header = parts.headers.get("authorization")?.to_str().ok()?;
    let (scheme, credential) = header.trim().split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}
