//! The job handlers, independent of the queue that runs them so tests can call
//! them directly. Each takes a batch of ids fed under a lease token, claims
//! what is still its to do, and records every outcome in Postgres: a job
//! never fails as a whole, since what it could not finish is retried from
//! Postgres (by the row's own backoff, or when its lease lapses).

use std::sync::atomic::{AtomicBool, Ordering};

use futures::{StreamExt, stream};
use uuid::Uuid;

use crate::{
    adjustment::{self, Kind},
    channel::{UNREADABLE, check_unit_cap, json_text, native, shopify, stripe},
    command::{Command, Purchase},
    context::Context,
    delivery::{self, Problem},
    email::SendError,
    error::JobError,
    feed::{self, Work},
    inbox::{self, Failure, Setback, StoredEvent},
    issuance::{self, BatchOutcome, IssueSettings},
    lease::LeaseKeeper,
    letter::{self, Rendered},
};

/// Channel API calls (Stripe's line items) made at once per batch.
const INTERPRET_AT_ONCE: usize = 8;

/// What a batch of events came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventsDone {
    pub claimed: usize,
    pub processed: usize,
    pub failed: usize,
    pub retrying: usize,
}

fn settings(ctx: &Context) -> IssueSettings<'_> {
    IssueSettings {
        message_id_domain: &ctx.config.email.message_id_domain,
        batch_size: ctx.config.worker.issue_batch_size,
        notify_revocations: ctx.config.email.notify_revocations,
    }
}

/// What the native channel's rules depend on, from the configuration.
pub fn native_limits(ctx: &Context) -> native::event::Limits {
    native::event::Limits {
        max_units_per_order: ctx.config.worker.max_units_per_order,
    }
}

/// Maps a channel's event to a command with the channel's adapter.
pub async fn interpret(
    ctx: &Context,
    channel: &str,
    event_type: &str,
    body: &str,
) -> Result<Command, JobError> {
    match channel {
        stripe::CHANNEL => ctx.stripe.interpret(body).await,
        shopify::CHANNEL => Ok(shopify::interpret(event_type, body)?),
        native::CHANNEL => Ok(native::interpret(body.as_bytes(), native_limits(ctx))?),
        other => Err(JobError::permanent(
            "channel_unknown",
            format!("no adapter for channel {other}"),
        )),
    }
}

/// Interprets a claimed event's stored body.
async fn interpret_stored(
    ctx: &Context,
    event: StoredEvent,
) -> (StoredEvent, Result<Command, JobError>) {
    let command = match event.body.as_deref() {
        // Filed failed at intake, then reopened by an operator: still nameless.
        Some(_) if event.event_type == UNREADABLE => Err(JobError::permanent(
            "event_malformed",
            "the event could not be named when it arrived (no event id or type)",
        )),
        Some(body) => match json_text(body) {
            Ok(text) => interpret(ctx, &event.channel, &event.event_type, text).await,
            Err(unusable) => Err(unusable.into()),
        },
        None => Err(JobError::permanent(
            "event_pruned",
            "the event's body was pruned before it was processed",
        )),
    };
    (event, command)
}

/// Whether a purchase is small enough for the batch path, or too large to
/// fulfil at all.
fn check_size(ctx: &Context, purchase: &Purchase) -> Result<bool, JobError> {
    let units: u64 = purchase.lines.iter().map(|l| u64::from(l.quantity)).sum();
    check_unit_cap(
        &purchase.channel_order_id,
        units,
        ctx.config.worker.max_units_per_order,
    )?;
    Ok(units <= u64::from(ctx.config.worker.issue_batch_size))
}

/// Sorts what became of each event into the failures and retries to record.
#[derive(Default)]
struct Outcomes {
    failures: Vec<Failure>,
    setbacks: Vec<Setback>,
    processed: usize,
}

