//! Keeping a lease while work takes long: a claimed batch renews its rows'
//! leases every third of the lease, so a slow SMTP server or channel API
//! never lets them lapse (and be fed again) while the batch is still at
//! them, yet a worker that dies lets them go within one lease.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::feed::Work;

/// Renews the leases of a claimed batch until stopped (or dropped).
#[derive(Debug)]
pub struct LeaseKeeper {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Starts renewing the leases of `ids`, held under `token`, for `lease`
    /// at a time.
    pub fn start(pool: PgPool, work: Work, token: Uuid, ids: Vec<Uuid>, lease: Duration) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let every = lease / 3;
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(e) = renew(&pool, work, token, &ids, lease).await {
                    tracing::warn!(error = %e, queue = work.as_str(), "a lease could not be renewed");
                }
            }
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops renewing (the work is done, or recorded as not done).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn renew(
    pool: &PgPool,
    work: Work,
    token: Uuid,
    ids: &[Uuid],
    lease: Duration,
) -> sqlx::Result<()> {
    let sql = match work {
        Work::Events => {
            "UPDATE webhook_inbox SET leased_until = now() + make_interval(secs => $3)
             WHERE id = ANY($1) AND lease_token = $2 AND status = 'pending'"
        }
        Work::Deliveries => {
            "UPDATE email_delivery SET leased_until = now() + make_interval(secs => $3)
             WHERE id = ANY($1) AND lease_token = $2 AND status IN ('pending', 'sending')"
        }
        Work::Platform => {
            "UPDATE platform_delivery SET leased_until = now() + make_interval(secs => $3)
             WHERE id = ANY($1) AND lease_token = $2 AND status = 'pending'"
        }
        Work::Reconciliations => return Ok(()),
    };
    sqlx::query(sql)
        .bind(ids)
        .bind(token)
        .bind(lease.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}
