//! The queue engines Entitle could run on, measured on the same drain: a
//! backlog of jobs, each marking one row of a table done, with the same
//! concurrency. What differs is only how work reaches the handler:
//!
//! - **apalis-postgres**: every job a row in `apalis.jobs`, fetched with
//!   `SKIP LOCKED` and acknowledged by an update;
//! - **bounded Redis window fed from Postgres** (what Entitle runs): rows
//!   leased in batches under a token and pushed to apalis-redis as jobs of
//!   many ids, never more than a window of them waiting;
//! - the same window, one id per job (the per-job cost of the design);
//! - **apalis-redis with the whole backlog pushed**: what Entitle did
//!   before, which wedges above ~8,000 due jobs.
//!
//! Each prints its throughput, and the Postgres CPU time and WAL it cost
//! per job: on a small machine Postgres is what saturates first.

use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_redis::RedisStorage;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use entitle_worker::poll::EveryInterval;

use crate::{seed, stack};

/// How often an idle worker of any candidate asks for work, as Entitle's do.
const POLL: Duration = Duration::from_millis(100);

/// How the engines are measured.
#[derive(Debug, Clone)]
pub struct Options {
    pub admin_url: String,
    pub redis_url: String,
    pub jobs: usize,
    pub concurrency: usize,
}

/// What one engine did with the backlog.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub engine: &'static str,
    /// Jobs done in the time allowed.
    pub done: i64,
    pub seconds: f64,
    pub postgres_cpu_ms_per_job: f64,
    pub wal_bytes_per_job: f64,
    pub note: String,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.done as f64 / self.seconds
    }
}

async fn fresh_table(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_job;
         CREATE TABLE bench_job (id uuid PRIMARY KEY, due_at timestamptz NOT NULL DEFAULT now(),
                                 leased_until timestamptz, lease_token uuid, done_at timestamptz);
         CREATE INDEX bench_job_ready_idx ON bench_job (due_at) WHERE done_at IS NULL;",
    )
    .execute(pool)
    .await?;
    sqlx::query("INSERT INTO bench_job (id) SELECT gen_random_uuid() FROM generate_series(1, $1)")
        .bind(n as i64)
        .execute(pool)
        .await?;
    sqlx::raw_sql("ANALYZE bench_job").execute(pool).await?;
    Ok(())
}

async fn wal_lsn(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(pool)
            .await?,
    )
}

async fn done(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM bench_job WHERE done_at IS NOT NULL")
            .fetch_one(pool)
            .await?,
    )
}

/// Runs until every job is done or `limit` passes; measures the drain.
async fn measure(
    pool: &PgPool,
    engine: &'static str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<Outcome> {
    let wal_before = wal_lsn(pool).await?;
    let cpu_before = stack::postgres_cpu_seconds();
    let started = Instant::now();
    let mut finished = 0;
    while started.elapsed() < limit {
        finished = done(pool).await?;
        if finished as usize >= n {
            break;
        }
        // Counting is a scan of the table: not too often, or it is what
        // Postgres spends its time on.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = stack::postgres_cpu_seconds() - cpu_before;
    let wal = (wal_lsn(pool).await? - wal_before) as f64;
    let per = finished.max(1) as f64;
    Ok(Outcome {
        engine,
        done: finished,
        seconds,
        postgres_cpu_ms_per_job: cpu * 1000.0 / per,
        wal_bytes_per_job: wal / per,
        note: String::new(),
    })
}

/// One job of the apalis-postgres candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RowJob {
    id: Uuid,
}

async fn mark_one(job: RowJob, pool: Data<PgPool>) -> Result<(), BoxDynError> {
    sqlx::query("UPDATE bench_job SET done_at = now() WHERE id = $1 AND done_at IS NULL")
        .bind(job.id)
        .execute(&*pool)
        .await?;
    Ok(())
}

