//! `POST /webhooks/{stripe,shopify,native}`: each channel verifies its own
//! signature, then its adapter reads the event as the worker will. A usable
//! event is filed in the inbox and acknowledged the same way whatever its
//! channel: filing is the whole of intake, one insert, no Redis, and a
//! worker's feeder queues the event within moments (see
//! `entitle_jobs::feed`). An event that can never be carried out is refused
//! by the native channel (`400`: its sender is the platform, which can fix
//! it) and, from Stripe and Shopify, filed already failed and answered
//! `200` (they would retry it for days, and no retry can mend it).

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
    channel::{Envelope, Headers, Screened, SignatureError, Unusable, native, shopify, stripe},
    handlers, inbox,
};
use serde_json::{Value, json};

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
    authentic(stripe::CHANNEL, verified)?;
    file(&state, stripe::CHANNEL, stripe::screen(&body), &body).await
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
    authentic(shopify::CHANNEL, verified)?;
    file(
        &state,
        shopify::CHANNEL,
        shopify::screen(&headers, &body),
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
    authentic(native::CHANNEL, verified)?;
    let envelope = native::screen(&headers, &body, handlers::native_limits(&state.ctx))
        .map_err(|why| refused(native::CHANNEL, why))?;
    file(&state, native::CHANNEL, Screened::Usable(envelope), &body).await
}

/// A bad signature stores nothing and is answered at once.
fn authentic(channel: &'static str, verified: Result<(), SignatureError>) -> Result<(), ApiError> {
    verified.map_err(|e| {
        metrics::counter!("entitle_webhooks_rejected_total", "channel" => channel, "code" => e.code())
            .increment(1);
        tracing::warn!(channel, code = e.code(), "webhook rejected");
        let status = match e {
            SignatureError::NotConfigured => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code(), e.to_string())
    })
}

/// An authentic event that can never be carried out, answered `400` and not
/// stored: the sender hears what to fix.
fn refused(channel: &'static str, why: Unusable) -> ApiError {
    metrics::counter!("entitle_webhooks_rejected_total", "channel" => channel, "code" => why.code)
        .increment(1);
    tracing::info!(channel, code = why.code, detail = %why.detail, "webhook refused");
    ApiError::new(StatusCode::BAD_REQUEST, why.code, why.detail)
}

/// Files an authentic event once: a usable one pending, for the worker; an
/// unusable one already failed, with its finding.
async fn file(state: &AppState, channel: &'static str, screened: Screened, body: &[u8]) -> Answer {
    let (filed, event_type, failed) = match screened {
        Screened::Usable(Envelope {
            event_id,
            event_type,
        }) => {
            let filed = state
                .intake
                .file(inbox::OwnedEvent {
                    channel,
                    event_id,
                    event_type: event_type.clone(),
                    body: body.to_vec(),
                })
                .await?;
            (filed, event_type, None)
        }
        Screened::Unusable { envelope, why } => {
            let filed = inbox::file_failed(
                &state.ctx.pool,
                inbox::NewEvent {
                    channel,
                    event_id: &envelope.event_id,
                    event_type: &envelope.event_type,
                    body,
                },
                why.code,
                &why.detail,
            )
            .await?;
            (filed, envelope.event_type, Some(why))
        }
    };
    metrics::counter!("entitle_webhooks_received_total", "channel" => channel).increment(1);
    let (id, duplicate) = match filed {
        inbox::Filed::New(id) => (id, false),
        inbox::Filed::Duplicate { id, .. } => (id, true),
    };
    tracing::debug!(channel, inbox_id = %id, %event_type, duplicate, "webhook accepted");
    let mut answer = json!({ "received": true, "event": id, "duplicate": duplicate });
    if let Some(why) = failed.filter(|_| !duplicate) {
        answer["failed"] = json!({ "code": why.code, "detail": why.detail });
    }
    Ok((StatusCode::OK, Json(answer)))
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/stripe", post(stripe))
        .route("/webhooks/shopify", post(shopify))
        .route("/webhooks/native", post(native))
}
