//! `POST /webhooks/{stripe,shopify,native}`: each channel verifies its own
//! signature; then every event is filed in the inbox and acknowledged the
//! same way. Filing is the whole of intake: one insert, no Redis. A worker's
//! feeder queues the event within moments (see `entitle_jobs::feed`).

use std::time::Duration;

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use chrono::Utc;
use entitle_jobs::{
    channel::{Envelope, Headers, SignatureError, native, shopify, stripe},
    inbox,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{AppState, error::ApiError};

struct HttpHeaders<'a>(&'a HeaderMap);

impl Headers for HttpHeaders<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

type Answer = Result<(StatusCode, Json<Value>), ApiError>;

async fn stripe(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Answer {
    let config = &state.ctx.config.stripe;
    let verified = stripe::verify_signature(
        HttpHeaders(&headers).header("stripe-signature"),
        &body,
        &config.webhook_secrets,
        Duration::from_secs(config.signature_tolerance_secs),
        Utc::now(),
    );
    accept(&state, stripe::CHANNEL, verified, stripe::envelope, &body).await
}

async fn shopify(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Answer {
    let config = &state.ctx.config.shopify;
    let headers = HttpHeaders(&headers);
    let verified = shopify::verify(
        &headers,
        &body,
        &config.webhook_secrets,
        Duration::from_secs(config.max_event_age_secs),
        Utc::now(),
    );
    accept(
        &state,
        shopify::CHANNEL,
        verified,
        |_| shopify::envelope(&headers),
        &body,
    )
    .await
}

async fn native(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Answer {
    let config = &state.ctx.config.native;
    let headers = HttpHeaders(&headers);
    let verified = native::verify(
        &headers,
        &body,
        &config.webhook_secrets,
        Duration::from_secs(config.signature_tolerance_secs),
        Utc::now(),
    );
    accept(
        &state,
        native::CHANNEL,
        verified,
        |text| native::envelope(&headers, text),
        &body,
    )
    .await
}

/// Files an authentic event once. A bad signature stores nothing; an
/// authentic event that cannot be named is kept, marked failed, and
/// answered 400.
async fn accept(
    state: &AppState,
    channel: &'static str,
    verified: Result<(), SignatureError>,
    envelope: impl FnOnce(&str) -> Result<Envelope, String>,
    body: &[u8],
) -> Answer {
    verified.map_err(|e| {
        metrics::counter!("entitle_webhooks_rejected_total", "channel" => channel, "code" => e.code())
            .increment(1);
        tracing::warn!(channel, code = e.code(), "webhook rejected");
        let status = match e {
            SignatureError::NotConfigured => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code(), e.to_string())
    })?;

    // Authentic from here on: whatever it holds is kept.
    let text = String::from_utf8_lossy(body);
    let envelope = envelope(&text);
    let (event_id, event_type) = match &envelope {
        Ok(e) => (e.event_id.clone(), e.event_type.clone()),
        Err(_) => (
            format!("unreadable:{}", hex::encode(Sha256::digest(body))),
            "unreadable".to_owned(),
        ),
    };
    let filed = state
        .intake
        .file(inbox::OwnedEvent {
            channel,
            event_id,
            event_type: event_type.clone(),
            body: text.into_owned(),
        })
        .await?;
    metrics::counter!("entitle_webhooks_received_total", "channel" => channel).increment(1);

    if let Err(problem) = envelope {
        if let inbox::Filed::New(id) = filed {
            inbox::fail(
                &state.ctx.pool,
                &[inbox::Failure {
                    id,
                    code: "event_malformed",
                    detail: problem.clone(),
                }],
            )
            .await?;
        }
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "event_malformed",
            problem,
        ));
    }

    let (id, duplicate) = match filed {
        inbox::Filed::New(id) => (id, false),
        inbox::Filed::Duplicate { id, .. } => (id, true),
    };
    tracing::debug!(channel, inbox_id = %id, %event_type, duplicate, "webhook accepted");
    Ok((
        StatusCode::OK,
        Json(json!({ "received": true, "event": id, "duplicate": duplicate })),
    ))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/stripe", post(stripe))
        .route("/webhooks/shopify", post(shopify))
        .route("/webhooks/native", post(native))
}
