//! Redemption: assigns a code to an account and an entity in one atomic
//! conditional update, idempotently for the same holder.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    code::{Code, CodeKeys},
    lifecycle::{self, CodeState},
};

/// A code's assignment, as answered to the redeemer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Redemption {
    /// The assignment's id.
    pub id: Uuid,
    pub code_id: Uuid,
    /// Last four symbols of the code, for display.
    pub code_last4: String,
    pub product_sku: String,
    pub product_name: String,
    pub account_id: String,
    pub entity_ref: String,
    pub redeemed_at: DateTime<Utc>,
}

/// The outcome of a successful redemption request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// Assigned now.
    New(Redemption),
    /// Assigned earlier to the same account and entity: the same answer again.
    Existing(Redemption),
}

/// Why a well-formed code was not redeemed.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    #[error("no such code")]
    NotFound,
    #[error("the code was already redeemed")]
    AlreadyRedeemed,
    #[error("the code was revoked")]
    Revoked,
    #[error("the code has expired")]
    Expired,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl RedeemError {
    /// The stable error code a redeemer gets.
    pub fn code(&self) -> &'static str {
        match self {
            RedeemError::NotFound => "code_not_found",
            RedeemError::AlreadyRedeemed => "code_already_redeemed",
            RedeemError::Revoked => "code_revoked",
            RedeemError::Expired => "code_expired",
            RedeemError::Database(_) => "database_unavailable",
        }
    }
}

const SELECT_REDEMPTION: &str = "
    SELECT a.id, c.id AS code_id, c.last4, p.sku, p.name, a.account_id, a.entity_ref, a.assigned_at
    FROM assignment a
    JOIN activation_code c ON c.id = a.code_id
    JOIN product p ON p.id = c.product_id
    WHERE a.id = $1";

/// The claim, the assignment, its audit event and the platform's
/// `code.redeemed` event in one statement (one round trip, one commit):
/// redemption is the platform's hot path. The state check and the change are
/// one conditional update, so of two concurrent redemptions (or a redemption
/// and a revocation) exactly one wins.
const CLAIM: &str = "
    WITH claimed AS (
        UPDATE activation_code SET state = 'redeemed', redeemed_at = now()
        WHERE code_hash = $1 AND state = 'issued' AND expires_at > now()
        RETURNING id, last4, product_id, order_line_id, batch_id, expires_at
    ), detail AS (
        SELECT c.id AS code_id, c.last4, p.sku, p.name, coalesce(ol.order_id, b.order_id) AS order_id,
               c.batch_id, c.expires_at
        FROM claimed c
        JOIN product p ON p.id = c.product_id
        LEFT JOIN order_line ol ON ol.id = c.order_line_id
        LEFT JOIN code_batch b ON b.id = c.batch_id
    ), assigned AS (
        INSERT INTO assignment (id, code_id, account_id, entity_ref, assigned_by)
        SELECT $2, code_id, $3, $4, $5 FROM detail
        RETURNING id, assigned_at
    ), audited AS (
        INSERT INTO audit_event (actor, action, subject_type, subject_id, data)
        SELECT $5, 'code.redeemed', 'code', d.code_id::text, jsonb_build_object(
            'last4', d.last4,
            'before', jsonb_build_object('state', 'issued'),
            'after', jsonb_build_object('state', 'redeemed', 'account_id', $3::text, 'entity_ref', $4::text),
            'assignment', $2::uuid)
        FROM detail d
    ), told AS (
        INSERT INTO platform_event (id, type, code_id, order_id, data)
        SELECT $6, 'code.redeemed', d.code_id, d.order_id, jsonb_build_object(
            'code_id', d.code_id, 'code_last4', d.last4, 'state', 'redeemed',
            'product_sku', d.sku, 'product_name', d.name, 'order_id', d.order_id,
            'batch_id', d.batch_id, 'expires_at', d.expires_at,
            'account_id', $3::text, 'entity_ref', $4::text, 'assignment_id', $2::uuid)
        FROM detail d
    )
    SELECT a.id, d.code_id, d.last4, d.sku, d.name, $3::text AS account_id, $4::text AS entity_ref,
           a.assigned_at
    FROM detail d, assigned a";

fn redemption(row: &PgRow) -> Redemption {
    Redemption {
        id: row.get("id"),
        code_id: row.get("code_id"),
        code_last4: row.get("last4"),
        product_sku: row.get("sku"),
        product_name: row.get("name"),
        account_id: row.get("account_id"),
        entity_ref: row.get("entity_ref"),
        redeemed_at: row.get("assigned_at"),
    }
}