impl Outcomes {
    fn record(&mut self, event: &StoredEvent, result: Result<(), JobError>) {
        match result {
            Ok(()) => self.processed += 1,
            Err(JobError::Permanent { code, detail }) => self.failures.push(Failure {
                id: event.id,
                code,
                detail,
            }),
            Err(JobError::Transient(e)) => self.setbacks.push(Setback {
                id: event.id,
                attempts: event.attempts,
                detail: format!("{e:#}"),
            }),
        }
    }
}

/// Processes a batch of webhook events fed under `token`: the ordinary
/// purchases together in one transaction, everything else one by one.
pub async fn process_events(
    ctx: &Context,
    token: Uuid,
    ids: &[Uuid],
) -> Result<EventsDone, JobError> {
    let lease = ctx.config.lease();
    let events = inbox::claim(&ctx.pool, token, ids, lease).await?;
    if events.is_empty() {
        return Ok(EventsDone::default());
    }
    let keeper = LeaseKeeper::start(
        ctx.pool.clone(),
        Work::Events,
        token,
        events.iter().map(|e| e.id).collect(),
        lease,
    );
    let interpreted: Vec<(StoredEvent, Result<Command, JobError>)> = stream::iter(events)
        .map(|event| interpret_stored(ctx, event))
        .buffered(INTERPRET_AT_ONCE)
        .collect()
        .await;
    let claimed = interpreted.len();
    let mut outcomes = Outcomes::default();
    let mut small = Vec::new();
    let mut one_by_one = Vec::new();
    for (event, command) in interpreted {
        match command {
            Err(e) => outcomes.record(&event, Err(e)),
            Ok(Command::Acknowledge { why }) => {
                let ignored = inbox::ignore(&ctx.pool, event.id, &why).await;
                outcomes.record(&event, ignored.map_err(JobError::from));
            }
            Ok(Command::Purchase(purchase)) => match check_size(ctx, &purchase) {
                Err(e) => outcomes.record(&event, Err(e)),
                Ok(true) => small.push((event, purchase)),
                Ok(false) => one_by_one.push((event, Command::Purchase(purchase))),
            },
            Ok(command) => one_by_one.push((event, command)),
        }
    }
    if !small.is_empty() {
        let batch: Vec<(Uuid, &Purchase)> = small.iter().map(|(e, p)| (e.id, &**p)).collect();
        match issuance::fulfil_many(&ctx.pool, &ctx.keys, &settings(ctx), &batch).await {
            Ok(results) => {
                for (id, outcome) in results {
                    let Some((event, purchase)) = small.iter().find(|(e, _)| e.id == id) else {
                        continue;
                    };
                    match outcome {
                        BatchOutcome::Fulfilled(_) | BatchOutcome::AlreadyDone => {
                            outcomes.record(event, Ok(()))
                        }
                        BatchOutcome::Failed(e) => outcomes.record(event, Err(e)),
                        BatchOutcome::NeedsSinglePath => {
                            one_by_one.push((event.clone(), Command::Purchase(purchase.clone())))
                        }
                    }
                }
            }
            // Some event's data was refused: try each alone to find which.
            Err(e) if e.is_permanent() => {
                tracing::info!(error = %e, events = small.len(), "batch refused; trying its events one by one");
                for (event, purchase) in small {
                    one_by_one.push((event, Command::Purchase(purchase)));
                }
            }
            Err(e) => {
                for (event, _) in &small {
                    outcomes.record(event, Err(JobError::Transient(anyhow::anyhow!("{e}"))));
                }
            }
        }
    }
    for (event, command) in one_by_one {
        let result = carry_out(ctx, &event, command).await;
        outcomes.record(&event, result);
    }
    keeper.stop().await;
    let done = EventsDone {
        claimed,
        processed: outcomes.processed,
        failed: outcomes.failures.len(),
        retrying: outcomes.setbacks.len(),
    };
    inbox::fail(&ctx.pool, &outcomes.failures).await?;
    inbox::retry_later(&ctx.pool, &outcomes.setbacks, &ctx.config.event_retries()).await?;
    tracing::debug!(?done, "event batch done");
    Ok(done)
}

