//! Postgres: the pool and the embedded migrations.

use anyhow::Context as _;
use secrecy::ExposeSecret;
use sqlx::{PgPool, postgres::PgPoolOptions};

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
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(config.url.expose_secret())
        .await
        .context("Failed to connect to Postgres (database.url)")
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("Failed to apply database migrations")
}
