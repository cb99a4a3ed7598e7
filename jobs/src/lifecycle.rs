//! A code's lifecycle: the states a code can be in, the changes each state
//! allows, and the support actions that make them (revoke, reissue,
//! reassign, unassign, change expiry, resend). The admin API, `entitlectl`
//! (through the API) and the console call these functions, so each rule
//! lives here once; every action changes the code and writes its audit event
//! in the caller's transaction, which also holds the idempotency record.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    context::Context,
    delivery::{self, CodeSelection, NewDelivery},
    issuance,
    platform_event::{self, Kind},
    token::Role,
};

/// The states a code can be in (the `activation_code.state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CodeState {
    /// Usable: nobody holds it yet.
    Issued,
    /// Assigned to an account and an entity.
    Redeemed,
    /// Taken back (a refund, support, or a reissue); never usable again.
    Revoked,
    /// Past its expiry; an operator may extend it.
    Expired,
}

/// The changes a code can go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Redeem,
    /// Revoke an issued code.
    Revoke,
    /// Revoke an issued or a redeemed code (the holder loses it).
    RevokeRedeemed,
    /// Revoke the code if it is live and send a replacement.
    Reissue,
    Reassign,
    Unassign,
    ChangeExpiry,
    Expire,
}

impl CodeState {
    pub fn parse(text: &str) -> Option<CodeState> {
        match text {
            "issued" => Some(CodeState::Issued),
            "redeemed" => Some(CodeState::Redeemed),
            "revoked" => Some(CodeState::Revoked),
            "expired" => Some(CodeState::Expired),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CodeState::Issued => "issued",
            CodeState::Redeemed => "redeemed",
            CodeState::Revoked => "revoked",
            CodeState::Expired => "expired",
        }
    }

    /// Whether `change` may start from this state: the whole state machine.
    pub fn allows(self, change: Change) -> bool {
        use Change::*;
        use CodeState::*;
        matches!(
            (self, change),
            (
                Issued,
                Redeem | Revoke | RevokeRedeemed | Reissue | ChangeExpiry | Expire
            ) | (
                Redeemed,
                RevokeRedeemed | Reassign | Unassign | ChangeExpiry
            ) | (Revoked, Reissue)
                | (Expired, Reissue | ChangeExpiry)
        )
    }

    /// The state a change leads to.
    pub fn after(self, change: Change) -> CodeState {
        match change {
            Change::Redeem | Change::Reassign => CodeState::Redeemed,
            Change::Revoke | Change::RevokeRedeemed | Change::Reissue => CodeState::Revoked,
            Change::Unassign => CodeState::Issued,
            Change::Expire => CodeState::Expired,
            Change::ChangeExpiry => self,
        }
    }

    /// Checks that `change` may start from this state, with the refusal a
    /// caller gets when it may not.
    pub fn check(self, change: Change) -> Result<(), Refused> {
        if self.allows(change) {
            return Ok(());
        }
        Err(match self {
            CodeState::Redeemed => {
                Refused::conflict("code_already_redeemed", "the code is redeemed")
            }
            CodeState::Revoked => Refused::conflict("code_already_revoked", "the code is revoked"),
            CodeState::Expired => Refused::conflict("code_expired", "the code has expired"),
            CodeState::Issued => Refused::conflict(
                "code_not_redeemed",
                "only a redeemed code can be reassigned or unassigned",
            ),
        })
    }
}

/// Why a code was revoked (`activation_code.revoked_cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedCause {
    /// A refund or cancellation in the channel.
    Adjustment,
    /// Support or operations revoked it.
    Support,
    /// It was replaced by a reissued code.
    Reissue,
}

impl RevokedCause {
    fn parse(text: &str) -> Option<RevokedCause> {
        match text {
            "adjustment" => Some(RevokedCause::Adjustment),
            "support" => Some(RevokedCause::Support),
            "reissue" => Some(RevokedCause::Reissue),
            _ => None,
        }
    }
}

