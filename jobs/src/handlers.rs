//! The job handlers, independent of the queue that runs them so tests can call
//! them directly.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    adjustment::{self, Kind},
    channel::{native, shopify, stripe},
    command::Command,
    context::Context,
    delivery::{self, Attempt},
    error::JobError,
    inbox,
    issuance::{self, IssueSettings},
};

/// Processes one stored webhook event: maps it to a command and carries it
/// out. Permanent failures are recorded on the event and end the job;
/// transient ones are noted and returned for a retry.
pub async fn process_event(ctx: &Context, inbox_id: Uuid) -> Result<(), JobError> {
    let result = run_event(ctx, inbox_id).await;
    match &result {
        Ok(()) => {}
        Err(JobError::Permanent { code, detail }) => {
            tracing::warn!(%inbox_id, code, %detail, "webhook event failed permanently");
            metrics::counter!("entitle_events_failed_total", "code" => *code).increment(1);
            inbox::finish(&ctx.pool, inbox_id, "failed", Some(code), detail).await?;
            return Ok(());
        }
        Err(JobError::Transient(e)) => {
            tracing::warn!(%inbox_id, error = format!("{e:#}"), "webhook event will be retried");
            // Best effort: the database may be what failed.
            let _ = inbox::note_transient_failure(&ctx.pool, inbox_id, &format!("{e:#}")).await;
        }
    }
    result
}

async fn run_event(ctx: &Context, inbox_id: Uuid) -> Result<(), JobError> {
    let Some(event) = inbox::load(&ctx.pool, inbox_id).await? else {
        return Err(JobError::permanent("event_missing", "no such inbox event"));
    };
    if event.status != "pending" {
        return Ok(());
    }
    let Some(body) = event.body.as_deref() else {
        return Err(JobError::permanent(
            "event_pruned",
            "the event's body was pruned before it was processed",
        ));
    };
    let command = interpret(ctx, &event.channel, &event.event_type, body).await?;
    let settings = IssueSettings {
        message_id_domain: &ctx.config.email.message_id_domain,
        batch_size: ctx.config.worker.issue_batch_size,
        notify_revocations: ctx.config.email.notify_revocations,
    };
    let deliveries = match command {
        Command::Acknowledge { why } => {
            inbox::finish(&ctx.pool, inbox_id, "ignored", None, &why).await?;
            Vec::new()
        }
        Command::Purchase(purchase) => {
            issuance::fulfil(&ctx.pool, &ctx.keys, &settings, inbox_id, &purchase)
                .await?
                .map(|issued| issued.deliveries)
                .unwrap_or_default()
        }
        Command::Refund(refund) => {
            adjustment::record(&ctx.pool, &settings, inbox_id, Kind::Refund, &refund).await?
        }
        Command::Cancellation(cancellation) => {
            adjustment::record(
                &ctx.pool,
                &settings,
                inbox_id,
                Kind::Cancellation,
                &cancellation,
            )
            .await?
        }
    };
    for (delivery, due) in deliveries {
        enqueue_delivery(ctx, delivery, due).await;
    }
    Ok(())
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
        shopify::CHANNEL => shopify::interpret(event_type, body),
        native::CHANNEL => native::interpret(event_type, body),
        other => Err(JobError::permanent(
            "channel_unknown",
            format!("no adapter for channel {other}"),
        )),
    }
}

/// Enqueues a delivery for when it is due. If Redis fails the delivery stays
/// pending in Postgres, where the sweep finds it; nothing is lost.
pub async fn enqueue_delivery(ctx: &Context, delivery: Uuid, due: DateTime<Utc>) {
    let result = if due > Utc::now() {
        ctx.queues.send_delivery_at(delivery, due).await
    } else {
        ctx.queues.send_delivery(delivery).await
    };
    if let Err(e) = result {
        tracing::error!(%delivery, error = format!("{e:#}"), "delivery not enqueued");
    }
}

/// Sends one email delivery; one that is not due yet is enqueued again for
/// its time.
pub async fn send_delivery(ctx: &Context, delivery_id: Uuid) -> Result<Attempt, JobError> {
    let attempt = delivery::send(
        &ctx.pool,
        &ctx.keys,
        &ctx.mailer,
        ctx.config.email.bulk_threshold as usize,
        delivery_id,
    )
    .await?;
    if let Attempt::NotDue(due) = attempt {
        ctx.queues.send_delivery_at(delivery_id, due).await?;
    }
    Ok(attempt)
}

/// Puts failed events back to pending and enqueues them (after the cause,
/// such as a missing catalogue entry, was fixed). Returns their ids.
pub async fn retry_failed_events(
    ctx: &Context,
    filter: &inbox::RetryFilter,
    actor: &str,
    reason: &str,
) -> Result<Vec<Uuid>, JobError> {
    let ids = inbox::reopen_failed(&ctx.pool, filter, actor, reason).await?;
    for id in &ids {
        ctx.queues.process_event(*id).await?;
    }
    Ok(ids)
}
