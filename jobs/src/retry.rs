//! When failed work is tried again, and when it stops being tried: an
//! exponential backoff with jitter, and a cap on attempts after which the
//! work ends `failed` with its reason, for operations to see.

use std::time::Duration;

use rand::RngExt;

/// How one kind of work is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at this many the work fails.
    pub max_attempts: i32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// Whether work that has been attempted `attempts` times may try again.
    pub fn may_retry(&self, attempts: i32) -> bool {
        attempts < self.max_attempts
    }

    /// How long to wait after the `attempts`-th attempt failed: doubling from
    /// the minimum, capped, with up to half of it as random jitter so work
    /// that failed together does not retry together.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exponent = attempts.clamp(1, 30) as u32 - 1;
        let base = self
            .min_backoff
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max_backoff);
        let jitter = rand::rng().random_range(0.0..0.5);
        base.mul_f64(1.0 - jitter)
    }
}

/// Tries `write` while it fails because Postgres is unavailable
/// ([`crate::db::unavailable`]), until `patience` has passed: at once, then
/// after waits that double from 50 ms to 1 s; an attempt still running when
/// the patience ends is abandoned. For recording what another party has
/// already taken (an email the SMTP server accepted, an event the platform
/// answered): Postgres restarting for a second must not cost the record,
/// since the work's lease would then lapse and it would go again. Any other
/// error is returned at once. Logs `what` once, at the first failure.
pub async fn while_unavailable<T, Fut>(
    patience: Duration,
    what: &'static str,
    mut write: impl FnMut() -> Fut,
) -> sqlx::Result<T>
where
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut wait = FIRST_WAIT;
    loop {
        let e = match tokio::time::timeout_at(deadline, write()).await {
            Ok(Ok(written)) => return Ok(written),
            Ok(Err(e)) if crate::db::unavailable(&e) => e,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(sqlx::Error::PoolTimedOut),
        };
        if tokio::time::Instant::now() + wait >= deadline {
            return Err(e);
        }
        if wait == FIRST_WAIT {
            tracing::warn!(error = %e, "{what}; trying again");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

const FIRST_WAIT: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_below() {
        let policy = RetryPolicy {
            max_attempts: 5,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for (attempts, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (20, 1000),
        ] {
            let wait = policy.backoff(attempts).as_millis() as u64;
            assert!(
                wait <= full && wait >= full / 2,
                "{attempts}: {wait} ms not within {}..={full}",
                full / 2
            );
        }
        assert!(policy.may_retry(4));
        assert!(!policy.may_retry(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_is_tried_again_while_postgres_is_unavailable_for_its_patience() {
        let down = || sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into());
        let mut tries = 0;
        let written = while_unavailable(Duration::from_secs(2), "test write", || {
            tries += 1;
            let now = tries;
            async move { if now < 4 { Err(down()) } else { Ok(now) } }
        })
        .await;
        assert_eq!(written.unwrap(), 4);

        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let written: sqlx::Result<()> =
            while_unavailable(Duration::from_millis(500), "test write", || {
                tries += 1;
                async { Err(down()) }
            })
            .await;
        assert!(matches!(written, Err(sqlx::Error::Io(_))), "{written:?}");
        assert_eq!(started.elapsed(), Duration::from_millis(350));
        // At once, then after 50, 100 and 200 ms; a 400 ms wait would
        // outlast the patience.
        assert_eq!(tries, 4);

        // A write that hangs is abandoned when the patience ends.
        let started = tokio::time::Instant::now();
        let written: sqlx::Result<()> =
            while_unavailable(Duration::from_millis(500), "test write", || {
                std::future::pending()
            })
            .await;
        assert!(
            matches!(written, Err(sqlx::Error::PoolTimedOut)),
            "{written:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(500));

        // An error that is not an outage is not tried again.
        let mut tries = 0;
        let written: sqlx::Result<()> =
            while_unavailable(Duration::from_secs(2), "test write", || {
                tries += 1;
                async { Err(sqlx::Error::RowNotFound) }
            })
            .await;
        assert!(matches!(written, Err(sqlx::Error::RowNotFound)));
        assert_eq!(tries, 1);
    }
}
