//! Events for the platform: what changed about a code or an order, written
//! to the `platform_event` outbox in the transaction that made the change,
//! then delivered to every endpoint, signed per the Standard Webhooks spec
//! (see [`deliver`]). An event carries ids, the code's last four symbols,
//! the product, the account and the entity; never a whole code.

pub mod deliver;
pub mod endpoint;
pub mod log;
pub mod sign;

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// The kinds of event the platform hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OrderFulfilled,
    CodeRedeemed,
    CodeReassigned,
    CodeUnassigned,
    CodeRevoked,
    CodeReissued,
    CodeExpired,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::OrderFulfilled,
        Kind::CodeRedeemed,
        Kind::CodeReassigned,
        Kind::CodeUnassigned,
        Kind::CodeRevoked,
        Kind::CodeReissued,
        Kind::CodeExpired,
    ];

    /// The event's `type`, as sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OrderFulfilled => "order.fulfilled",
            Kind::CodeRedeemed => "code.redeemed",
            Kind::CodeReassigned => "code.reassigned",
            Kind::CodeUnassigned => "code.unassigned",
            Kind::CodeRevoked => "code.revoked",
            Kind::CodeReissued => "code.reissued",
            Kind::CodeExpired => "code.expired",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// A code event's `data`: the code as it is after the change, its product,
/// its order or batch, and its latest holder (the one just given, or the one
/// just taken away), then `extra` on top. Kept in one place so every code
/// event has the same shape; redemption writes the same fields in its own
/// single statement (see [`crate::redemption`]).
const RECORD_CODES: &str = "
    INSERT INTO platform_event (id, type, code_id, order_id, data)
    SELECT gen_random_uuid(), $1, c.id, coalesce(l.order_id, b.order_id),
           jsonb_build_object(
               'code_id', c.id, 'code_last4', c.last4, 'state', c.state,
               'product_sku', p.sku, 'product_name', p.name,
               'order_id', coalesce(l.order_id, b.order_id), 'batch_id', c.batch_id,
               'expires_at', c.expires_at,
               'account_id', h.account_id, 'entity_ref', h.entity_ref) || $3::jsonb
    FROM activation_code c
    JOIN product p ON p.id = c.product_id
    LEFT JOIN order_line l ON l.id = c.order_line_id
    LEFT JOIN code_batch b ON b.id = c.batch_id
    LEFT JOIN LATERAL (
        SELECT account_id, entity_ref FROM assignment
        WHERE code_id = c.id ORDER BY assigned_at DESC LIMIT 1
    ) h ON true
    WHERE c.id = ANY ($2)
    ORDER BY c.id";

/// Records one event of `kind` for each of `codes`, in `conn`'s
/// transaction, with `extra` (an object) added to each event's data.
pub async fn record_codes(
    conn: &mut PgConnection,
    kind: Kind,
    codes: &[Uuid],
    extra: Value,
) -> sqlx::Result<()> {
    if codes.is_empty() {
        return Ok(());
    }
    sqlx::query(RECORD_CODES)
        .bind(kind.as_str())
        .bind(codes)
        .bind(extra)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records `order.fulfilled` for each of `orders`: the order, its account
/// and every code it was given, in `conn`'s transaction.
pub async fn record_fulfilled(conn: &mut PgConnection, orders: &[Uuid]) -> sqlx::Result<()> {
    if orders.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO platform_event (id, type, order_id, data)
         SELECT gen_random_uuid(), 'order.fulfilled', o.id, jsonb_build_object(
                    'order_id', o.id, 'channel', o.channel, 'channel_order_id', o.channel_order_id,
                    'account_id', o.account_id,
                    'codes', coalesce((
                        SELECT jsonb_agg(jsonb_build_object(
                                   'code_id', c.id, 'code_last4', c.last4, 'state', c.state,
                                   'product_sku', p.sku, 'product_name', p.name,
                                   'expires_at', c.expires_at)
                               ORDER BY l.line_index, c.unit_index)
                        FROM order_line l
                        JOIN activation_code c ON c.order_line_id = l.id
                        JOIN product p ON p.id = c.product_id
                        WHERE l.order_id = o.id
                          -- The codes by their lines' index whatever the
                          -- planner thinks of the tables' sizes: under the
                          -- statistics of a table filling up it scanned
                          -- every code for each order (a 20,000-order drain
                          -- at 631 orders/s, Postgres 1.8 cores busy).
                          AND c.order_line_id = ANY(ARRAY(
                              SELECT id FROM order_line WHERE order_id = o.id))), '[]'::jsonb))
         FROM orders o WHERE o.id = ANY ($1)
         ORDER BY o.id",
    )
    .bind(orders)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
