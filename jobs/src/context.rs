//! The shared handles every job and request works with.

use sqlx::PgPool;

use crate::{
    catalogue::Catalogue, channel::stripe::StripeApi, code::CodeKeys, config::Config, db,
    email::Mailer, queue::Queues,
};

/// Connections and clients built once per process from the configuration.
#[derive(Debug, Clone)]
pub struct Context {
    pub config: Config,
    pub pool: PgPool,
    pub queues: Queues,
    pub keys: CodeKeys,
    pub stripe: StripeApi,
    pub mailer: Mailer,
}

impl Context {
    /// Connects to Postgres and Redis and builds the clients.
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        let pool = db::connect(&config.database).await?;
        let queues = Queues::connect(&config.redis).await?;
        Ok(Self {
            keys: CodeKeys::new(config.hash_key(), config.seal_key()),
            stripe: StripeApi::new(&config.stripe)?,
            mailer: Mailer::new(&config.email)?,
            config,
            pool,
            queues,
        })
    }

    /// Applies migrations and loads the catalogue: what a process does before
    /// it serves.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        db::migrate(&self.pool).await?;
        Catalogue::load(&self.config.catalogue.file)?
            .sync(&self.pool)
            .await
    }
}
