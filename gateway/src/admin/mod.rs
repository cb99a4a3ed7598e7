//! The admin API under `/admin/v1`: look-ups for support, actions for
//! operations, each action audited once and safe to retry with an
//! `Idempotency-Key`. Every handler carries its OpenAPI operation
//! (`#[utoipa::path]`, with the role it enforces) and is registered with
//! `routes!`, so what the router serves and what the document says are one.

pub mod audit_log;
pub mod batches;
pub mod codes;
pub mod deliveries;
pub mod events;
pub mod findings;
pub mod orders;
pub mod outcomes;
pub mod platform_events;
pub mod platform_keys;
pub mod reconciliations;
pub mod tokens;
pub mod views;

use axum::{
    Json,
    http::{HeaderMap, StatusCode},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;

use crate::{AppState, auth::Actor, error::ApiError};

/// The admin router, with its part of the OpenAPI document: each module
/// registers its handlers with `routes!`, which documents them in the same
/// call (see [`crate::openapi`]).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(orders::router())
        .merge(codes::router())
        .merge(batches::router())
        .merge(deliveries::router())
        .merge(events::router())
        .merge(audit_log::router())
        .merge(findings::router())
        .merge(reconciliations::router())
        .merge(tokens::router())
        .merge(platform_keys::router())
        .merge(platform_events::router())
}

/// The body of an action that needs nothing but its reason.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "reason": "asked by the customer in ticket 4711" })))]
pub struct ReasonOnly {
    /// Why; it goes into the audit event (1 to 1000 characters).
    pub reason: String,
}

/// The `Idempotency-Key` header every action but token creation takes.
#[derive(Debug, IntoParams)]
#[into_params(names("Idempotency-Key"), parameter_in = Header)]
pub struct IdempotencyKey(
    /// Retrying with the same key (1 to 200 visible characters) does
    /// nothing twice and answers the same; the key with another body is
    /// refused (`idempotency_key_reused`).
    #[allow(dead_code)]
    #[param(value_type = String, required = false)]
    Option<String>,
);

/// An action's outcome as its answer.
pub fn answer(status: StatusCode, outcome: impl Serialize) -> Result<Answer, ApiError> {
    Ok((
        status,
        Json(serde_json::to_value(outcome).map_err(ApiError::internal)?),
    ))
}

/// An action's outcome as its answer, read through its documented mirror
/// `T` (see [`outcomes`] and [`views::conform`]).
pub fn answer_as<T: Serialize + DeserializeOwned>(
    status: StatusCode,
    outcome: impl Serialize,
) -> Result<Answer, ApiError> {
    let value = serde_json::to_value(outcome).map_err(ApiError::internal)?;
    let typed: T = views::conform(std::any::type_name::<T>(), value)?;
    Ok((
        status,
        Json(serde_json::to_value(typed).map_err(ApiError::internal)?),
    ))
}

/// An answer of an action: status and JSON body.
pub type Answer = (StatusCode, Json<Value>);

/// Starts an action in `conn`'s transaction. With an `Idempotency-Key`
/// already used by this actor, returns the stored answer (the caller returns
/// it without acting); a key reused for another request is refused.
pub async fn idempotency_begin(
    conn: &mut PgConnection,
    actor: &Actor,
    key: Option<&str>,
    request: &str,
    body: &impl Serialize,
) -> Result<Option<Answer>, ApiError> {
    let Some(key) = key else {
        return Ok(None);
    };
    let hash = Sha256::digest(serde_json::to_vec(body).unwrap_or_default()).to_vec();
    // Concurrent requests with one key wait here for the first to finish.
    let claimed = sqlx::query(
        "INSERT INTO idempotency_key (actor, key, request, request_hash, status, response)
         VALUES ($1, $2, $3, $4, 0, 'null') ON CONFLICT DO NOTHING",
    )
    .bind(&actor.name)
    .bind(key)
    .bind(request)
    .bind(&hash)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        return Ok(None);
    }
    let (stored_request, stored_hash, status, response): (String, Vec<u8>, i32, Value) = sqlx::query_as(
        "SELECT request, request_hash, status, response FROM idempotency_key WHERE actor = $1 AND key = $2",
    )
    .bind(&actor.name)
    .bind(key)
    .fetch_one(&mut *conn)
    .await?;
    if stored_request != request || stored_hash != hash {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for another request",
        ));
    }
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
    Ok(Some((status, Json(response))))
}

