//! The job handlers, independent of the queue that runs them so tests can call
//! them directly.

use uuid::Uuid;

use crate::{
    channel::stripe,
    command::Command,
    context::Context,
    delivery::{self, Attempt},
    error::JobError,
    inbox, issuance,
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
    let command = match event.channel.as_str() {
        stripe::CHANNEL => ctx.stripe.interpret(body).await?,
        other => {
            return Err(JobError::permanent(
                "channel_unknown",
                format!("no adapter for channel {other}"),
            ));
        }
    };
    match command {
        Command::Acknowledge { why } => {
            inbox::finish(&ctx.pool, inbox_id, "ignored", None, &why).await?;
        }
        Command::Purchase(purchase) => {
            let issued = issuance::fulfil(
                &ctx.pool,
                &ctx.keys,
                &ctx.config.email.message_id_domain,
                inbox_id,
                &purchase,
            )
            .await?;
            for delivery in issued.map(|i| i.deliveries).unwrap_or_default() {
                // If this fails the delivery stays pending in Postgres, where
                // the sweep finds it; the order itself is already safe.
                if let Err(e) = ctx.queues.send_delivery(delivery).await {
                    tracing::error!(%delivery, error = format!("{e:#}"), "delivery not enqueued");
                }
            }
        }
    }
    Ok(())
}

/// Sends one email delivery.
pub async fn send_delivery(ctx: &Context, delivery_id: Uuid) -> Result<Attempt, JobError> {
    delivery::send(&ctx.pool, &ctx.keys, &ctx.mailer, delivery_id).await
}
