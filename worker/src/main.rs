//! `entitle-worker`: run the background workers, or apply migrations.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use entitle_jobs::{Config, Context, reconcile};

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
    /// Put failed webhook events back in the queue (after fixing their cause,
    /// e.g. mapping a product in the catalogue), then exit.
    RetryFailed {
        /// Only this event (its inbox id).
        #[arg(long)]
        event: Option<uuid::Uuid>,
        /// Only events of this channel (stripe, shopify, native).
        #[arg(long)]
        channel: Option<String>,
        /// Only events that failed with this code (e.g. unknown_product).
        #[arg(long)]
        error_code: Option<String>,
    },
    /// Reconcile a channel over a window now, in this process, and print the
    /// run's outcome (the scheduled runs and `POST /admin/v1/reconciliations`
    /// do the same through the queue).
    Reconcile {
        /// stripe, shopify or native.
        #[arg(long)]
        channel: String,
        /// Start of the window (RFC 3339); default: reconcile.window_hours
        /// before the end.
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// End of the window (RFC 3339, exclusive); default: now less
        /// reconcile.lag_secs.
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    entitle_jobs::telemetry::init_logging();
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    let ctx = Context::connect(config).await?;
    ctx.prepare().await?;
    match cli.command {
        Some(Command::Migrate) => {
            tracing::info!("migrations applied and catalogue loaded");
            return Ok(());
        }
        Some(Command::RetryFailed {
            event,
            channel,
            error_code,
        }) => {
            let filter = entitle_jobs::inbox::RetryFilter {
                id: event,
                channel,
                error_code,
            };
            let ids = entitle_jobs::handlers::retry_failed_events(
                &ctx,
                &filter,
                "operator:cli",
                "entitle-worker retry-failed",
            )
            .await?;
            println!("{} failed event(s) queued again", ids.len());
            for id in ids {
                println!("{id}");
            }
            return Ok(());
        }
        Some(Command::Reconcile { channel, from, to }) => {
            let config = &ctx.config.reconcile;
            let default = reconcile::Window::scheduled(
                chrono::Utc::now(),
                config.window_hours,
                config.lag_secs,
            );
            let end = to.unwrap_or(default.end);
            let start =
                from.unwrap_or(end - chrono::Duration::hours(i64::from(config.window_hours)));
            if !reconcile::CHANNELS.contains(&channel.as_str()) || start >= end {
                anyhow::bail!(
                    "--channel must be stripe, shopify or native, and --from before --to"
                );
            }
            let window = reconcile::Window { start, end };
            let run = reconcile::queue(&ctx.pool, &channel, window, "operator:cli").await?;
            reconcile::execute(&ctx, run).await?;
            let row: serde_json::Value =
                sqlx::query_scalar("SELECT to_jsonb(r) FROM reconciliation_run r WHERE id = $1")
                    .bind(run)
                    .fetch_one(&ctx.pool)
                    .await?;
            println!("{}", serde_json::to_string_pretty(&row)?);
            return Ok(());
        }
        Some(Command::Run) | None => {}
    }
    if let Ok(address) = ctx.config.worker.metrics_listen.parse() {
        entitle_jobs::telemetry::serve_metrics(address, "worker.metrics_listen")?;
    }
    entitle_worker::run(ctx, entitle_jobs::shutdown::signal()).await
}
