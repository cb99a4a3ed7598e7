//! Orders and accounts: find, trace (lines, masked codes, deliveries and the
//! whole timeline), and change the expiry of an order's codes.

use axum::{
    Json,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Utc};
use entitle_jobs::{lifecycle, token::Role};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    Answer, answer_as, not_found, outcomes,
    views::{AuditEntry, CodeSummary, DeliverySummary, Timestamp, conform},
};
use crate::{
    AppState,
    auth::Actor,
    error::{ApiError, ApiJson, ErrorBody},
};

/// A code as views show it: never the code, only its last four symbols.
pub const CODE_JSON: &str = "json_build_object(
    'id', c.id, 'last4', c.last4, 'masked', '••••-••••-••••-' || c.last4,
    'product_sku', p.sku, 'state', c.state, 'unit_index', c.unit_index,
    'issued_at', c.issued_at, 'expires_at', c.expires_at, 'redeemed_at', c.redeemed_at,
    'revoked_at', c.revoked_at, 'expired_at', c.expired_at, 'replaces', c.replaces,
    'replaced_by', (SELECT r.id FROM activation_code r WHERE r.replaces = c.id LIMIT 1),
    'assignment', (SELECT json_build_object('account_id', a.account_id, 'entity_ref', a.entity_ref,
                                            'assigned_at', a.assigned_at, 'assigned_by', a.assigned_by)
                   FROM assignment a WHERE a.code_id = c.id AND a.ended_at IS NULL))";

/// A delivery as views show it.
pub const DELIVERY_JSON: &str = "json_build_object(
    'id', d.id, 'kind', d.kind, 'recipient_email', d.recipient_email, 'status', d.status,
    'attempts', d.attempts, 'last_error', d.last_error, 'send_after', d.send_after,
    'sent_at', d.sent_at, 'message_id', d.message_id, 'requested_by', d.requested_by,
    'codes', (SELECT count(*) FROM email_delivery_code dc WHERE dc.delivery_id = d.id))";

/// An audit event as views show it.
pub const EVENT_JSON: &str = "json_build_object(
    'id', e.id, 'at', e.occurred_at, 'actor', e.actor, 'action', e.action,
    'subject_type', e.subject_type, 'subject_id', e.subject_id, 'reason', e.reason, 'data', e.data)";

/// Which orders: give `channel_order_id` (with `channel`), `email` or
/// `account_id`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Find {
    /// `stripe`, `shopify` or `native`.
    channel: Option<String>,
    /// The channel's id of the order (a Checkout Session id, a Shopify order
    /// id, the native checkout's order id).
    channel_order_id: Option<String>,
    /// The buyer's or the gift recipient's address, in any case.
    email: Option<String>,
    account_id: Option<String>,
}

/// Orders found, newest first (at most 200).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderList {
    pub orders: Vec<OrderSummary>,
}

/// An order as a search result shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderSummary {
    pub id: Uuid,
    pub channel: String,
    pub channel_order_id: String,
    pub buyer_email: String,
    pub account_id: Option<String>,
    /// `paid`, `partially_refunded`, `refunded` or `cancelled`.
    pub state: String,
    pub paid_at: Option<Timestamp>,
    pub gift_recipient_email: Option<String>,
    /// Units bought, over all lines.
    pub units: i64,
}

/// Find orders by channel and channel order id, buyer email or account.
#[utoipa::path(
    get, path = "/admin/v1/orders", tag = "orders",
    params(Find),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The orders found, newest first", body = OrderList),
        (status = 422, description = "`invalid_request`: none of channel_order_id, email or account_id given", body = ErrorBody),
    ),
)]
async fn find_orders(
    actor: Actor,
    State(state): State<AppState>,
    Query(find): Query<Find>,
) -> Result<Json<OrderList>, ApiError> {
    actor.require(Role::Support)?;
    if find.channel_order_id.is_none() && find.email.is_none() && find.account_id.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "give channel_order_id (with channel), email or account_id",
        ));
    }
    let orders: Value = sqlx::query_scalar(
        "SELECT coalesce(json_agg(json_build_object(
                    'id', o.id, 'channel', o.channel, 'channel_order_id', o.channel_order_id,
                    'buyer_email', o.buyer_email, 'account_id', o.account_id, 'state', o.state,
                    'paid_at', o.paid_at, 'gift_recipient_email', o.gift_recipient_email,
                    'units', (SELECT coalesce(sum(quantity), 0) FROM order_line l WHERE l.order_id = o.id))
                ORDER BY o.created_at DESC), '[]')
         FROM (SELECT * FROM orders o
               WHERE ($1::text IS NULL OR o.channel = $1)
                 AND ($2::text IS NULL OR o.channel_order_id = $2)
                 AND ($3::text IS NULL OR lower(o.buyer_email) = lower($3)
                      OR lower(o.gift_recipient_email) = lower($3))
                 AND ($4::text IS NULL OR o.account_id = $4)
               ORDER BY o.created_at DESC LIMIT 200) o",
    )
    .bind(&find.channel)
    .bind(&find.channel_order_id)
    .bind(&find.email)
    .bind(&find.account_id)
    .fetch_one(&state.ctx.pool)
    .await?;
    Ok(Json(OrderList {
        orders: conform("the order search", orders)?,
    }))
}

