//! The admin API under `/admin/v1`: look-ups for support, actions for
//! operations, each action audited once and safe to retry with an
//! `Idempotency-Key`. [`ROUTES`] describes every route: it drives the OpenAPI
//! document and the role-matrix test.

pub mod audit_log;
pub mod batches;
pub mod codes;
pub mod deliveries;
pub mod events;
pub mod findings;
pub mod openapi;
pub mod orders;
pub mod platform_keys;
pub mod reconciliations;
pub mod tokens;

use axum::{
    Json, Router,
    http::{HeaderMap, StatusCode},
};
use entitle_jobs::token::Role;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::{AppState, auth::Actor, error::ApiError};

/// One admin route, as documented and tested.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    pub method: &'static str,
    /// OpenAPI and axum style: `/admin/v1/codes/{id}`.
    pub path: &'static str,
    pub role: Role,
    pub summary: &'static str,
    /// An example body (JSON), for actions.
    pub example: Option<&'static str>,
}

const fn route(
    method: &'static str,
    path: &'static str,
    role: Role,
    summary: &'static str,
    example: Option<&'static str>,
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        role,
        summary,
        example,
    }
}

use Role::{Admin, Operator, Support};

/// Every admin route.
pub const ROUTES: &[RouteDoc] = &[
    route(
        "GET",
        "/admin/v1/orders",
        Support,
        "Find orders by channel and channel order id, buyer email or account",
        None,
    ),
    route(
        "GET",
        "/admin/v1/orders/{id}",
        Support,
        "An order with its lines, codes (masked), deliveries and timeline",
        None,
    ),
    route(
        "POST",
        "/admin/v1/orders/{id}/expiry",
        Operator,
        "Change the expiry of every code of an order",
        Some(r#"{"expires_at":"2031-01-01T00:00:00Z","reason":"goodwill"}"#),
    ),
    route(
        "GET",
        "/admin/v1/accounts/{account_id}",
        Support,
        "Orders linked to an account and codes assigned to it",
        None,
    ),
    route(
        "GET",
        "/admin/v1/codes/{id}",
        Support,
        "A code: product, state, origin, expiry, assignment, reissue chain, deliveries, history",
        None,
    ),
    route(
        "POST",
        "/admin/v1/codes/lookup",
        Support,
        "The same, for a code as a customer typed it",
        Some(r#"{"code":"0000-0000-0000-0000"}"#),
    ),
    route(
        "POST",
        "/admin/v1/codes/{id}/revoke",
        Operator,
        "Revoke a code (a redeemed one only with include_redeemed)",
        Some(r#"{"reason":"fraud","include_redeemed":false}"#),
    ),
    route(
        "POST",
        "/admin/v1/codes/{id}/reissue",
        Operator,
        "Revoke a code and email a replacement linked to it",
        Some(r#"{"reason":"lost","email":"new@example.com"}"#),
    ),
    route(
        "POST",
        "/admin/v1/codes/{id}/reassign",
        Operator,
        "Move a redeemed code to another account or entity",
        Some(r#"{"reason":"wrong profile","account_id":"acct_2","entity_ref":"child_1"}"#),
    ),
    route(
        "POST",
        "/admin/v1/codes/{id}/unassign",
        Operator,
        "Return a redeemed code to issued",
        Some(r#"{"reason":"redeemed by mistake"}"#),
    ),
    route(
        "POST",
        "/admin/v1/codes/{id}/expiry",
        Operator,
        "Change a code's expiry",
        Some(r#"{"expires_at":"2031-01-01T00:00:00Z","reason":"goodwill"}"#),
    ),
    route(
        "POST",
        "/admin/v1/batches",
        Operator,
        "Create codes outside checkout",
        Some(
            r#"{"product_sku":"KIT-BASIC","quantity":1,"kind":"customer_service","reason":"replacement kit"}"#,
        ),
    ),
    route(
        "GET",
        "/admin/v1/batches/{id}",
        Support,
        "A batch and its codes (masked)",
        None,
    ),
    route(
        "POST",
        "/admin/v1/batches/{id}/export",
        Operator,
        "The batch's codes as CSV, once",
        Some(r#"{"reason":"for partner"}"#),
    ),
    route(
        "POST",
        "/admin/v1/deliveries/{id}/resend",
        Support,
        "Send a delivery's codes again, optionally to a corrected address",
        Some(r#"{"reason":"typo","email":"right@example.com"}"#),
    ),
    route(
        "POST",
        "/admin/v1/events/retry",
        Operator,
        "Queue failed webhook events again",
        Some(r#"{"reason":"catalogue fixed","error_code":"unknown_product"}"#),
    ),
    route(
        "GET",
        "/admin/v1/audit",
        Support,
        "The audit log, filtered by subject, actor, action and time; paginated",
        None,
    ),
    route(
        "GET",
        "/admin/v1/findings",
        Support,
        "Findings for operations, filtered by kind, status or run",
        None,
    ),
    route(
        "GET",
        "/admin/v1/findings/export",
        Support,
        "Findings as CSV (same filters), all of them, streamed",
        None,
    ),
    route(
        "POST",
        "/admin/v1/reconciliations",
        Operator,
        "Start a reconciliation run for a channel and window (default: the scheduled window)",
        Some(
            r#"{"channel":"stripe","from":"2026-11-01T00:00:00Z","to":"2026-11-02T00:00:00Z","reason":"webhook outage"}"#,
        ),
    ),
    route(
        "GET",
        "/admin/v1/reconciliations",
        Support,
        "Reconciliation runs, newest first, with duration, counts and peak memory",
        None,
    ),
    route(
        "GET",
        "/admin/v1/reconciliations/{id}",
        Support,
        "A reconciliation run and its findings by kind and status",
        None,
    ),
    route(
        "POST",
        "/admin/v1/findings/{id}/resolve",
        Operator,
        "Mark a finding resolved",
        Some(r#"{"reason":"customer refunded by hand"}"#),
    ),
    route(
        "POST",
        "/admin/v1/findings/{id}/ignore",
        Operator,
        "Mark a finding ignored",
        Some(r#"{"reason":"test order"}"#),
    ),
    route(
        "GET",
        "/admin/v1/tokens",
        Admin,
        "API tokens (names, roles, last use)",
        None,
    ),
    route(
        "POST",
        "/admin/v1/tokens",
        Admin,
        "Create a token; it is shown once",
        Some(r#"{"name":"alice","role":"support","reason":"new support agent"}"#),
    ),
    route(
        "POST",
        "/admin/v1/tokens/{name}/revoke",
        Admin,
        "Revoke a token",
        Some(r#"{"reason":"left the team"}"#),
    ),
    route(
        "GET",
        "/admin/v1/products",
        Support,
        "Products and their channel references",
        None,
    ),
    route(
        "POST",
        "/admin/v1/products/reload",
        Admin,
        "Reload the catalogue file into the database",
        Some(r#"{"reason":"new price"}"#),
    ),
];

/// The admin router.
pub fn router() -> Router<AppState> {
    Router::new()
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
        .merge(openapi::router())
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
