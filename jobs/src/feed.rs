//! Feeding ready work from Postgres into the bounded Redis window. Each
//! round leases up to as much ready work as the window has room for, under
//! one new token, and pushes it as jobs of `worker.batch_size` ids. Several
//! feeders (one per worker process) never lease the same row: the lease is
//! taken with `FOR UPDATE SKIP LOCKED` and holds until it lapses.
//!
//! Work is ready when it is unfinished, due, and not leased. So a backlog of
//! any size, a gift due next week and a retry's backoff all wait in
//! Postgres, and whatever Redis loses (a flush, a crash, a killed worker) is
//! ready again once its lease lapses.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::queue::Queues;

/// The kinds of work fed to the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Events,
    Deliveries,
    Reconciliations,
    /// Events for the platform, each to one endpoint.
    Platform,
}

impl Work {
    pub const ALL: [Work; 4] = [
        Work::Events,
        Work::Deliveries,
        Work::Reconciliations,
        Work::Platform,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Work::Events => "events",
            Work::Deliveries => "deliveries",
            Work::Reconciliations => "reconciliations",
            Work::Platform => "platform",
        }
    }

    /// Leases up to `limit` ready rows under `token` for `lease`; returns
    /// their ids, the longest-due first.
    async fn lease(
        self,
        pool: &PgPool,
        token: Uuid,
        limit: i64,
        lease: Duration,
    ) -> sqlx::Result<Vec<Uuid>> {
        let sql = match self {
            Work::Events => {
                "UPDATE webhook_inbox SET leased_until = now() + make_interval(secs => $3), lease_token = $2
                 WHERE id IN (SELECT id FROM webhook_inbox
                              WHERE status = 'pending' AND due_at <= now()
                                AND (leased_until IS NULL OR leased_until < now())
                              ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            }
            // A delivery left `sending` by a sender that died is ready again
            // once its claim lapses: email is at least once.
            Work::Deliveries => {
                "UPDATE email_delivery SET leased_until = now() + make_interval(secs => $3), lease_token = $2
                 WHERE id IN (SELECT id FROM email_delivery
                              WHERE status IN ('pending', 'sending') AND due_at <= now()
                                AND (leased_until IS NULL OR leased_until < now())
                              ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            }
            Work::Reconciliations => {
                "UPDATE reconciliation_run SET leased_until = now() + make_interval(secs => $3)
                 WHERE id IN (SELECT id FROM reconciliation_run
                              WHERE status = 'queued' AND $2::uuid IS NOT NULL
                                AND (leased_until IS NULL OR leased_until < now())
                              ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id"
            }
            // A code's events go out in order: its next delivery to an
            // endpoint is ready only once no earlier one is pending there.
            // Deliveries to a disabled endpoint wait.
            Work::Platform => {
                "UPDATE platform_delivery SET leased_until = now() + make_interval(secs => $3), lease_token = $2
                 WHERE id IN (SELECT d.id FROM platform_delivery d
                              JOIN platform_endpoint ep ON ep.id = d.endpoint_id AND ep.disabled_at IS NULL
                              WHERE d.status = 'pending' AND d.due_at <= now()
                                AND (d.leased_until IS NULL OR d.leased_until < now())
                                AND (d.code_id IS NULL OR NOT EXISTS (
                                    SELECT 1 FROM platform_delivery p
                                    WHERE p.endpoint_id = d.endpoint_id AND p.code_id = d.code_id
                                      AND p.status = 'pending' AND p.seq < d.seq))
                              ORDER BY d.due_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED)
                 RETURNING id"
            }
        };
        let mut ids: Vec<Uuid> = sqlx::query_scalar(sql)
            .bind(limit)
            .bind(token)
            .bind(lease.as_secs_f64())
            .fetch_all(pool)
            .await?;
        // Ids come back in no particular order; v7 ids sort by creation.
        ids.sort_unstable();
        Ok(ids)
    }

    /// Gives back a lease that was never pushed (Redis refused), so the work
    /// is ready again at once rather than when the lease lapses.
    async fn release(self, pool: &PgPool, token: Uuid, ids: &[Uuid]) -> sqlx::Result<()> {
        let sql = match self {
            Work::Events => {
                "UPDATE webhook_inbox SET leased_until = NULL, lease_token = NULL
                 WHERE id = ANY($1) AND lease_token = $2"
            }
            Work::Deliveries => {
                "UPDATE email_delivery SET leased_until = NULL, lease_token = NULL
                 WHERE id = ANY($1) AND lease_token = $2 AND status = 'pending'"
            }
            Work::Reconciliations => {
                "UPDATE reconciliation_run SET leased_until = NULL
                 WHERE id = ANY($1) AND status = 'queued' AND $2::uuid IS NOT NULL"
            }
            Work::Platform => {
                "UPDATE platform_delivery SET leased_until = NULL, lease_token = NULL
                 WHERE id = ANY($1) AND lease_token = $2 AND status = 'pending'"
            }
        };
        sqlx::query(sql).bind(ids).bind(token).execute(pool).await?;
        Ok(())
    }
}

/// How much ready work of a kind waits (due, unfinished, leased or not), and
/// how long the oldest of it has been due, in seconds: what operations watch
/// during a sale or an outage.
pub async fn backlog(pool: &PgPool, work: Work) -> sqlx::Result<(i64, f64)> {
    let sql = match work {
        Work::Events => {
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(due_at)), 0)::float8
             FROM webhook_inbox WHERE status = 'pending' AND due_at <= now()"
        }
        Work::Deliveries => {
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(due_at)), 0)::float8
             FROM email_delivery WHERE status IN ('pending', 'sending') AND due_at <= now()"
        }
        Work::Reconciliations => {
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
             FROM reconciliation_run WHERE status = 'queued'"
        }
        // Age since the oldest undelivered event was written, not since it
        // was last due: how far behind the platform is.
        Work::Platform => return crate::platform_event::log::backlog(pool).await,
    };
    sqlx::query_as(sql).fetch_one(pool).await
}