/// How much of an order's codes and timeline a view holds: everything (the
/// API), or a page of them (the console, where an order may hold thousands).
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// Codes from this position; at most `codes_limit` (None: all).
    pub codes_offset: i64,
    pub codes_limit: Option<i64>,
    /// The latest this many audit events (None: all, oldest first).
    pub timeline_limit: Option<i64>,
}

/// The full trace of an order.
pub async fn order_view(pool: &sqlx::PgPool, id: Uuid) -> Result<Option<Value>, sqlx::Error> {
    order_view_window(pool, id, Window::default()).await
}

/// The trace of an order, with its codes and timeline windowed.
pub async fn order_view_window(
    pool: &sqlx::PgPool,
    id: Uuid,
    window: Window,
) -> Result<Option<Value>, sqlx::Error> {
    let sql = format!(
        "SELECT json_build_object(
            'id', o.id, 'channel', o.channel, 'channel_order_id', o.channel_order_id,
            'payment_reference', o.payment_reference, 'buyer_email', o.buyer_email,
            'buyer_name', o.buyer_name, 'account_id', o.account_id, 'state', o.state,
            'currency', o.currency, 'amount_total', o.amount_total, 'paid_at', o.paid_at,
            'issued_at', o.issued_at,
            'gift', CASE WHEN o.gift_recipient_email IS NULL THEN NULL ELSE json_build_object(
                'recipient_email', o.gift_recipient_email, 'recipient_name', o.gift_recipient_name,
                'message', o.gift_message, 'send_at', o.gift_send_at) END,
            'lines', (SELECT coalesce(json_agg(json_build_object(
                        'id', l.id, 'line_index', l.line_index, 'channel_reference', l.channel_reference,
                        'product_sku', p.sku, 'quantity', l.quantity,
                        'refunded_quantity', l.refunded_quantity) ORDER BY l.line_index), '[]')
                      FROM order_line l JOIN product p ON p.id = l.product_id WHERE l.order_id = o.id),
            'codes', (SELECT coalesce(json_agg({CODE_JSON} ORDER BY c.line_index, c.unit_index), '[]')
                      FROM (SELECT c.*, l.line_index FROM activation_code c
                            JOIN order_line l ON l.id = c.order_line_id WHERE l.order_id = o.id
                            ORDER BY l.line_index, c.unit_index LIMIT $3 OFFSET $2) c
                      JOIN product p ON p.id = c.product_id),
            'code_count', (SELECT count(*) FROM activation_code c
                           JOIN order_line l ON l.id = c.order_line_id WHERE l.order_id = o.id),
            'codes_by_state', (SELECT coalesce(json_object_agg(s.state, s.n), '{{}}') FROM (
                                   SELECT c.state, count(*) AS n FROM activation_code c
                                   JOIN order_line l ON l.id = c.order_line_id
                                   WHERE l.order_id = o.id GROUP BY c.state) s),
            'replacement_codes', (SELECT coalesce(json_agg({CODE_JSON} ORDER BY c.issued_at), '[]')
                      FROM activation_code c JOIN code_batch b ON b.id = c.batch_id
                      JOIN product p ON p.id = c.product_id WHERE b.order_id = o.id),
            'deliveries', (SELECT coalesce(json_agg({DELIVERY_JSON} ORDER BY d.created_at), '[]')
                           FROM email_delivery d WHERE d.order_id = o.id),
            'adjustments', (SELECT coalesce(json_agg(json_build_object('id', a.id, 'kind', a.kind,
                                'scope', a.scope, 'lines', a.lines, 'amount', a.amount,
                                'adjustment_key', a.adjustment_key, 'created_at', a.created_at,
                                'applied_at', a.applied_at) ORDER BY a.created_at), '[]')
                            FROM order_adjustment a WHERE a.order_id = o.id),
            'events', (SELECT coalesce(json_agg(json_build_object('id', w.id, 'channel', w.channel,
                            'event_id', w.event_id, 'event_type', w.event_type, 'status', w.status,
                            'error_code', w.error_code, 'received_at', w.received_at)
                            ORDER BY w.received_at), '[]')
                       FROM webhook_inbox w WHERE w.order_id = o.id),
            'timeline', (SELECT coalesce(json_agg({EVENT_JSON} ORDER BY e.id), '[]')
                         FROM (SELECT * FROM audit_event e
                         WHERE (e.subject_type = 'order' AND e.subject_id = o.id::text)
                            OR (e.subject_type = 'code' AND e.subject_id IN (
                                  SELECT c.id::text FROM activation_code c
                                  LEFT JOIN order_line l ON l.id = c.order_line_id
                                  LEFT JOIN code_batch b ON b.id = c.batch_id
                                  WHERE l.order_id = o.id OR b.order_id = o.id))
                            OR (e.subject_type = 'delivery' AND e.subject_id IN (
                                  SELECT d.id::text FROM email_delivery d WHERE d.order_id = o.id))
                            OR (e.subject_type = 'webhook_event' AND e.subject_id IN (
                                  SELECT w.id::text FROM webhook_inbox w WHERE w.order_id = o.id))
                         ORDER BY e.id DESC LIMIT $4) e)
         ) FROM orders o WHERE o.id = $1"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(window.codes_offset)
        .bind(window.codes_limit)
        .bind(window.timeline_limit)
        .fetch_optional(pool)
        .await
}

