//! Who is calling the admin API: a bearer token, looked up by its hash, gives
//! a name (the actor in every audit event) and a role.

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
        let header = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("send Authorization: Bearer <token>"))?;
        // The scheme is case-insensitive (RFC 9110): `bearer` works too.
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| unauthorized("the Authorization header must be Bearer <token>"))?;
        match token::authenticate(&state.ctx.pool, token.trim()).await? {
            Some((name, role)) => Ok(Actor { name, role }),
            None => Err(unauthorized("unknown or revoked token")),
        }
    }
}
