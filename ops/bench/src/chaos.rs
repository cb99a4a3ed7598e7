//! The fault suite (`ops/chaos.sh`, `entitle-bench chaos`): the real
//! gateway and two worker processes on a Postgres cluster and a Redis server
//! of the suite's own (so it may kill and restart them), a steady load of
//! orders of 1 to 3 units from every channel (native, Stripe, Shopify) sent
//! by senders that retry as a channel does, and one fault after another:
//! workers killed with SIGKILL, Redis flushed, Redis killed and started
//! empty, Postgres restarted `-m immediate`, the SMTP server down. After each
//! fault it waits until every order accepted so far is done (its codes
//! issued and their email accepted by the SMTP sink), and at the end checks
//! every order: none lost, no code twice, no order fulfilled twice, and how
//! many emails arrived twice.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use axum::{Json, Router, extract::Path as UrlPath, routing::get};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{
    net::{TcpListener, TcpStream},
    process::{Child, Command},
    task::JoinHandle,
};

use crate::{load, sink::Sink, stack::Stack};

/// Every accepted order must be done this long after a fault ends.
const HEAL_TARGET_SECS: f64 = 30.0;
/// At most this share of orders may get their code email twice (under the
/// kill loop).
const DUPLICATE_EMAIL_TARGET_PCT: f64 = 0.1;
/// A channel's retry delay after a non-2xx answer or no answer.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// A channel gives up on an answer after this (and retries).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The webhook latency of a fault is taken over the fault and this long
/// after it (an instant fault such as a flush has no "during").
const LATENCY_TAIL: Duration = Duration::from_secs(5);

/// What the fault suite runs with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The short version: few orders, short faults.
    pub quick: bool,
    /// Where `entitle-gateway` and `entitle-worker` are (default: beside
    /// this binary).
    pub binaries: Option<PathBuf>,
    /// Orders a second (default 30, quick 10).
    pub rate: Option<f64>,
    /// Worker SIGKILLs in the kill loop (default 25, quick 5).
    pub kills: Option<usize>,
    /// Seconds the SMTP server is down (default 120, quick 10).
    pub smtp_down_secs: Option<u64>,
    /// Keep the logs and data directories even when everything passed.
    pub keep: bool,
}

struct Settings {
    rate: f64,
    kills: usize,
    smtp_down: Duration,
    redis_down: Duration,
    warmup: Duration,
    /// How long a fault may take to heal before the suite gives up on it.
    heal_limit: Duration,
    /// The heal target fails the run (the full run; the quick one on debug
    /// binaries on a shared machine only reports it).
    enforce_heal: bool,
}