/// Why an action was not carried out; each maps to a stable error code.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no such {0}")]
    NotFound(&'static str),
    /// The subject's state does not allow it (409).
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// The request itself is wrong (422).
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String },
    /// The caller's role does not allow this form of the action (403).
    #[error("this needs the {} role", .0.as_str())]
    Forbidden(Role),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Refused {
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Refused {
        Refused::Conflict {
            code,
            detail: detail.into(),
        }
    }

    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Refused {
        Refused::Invalid {
            code,
            detail: detail.into(),
        }
    }
}

/// Who acts, with what role, and why: every action is audited with these.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub actor: &'a str,
    pub role: Role,
    pub reason: &'a str,
}

impl Who<'_> {
    /// Writes the action's audit event, with this actor and reason.
    pub async fn audit(
        &self,
        conn: &mut PgConnection,
        action: &str,
        subject_type: &str,
        subject_id: String,
        data: Value,
    ) -> sqlx::Result<()> {
        audit::record(
            conn,
            AuditEvent {
                actor: self.actor,
                action,
                subject_type,
                subject_id,
                reason: Some(self.reason),
                data,
            },
        )
        .await?;
        Ok(())
    }
}

/// A code locked for an action, with what the rules need to know.
struct Locked {
    id: Uuid,
    state: CodeState,
    last4: String,
    product_id: Uuid,
    order_id: Option<Uuid>,
    account_id: Option<String>,
    holder: Option<String>,
    holder_name: Option<String>,
    revoked_cause: Option<RevokedCause>,
    replaced_by: Option<Uuid>,
    expires_at: DateTime<Utc>,
}

async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Locked, Refused> {
    let row = sqlx::query(
        "SELECT c.state, c.last4, c.product_id, c.revoked_cause, c.expires_at,
                coalesce(l.order_id, b.order_id) AS order_id,
                coalesce(o.account_id, b.account_id) AS account_id,
                coalesce(o.gift_recipient_email, o.buyer_email) AS holder,
                coalesce(o.gift_recipient_name, o.buyer_name) AS holder_name
         FROM activation_code c
         LEFT JOIN order_line l ON l.id = c.order_line_id
         LEFT JOIN code_batch b ON b.id = c.batch_id
         LEFT JOIN orders o ON o.id = coalesce(l.order_id, b.order_id)
         WHERE c.id = $1 FOR UPDATE OF c",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(Refused::NotFound("code"))?;
    // A statement of its own, after the lock: it sees a replacement that a
    // concurrent reissue committed while this one waited for the row.
    let replaced_by: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM activation_code WHERE replaces = $1 ORDER BY issued_at DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let state: String = row.get("state");
    Ok(Locked {
        id,
        state: CodeState::parse(&state)
            .ok_or_else(|| sqlx::Error::Protocol(format!("code in unknown state {state}")))?,
        last4: row.get("last4"),
        product_id: row.get("product_id"),
        order_id: row.get("order_id"),
        account_id: row.get("account_id"),
        holder: row.get("holder"),
        holder_name: row.get("holder_name"),
        revoked_cause: row
            .get::<Option<String>, _>("revoked_cause")
            .as_deref()
            .and_then(RevokedCause::parse),
        replaced_by,
        expires_at: row.get("expires_at"),
    })
}

async fn end_assignment(
    conn: &mut PgConnection,
    id: Uuid,
    why: &str,
) -> sqlx::Result<Option<Value>> {
    let ended: Option<(String, String)> = sqlx::query_as(
        "UPDATE assignment SET ended_at = now(), ended_reason = $2
         WHERE code_id = $1 AND ended_at IS NULL RETURNING account_id, entity_ref",
    )
    .bind(id)
    .bind(why)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(ended.map(
        |(account_id, entity_ref)| json!({ "account_id": account_id, "entity_ref": entity_ref }),
    ))
}

async fn set_revoked(conn: &mut PgConnection, id: Uuid, cause: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE activation_code SET state = 'revoked', revoked_at = now(), revoked_cause = $2
         WHERE id = $1",
    )
    .bind(id)
    .bind(cause)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn checked_email(email: &str) -> Result<String, Refused> {
    let email = email.trim();
    if email.parse::<lettre::Address>().is_err() {
        return Err(Refused::invalid("invalid_email", "email is not an address"));
    }
    Ok(email.to_owned())
}

/// Whether a refund or cancellation was applied to `order`.
async fn order_adjusted(conn: &mut PgConnection, order: Option<Uuid>) -> sqlx::Result<bool> {
    let Some(order) = order else {
        return Ok(false);
    };
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM order_adjustment WHERE order_id = $1 AND applied_at IS NOT NULL)",
    )
    .bind(order)
    .fetch_one(&mut *conn)
    .await
}