async fn apalis_postgres(opts: &Options, pool: &PgPool) -> anyhow::Result<Outcome> {
    use apalis_postgres::{Config, PostgresStorage};
    PostgresStorage::setup(pool).await?;
    sqlx::raw_sql("TRUNCATE apalis.jobs").execute(pool).await?;
    let config = Config::default()
        .queue("bench")
        .batch_size(100)
        .lock_tasks(false);
    let mut backend = PostgresStorage::new(pool).with_config(config);
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM bench_job")
        .fetch_all(pool)
        .await?;
    for chunk in ids.chunks(1000) {
        backend
            .push_bulk(chunk.iter().map(|id| RowJob { id: *id }).collect())
            .await?;
    }
    let worker = WorkerBuilder::new(format!("bench-pg-{}", Uuid::new_v4().simple()))
        .backend(backend.poll_with_strategy(EveryInterval::new(POLL)))
        .concurrency(opts.concurrency)
        .parallelize(tokio::spawn)
        .data(pool.clone())
        .build(mark_one);
    let running = tokio::spawn(worker.run());
    let outcome = measure(
        pool,
        "apalis-postgres, a job per row",
        opts.jobs,
        limit(opts),
    )
    .await;
    running.abort();
    outcome
}

fn limit(opts: &Options) -> Duration {
    Duration::from_secs(30 + (opts.jobs / 200) as u64)
}

/// One job of the windowed candidates: ids leased under a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeasedJob {
    token: Uuid,
    ids: Vec<Uuid>,
}

async fn mark_leased(job: LeasedJob, pool: Data<PgPool>) -> Result<(), BoxDynError> {
    sqlx::query(
        "UPDATE bench_job SET done_at = now(), leased_until = NULL
         WHERE id = ANY($1) AND lease_token = $2 AND done_at IS NULL",
    )
    .bind(&job.ids)
    .bind(job.token)
    .execute(&*pool)
    .await?;
    Ok(())
}

fn redis_queue(conn: apalis_redis::ConnectionManager, name: &str) -> RedisStorage<LeasedJob> {
    RedisStorage::new(conn).with_config(
        apalis_redis::Config::default()
            .queue(name)
            .batch_size(1)
            .lock_tasks(false)
            .emit_events(false),
    )
}

async fn clear_queue(redis_url: &str, name: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{name}*"))
        .query_async(&mut conn)
        .await?;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
    }
    Ok(())
}

