//! Entitle's benchmarks, run by `ops/bench.sh`: the pipeline on the release
//! binaries (intake, drains, steady latency; see [`pipeline`]), redemptions
//! and code checks through the platform API (see [`redeem`]), the queue
//! engines compared, a reconciliation run over 1,000,000 Stripe orders
//! against a generated stand-in of Stripe's API, and the expiry sweep over
//! 1,000,000 expiring codes among 5,000,000. Each prints its figures next to
//! the floor it is held to, and exits non-zero when a figure misses one.
//! `chaos` is the fault suite run by `ops/chaos.sh` (see [`chaos`]).

#![recursion_limit = "256"] // serde_json::json! of a whole Stripe event

mod chaos;
mod engines;
mod floor;
mod load;
mod pipeline;
mod redeem;
mod seed;
mod sink;
mod stack;
mod standin;

use std::time::Instant;

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use clap::{Parser, Subcommand};
use entitle_jobs::{Config, Context, reconcile, sweep};
use figment::providers::Serialized;
use serde_json::{Value, json};

/// Reconciliation must compare at least this many orders a second.
const RECONCILE_FLOOR_PER_SEC: f64 = 10_000.0;
/// The expiry sweep must expire at least this many codes a second.
const EXPIRY_FLOOR_PER_SEC: f64 = 10_000.0;
/// Neither may grow the process past this (bounded memory: it must not
/// scale with the number of orders or codes).
const MEMORY_CEILING_MIB: f64 = 64.0;

#[derive(Debug, Parser)]
#[command(about = "Entitle's benchmarks")]
struct Cli {
    /// Admin connection to Postgres; benchmark databases are made beside it.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Orders on both sides of the reconciliation.
    #[arg(long, default_value_t = 1_000_000)]
    orders: i64,
    /// Codes in the database for the expiry sweep.
    #[arg(long, default_value_t = 5_000_000)]
    expiry_codes: i64,
    /// Of those, how many are past their expiry.
    #[arg(long, default_value_t = 1_000_000)]
    expiring: i64,
    /// Keep the benchmark databases afterwards (they hold gigabytes).
    #[arg(long)]
    keep: bool,
    /// Pipeline: orders in intake and in each of the one- and two-worker
    /// drains. Enough for a drain of about 20 s: at 20,000 a drain lasted 6
    /// to 8 s, and the second process's start weighed on the comparison
    /// (two workers 0.78 × one, against 1.02 × at 60,000 in the same sitting).
    #[arg(long, default_value_t = 60_000)]
    pipeline_orders: usize,
    /// Engines: jobs in the backlog each engine drains.
    #[arg(long, default_value_t = 50_000)]
    jobs: usize,
    /// Pipeline: orders in the big backlog drain.
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Pipeline: webhooks a second in the steady phase.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Pipeline: seconds of the steady phase.
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    /// Redeem: codes redeemed, each once; check: as many fresh codes checked.
    #[arg(long, default_value_t = 80_000)]
    codes: usize,
    /// Pipeline, redeem and check: connections posting at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Pipeline, redeem and check: Postgres connections per Entitle process.
    #[arg(long, default_value_t = 10)]
    pool_size: u32,
    /// Pipeline, redeem and check: a setting layered over Entitle's
    /// configuration, e.g. `--set worker.concurrency=8` (repeatable).
    #[arg(long = "set")]
    settings: Vec<String>,
    #[command(subcommand)]
    which: Option<Which>,
}

#[derive(Debug, Clone, Subcommand)]
enum Which {
    /// Webhook intake, backlog drains with one and two workers, a 100,000
    /// order drain and latency at a steady rate, on the release binaries.
    Pipeline,
    /// Only the pipeline's floor and webhook intake.
    Intake,
    /// The queue engines Entitle could run on (apalis-postgres, the bounded
    /// Redis window it runs, apalis-redis unbounded), on the same drain.
    Engines,
    /// Every code of a batch redeemed once through `POST /v1/redemptions`,
    /// against a floor of one single-row update by primary key.
    Redeem,
    /// Fresh codes checked through `POST /v1/codes/check`, against the same
    /// floor.
    Check,
    Reconcile,
    Expiry,
    /// All of them (the default).
    All,
    /// The fault suite (ops/chaos.sh): a steady load from every channel on
    /// a private Postgres and Redis, during worker SIGKILLs, a Redis flush,
    /// Redis killed, Postgres restarted `-m immediate` and the SMTP server
    /// down; fails when an order is lost or a code issued twice.
    Chaos {
        /// The short version (a few hundred orders, short faults), as the
        /// test suite runs it.
        #[arg(long)]
        quick: bool,
        /// The folder of the entitle-gateway and entitle-worker binaries
        /// (default: beside this one, e.g. target/debug).
        #[arg(long)]
        binaries: Option<std::path::PathBuf>,
        /// Orders a second (default 30; quick 10).
        #[arg(long)]
        rate: Option<f64>,
        /// Worker SIGKILLs in the kill loop (default 25; quick 5).
        #[arg(long)]
        kills: Option<usize>,
        /// Seconds the SMTP server is down (default 120; quick 10).
        #[arg(long)]
        smtp_down_secs: Option<u64>,
    },
}