/// What revoking did.
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    pub id: Uuid,
    pub last4: String,
    pub state: CodeState,
}

/// Revokes a code; a redeemed one only with `include_redeemed` (its holder
/// loses it).
pub async fn revoke(
    conn: &mut PgConnection,
    who: Who<'_>,
    id: Uuid,
    include_redeemed: bool,
) -> Result<Revoked, Refused> {
    let code = lock(conn, id).await?;
    let change = if include_redeemed {
        Change::RevokeRedeemed
    } else {
        Change::Revoke
    };
    code.state.check(change)?;
    set_revoked(conn, id, "support").await?;
    let assignment = end_assignment(conn, id, "revoked").await?;
    who.audit(
        conn,
        "code.revoked",
        "code",
        id.to_string(),
        json!({
            "last4": code.last4,
            "before": { "state": code.state, "assignment": assignment },
            "after": { "state": "revoked" },
        }),
    )
    .await?;
    platform_event::record_codes(
        conn,
        Kind::CodeRevoked,
        &[id],
        json!({ "cause": "support" }),
    )
    .await?;
    Ok(Revoked {
        id,
        last4: code.last4,
        state: CodeState::Revoked,
    })
}

/// A code and its last four symbols.
#[derive(Debug, Clone, Serialize)]
pub struct CodeRef {
    pub id: Uuid,
    pub last4: String,
}

/// What reissuing did.
#[derive(Debug, Clone, Serialize)]
pub struct Reissued {
    pub replaced: Uuid,
    pub code: CodeRef,
    pub delivery: Uuid,
    pub recipient: String,
}

/// Revokes `code` (when live) and issues one replacement linked to it, in a
/// batch of kind `replacement`; audited as `code.reissued`.
async fn replace(
    conn: &mut PgConnection,
    ctx: &Context,
    who: Who<'_>,
    code: &Locked,
    extra: Value,
) -> Result<CodeRef, Refused> {
    // An expired original dies too, or extending its expiry would bring it
    // back beside its replacement.
    if matches!(code.state, CodeState::Issued | CodeState::Expired) {
        set_revoked(conn, code.id, "reissue").await?;
    }
    let batch_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO code_batch (id, product_id, kind, quantity, requested_by, reason, account_id, order_id)
         VALUES ($1, $2, 'replacement', 1, $3, $4, $5, $6)",
    )
    .bind(batch_id)
    .bind(code.product_id)
    .bind(who.actor)
    .bind(who.reason)
    .bind(&code.account_id)
    .bind(code.order_id)
    .execute(&mut *conn)
    .await?;
    let issued =
        issuance::issue_batch_codes(conn, &ctx.keys, code.product_id, batch_id, 1, Some(code.id))
            .await?;
    let (new_id, new_last4) = issued
        .into_iter()
        .next()
        .ok_or_else(|| sqlx::Error::Protocol("no replacement was issued".into()))?;
    let mut data = json!({
        "last4": code.last4,
        "before": { "state": code.state },
        "after": { "state": "revoked", "replacement": new_id, "replacement_last4": new_last4 },
    });
    if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), extra) {
        data.extend(extra);
    }
    who.audit(conn, "code.reissued", "code", code.id.to_string(), data)
        .await?;
    platform_event::record_codes(
        conn,
        Kind::CodeReissued,
        &[code.id],
        json!({ "replacement_code_id": new_id, "replacement_last4": new_last4 }),
    )
    .await?;
    Ok(CodeRef {
        id: new_id,
        last4: new_last4,
    })
}

