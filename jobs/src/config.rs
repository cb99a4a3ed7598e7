//! Configuration: the commented defaults in `ops/entitle.default.toml`, then an
//! optional file, then `ENTITLE_`-prefixed environment variables, validated at
//! start with errors that name the offending key.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use base64::Engine as _;
use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::retry::RetryPolicy;

/// The defaults, compiled in so a binary runs without the repository beside it.
pub const DEFAULT_TOML: &str = include_str!("../../ops/entitle.default.toml");

/// Everything Entitle can be configured with. Secrets are [`SecretString`],
/// whose `Debug` prints `[REDACTED]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub gateway: GatewayConfig,
    pub worker: WorkerConfig,
    pub codes: CodesConfig,
    pub catalogue: CatalogueConfig,
    pub stripe: StripeConfig,
    pub shopify: ShopifyConfig,
    pub native: NativeConfig,
    pub email: EmailConfig,
    pub schedule: ScheduleConfig,
    pub reconcile: ReconcileConfig,
    pub console: ConsoleConfig,
    pub platform: PlatformConfig,
}

/// `[reconcile]`
#[derive(Debug, Clone, Deserialize)]
pub struct ReconcileConfig {
    pub window_hours: u32,
    pub lag_secs: u64,
    pub max_attempts: u32,
    pub max_retry_wait_secs: u64,
    pub call_limit_ratio: f64,
}

/// `[schedule]`
#[derive(Debug, Clone, Deserialize)]
pub struct ScheduleConfig {
    pub housekeeping: String,
    pub expire: String,
    pub prune: String,
    pub remind: String,
    pub reconcile: String,
    pub remind_days_before: u32,
    pub batch_size: u32,
    pub retention_days: u32,
    pub finished_jobs_retention_secs: u64,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub max_connections: u32,
    /// How long a job waits for a connection (or for Postgres to accept
    /// one) before giving up.
    pub acquire_timeout_ms: u64,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    pub url: SecretString,
    pub namespace: String,
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Serve the minimal hosted redeem page at `/redeem`.
    pub redeem_page: bool,
    /// Where the gateway serves `/metrics` (never on `listen`); empty: off.
    pub metrics_listen: String,
    /// How long a verified platform key is trusted before it is checked
    /// again: a revocation takes effect within this many seconds.
    pub platform_key_cache_secs: u64,
    /// How long a request waits for a Postgres connection before the
    /// gateway answers `503 database_unavailable`: channels retry later, and
    /// nobody waits on a dead database.
    pub database_acquire_timeout_ms: u64,
    /// Writers that claim redemptions in group commits: each holds one
    /// statement (and one WAL flush) in flight.
    pub redemption_writers: usize,
    pub limits: GatewayLimits,
    pub timeouts: GatewayTimeouts,
}

/// `[gateway.limits]`: rate and concurrency limits of the public API.
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayLimits {
    /// Redemptions and checks a platform key may make per second (also the
    /// burst).
    pub per_key_per_second: u32,
    /// Redemptions and checks one client address may make per second,
    /// whatever key it sends (or none).
    pub per_address_per_second: u32,
    /// Redemptions one address may try per minute on the hosted page.
    pub redeem_page_per_minute_per_address: u32,
    /// Failed bearer authentications on the admin API one address may make
    /// per minute; over it, every admin request from there answers 429.
    pub failed_auth_per_minute_per_address: u32,
    /// `/v1` requests served at once; more answer 503 `overloaded` at once.
    /// Below the pool size, so webhook intake always finds a connection.
    pub max_in_flight_platform: usize,
    /// Requests served at once on the whole listener.
    pub max_in_flight: usize,
}

