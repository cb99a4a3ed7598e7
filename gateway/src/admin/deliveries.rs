//! Resending a delivery, optionally to a corrected address (the recipient
//! typo case): the codes still usable, in a new message.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use chrono::Utc;
use entitle_jobs::{
    delivery::{self, CodeSelection, NewDelivery},
    token::Role,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{Answer, conflict, not_found};
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
    if let Some(email) = &request.email
        && email.parse::<lettre::Address>().is_err()
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_email",
            "email is not an address",
        ));
    }
    let path = format!("POST /admin/v1/deliveries/{id}/resend");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let original: Option<(Option<Uuid>, String, Option<String>)> = sqlx::query_as(
        "SELECT order_id, recipient_email, recipient_name FROM email_delivery WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *action.tx)
    .await?;
    let (order_id, original_to, original_name) = original.ok_or_else(|| not_found("delivery"))?;
    let codes: Vec<Uuid> = sqlx::query_scalar(
        "SELECT c.id FROM email_delivery_code dc JOIN activation_code c ON c.id = dc.code_id
         WHERE dc.delivery_id = $1 AND c.state = 'issued' ORDER BY dc.position",
    )
    .bind(id)
    .fetch_all(&mut *action.tx)
    .await?;
    if codes.is_empty() {
        return Err(conflict(
            "nothing_to_resend",
            "the delivery carries no code that is still usable",
        ));
    }
    let recipient = request.email.clone().unwrap_or(original_to.clone());
    let name = if request.email.is_some() {
        None
    } else {
        original_name.as_deref()
    };
    let delivery = delivery::create(
        &mut action.tx,
        &NewDelivery {
            order_id,
            kind: "resend",
            recipient: &recipient,
            recipient_name: name,
            send_after: Utc::now(),
            codes: CodeSelection::These(codes.clone()),
            requested_by: Some(&actor.name),
        },
        &state.ctx.config.email.message_id_domain,
    )
    .await?
    .ok_or_else(|| ApiError::internal("the resend delivery was not created"))?;
    action
        .audit(
            "delivery.resent",
            "delivery",
            id.to_string(),
            json!({
                "order": order_id,
                "before": { "recipient": original_to },
                "after": { "recipient": recipient, "delivery": delivery, "codes": codes.len() },
            }),
        )
        .await?;
    let answer = (
        StatusCode::CREATED,
        Json(
            json!({ "delivery": delivery, "resends": id, "recipient": recipient, "codes": codes.len() }),
        ),
    );
    let answer = action.finish(answer).await?;
    Ok(answer)
}

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/v1/deliveries/{id}/resend", post(resend))
}
