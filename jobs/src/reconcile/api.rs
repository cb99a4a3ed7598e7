//! Reading a channel's API during reconciliation, one page at a time: a 429
//! waits for its `Retry-After`, a 5xx or a timeout backs off and tries
//! again, and Shopify's call-limit bucket is let drain before it overflows.

use std::time::Duration;

use reqwest::{RequestBuilder, StatusCode, header::HeaderMap};
use serde_json::Value;

use crate::{config::ReconcileConfig, error::JobError};

/// Shopify's bucket leaks two calls a second on standard plans.
const SHOPIFY_LEAK_PER_SEC: f64 = 2.0;

/// One page as read: its body and, for Link-paginated APIs, the next page.
#[derive(Debug)]
pub struct Fetched {
    pub body: Value,
    pub next: Option<String>,
}

/// Reads pages with the retry policy of `[reconcile]`.
#[derive(Debug, Clone)]
pub struct Pager {
    channel: &'static str,
    max_attempts: u32,
    max_wait: Duration,
    call_limit_ratio: f64,
    retries: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Pager {
    pub fn new(channel: &'static str, config: &ReconcileConfig) -> Self {
        Self {
            channel,
            max_attempts: config.max_attempts,
            max_wait: Duration::from_secs(config.max_retry_wait_secs),
            call_limit_ratio: config.call_limit_ratio,
            retries: Default::default(),
        }
    }

    /// Requests the API has been asked again (after a 429, 5xx or timeout).
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends the request `build` makes until it succeeds or the attempts run
    /// out. A 4xx other than 429 will not change by asking again.
    pub async fn get(
        &self,
        what: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Fetched, JobError> {
        let mut attempt = 1;
        loop {
            let (wait, problem) = match build().send().await {
                Ok(response) if response.status().is_success() => {
                    let next = next_link(response.headers());
                    let pause = self.call_limit_pause(response.headers());
                    let body = response.json::<Value>().await.map_err(|e| {
                        JobError::permanent(
                            "channel_api_malformed",
                            format!(
                                "{} answered {what} with something other than JSON: {e}",
                                self.channel
                            ),
                        )
                    })?;
                    if let Some(pause) = pause {
                        tracing::info!(
                            channel = self.channel,
                            pause_ms = pause.as_millis() as u64,
                            "call limit nearly reached; slowing down"
                        );
                        tokio::time::sleep(pause).await;
                    }
                    return Ok(Fetched { body, next });
                }
                Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => (
                    retry_after(response.headers()).unwrap_or_else(|| backoff(attempt)),
                    "429 Too Many Requests".to_owned(),
                ),
                Ok(response) if response.status().is_server_error() => {
                    (backoff(attempt), response.status().to_string())
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    return Err(JobError::permanent(
                        "channel_api_rejected",
                        format!(
                            "{} answered {status} for {what}: {}",
                            self.channel,
                            text.chars().take(300).collect::<String>()
                        ),
                    ));
                }
                Err(e) => (backoff(attempt), format!("{e}")),
            };
            if attempt >= self.max_attempts {
                return Err(JobError::permanent(
                    "channel_api_unavailable",
                    format!(
                        "{} did not answer {what} after {attempt} attempts (last: {problem})",
                        self.channel
                    ),
                ));
            }
            let wait = wait.min(self.max_wait);
            self.retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("entitle_reconcile_api_retries_total", "channel" => self.channel)
                .increment(1);
            tracing::warn!(channel = self.channel, what, attempt, %problem, wait_ms = wait.as_millis() as u64, "channel API failed; trying again");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// How long to pause after a Shopify answer whose call-limit header says
    /// the bucket is fuller than `call_limit_ratio`.
    fn call_limit_pause(&self, headers: &HeaderMap) -> Option<Duration> {
        let (used, size) = headers
            .get("x-shopify-shop-api-call-limit")?
            .to_str()
            .ok()?
            .split_once('/')?;
        let (used, size): (f64, f64) = (used.trim().parse().ok()?, size.trim().parse().ok()?);
        let allowed = (size * self.call_limit_ratio).floor();
        (size > 0.0 && used > allowed).then(|| {
            Duration::from_secs_f64((used - allowed) / SHOPIFY_LEAK_PER_SEC).min(self.max_wait)
        })
    }
}

/// Exponential backoff: 250 ms, 500 ms, 1 s, ...
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.saturating_sub(1).min(16)))
}

/// `Retry-After` in seconds (Shopify sends fractions, e.g. `2.0`).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The `rel="next"` target of a `Link` header, as Shopify paginates.
fn next_link(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(reqwest::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|part| {
            let (target, params) = part.split_once(';')?;
            let is_next = params
                .split(';')
                .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
            is_next.then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_next_link_is_found_among_others() {
        let h = headers(&[(
            "link",
            r#"<https://s.test/orders.json?page_info=p1&limit=2>; rel="previous", <https://s.test/orders.json?page_info=n2&limit=2>; rel="next""#,
        )]);
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://s.test/orders.json?page_info=n2&limit=2")
        );
        let last = headers(&[("link", r#"<https://s.test/o?page_info=p1>; rel="previous""#)]);
        assert_eq!(next_link(&last), None);
    }

    #[test]
    fn retry_after_accepts_whole_and_fractional_seconds() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "0.5")])),
            Some(Duration::from_millis(500))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn a_full_call_limit_bucket_pauses_until_it_drains_below_the_ratio() {
        let pager = Pager {
            channel: "shopify",
            max_attempts: 3,
            max_wait: Duration::from_secs(60),
            call_limit_ratio: 0.8,
            retries: Default::default(),
        };
        let pause =
            |v: &str| pager.call_limit_pause(&headers(&[("x-shopify-shop-api-call-limit", v)]));
        assert_eq!(pause("10/40"), None);
        assert_eq!(pause("32/40"), None);
        assert_eq!(pause("36/40"), Some(Duration::from_secs(2)));
        assert_eq!(pause("40/40"), Some(Duration::from_secs(4)));
    }
}
