//! `entitle-gateway`: serve the HTTP gateway, or apply migrations.

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    entitle_jobs::telemetry::init_logging();
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    let listen = config.gateway.listen;
    let ctx = Context::connect(config).await?;
    ctx.prepare().await?;
    if let Some(Command::Migrate) = cli.command {
        tracing::info!("migrations applied and catalogue loaded");
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Failed to listen on {listen} (gateway.listen)"))?;
    entitle_gateway::run(ctx, listener, entitle_jobs::shutdown::signal()).await
}
