//! `POST /v1/redemptions`: assign a code to an account and an entity.

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use entitle_jobs::{
    code::Code,
    redemption::{self, RedeemError, Redeemed, Redemption},
};
use serde::Deserialize;

use crate::{
    AppState,
    error::{ApiError, ApiJson},
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

async fn redeem(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RedeemRequest>,
) -> Result<(StatusCode, Json<Redemption>), ApiError> {
    check_ref("account_id", &request.account_id)?;
    check_ref("entity_ref", &request.entity_ref)?;
    // A typo is caught by the check symbol, before the database is asked.
    let code = Code::parse(&request.code).map_err(|e| {
        metrics::counter!("entitle_redemptions_rejected_total", "code" => "code_malformed")
            .increment(1);
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "code_malformed",
            e.to_string(),
        )
    })?;
    let outcome = redemption::redeem(
        &state.ctx.pool,
        &state.ctx.keys,
        &code,
        &request.account_id,
        &request.entity_ref,
    )
    .await;
    let (status, code, detail) = match outcome {
        Ok(Redeemed::New(r)) => return Ok((StatusCode::CREATED, Json(r))),
        Ok(Redeemed::Existing(r)) => return Ok((StatusCode::OK, Json(r))),
        Err(RedeemError::NotFound) => (StatusCode::NOT_FOUND, "code_not_found", "no code matches"),
        Err(RedeemError::AlreadyRedeemed) => (
            StatusCode::CONFLICT,
            "code_already_redeemed",
            "this code was already redeemed by someone else",
        ),
        Err(RedeemError::Revoked) => (StatusCode::GONE, "code_revoked", "this code was revoked"),
        Err(RedeemError::Expired) => (StatusCode::GONE, "code_expired", "this code has expired"),
        Err(RedeemError::Database(e)) => return Err(ApiError::internal(e)),
    };
    metrics::counter!("entitle_redemptions_rejected_total", "code" => code).increment(1);
    Err(ApiError::new(status, code, detail))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/redemptions", post(redeem))
}