/// Entitle's design: leases ready rows in batches, never more than
/// `window` jobs of `batch` ids waiting in Redis.
async fn windowed(
    opts: &Options,
    pool: &PgPool,
    batch: usize,
    window: usize,
) -> anyhow::Result<Outcome> {
    let name = format!("entitle-bench-engines-window-{batch}");
    clear_queue(&opts.redis_url, &name).await?;
    let conn = apalis_redis::connect(opts.redis_url.as_str()).await?;
    let queue = redis_queue(conn.clone(), &name);
    let config = queue.get_config().clone();
    let feeder_pool = pool.clone();
    let mut feeder_queue = queue.clone();
    let feeder = tokio::spawn(async move {
        let mut conn = conn;
        loop {
            let (active, scheduled): (usize, usize) = redis::pipe()
                .cmd("LLEN")
                .arg(config.active_jobs_list())
                .cmd("ZCARD")
                .arg(config.scheduled_jobs_set())
                .query_async(&mut conn)
                .await?;
            let room = window.saturating_sub(active + scheduled);
            let mut full = false;
            if room > 0 {
                let token = Uuid::now_v7();
                let limit = (room * batch) as i64;
                let ids: Vec<Uuid> = sqlx::query_scalar(
                    "UPDATE bench_job SET leased_until = now() + interval '15 seconds', lease_token = $2
                     WHERE id IN (SELECT id FROM bench_job
                                  WHERE done_at IS NULL AND due_at <= now()
                                    AND (leased_until IS NULL OR leased_until < now())
                                  ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                     RETURNING id",
                )
                .bind(limit)
                .bind(token)
                .fetch_all(&feeder_pool)
                .await?;
                full = ids.len() as i64 == limit;
                if !ids.is_empty() {
                    let jobs = ids
                        .chunks(batch)
                        .map(|c| LeasedJob {
                            token,
                            ids: c.to_vec(),
                        })
                        .collect();
                    feeder_queue.push_bulk(jobs).await?;
                }
            }
            if !full {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });
    let worker = WorkerBuilder::new(format!("bench-window-{}", Uuid::new_v4().simple()))
        .backend(queue.poll_with_strategy(EveryInterval::new(POLL)))
        .concurrency(opts.concurrency)
        .parallelize(tokio::spawn)
        .data(pool.clone())
        .build(mark_leased);
    let running = tokio::spawn(worker.run());
    let engine = if batch == 1 {
        "window fed from Postgres, 1 id a job"
    } else {
        "window fed from Postgres, 100 ids a job"
    };
    let outcome = measure(pool, engine, opts.jobs, limit(opts)).await;
    running.abort();
    feeder.abort();
    clear_queue(&opts.redis_url, &name).await?;
    outcome
}

/// What Entitle did before: every job pushed to apalis-redis at once.
async fn unbounded_redis(opts: &Options, pool: &PgPool) -> anyhow::Result<Outcome> {
    let name = "entitle-bench-engines-unbounded";
    clear_queue(&opts.redis_url, name).await?;
    let conn = apalis_redis::connect(opts.redis_url.as_str()).await?;
    let mut queue = redis_queue(conn, name);
    let token = Uuid::now_v7();
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE bench_job SET lease_token = $1 WHERE done_at IS NULL RETURNING id",
    )
    .bind(token)
    .fetch_all(pool)
    .await?;
    for chunk in ids.chunks(1000) {
        queue
            .push_bulk(
                chunk
                    .iter()
                    .map(|id| LeasedJob {
                        token,
                        ids: vec![*id],
                    })
                    .collect(),
            )
            .await?;
    }
    let worker = WorkerBuilder::new(format!("bench-unbounded-{}", Uuid::new_v4().simple()))
        .backend(queue.poll_with_strategy(EveryInterval::new(POLL)))
        .concurrency(opts.concurrency)
        .parallelize(tokio::spawn)
        .data(pool.clone())
        .build(mark_leased);
    let running = tokio::spawn(worker.run());
    // It either drains or wedges; a minute tells which.
    let mut outcome = measure(
        pool,
        "apalis-redis, whole backlog pushed",
        opts.jobs,
        Duration::from_secs(60).min(limit(opts)),
    )
    .await?;
    running.abort();
    clear_queue(&opts.redis_url, name).await?;
    if (outcome.done as usize) < opts.jobs {
        outcome.note = format!(
            "wedged: {} of {} done when it was stopped",
            outcome.done, opts.jobs
        );
    }
    Ok(outcome)
}

/// Runs every candidate on a fresh backlog of `opts.jobs`.
pub async fn run(opts: &Options) -> anyhow::Result<Vec<Outcome>> {
    let name = "entitle_bench_engines";
    let url = seed::fresh_database(&opts.admin_url, name).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections((opts.concurrency + 4) as u32)
        .connect(&url)
        .await?;
    let mut outcomes = Vec::new();
    println!(
        "engines: a backlog of {} jobs, each marking a row done, {} at a time",
        opts.jobs, opts.concurrency
    );
    fresh_table(&pool, opts.jobs).await?;
    outcomes.push(apalis_postgres(opts, &pool).await?);
    fresh_table(&pool, opts.jobs).await?;
    outcomes.push(windowed(opts, &pool, 100, 16).await?);
    fresh_table(&pool, opts.jobs).await?;
    outcomes.push(windowed(opts, &pool, 1, 64).await?);
    fresh_table(&pool, opts.jobs).await?;
    outcomes.push(unbounded_redis(opts, &pool).await?);
    pool.close().await;
    seed::drop_database(&opts.admin_url, name).await?;
    println!(
        "  {:<42} {:>10} {:>12} {:>18} {:>14}",
        "engine", "jobs/s", "done", "Postgres CPU/job", "WAL/job"
    );
    for o in &outcomes {
        println!(
            "  {:<42} {:>10.0} {:>12} {:>15.3} ms {:>12.0} B  {}",
            o.engine,
            o.per_second(),
            o.done,
            o.postgres_cpu_ms_per_job,
            o.wal_bytes_per_job,
            o.note
        );
    }
    Ok(outcomes)
}
