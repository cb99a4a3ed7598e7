//! `POST /webhooks/stripe`: verify, file in the inbox, enqueue, acknowledge.

use std::time::Duration;

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use entitle_jobs::{channel::stripe, inbox};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{AppState, error::ApiError};

async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let config = &state.ctx.config.stripe;
    stripe::verify_signature(
        headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok()),
        &body,
        &config.webhook_secrets,
        Duration::from_secs(config.signature_tolerance_secs),
        chrono::Utc::now(),
    )
    .map_err(|e| {
        metrics::counter!("entitle_webhooks_rejected_total", "channel" => stripe::CHANNEL, "code" => e.code())
            .increment(1);
        tracing::warn!(channel = stripe::CHANNEL, code = e.code(), "webhook signature rejected");
        ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
    })?;

    // Authentic from here on: whatever it holds is kept.
    let text = String::from_utf8_lossy(&body);
    let envelope = serde_json::from_str::<stripe::Envelope>(&text);
    let (event_id, event_type) = match &envelope {
        Ok(e) => (e.id.clone(), e.event_type.clone()),
        Err(_) => (
            format!("unreadable:{}", hex::encode(Sha256::digest(&body))),
            "unreadable".to_owned(),
        ),
    };
    let filed = inbox::file(
        &state.ctx.pool,
        inbox::NewEvent {
            channel: stripe::CHANNEL,
            event_id: &event_id,
            event_type: &event_type,
            body: &text,
        },
    )
    .await?;
    metrics::counter!("entitle_webhooks_received_total", "channel" => stripe::CHANNEL).increment(1);

    if let Err(e) = envelope {
        let detail = format!("the event is not a Stripe event: {e}");
        if let inbox::Filed::New(id) = filed {
            inbox::finish(
                &state.ctx.pool,
                id,
                "failed",
                Some("event_malformed"),
                &detail,
            )
            .await?;
        }
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "event_malformed",
            detail,
        ));
    }

    let (id, duplicate, finished) = match filed {
        inbox::Filed::New(id) => (id, false, false),
        inbox::Filed::Duplicate { id, finished } => (id, true, finished),
    };
    if !finished {
        // A duplicate of an unfinished event is enqueued again: the job is
        // idempotent, and this heals an enqueue that failed the first time.
        if let Err(e) = state.ctx.queues.process_event(id).await {
            // The event is safe in Postgres; the sweep will enqueue it.
            tracing::error!(inbox_id = %id, error = format!("{e:#}"), "webhook event not enqueued");
        }
    }
    tracing::info!(channel = stripe::CHANNEL, inbox_id = %id, %event_type, duplicate, "webhook accepted");
    Ok((
        StatusCode::OK,
        Json(json!({ "received": true, "event": id, "duplicate": duplicate })),
    ))
}

pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/stripe", post(receive))
}
