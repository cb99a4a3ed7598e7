//! The job queues on Redis. A job carries only ids: Postgres holds everything
//! else, so a flushed Redis loses no data.

use anyhow::Context as _;
use apalis::prelude::{TaskBuilder, TaskSink};
use apalis_redis::{Config as QueueConfig, ConnectionManager, RedisStorage};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::RedisConfig;

/// Process one stored webhook event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEvent {
    pub inbox_id: Uuid,
}

/// Send one email delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendDelivery {
    pub delivery_id: Uuid,
}

/// Carry out one queued reconciliation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReconciliation {
    pub run_id: Uuid,
}

/// Handles to every queue, for whoever enqueues (gateway, worker).
#[derive(Debug, Clone)]
pub struct Queues {
    pub events: RedisStorage<ProcessEvent>,
    pub deliveries: RedisStorage<SendDelivery>,
    pub reconciliations: RedisStorage<RunReconciliation>,
    conn: ConnectionManager,
}

impl Queues {
    /// Connects to Redis; queue keys start with the configured namespace.
    pub async fn connect(config: &RedisConfig) -> anyhow::Result<Self> {
        let conn = apalis_redis::connect(config.url.expose_secret())
            .await
            .context("Failed to connect to Redis (redis.url)")?;
        let ns = &config.namespace;
        Ok(Self {
            events: RedisStorage::new(conn.clone())
                .with_config(QueueConfig::default().queue(format!("{ns}:events"))),
            deliveries: RedisStorage::new(conn.clone())
                .with_config(QueueConfig::default().queue(format!("{ns}:deliveries"))),
            reconciliations: RedisStorage::new(conn.clone())
                .with_config(QueueConfig::default().queue(format!("{ns}:reconciliations"))),
            conn,
        })
    }

    /// Enqueues processing of a stored webhook event.
    pub async fn process_event(&self, inbox_id: Uuid) -> anyhow::Result<()> {
        self.events
            .clone()
            .push(ProcessEvent { inbox_id })
            .await
            .context("Failed to enqueue a webhook event")
    }

    /// Enqueues a queued reconciliation run.
    pub async fn run_reconciliation(&self, run_id: Uuid) -> anyhow::Result<()> {
        self.reconciliations
            .clone()
            .push(RunReconciliation { run_id })
            .await
            .context("Failed to enqueue a reconciliation run")
    }

    /// Enqueues sending of a delivery.
    pub async fn send_delivery(&self, delivery_id: Uuid) -> anyhow::Result<()> {
        self.deliveries
            .clone()
            .push(SendDelivery { delivery_id })
            .await
            .context("Failed to enqueue an email delivery")
    }

    /// Enqueues sending of a delivery that is due at `due`. The schedule lives
    /// in Redis, so it survives worker restarts.
    pub async fn send_delivery_at(
        &self,
        delivery_id: Uuid,
        due: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        // The queue counts whole seconds: round up, so the job does not run
        // (and find the delivery not yet due) up to a second early.
        let secs = due.timestamp() + i64::from(due.timestamp_subsec_nanos() > 0);
        let task = TaskBuilder::new(SendDelivery { delivery_id })
            .run_at_timestamp(secs.max(0) as u64)
            .build();
        self.deliveries
            .clone()
            .push_task(task)
            .await
            .context("Failed to schedule an email delivery")
    }

    /// Forgets jobs that ended (done, failed or killed) more than
    /// `older_than` ago; apalis keeps them otherwise, and Redis would grow
    /// for ever. Postgres keeps the record of what was done. Returns how
    /// many were forgotten.
    pub async fn vacuum(&self, older_than: std::time::Duration) -> anyhow::Result<usize> {
        use apalis_core::backend::Vacuum as _;
        let failed = "Failed to vacuum finished jobs";
        Ok(self
            .events
            .clone()
            .vacuum_before(older_than)
            .await
            .context(failed)?
            + self
                .deliveries
                .clone()
                .vacuum_before(older_than)
                .await
                .context(failed)?
            + self
                .reconciliations
                .clone()
                .vacuum_before(older_than)
                .await
                .context(failed)?)
    }

    /// Round-trips a PING, for readiness checks.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .context("Redis did not answer PING")?;
        Ok(())
    }
}