/// An order with its lines, codes (masked), deliveries and timeline.
#[utoipa::path(
    get, path = "/admin/v1/orders/{id}", tag = "orders",
    params(("id" = Uuid, Path, description = "The order's id")),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The order's whole trace", body = OrderView),
        (status = 404, description = "`not_found`: no such order", body = ErrorBody),
    ),
)]
async fn show_order(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<OrderView>, ApiError> {
    actor.require(Role::Support)?;
    let view = order_view(&state.ctx.pool, id)
        .await?
        .ok_or_else(|| not_found("order"))?;
    Ok(Json(conform("the order view", view)?))
}

/// The full trace of an order: lines, codes, deliveries, the channel's
/// events and adjustments, and every audit event about any of them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    pub channel: String,
    pub channel_order_id: String,
    /// The payment's id in the channel (a payment intent), where known.
    pub payment_reference: Option<String>,
    pub buyer_email: String,
    pub buyer_name: Option<String>,
    pub account_id: Option<String>,
    /// `paid`, `partially_refunded`, `refunded` or `cancelled`.
    pub state: String,
    /// ISO 4217.
    pub currency: Option<String>,
    /// Minor units (cents).
    pub amount_total: Option<i64>,
    pub paid_at: Option<Timestamp>,
    /// When its codes were issued.
    pub issued_at: Option<Timestamp>,
    /// Null unless the codes go to someone else.
    pub gift: Option<Gift>,
    pub lines: Vec<OrderLine>,
    pub codes: Vec<CodeSummary>,
    /// All the codes of its lines (`codes` may hold a window of them).
    pub code_count: i64,
    /// Its lines' codes counted by state.
    #[schema(value_type = std::collections::BTreeMap<String, i64>)]
    pub codes_by_state: Value,
    /// Codes reissued for this order's codes (batches of kind replacement).
    pub replacement_codes: Vec<CodeSummary>,
    pub deliveries: Vec<DeliverySummary>,
    /// Refunds and cancellations, applied or waiting for the order.
    pub adjustments: Vec<Adjustment>,
    /// The channel's webhook events about it.
    pub events: Vec<OrderEvent>,
    /// Audit events about the order, its codes, deliveries and events.
    pub timeline: Vec<AuditEntry>,
}

/// A gift: the codes go to the recipient, the buyer gets a receipt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Gift {
    pub recipient_email: String,
    pub recipient_name: Option<String>,
    pub message: Option<String>,
    /// The recipient's email is not sent before this.
    pub send_at: Option<Timestamp>,
}

/// An order line: a product and how many units.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderLine {
    pub id: Uuid,
    pub line_index: i32,
    /// The channel's reference that named the product (a price id, a
    /// variant, a SKU).
    pub channel_reference: String,
    pub product_sku: String,
    pub quantity: i32,
    pub refunded_quantity: i32,
}

/// A refund or cancellation of an order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Adjustment {
    pub id: Uuid,
    /// `refund` or `cancellation`.
    pub kind: String,
    /// `full`, `lines` or `amount`.
    pub scope: String,
    /// For scope `lines`: how many units of which products.
    pub lines: Vec<AdjustedLine>,
    /// For scope `amount`: minor units refunded.
    pub amount: Option<i64>,
    /// Unique per channel: the same refund sent again is applied once.
    pub adjustment_key: String,
    pub created_at: Timestamp,
    /// Null while it waits for its order.
    pub applied_at: Option<Timestamp>,
}

