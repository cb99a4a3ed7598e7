//! The end-to-end harness: starts the real gateway and worker in-process on
//! `127.0.0.1:0`, each test with its own Postgres database, its own Redis
//! namespace, a wiremock stand-in for Stripe's API and a real SMTP server.

pub mod browser;
pub mod channel_api;
pub mod channels;
pub mod proxy;
pub mod receiver;
pub mod smtp;
pub mod stripe;

use std::{future::Future, sync::Mutex, time::Duration};

use base64::Engine as _;
use entitle_jobs::{Config, Context};
use figment::providers::Serialized;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;
use wiremock::MockServer;

use crate::smtp::SmtpSink;

/// How long a test waits for the worker before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The name of the platform key every test app starts with.
pub const PLATFORM_KEY_NAME: &str = "test-platform";

/// The webhook signing secret every test app is configured with.
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_test_entitle";
/// Shopify's current app secret in tests, and the one being rotated out.
pub const SHOPIFY_SECRET: &str = "shpss_test_current";
pub const SHOPIFY_PREVIOUS_SECRET: &str = "shpss_test_previous";
/// The native checkout's Standard Webhooks secret in tests.
pub const NATIVE_SECRET: &str = "whsec_bmF0aXZlLWNoZWNrb3V0LXRlc3Qtc2VjcmV0";

/// The administrative connection tests make their databases with.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn random_key() -> String {
    let mut key = [0u8; 32];
    rand::fill(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// How a test app starts.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Start the SMTP server now (otherwise its port stays closed until
    /// [`TestApp::start_smtp`]).
    pub smtp: bool,
    /// Run the worker in-process.
    pub worker: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            smtp: true,
            worker: true,
        }
    }
}

/// A running Entitle with everything it talks to.
pub struct TestApp {
    /// `http://127.0.0.1:PORT` of the gateway.
    pub address: String,
    /// A platform key named [`PLATFORM_KEY_NAME`], for `/v1`.
    pub platform_key: String,
    pub ctx: Context,
    pub pool: PgPool,
    pub stripe: MockServer,
    pub http: reqwest::Client,
    pub smtp_port: u16,
    /// The proxy in front of Postgres ([`TestApp::spawn_behind_proxy`]).
    pub postgres: Option<proxy::Proxy>,
    smtp: Mutex<Option<SmtpSink>>,
    database: String,
    namespace: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    worker_shutdown: Mutex<Option<RunningWorker>>,
    extra_workers: Mutex<Vec<RunningWorker>>,
}