impl Options {
    fn settings(&self) -> Settings {
        let quick = self.quick;
        Settings {
            rate: self.rate.unwrap_or(if quick { 10.0 } else { 30.0 }),
            kills: self.kills.unwrap_or(if quick { 5 } else { 25 }),
            smtp_down: Duration::from_secs(self.smtp_down_secs.unwrap_or(if quick {
                10
            } else {
                120
            })),
            redis_down: Duration::from_secs(if quick { 3 } else { 5 }),
            warmup: Duration::from_secs(if quick { 5 } else { 15 }),
            heal_limit: Duration::from_secs(if quick { 90 } else { 400 }),
            enforce_heal: !quick,
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A private Postgres cluster: initdb into a temporary folder, started with
/// `pg_ctl` on a free port (as the `postgres` user when run as root, since
/// initdb refuses root), trust authentication on 127.0.0.1.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    fn bin_dir() -> anyhow::Result<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|dir| {
                dir.filter_map(|e| {
                    let e = e.ok()?;
                    let version = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("pg_ctl").exists().then_some((version, bin))
                })
                .collect()
            })
            .unwrap_or_default();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
        let out = std::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .context("no /usr/lib/postgresql/*/bin/pg_ctl and no pg_config")?;
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            std::process::Command::new(path)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn start(root: &Path) -> anyhow::Result<Self> {
        let home = root.join("postgres");
        std::fs::create_dir_all(&home)?;
        let as_postgres = is_root();
        if as_postgres {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&home)
                .status()?;
            ensure!(status.success(), "chown postgres {}", home.display());
        }
        let pg = Self {
            bin: Self::bin_dir()?,
            data: home.join("data"),
            log: home.join("postgres.log"),
            port: free_port()?,
            as_postgres,
        };
        let data = pg.data.display().to_string();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 200\n",
            pg.port,
            home.display()
        );
        let mut existing = std::fs::read_to_string(pg.data.join("postgresql.conf"))?;
        existing.push_str(&conf);
        std::fs::write(pg.data.join("postgresql.conf"), existing)?;
        let log = pg.log.display().to_string();
        pg.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        )?;
        Ok(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart -m immediate`: a crash of the server (no checkpoint,
    /// every connection cut), then crash recovery.
    async fn restart_immediate(&self) -> anyhow::Result<()> {
        let data = self.data.display().to_string();
        let log = self.log.display().to_string();
        let mut command = Command::from(self.command("pg_ctl"));
        // With its log file: the server must not hold this process's pipes.
        let out = command
            .args(["-D", &data, "-l", &log, "-m", "immediate", "-w", "-t", "60"])
            .arg("restart")
            .stdin(Stdio::null())
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "pg_ctl restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private Redis server, a child of this process, nothing persisted.
struct Redis {
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Redis {
    async fn start(root: &Path) -> anyhow::Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            log: root.join("redis.log"),
            child: None,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.log.parent().unwrap_or(Path::new(".")))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        self.child = Some(child);
        for _ in 0..100 {
            if self.ping().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer (see {})", self.log.display())
    }

    async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await??)
    }

    async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn flushall(&self) -> anyhow::Result<()> {
        let mut conn = self.connection().await?;
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        Ok(())
    }

    /// SIGKILL: whatever Redis held is gone.
    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }
}

/// The SMTP server as the workers see it: a TCP gate in front of the sink
/// that can be closed (connections refused, open ones cut) and opened again
/// on the same port.
struct Gate {
    port: u16,
    target: u16,
    task: Option<JoinHandle<()>>,
}

impl Gate {
    async fn start(target: u16) -> anyhow::Result<Self> {
        let mut gate = Self {
            port: free_port()?,
            target,
            task: None,
        };
        gate.open().await?;
        Ok(gate)
    }

    async fn open(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            // Dropped with the task: closing the gate cuts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        // The gate stands for a network link: it adds no
                        // Nagle wait of its own to what it forwards (a
                        // chunk following an unacknowledged one would wait
                        // for the peer's delayed ACK, up to 40 ms).
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
        Ok(())
    }

    async fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The Stripe API as fulfilment reads it: the line items of session
/// `cs_chaos_…_u{units}` are `units` basic kits.
async fn stripe_standin() -> anyhow::Result<String> {
    async fn line_items(UrlPath(id): UrlPath<String>) -> Json<Value> {
        let units: i64 = id
            .rsplit_once("_u")
            .and_then(|(_, u)| u.parse().ok())
            .unwrap_or(1);
        Json(json!({
            "object": "list",
            "has_more": false,
            "data": [{
                "id": format!("li_{id}"),
                "object": "item",
                "amount_total": 2000 * units,
                "quantity": units,
                "price": { "id": "price_basic_kit", "object": "price", "unit_amount": 2000 },
            }],
        }))
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = Router::new().route("/v1/checkout/sessions/{id}/line_items", get(line_items));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// One order of the load, from its webhook to its email.
#[derive(Clone)]
struct Entry {
    channel: &'static str,
    order_id: String,
    units: u32,
    accepted_at: Option<Instant>,
    /// When the sink first accepted its code email (its codes were issued
    /// before the email was rendered).
    done_at: Option<Instant>,
}

/// One webhook post: when it started, how long until an answer (or the
/// timeout), and whether the answer was a 2xx.
#[derive(Clone, Copy)]
struct Attempt {
    started: Instant,
    took: Duration,
    ok: bool,
}

#[derive(Default, Clone)]
struct Ledger {
    entries: Vec<Entry>,
    attempts: Vec<Attempt>,
}

type Shared = Arc<Mutex<Ledger>>;

fn order_webhook(run: &str, i: usize) -> (&'static str, String, u32, load::Webhook) {
    let units = 1 + (i / 3 % 3) as u32;
    let now = chrono::Utc::now().timestamp();
    match i % 3 {
        0 => (
            "native",
            format!("ord_{run}_{i}"),
            units,
            load::native_purchase(run, i, units, now),
        ),
        1 => {
            let session = format!("cs_chaos_{run}_{i}_u{units}");
            let hook = load::stripe_session_completed(run, i, &session, now);
            ("stripe", session, units, hook)
        }
        _ => {
            let id = 6_000_000_000 + i as u64;
            (
                "shopify",
                id.to_string(),
                units,
                load::shopify_paid(run, id, i, units),
            )
        }
    }
}

/// Posts one webhook until it is answered 2xx, as a channel retries.
async fn send(
    http: reqwest::Client,
    gateway: String,
    hook: load::Webhook,
    i: usize,
    ledger: Shared,
) {
    loop {
        let started = Instant::now();
        let mut request = http
            .post(format!("{gateway}{}", hook.path))
            .header("content-type", "application/json");
        for (name, value) in &hook.headers {
            request = request.header(*name, value);
        }
        let ok = match request.body(hook.body.clone()).send().await {
            Ok(response) => {
                let ok = response.status().is_success();
                let _ = response.bytes().await;
                ok
            }
            Err(_) => false,
        };
        let took = started.elapsed();
        {
            let mut ledger = ledger.lock().expect("ledger");
            ledger.attempts.push(Attempt { started, took, ok });
            if ok {
                ledger.entries[i].accepted_at = Some(started + took);
            }
        }
        if ok {
            return;
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// Sends orders at `rate` a second until `stop`; returns the senders (some
/// may still be retrying).
async fn drive(
    gateway: String,
    rate: f64,
    ledger: Shared,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let http = reqwest::Client::builder()
        .timeout(ANSWER_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    let mut senders = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let (channel, order_id, units, hook) = order_webhook("c", i);
        ledger.lock().expect("ledger").entries.push(Entry {
            channel,
            order_id,
            units,
            accepted_at: None,
            done_at: None,
        });
        senders.push(tokio::spawn(send(
            http.clone(),
            gateway.clone(),
            hook,
            i,
            ledger.clone(),
        )));
        senders.retain(|s| !s.is_finished());
    }
    senders
}

/// Marks accepted orders done once their codes are all issued and their
/// code email is sent; the time is the sink's first arrival of the email.
async fn track(pool: PgPool, sink: Sink, ledger: Shared, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let pending: Vec<(usize, String, String, i32)> = {
            let ledger = ledger.lock().expect("ledger");
            ledger
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.accepted_at.is_some() && e.done_at.is_none())
                .map(|(i, e)| (i, e.channel.to_owned(), e.order_id.clone(), e.units as i32))
                .collect()
        };
        if pending.is_empty() {
            continue;
        }
        let index: Vec<i64> = pending.iter().map(|p| p.0 as i64).collect();
        let channels: Vec<&str> = pending.iter().map(|p| p.1.as_str()).collect();
        let orders: Vec<&str> = pending.iter().map(|p| p.2.as_str()).collect();
        let units: Vec<i32> = pending.iter().map(|p| p.3).collect();
        let done: Result<Vec<(i64, String)>, _> = sqlx::query_as(
            "SELECT a.i, d.message_id
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::int4[]) AS a(i, channel, order_id, units)
             JOIN orders o ON o.channel = a.channel AND o.channel_order_id = a.order_id
             JOIN email_delivery d ON d.order_id = o.id AND d.kind = 'order_codes' AND d.status = 'sent'
             WHERE (SELECT count(*) FROM order_line l JOIN activation_code c ON c.order_line_id = l.id
                    WHERE l.order_id = o.id) >= a.units",
        )
        .bind(&index)
        .bind(&channels)
        .bind(&orders)
        .bind(&units)
        .fetch_all(&pool)
        .await;
        // Postgres may be down (a fault): ask again next round.
        let Ok(done) = done else { continue };
        if done.is_empty() {
            continue;
        }
        let arrivals = sink.arrivals_of(done.iter().map(|(_, message_id)| message_id));
        let now = Instant::now();
        let mut ledger = ledger.lock().expect("ledger");
        for ((i, _), arrival) in done.iter().zip(arrivals) {
            ledger.entries[*i as usize].done_at = Some(arrival.unwrap_or(now));
        }
    }
}

/// One row of the table.
struct Phase {
    name: String,
    started: Instant,
    /// When the fault was over (the last worker restarted, Redis or Postgres
    /// answering again, the SMTP server back).
    ended: Instant,
    /// Seconds from `ended` until every order accepted by then was done;
    /// None when that took longer than the limit.
    healed: Option<f64>,
    /// The duplicate email target applies to this row.
    kills: bool,
}

/// Waits until every order accepted before `cutoff` is done; returns when
/// the last of them was done, or None after `limit`.
async fn wait_done(ledger: &Shared, cutoff: Instant, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        {
            let ledger = ledger.lock().expect("ledger");
            let accepted = ledger
                .entries
                .iter()
                .filter(|e| e.accepted_at.is_some_and(|a| a <= cutoff));
            let mut last = cutoff;
            let mut all = true;
            for entry in accepted {
                match entry.done_at {
                    Some(done) => last = last.max(done),
                    None => all = false,
                }
            }
            if all {
                return Some(last);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pending_count(ledger: &Shared) -> usize {
    let ledger = ledger.lock().expect("ledger");
    ledger
        .entries
        .iter()
        .filter(|e| e.accepted_at.is_some() && e.done_at.is_none())
        .count()
}

/// The environment the suite runs in; removed when dropped (best effort).
struct Env {
    root: PathBuf,
    postgres: Option<Postgres>,
    redis: Option<Redis>,
    keep: bool,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.redis.take();
        self.postgres.take();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

pub async fn run(opts: &Options) -> anyhow::Result<()> {
    let settings = opts.settings();
    let root = std::env::temp_dir().join(format!("entitle-chaos-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    let mut env = Env {
        root: root.clone(),
        postgres: None,
        redis: None,
        keep: true,
    };
    println!(
        "chaos{}: {} orders/s from native, Stripe and Shopify, two workers; \
         private Postgres and Redis under {}",
        if opts.quick { " (quick)" } else { "" },
        settings.rate,
        root.display()
    );
    env.postgres = Some(Postgres::start(&root)?);
    env.redis = Some(Redis::start(&root).await?);
    let outcome = faults(opts, &settings, &mut env).await;
    match &outcome {
        Ok(true) => env.keep = opts.keep,
        _ => println!("logs kept under {}", root.display()),
    }
    drop(env);
    ensure!(outcome?, "the fault suite failed (see above)");
    Ok(())
}

/// Runs the load and the faults; Ok(false) when a check failed.
async fn faults(opts: &Options, settings: &Settings, env: &mut Env) -> anyhow::Result<bool> {
    let postgres = env.postgres.as_ref().context("postgres")?;
    let admin_url = postgres.url();
    let redis_url = env.redis.as_ref().context("redis")?.url();
    let stripe = stripe_standin().await?;
    // The gate needs the sink's port, and the stack makes the sink.
    let mut stack = Stack::prepare_with(
        &admin_url,
        &redis_url,
        "entitle_chaos",
        10,
        &[
            format!("stripe.api_base={stripe}"),
            "stripe.api_key=sk_chaos".to_owned(),
        ],
        opts.binaries.as_deref(),
    )
    .await?;
    let mut gate = Gate::start(stack.sink.port).await?;
    stack.set_env(
        "ENTITLE_EMAIL__SMTP_URL",
        &format!("smtp://127.0.0.1:{}", gate.port),
    );
    println!(
        "  logs of the gateway and workers in {}",
        stack.dir.display()
    );
    stack.start_gateway().await?;
    stack.start_workers(2)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.check_workers()?;

    let ledger: Shared = Arc::default();
    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_tracking = Arc::new(AtomicBool::new(false));
    let tracker = tokio::spawn(track(
        stack.pool.clone(),
        stack.sink.clone(),
        ledger.clone(),
        stop_tracking.clone(),
    ));
    let load = tokio::spawn(drive(
        stack.gateway_url.clone(),
        settings.rate,
        ledger.clone(),
        stop_load.clone(),
    ));

    let mut phases = Vec::new();
    let started = Instant::now();
    tokio::time::sleep(settings.warmup).await;
    phases.push(Phase {
        name: "none (steady load)".into(),
        started,
        ended: Instant::now(),
        healed: None,
        kills: false,
    });
    settle(&ledger, phases.last_mut().expect("a phase"), settings).await;

    let faults = [
        format!("{} worker SIGKILLs", settings.kills),
        "Redis FLUSHALL".into(),
        format!(
            "Redis kill -9, empty after {} s",
            settings.redis_down.as_secs()
        ),
        "Postgres restart -m immediate".into(),
        format!("SMTP down {} s", settings.smtp_down.as_secs()),
    ];
    // When each worker was killed: a duplicate email should have been
    // accepted just before one.
    let mut kills_at: Vec<Kill> = Vec::new();
    for (n, name) in faults.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        println!("  fault: {name}");
        match n {
            0 => {
                for k in 0..settings.kills {
                    // Every 1 to 2 s, alternating between the two workers.
                    let pause = 1000 + (k as u64 * 617) % 1000;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    let sent = std::time::SystemTime::now();
                    stack.kill_worker(k % 2).await?;
                    kills_at.push(Kill {
                        sent,
                        reaped: std::time::SystemTime::now(),
                    });
                    stack.restart_worker(k % 2)?;
                }
            }
            1 => env.redis.as_ref().context("redis")?.flushall().await?,
            2 => {
                let redis = env.redis.as_mut().context("redis")?;
                redis.kill().await?;
                tokio::time::sleep(settings.redis_down).await;
                redis.spawn().await?;
            }
            3 => {
                env.postgres
                    .as_ref()
                    .context("postgres")?
                    .restart_immediate()
                    .await?
            }
            _ => {
                gate.close().await;
                tokio::time::sleep(settings.smtp_down).await;
                gate.open().await?;
            }
        }
        phases.push(Phase {
            name,
            started,
            ended: Instant::now(),
            healed: None,
            kills: n == 0,
        });
        settle(&ledger, phases.last_mut().expect("a phase"), settings).await;
        stack.check_workers()?;
    }

    // The load stops; every order a sender still retries is sent, and every
    // order accepted gets its last chance to be done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_load.store(true, Ordering::Relaxed);
    let senders = load.await?;
    for sender in senders {
        let _ = tokio::time::timeout(Duration::from_secs(30), sender).await;
    }
    let _ = wait_done(&ledger, Instant::now(), Duration::from_secs(60)).await;
    stop_tracking.store(true, Ordering::Relaxed);
    let _ = tracker.await;
    let passed = report(&stack, &ledger, &phases, settings, &kills_at).await?;
    let logs = stack.dir.clone();
    stack.finish(true).await?;
    gate.close().await;
    if passed && !opts.keep {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(passed)
}

/// Waits until every order accepted by the fault's end is done (its heal
/// time), then until every order accepted so far is, before the next fault.
async fn settle(ledger: &Shared, phase: &mut Phase, settings: &Settings) {
    match wait_done(ledger, phase.ended, settings.heal_limit).await {
        Some(last) => {
            let healed = last.saturating_duration_since(phase.ended).as_secs_f64();
            phase.healed = Some(healed);
            println!("    all done {healed:.1} s after the fault's end");
        }
        None => println!(
            "    NOT all done {} s after the fault's end ({} orders waiting)",
            settings.heal_limit.as_secs(),
            pending_count(ledger)
        ),
    }
    let now = Instant::now();
    if wait_done(ledger, now, settings.heal_limit).await.is_none() {
        println!(
            "    orders accepted since are not all done either ({} waiting)",
            pending_count(ledger)
        );
    }
}

/// What the database says about one order.
#[derive(sqlx::FromRow)]
struct Checked {
    i: i64,
    /// Order rows for the channel's order id.
    rows: i64,
    /// Units on its lines.
    quantity: i64,
    /// Codes beyond a line's quantity, summed over its lines.
    excess_codes: i64,
    /// Its codes whose hash another code has too.
    shared_hashes: i64,
    /// `order.created` audit events.
    created: i64,
    /// Code emails (deliveries) made for it.
    deliveries: i64,
    message_ids: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Row {
    accepted: usize,
    lost: usize,
    duplicate_codes: usize,
    twice: usize,
    duplicate_emails: usize,
}

/// One worker SIGKILL: when the signal was about to be sent, and when the
/// process had been reaped (dead, its sockets closed by the kernel).
#[derive(Debug, Clone, Copy)]
struct Kill {
    sent: std::time::SystemTime,
    reaped: std::time::SystemTime,
}

/// Where a twice-sent email's first acceptance fell against its nearest
/// kill: before the signal (the sender's window: accepted, not yet
/// recorded), while it landed, or after the process was gone (the server
/// took what the dead socket still held: no sender can record that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Against {
    Before,
    Landing,
    AfterDeath,
}

impl Kill {
    /// Milliseconds from `at` to the signal (negative: `at` came after it),
    /// and where `at` falls.
    fn against(&self, at: std::time::SystemTime) -> (f64, Against) {
        let ms = |from: std::time::SystemTime, to: std::time::SystemTime| match to
            .duration_since(from)
        {
            Ok(d) => d.as_secs_f64() * 1000.0,
            Err(e) => -e.duration().as_secs_f64() * 1000.0,
        };
        let to_signal = ms(at, self.sent);
        let place = if to_signal > 0.0 {
            Against::Before
        } else if ms(at, self.reaped) >= 0.0 {
            Against::Landing
        } else {
            Against::AfterDeath
        };
        (to_signal, place)
    }
}

async fn report(
    stack: &Stack,
    ledger: &Shared,
    phases: &[Phase],
    settings: &Settings,
    kills_at: &[Kill],
) -> anyhow::Result<bool> {
    // A copy: a sender still retrying must not wait for the report.
    let ledger = ledger.lock().expect("ledger").clone();
    let accepted: Vec<(usize, &Entry)> = ledger
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.accepted_at.is_some())
        .collect();
    let index: Vec<i64> = accepted.iter().map(|(i, _)| *i as i64).collect();
    let channels: Vec<&str> = accepted.iter().map(|(_, e)| e.channel).collect();
    let orders: Vec<&str> = accepted.iter().map(|(_, e)| e.order_id.as_str()).collect();
    let checked: Vec<Checked> = sqlx::query_as(
        "SELECT a.i,
                (SELECT count(*) FROM orders o2
                 WHERE o2.channel = a.channel AND o2.channel_order_id = a.order_id) AS rows,
                coalesce((SELECT sum(l.quantity) FROM order_line l WHERE l.order_id = o.id), 0)::int8 AS quantity,
                coalesce((SELECT sum(greatest(0, (SELECT count(*) FROM activation_code c
                                                   WHERE c.order_line_id = l.id) - l.quantity))
                          FROM order_line l WHERE l.order_id = o.id), 0)::int8 AS excess_codes,
                (SELECT count(*) FROM order_line l JOIN activation_code c ON c.order_line_id = l.id
                 WHERE l.order_id = o.id
                   AND EXISTS (SELECT 1 FROM activation_code c2
                               WHERE c2.code_hash = c.code_hash AND c2.id <> c.id)) AS shared_hashes,
                (SELECT count(*) FROM audit_event e WHERE e.subject_type = 'order'
                   AND e.subject_id = o.id::text AND e.action = 'order.created') AS created,
                (SELECT count(*) FROM email_delivery d
                 WHERE d.order_id = o.id AND d.kind = 'order_codes') AS deliveries,
                coalesce((SELECT array_agg(d.message_id) FROM email_delivery d
                          WHERE d.order_id = o.id AND d.kind = 'order_codes'), '{}') AS message_ids
         FROM unnest($1::int8[], $2::text[], $3::text[]) AS a(i, channel, order_id)
         LEFT JOIN orders o ON o.channel = a.channel AND o.channel_order_id = a.order_id",
    )
    .bind(&index)
    .bind(&channels)
    .bind(&orders)
    .fetch_all(&stack.pool)
    .await?;
    let by_index: HashMap<usize, &Checked> = checked.iter().map(|c| (c.i as usize, c)).collect();
    let times = stack.sink.times();
    // Each phase holds the orders accepted from its start to the next's.
    let phase_of = |at: Instant| phases.iter().rposition(|p| p.started <= at).unwrap_or(0);
    let mut rows = vec![Row::default(); phases.len()];
    for (i, entry) in &accepted {
        let row = &mut rows[phase_of(entry.accepted_at.expect("accepted"))];
        row.accepted += 1;
        if entry.done_at.is_none() {
            row.lost += 1;
        }
        let Some(c) = by_index.get(i) else {
            continue;
        };
        if c.excess_codes > 0 || c.shared_hashes > 0 || c.quantity > i64::from(entry.units) {
            row.duplicate_codes += 1;
        }
        if c.rows > 1 || c.created > 1 || c.deliveries > 1 {
            row.twice += 1;
        }
        row.duplicate_emails += c
            .message_ids
            .iter()
            .map(|m| times.get(m).copied().unwrap_or(0).saturating_sub(1))
            .sum::<usize>();
    }
    // Latency: each fault and the few seconds after it (not into the next).
    let latency = |k: usize| {
        let phase = &phases[k];
        let mut to = if k == 0 {
            phase.ended
        } else {
            phase.ended + LATENCY_TAIL
        };
        if let Some(next) = phases.get(k + 1) {
            to = to.min(next.started);
        }
        let mut histogram = Histogram::<u64>::new(3).expect("a histogram");
        let mut failed = 0;
        for a in ledger
            .attempts
            .iter()
            .filter(|a| a.started >= phase.started && a.started <= to)
        {
            histogram.record(a.took.as_micros() as u64).ok();
            failed += usize::from(!a.ok);
        }
        (histogram.value_at_quantile(0.99) as f64 / 1000.0, failed)
    };
    println!(
        "\n| fault | orders accepted | lost | duplicate codes | fulfilled twice | duplicate emails | \
         all done after the fault | webhook p99 (non-2xx) | targets |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut passed = true;
    for (k, (phase, row)) in phases.iter().zip(&rows).enumerate() {
        let (p99, failed) = latency(k);
        let rate = 100.0 * row.duplicate_emails as f64 / row.accepted.max(1) as f64;
        let mut verdict = Vec::new();
        if row.lost > 0 {
            verdict.push("LOST".to_owned());
        }
        if row.duplicate_codes > 0 {
            verdict.push("DUPLICATE CODES".to_owned());
        }
        if row.twice > 0 {
            verdict.push("FULFILLED TWICE".to_owned());
        }
        let heal_ok = phase.healed.is_some_and(|h| h <= HEAL_TARGET_SECS);
        if k > 0 {
            verdict.push(format!(
                "heal ≤ {HEAL_TARGET_SECS:.0} s {}",
                if heal_ok { "ok" } else { "MISSED" }
            ));
        }
        if phase.kills {
            verdict.push(format!(
                "dup emails ≤ {DUPLICATE_EMAIL_TARGET_PCT} % {}",
                if rate <= DUPLICATE_EMAIL_TARGET_PCT {
                    "ok"
                } else {
                    "MISSED"
                }
            ));
        }
        if row.lost > 0 || row.duplicate_codes > 0 || row.twice > 0 {
            passed = false;
        }
        if k > 0 && settings.enforce_heal && !heal_ok {
            passed = false;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} ({:.2} %) | {} | {:.0} ms ({}) | {} |",
            phase.name,
            row.accepted,
            row.lost,
            row.duplicate_codes,
            row.twice,
            row.duplicate_emails,
            rate,
            match phase.healed {
                Some(h) if k > 0 => format!("{h:.1} s"),
                Some(_) => "-".to_owned(),
                None => format!("> {} s", settings.heal_limit.as_secs()),
            },
            p99,
            failed,
            verdict.join(", ")
        );
    }
    let total: Row = rows.iter().fold(Row::default(), |a, r| Row {
        accepted: a.accepted + r.accepted,
        lost: a.lost + r.lost,
        duplicate_codes: a.duplicate_codes + r.duplicate_codes,
        twice: a.twice + r.twice,
        duplicate_emails: a.duplicate_emails + r.duplicate_emails,
    });
    let codes: i64 = sqlx::query_scalar("SELECT count(*) FROM activation_code")
        .fetch_one(&stack.pool)
        .await?;
    let units: i64 = accepted.iter().map(|(_, e)| i64::from(e.units)).sum();
    println!(
        "\n  {} orders accepted ({} units, {} codes in the database), {} lost, {} with duplicate \
         codes, {} fulfilled twice; the sink took {} emails for {} Message-IDs",
        total.accepted,
        units,
        codes,
        total.lost,
        total.duplicate_codes,
        total.twice,
        stack.sink.total(),
        stack.sink.distinct()
    );
    // How long an accepted email went unrecorded: a worker killed in that
    // window sends it again. Postgres' `sent_at` is when the recording
    // statement started.
    let recorded: Vec<(String, f64)> = sqlx::query_as(
        "SELECT message_id, extract(epoch FROM sent_at)::float8 FROM email_delivery
         WHERE status = 'sent'",
    )
    .fetch_all(&stack.pool)
    .await?;
    let accepted_at = stack.sink.arrivals_wall();
    let mut gaps: Vec<f64> = recorded
        .iter()
        .filter_map(|(id, sent)| {
            let at = accepted_at.get(id)?;
            let at = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
            Some((sent - at) * 1000.0)
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    if !gaps.is_empty() {
        let at = |q: f64| gaps[((gaps.len() - 1) as f64 * q) as usize];
        println!(
            "  accepted by SMTP → recording statement started: p50 {:.1} ms, p90 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms ({} emails)",
            at(0.5),
            at(0.9),
            at(0.99),
            gaps[gaps.len() - 1],
            gaps.len()
        );
    }
    // Which emails came twice, and what Postgres says of each: where to
    // look (the deliveries' attempts and audit events, the workers' logs).
    let mut twice: Vec<String> = times
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    twice.sort();
    let mut places: HashMap<&str, usize> = HashMap::new();
    for (n, id) in twice.iter().enumerate() {
        let row: Option<(uuid::Uuid, i32, String)> =
            sqlx::query_as("SELECT id, attempts, status FROM email_delivery WHERE message_id = $1")
                .bind(id)
                .fetch_optional(&stack.pool)
                .await?;
        if let Some((delivery, attempts, status)) = row {
            let history: Option<String> = sqlx::query_scalar(
                "SELECT string_agg(action || ' ' || to_char(occurred_at, 'HH24:MI:SS.MS'), ', '
                                   ORDER BY id)
                 FROM audit_event WHERE subject_type = 'delivery' AND subject_id = $1",
            )
            .bind(delivery.to_string())
            .fetch_one(&stack.pool)
            .await?;
            // The kill nearest the first acceptance, in ms (negative: the
            // server took the message after the sender was killed, from
            // what its socket still held).
            let nearest_kill = accepted_at.get(id).and_then(|at| {
                kills_at
                    .iter()
                    .map(|k| k.against(*at))
                    .min_by(|a, b| a.0.abs().total_cmp(&b.0.abs()))
            });
            let place = match nearest_kill {
                None => "no kill near",
                Some((_, Against::Before)) => "accepted before the kill",
                Some((_, Against::Landing)) => "accepted while the kill landed",
                Some((_, Against::AfterDeath)) => "accepted after the killed worker was gone",
            };
            *places.entry(place).or_default() += 1;
            if n < 20 {
                println!(
                    "  sent twice: delivery {delivery} ({attempts} attempts, {status}): {}; \
                     the nearest kill was signalled {} after it was first accepted ({place})",
                    history.unwrap_or_default(),
                    nearest_kill.map_or("(none)".to_owned(), |(ms, _)| format!("{ms:.1} ms"))
                );
            }
        }
    }
    if !twice.is_empty() {
        let mut places: Vec<(&str, usize)> = places.into_iter().collect();
        places.sort();
        println!(
            "  emails sent twice, by their first acceptance: {}",
            places
                .iter()
                .map(|(place, n)| format!("{n} {place}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if codes != units {
        println!("  MISMATCH: {codes} codes for {units} units");
        passed = false;
    }
    println!(
        "  {}",
        if passed {
            "passed: nothing lost, no code twice, no order fulfilled twice"
        } else {
            "FAILED"
        }
    );
    Ok(passed)
}
