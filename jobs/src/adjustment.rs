//! Refunds and cancellations: recorded once per channel adjustment, applied
//! to the order's codes when the order is issued (at once, or when a late
//! purchase arrives), revoking unredeemed codes and flagging redeemed ones.

use chrono::Utc;
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    command::{AdjustedLine, Adjustment, AdjustmentScope},
    delivery::{self, CodeSelection, NewDelivery},
    error::JobError,
    finding::{self, NewFinding},
    inbox,
    issuance::{self, IssueSettings},
    platform_event,
};

/// Whether money came back, or the order was called off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Refund,
    Cancellation,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Refund => "refund",
            Kind::Cancellation => "cancellation",
        }
    }
}

/// Records the adjustment carried by inbox event `inbox_id` and applies it if
/// its order is already issued. Returns the deliveries it created
/// (revocation notices, when configured).
pub async fn record(
    pool: &PgPool,
    settings: &IssueSettings<'_>,
    inbox_id: Uuid,
    kind: Kind,
    adjustment: &Adjustment,
) -> Result<Vec<Uuid>, JobError> {
    let mut tx = pool.begin().await?;
    if !inbox::lock_pending(&mut tx, inbox_id).await? {
        return Ok(Vec::new());
    }
    // An issuance of the same order waits for this, or this for it: one of
    // the two sees the other (see `issuance::lock_order_keys`).
    issuance::lock_order_keys(
        &mut tx,
        &[issuance::order_key(
            &adjustment.channel,
            &adjustment.order_key,
        )],
    )
    .await?;
    let (scope, lines, amount) = match &adjustment.scope {
        AdjustmentScope::Full => ("full", json!([]), None),
        AdjustmentScope::Lines { lines } => ("lines", json!(lines), None),
        AdjustmentScope::Amount { cumulative } => ("amount", json!([]), Some(*cumulative)),
    };
    let new = sqlx::query(
        "INSERT INTO order_adjustment (id, channel, order_key, adjustment_key, kind, scope, lines, amount)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (channel, adjustment_key) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(&adjustment.channel)
    .bind(&adjustment.order_key)
    .bind(&adjustment.adjustment_key)
    .bind(kind.as_str())
    .bind(scope)
    .bind(lines)
    .bind(amount)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let order: Option<(Uuid, bool)> = sqlx::query_as(
        "SELECT id, issued_at IS NOT NULL FROM orders
         WHERE channel = $1 AND (channel_order_id = $2 OR payment_reference = $2)
         FOR UPDATE",
    )
    .bind(&adjustment.channel)
    .bind(&adjustment.order_key)
    .fetch_optional(&mut *tx)
    .await?;
    let mut deliveries = Vec::new();
    let detail = match order {
        Some((order_id, true)) => {
            deliveries = apply_pending(&mut tx, settings, order_id).await?;
            if new {
                format!("{} applied", kind.as_str())
            } else {
                format!("{} already recorded", kind.as_str())
            }
        }
        // The purchase has not been fulfilled yet: issuance applies it.
        _ => format!("{} recorded; waits for its order", kind.as_str()),
    };
    inbox::mark_processed(&mut tx, inbox_id, order.map(|(id, _)| id), &detail).await?;
    tx.commit().await?;
    tracing::info!(%inbox_id, key = %adjustment.adjustment_key, %detail, "adjustment processed");
    Ok(deliveries)
}

/// Applies every unapplied adjustment of an issued order (whose keys the
/// caller holds locked). Returns the revocation notices it created.
pub(crate) async fn apply_pending(
    conn: &mut PgConnection,
    settings: &IssueSettings<'_>,
    order_id: Uuid,
) -> sqlx::Result<Vec<Uuid>> {
    let order = sqlx::query(
        "SELECT channel, channel_order_id, payment_reference, amount_total, state,
                COALESCE(gift_recipient_email, buyer_email) AS holder,
                COALESCE(gift_recipient_name, buyer_name) AS holder_name
         FROM orders WHERE id = $1",
    )
    .bind(order_id)
    .fetch_one(&mut *conn)
    .await?;
    let channel: String = order.get("channel");
    let pending = sqlx::query(
        "SELECT id, adjustment_key, kind, scope, lines, amount FROM order_adjustment
         WHERE channel = $1 AND order_key IN ($2, COALESCE($3, $2)) AND applied_at IS NULL
         ORDER BY created_at, id FOR UPDATE",
    )
    .bind(&channel)
    .bind(order.get::<String, _>("channel_order_id"))
    .bind(order.get::<Option<String>, _>("payment_reference"))
    .fetch_all(&mut *conn)
    .await?;
    let mut revoked = Vec::new();
    for adjustment in &pending {
        let key: String = adjustment.get("adjustment_key");
        let kind: String = adjustment.get("kind");
        let scope: String = adjustment.get("scope");
        let reason = format!("{kind} {key}");
        let ctx = Apply {
            order_id,
            channel: &channel,
            reason: &reason,
        };
        match scope.as_str() {
            "lines" => {
                let lines: Vec<AdjustedLine> =
                    serde_json::from_value(adjustment.get("lines")).unwrap_or_default();
                for line in &lines {
                    revoked.extend(ctx.take_back_line(conn, line).await?);
                }
            }
            "amount" => {
                let cumulative: i64 = adjustment.get::<Option<i64>, _>("amount").unwrap_or(0);
                revoked.extend(
                    ctx.take_back_amount(conn, cumulative, order.get("amount_total"))
                        .await?,
                );
            }
            _ => revoked.extend(ctx.take_back_all(conn).await?),
        }
        let state_before: String = order.get("state");
        let state_after = ctx.settle_state(conn, &kind).await?;
        sqlx::query("UPDATE order_adjustment SET applied_at = now(), order_id = $2 WHERE id = $1")
            .bind(adjustment.get::<Uuid, _>("id"))
            .bind(order_id)
            .execute(&mut *conn)
            .await?;
        audit::record(
            conn,
            AuditEvent {
                actor: audit::WORKER,
                action: if kind == "cancellation" {
                    "order.cancelled"
                } else {
                    "order.refunded"
                },
                subject_type: "order",
                subject_id: order_id.to_string(),
                reason: Some(&reason),
                data: json!({
                    "before": { "state": state_before },
                    "after": { "state": state_after },
                    "scope": scope,
                    "codes_revoked": revoked.len(),
                }),
            },
        )
        .await?;
    }
    let mut deliveries = Vec::new();
    if settings.notify_revocations && !revoked.is_empty() {
        let holder: String = order.get("holder");
        let holder_name: Option<String> = order.get("holder_name");
        let now = Utc::now();
        let notice = NewDelivery {
            order_id: Some(order_id),
            kind: "revocation",
            recipient: &holder,
            recipient_name: holder_name.as_deref(),
            send_after: now,
            codes: CodeSelection::These(revoked),
            requested_by: None,
        };
        if let Some(id) = delivery::create(conn, &notice, settings.message_id_domain).await? {
            deliveries.push(id);
        }
    }
    Ok(deliveries)
}

struct Apply<'a> {
    order_id: Uuid,
    channel: &'a str,
    reason: &'a str,
}

