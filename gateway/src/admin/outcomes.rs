//! Documented mirrors of what the domain's actions answer: the outcomes of
//! `entitle_jobs::lifecycle` (revoke, reissue, reassign, unassign, expiry,
//! resend) and of `entitle_jobs::batch::create`. `lifecycle.rs` is being
//! changed in another branch, so their `ToSchema` derives wait here: every
//! action's answer is read through its mirror
//! ([`conform`](super::views::conform)), so a mirror that drifts from its
//! real type fails the tests instead of misdescribing the answer. Once the
//! derives sit on the real types, answer those and delete this file.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A code's state (mirrors `entitle_jobs::lifecycle::CodeState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

/// What revoking did (mirrors `lifecycle::Revoked`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    pub id: Uuid,
    pub last4: String,
    pub state: CodeState,
}

/// A code and its last four symbols (mirrors `lifecycle::CodeRef`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeRef {
    pub id: Uuid,
    pub last4: String,
}

/// What reissuing did (mirrors `lifecycle::Reissued`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Reissued {
    /// The code revoked and replaced.
    pub replaced: Uuid,
    /// Its replacement.
    pub code: CodeRef,
    /// The email that carries the replacement.
    pub delivery: Uuid,
    pub recipient: String,
}

/// A code's holder (mirrors `lifecycle::Holder`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Holder {
    pub account_id: String,
    pub entity_ref: String,
}

/// What reassigning did (mirrors `lifecycle::Reassigned`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Reassigned {
    pub id: Uuid,
    pub state: CodeState,
    pub assignment: Holder,
}

/// What unassigning did (mirrors `lifecycle::Unassigned`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Unassigned {
    pub id: Uuid,
    pub state: CodeState,
}

/// What changing a code's expiry did (mirrors `lifecycle::ExpiryChanged`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExpiryChanged {
    pub id: Uuid,
    pub expires_at: DateTime<Utc>,
    /// An expired code extended into the future is issued again.
    pub state: CodeState,
}

/// What changing an order's expiry did (mirrors
/// `lifecycle::OrderExpiryChanged`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OrderExpiryChanged {
    pub order: Uuid,
    /// Revoked codes keep their expiry and are not counted.
    pub codes_changed: u64,
    pub expires_at: DateTime<Utc>,
}

/// What resending did (mirrors `lifecycle::Resent`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Resent {
    /// The new delivery.
    pub delivery: Uuid,
    /// The delivery it sends again.
    pub resends: Uuid,
    pub recipient: String,
    pub codes: u64,
    /// The codes replaced because they went to another address (their
    /// copies at the old address no longer work).
    pub replaced: Vec<Uuid>,
}

/// What creating a batch did (mirrors `entitle_jobs::batch::Created`,
/// which holds a `lifecycle::CodeRef` and so waits with the others).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchCreated {
    pub id: Uuid,
    pub quantity: u32,
    pub kind: entitle_jobs::batch::BatchKind,
    /// The first hundred codes, by their last four symbols.
    pub codes: Vec<CodeRef>,
    /// The email carrying the codes, when one was asked for.
    pub delivery: Option<Uuid>,
    /// Where the codes are downloaded (by one actor, again within
    /// `codes.export_window_secs` of the first download).
    pub export: String,
}
