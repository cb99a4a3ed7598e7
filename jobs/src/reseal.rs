//! Rotating the code-sealing key: after `codes.seal_key` is replaced (the
//! old key moved to `codes.previous_seal_keys`), every stored code and
//! endpoint secret sealed with an old key is sealed again with the new one,
//! in batches, each row only if it has not changed meanwhile. Then the old
//! key can be dropped from the configuration.

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::code::CodeKeys;

/// What a reseal did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resealed {
    /// Codes sealed again with the current key.
    pub codes: u64,
    /// Codes already under the current key.
    pub current: u64,
    /// Codes no configured key opens (a key dropped too early): left as
    /// they are, and counted, for operations to see.
    pub unreadable: u64,
    /// Endpoint secrets sealed again.
    pub endpoint_secrets: u64,
}

/// Seals every code and endpoint secret again under the current key,
/// `batch` codes per transaction.
pub async fn reseal(pool: &PgPool, keys: &CodeKeys, batch: i64) -> sqlx::Result<Resealed> {
    let mut done = Resealed::default();
    let mut after = Uuid::nil();
    loop {
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT id, code_sealed FROM activation_code WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(batch)
        .fetch_all(pool)
        .await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        after = *last;
        let mut ids = Vec::new();
        let mut old = Vec::new();
        let mut new = Vec::new();
        for (id, sealed) in rows {
            match keys.open(&sealed) {
                Ok((_, false)) => done.current += 1,
                Ok((plain, true)) => {
                    new.push(keys.seal_bytes(&plain));
                    old.push(sealed);
                    ids.push(id);
                }
                Err(_) => done.unreadable += 1,
            }
        }
        if !ids.is_empty() {
            // Only where the sealed value is still the one read.
            done.codes += sqlx::query(
                "UPDATE activation_code c SET code_sealed = u.new
                 FROM UNNEST($1::uuid[], $2::bytea[], $3::bytea[]) AS u(id, old, new)
                 WHERE c.id = u.id AND c.code_sealed = u.old",
            )
            .bind(&ids)
            .bind(&old)
            .bind(&new)
            .execute(pool)
            .await?
            .rows_affected();
        }
    }
    let endpoints: Vec<(Uuid, Vec<u8>, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT id, secret_sealed, previous_secret_sealed FROM platform_endpoint")
            .fetch_all(pool)
            .await?;
    for (id, secret, previous) in endpoints {
        let again = |sealed: &[u8]| match keys.open(sealed) {
            Ok((plain, true)) => Some(keys.seal_bytes(&plain)),
            _ => None,
        };
        let secret_again = again(&secret);
        let previous_again = previous.as_deref().and_then(again);
        if secret_again.is_none() && previous_again.is_none() {
            continue;
        }
        sqlx::query(
            "UPDATE platform_endpoint
             SET secret_sealed = coalesce($2, secret_sealed),
                 previous_secret_sealed = coalesce($3, previous_secret_sealed)
             WHERE id = $1 AND secret_sealed = $4",
        )
        .bind(id)
        .bind(secret_again)
        .bind(previous_again)
        .bind(&secret)
        .execute(pool)
        .await?;
        done.endpoint_secrets += 1;
    }
    Ok(done)
}