impl Apply<'_> {
    /// Every unredeemed code of the order; redeemed ones become findings.
    async fn take_back_all(&self, conn: &mut PgConnection) -> sqlx::Result<Vec<Uuid>> {
        let codes: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT c.id, c.state FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
             WHERE l.order_id = $1 AND c.state IN ('issued', 'redeemed')
             ORDER BY l.line_index, c.unit_index FOR UPDATE OF c",
        )
        .bind(self.order_id)
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query("UPDATE order_line SET refunded_quantity = quantity WHERE order_id = $1")
            .bind(self.order_id)
            .execute(&mut *conn)
            .await?;
        self.revoke_or_flag(conn, &codes).await
    }

    /// `quantity` units of the line bought under one of the references.
    async fn take_back_line(
        &self,
        conn: &mut PgConnection,
        line: &AdjustedLine,
    ) -> sqlx::Result<Vec<Uuid>> {
        let found: Option<(Uuid, i32, i32)> = sqlx::query_as(
            "SELECT id, quantity, refunded_quantity FROM order_line
             WHERE order_id = $1 AND channel_reference = ANY($2) AND refunded_quantity < quantity
             ORDER BY line_index LIMIT 1 FOR UPDATE",
        )
        .bind(self.order_id)
        .bind(&line.references)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((line_id, quantity, refunded)) = found else {
            let reference = line.references.join(" or ");
            finding::record(
                conn,
                audit::WORKER,
                NewFinding {
                    kind: "refund_unmatched",
                    order_id: Some(self.order_id),
                    code_id: None,
                    channel: Some(self.channel),
                    channel_reference: Some(&reference),
                    detail: format!(
                        "{}: {} unit(s) of {reference} refunded, but the order has no such unrefunded line",
                        self.reason, line.quantity
                    ),
                    action_taken: None,
                    dedupe_key: format!("refund_unmatched:{}:{}:{reference}", self.order_id, self.reason),
                    run_id: None,
                },
            )
            .await?;
            return Ok(Vec::new());
        };
        let take = (line.quantity as i32).min(quantity - refunded);
        self.take_units(conn, line_id, take).await
    }

    /// The channel reports a cumulative refunded amount: a full refund, or as
    /// many units of a single-line order as the amount pays for. Amounts that
    /// cannot be tied to units are left to operations.
    async fn take_back_amount(
        &self,
        conn: &mut PgConnection,
        cumulative: i64,
        order_total: Option<i64>,
    ) -> sqlx::Result<Vec<Uuid>> {
        if order_total.is_some_and(|total| cumulative >= total) {
            return self.take_back_all(conn).await;
        }
        let lines: Vec<(Uuid, i32, i32, Option<i64>)> = sqlx::query_as(
            "SELECT id, quantity, refunded_quantity, unit_amount FROM order_line
             WHERE order_id = $1 FOR UPDATE",
        )
        .bind(self.order_id)
        .fetch_all(&mut *conn)
        .await?;
        match lines.as_slice() {
            [(line_id, quantity, refunded, Some(unit))] if *unit > 0 => {
                let target = ((cumulative / unit) as i32).min(*quantity);
                self.take_units(conn, *line_id, target - refunded).await
            }
            _ => {
                finding::record(
                    conn,
                    audit::WORKER,
                    NewFinding {
                        kind: "refund_unallocated",
                        order_id: Some(self.order_id),
                        code_id: None,
                        channel: Some(self.channel),
                        channel_reference: None,
                        detail: format!(
                            "{}: {cumulative} refunded in total cannot be tied to units; no code was revoked",
                            self.reason
                        ),
                        action_taken: None,
                        dedupe_key: format!("refund_unallocated:{}:{}", self.order_id, self.reason),
                        run_id: None,
                    },
                )
                .await?;
                Ok(Vec::new())
            }
        }
    }

    /// Takes back `count` units of a line: unredeemed codes first (latest
    /// units first), then redeemed ones, which become findings.
    async fn take_units(
        &self,
        conn: &mut PgConnection,
        line_id: Uuid,
        count: i32,
    ) -> sqlx::Result<Vec<Uuid>> {
        if count <= 0 {
            return Ok(Vec::new());
        }
        let codes: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, state FROM activation_code
             WHERE order_line_id = $1 AND state IN ('issued', 'redeemed')
               AND NOT EXISTS (SELECT 1 FROM reconciliation_finding f
                               WHERE f.code_id = activation_code.id AND f.kind = 'refunded_but_redeemed')
             ORDER BY state = 'redeemed', unit_index DESC
             LIMIT $2 FOR UPDATE",
        )
        .bind(line_id)
        .bind(i64::from(count))
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query("UPDATE order_line SET refunded_quantity = LEAST(quantity, refunded_quantity + $2) WHERE id = $1")
            .bind(line_id)
            .bind(count)
            .execute(&mut *conn)
            .await?;
        self.revoke_or_flag(conn, &codes).await
    }

    /// Revokes the issued codes (with their audit events) and records a
    /// finding for each redeemed one: a customer is using what was refunded.
    async fn revoke_or_flag(
        &self,
        conn: &mut PgConnection,
        codes: &[(Uuid, String)],
    ) -> sqlx::Result<Vec<Uuid>> {
        let issued: Vec<Uuid> = codes
            .iter()
            .filter(|(_, s)| s == "issued")
            .map(|(id, _)| *id)
            .collect();
        let revoked: Vec<(Uuid, String)> = sqlx::query_as(
            "UPDATE activation_code SET state = 'revoked', revoked_at = now(), revoked_cause = 'adjustment'
             WHERE id = ANY($1) AND state = 'issued' RETURNING id, last4",
        )
        .bind(&issued)
        .fetch_all(&mut *conn)
        .await?;
        let events: Vec<(String, serde_json::Value)> = revoked
            .iter()
            .map(|(id, last4)| {
                (
                    id.to_string(),
                    json!({ "last4": last4, "before": { "state": "issued" }, "after": { "state": "revoked" }, "reason": self.reason }),
                )
            })
            .collect();
        audit::record_many(conn, audit::WORKER, "code.revoked", "code", &events).await?;
        let ids: Vec<Uuid> = revoked.iter().map(|(id, _)| *id).collect();
        platform_event::record_codes(
            conn,
            platform_event::Kind::CodeRevoked,
            &ids,
            json!({ "cause": "adjustment" }),
        )
        .await?;
        for (code_id, _) in codes.iter().filter(|(_, s)| s == "redeemed") {
            finding::record(
                conn,
                audit::WORKER,
                NewFinding {
                    kind: "refunded_but_redeemed",
                    order_id: Some(self.order_id),
                    code_id: Some(*code_id),
                    channel: Some(self.channel),
                    channel_reference: None,
                    detail: format!(
                        "{}: the code was already redeemed, so it was not revoked",
                        self.reason
                    ),
                    action_taken: Some("kept the code; operations to decide"),
                    dedupe_key: format!("refunded_but_redeemed:{code_id}"),
                    run_id: None,
                },
            )
            .await?;
        }
        metrics::counter!("entitle_codes_revoked_total").increment(revoked.len() as u64);
        Ok(revoked.into_iter().map(|(id, _)| id).collect())
    }

    /// Sets the order's state from what is refunded; returns it.
    async fn settle_state(&self, conn: &mut PgConnection, kind: &str) -> sqlx::Result<String> {
        sqlx::query_scalar(
            "UPDATE orders o SET state = CASE
                 WHEN $2 = 'cancellation' THEN 'cancelled'
                 WHEN NOT EXISTS (SELECT 1 FROM order_line l WHERE l.order_id = o.id
                                  AND l.refunded_quantity < l.quantity) THEN 'refunded'
                 WHEN EXISTS (SELECT 1 FROM order_line l WHERE l.order_id = o.id
                              AND l.refunded_quantity > 0) THEN 'partially_refunded'
                 ELSE o.state END
             WHERE o.id = $1 RETURNING state",
        )
        .bind(self.order_id)
        .bind(kind)
        .fetch_one(conn)
        .await
    }
}
