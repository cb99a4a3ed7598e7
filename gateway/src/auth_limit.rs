//! Failed bearer authentications on the admin API, limited per client
//! address (`gateway.limits.failed_auth_per_minute_per_address`): past the
//! limit, every admin request from that address answers 429 `rate_limited`,
//! a good token too, so guessing learns nothing until the limit allows
//! another attempt. Counted in this process, like the platform API's limits.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex, Weak},
    time::Instant,
};

use axum::http::StatusCode;
use governor::{
    Quota, RateLimiter,
    clock::{Clock as _, DefaultClock},
    middleware::StateInformationMiddleware,
    state::keyed::DefaultKeyedStateStore,
};

use crate::{AppState, error::ApiError, platform::Gate};

/// Addresses remembered before the ones that are back to normal are
/// dropped, so a flood of addresses cannot grow memory for ever.
const MAX_ENTRIES: usize = 10_000;

type Limiter =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// One gateway's count of failed authentications per address.
pub struct FailedAuth {
    /// A cell per failure; the state tells when the last one is used.
    failures: Limiter,
    /// Addresses refused until then. governor cannot be asked without
    /// spending a cell, and a good token must not spend one.
    refused: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailedAuth {
    pub fn new(per_minute: u32) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN));
        Self {
            failures: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// Before any look-up: refused (429) while `address` is over the limit.
    pub fn admit(&self, address: Option<IpAddr>) -> Result<(), ApiError> {
        let Some(address) = address else {
            return Ok(());
        };
        let mut refused = self.refused.lock().expect("not poisoned");
        match refused.get(&address) {
            Some(until) if *until > Instant::now() => Err(too_many(*until)),
            Some(_) => {
                refused.remove(&address);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failed authentication from `address`. The one that uses the
    /// last attempt of the window is still answered for what it is (`Ok`);
    /// from then on the address is refused. `Err` (429) when it was over.
    pub fn failed(&self, address: Option<IpAddr>) -> Result<(), ApiError> {
        let Some(address) = address else {
            return Ok(());
        };
        if self.failures.len() > MAX_ENTRIES {
            self.failures.retain_recent();
        }
        let (until, over) = match self.failures.check_key(&address) {
            Ok(state) if state.remaining_burst_capacity() > 0 => return Ok(()),
            // The next attempt is allowed one interval from now at the
            // latest (sooner if the failures were spread over the minute).
            Ok(state) => (Instant::now() + state.quota().replenish_interval(), false),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                (Instant::now() + wait, true)
            }
        };
        tracing::warn!(%address, "failed admin API authentications over the limit");
        let mut refused = self.refused.lock().expect("not poisoned");
        if refused.len() >= MAX_ENTRIES {
            let now = Instant::now();
            refused.retain(|_, until| *until > now);
        }
        refused.insert(address, until);
        if over { Err(too_many(until)) } else { Ok(()) }
    }
}

fn too_many(until: Instant) -> ApiError {
    let wait = until.saturating_duration_since(Instant::now());
    // Whole seconds, rounded up: a client waiting this long is let in.
    let wait = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    metrics::counter!("entitle_admin_auth_rate_limited_total").increment(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many failed authentications from this address; retry in {wait} s"),
    )
    .retry_after(wait.max(1))
}

/// Each running gateway's [`FailedAuth`], found by its [`Gate`]. The
/// natural home is a field of the `Gate` (or of [`AppState`]); until then
/// it lives here, one per gateway, so two gateways in one process (as in the
/// tests) count apart. A `Weak` keeps its `Gate`'s allocation, so an
/// address never stands for two gateways.
static BY_GATE: Mutex<Vec<(Weak<Gate>, Arc<FailedAuth>)>> = Mutex::new(Vec::new());

/// The failed-authentication limit of the gateway `state` belongs to.
pub fn of(state: &AppState) -> Arc<FailedAuth> {
    let mut all = BY_GATE.lock().expect("not poisoned");
    if let Some((_, limit)) = all
        .iter()
        .find(|(gate, _)| std::ptr::eq(gate.as_ptr(), Arc::as_ptr(&state.platform)))
    {
        return limit.clone();
    }
    // Gateways that stopped take their counts with them.
    all.retain(|(gate, _)| gate.strong_count() > 0);
    let limit = Arc::new(FailedAuth::new(
        state
            .ctx
            .config
            .gateway
            .limits
            .failed_auth_per_minute_per_address,
    ));
    all.push((Arc::downgrade(&state.platform), limit.clone()));
    limit
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HERE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn the_last_allowed_failure_is_answered_and_everything_after_refused() {
        let limit = FailedAuth::new(3);
        for _ in 0..3 {
            assert!(limit.admit(HERE).is_ok());
            assert!(limit.failed(HERE).is_ok());
        }
        let refused = limit.admit(HERE).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!((1..=20).contains(&refused.retry_after.unwrap()));
        // Another address is not affected.
        let there = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
        assert!(limit.admit(there).is_ok());
        // Without an address (no listener), nothing is counted.
        assert!(limit.failed(None).is_ok() && limit.admit(None).is_ok());
    }

    #[test]
    fn an_address_is_let_in_again_when_the_limit_allows() {
        // 600 a minute: one attempt back every 100 ms.
        let limit = FailedAuth::new(600);
        for _ in 0..600 {
            let _ = limit.failed(HERE);
        }
        assert!(limit.admit(HERE).is_err());
        std::thread::sleep(Duration::from_millis(150));
        assert!(limit.admit(HERE).is_ok());
    }
}