/// Redeems `code` for `account_id` and `entity_ref` on behalf of `caller`
/// (`platform:<key name>`, or `redeem_page`): recorded on the assignment
/// and in the audit log. One statement and one commit of its own; the
/// gateway claims through a [`Redeemer`] instead, which shares commits.
pub async fn redeem(
    pool: &PgPool,
    keys: &CodeKeys,
    code: &Code,
    account_id: &str,
    entity_ref: &str,
    caller: &str,
) -> Result<Redeemed, RedeemError> {
    let claim = Claim::new(keys, code, account_id, entity_ref, caller);
    match claim_one(pool, &claim).await? {
        Some(redemption) => Ok(claimed(redemption)),
        None => explain(pool, &claim.hash, account_id, entity_ref).await,
    }
}

fn claimed(redemption: Redemption) -> Redeemed {
    metrics::counter!("entitle_codes_redeemed_total").increment(1);
    Redeemed::New(redemption)
}

/// One redemption to claim.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The code's keyed hash.
    pub hash: Vec<u8>,
    pub account_id: String,
    pub entity_ref: String,
    pub caller: String,
}

impl Claim {
    fn new(keys: &CodeKeys, code: &Code, account_id: &str, entity_ref: &str, caller: &str) -> Self {
        Claim {
            hash: keys.hash(code),
            account_id: account_id.to_owned(),
            entity_ref: entity_ref.to_owned(),
            caller: caller.to_owned(),
        }
    }
}

async fn claim_one(pool: &PgPool, claim: &Claim) -> sqlx::Result<Option<Redemption>> {
    let row = sqlx::query(CLAIM)
        .bind(&claim.hash)
        .bind(Uuid::now_v7())
        .bind(&claim.account_id)
        .bind(&claim.entity_ref)
        .bind(&claim.caller)
        .bind(Uuid::now_v7())
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(redemption))
}

/// [`CLAIM`] for many codes at once: one statement, one commit. Each code
/// is claimed or not on its own (its own conditional update); the answer
/// names the code by its hash.
const CLAIM_MANY: &str = "
    WITH input AS (
        SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::uuid[])
            AS i(hash, assignment_id, account_id, entity_ref, caller, event_id)
    ), claimed AS (
        UPDATE activation_code c SET state = 'redeemed', redeemed_at = now()
        FROM input i
        WHERE c.code_hash = i.hash AND c.state = 'issued' AND c.expires_at > now()
        RETURNING c.id, c.last4, c.product_id, c.order_line_id, c.batch_id, c.expires_at,
                  i.hash, i.assignment_id, i.account_id, i.entity_ref, i.caller, i.event_id
    ), detail AS (
        SELECT c.id AS code_id, c.last4, p.sku, p.name, coalesce(ol.order_id, b.order_id) AS order_id,
               c.batch_id, c.expires_at, c.hash, c.assignment_id, c.account_id, c.entity_ref,
               c.caller, c.event_id
        FROM claimed c
        JOIN product p ON p.id = c.product_id
        LEFT JOIN order_line ol ON ol.id = c.order_line_id
        LEFT JOIN code_batch b ON b.id = c.batch_id
    ), assigned AS (
        INSERT INTO assignment (id, code_id, account_id, entity_ref, assigned_by)
        SELECT assignment_id, code_id, account_id, entity_ref, caller FROM detail
        RETURNING id, assigned_at
    ), audited AS (
        INSERT INTO audit_event (actor, action, subject_type, subject_id, data)
        SELECT d.caller, 'code.redeemed', 'code', d.code_id::text, jsonb_build_object(
            'last4', d.last4,
            'before', jsonb_build_object('state', 'issued'),
            'after', jsonb_build_object('state', 'redeemed', 'account_id', d.account_id, 'entity_ref', d.entity_ref),
            'assignment', d.assignment_id)
        FROM detail d
    ), told AS (
        INSERT INTO platform_event (id, type, code_id, order_id, data)
        SELECT d.event_id, 'code.redeemed', d.code_id, d.order_id, jsonb_build_object(
            'code_id', d.code_id, 'code_last4', d.last4, 'state', 'redeemed',
            'product_sku', d.sku, 'product_name', d.name, 'order_id', d.order_id,
            'batch_id', d.batch_id, 'expires_at', d.expires_at,
            'account_id', d.account_id, 'entity_ref', d.entity_ref, 'assignment_id', d.assignment_id)
        FROM detail d
    )
    SELECT d.hash, a.id, d.code_id, d.last4, d.sku, d.name, d.account_id, d.entity_ref, a.assigned_at
    FROM detail d JOIN assigned a ON a.id = d.assignment_id";