/// The in-process worker: how to stop it, and its task.
struct RunningWorker {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_worker(ctx: &Context) -> RunningWorker {
    let (stop, _) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(entitle_worker::run(ctx.clone(), stopped(&stop)));
    RunningWorker { stop, task }
}

fn stopped(shutdown: &tokio::sync::watch::Sender<bool>) -> impl Future<Output = ()> + use<> {
    let mut rx = shutdown.subscribe();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Logs for failing tests: `RUST_LOG=debug cargo test`.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Creates an empty database for one test and returns its URL.
async fn create_database(name: &str) -> String {
    let admin = admin_database_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("Postgres is reachable at DATABASE_URL (run ops/test.sh, which starts it)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("the test database can be created");
    let mut url = reqwest::Url::parse(&admin).expect("DATABASE_URL is a URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

impl TestApp {
    /// Gateway, worker and SMTP server, all running.
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        Self::spawn_configured(options, json!({})).await
    }

    /// Starts with `overrides` (a nested JSON object) layered over the test
    /// configuration.
    pub async fn spawn_configured(options: Options, overrides: Value) -> Self {
        Self::spawn_inner(options, overrides, false).await
    }

    /// [`TestApp::spawn_configured`], reaching Postgres through a
    /// [`proxy::Proxy`] the test can take down ([`TestApp::postgres`]).
    pub async fn spawn_behind_proxy(options: Options, overrides: Value) -> Self {
        Self::spawn_inner(options, overrides, true).await
    }

    async fn spawn_inner(options: Options, overrides: Value, postgres_proxy: bool) -> Self {
        init_logging();
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("entitle_t_{id}");
        let namespace = format!("entitle-t-{id}");
        let mut database_url = create_database(&database).await;
        let postgres = if postgres_proxy {
            let mut url = reqwest::Url::parse(&database_url).expect("a database URL");
            let target = format!(
                "{}:{}",
                url.host_str().unwrap_or("127.0.0.1"),
                url.port().unwrap_or(5432)
            );
            let target = tokio::net::lookup_host(&target)
                .await
                .ok()
                .and_then(|mut addresses| addresses.next())
                .expect("Postgres's address resolves");
            let proxy = proxy::Proxy::start(target).await;
            url.set_host(Some("127.0.0.1")).unwrap();
            url.set_port(Some(proxy.port)).unwrap();
            database_url = url.to_string();
            Some(proxy)
        } else {
            None
        };
        let stripe = MockServer::start().await;
        let smtp_port = smtp::free_port();
        let smtp = options.smtp.then(|| SmtpSink::start_on(smtp_port, None));
        let catalogue = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/catalogue.toml");
        let config = Config::from_figment(
            Config::defaults()
                .merge(Serialized::defaults(json!({
                    // The gateway's wait for a connection, so the gateway
                    // in the tests shares this pool, as the binary's does.
                    "database": { "url": database_url, "max_connections": 10, "acquire_timeout_ms": 500 },
                    "redis": { "url": redis_url(), "namespace": namespace },
                    "worker": {
                        "concurrency": 4,
                        "poll_interval_ms": 20,
                        "feed_interval_ms": 20,
                        // Work whose worker or job was lost is fed again
                        // this soon.
                        "lease_secs": 3,
                        "issue_batch_size": 500,
                        "max_attempts": 25,
                        "retry_min_backoff_ms": 50,
                        "retry_max_backoff_ms": 400
                    },
                    "codes": { "hash_key": random_key(), "seal_key": random_key() },
                    "catalogue": { "file": catalogue },
                    "stripe": {
                        "webhook_secrets": [STRIPE_WEBHOOK_SECRET],
                        "api_key": "sk_test_entitle",
                        "api_base": stripe.uri(),
                        "api_timeout_secs": 5
                    },
                    // Sweeps stay out of the way unless a test asks for them.
                    "schedule": {
                        "housekeeping": "0 0 0 1 1 *",
                        "expire": "0 0 0 1 1 *",
                        "prune": "0 0 0 1 1 *",
                        "reconcile": "0 0 0 1 1 *"
                    },
                    "shopify": {
                        "webhook_secrets": [SHOPIFY_SECRET, SHOPIFY_PREVIOUS_SECRET],
                        "max_event_age_secs": 172800,
                        // The Admin API stand-in shares the wiremock server.
                        "shop_url": stripe.uri(),
                        "api_token": "shpat_test_entitle",
                        "api_timeout_secs": 5
                    },
                    "reconcile": { "max_retry_wait_secs": 5 },
                    "native": {
                        "webhook_secrets": [NATIVE_SECRET],
                        "signature_tolerance_secs": 300
                    },
                    "email": {
                        "smtp_url": format!("smtp://127.0.0.1:{smtp_port}"),
                        "from": "Entitle Test <codes@entitle.test>",
                        "redeem_url": "https://shop.test/redeem",
                        "message_id_domain": "entitle.test",
                        "smtp_timeout_secs": 5,
                        "retry_max_backoff_secs": 1
                    }
                })))
                .merge(Serialized::defaults(overrides)),
        )
        .expect("the test configuration is valid");

        let ctx = Context::connect(config)
            .await
            .expect("Postgres and Redis are reachable");
        ctx.prepare().await.expect("migrations and catalogue load");
        let (_, platform_key) = entitle_jobs::platform_key::create(
            &ctx.pool,
            &ctx.keys,
            PLATFORM_KEY_NAME,
            "test:harness",
            "the platform of the tests",
        )
        .await
        .expect("a platform key");
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the gateway");
        let address = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(entitle_gateway::run(
            ctx.clone(),
            listener,
            stopped(&shutdown),
        ));
        let worker_shutdown = options.worker.then(|| start_worker(&ctx));
        Self {
            address,
            platform_key,
            pool: ctx.pool.clone(),
            ctx,
            stripe,
            // The gateway closes a kept-alive connection that sends no
            // request within `gateway.timeouts.header_read_ms` (10 s); a
            // client reusing one at that moment gets no answer
            // (IncompleteMessage). Idle connections are dropped before that.
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
            smtp_port,
            postgres,
            smtp: Mutex::new(smtp),
            database,
            namespace,
            shutdown,
            worker_shutdown: Mutex::new(worker_shutdown),
            extra_workers: Mutex::new(Vec::new()),
        }
    }

    /// Stops the in-process worker (letting running jobs finish) and starts a
    /// new one, as a deploy or a crash-and-restart would.
    pub async fn restart_worker(&self) {
        let old = self.worker_shutdown.lock().unwrap().take();
        if let Some(old) = old {
            let _ = old.stop.send(true);
            let started = std::time::Instant::now();
            let _ = old.task.await;
            tracing::info!(took = ?started.elapsed(), "worker stopped");
        }
        let new = start_worker(&self.ctx);
        *self.worker_shutdown.lock().unwrap() = Some(new);
    }

    /// Starts one more worker process's worth of workers (as another
    /// process on another machine would), stopped with the app.
    pub fn start_another_worker(&self) {
        let extra = start_worker(&self.ctx);
        self.extra_workers.lock().unwrap().push(extra);
    }

    /// The app's queues, as its workers see them.
    pub async fn queues(&self) -> entitle_jobs::queue::Queues {
        entitle_jobs::queue::Queues::connect(&self.ctx.config.redis)
            .await
            .expect("Redis is reachable")
    }

    /// A Redis connection and every key under this app's namespace.
    async fn redis_keys(&self) -> (redis::aio::MultiplexedConnection, Vec<String>) {
        let client = redis::Client::open(redis_url()).expect("REDIS_URL is a URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis is reachable");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{}*", self.namespace))
            .query_async(&mut conn)
            .await
            .expect("KEYS answers");
        (conn, keys)
    }

    /// Deletes every Redis key of this app: its queues, schedules and
    /// worker registrations, as a flush or a Redis restart without
    /// persistence would.
    pub async fn flush_redis(&self) {
        let (mut conn, keys) = self.redis_keys().await;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    /// Waits until the mailbox holds at least `n` messages; returns them all.
    pub async fn mails(&self, n: usize) -> Vec<smtp::ReceivedMail> {
        let mailbox = self.mailbox();
        eventually(&format!("{n} email(s)"), WAIT, || {
            let mailbox = mailbox.clone();
            async move {
                let messages = mailbox.messages();
                (messages.len() >= n).then_some(messages)
            }
        })
        .await
    }

    /// Waits until `sql` (a `SELECT count(*) …`) counts `expected`.
    pub async fn wait_count(&self, sql: &'static str, expected: i64) {
        eventually(&format!("{sql} = {expected}"), WAIT, || async move {
            (self.count(sql).await == expected).then_some(())
        })
        .await
    }

    /// Waits until every filed webhook event is finished (none pending).
    pub async fn events_settled(&self, filed: i64) {
        self.wait_count(
            "SELECT count(*) FROM webhook_inbox WHERE status <> 'pending'",
            filed,
        )
        .await;
        assert_eq!(
            self.count("SELECT count(*) FROM webhook_inbox").await,
            filed
        );
    }

    /// Starts the SMTP server on the port the app was configured with.
    pub fn start_smtp(&self) -> SmtpSink {
        let sink = SmtpSink::start_on(self.smtp_port, None);
        *self.smtp.lock().unwrap() = Some(sink.clone());
        sink
    }

    /// The SMTP server's mailbox.
    pub fn mailbox(&self) -> SmtpSink {
        self.smtp
            .lock()
            .unwrap()
            .clone()
            .expect("the SMTP server was started")
    }

    /// Posts a Stripe webhook body with a valid signature made now.
    pub async fn post_stripe(&self, body: &str) -> reqwest::Response {
        let signature = entitle_jobs::channel::stripe::sign(
            body.as_bytes(),
            STRIPE_WEBHOOK_SECRET,
            chrono::Utc::now().timestamp(),
        );
        self.post_stripe_signed(body, Some(&signature)).await
    }

    /// Posts a Stripe webhook body with the given `Stripe-Signature` header.
    pub async fn post_stripe_signed(
        &self,
        body: &str,
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/webhooks/stripe", self.address))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send().await.expect("the gateway answers")
    }

    /// Redeems a code with the app's platform key; returns the status and
    /// the JSON answer.
    pub async fn redeem(&self, code: &str, account: &str, entity: &str) -> (u16, Value) {
        let body = json!({ "code": code, "account_id": account, "entity_ref": entity });
        self.platform("/v1/redemptions", Some(&self.platform_key), &body)
            .await
    }

    /// Checks a code with the app's platform key.
    pub async fn check(&self, code: &str) -> (u16, Value) {
        self.platform(
            "/v1/codes/check",
            Some(&self.platform_key),
            &json!({ "code": code }),
        )
        .await
    }

    /// POSTs `body` to a `/v1` path with `key` as the bearer credential (or
    /// none); returns the status and the JSON answer.
    pub async fn platform(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let response = self.platform_request(path, key, body).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// The same, answering the whole response (headers too).
    pub async fn platform_request(
        &self,
        path: &str,
        key: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.http.post(format!("{}{path}", self.address)).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().await.expect("the gateway answers")
    }

    /// Every value stored under this app's Redis namespace, as text: what a
    /// job payload or queue entry could have leaked.
    pub async fn redis_contents(&self) -> String {
        let (mut conn, keys) = self.redis_keys().await;
        let mut out = String::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let command = match kind.as_str() {
                "string" => redis::cmd("GET").arg(&key).clone(),
                "hash" => redis::cmd("HGETALL").arg(&key).clone(),
                "list" => redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone(),
                "set" => redis::cmd("SMEMBERS").arg(&key).clone(),
                "zset" => redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).clone(),
                _ => continue,
            };
            let value: redis::Value = command.query_async(&mut conn).await.unwrap();
            out.push_str(&key);
            out.push_str(" =>");
            flatten(&value, &mut out);
            out.push('\n');
        }
        out
    }

    /// A new admin API token with `role`, named after the role.
    pub async fn token(&self, role: entitle_jobs::token::Role) -> String {
        entitle_jobs::token::create(
            &self.pool,
            &format!("{}-{}", role.as_str(), Uuid::new_v4().simple()),
            role,
            "test",
            "test",
        )
        .await
        .expect("a token")
    }

    /// Calls the admin API; returns the status and the JSON answer (or the
    /// text as a JSON string when the answer is not JSON).
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let mut request = self.http.request(method, format!("{}{path}", self.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the gateway answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Runs `entitlectl` in-process against this app with `token`; returns
    /// what it printed.
    pub async fn cli(&self, token: &str, args: &[&str]) -> String {
        use clap::Parser;
        let mut argv = vec!["entitlectl", "--url", &self.address, "--token", token];
        argv.extend_from_slice(args);
        let parsed = entitlectl::Cli::try_parse_from(argv).expect("the arguments parse");
        let mut out = Vec::new();
        entitlectl::run(parsed, &mut out)
            .await
            .expect("the command succeeds");
        String::from_utf8(out).expect("the CLI prints text")
    }

    /// Creates a batch of `quantity` codes of `sku` through the admin API and
    /// returns the codes, from the batch's one-time export.
    pub async fn batch_codes(&self, sku: &str, quantity: u32) -> Vec<String> {
        let operator = self.token(entitle_jobs::token::Role::Operator).await;
        let (status, batch) = self
            .admin(
                "POST",
                "/admin/v1/batches",
                Some(&operator),
                Some(json!({ "product_sku": sku, "quantity": quantity,
                             "kind": "test_account", "reason": "codes for a test" })),
                None,
            )
            .await;
        assert_eq!(status, 201, "{batch}");
        let (status, csv) = self
            .admin(
                "POST",
                &format!("/admin/v1/batches/{}/export", batch["id"].as_str().unwrap()),
                Some(&operator),
                Some(json!({ "reason": "codes for a test" })),
                None,
            )
            .await;
        assert_eq!(status, 200, "{csv}");
        let text = csv.as_str().expect("the export is CSV").to_owned();
        csv::Reader::from_reader(text.as_bytes())
            .deserialize::<std::collections::HashMap<String, String>>()
            .map(|row| row.expect("a CSV row")["code"].clone())
            .collect()
    }

    /// Runs a `SELECT count(*) …` and returns the count.
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect("the count query runs")
    }
}

/// Appends every string inside a Redis reply, decoded as UTF-8.
fn flatten(value: &redis::Value, out: &mut String) {
    match value {
        redis::Value::BulkString(bytes) => {
            out.push(' ');
            out.push_str(&String::from_utf8_lossy(bytes));
        }
        redis::Value::SimpleString(s) => {
            out.push(' ');
            out.push_str(s);
        }
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().for_each(|v| flatten(v, out))
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        other => out.push_str(&format!(" {other:?}")),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(worker) = self.worker_shutdown.lock().unwrap().take() {
            let _ = worker.stop.send(true);
        }
        for worker in self.extra_workers.lock().unwrap().drain(..) {
            let _ = worker.stop.send(true);
        }
        // Drop the database and the Redis keys from a thread of its own: the
        // test's runtime may be shutting down.
        let database = self.database.clone();
        let namespace = self.namespace.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            runtime.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_database_url()).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
                if let Ok(client) = redis::Client::open(redis_url())
                    && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("*{namespace}*"))
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    if !keys.is_empty() {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Polls `check` until it yields `Some`, or panics after `timeout` naming what
/// was awaited. Waiting for a worker is always this, never a bare sleep.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
