//! `entitle-gateway`: serve the HTTP gateway, apply migrations, or create the
//! first API token or console staff account.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use entitle_jobs::{Config, Context};

#[derive(Parser)]
#[command(version, about = "Entitle's HTTP gateway")]
struct Cli {
    /// Configuration file layered over the defaults.
    #[arg(long, env = "ENTITLE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate, load the catalogue and serve (the default).
    Serve,
    /// Apply database migrations and load the catalogue, then exit.
    Migrate,
    /// Create an API token (the first admin's, to bootstrap) and print it.
    CreateToken {
        /// The token's name: the actor its requests are audited as.
        #[arg(long)]
        name: String,
        /// support, operator or admin.
        #[arg(long, default_value = "admin")]
        role: String,
        #[arg(long, default_value = "bootstrap")]
        reason: String,
    },
    /// Create a platform API key (for /v1: redemptions and code checks)
    /// and print it.
    CreatePlatformKey {
        /// The key's name: redemptions made with it are recorded as
        /// `platform:<name>`.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "bootstrap")]
        reason: String,
    },
    /// Make the database's catalogue the file's, whatever its version
    /// (audited as catalogue.synced), then exit.
    SyncCatalogue {
        #[arg(long)]
        reason: String,
    },
    /// Seal every stored code and endpoint secret again with the current
    /// codes.seal_key (after a rotation), then exit.
    Reseal {
        /// Codes per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
    /// Create a staff account for the support console (the first admin's,
    /// to bootstrap). The password is read from ENTITLE_STAFF_PASSWORD, or
    /// generated and printed once.
    CreateStaff {
        /// The member's name: the actor their console actions are audited as.
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: String,
        /// support, operator or admin.
        #[arg(long, default_value = "admin")]
        role: String,
        #[arg(long, default_value = "bootstrap")]
        reason: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    entitle_jobs::telemetry::init_logging();
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref())?;
    config.database = config.gateway_database();
    let listen = config.gateway.listen;
    let ctx = Context::connect(config).await?;
    ctx.prepare().await?;
    match cli.command {
        Some(Command::Migrate) => {
            tracing::info!("migrations applied and catalogue loaded");
            return Ok(());
        }
        Some(Command::CreateToken { name, role, reason }) => {
            let role = entitle_jobs::token::Role::parse(&role)
                .ok_or_else(|| anyhow::anyhow!("--role must be support, operator or admin"))?;
            let token =
                entitle_jobs::token::create(&ctx.pool, &name, role, "operator:bootstrap", &reason)
                    .await?;
            // The only time the token is shown.
            println!("{token}");
            return Ok(());
        }
        Some(Command::Reseal { batch }) => {
            let done = entitle_jobs::reseal::reseal(&ctx.pool, &ctx.keys, batch.max(1)).await?;
            println!(
                "{} codes sealed again, {} already current, {} unreadable; {} endpoint secrets sealed again",
                done.codes, done.current, done.unreadable, done.endpoint_secrets
            );
            if done.unreadable > 0 {
                anyhow::bail!(
                    "{} codes open with no configured key: keep their key in codes.previous_seal_keys",
                    done.unreadable
                );
            }
            return Ok(());
        }
        Some(Command::SyncCatalogue { reason }) => {
            let file = &ctx.config.catalogue.file;
            let catalogue = entitle_jobs::catalogue::Catalogue::load(file)?;
            catalogue
                .sync(&ctx.pool, "operator:command-line", &reason)
                .await?;
            println!(
                "catalogue version {} from {} synced: {} products",
                catalogue.version,
                file.display(),
                catalogue.product.len()
            );
            return Ok(());
        }
        Some(Command::CreatePlatformKey { name, reason }) => {
            let (_, key) = entitle_jobs::platform_key::create(
                &ctx.pool,
                &ctx.keys,
                &name,
                "operator:bootstrap",
                &reason,
            )
            .await?;
            // The only time the key is shown.
            println!("{key}");
            return Ok(());
        }
        Some(Command::CreateStaff {
            name,
            email,
            role,
            reason,
        }) => {
            let role = entitle_jobs::token::Role::parse(&role)
                .ok_or_else(|| anyhow::anyhow!("--role must be support, operator or admin"))?;
            let given = std::env::var("ENTITLE_STAFF_PASSWORD").ok();
            let password = given
                .clone()
                .unwrap_or_else(entitle_gateway::console::password::generate);
            let member = entitle_gateway::console::members::create(
                &ctx.pool,
                entitle_gateway::console::members::NewMember {
                    name: &name,
                    email: &email,
                    role,
                    password: &password,
                },
                "operator:bootstrap",
                &reason,
            )
            .await?;
            eprintln!(
                "staff member {} <{}> created with the {} role",
                member.name,
                member.email,
                role.as_str()
            );
            if given.is_none() {
                // The only time the generated password is shown.
                println!("{password}");
            }
            return Ok(());
        }
        Some(Command::Serve) | None => {}
    }
    if let Ok(address) = ctx.config.gateway.metrics_listen.parse() {
        entitle_jobs::telemetry::serve_metrics(address, "gateway.metrics_listen")?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Failed to listen on {listen} (gateway.listen)"))?;
    entitle_gateway::run(ctx, listener, entitle_jobs::shutdown::signal()).await
}