/// Stores an action's answer under its `Idempotency-Key`, in the action's
/// transaction.
pub async fn idempotency_finish(
    conn: &mut PgConnection,
    actor: &Actor,
    key: Option<&str>,
    answer: &Answer,
) -> Result<(), ApiError> {
    if let Some(key) = key {
        sqlx::query(
            "UPDATE idempotency_key SET status = $3, response = $4 WHERE actor = $1 AND key = $2",
        )
        .bind(&actor.name)
        .bind(key)
        .bind(i32::from(answer.0.as_u16()))
        .bind(&answer.1.0)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The request's `Idempotency-Key`, checked.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 200 => Ok(Some(k.trim().to_owned())),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 200 visible characters",
            )),
        },
    }
}

/// An admin action in progress: its transaction, who acts, why, and the
/// request's idempotency key. Its one audit event and its stored answer are
/// written in the same transaction as the change.
pub struct Action<'a> {
    pub tx: sqlx::Transaction<'static, sqlx::Postgres>,
    actor: &'a Actor,
    key: Option<String>,
    reason: &'a str,
}

/// A started action, or the answer an earlier request with the same
/// `Idempotency-Key` got.
pub enum Begun<'a> {
    Fresh(Action<'a>),
    Replayed(Answer),
}

impl<'a> Action<'a> {
    /// Checks the reason and opens the action's transaction, keyed by the
    /// request's `Idempotency-Key`.
    pub async fn begin(
        ctx: &entitle_jobs::Context,
        actor: &'a Actor,
        headers: &HeaderMap,
        reason: &'a str,
        request: &str,
        body: &impl Serialize,
    ) -> Result<Begun<'a>, ApiError> {
        let key = idempotency_key(headers)?;
        Self::begin_keyed(ctx, actor, key, reason, request, body).await
    }

    /// The same with the key given (the console's one-time form key).
    pub async fn begin_keyed(
        ctx: &entitle_jobs::Context,
        actor: &'a Actor,
        key: Option<String>,
        reason: &'a str,
        request: &str,
        body: &impl Serialize,
    ) -> Result<Begun<'a>, ApiError> {
        require_reason(reason)?;
        let mut tx = ctx.pool.begin().await?;
        if let Some(stored) =
            idempotency_begin(&mut tx, actor, key.as_deref(), request, body).await?
        {
            return Ok(Begun::Replayed(stored));
        }
        Ok(Begun::Fresh(Action {
            tx,
            actor,
            key,
            reason,
        }))
    }

    /// Who acts, for the domain's actions (they write their own audit
    /// events in this transaction).
    pub fn who(&self) -> entitle_jobs::lifecycle::Who<'a> {
        entitle_jobs::lifecycle::Who {
            actor: &self.actor.name,
            role: self.actor.role,
            reason: self.reason,
        }
    }

    /// Writes the action's audit event.
    pub async fn audit(
        &mut self,
        action: &str,
        subject_type: &str,
        subject_id: String,
        data: Value,
    ) -> Result<(), ApiError> {
        let who = self.who();
        who.audit(&mut self.tx, action, subject_type, subject_id, data)
            .await?;
        Ok(())
    }

    /// Stores the answer under the idempotency key and commits.
    pub async fn finish(mut self, answer: Answer) -> Result<Answer, ApiError> {
        idempotency_finish(&mut self.tx, self.actor, self.key.as_deref(), &answer).await?;
        self.tx.commit().await?;
        Ok(answer)
    }
}

/// Starts an [`Action`], or returns the replayed answer from the handler.
#[macro_export]
macro_rules! begin_action {
    ($state:expr, $actor:expr, $headers:expr, $reason:expr, $path:expr, $body:expr) => {
        match $crate::admin::Action::begin(&$state.ctx, $actor, $headers, $reason, $path, $body)
            .await?
        {
            $crate::admin::Begun::Fresh(action) => action,
            $crate::admin::Begun::Replayed(answer) => return Ok(answer),
        }
    };
}

/// Every action takes a reason; it goes into the audit event.
pub fn require_reason(reason: &str) -> Result<(), ApiError> {
    if reason.trim().is_empty() || reason.len() > 1000 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_required",
            "every action needs a reason of 1 to 1000 characters",
        ));
    }
    Ok(())
}

/// 404 with a stable code.
pub fn not_found(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such {what}"),
    )
}

/// 409 with a stable code.
pub fn conflict(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, detail)
}
