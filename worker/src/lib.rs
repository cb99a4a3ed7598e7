//! Entitle's worker: feeders that move ready work from Postgres into a
//! bounded window of Redis queues, apalis workers that take it from there
//! in batches (webhook events into orders and codes, email deliveries,
//! reconciliation runs), and the scheduled sweeps. Run as many processes as
//! needed; every job is idempotent and every row is leased to one of them.

use std::{future::Future, time::Duration};

use apalis::prelude::*;
use apalis_cron::{CronScheduler, Tick};
use entitle_jobs::{
    Context,
    feed::{self, FeedSettings, Work},
    handlers,
    platform_event::{deliver, endpoint},
    queue::{DeliveryBatch, EventBatch, PlatformBatch, Queues, RunReconciliation},
    reconcile, sweep,
};
use futures::{FutureExt, future::BoxFuture};
use poll::EveryInterval;
use tokio::sync::watch;

pub mod poll;

/// A worker name unique to this process, as apalis requires when several
/// processes serve one queue.
pub fn worker_name(role: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{role}-{}-{}", std::process::id(), &id[..8])
}

// A job never fails as a whole: what it could not do is recorded on its rows
// and retried from Postgres, so apalis has nothing to retry.

async fn process_events(job: EventBatch, ctx: Data<Context>) -> Result<(), BoxDynError> {
    if let Err(e) = handlers::process_events(&ctx, job.token, &job.ids).await {
        tracing::warn!(error = %e, events = job.ids.len(),
            "event batch not done; its events are fed again when their lease lapses");
    }
    Ok(())
}

/// Runs a batch that sends to the outside world in a task of its own and
/// waits for it. apalis drops a job's future when its queue worker is
/// restarted (Redis failed it, or forgot its registration) or shut down;
/// dropped halfway, a batch would leave messages the SMTP server or the
/// platform accepted unrecorded, and send them again once its lease lapsed.
/// In its own task the batch finishes and records what went.
pub async fn uncancelled<T: Send + 'static>(
    batch: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    tokio::spawn(batch).await.ok()
}

async fn send_deliveries(job: DeliveryBatch, ctx: Data<Context>) -> Result<(), BoxDynError> {
    let ctx = Context::clone(&ctx);
    uncancelled(async move {
        if let Err(e) = handlers::send_deliveries(&ctx, job.token, &job.ids).await {
            tracing::warn!(error = %e, deliveries = job.ids.len(),
                "delivery batch not done; its deliveries are fed again when their lease lapses");
        }
    })
    .await;
    Ok(())
}

async fn send_platform_events(job: PlatformBatch, ctx: Data<Context>) -> Result<(), BoxDynError> {
    let ctx = Context::clone(&ctx);
    uncancelled(async move {
        if let Err(e) = deliver::send_batch(&ctx, job.token, &job.ids).await {
            tracing::warn!(error = %e, deliveries = job.ids.len(),
                "platform batch not done; its deliveries are fed again when their lease lapses");
        }
    })
    .await;
    Ok(())
}

async fn run_reconciliation(job: RunReconciliation, ctx: Data<Context>) -> Result<(), BoxDynError> {
    if let Err(e) = reconcile::execute(&ctx, job.run_id).await {
        tracing::warn!(error = %e, run = %job.run_id, "reconciliation run not carried out");
    }
    Ok(())
}

/// What a restarted queue worker waits before it asks Redis again: nothing
/// the first time, then half a second more per restart, at most five.
fn pause_before<B>(
    restarts: usize,
) -> impl Fn(&mut B) -> BoxFuture<'static, Result<(), apalis_redis::Error>> + Send + Sync + 'static
{
    let pause = Duration::from_millis(500 * restarts.min(10) as u64);
    move |_| {
        async move {
            tokio::time::sleep(pause).await;
            Ok(())
        }
        .boxed()
    }
}