/// One measured figure and its floor (or ceiling).
pub(crate) struct Figure {
    what: &'static str,
    value: f64,
    unit: &'static str,
    bound: f64,
    /// true: the value must reach the bound; false: stay under it.
    at_least: bool,
}

impl Figure {
    fn passes(&self) -> bool {
        if self.at_least {
            self.value >= self.bound
        } else {
            self.value <= self.bound
        }
    }

    fn print(&self) {
        // Ratios to a floor are read to the hundredth (0.35 is not 0.3).
        let digits = if self.unit.starts_with('×') { 2 } else { 1 };
        println!(
            "  {:<38} {:>12.digits$} {:<9} {} {:>10.digits$}  {}",
            self.what,
            self.value,
            self.unit,
            if self.at_least { "floor  " } else { "ceiling" },
            self.bound,
            if self.passes() { "ok" } else { "MISSED" }
        );
    }
}

pub(crate) fn random_key() -> String {
    let mut key = [0u8; 32];
    rand::fill(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A context on a fresh database named `name`.
async fn context(cli: &Cli, name: &str, overrides: Value) -> anyhow::Result<Context> {
    let url = seed::fresh_database(&cli.database_url, name).await?;
    let catalogue = concat!(env!("CARGO_MANIFEST_DIR"), "/../catalogue.toml");
    let config = Config::from_figment(
        Config::defaults()
            .merge(Serialized::defaults(json!({
                "database": { "url": url, "max_connections": 4 },
                "redis": { "url": cli.redis_url, "namespace": format!("entitle-bench-{name}") },
                "codes": { "hash_key": random_key(), "seal_key": random_key() },
                "catalogue": { "file": catalogue },
            })))
            .merge(Serialized::defaults(overrides)),
    )?;
    let ctx = Context::connect(config).await?;
    ctx.prepare().await?;
    Ok(ctx)
}

async fn bench_reconcile(cli: &Cli) -> anyhow::Result<Vec<Figure>> {
    println!("reconciliation: {} Stripe orders on both sides", cli.orders);
    let standin = standin::Stripe::start(cli.orders).await?;
    let ctx = context(
        cli,
        "entitle_bench_reconcile",
        json!({ "stripe": { "api_base": standin.url, "api_key": "sk_bench" } }),
    )
    .await?;
    let window = standin.window();
    let seeding = Instant::now();
    let seeded = seed::orders(&ctx.pool, cli.orders, &window).await?;
    println!(
        "  seeded {} orders, lines and codes in {:.1} s (not measured)",
        seeded.orders,
        seeding.elapsed().as_secs_f64()
    );
    let run = reconcile::queue(&ctx.pool, "stripe", window, "benchmark").await?;
    reconcile::execute(&ctx, run).await?;
    let row: Value =
        sqlx::query_scalar("SELECT to_jsonb(r) FROM reconciliation_run r WHERE id = $1")
            .bind(run)
            .fetch_one(&ctx.pool)
            .await?;
    ensure!(row["status"] == "finished", "the run did not finish: {row}");
    let findings = &row["counts"]["findings"];
    println!("  run {run}: {}", row["counts"]);
    // The figures only count if the run found exactly what was seeded.
    for (kind, expected) in [
        ("paid_not_fulfilled", seeded.lost),
        ("unknown_to_channel", seeded.unknown),
        ("amount_mismatch", seeded.mismatched),
    ] {
        ensure!(
            findings[kind].as_i64().unwrap_or(0) == expected,
            "{kind}: expected {expected}, found {}",
            findings[kind]
        );
    }
    let seconds = row["duration_ms"].as_f64().unwrap_or(f64::MAX) / 1000.0;
    let records = row["channel_records"].as_f64().unwrap_or(0.0);
    ensure!(
        records as i64 == cli.orders,
        "the run read {records} records"
    );
    let peak = row["peak_memory_bytes"].as_f64().unwrap_or(f64::MAX) / 1048576.0;
    println!(
        "  {} channel records and {} Entitle orders in {seconds:.1} s",
        records, row["entitle_orders"]
    );
    Ok(vec![
        Figure {
            what: "reconciliation throughput",
            value: records / seconds,
            unit: "orders/s",
            bound: RECONCILE_FLOOR_PER_SEC,
            at_least: true,
        },
        Figure {
            what: "reconciliation peak memory (RSS)",
            value: peak,
            unit: "MiB",
            bound: MEMORY_CEILING_MIB,
            at_least: false,
        },
    ])
}

async fn bench_expiry(cli: &Cli) -> anyhow::Result<Vec<Figure>> {
    println!(
        "expiry sweep: {} expiring codes among {}",
        cli.expiring, cli.expiry_codes
    );
    let ctx = context(cli, "entitle_bench_expiry", json!({})).await?;
    let seeding = Instant::now();
    seed::codes(&ctx.pool, cli.expiry_codes, cli.expiring).await?;
    println!(
        "  seeded {} codes in {:.1} s (not measured)",
        cli.expiry_codes,
        seeding.elapsed().as_secs_f64()
    );
    let batch = i64::from(ctx.config.schedule.batch_size);
    let exact = reconcile::memory::reset_peak();
    let started = Instant::now();
    let summary = sweep::expire(&ctx.pool, batch)
        .await
        .context("the expiry sweep failed")?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = reconcile::memory::peak_bytes().unwrap_or(u64::MAX) as f64 / 1048576.0;
    let expired = summary["expired"].as_i64().unwrap_or(0);
    ensure!(
        expired == cli.expiring,
        "expired {expired}, not {}",
        cli.expiring
    );
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_event WHERE action = 'code.expired'")
            .fetch_one(&ctx.pool)
            .await?;
    ensure!(
        audited == expired,
        "{audited} audit events for {expired} codes"
    );
    println!(
        "  expired {expired} codes (each audited) in {seconds:.1} s, {batch} per transaction{}",
        if exact {
            ""
        } else {
            "; peak memory covers the whole process"
        }
    );
    Ok(vec![
        Figure {
            what: "expiry throughput",
            value: expired as f64 / seconds,
            unit: "codes/s",
            bound: EXPIRY_FLOOR_PER_SEC,
            at_least: true,
        },
        Figure {
            what: "expiry peak memory (RSS)",
            value: peak,
            unit: "MiB",
            bound: MEMORY_CEILING_MIB,
            at_least: false,
        },
    ])
}

/// Removes the benchmark's Redis keys (the healed orders' email jobs).
async fn forget_queues(redis_url: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("entitle-bench-*")
        .query_async(&mut conn)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let which = cli.which.clone().unwrap_or(Which::All);
    if let Which::Chaos {
        quick,
        binaries,
        rate,
        kills,
        smtp_down_secs,
    } = which
    {
        return chaos::run(&chaos::Options {
            quick,
            binaries,
            rate,
            kills,
            smtp_down_secs,
            keep: cli.keep,
        })
        .await;
    }
    let mut figures = Vec::new();
    if matches!(which, Which::Pipeline | Which::Intake | Which::All) {
        figures.extend(
            pipeline::run(&pipeline::Options {
                admin_url: cli.database_url.clone(),
                redis_url: cli.redis_url.clone(),
                orders: cli.pipeline_orders,
                backlog: cli.backlog,
                rate: cli.rate,
                steady_secs: cli.steady_secs,
                connections: cli.connections,
                pool_size: cli.pool_size,
                settings: cli.settings.clone(),
                keep: cli.keep,
                intake_only: matches!(which, Which::Intake),
            })
            .await?,
        );
    }
    if matches!(which, Which::Redeem | Which::Check | Which::All) {
        figures.extend(
            redeem::run(&redeem::Options {
                admin_url: cli.database_url.clone(),
                redis_url: cli.redis_url.clone(),
                codes: cli.codes,
                connections: cli.connections,
                pool_size: cli.pool_size,
                settings: cli.settings.clone(),
                keep: cli.keep,
                redeem: matches!(which, Which::Redeem | Which::All),
                check: matches!(which, Which::Check | Which::All),
            })
            .await?,
        );
    }
    if matches!(which, Which::Engines) {
        engines::run(&engines::Options {
            admin_url: cli.database_url.clone(),
            redis_url: cli.redis_url.clone(),
            jobs: cli.jobs,
            concurrency: 8,
        })
        .await?;
    }
    if matches!(which, Which::Reconcile | Which::All) {
        figures.extend(bench_reconcile(&cli).await?);
    }
    if matches!(which, Which::Expiry | Which::All) {
        figures.extend(bench_expiry(&cli).await?);
    }
    if !cli.keep {
        for name in ["entitle_bench_reconcile", "entitle_bench_expiry"] {
            seed::drop_database(&cli.database_url, name).await?;
        }
        forget_queues(&cli.redis_url).await?;
    }
    println!("\nfigures:");
    for figure in &figures {
        figure.print();
    }
    let missed = figures.iter().filter(|f| !f.passes()).count();
    ensure!(missed == 0, "{missed} figure(s) missed their floor");
    Ok(())
}
