//! Resending a delivery, optionally to a corrected address (the recipient
//! typo case): the codes still usable, in a new message; to another
//! address, as replacements (see [`entitle_jobs::lifecycle::resend`]).

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use entitle_jobs::{lifecycle, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::Answer;
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson},
};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ResendRequest {
    reason: String,
    email: Option<String>,
}

async fn resend(
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
        .finish((StatusCode::CREATED, Json(json!(resent))))
        .await
}

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/v1/deliveries/{id}/resend", post(resend))
}
