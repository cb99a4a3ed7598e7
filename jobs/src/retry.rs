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
}