/// `[gateway.timeouts]`
#[derive(Debug, Clone, Deserialize)]
pub struct GatewayTimeouts {
    /// A client must send a request's headers within this (slow-header
    /// connections are closed).
    pub header_read_ms: u64,
    /// ... and its body within this.
    pub body_ms: u64,
    /// A request is answered within this, or gets 503 `timeout`.
    pub request_ms: u64,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace_secs: u64,
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerConfig {
    /// Jobs (each a batch) run at once per queue per process.
    pub concurrency: usize,
    pub poll_interval_ms: u64,
    /// Events or deliveries per job.
    pub batch_size: u32,
    /// Jobs waiting in Redis per queue, at most.
    pub window: u32,
    pub feed_interval_ms: u64,
    pub lease_secs: u64,
    /// Attempts at a webhook event before it fails for good.
    pub max_attempts: i32,
    pub retry_min_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Where the worker serves `/metrics`; empty for nowhere.
    pub metrics_listen: String,
    pub issue_batch_size: u32,
    /// Units one order may have; an order above it fails as `order_too_large`.
    pub max_units_per_order: u32,
}

/// `[codes]`
#[derive(Debug, Clone, Deserialize)]
pub struct CodesConfig {
    pub hash_key: SecretString,
    pub seal_key: SecretString,
    /// Sealing keys used before `seal_key`, newest first: codes they sealed
    /// still open until `entitle-gateway reseal` seals them again.
    #[serde(default)]
    pub previous_seal_keys: Vec<SecretString>,
    /// After a batch's first CSV download, how long the same actor may
    /// download it again (a dropped connection must not lose the codes);
    /// 0: once.
    pub export_window_secs: u64,
}

/// `[catalogue]`
#[derive(Debug, Clone, Deserialize)]
pub struct CatalogueConfig {
    pub file: PathBuf,
}

/// `[stripe]`
#[derive(Debug, Clone, Deserialize)]
pub struct StripeConfig {
    pub webhook_secrets: Vec<SecretString>,
    pub signature_tolerance_secs: u64,
    pub api_key: SecretString,
    pub api_base: String,
    pub api_timeout_secs: u64,
}

/// `[shopify]`
#[derive(Debug, Clone, Deserialize)]
pub struct ShopifyConfig {
    pub webhook_secrets: Vec<SecretString>,
    pub max_event_age_secs: u64,
    pub shop_url: String,
    pub api_token: SecretString,
    pub api_version: String,
    pub api_timeout_secs: u64,
}

/// `[native]`
#[derive(Debug, Clone, Deserialize)]
pub struct NativeConfig {
    pub webhook_secrets: Vec<SecretString>,
    pub signature_tolerance_secs: u64,
}

/// `[email]`
#[derive(Debug, Clone, Deserialize)]
pub struct EmailConfig {
    pub smtp_url: SecretString,
    pub from: String,
    pub redeem_url: String,
    pub message_id_domain: String,
    pub smtp_timeout_secs: u64,
    pub templates_dir: String,
    pub bulk_threshold: u32,
    pub notify_revocations: bool,
    /// SMTP connections kept open per process (and messages sent at once).
    pub smtp_connections: u32,
    /// Attempts at an email before it fails for good, and the longest wait
    /// between two.
    pub max_attempts: i32,
    pub retry_max_backoff_secs: u64,
}

/// Sending events to the platform (see `[platform]` in the defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct PlatformConfig {
    /// How long an undelivered event is tried again before it fails.
    pub retry_for_secs: u64,
    pub retry_min_backoff_ms: u64,
    pub retry_max_backoff_secs: u64,
    /// Each attempt's whole timeout.
    pub timeout_secs: u64,
    /// After a rotation through the admin API, how long the previous
    /// secret signs beside the new one.
    pub rotation_overlap_secs: u64,
    /// Deliveries of one batch sent at once.
    pub concurrency: usize,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

/// An endpoint from the configuration file.
#[derive(Debug, Clone, Deserialize)]
pub struct EndpointConfig {
    pub name: String,
    pub url: String,
    /// `whsec_<base64>`: what the receiver verifies with.
    pub secret: SecretString,
    /// During a rotation, the old secret: events are signed with both.
    #[serde(default)]
    pub previous_secret: Option<SecretString>,
    /// The event types it hears; empty or absent: every type.
    #[serde(default)]
    pub events: Vec<String>,
}

impl PlatformConfig {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            // Time, not a count, ends the retries (`retry_for_secs`).
            max_attempts: i32::MAX,
            min_backoff: Duration::from_millis(self.retry_min_backoff_ms),
            max_backoff: Duration::from_secs(self.retry_max_backoff_secs),
        }
    }
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Read(#[from] Box<figment::Error>),
    #[error("configuration key `{key}` is invalid: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

impl Config {
    /// The database settings the gateway connects with: its own, shorter
    /// wait for a connection.
    pub fn gateway_database(&self) -> DatabaseConfig {
        DatabaseConfig {
            acquire_timeout_ms: self.gateway.database_acquire_timeout_ms,
            ..self.database.clone()
        }
    }

    /// Layers defaults, the optional file and the environment, then validates.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        Self::from_figment(figment.merge(Env::prefixed("ENTITLE_").split("__")))
    }

    /// Extracts and validates a configuration from any figment; tests layer
    /// their own values over the defaults this way.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The defaults as a figment, for callers that add their own layers.
    pub fn defaults() -> Figment {
        Figment::from(Toml::string(DEFAULT_TOML))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        key_bytes(&self.codes.hash_key, "codes.hash_key")?;
        key_bytes(&self.codes.seal_key, "codes.seal_key")?;
        for previous in &self.codes.previous_seal_keys {
            key_bytes(previous, "codes.previous_seal_keys")?;
            if previous.expose_secret() == self.codes.seal_key.expose_secret() {
                return Err(invalid(
                    "codes.previous_seal_keys",
                    "must not hold the current codes.seal_key",
                ));
            }
        }
        if self.codes.hash_key.expose_secret() == self.codes.seal_key.expose_secret() {
            return Err(invalid("codes.seal_key", "must differ from codes.hash_key"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.redis.namespace.is_empty() || self.redis.namespace.contains(char::is_whitespace) {
            return Err(invalid(
                "redis.namespace",
                "must be non-empty without spaces",
            ));
        }
        for (key, value, example) in [
            (
                "worker.metrics_listen",
                &self.worker.metrics_listen,
                "127.0.0.1:9091",
            ),
            (
                "gateway.metrics_listen",
                &self.gateway.metrics_listen,
                "127.0.0.1:9090",
            ),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    key,
                    format!("must be empty or an address like {example}"),
                ));
            }
        }
        if self.worker.poll_interval_ms == 0 {
            return Err(invalid("worker.poll_interval_ms", "must be at least 1"));
        }
        for (key, value) in [
            ("worker.concurrency", self.worker.concurrency as u64),
            ("worker.batch_size", u64::from(self.worker.batch_size)),
            ("worker.window", u64::from(self.worker.window)),
            ("worker.feed_interval_ms", self.worker.feed_interval_ms),
            (
                "worker.max_units_per_order",
                u64::from(self.worker.max_units_per_order),
            ),
            (
                "email.smtp_connections",
                u64::from(self.email.smtp_connections),
            ),
            (
                "gateway.limits.failed_auth_per_minute_per_address",
                u64::from(self.gateway.limits.failed_auth_per_minute_per_address),
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.platform.retry_min_backoff_ms == 0
            || self.platform.retry_min_backoff_ms > self.platform.retry_max_backoff_secs * 1000
        {
            return Err(invalid(
                "platform.retry_min_backoff_ms",
                "must be at least 1 and not above platform.retry_max_backoff_secs",
            ));
        }
        if self.platform.timeout_secs == 0 || self.platform.concurrency == 0 {
            return Err(invalid(
                "platform.timeout_secs",
                "platform.timeout_secs and platform.concurrency must be at least 1",
            ));
        }
        if self.worker.lease_secs < 2 {
            return Err(invalid("worker.lease_secs", "must be at least 2"));
        }
        if self.worker.max_units_per_order > i32::MAX as u32 {
            return Err(invalid(
                "worker.max_units_per_order",
                format!("must be at most {}", i32::MAX),
            ));
        }
        if self.worker.max_attempts < 1 || self.email.max_attempts < 1 {
            return Err(invalid(
                "worker.max_attempts",
                "worker.max_attempts and email.max_attempts must be at least 1",
            ));
        }
        if self.worker.retry_min_backoff_ms == 0
            || self.worker.retry_min_backoff_ms > self.worker.retry_max_backoff_ms
        {
            return Err(invalid(
                "worker.retry_min_backoff_ms",
                "must be at least 1 and not above worker.retry_max_backoff_ms",
            ));
        }
        for (key, secrets) in [
            ("stripe.webhook_secrets", &self.stripe.webhook_secrets),
            ("shopify.webhook_secrets", &self.shopify.webhook_secrets),
            ("native.webhook_secrets", &self.native.webhook_secrets),
        ] {
            if secrets.iter().any(|s| s.expose_secret().is_empty()) {
                return Err(invalid(key, "contains an empty secret"));
            }
        }
        if self
            .native
            .webhook_secrets
            .iter()
            .any(|s| crate::channel::native::secret_key(s.expose_secret()).is_none())
        {
            return Err(invalid(
                "native.webhook_secrets",
                "each secret must be whsec_ followed by base64",
            ));
        }
        for (key, cron) in [
            ("schedule.housekeeping", &self.schedule.housekeeping),
            ("schedule.expire", &self.schedule.expire),
            ("schedule.prune", &self.schedule.prune),
            ("schedule.remind", &self.schedule.remind),
            ("schedule.reconcile", &self.schedule.reconcile),
        ] {
            cron.parse::<cron::Schedule>().map_err(|e| {
                invalid(
                    key,
                    format!("is not a cron expression (sec min hour day month weekday): {e}"),
                )
            })?;
        }
        if self.schedule.batch_size == 0 || self.schedule.retention_days == 0 {
            return Err(invalid(
                "schedule.batch_size",
                "schedule.batch_size and schedule.retention_days must be at least 1",
            ));
        }
        if self.worker.issue_batch_size == 0 {
            return Err(invalid("worker.issue_batch_size", "must be at least 1"));
        }
        reqwest::Url::parse(&self.stripe.api_base)
            .map_err(|e| invalid("stripe.api_base", e.to_string()))?;
        if !self.shopify.shop_url.is_empty() {
            reqwest::Url::parse(&self.shopify.shop_url)
                .map_err(|e| invalid("shopify.shop_url", e.to_string()))?;
        }
        if self.reconcile.window_hours == 0 || self.reconcile.max_attempts == 0 {
            return Err(invalid(
                "reconcile.window_hours",
                "reconcile.window_hours and reconcile.max_attempts must be at least 1",
            ));
        }
        if !(0.1..=1.0).contains(&self.reconcile.call_limit_ratio) {
            return Err(invalid(
                "reconcile.call_limit_ratio",
                "must be between 0.1 and 1.0",
            ));
        }
        reqwest::Url::parse(
            &self
                .email
                .redeem_url
                .replace("{code}", "XXXX-XXXX-XXXX-XXXX"),
        )
        .map_err(|e| invalid("email.redeem_url", e.to_string()))?;
        self.email
            .from
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| invalid("email.from", e.to_string()))?;
        let smtp = reqwest::Url::parse(self.email.smtp_url.expose_secret())
            // The URL may hold a password: say what is wrong, not what it is.
            .map_err(|e| invalid("email.smtp_url", e.to_string()))?;
        if !matches!(smtp.scheme(), "smtp" | "smtps") {
            return Err(invalid("email.smtp_url", "scheme must be smtp or smtps"));
        }
        if self.email.message_id_domain.is_empty() {
            return Err(invalid("email.message_id_domain", "must not be empty"));
        }
        self.console.validate()?;
        Ok(())
    }

    /// The 32-byte key codes are hashed under.
    pub fn hash_key(&self) -> [u8; 32] {
        key_bytes(&self.codes.hash_key, "codes.hash_key").expect("validated at load")
    }

    /// The 32-byte key stored codes are sealed under.
    pub fn seal_key(&self) -> [u8; 32] {
        key_bytes(&self.codes.seal_key, "codes.seal_key").expect("validated at load")
    }

    /// Earlier sealing keys, newest first.
    pub fn previous_seal_keys(&self) -> Vec<[u8; 32]> {
        self.codes
            .previous_seal_keys
            .iter()
            .map(|key| key_bytes(key, "codes.previous_seal_keys").expect("validated at load"))
            .collect()
    }

    /// How failed webhook events are retried.
    pub fn event_retries(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.worker.max_attempts,
            min_backoff: Duration::from_millis(self.worker.retry_min_backoff_ms),
            max_backoff: Duration::from_millis(self.worker.retry_max_backoff_ms),
        }
    }

    /// How failed emails are retried: from the same first wait, for longer.
    pub fn delivery_retries(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.email.max_attempts,
            min_backoff: Duration::from_millis(self.worker.retry_min_backoff_ms),
            max_backoff: Duration::from_secs(self.email.retry_max_backoff_secs)
                .max(Duration::from_millis(self.worker.retry_min_backoff_ms)),
        }
    }

    /// How long fed or claimed work stays leased.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.worker.lease_secs)
    }
}

