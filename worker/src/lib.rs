//! Entitle's worker: apalis workers on Redis that process webhook events into
//! orders and codes, and send email deliveries. Run as many processes as
//! needed; every job is idempotent.

use std::{future::Future, time::Duration};

use apalis::{
    layers::retry::{
        HasherRng,
        backoff::{ExponentialBackoffMaker, MakeBackoff},
    },
    prelude::*,
};
use apalis_cron::{CronScheduler, Tick};
use entitle_jobs::{
    Context,
    delivery::Attempt,
    handlers,
    queue::{ProcessEvent, RunReconciliation, SendDelivery},
    reconcile, sweep,
};
use futures::{FutureExt, future::BoxFuture};
use poll::EveryInterval;

mod poll;

/// A worker name unique to this process, as apalis requires when several
/// processes serve one queue.
pub fn worker_name(role: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{role}-{}-{}", std::process::id(), &id[..8])
}

async fn process_event(job: ProcessEvent, ctx: Data<Context>) -> Result<(), BoxDynError> {
    handlers::process_event(&ctx, job.inbox_id).await?;
    Ok(())
}

async fn send_delivery(job: SendDelivery, ctx: Data<Context>) -> Result<(), BoxDynError> {
    match handlers::send_delivery(&ctx, job.delivery_id).await? {
        // A delivery not yet due was scheduled again for its time.
        Attempt::Sent | Attempt::NothingToDo | Attempt::Failed | Attempt::NotDue(_) => Ok(()),
    }
}

async fn run_reconciliation(job: RunReconciliation, ctx: Data<Context>) -> Result<(), BoxDynError> {
    reconcile::execute(&ctx, job.run_id).await?;
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

/// Which sweep a cron worker runs.
#[derive(Debug, Clone, Copy)]
struct Sweep(&'static str);

async fn sweep_tick(
    tick: Tick,
    which: Data<Sweep>,
    ctx: Data<Context>,
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
        "requeue" => {
            sweep::requeue(
                &ctx,
                Duration::from_secs(schedule.requeue_after_secs),
                batch,
            )
            .await
        }
        "expire" => sweep::expire(&ctx.pool, batch).await,
        "reconcile" => reconcile::scheduled(&ctx).await,
        "remind" => {
            let reminded = sweep::remind(
                &ctx.pool,
                &ctx.config.email.message_id_domain,
                schedule.remind_days_before,
                batch,
            )
            .await;
            match reminded {
                Ok((summary, deliveries)) => {
                    for delivery in deliveries {
                        handlers::enqueue_delivery(&ctx, delivery, chrono::Utc::now()).await;
                    }
                    Ok(summary)
                }
                Err(e) => Err(e),
            }
        }
        _ => match sweep::prune(&ctx.pool, schedule.retention_days, batch).await {
            Ok(mut summary) => {
                let retention = Duration::from_secs(schedule.finished_jobs_retention_secs);
                let vacuumed = ctx.queues.vacuum(retention).await?;
                summary["finished_jobs_removed"] = vacuumed.into();
                Ok(summary)
            }
            Err(e) => Err(e),
        },
    };
    let summary = match &outcome {
        Ok(summary) => summary.clone(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    sweep::finish_tick(&ctx.pool, job, at, summary).await?;
    outcome?;
    Ok(())
}

/// Runs every worker until `shutdown` resolves, then lets running jobs finish
/// (up to 30 s) and returns.
pub async fn run(
    ctx: Context,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let concurrency = ctx.config.worker.concurrency;
    let retries = ctx.config.worker.retry_attempts;
    let (min, max) = ctx.config.retry_backoff();
    let backoff = move || {
        ExponentialBackoffMaker::new(min, max, 0.5, HasherRng::default())
            .expect("backoff bounds validated with the configuration")
            .make_backoff()
    };
    // A push from another process (the gateway) does not wake this worker,
    // so idle workers look for new jobs at this interval.
    let poll = Duration::from_millis(ctx.config.worker.poll_interval_ms);
    let events = ctx.queues.events.clone();
    let deliveries = ctx.queues.deliveries.clone();
    let reconciliations = ctx.queues.reconciliations.clone();
    let event_ctx = ctx.clone();
    let delivery_ctx = ctx.clone();
    let reconcile_ctx = ctx.clone();
    let event_backoff = backoff;
    let monitor = Monitor::new()
        .register(move |restarts| {
            WorkerBuilder::new(worker_name("events"))
                .backend(
                    events
                        .clone()
                        .poll_with_strategy(EveryInterval::new(poll))
                        .before_start(pause_before(restarts)),
                )
                .concurrency(concurrency)
                .retry(RetryPolicy::retries(retries).with_backoff(event_backoff()))
                .parallelize(tokio::spawn)
                .data(event_ctx.clone())
                .build(process_event)
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
                .retry(RetryPolicy::retries(retries).with_backoff(backoff()))
                .parallelize(tokio::spawn)
                .data(delivery_ctx.clone())
                .build(send_delivery)
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
    let mut monitor = monitor;
    let mut sweeps = vec![
        ("requeue", &ctx.config.schedule.requeue),
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
        monitor = monitor.register(move |_| {
            WorkerBuilder::new(worker_name(&format!("sweep-{job}")))
                .backend(CronScheduler::new(schedule.clone()))
                .data(Sweep(job))
                .data(sweep_ctx.clone())
                .build(sweep_tick)
        });
    }
    tracing::info!(concurrency, retries, "worker running");
    monitor
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await?;
    Ok(())
}