/// Revokes a code (when still issued) and emails a replacement linked to it,
/// to `email` or the order's recipient. Refused for a redeemed code, for a
/// code already replaced, and for one revoked by a refund or cancellation,
/// unless `force` (an operator's explicit override, recorded in the audit).
pub async fn reissue(
    conn: &mut PgConnection,
    ctx: &Context,
    who: Who<'_>,
    id: Uuid,
    email: Option<&str>,
    force: bool,
) -> Result<Reissued, Refused> {
    let code = lock(conn, id).await?;
    code.state.check(Change::Reissue)?;
    if !force {
        if code.replaced_by.is_some() || code.revoked_cause == Some(RevokedCause::Reissue) {
            return Err(Refused::conflict(
                "code_already_replaced",
                "the code was already replaced; reissue its replacement, or force to replace it again",
            ));
        }
        if code.revoked_cause == Some(RevokedCause::Adjustment) {
            return Err(Refused::conflict(
                "code_revoked_by_refund",
                "the code was revoked by a refund or cancellation; force to reissue it anyway",
            ));
        }
        // An expired code of a refunded order was never revoked by the
        // refund (only issued codes are), but reissuing it would undo it.
        if code.state == CodeState::Expired && order_adjusted(conn, code.order_id).await? {
            return Err(Refused::conflict(
                "code_revoked_by_refund",
                "the code's order was refunded or cancelled; force to reissue it anyway",
            ));
        }
    }
    if force && who.role < Role::Operator {
        return Err(Refused::Forbidden(Role::Operator));
    }
    let recipient = match email {
        Some(email) => checked_email(email)?,
        None => code.holder.clone().ok_or_else(|| {
            Refused::invalid(
                "email_required",
                "the code has no order to send the replacement to; give email",
            )
        })?,
    };
    let name = if email.is_some() {
        None
    } else {
        code.holder_name.as_deref()
    };
    let delivery_id = Uuid::now_v7();
    let replacement = replace(
        conn,
        ctx,
        who,
        &code,
        json!({ "delivery": delivery_id, "recipient": recipient, "forced": force }),
    )
    .await?;
    let delivery = delivery::create_with_id(
        conn,
        delivery_id,
        &NewDelivery {
            order_id: code.order_id,
            kind: "reissue",
            recipient: &recipient,
            recipient_name: name,
            send_after: Utc::now(),
            codes: CodeSelection::These(vec![replacement.id]),
            requested_by: Some(who.actor),
        },
        &ctx.config.email.message_id_domain,
    )
    .await?
    .ok_or_else(|| sqlx::Error::Protocol("the replacement's delivery was not created".into()))?;
    Ok(Reissued {
        replaced: id,
        code: replacement,
        delivery,
        recipient,
    })
}

/// A code's holder.
#[derive(Debug, Clone, Serialize)]
pub struct Holder {
    pub account_id: String,
    pub entity_ref: String,
}

/// What reassigning did.
#[derive(Debug, Clone, Serialize)]
pub struct Reassigned {
    pub id: Uuid,
    pub state: CodeState,
    pub assignment: Holder,
}

