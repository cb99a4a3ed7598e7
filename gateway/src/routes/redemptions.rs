//! The platform API: `POST /v1/redemptions` assigns a code to an account
//! and an entity; `POST /v1/codes/check` says whether a code can be.

use axum::{Json, extract::State, http::StatusCode};
use entitle_jobs::{
    code::Code,
    redemption::{self, CodeCheck, RedeemError, Redeemed, Redemption},
};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    AppState,
    error::{ApiError, ApiJson, ErrorBody},
    platform::Platform,
};

/// What a redeemer sends.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "code": "7KQ4-M2XP-9DHT-3WAB", "account_id": "acct_1", "entity_ref": "child_1" })))]
pub struct RedeemRequest {
    /// The code as typed: any case, spaces or dashes.
    pub code: String,
    /// The platform's account (1 to 200 characters).
    pub account_id: String,
    /// The person or thing the entitlement is for (1 to 200 characters).
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
        RedeemError::Database(cause) => return ApiError::database(cause),
    };
    metrics::counter!("entitle_redemptions_rejected_total", "code" => e.code()).increment(1);
    ApiError::new(status, e.code(), detail)
}

/// Redeem a code: assign it to an account and an entity.
///
/// Needs a platform key; the key's name is recorded as the caller.
/// Idempotent for the same holder: the same code, account and entity again
/// answer 200 with the same redemption.
#[utoipa::path(
    post, path = "/v1/redemptions", tag = "platform",
    request_body = RedeemRequest,
    security(("platform_key" = ["platform"])),
    extensions(("x-entitle-role" = json!("platform"))),
    responses(
        (status = 201, description = "Redeemed now", body = Redemption),
        (status = 200, description = "Redeemed earlier by the same account and entity: the same redemption", body = Redemption),
        (status = 404, description = "`code_not_found`: no code matches", body = ErrorBody),
        (status = 409, description = "`code_already_redeemed`: redeemed by someone else", body = ErrorBody),
        (status = 410, description = "`code_revoked`, `code_expired`", body = ErrorBody),
        (status = 422, description = "`code_malformed` (the check symbol is wrong: a typo), `invalid_request` (account_id or entity_ref empty or over 200 characters)", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this key or client address", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 503, description = "`overloaded`: too many platform requests at once", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ),
)]
async fn redeem_code(
    Platform(caller): Platform,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RedeemRequest>,
) -> Result<(StatusCode, Json<Redemption>), ApiError> {
    check_ref("account_id", &request.account_id)?;
    check_ref("entity_ref", &request.entity_ref)?;
    let code = parse_code(&request.code)?;
    match state
        .redeemer
        .redeem(
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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "code": "7KQ4-M2XP-9DHT-3WAB" })))]
pub struct CheckRequest {
    /// The code as typed: any case, spaces or dashes.
    pub code: String,
}

/// Check a code without redeeming it.
///
/// For a platform's redeem form: a code that exists answers 200 whatever
/// its state (`valid` says whether it can be redeemed now); one that does
/// not, 404. Never says who holds a code. Rate-limited like redemption.
#[utoipa::path(
    post, path = "/v1/codes/check", tag = "platform",
    request_body = CheckRequest,
    security(("platform_key" = ["platform"])),
    extensions(("x-entitle-role" = json!("platform"))),
    responses(
        (status = 200, description = "The code", body = CodeCheck),
        (status = 404, description = "`code_not_found`: no code matches", body = ErrorBody),
        (status = 422, description = "`code_malformed`: the check symbol is wrong (a typo)", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many requests from this key or client address", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 503, description = "`overloaded`: too many platform requests at once", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ),
)]
async fn check_code(
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

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(redeem_code))
        .routes(routes!(check_code))
}