/// Units of one product a refund names.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdjustedLine {
    /// The channel's references of the product (any of them matches a line).
    pub references: Vec<String>,
    pub quantity: u32,
}

/// A webhook event as an order's trace shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderEvent {
    pub id: Uuid,
    pub channel: String,
    /// The channel's id of the event.
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `processed`, `ignored` or `failed`.
    pub status: String,
    pub error_code: Option<String>,
    pub received_at: Timestamp,
}

/// The orders linked to an account and the codes assigned to it.
pub async fn account_view(pool: &sqlx::PgPool, account_id: &str) -> Result<Value, sqlx::Error> {
    let sql = format!(
        "SELECT json_build_object(
            'account_id', $1::text,
            'orders', (SELECT coalesce(json_agg(json_build_object('id', o.id, 'channel', o.channel,
                            'channel_order_id', o.channel_order_id, 'state', o.state, 'paid_at', o.paid_at)
                            ORDER BY o.created_at DESC), '[]') FROM orders o WHERE o.account_id = $1),
            'codes', (SELECT coalesce(json_agg({CODE_JSON} ORDER BY a.assigned_at DESC), '[]')
                      FROM assignment a JOIN activation_code c ON c.id = a.code_id
                      JOIN product p ON p.id = c.product_id
                      WHERE a.account_id = $1 AND a.ended_at IS NULL))"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(account_id)
        .fetch_one(pool)
        .await
}

/// The orders linked to an account and the codes it holds.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountView {
    pub account_id: String,
    /// Newest first.
    pub orders: Vec<AccountOrder>,
    /// The codes assigned to it now, latest first.
    pub codes: Vec<CodeSummary>,
}

/// An order as an account's view lists it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountOrder {
    pub id: Uuid,
    pub channel: String,
    pub channel_order_id: String,
    pub state: String,
    pub paid_at: Option<Timestamp>,
}

/// Orders linked to an account and codes assigned to it.
#[utoipa::path(
    get, path = "/admin/v1/accounts/{account_id}", tag = "orders",
    params(("account_id" = String, Path, description = "The platform's account id")),
    security(("bearer" = ["support"])),
    extensions(("x-entitle-role" = json!("support"))),
    responses(
        (status = 200, description = "The account's orders and codes (empty lists for an account Entitle never saw)", body = AccountView),
    ),
)]
async fn show_account(
    actor: Actor,
    State(state): State<AppState>,
    Path(account_id): Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    actor.require(Role::Support)?;
    let view = account_view(&state.ctx.pool, &account_id).await?;
    Ok(Json(conform("the account view", view)?))
}

/// A new expiry, with its reason.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({ "expires_at": "2031-01-01T00:00:00Z", "reason": "goodwill" })))]
pub struct ExpiryRequest {
    pub expires_at: DateTime<Utc>,
    pub reason: String,
}

/// Change the expiry of every code of an order.
///
/// Revoked codes keep theirs; an expired code extended into the future is
/// issued again.
#[utoipa::path(
    post, path = "/admin/v1/orders/{id}/expiry", tag = "orders",
    params(("id" = Uuid, Path, description = "The order's id"), super::IdempotencyKey),
    request_body = ExpiryRequest,
    security(("bearer" = ["operator"])),
    extensions(("x-entitle-role" = json!("operator"))),
    responses(
        (status = 200, description = "The codes moved to the new expiry", body = outcomes::OrderExpiryChanged),
        (status = 404, description = "`not_found`: no such order", body = ErrorBody),
        (status = 422, description = "`reason_required`, `idempotency_key_reused`", body = ErrorBody),
    ),
)]
async fn change_order_expiry(
    actor: Actor,
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ExpiryRequest>,
) -> Result<Answer, ApiError> {
    actor.require(Role::Operator)?;
    let path = format!("POST /admin/v1/orders/{id}/expiry");
    let mut action =
        crate::begin_action!(&state, &actor, &headers, &request.reason, &path, &request);
    let who = action.who();
    let changed =
        lifecycle::change_order_expiry(&mut action.tx, who, id, request.expires_at).await?;
    let answer = answer_as::<outcomes::OrderExpiryChanged>(StatusCode::OK, changed)?;
    action.finish(answer).await
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(find_orders))
        .routes(routes!(show_order))
        .routes(routes!(change_order_expiry))
        .routes(routes!(show_account))
}