/// Moves a redeemed code to another account and entity.
pub async fn reassign(
    conn: &mut PgConnection,
    who: Who<'_>,
    id: Uuid,
    to: Holder,
) -> Result<Reassigned, Refused> {
    if to.account_id.trim().is_empty() || to.entity_ref.trim().is_empty() {
        return Err(Refused::invalid(
            "invalid_request",
            "account_id and entity_ref are needed",
        ));
    }
    let code = lock(conn, id).await?;
    code.state.check(Change::Reassign)?;
    let before = end_assignment(conn, id, "reassigned").await?;
    sqlx::query(
        "INSERT INTO assignment (id, code_id, account_id, entity_ref, assigned_by) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(id)
    .bind(&to.account_id)
    .bind(&to.entity_ref)
    .bind(who.actor)
    .execute(&mut *conn)
    .await?;
    who.audit(
        conn,
        "code.reassigned",
        "code",
        id.to_string(),
        json!({ "last4": code.last4, "before": before, "after": to }),
    )
    .await?;
    platform_event::record_codes(
        conn,
        Kind::CodeReassigned,
        &[id],
        json!({ "previous": before }),
    )
    .await?;
    Ok(Reassigned {
        id,
        state: CodeState::Redeemed,
        assignment: to,
    })
}

/// What unassigning did.
#[derive(Debug, Clone, Serialize)]
pub struct Unassigned {
    pub id: Uuid,
    pub state: CodeState,
}

/// Returns a redeemed code to issued: it can be redeemed again.
pub async fn unassign(
    conn: &mut PgConnection,
    who: Who<'_>,
    id: Uuid,
) -> Result<Unassigned, Refused> {
    let code = lock(conn, id).await?;
    code.state.check(Change::Unassign)?;
    let before = end_assignment(conn, id, "unassigned").await?;
    // Issued again: the expiry sweep must pass it (again) at its expiry.
    sqlx::query(
        "UPDATE activation_code SET state = 'issued', redeemed_at = NULL, swept_at = NULL
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    who.audit(
        conn,
        "code.unassigned",
        "code",
        id.to_string(),
        json!({
            "last4": code.last4,
            "before": { "state": "redeemed", "assignment": before },
            "after": { "state": "issued" },
        }),
    )
    .await?;
    platform_event::record_codes(
        conn,
        Kind::CodeUnassigned,
        &[id],
        json!({ "previous": before }),
    )
    .await?;
    Ok(Unassigned {
        id,
        state: CodeState::Issued,
    })
}

/// What changing a code's expiry did.
#[derive(Debug, Clone, Serialize)]
pub struct ExpiryChanged {
    pub id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub state: CodeState,
}

/// The SQL that moves codes to a new expiry ($2): extending an expired code
/// brings it back to issued, and the expiry sweep passes it again at its
/// new expiry.
const SET_EXPIRY: &str = "
    expires_at = $2,
    swept_at = NULL,
    state = CASE WHEN c.state = 'expired' AND $2 > now() THEN 'issued' ELSE c.state END,
    expired_at = CASE WHEN c.state = 'expired' AND $2 > now() THEN NULL ELSE c.expired_at END";

/// Changes a code's expiry.
pub async fn change_expiry(
    conn: &mut PgConnection,
    who: Who<'_>,
    id: Uuid,
    expires_at: DateTime<Utc>,
) -> Result<ExpiryChanged, Refused> {
    let code = lock(conn, id).await?;
    code.state.check(Change::ChangeExpiry)?;
    if code.replaced_by.is_some() {
        return Err(Refused::conflict(
            "code_already_replaced",
            "the code was replaced; change its replacement's expiry",
        ));
    }
    let state: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE activation_code c SET {SET_EXPIRY} WHERE c.id = $1 RETURNING c.state"
    )))
    .bind(id)
    .bind(expires_at)
    .fetch_one(&mut *conn)
    .await?;
    let state = CodeState::parse(&state).unwrap_or(code.state);
    who.audit(
        conn,
        "code.expiry_changed",
        "code",
        id.to_string(),
        json!({
            "last4": code.last4,
            "before": { "expires_at": code.expires_at, "state": code.state },
            "after": { "expires_at": expires_at, "state": state },
        }),
    )
    .await?;
    Ok(ExpiryChanged {
        id,
        expires_at,
        state,
    })
}