/// Carries out one event's command on its own.
async fn carry_out(ctx: &Context, event: &StoredEvent, command: Command) -> Result<(), JobError> {
    let settings = settings(ctx);
    match command {
        Command::Purchase(purchase) => {
            issuance::fulfil(&ctx.pool, &ctx.keys, &settings, event.id, &purchase).await?;
        }
        Command::Refund(refund) => {
            adjustment::record(&ctx.pool, &settings, event.id, Kind::Refund, &refund).await?;
        }
        Command::Cancellation(cancellation) => {
            adjustment::record(
                &ctx.pool,
                &settings,
                event.id,
                Kind::Cancellation,
                &cancellation,
            )
            .await?;
        }
        Command::Acknowledge { why } => inbox::ignore(&ctx.pool, event.id, &why).await?,
    }
    Ok(())
}

/// Processes these events now, in this process, if they are ready (a
/// reconciliation run healing what it found); events leased to the queue are
/// left to it.
pub async fn process_now(ctx: &Context, ids: &[Uuid]) -> Result<EventsDone, JobError> {
    let (token, ready) = feed::lease_now(&ctx.pool, Work::Events, ids, ctx.config.lease()).await?;
    if ready.is_empty() {
        return Ok(EventsDone::default());
    }
    process_events(ctx, token, &ready).await
}

/// Whether this process last found the SMTP server unavailable: its next
/// success brings forward the emails waiting out a backoff because of it.
static SMTP_FAILING: AtomicBool = AtomicBool::new(false);

/// What a batch of deliveries came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveriesDone {
    pub claimed: usize,
    pub sent: usize,
    pub skipped: usize,
    pub failed: usize,
    pub retrying: usize,
}

