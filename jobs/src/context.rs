//! The shared handles every job and request works with.

use std::{ops::Deref, sync::Arc};

use sqlx::PgPool;

use crate::{
    catalogue::Catalogue, channel::stripe::StripeApi, code::CodeKeys, config::Config, db,
    email::Mailer,
};

/// Connections and clients built once per process from the configuration,
/// behind one `Arc`: every request and job clones its context, and that must
/// cost a reference count, not a copy of the configuration and templates.
///
/// Redis is not among them: only the worker's queues use it (see
/// [`crate::queue::Queues`]), so the gateway answers whatever Redis does.
#[derive(Debug, Clone)]
pub struct Context(Arc<Shared>);

/// What a [`Context`] holds.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub pool: PgPool,
    pub keys: CodeKeys,
    pub stripe: StripeApi,
    pub mailer: Mailer,
    /// Sends the platform's events: each attempt bounded by
    /// `platform.timeout_secs`, redirects not followed (a receiver moves by
    /// changing its endpoint).
    pub http: reqwest::Client,
}

impl Deref for Context {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Context {
    /// Connects to Postgres and builds the clients.
    pub async fn connect(config: Config) -> anyhow::Result<Self> {
        let pool = db::connect(&config.database).await?;
        Ok(Self(Arc::new(Shared {
            keys: CodeKeys::new(config.hash_key(), config.seal_key()),
            stripe: StripeApi::new(&config.stripe)?,
            mailer: Mailer::new(&config.email)?,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(config.platform.timeout_secs))
                .connect_timeout(std::time::Duration::from_secs(
                    config.platform.timeout_secs.min(5),
                ))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("Entitle/", env!("CARGO_PKG_VERSION")))
                .build()?,
            config,
            pool,
        })))
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
