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
use entitle_jobs::{
    Context,
    delivery::Attempt,
    handlers,
    queue::{ProcessEvent, SendDelivery},
};

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
    let event_ctx = ctx.clone();
    let delivery_ctx = ctx.clone();
    let event_backoff = backoff;
    let monitor = Monitor::new()
        .register(move |_| {
            WorkerBuilder::new(worker_name("events"))
                .backend(events.clone().poll_with_interval(poll))
                .concurrency(concurrency)
                .retry(RetryPolicy::retries(retries).with_backoff(event_backoff()))
                .parallelize(tokio::spawn)
                .data(event_ctx.clone())
                .build(process_event)
        })
        .register(move |_| {
            WorkerBuilder::new(worker_name("deliveries"))
                .backend(deliveries.clone().poll_with_interval(poll))
                .concurrency(concurrency)
                .retry(RetryPolicy::retries(retries).with_backoff(backoff()))
                .parallelize(tokio::spawn)
                .data(delivery_ctx.clone())
                .build(send_delivery)
        })
        .shutdown_timeout(Duration::from_secs(30));
    tracing::info!(concurrency, retries, "worker running");
    monitor
        .run_with_signal(async move {
            shutdown.await;
            Ok(())
        })
        .await?;
    Ok(())
}
