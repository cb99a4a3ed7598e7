//! Staff sessions in Postgres, as a `tower_sessions::SessionStore`: any
//! gateway serves any session, and deleting a member's rows signs them out
//! everywhere. (`tower-sessions-sqlx-store` is built for sqlx 0.8; this is
//! the same store on our sqlx 0.9 pool.)

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tower_sessions::{
    SessionStore,
    cookie::time::OffsetDateTime,
    session::{Id, Record},
    session_store,
};
use uuid::Uuid;

/// The session key holding the signed-in member's id; the store copies it
/// into its own column so a member's sessions can be deleted together.
pub const STAFF_ID_KEY: &str = "staff_id";

/// Sessions in table `console_session`, keyed by a hash of their id.
#[derive(Debug, Clone)]
pub struct PgSessionStore {
    pool: PgPool,
}

impl PgSessionStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Deletes sessions whose idle timeout has passed (they are already
    /// refused; this keeps the table small).
    pub async fn delete_expired(&self) -> sqlx::Result<u64> {
        Ok(
            sqlx::query("DELETE FROM console_session WHERE expires_at <= now()")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}

/// Signs a member out everywhere, in the caller's transaction.
pub async fn delete_for_staff(conn: &mut PgConnection, staff_id: Uuid) -> sqlx::Result<u64> {
    Ok(
        sqlx::query("DELETE FROM console_session WHERE staff_id = $1")
            .bind(staff_id)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

fn id_hash(id: &Id) -> Vec<u8> {
    Sha256::digest(id.to_string().as_bytes()).to_vec()
}

fn staff_id(record: &Record) -> Option<Uuid> {
    record
        .data
        .get(STAFF_ID_KEY)
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
}

fn backend(e: impl std::fmt::Display) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

#[async_trait]
impl SessionStore for PgSessionStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let data = serde_json::to_value(&record.data)
            .map_err(|e| session_store::Error::Encode(e.to_string()))?;
        // A 128-bit random id does not collide in practice; if it ever
        // does, the other session is left alone and a new id drawn.
        loop {
            let inserted = sqlx::query(
                "INSERT INTO console_session (id_hash, staff_id, data, expires_at)
                 VALUES ($1, $2, $3, to_timestamp($4)) ON CONFLICT DO NOTHING",
            )
            .bind(id_hash(&record.id))
            .bind(staff_id(record))
            .bind(&data)
            .bind(record.expiry_date.unix_timestamp() as f64)
            .execute(&self.pool)
            .await
            .map_err(backend)?
            .rows_affected();
            if inserted == 1 {
                return Ok(());
            }
            record.id = Id::default();
        }
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let data = serde_json::to_value(&record.data)
            .map_err(|e| session_store::Error::Encode(e.to_string()))?;
        // An update, never an insert: a session deleted meanwhile (its
        // member was disabled) must not come back from a request in flight.
        sqlx::query(
            "UPDATE console_session SET staff_id = $2, data = $3, expires_at = to_timestamp($4)
             WHERE id_hash = $1",
        )
        .bind(id_hash(&record.id))
        .bind(staff_id(record))
        .bind(&data)
        .bind(record.expiry_date.unix_timestamp() as f64)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn load(&self, session_id: &Id) -> session_store::Result<Option<Record>> {
        let row: Option<(serde_json::Value, i64)> = sqlx::query_as(
            "SELECT data, extract(epoch FROM expires_at)::bigint FROM console_session
             WHERE id_hash = $1 AND expires_at > now()",
        )
        .bind(id_hash(session_id))
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        let Some((data, expires)) = row else {
            return Ok(None);
        };
        Ok(Some(Record {
            id: *session_id,
            data: serde_json::from_value(data)
                .map_err(|e| session_store::Error::Decode(e.to_string()))?,
            expiry_date: OffsetDateTime::from_unix_timestamp(expires)
                .map_err(|e| session_store::Error::Decode(e.to_string()))?,
        }))
    }

    async fn delete(&self, session_id: &Id) -> session_store::Result<()> {
        sqlx::query("DELETE FROM console_session WHERE id_hash = $1")
            .bind(id_hash(session_id))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}