/// How a feeder feeds.
#[derive(Debug, Clone, Copy)]
pub struct FeedSettings {
    /// Ids per job.
    pub batch_size: u32,
    /// Jobs a queue may hold waiting.
    pub window: u32,
    pub lease: Duration,
}

/// What one round fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fed {
    pub jobs: usize,
    pub ids: usize,
    /// The round leased all it had room for: there may be more ready now.
    pub full: bool,
}

/// One feeding round for `work`: leases as much ready work as the queue's
/// window has room for and pushes it.
pub async fn feed(
    pool: &PgPool,
    queues: &Queues,
    work: Work,
    settings: FeedSettings,
) -> anyhow::Result<Fed> {
    // A reconciliation run is one job; they are long, so few wait.
    let (batch, window) = match work {
        Work::Reconciliations => (1, settings.window.clamp(1, 4)),
        _ => (settings.batch_size, settings.window),
    };
    let config = match work {
        Work::Events => queues.events.get_config(),
        Work::Deliveries => queues.deliveries.get_config(),
        Work::Reconciliations => queues.reconciliations.get_config(),
        Work::Platform => queues.platform.get_config(),
    };
    let waiting = queues.waiting(config).await?;
    let room = u64::from(window).saturating_sub(waiting);
    if room == 0 {
        return Ok(Fed::default());
    }
    let limit = room * u64::from(batch);
    let token = Uuid::now_v7();
    let ids = work
        .lease(pool, token, limit as i64, settings.lease)
        .await?;
    if ids.is_empty() {
        return Ok(Fed::default());
    }
    let batches: Vec<Vec<Uuid>> = ids.chunks(batch as usize).map(<[Uuid]>::to_vec).collect();
    let jobs = batches.len();
    let pushed = match work {
        Work::Events => queues.push_events(token, batches).await,
        Work::Deliveries => queues.push_deliveries(token, batches).await,
        Work::Reconciliations => queues.push_reconciliations(ids.clone()).await,
        Work::Platform => queues.push_platform(token, batches).await,
    };
    if let Err(e) = pushed {
        // Best effort: if this fails too, the lease lapses on its own.
        let _ = work.release(pool, token, &ids).await;
        return Err(e);
    }
    metrics::counter!("entitle_fed_total", "queue" => work.as_str()).increment(ids.len() as u64);
    Ok(Fed {
        jobs,
        ids: ids.len(),
        full: ids.len() as u64 == limit,
    })
}

/// Leases work for this process to do at once, bypassing Redis (for work an
/// operator or a reconciliation run wants done now); returns the token and
/// the ids that were ready.
pub async fn lease_now(
    pool: &PgPool,
    work: Work,
    ids: &[Uuid],
    lease: Duration,
) -> sqlx::Result<(Uuid, Vec<Uuid>)> {
    let token = Uuid::now_v7();
    let sql = match work {
        Work::Events => {
            "UPDATE webhook_inbox SET leased_until = now() + make_interval(secs => $3), lease_token = $2
             WHERE id = ANY($1) AND status = 'pending'
               AND (leased_until IS NULL OR leased_until < now())
             RETURNING id"
        }
        Work::Deliveries => {
            "UPDATE email_delivery SET leased_until = now() + make_interval(secs => $3), lease_token = $2
             WHERE id = ANY($1) AND status IN ('pending', 'sending') AND due_at <= now()
               AND (leased_until IS NULL OR leased_until < now())
             RETURNING id"
        }
        Work::Reconciliations => {
            "UPDATE reconciliation_run SET leased_until = now() + make_interval(secs => $3)
             WHERE id = ANY($1) AND status = 'queued' AND $2::uuid IS NOT NULL
             RETURNING id"
        }
        Work::Platform => {
            "UPDATE platform_delivery SET leased_until = now() + make_interval(secs => $3), lease_token = $2
             WHERE id = ANY($1) AND status = 'pending'
               AND (leased_until IS NULL OR leased_until < now())
             RETURNING id"
        }
    };
    let leased = sqlx::query_scalar(sql)
        .bind(ids)
        .bind(token)
        .bind(lease.as_secs_f64())
        .fetch_all(pool)
        .await?;
    Ok((token, leased))
}
