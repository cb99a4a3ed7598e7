//! Resending a delivery, optionally to a corrected address (the recipient
//! typo case): the codes still usable, in a new message; to another
//! address, as replacements (see [`entitle_jobs::lifecycle::resend`]).

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use entitle_jobs::{lifecycle, token::Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Answer, IdempotencyKey, answer_as, outcomes};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// Send a delivery again, and why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "reason": "typo", "email": "right@example.com" })))]
struct ResendRequest {
    reason: String,
    /// A corrected address; the codes go there as replacements.
    email: Option<String>,
}

/// Send a delivery's codes again, optionally to a corrected address.
#[utoipa::path(
    post, path = "/admin/v1/deliveries/{id}/resend", tag = "deliveries",
    params(("id" = Uuid, Path, description = "The delivery's id"), IdempotencyKey),
    request_body = ResendRequest,
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 201, description = "A new delivery is on its way", body = outcomes::Resent),
        (status = 404, description = "`not_found`: no such delivery", body = ErrorBody),
        (status = 409, description = "`delivery_scheduled` (a gift not sent yet), `nothing_to_resend`", body = ErrorBody),
        (status = 422, description = "`reason_required`, `invalid_email`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn resend_delivery(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ResendRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Support)?;
    let path = format!("POST /admin/v1/deliveries/{id}/resend");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let resent = lifecycle::resend(
        &mut action.tx,
        &state.ctx,
        who,
        id,
        request.email.as_deref(),
    )
    .await?;
    action
        .finish(answer_as::<outcomes::Resent>(StatusCode::CREATED, resent)?)
        .await
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(resend_delivery))
}