fn key_bytes(secret: &SecretString, key: &'static str) -> Result<[u8; 32], ConfigError> {
    let raw = secret.expose_secret();
    if raw.is_empty() {
        return Err(invalid(
            key,
            "is required: 32 random bytes, base64 (e.g. `openssl rand -base64 32`)",
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .map_err(|_| invalid(key, "is not valid base64"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| invalid(key, format!("must decode to 32 bytes, not {}", b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn with(pairs: &[(&str, serde_json::Value)]) -> Result<Config, ConfigError> {
        let mut f = Config::defaults()
            .merge(Serialized::default(
                "codes.hash_key",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ))
            .merge(Serialized::default(
                "codes.seal_key",
                "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            ))
            .merge(Serialized::default("stripe.webhook_secrets", ["whsec_x"]))
            .merge(Serialized::default(
                "native.webhook_secrets",
                ["whsec_bmF0aXZl"],
            ));
        for (k, v) in pairs {
            f = f.merge(Serialized::default(k, v));
        }
        Config::from_figment(f)
    }

    #[test]
    fn defaults_with_keys_are_valid() {
        with(&[]).expect("valid");
    }

    #[test]
    fn a_short_key_is_reported_by_name_without_its_value() {
        let err = with(&[("codes.hash_key", "c2hvcnQ=".into())]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("codes.hash_key"), "{text}");
        assert!(!text.contains("c2hvcnQ="), "{text}");
    }

    #[test]
    fn a_mistyped_value_names_its_key() {
        let err = with(&[("worker.concurrency", "many".into())]).unwrap_err();
        assert!(err.to_string().contains("concurrency"), "{err}");
    }

    #[test]
    fn a_native_secret_that_is_not_base64_is_refused() {
        let err =
            with(&[("native.webhook_secrets", serde_json::json!(["whsec_%%%"]))]).unwrap_err();
        assert!(err.to_string().contains("native.webhook_secrets"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let config = with(&[]).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("whsec_x"), "{debug}");
        assert!(!debug.contains("AQEBAQEB"), "{debug}");
    }
}

/// `[console]`: the support console's sessions, sign-in limits and SSO.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsoleConfig {
    /// A staff session ends after this many minutes without a request.
    pub idle_timeout_mins: u32,
    pub secure_cookies: SecureCookies,
    /// Sign-in attempts allowed per minute from one client address, and for
    /// one email address.
    pub sign_in_per_minute_per_address: u32,
    pub sign_in_per_minute_per_email: u32,
    /// A request header naming the signed-in staff member's email, set by an
    /// SSO proxy; empty: off.
    pub sso_header: String,
}

/// When the session cookie carries `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecureCookies {
    /// When the request came over TLS (`X-Forwarded-Proto: https` from the
    /// proxy that terminates it).
    Auto,
    Always,
    Never,
}

impl ConsoleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("console.idle_timeout_mins", self.idle_timeout_mins),
            (
                "console.sign_in_per_minute_per_address",
                self.sign_in_per_minute_per_address,
            ),
            (
                "console.sign_in_per_minute_per_email",
                self.sign_in_per_minute_per_email,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if !self.sso_header.is_empty() && header_name(&self.sso_header).is_none() {
            return Err(invalid(
                "console.sso_header",
                "must be empty or a header name",
            ));
        }
        Ok(())
    }
}

/// A header name is a token: letters, digits and `!#$%&'*+-.^_`|~`.
fn header_name(name: &str) -> Option<&str> {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        .then_some(name)
}