/// Claims a group of redemptions in one statement; answers, in order,
/// each one's redemption when it was claimed. A code asked for twice in
/// one group is claimed by its first request; the others are answered
/// unclaimed and explained (the same holder gets the same redemption).
/// If the statement fails (a value Postgres refuses), each is claimed on
/// its own, so one bad request fails only itself.
pub async fn claim_many(pool: &PgPool, claims: &[Claim]) -> Vec<sqlx::Result<Option<Redemption>>> {
    let mut first = std::collections::HashMap::new();
    let unique: Vec<&Claim> = claims
        .iter()
        .filter(|c| first.insert(c.hash.as_slice(), ()).is_none())
        .collect();
    let ids: Vec<Uuid> = unique.iter().map(|_| Uuid::now_v7()).collect();
    let events: Vec<Uuid> = unique.iter().map(|_| Uuid::now_v7()).collect();
    let grouped = sqlx::query(CLAIM_MANY)
        .bind(unique.iter().map(|c| c.hash.as_slice()).collect::<Vec<_>>())
        .bind(&ids)
        .bind(
            unique
                .iter()
                .map(|c| c.account_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            unique
                .iter()
                .map(|c| c.entity_ref.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(unique.iter().map(|c| c.caller.as_str()).collect::<Vec<_>>())
        .bind(&events)
        .fetch_all(pool)
        .await;
    let rows = match grouped {
        Ok(rows) => rows,
        // Postgres is down or busy: one at a time would only wait again.
        Err(e) if crate::db::unavailable(&e) => {
            let mut all = vec![Err(e)];
            all.extend((1..claims.len()).map(|_| Err(sqlx::Error::PoolTimedOut)));
            return all;
        }
        Err(_) if claims.len() > 1 => {
            let mut out = Vec::with_capacity(claims.len());
            for claim in claims {
                out.push(claim_one(pool, claim).await);
            }
            return out;
        }
        Err(e) => return vec![Err(e)],
    };
    let mut won: std::collections::HashMap<Vec<u8>, Redemption> = rows
        .iter()
        .map(|row| (row.get::<Vec<u8>, _>("hash"), redemption(row)))
        .collect();
    // Each code's redemption goes to the first request for it.
    claims.iter().map(|c| Ok(won.remove(&c.hash))).collect()
}

/// Most redemptions claimed in one statement.
const MAX_GROUP: usize = 32;

/// How long a group's claim waits for a code another transaction holds (a
/// revocation, a refund, the reminder sweep) before the writer hands that
/// code back to its own request: the writers serve every redemption, and
/// one held code must not hold up the rest. A server setting of the
/// writers' connections ([`Redeemer::WRITER_SETTINGS`]).
const GROUP_LOCK_TIMEOUT: &str = "50ms";

/// Whether Postgres gave up waiting for a row lock (`lock_not_available`).
fn lock_timed_out(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// The gateway's redemptions: concurrent requests claimed in group commits
/// (see [`crate::group`]), so at load one statement and one WAL flush serve
/// many; each caller is answered once its own claim is committed.
#[derive(Clone)]
pub struct Redeemer {
    group: crate::group::Group<Claim, sqlx::Result<Option<Redemption>>>,
    pool: PgPool,
}

impl Redeemer {
    /// The server settings of the writers' connections.
    pub const WRITER_SETTINGS: &[(&str, &str)] = &[("lock_timeout", GROUP_LOCK_TIMEOUT)];

    /// Starts `writers` writers on the current runtime, claiming on
    /// `writing` (connections with [`Self::WRITER_SETTINGS`]); refusals are
    /// explained, and held codes claimed, on `pool`.
    pub fn start(writing: PgPool, pool: PgPool, writers: usize) -> Self {
        Redeemer {
            group: crate::group::Group::spawn(writers, MAX_GROUP, move |claims: Vec<Claim>| {
                let pool = writing.clone();
                async move { claim_many(&pool, &claims).await }
            }),
            pool,
        }
    }

    /// [`redeem`], through a group commit.
    pub async fn redeem(
        &self,
        keys: &CodeKeys,
        code: &Code,
        account_id: &str,
        entity_ref: &str,
        caller: &str,
    ) -> Result<Redeemed, RedeemError> {
        let claim = Claim::new(keys, code, account_id, entity_ref, caller);
        let hash = claim.hash.clone();
        let outcome = match self.group.submit(claim).await {
            Some(Err(e)) if lock_timed_out(&e) => {
                // Another transaction holds the code: wait for it here, on
                // this request's own connection, not in a writer.
                let claim = Claim::new(keys, code, account_id, entity_ref, caller);
                claim_one(&self.pool, &claim).await?
            }
            outcome => outcome.unwrap_or(Err(sqlx::Error::PoolClosed))?,
        };
        match outcome {
            Some(redemption) => Ok(claimed(redemption)),
            None => explain(&self.pool, &hash, account_id, entity_ref).await,
        }
    }
}

/// Why a code was not claimed (and the same redemption again for its
/// holder); a refusal is recorded on the code for support.
async fn explain(
    pool: &PgPool,
    hash: &[u8],
    account_id: &str,
    entity_ref: &str,
) -> Result<Redeemed, RedeemError> {
    // Not claimed: say why, and keep the refused attempt for support.
    let mut tx = pool.begin().await?;
    let found = sqlx::query(
        "SELECT c.id, c.state, c.expires_at <= now() AS past_expiry, a.id AS assignment_id,
                a.account_id, a.entity_ref
         FROM activation_code c
         LEFT JOIN assignment a ON a.code_id = c.id AND a.ended_at IS NULL
         WHERE c.code_hash = $1",
    )
    .bind(hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(found) = found else {
        return Err(RedeemError::NotFound);
    };
    let state: String = found.get("state");
    let refusal = match CodeState::parse(&state) {
        Some(CodeState::Redeemed) => {
            let assignment: Option<Uuid> = found.get("assignment_id");
            let same_holder = found.get::<Option<String>, _>("account_id").as_deref()
                == Some(account_id)
                && found.get::<Option<String>, _>("entity_ref").as_deref() == Some(entity_ref);
            match assignment {
                Some(assignment) if same_holder => {
                    let row = sqlx::query(SELECT_REDEMPTION)
                        .bind(assignment)
                        .fetch_one(&mut *tx)
                        .await?;
                    return Ok(Redeemed::Existing(redemption(&row)));
                }
                _ => RedeemError::AlreadyRedeemed,
            }
        }
        Some(CodeState::Revoked) => RedeemError::Revoked,
        Some(CodeState::Expired) => RedeemError::Expired,
        // Issued but past its expiry: the sweep has not reached it yet.
        Some(CodeState::Issued) if found.get::<bool, _>("past_expiry") => RedeemError::Expired,
        other => {
            return Err(RedeemError::Database(sqlx::Error::Protocol(format!(
                "code in unexpected state {other:?}"
            ))));
        }
    };
    // Support answers "my code doesn't work" from this record.
    lifecycle::record_refusal(
        &mut tx,
        found.get("id"),
        refusal.code(),
        account_id,
        entity_ref,
    )
    .await?;
    tx.commit().await?;
    Err(refusal)
}

/// What a code check answers: whether the code can be redeemed now, and
/// what it is for. Never who holds it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct CodeCheck {
    /// Redeemable now: issued and not past its expiry.
    pub valid: bool,
    /// `issued`, `redeemed`, `revoked` or `expired` (an issued code past its
    /// expiry is `expired`, whether or not the sweep has reached it).
    pub state: CodeState,
    pub product_sku: String,
    pub product_name: String,
    pub expires_at: DateTime<Utc>,
}

/// Checks `code` without redeeming it: one indexed read.
pub async fn check(pool: &PgPool, keys: &CodeKeys, code: &Code) -> Result<CodeCheck, RedeemError> {
    let row = sqlx::query(
        "SELECT CASE WHEN c.state = 'issued' AND c.expires_at <= now() THEN 'expired'
                     ELSE c.state END AS state,
                p.sku, p.name, c.expires_at
         FROM activation_code c JOIN product p ON p.id = c.product_id
         WHERE c.code_hash = $1",
    )
    .bind(keys.hash(code))
    .fetch_optional(pool)
    .await?
    .ok_or(RedeemError::NotFound)?;
    let state: String = row.get("state");
    let state = CodeState::parse(&state).ok_or_else(|| {
        RedeemError::Database(sqlx::Error::Protocol(format!(
            "code in unknown state {state}"
        )))
    })?;
    Ok(CodeCheck {
        valid: state == CodeState::Issued,
        state,
        product_sku: row.get("sku"),
        product_name: row.get("name"),
        expires_at: row.get("expires_at"),
    })
}
