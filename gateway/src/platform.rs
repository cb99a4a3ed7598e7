//! Who is calling the platform API (`/v1`): a platform key, checked by its
//! keyed hash and cached for a few seconds, so the hot path costs no
//! database query; and the rate limits per key and per client address.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::RwLock,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{StatusCode, request::Parts},
};
use entitle_jobs::{
    config::GatewayConfig,
    platform_key::{self, Caller},
    token,
};
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use uuid::Uuid;

use crate::{AppState, error::ApiError};

/// Keys (and addresses) remembered before entries are dropped, so a flood
/// of made-up keys or addresses cannot grow memory for ever.
const MAX_ENTRIES: usize = 10_000;

/// The gateway's verified keys and its limiters.
pub struct Gate {
    verified: RwLock<HashMap<Vec<u8>, (Caller, Instant)>>,
    trust_for: Duration,
    by_key: DefaultKeyedRateLimiter<Uuid>,
    by_address: DefaultKeyedRateLimiter<IpAddr>,
    redeem_page: DefaultKeyedRateLimiter<IpAddr>,
}

impl Gate {
    pub fn new(config: &GatewayConfig) -> Self {
        let limit = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        Self {
            verified: RwLock::new(HashMap::new()),
            trust_for: Duration::from_secs(config.platform_key_cache_secs),
            by_key: RateLimiter::keyed(Quota::per_second(limit(config.limits.per_key_per_second))),
            by_address: RateLimiter::keyed(Quota::per_second(limit(
                config.limits.per_address_per_second,
            ))),
            redeem_page: RateLimiter::keyed(Quota::per_minute(limit(
                config.limits.redeem_page_per_minute_per_address,
            ))),
        }
    }

    /// The caller a key belongs to, from the cache while it is fresh.
    async fn verify(&self, state: &AppState, key: &str) -> Result<Option<Caller>, ApiError> {
        let hash = platform_key::hash(&state.ctx.keys, key);
        if let Some((caller, at)) = self.verified.read().expect("not poisoned").get(&hash)
            && at.elapsed() < self.trust_for
        {
            return Ok(Some(caller.clone()));
        }
        let caller = platform_key::verify(&state.ctx.pool, &hash).await?;
        let mut verified = self.verified.write().expect("not poisoned");
        match &caller {
            Some(caller) => {
                if verified.len() >= MAX_ENTRIES {
                    verified.clear();
                }
                verified.insert(hash, (caller.clone(), Instant::now()));
            }
            // Revoked: forget it at once.
            None => {
                verified.remove(&hash);
            }
        }
        Ok(caller)
    }

    /// Counts a request from `address`; refused with 429 over the limit.
    fn count_address(&self, address: Option<IpAddr>) -> Result<(), ApiError> {
        let Some(address) = address else {
            return Ok(());
        };
        if self.by_address.len() > MAX_ENTRIES {
            self.by_address.retain_recent();
        }
        self.by_address
            .check_key(&address)
            .map_err(|not_until| too_many("client address", not_until))
    }

    /// Counts an attempt on the hosted redeem page; `Err(seconds to wait)`.
    pub fn count_redeem_page(&self, address: Option<IpAddr>) -> Result<(), u64> {
        let Some(address) = address else {
            return Ok(());
        };
        if self.redeem_page.len() > MAX_ENTRIES {
            self.redeem_page.retain_recent();
        }
        self.redeem_page
            .check_key(&address)
            .map_err(|not_until| wait_secs(&not_until))
    }
}

fn wait_secs(not_until: &governor::NotUntil<governor::clock::QuantaInstant>) -> u64 {
    not_until
        .wait_time_from(DefaultClock::default().now())
        .as_secs()
        + 1
}

fn too_many(what: &str, not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> ApiError {
    let wait = wait_secs(&not_until);
    metrics::counter!("entitle_platform_rate_limited_total", "by" => what.replace(' ', "_"))
        .increment(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests for this {what}; retry in {wait} s"),
    )
    .retry_after(wait)
}

/// An authenticated platform caller: the `platform` role, which staff
/// tokens do not have and platform keys have alone.
#[derive(Debug, Clone)]
pub struct Platform(pub Caller);

/// The client's address, when the listener knows it (tests that call the
/// router directly do not).
pub fn client_address(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}

/// The client's address as an extractor (`None` without a listener).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(client_address(parts)))
    }
}

impl FromRequestParts<AppState> for Platform {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let gate = &state.platform;
        // Before anything costs a lookup.
        gate.count_address(client_address(parts))?;
        let unauthorized = |detail: &str| {
            metrics::counter!("entitle_platform_unauthorized_total").increment(1);
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail.to_owned())
        };
        let key = crate::auth::bearer(parts)
            .ok_or_else(|| unauthorized("send Authorization: Bearer <platform key>"))?;
        let caller = match gate.verify(state, key).await? {
            Some(caller) => caller,
            None => {
                // A staff token is authentic but of the wrong role.
                if let Some((name, _)) = token::authenticate(&state.ctx.pool, key).await? {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!("this needs a platform key; token {name} is a staff token"),
                    ));
                }
                return Err(unauthorized("unknown or revoked platform key"));
            }
        };
        if gate.by_key.len() > MAX_ENTRIES {
            gate.by_key.retain_recent();
        }
        gate.by_key
            .check_key(&caller.id)
            .map_err(|not_until| too_many("platform key", not_until))?;
        Ok(Platform(caller))
    }
}