/// How often a feeder measures its backlog for the metrics.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Feeds one kind of work from Postgres into its queue until `stop`: at
/// once again while it finds full batches, every `worker.feed_interval_ms`
/// otherwise, and backing off while Postgres or Redis fail.
async fn feed_loop(ctx: Context, queues: Queues, work: Work, mut stop: watch::Receiver<bool>) {
    let settings = FeedSettings {
        batch_size: ctx.config.worker.batch_size,
        window: ctx.config.worker.window,
        lease: ctx.config.lease(),
    };
    let idle = Duration::from_millis(ctx.config.worker.feed_interval_ms);
    let mut failures: u32 = 0;
    let mut measured = std::time::Instant::now() - BACKLOG_EVERY;
    loop {
        if measured.elapsed() >= BACKLOG_EVERY {
            measured = std::time::Instant::now();
            if let Ok((count, oldest)) = feed::backlog(&ctx.pool, work).await {
                metrics::gauge!("entitle_backlog", "queue" => work.as_str()).set(count as f64);
                metrics::gauge!("entitle_backlog_oldest_seconds", "queue" => work.as_str())
                    .set(oldest);
                if work == Work::Platform {
                    // Named for what operations alert on: how far behind
                    // the platform's picture of its codes is.
                    metrics::gauge!("entitle_platform_oldest_undelivered_seconds").set(oldest);
                }
            }
        }
        let wait = match feed::feed(&ctx.pool, &queues, work, settings).await {
            Ok(fed) => {
                if failures > 0 {
                    tracing::info!(queue = work.as_str(), "feeding again");
                }
                failures = 0;
                if fed.full { Duration::ZERO } else { idle }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(
                        queue = work.as_str(),
                        error = format!("{e:#}"),
                        failures,
                        "could not feed the queue; work waits in Postgres"
                    );
                }
                (idle * 2u32.saturating_pow(failures.min(6))).min(Duration::from_secs(5))
            }
        };
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Which sweep a cron worker runs.
#[derive(Debug, Clone, Copy)]
struct Sweep(&'static str);

async fn sweep_tick(
    tick: Tick,
    which: Data<Sweep>,
    ctx: Data<Context>,
    queues: Data<Queues>,
    worker: WorkerContext,
) -> Result<(), BoxDynError> {
    let Sweep(job) = *which;
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp(tick.get_timestamp() as i64, 0)
        .ok_or("tick out of range")?;
    if !sweep::claim_tick(&ctx.pool, job, at, worker.name()).await? {
        // Another worker process runs this tick.
        return Ok(());
    }
    let schedule = &ctx.config.schedule;
    let batch = i64::from(schedule.batch_size);
    let outcome = match job {
        "housekeeping" => {
            let retention = Duration::from_secs(schedule.finished_jobs_retention_secs);
            sweep::housekeeping(&ctx.pool, &queues, retention).await
        }
        "expire" => sweep::expire(&ctx.pool, batch).await,
        "reconcile" => reconcile::scheduled(&ctx).await,
        "remind" => sweep::remind(
            &ctx.pool,
            &ctx.config.email.message_id_domain,
            schedule.remind_days_before,
            batch,
        )
        .await
        .map(|(summary, _)| summary),
        _ => sweep::prune(&ctx.pool, schedule.retention_days, batch).await,
    };
    let summary = match &outcome {
        Ok(summary) => summary.clone(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    sweep::finish_tick(&ctx.pool, job, at, summary).await?;
    outcome?;
    Ok(())
}

/// Connects to Redis and runs the feeders, the queue workers and the sweeps
/// until `shutdown` resolves, then lets running jobs finish (up to 30 s) and
/// returns.
pub async fn run(
    ctx: Context,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let queues = Queues::connect(&ctx.config.redis).await?;
    if sweep::autovacuum_off(&ctx.pool).await.unwrap_or(false) {
        tracing::warn!(
            "Postgres runs with autovacuum off: housekeeping vacuums the queue tables at each \
             tick (schedule.housekeeping); turn autovacuum on in production"
        );
    }
    run_with(ctx, queues, shutdown).await
}

/// [`run`] with queues the caller connected.
pub async fn run_with(
    ctx: Context,
    queues: Queues,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    endpoint::sync_config(&ctx.pool, &ctx.keys, &ctx.config.platform.endpoints)
        .await
        .map_err(|e| anyhow::anyhow!("platform.endpoints: {e}"))?;
    let concurrency = ctx.config.worker.concurrency;
    // A push from another process (a feeder elsewhere) does not wake this
    // worker, so idle workers look for new jobs at this interval.
    let poll = Duration::from_millis(ctx.config.worker.poll_interval_ms);
    let (stop, stopped) = watch::channel(false);
    let stop = std::sync::Arc::new(stop);
    let feeders: Vec<_> = Work::ALL
        .into_iter()
        .map(|work| {
            tokio::spawn(feed_loop(
                ctx.clone(),
                queues.clone(),
                work,
                stopped.clone(),
            ))
        })
        .collect();
    // Each worker takes one job (a batch) per free slot, so jobs spread
    // across processes instead of piling up in one process's buffer.
    let events = queues.events.clone();
    let deliveries = queues.deliveries.clone();
    let reconciliations = queues.reconciliations.clone();
    let platform = queues.platform.clone();
    let platform_ctx = ctx.clone();
    let event_ctx = ctx.clone();
    let delivery_ctx = ctx.clone();
    let reconcile_ctx = ctx.clone();
    let mut monitor = Monitor::new()
        .register(move |restarts| {
            WorkerBuilder::new(worker_name("events"))
                .backend(
                    events
                        .clone()
                        .poll_with_strategy(EveryInterval::new(poll))
                        .before_start(pause_before(restarts)),
                )
                .concurrency(concurrency)
                .parallelize(tokio::spawn)
                .data(event_ctx.clone())
                .build(process_events)
        })
        .register(move |restarts| {
            WorkerBuilder::new(worker_name("deliveries"))
                .backend(
                    deliveries
                        .clone()
                        .poll_with_strategy(EveryInterval::new(poll))
                        .before_start(pause_before(restarts)),
                )
                .concurrency(concurrency)
                .parallelize(tokio::spawn)
                .data(delivery_ctx.clone())
                .build(send_deliveries)
        })
        // Each job sends its deliveries several at once
        // (`platform.concurrency`), so few jobs need to run side by side.
        .register(move |restarts| {
            WorkerBuilder::new(worker_name("platform"))
                .backend(
                    platform
                        .clone()
                        .poll_with_strategy(EveryInterval::new(poll))
                        .before_start(pause_before(restarts)),
                )
                .concurrency(concurrency.clamp(1, 4))
                .parallelize(tokio::spawn)
                .data(platform_ctx.clone())
                .build(send_platform_events)
        })
        // Runs are long and read external APIs: one at a time per process.
        .register(move |restarts| {
            WorkerBuilder::new(worker_name("reconciliations"))
                .backend(
                    reconciliations
                        .clone()
                        .poll_with_strategy(EveryInterval::new(poll))
                        .before_start(pause_before(restarts)),
                )
                .concurrency(1)
                .data(reconcile_ctx.clone())
                .build(run_reconciliation)
        })
        // A queue worker stops when Redis fails it (down, or flushed and so
        // forgetting the worker's registration); start it again, after a
        // pause that grows with each restart.
        .should_restart(|worker, error| {
            tracing::warn!(worker = worker.name(), %error, "worker failed; restarting it");
            true
        })
        .shutdown_timeout(Duration::from_secs(30));
    let mut sweeps = vec![
        ("housekeeping", &ctx.config.schedule.housekeeping),
        ("expire", &ctx.config.schedule.expire),
        ("prune", &ctx.config.schedule.prune),
        ("reconcile", &ctx.config.schedule.reconcile),
    ];
    if ctx.config.schedule.remind_days_before > 0 {
        sweeps.push(("remind", &ctx.config.schedule.remind));
    }
    for (job, cron) in sweeps {
        let schedule: cron::Schedule = cron.parse()?;
        let sweep_ctx = ctx.clone();
        let sweep_queues = queues.clone();
        monitor = monitor.register(move |_| {
            WorkerBuilder::new(worker_name(&format!("sweep-{job}")))
                .backend(CronScheduler::new(schedule.clone()))
                .data(Sweep(job))
                .data(sweep_ctx.clone())
                .data(sweep_queues.clone())
                .build(sweep_tick)
        });
    }
    tracing::info!(
        concurrency,
        batch_size = ctx.config.worker.batch_size,
        window = ctx.config.worker.window,
        "worker running"
    );
    let stop_feeding = stop.clone();
    let result = monitor
        .run_with_signal(async move {
            shutdown.await;
            // Feed no more; what is queued stays leased until it lapses.
            let _ = stop_feeding.send(true);
            Ok(())
        })
        .await;
    let _ = stop.send(true);
    for feeder in feeders {
        let _ = feeder.await;
    }
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// What apalis does to a job when its queue worker restarts: drops its
    /// future partway. The batch inside goes on to its end.
    #[tokio::test]
    async fn a_batch_goes_on_to_its_end_when_its_job_is_dropped() {
        let (finished, finishing) = tokio::sync::oneshot::channel();
        let job = super::uncancelled(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = finished.send(());
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), job)
                .await
                .is_err(),
            "the job was dropped before its batch finished"
        );
        tokio::time::timeout(Duration::from_secs(5), finishing)
            .await
            .expect("the batch finished after its job was dropped")
            .expect("the batch ran to its end");
    }
}
