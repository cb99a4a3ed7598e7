//! The platform API: `POST /v1/redemptions` assigns a code to an account
//! and an entity; `POST /v1/codes/check` says whether a code can be.

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use entitle_jobs::{
    code::Code,
    redemption::{self, CodeCheck, RedeemError, Redeemed, Redemption},
};
use serde::Deserialize;

use crate::{
    AppState,
    error::{ApiError, ApiJson},
    platform::Platform,
};

/// What a redeemer sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemRequest {
    /// The code as typed: any case, spaces or dashes.
    pub code: String,
    pub account_id: String,
    /// The person or thing the entitlement is for.
    pub entity_ref: String,
}

const MAX_REF_LEN: usize = 200;

/// Refuses an empty or over-long account id or entity.
pub fn check_ref(name: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > MAX_REF_LEN {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("{name} must be 1 to {MAX_REF_LEN} characters"),
        ));
    }
    Ok(())
}

/// A typo is caught by the check symbol, before the database is asked.
fn parse_code(typed: &str) -> Result<Code, ApiError> {
    Code::parse(typed).map_err(|e| {
        metrics::counter!("entitle_redemptions_rejected_total", "code" => "code_malformed")
            .increment(1);
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "code_malformed",
            e.to_string(),
        )
    })
}

/// The answer to a code that cannot be redeemed.
fn refusal(e: RedeemError) -> ApiError {
    let (status, detail) = match &e {
        RedeemError::NotFound => (StatusCode::NOT_FOUND, "no code matches"),
        RedeemError::AlreadyRedeemed => (
            StatusCode::CONFLICT,
            "this code was already redeemed by someone else",
        ),
        RedeemError::Revoked => (StatusCode::GONE, "this code was revoked"),
        RedeemError::Expired => (StatusCode::GONE, "this code has expired"),
        RedeemError::Database(cause) => return ApiError::internal(cause),
    };
    metrics::counter!("entitle_redemptions_rejected_total", "code" => e.code()).increment(1);
    ApiError::new(status, e.code(), detail)
}

/// Needs a platform key; the key's name is recorded as the caller.
async fn redeem(
    Platform(caller): Platform,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RedeemRequest>,
) -> Result<(StatusCode, Json<Redemption>), ApiError> {
    check_ref("account_id", &request.account_id)?;
    check_ref("entity_ref", &request.entity_ref)?;
    let code = parse_code(&request.code)?;
    match redemption::redeem(
        &state.ctx.pool,
        &state.ctx.keys,
        &code,
        &request.account_id,
        &request.entity_ref,
        &caller.actor(),
    )
    .await
    {
        Ok(Redeemed::New(r)) => Ok((StatusCode::CREATED, Json(r))),
        Ok(Redeemed::Existing(r)) => Ok((StatusCode::OK, Json(r))),
        Err(e) => Err(refusal(e)),
    }
}

/// What a platform's redeem form sends to check a code as it is typed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The code as typed: any case, spaces or dashes.
    pub code: String,
}

/// Says whether a code can be redeemed, without redeeming it. A code that
/// exists answers 200 whatever its state (`valid` says whether it can be
/// redeemed); one that does not, 404 `code_not_found`.
async fn check(
    Platform(_): Platform,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CheckRequest>,
) -> Result<Json<CodeCheck>, ApiError> {
    let code = parse_code(&request.code)?;
    redemption::check(&state.ctx.pool, &state.ctx.keys, &code)
        .await
        .map(Json)
        .map_err(refusal)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/redemptions", post(redeem))
        .route("/v1/codes/check", post(check))
}
