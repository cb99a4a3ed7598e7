//! `entitle-worker`: run the background workers, or apply migrations.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use entitle_jobs::{Config, Context};

#[derive(Parser)]
#[command(version, about = "Entitle's background workers")]
struct Cli {
    /// Configuration file layered over the defaults.
    #[arg(long, env = "ENTITLE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate, load the catalogue and run the workers (the default).
    Run,
    /// Apply database migrations and load the catalogue, then exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    entitle_jobs::telemetry::init_logging();
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    let ctx = Context::connect(config).await?;
    ctx.prepare().await?;
    if let Some(Command::Migrate) = cli.command {
        tracing::info!("migrations applied and catalogue loaded");
        return Ok(());
    }
    if let Ok(address) = ctx.config.worker.metrics_listen.parse() {
        entitle_jobs::telemetry::serve_metrics(address)?;
    }
    entitle_worker::run(ctx, entitle_jobs::shutdown::signal()).await
}
