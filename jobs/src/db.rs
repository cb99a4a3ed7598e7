//! Postgres: the pool and the embedded migrations.

use anyhow::Context as _;
use secrecy::ExposeSecret;
use std::str::FromStr;

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseConfig;

/// The migrations under `migrations/`, compiled into every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens the pool; fails fast when Postgres is unreachable.
pub async fn connect(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    connect_sized(config, config.max_connections).await
}

/// Opens a pool of `size` connections to the configured database (the
/// gateway's webhook intake has its own).
pub async fn connect_sized(config: &DatabaseConfig, size: u32) -> anyhow::Result<PgPool> {
    connect_with_settings(config, size, &[]).await
}

/// [`connect_sized`], with server settings (`name`, `value`) every
/// connection of the pool starts with.
pub async fn connect_with_settings(
    config: &DatabaseConfig,
    size: u32,
    settings: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(config.url.expose_secret())
        .context("Failed to parse database.url")?
        .options(settings.iter().copied());
    PgPoolOptions::new()
        .max_connections(size)
        // No ping before each use: on the hot paths it is a round trip per
        // request. A connection Postgres dropped fails its next query,
        // which is answered 503 (gateway) or retried (worker), and is then
        // replaced.
        .test_before_acquire(false)
        .acquire_timeout(std::time::Duration::from_millis(config.acquire_timeout_ms))
        .connect_with(options)
        .await
        .context("Failed to connect to Postgres (database.url)")
}

/// Whether an error means Postgres is unreachable or refusing work for now
/// (down, restarting, out of connections), rather than that the request
/// was wrong: the caller should be told to try again, not that we failed.
pub fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08…), shutting down or starting up
        // (57P01-57P03), too many connections (53300).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether an error is Postgres refusing a value of the request itself
/// (data exceptions, class 22: a NUL byte, a number out of range, bad
/// text for a type; 54000: a key too long to index), not a fault of ours.
pub fn bad_input(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || &*code == "54000"),
        _ => false,
    }
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("Failed to apply database migrations")
}
