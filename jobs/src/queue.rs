//! The job queues on Redis: a bounded window of ready work, fed from
//! Postgres in batches (see [`crate::feed`]). A job carries only ids and the
//! lease token they were fed under: Postgres holds everything else, so a
//! flushed Redis loses no data, and a backlog of any size waits in Postgres.
//!
//! apalis-redis 1.0 moves every due job out of its scheduled set with one
//! Lua `unpack`, which fails above about 8,000 jobs and then wedges the
//! queue for good. Every push passes through that set, so Entitle never lets
//! a queue grow near it: the feeder pushes only while a queue holds fewer
//! than `worker.window` jobs.

use std::time::Duration;

use anyhow::Context as _;
use apalis::prelude::TaskSink;
use apalis_redis::{Config as QueueConfig, ConnectionManager, RedisStorage};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::RedisConfig;

/// Process these webhook events, fed under `token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    pub token: Uuid,
    pub ids: Vec<Uuid>,
}

/// Send these email deliveries, fed under `token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryBatch {
    pub token: Uuid,
    pub ids: Vec<Uuid>,
}

/// Send these platform event deliveries, fed under `token`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformBatch {
    pub token: Uuid,
    pub ids: Vec<Uuid>,
}

/// Carry out one queued reconciliation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReconciliation {
    pub run_id: Uuid,
}

/// Handles to every queue, for the worker (the gateway never touches Redis).
#[derive(Debug, Clone)]
pub struct Queues {
    pub events: RedisStorage<EventBatch>,
    pub deliveries: RedisStorage<DeliveryBatch>,
    pub reconciliations: RedisStorage<RunReconciliation>,
    pub platform: RedisStorage<PlatformBatch>,
    conn: ConnectionManager,
}

/// How long Redis may take to answer before a call is abandoned.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// apalis' settings for one of our queues. Postgres leases are the truth, so
/// apalis' own locks are off; its pub/sub announcements have no listener. A
/// worker takes one job (a batch) per free slot, so jobs spread across
/// processes instead of piling up in one process's buffer.
fn queue_config(name: String) -> QueueConfig {
    QueueConfig::default()
        .queue(name)
        .batch_size(1)
        .lock_tasks(false)
        .emit_events(false)
        .heartbeat_interval(Duration::from_secs(10))
}