/// What changing an order's expiry did.
#[derive(Debug, Clone, Serialize)]
pub struct OrderExpiryChanged {
    pub order: Uuid,
    pub codes_changed: usize,
    pub expires_at: DateTime<Utc>,
}

/// Changes the expiry of every code of an order that allows it (revoked
/// codes keep theirs).
pub async fn change_order_expiry(
    conn: &mut PgConnection,
    who: Who<'_>,
    order: Uuid,
    expires_at: DateTime<Utc>,
) -> Result<OrderExpiryChanged, Refused> {
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orders WHERE id = $1 FOR UPDATE")
        .bind(order)
        .fetch_optional(&mut *conn)
        .await?;
    exists.ok_or(Refused::NotFound("order"))?;
    let allowing: Vec<&str> = [CodeState::Issued, CodeState::Redeemed, CodeState::Expired]
        .into_iter()
        .filter(|s| s.allows(Change::ChangeExpiry))
        .map(CodeState::as_str)
        .collect();
    let changed: Vec<(Uuid, DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH old AS (SELECT c.id, c.expires_at, c.state FROM activation_code c
                      WHERE (c.order_line_id IN (SELECT id FROM order_line WHERE order_id = $1)
                             OR c.batch_id IN (SELECT id FROM code_batch WHERE order_id = $1))
                        AND c.state = ANY($3)
                        AND NOT EXISTS (SELECT 1 FROM activation_code r WHERE r.replaces = c.id)
                      FOR UPDATE OF c)
         UPDATE activation_code c SET {SET_EXPIRY}
         FROM old WHERE c.id = old.id
         RETURNING c.id, old.expires_at, old.state"
    )))
    .bind(order)
    .bind(expires_at)
    .bind(&allowing)
    .fetch_all(&mut *conn)
    .await?;
    who.audit(conn, "order.expiry_changed", "order", order.to_string(), json!({
        "before": changed.iter().map(|(c, e, s)| json!({ "code": c, "expires_at": e, "state": s })).collect::<Vec<_>>(),
        "after": { "expires_at": expires_at, "codes": changed.len() },
    }))
    .await?;
    Ok(OrderExpiryChanged {
        order,
        codes_changed: changed.len(),
        expires_at,
    })
}

/// What resending did.
#[derive(Debug, Clone, Serialize)]
pub struct Resent {
    pub delivery: Uuid,
    pub resends: Uuid,
    pub recipient: String,
    pub codes: usize,
    /// The codes replaced because they went to another address (their
    /// copies at the old address no longer work).
    pub replaced: Vec<Uuid>,
}

