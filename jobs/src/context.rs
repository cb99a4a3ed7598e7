//! The shared handles every job and request works with.

use std::{ops::Deref, sync::Arc};

use sqlx::PgPool;

use crate::{
    catalogue::{AtStart, Catalogue},
    channel::stripe::StripeApi,
    code::CodeKeys,
    config::Config,
    db,
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
            keys: CodeKeys::rotated(
                config.hash_key(),
                config.seal_key(),
                &config.previous_seal_keys(),
            ),
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

    /// The same context on another pool (the gateway's, with its own wait
    /// for a connection).
    pub fn with_pool(&self, pool: PgPool) -> Context {
        Context(Arc::new(Shared {
            config: self.config.clone(),
            pool,
            keys: self.keys.clone(),
            stripe: self.stripe.clone(),
            mailer: self.mailer.clone(),
            http: self.http.clone(),
        }))
    }

    /// Applies migrations and brings the catalogue file to the database
    /// when it should (see [`Catalogue::at_start`]): what a process does
    /// before it serves.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        db::migrate(&self.pool).await?;
        let process = format!("system:{}", process_name());
        let catalogue = Catalogue::load(&self.config.catalogue.file)?;
        self.mailer
            .check(catalogue.product.iter().map(|p| p.email_template.as_str()))?;
        let differs = match catalogue.at_start(&self.pool, &process).await? {
            AtStart::Unchanged => false,
            AtStart::Synced { from } => {
                tracing::info!(version = catalogue.version, ?from, "catalogue synced");
                false
            }
            AtStart::Differs { database, file } => {
                tracing::error!(
                    database_version = database,
                    file_version = file,
                    file = %self.config.catalogue.file.display(),
                    "the catalogue file differs from the database's and was not synced: raise \
                     its `version` to roll it out, or run `entitlectl products reload`; running \
                     with the database's catalogue"
                );
                true
            }
        };
        metrics::gauge!("entitle_catalogue_differs").set(if differs { 1.0 } else { 0.0 });
        Ok(())
    }
}

/// This program's name (`entitle-gateway`, `entitle-worker`), as the actor
/// of what it does at start.
fn process_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "entitle".to_owned())
}