impl Queues {
    /// Connects to Redis; queue keys start with the configured namespace.
    /// The connection gives up on a call after two seconds and reconnects on
    /// its own.
    pub async fn connect(config: &RedisConfig) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(config.url.expose_secret()).context("Failed to read redis.url")?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let conn = tokio::time::timeout(
            REDIS_TIMEOUT * 2,
            client.get_connection_manager_with_config(manager),
        )
        .await
        .context("Redis did not answer (redis.url)")?
        .context("Failed to connect to Redis (redis.url)")?;
        let ns = &config.namespace;
        Ok(Self {
            events: RedisStorage::new(conn.clone())
                .with_config(queue_config(format!("{ns}:events:v2"))),
            deliveries: RedisStorage::new(conn.clone())
                .with_config(queue_config(format!("{ns}:deliveries:v2"))),
            reconciliations: RedisStorage::new(conn.clone())
                .with_config(queue_config(format!("{ns}:reconciliations:v2"))),
            platform: RedisStorage::new(conn.clone())
                .with_config(queue_config(format!("{ns}:platform:v1"))),
            conn,
        })
    }

    /// The apalis configuration of each queue.
    fn configs(&self) -> [&QueueConfig; 4] {
        [
            self.events.get_config(),
            self.deliveries.get_config(),
            self.reconciliations.get_config(),
            self.platform.get_config(),
        ]
    }

    /// Pushes event batches, each fed under `token`.
    pub async fn push_events(&self, token: Uuid, batches: Vec<Vec<Uuid>>) -> anyhow::Result<()> {
        let jobs = batches
            .into_iter()
            .map(|ids| EventBatch { token, ids })
            .collect();
        self.events
            .clone()
            .push_bulk(jobs)
            .await
            .context("Failed to enqueue webhook events")
    }

    /// Pushes delivery batches, each fed under `token`.
    pub async fn push_deliveries(
        &self,
        token: Uuid,
        batches: Vec<Vec<Uuid>>,
    ) -> anyhow::Result<()> {
        let jobs = batches
            .into_iter()
            .map(|ids| DeliveryBatch { token, ids })
            .collect();
        self.deliveries
            .clone()
            .push_bulk(jobs)
            .await
            .context("Failed to enqueue email deliveries")
    }

    /// Pushes platform delivery batches, each fed under `token`.
    pub async fn push_platform(&self, token: Uuid, batches: Vec<Vec<Uuid>>) -> anyhow::Result<()> {
        let jobs = batches
            .into_iter()
            .map(|ids| PlatformBatch { token, ids })
            .collect();
        self.platform
            .clone()
            .push_bulk(jobs)
            .await
            .context("Failed to enqueue platform events")
    }

    /// Pushes queued reconciliation runs.
    pub async fn push_reconciliations(&self, runs: Vec<Uuid>) -> anyhow::Result<()> {
        let jobs = runs
            .into_iter()
            .map(|run_id| RunReconciliation { run_id })
            .collect();
        self.reconciliations
            .clone()
            .push_bulk(jobs)
            .await
            .context("Failed to enqueue reconciliation runs")
    }

    /// Jobs waiting in a queue: pushed and not yet taken by a worker.
    pub async fn waiting(&self, queue: &QueueConfig) -> anyhow::Result<u64> {
        let mut conn = self.conn.clone();
        let (active, scheduled): (u64, u64) = redis::pipe()
            .cmd("LLEN")
            .arg(queue.active_jobs_list())
            .cmd("ZCARD")
            .arg(queue.scheduled_jobs_set())
            .query_async(&mut conn)
            .await
            .context("Failed to measure a queue")?;
        Ok(active + scheduled)
    }

    /// Forgets jobs that ended (done, failed or killed) more than
    /// `older_than` ago; apalis keeps them otherwise, and Redis would grow
    /// for ever. Postgres keeps the record of what was done. Returns how
    /// many were forgotten.
    pub async fn vacuum(&self, older_than: Duration) -> anyhow::Result<usize> {
        use apalis_core::backend::Vacuum as _;
        let failed = "Failed to vacuum finished jobs";
        let removed = self
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
                .context(failed)?
            + self
                .platform
                .clone()
                .vacuum_before(older_than)
                .await
                .context(failed)?;
        // apalis also adds every finished job's id to a set it never trims;
        // nothing reads it.
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for queue in self.configs() {
            pipe.cmd("DEL").arg(queue.done_jobs_set()).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.context(failed)?;
        Ok(removed)
    }

    /// Removes the registrations of workers that stopped sending heartbeats
    /// `silent_for` ago (crashed or killed processes; a clean stop removes
    /// its own), with what they held: the jobs they held are not lost, since
    /// their Postgres leases lapse and the work is fed again. Returns how
    /// many were removed.
    pub async fn forget_dead_workers(&self, silent_for: Duration) -> anyhow::Result<usize> {
        let mut conn = self.conn.clone();
        let cutoff = chrono::Utc::now().timestamp() - silent_for.as_secs() as i64;
        let mut forgotten = 0;
        for queue in self.configs() {
            let dead: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(queue.workers_set())
                .arg("-inf")
                .arg(cutoff)
                .query_async(&mut conn)
                .await
                .context("Failed to list worker registrations")?;
            if dead.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for name in &dead {
                pipe.cmd("DEL")
                    .arg(format!("{}:{name}", queue.inflight_jobs_set()))
                    .ignore()
                    .cmd("DEL")
                    .arg(format!("{}:workers:metadata:{name}", queue.queue.as_ref()))
                    .ignore()
                    .cmd("ZREM")
                    .arg(queue.workers_set())
                    .arg(name)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .context("Failed to remove worker registrations")?;
            forgotten += dead.len();
        }
        Ok(forgotten)
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