/// Sends a batch of deliveries fed under `token`, `email.smtp_connections`
/// at a time; each is marked sent the moment the server accepts it.
pub async fn send_deliveries(
    ctx: &Context,
    token: Uuid,
    ids: &[Uuid],
) -> Result<DeliveriesDone, JobError> {
    let lease = ctx.config.lease();
    let delivery::Claim {
        token: held,
        deliveries: claimed,
    } = delivery::claim(&ctx.pool, token, ids, lease).await?;
    if claimed.is_empty() {
        return Ok(DeliveriesDone::default());
    }
    let keeper = LeaseKeeper::start(
        ctx.pool.clone(),
        Work::Deliveries,
        held,
        claimed.iter().map(|c| c.id).collect(),
        lease,
    );
    let mut done = DeliveriesDone {
        claimed: claimed.len(),
        ..DeliveriesDone::default()
    };
    let rendered = match letter::render_all(
        &ctx.pool,
        &ctx.keys,
        &ctx.mailer,
        ctx.config.email.bulk_threshold as usize,
        &claimed,
    )
    .await
    {
        Ok(rendered) => rendered,
        Err(e) => {
            keeper.stop().await;
            let problems = database_setbacks(claimed.iter(), format!("{e:#}"));
            delivery::retry_later(&ctx.pool, &problems, &ctx.config.delivery_retries()).await?;
            done.retrying = problems.len();
            return Ok(done);
        }
    };
    let mut failures = Vec::new();
    let mut setbacks = Vec::new();
    let mut letters = Vec::new();
    for (delivery, rendered) in claimed.iter().zip(rendered) {
        match rendered {
            Rendered::Letter(letter) => letters.push((delivery.clone(), letter)),
            Rendered::Nothing(why) => {
                delivery::skip(&ctx.pool, delivery.id, &why).await?;
                done.skipped += 1;
            }
            Rendered::Refused(code, detail) => failures.push(Problem {
                id: delivery.id,
                code,
                detail,
                attempts: delivery.attempts,
            }),
        }
    }
    let connections = ctx.config.email.smtp_connections as usize;
    let (accepted, to_record) = tokio::sync::mpsc::unbounded_channel();
    // The recorder's connection is taken before the first message goes, so
    // an accepted message never waits for a busy pool to be recorded.
    let recording = match delivery::recording_connections(&ctx.pool).await {
        Ok(lanes) => lanes,
        Err(e) => {
            keeper.stop().await;
            let problems = database_setbacks(letters.iter().map(|(c, _)| c), format!("{e:#}"));
            delivery::fail(&ctx.pool, &failures).await?;
            delivery::retry_later(&ctx.pool, &problems, &ctx.config.delivery_retries()).await?;
            done.failed = failures.len();
            done.retrying = problems.len();
            return Ok(done);
        }
    };
    let recorder = tokio::spawn(delivery::record_sent_as_accepted(
        ctx.pool.clone(),
        recording,
        to_record,
        lease,
    ));
    let results: Vec<_> = stream::iter(letters)
        .map(|(delivery, letter)| send_one(ctx, delivery, *letter, accepted.clone()))
        .buffer_unordered(connections)
        .collect()
        .await;
    drop(accepted);
    let recorded = recorder.await.unwrap_or(0);
    keeper.stop().await;
    for (delivery, sent) in results {
        match sent {
            Ok(()) => done.sent += 1,
            Err(SendError::Permanent(detail)) => failures.push(Problem {
                id: delivery.id,
                code: "recipient_refused",
                detail,
                attempts: delivery.attempts,
            }),
            Err(SendError::Transient(detail)) => setbacks.push(Problem {
                id: delivery.id,
                code: "smtp_unavailable",
                detail,
                attempts: delivery.attempts,
            }),
        }
    }
    metrics::counter!("entitle_emails_sent_total").increment(recorded);
    done.failed = failures.len();
    done.retrying = setbacks.len();
    if !setbacks.is_empty() {
        SMTP_FAILING.store(true, Ordering::Relaxed);
    } else if done.sent > 0 && SMTP_FAILING.swap(false, Ordering::Relaxed) {
        let due = delivery::retry_waiting_for_smtp(&ctx.pool).await?;
        tracing::info!(
            deliveries = due,
            "the SMTP server answers again; waiting emails are due now"
        );
    }
    delivery::fail(&ctx.pool, &failures).await?;
    delivery::retry_later(&ctx.pool, &setbacks, &ctx.config.delivery_retries()).await?;
    tracing::debug!(?done, "delivery batch done");
    Ok(done)
}

/// Deliveries that could not go because Postgres did not answer: each is
/// tried again after its backoff.
fn database_setbacks<'a>(
    deliveries: impl Iterator<Item = &'a delivery::Claimed>,
    detail: String,
) -> Vec<Problem> {
    deliveries
        .map(|c| Problem {
            id: c.id,
            code: "database_unavailable",
            detail: detail.clone(),
            attempts: c.attempts,
        })
        .collect()
}

/// Sends one letter; when the server accepts it, hands it at once to the
/// recorder: the shorter the gap between accepted and recorded, the rarer a
/// duplicate after a crash.
async fn send_one(
    ctx: &Context,
    delivery: delivery::Claimed,
    letter: crate::email::Letter,
    accepted: tokio::sync::mpsc::UnboundedSender<(Uuid, String)>,
) -> (delivery::Claimed, Result<(), SendError>) {
    let sent = ctx.mailer.send(letter).await.map(|reply| {
        let _ = accepted.send((delivery.id, reply));
    });
    (delivery, sent)
}

/// Puts failed events back to pending (after the cause, such as a missing
/// catalogue entry, was fixed): the feeder queues them within moments.
/// Returns their ids.
pub async fn retry_failed_events(
    ctx: &Context,
    filter: &inbox::RetryFilter,
    actor: &str,
    reason: &str,
) -> Result<Vec<Uuid>, JobError> {
    Ok(inbox::reopen_failed(&ctx.pool, filter, actor, reason).await?)
}