/// Sends a delivery's codes that are still usable again. To the original
/// address, support may do it and the same codes go. To another address it
/// needs an operator, and each code is reissued first, so the copy that went
/// to the wrong address dies.
pub async fn resend(
    conn: &mut PgConnection,
    ctx: &Context,
    who: Who<'_>,
    id: Uuid,
    email: Option<&str>,
) -> Result<Resent, Refused> {
    let email = email.map(checked_email).transpose()?;
    let original: Option<(Option<Uuid>, String, Option<String>, bool)> = sqlx::query_as(
        "SELECT order_id, recipient_email, recipient_name,
                status = 'pending' AND send_after > now() AS scheduled
         FROM email_delivery WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let (order_id, original_to, original_name, scheduled) =
        original.ok_or(Refused::NotFound("delivery"))?;
    if scheduled {
        // A gift for a later date: resending now would spoil it, and the
        // original still goes on its day.
        return Err(Refused::conflict(
            "delivery_scheduled",
            "the email is scheduled for later; it has not been sent yet",
        ));
    }
    let redirected = email
        .as_deref()
        .is_some_and(|e| !e.eq_ignore_ascii_case(original_to.trim()));
    if redirected && who.role < Role::Operator {
        return Err(Refused::Forbidden(Role::Operator));
    }
    let live: Vec<Uuid> = sqlx::query_scalar(
        // Locked, so a code redeemed meanwhile is not also replaced (the
        // state is checked again on the locked row).
        "SELECT c.id FROM email_delivery_code dc JOIN activation_code c ON c.id = dc.code_id
         WHERE dc.delivery_id = $1 AND c.state = 'issued' ORDER BY dc.position FOR UPDATE OF c",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    if live.is_empty() {
        return Err(Refused::conflict(
            "nothing_to_resend",
            "the delivery carries no code that is still usable",
        ));
    }
    let recipient = email.clone().unwrap_or(original_to.clone());
    let new_delivery = Uuid::now_v7();
    let mut codes = live.clone();
    let mut replaced = Vec::new();
    if redirected {
        codes.clear();
        for code_id in &live {
            let code = lock(conn, *code_id).await?;
            code.state.check(Change::Revoke)?;
            let replacement = replace(
                conn,
                ctx,
                who,
                &code,
                json!({ "delivery": new_delivery, "recipient": recipient, "redirected_from": id }),
            )
            .await?;
            codes.push(replacement.id);
            replaced.push(*code_id);
        }
    }
    let name = if email.is_some() {
        None
    } else {
        original_name.as_deref()
    };
    let delivery = delivery::create_with_id(
        conn,
        new_delivery,
        &NewDelivery {
            order_id,
            kind: "resend",
            recipient: &recipient,
            recipient_name: name,
            send_after: Utc::now(),
            codes: CodeSelection::These(codes.clone()),
            requested_by: Some(who.actor),
        },
        &ctx.config.email.message_id_domain,
    )
    .await?
    .ok_or_else(|| sqlx::Error::Protocol("the resend delivery was not created".into()))?;
    who.audit(
        conn,
        "delivery.resent",
        "delivery",
        id.to_string(),
        json!({
            "order": order_id,
            "before": { "recipient": original_to },
            "after": { "recipient": recipient, "delivery": delivery, "codes": codes.len(),
                       "replaced": replaced },
        }),
    )
    .await?;
    Ok(Resent {
        delivery,
        resends: id,
        recipient,
        codes: codes.len(),
        replaced,
    })
}

/// Most refused attempts kept per code.
pub const REFUSALS_KEPT: i64 = 20;

/// Records a refused redemption of an existing code (for the code's page),
/// keeping only the latest [`REFUSALS_KEPT`].
pub async fn record_refusal(
    conn: &mut PgConnection,
    code_id: Uuid,
    reason: &str,
    account_id: &str,
    entity_ref: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "WITH added AS (
             INSERT INTO redemption_refusal (code_id, reason, account_id, entity_ref)
             VALUES ($1, $2, left($3, 255), left($4, 255)) RETURNING id)
         DELETE FROM redemption_refusal WHERE code_id = $1 AND id <= (
             SELECT id FROM redemption_refusal WHERE code_id = $1
             ORDER BY id DESC OFFSET $5 - 1 LIMIT 1)",
    )
    .bind(code_id)
    .bind(reason)
    .bind(account_id)
    .bind(entity_ref)
    .bind(REFUSALS_KEPT)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine() {
        use Change::*;
        use CodeState::*;
        assert!(Issued.allows(Redeem));
        assert!(!Redeemed.allows(Redeem));
        assert!(!Revoked.allows(Redeem));
        assert!(!Expired.allows(Redeem));
        assert!(!Redeemed.allows(Revoke));
        assert!(Redeemed.allows(RevokeRedeemed));
        assert!(!Revoked.allows(RevokeRedeemed));
        assert!(!Redeemed.allows(Reissue));
        assert!(Revoked.allows(Reissue));
        assert!(!Issued.allows(Reassign));
        assert!(!Issued.allows(Unassign));
        assert!(!Revoked.allows(ChangeExpiry));
        assert_eq!(Redeemed.after(Unassign), Issued);
        assert!(matches!(
            Revoked.check(Revoke),
            Err(Refused::Conflict {
                code: "code_already_revoked",
                ..
            })
        ));
    }
}
