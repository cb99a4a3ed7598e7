//! The platform API's hot path under load, on the release gateway: every
//! code of a batch redeemed once (`POST /v1/redemptions`) and fresh codes
//! checked (`POST /v1/codes/check`) over keep-alive connections with a
//! platform key, each next to a `pgbench` floor of one single-row update by
//! primary key measured in the same run, and where Postgres spent the time.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use entitle_jobs::{
    Config,
    code::{Code, CodeKeys},
    platform_key,
};
use hdrhistogram::Histogram;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use sqlx::{Connection as _, PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    Figure,
    floor::{self, FloorKind},
    seed,
    stack::{self, Stack},
};

/// What the redemption benchmarks run with.
#[derive(Debug, Clone)]
pub struct Options {
    pub admin_url: String,
    pub redis_url: String,
    /// Codes redeemed (each once), and as many fresh ones checked.
    pub codes: usize,
    /// Client connections posting at once.
    pub connections: usize,
    /// Postgres connections of the gateway.
    pub pool_size: u32,
    /// `section.key=value` settings layered over Entitle's configuration.
    pub settings: Vec<String>,
    pub keep: bool,
    pub redeem: bool,
    pub check: bool,
}

/// Bounds on a 2-core machine, relative to the update floor.
pub struct Bounds {
    pub redeem_ratio: f64,
    pub redeem_p99_ms: f64,
    pub check_ratio: f64,
}

pub const BOUNDS: Bounds = Bounds {
    redeem_ratio: 0.35,
    redeem_p99_ms: 10.0,
    check_ratio: 0.5,
};

/// Codes redeemed and checked before the clock starts, so the measured
/// phases find the gateway's key cache, pools and prepared statements warm.
const WARM: usize = 1_000;

/// The batches' ids: redeemed, checked, warm-up.
const REDEEM_BATCH: Uuid = Uuid::from_u128(0xbe7c_0de5_0000_0000_0000_0000_0000_0001);
const CHECK_BATCH: Uuid = Uuid::from_u128(0xbe7c_0de5_0000_0000_0000_0000_0000_0002);
const WARM_BATCH: Uuid = Uuid::from_u128(0xbe7c_0de5_0000_0000_0000_0000_0000_0003);

/// Whether an answer is the one expected: (status, body).
type Expect = fn(u16, &[u8]) -> bool;

/// What posting a list of bodies measured.
struct Posted {
    elapsed: Duration,
    latency: Histogram<u64>,
    /// Answers that were not the expected one, by status, and a few bodies.
    unexpected: BTreeMap<u16, usize>,
    samples: Vec<String>,
}

impl Posted {
    fn rate(&self) -> f64 {
        self.latency.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn p(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn wrong(&self) -> usize {
        self.unexpected.values().sum()
    }
}

/// Posts every body to `path` over `connections` keep-alive connections, as
/// fast as answers come back.
async fn post_all(
    gateway: &str,
    path: &str,
    key: &str,
    bodies: Vec<String>,
    connections: usize,
    expect: Expect,
) -> anyhow::Result<Posted> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()?;
    let url = format!("{gateway}{path}");
    let auth = HeaderValue::from_str(&format!("Bearer {key}"))?;
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
        let (bodies, next) = (bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3).expect("a histogram");
            let mut unexpected = BTreeMap::<u16, usize>::new();
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let sent = Instant::now();
                let response = http
                    .post(&url)
                    .header(AUTHORIZATION, auth.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let answer = response.bytes().await?;
                latency.record(sent.elapsed().as_micros() as u64).ok();
                if !expect(status, &answer) {
                    *unexpected.entry(status).or_default() += 1;
                    if samples.len() < 3 {
                        samples.push(format!("{status} {}", String::from_utf8_lossy(&answer)));
                    }
                }
            }
            anyhow::Ok((latency, unexpected, samples))
        }));
    }
    let mut posted = Posted {
        elapsed: Duration::ZERO,
        latency: Histogram::<u64>::new(3).expect("a histogram"),
        unexpected: BTreeMap::new(),
        samples: Vec::new(),
    };
    for task in tasks {
        let (latency, unexpected, samples) = task.await??;
        posted.latency.add(latency).ok();
        for (status, n) in unexpected {
            *posted.unexpected.entry(status).or_default() += n;
        }
        posted.samples.extend(samples);
    }
    posted.elapsed = started.elapsed();
    Ok(posted)
}

fn redeem_bodies(codes: &[Code], account: &str) -> Vec<String> {
    codes
        .iter()
        .enumerate()
        .map(|(i, code)| {
            serde_json::json!({
                "code": code.display(),
                "account_id": format!("{account}_{i}"),
                "entity_ref": format!("child_{i}"),
            })
            .to_string()
        })
        .collect()
}

fn check_bodies(codes: &[Code]) -> Vec<String> {
    codes
        .iter()
        .map(|code| serde_json::json!({ "code": code.display() }).to_string())
        .collect()
}

fn created(status: u16, _: &[u8]) -> bool {
    status == 201
}

/// 200 with the same redemption: the same holder asked again.
fn same_again(status: u16, _: &[u8]) -> bool {
    status == 200
}

fn taken(status: u16, body: &[u8]) -> bool {
    status == 409 && field(body, "code") == Some("code_already_redeemed".into())
}

fn valid_issued(status: u16, body: &[u8]) -> bool {
    status == 200
        && field(body, "state") == Some("issued".into())
        && field(body, "product_sku") == Some("KIT-BASIC".into())
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v["valid"] == serde_json::Value::Bool(true))
}

fn invalid_redeemed(status: u16, body: &[u8]) -> bool {
    status == 200
        && field(body, "state") == Some("redeemed".into())
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v["valid"] == serde_json::Value::Bool(false))
}

fn field(body: &[u8], name: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get(name)?.as_str().map(str::to_owned)
}

/// Where Postgres spent a phase: the statements by total time (from
/// `pg_stat_statements`, when the server preloads it), and always samples
/// of what the gateway's backends were doing.
struct Profile {
    statements: bool,
    sampler: Sampler,
}

impl Profile {
    async fn start(stack: &Stack) -> anyhow::Result<Self> {
        let statements = statements_available(&stack.pool).await?;
        if statements {
            sqlx::query(
                "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database
                                                     WHERE datname = current_database()), 0)",
            )
            .execute(&stack.pool)
            .await?;
        }
        Ok(Self {
            statements,
            sampler: Sampler::start(&stack.database_url).await?,
        })
    }

    /// Prints the profile; `ops` answered in `seconds`.
    async fn finish(self, stack: &Stack, ops: u64, seconds: f64) -> anyhow::Result<()> {
        let samples = self.sampler.finish().await?;
        if self.statements {
            let top: Vec<(i64, f64, f64, String)> = sqlx::query_as(
                "SELECT calls, total_exec_time, mean_exec_time, query FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 ORDER BY total_exec_time DESC LIMIT 6",
            )
            .fetch_all(&stack.pool)
            .await?;
            println!("    top statements by total time (pg_stat_statements):");
            for (calls, total, mean, query) in top {
                println!(
                    "      {total:>9.0} ms {calls:>8} calls {mean:>7.3} ms each  {}",
                    summary(&query, 90)
                );
            }
        } else {
            println!(
                "    (pg_stat_statements is not in this server's shared_preload_libraries; \
                 from sampling pg_stat_activity every 10 ms instead)"
            );
        }
        samples.print(ops, seconds);
        Ok(())
    }
}

async fn statements_available(pool: &PgPool) -> anyhow::Result<bool> {
    let preloaded: String =
        sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
            .fetch_one(pool)
            .await?;
    if !preloaded.contains("pg_stat_statements") {
        return Ok(false);
    }
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await?;
    Ok(true)
}

/// A statement on one line, shortened.
fn summary(query: &str, width: usize) -> String {
    let line = query.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(width) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// Samples `pg_stat_activity` for the benchmark database's client backends:
/// the gateway's (the benchmark's own connections are named `entitle-bench`
/// and left out, as is the sampler).
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<Samples>>,
}

/// Backend samples by what they were doing.
#[derive(Default)]
struct Samples {
    rounds: u64,
    /// (statement, wait event or CPU) → samples of an active backend.
    active: HashMap<(String, String), u64>,
    /// Backends idle or idle in transaction.
    idle: HashMap<String, u64>,
}

impl Sampler {
    async fn start(url: &str) -> anyhow::Result<Self> {
        let mut conn = PgConnection::connect(url).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                let rows: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, 'CPU'),
                            left(query, 300)
                     FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND backend_type = 'client backend' AND application_name <> 'entitle-bench'",
                )
                .fetch_all(&mut conn)
                .await?;
                samples.rounds += 1;
                for (state, wait, query) in rows {
                    if state == "active" {
                        *samples
                            .active
                            .entry((summary(&query, 70), wait))
                            .or_default() += 1;
                    } else {
                        *samples.idle.entry(state).or_default() += 1;
                    }
                }
            }
            conn.close().await.ok();
            anyhow::Ok(samples)
        });
        Ok(Self { stop, task })
    }

    async fn finish(self) -> anyhow::Result<Samples> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

impl Samples {
    /// Prints what the backends did; by Little's law, active backends over
    /// throughput is the time a request spent in Postgres.
    fn print(&self, ops: u64, seconds: f64) {
        let rounds = self.rounds.max(1) as f64;
        let active: u64 = self.active.values().sum();
        let busy = active as f64 / rounds;
        let rate = ops as f64 / seconds.max(1e-9);
        println!(
            "    gateway backends: {busy:.1} active on average ({:.2} ms in Postgres per request), \
             {:.1} idle ({})",
            busy / rate * 1000.0,
            self.idle.values().sum::<u64>() as f64 / rounds,
            self.idle
                .iter()
                .map(|(state, n)| format!("{state} {:.1}", *n as f64 / rounds))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut by_statement: HashMap<&str, u64> = HashMap::new();
        for ((statement, _), n) in &self.active {
            *by_statement.entry(statement).or_default() += n;
        }
        let mut statements: Vec<_> = by_statement.into_iter().collect();
        statements.sort_by_key(|s| std::cmp::Reverse(s.1));
        println!("    active backend time by statement, and within it by wait:");
        for (statement, n) in statements.into_iter().take(4) {
            println!(
                "      {:>5.1} %  {statement}",
                n as f64 * 100.0 / active.max(1) as f64
            );
            let mut waits: Vec<_> = self
                .active
                .iter()
                .filter(|((s, _), _)| s == statement)
                .map(|((_, wait), n)| (wait.as_str(), *n))
                .collect();
            waits.sort_by_key(|w| std::cmp::Reverse(w.1));
            let line = waits
                .iter()
                .take(6)
                .map(|(wait, w)| format!("{wait} {:.0} %", *w as f64 * 100.0 / n.max(1) as f64))
                .collect::<Vec<_>>()
                .join(", ");
            println!("               {line}");
        }
    }
}

/// CPU the processes used over a phase, in cores.
struct Cpu {
    gateway: Option<f64>,
    bench: Option<f64>,
    postgres: f64,
    jiffies: (u64, u64),
    at: Instant,
}

impl Cpu {
    fn start(stack: &Stack) -> Self {
        Cpu {
            gateway: stack.gateway_pid().and_then(stack::cpu_seconds),
            bench: stack::cpu_seconds(std::process::id()),
            postgres: stack::postgres_cpu_seconds(),
            jiffies: stack::machine_jiffies(),
            at: Instant::now(),
        }
    }

    fn print(&self, stack: &Stack) {
        let seconds = self.at.elapsed().as_secs_f64();
        let cores = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(b), Some(a)) => format!("{:.2}", (a - b) / seconds),
            _ => "?".into(),
        };
        let (busy, total) = stack::machine_jiffies();
        println!(
            "    CPU: machine {:.0} % busy; gateway {} cores, Postgres {:.2}, this client {}",
            (busy - self.jiffies.0) as f64 * 100.0 / (total - self.jiffies.1).max(1) as f64,
            cores(
                self.gateway,
                stack.gateway_pid().and_then(stack::cpu_seconds)
            ),
            (stack::postgres_cpu_seconds() - self.postgres) / seconds,
            cores(self.bench, stack::cpu_seconds(std::process::id())),
        );
    }
}

/// One measured phase: posts, prints the figures and the profile.
async fn phase(
    stack: &Stack,
    what: &str,
    path: &str,
    key: &str,
    bodies: Vec<String>,
    connections: usize,
    expect: Expect,
) -> anyhow::Result<Posted> {
    stack::checkpoint(&stack.pool).await?;
    let profile = Profile::start(stack).await?;
    let cpu = Cpu::start(stack);
    let posted = post_all(&stack.gateway_url, path, key, bodies, connections, expect).await?;
    cpu.print(stack);
    profile
        .finish(stack, posted.latency.len(), posted.elapsed.as_secs_f64())
        .await?;
    println!(
        "  {what}: {} in {:.1} s = {:.0} ops/s; p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        posted.latency.len(),
        posted.elapsed.as_secs_f64(),
        posted.rate(),
        posted.p(0.5),
        posted.p(0.99),
        posted.latency.max() as f64 / 1000.0
    );
    Ok(posted)
}

/// Fails, saying what came back, when any answer was not the expected one.
fn all_expected(what: &str, posted: &Posted) -> anyhow::Result<()> {
    ensure!(
        posted.wrong() == 0,
        "{what}: {} unexpected answers by status {:?}, e.g. {:?}",
        posted.wrong(),
        posted.unexpected,
        posted.samples
    );
    Ok(())
}

/// Every redeemed code redeemed exactly once, with its audit event and
/// platform event; refused for anyone else, the same answer for its holder.
async fn check_redeemed(stack: &Stack, key: &str, codes: &[Code]) -> anyhow::Result<()> {
    let n = codes.len() as i64;
    let (redeemed, assignments, distinct, audited, told): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM activation_code WHERE batch_id = $1 AND state = 'redeemed'),
                    count(a.id), count(DISTINCT a.code_id),
                    (SELECT count(*) FROM audit_event e JOIN activation_code c ON c.id::text = e.subject_id
                     WHERE e.action = 'code.redeemed' AND e.subject_type = 'code' AND c.batch_id = $1),
                    (SELECT count(*) FROM platform_event e JOIN activation_code c ON c.id = e.code_id
                     WHERE e.type = 'code.redeemed' AND c.batch_id = $1)
             FROM assignment a JOIN activation_code c ON c.id = a.code_id WHERE c.batch_id = $1",
        )
        .bind(REDEEM_BATCH)
        .fetch_one(&stack.pool)
        .await?;
    ensure!(redeemed == n, "{redeemed} of {n} codes are redeemed");
    ensure!(
        assignments == n && distinct == n,
        "{assignments} assignments of {distinct} codes for {n} redemptions"
    );
    ensure!(audited == n, "{audited} audit events for {n} redemptions");
    ensure!(told == n, "{told} platform events for {n} redemptions");
    // A sample again: refused for someone else, the same answer for the holder.
    let sample = &codes[..codes.len().min(200)];
    let others = post_all(
        &stack.gateway_url,
        "/v1/redemptions",
        key,
        redeem_bodies(sample, "acct_other"),
        4,
        taken,
    )
    .await?;
    all_expected("redeeming redeemed codes for another account", &others)?;
    let again = post_all(
        &stack.gateway_url,
        "/v1/redemptions",
        key,
        redeem_bodies(sample, "acct_bench"),
        4,
        same_again,
    )
    .await?;
    all_expected("redeeming redeemed codes again for their holder", &again)?;
    let checked = post_all(
        &stack.gateway_url,
        "/v1/codes/check",
        key,
        check_bodies(sample),
        4,
        invalid_redeemed,
    )
    .await?;
    all_expected("checking redeemed codes", &checked)?;
    let assignments: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM assignment a JOIN activation_code c ON c.id = a.code_id
         WHERE c.batch_id = $1",
    )
    .bind(REDEEM_BATCH)
    .fetch_one(&stack.pool)
    .await?;
    ensure!(
        assignments == n,
        "{assignments} assignments after asking again"
    );
    println!(
        "  verified: {n} codes redeemed exactly once (assignment, audit and platform event each); \
         {} asked again: refused for another account, the same redemption for the holder, checked not valid",
        sample.len()
    );
    Ok(())
}

pub async fn run(opts: &Options) -> anyhow::Result<Vec<Figure>> {
    let name = "entitle_bench_redeem";
    // The limiter would otherwise be what is measured (1,000 a second per
    // key and per address by default; every request here is one key from
    // one address).
    let mut settings = vec![
        "gateway.limits.per_key_per_second=100000000".to_owned(),
        "gateway.limits.per_address_per_second=100000000".to_owned(),
        format!(
            "gateway.limits.max_in_flight_platform={}",
            opts.connections.max(64) * 4
        ),
    ];
    settings.extend(opts.settings.iter().cloned());
    let mut stack = Stack::prepare(
        &opts.admin_url,
        &opts.redis_url,
        name,
        opts.pool_size,
        &settings,
    )
    .await?;
    // The keys the gateway hashes and seals codes with, from its own file.
    let config =
        Config::load(Some(stack.config.as_path())).context("the benchmark's configuration")?;
    let keys = CodeKeys::new(config.hash_key(), config.seal_key());
    let (_, key) = platform_key::create(
        &stack.pool,
        &keys,
        "bench",
        "benchmark",
        "the redemption benchmark",
    )
    .await?;
    let seeding = Instant::now();
    let warm = seed::batch_codes(&stack.pool, &keys, WARM_BATCH, WARM).await?;
    let redeem = if opts.redeem {
        seed::batch_codes(&stack.pool, &keys, REDEEM_BATCH, opts.codes).await?
    } else {
        Vec::new()
    };
    let check = if opts.check {
        seed::batch_codes(&stack.pool, &keys, CHECK_BATCH, opts.codes).await?
    } else {
        Vec::new()
    };
    sqlx::raw_sql("VACUUM ANALYZE").execute(&stack.pool).await?;
    println!(
        "  seeded {} batch codes in {:.1} s (not measured); gateway pool {} connections, {} client connections",
        warm.len() + redeem.len() + check.len(),
        seeding.elapsed().as_secs_f64(),
        opts.pool_size,
        opts.connections
    );

    let rows = (2 * opts.codes + WARM) as u64;
    let (pool, database_url) = (stack.pool.clone(), stack.database_url.clone());
    let floor_run = || async {
        stack::checkpoint(&pool).await?;
        let kind = FloorKind::UpdateByKey { rows };
        let floor = floor::measure(&database_url, kind, 16, Duration::from_secs(10)).await?;
        println!(
            "  floor: pgbench, {} ({rows} rows), 16 clients: {:.0} transactions/s (latency {:.2} ms)",
            kind.describe(),
            floor.tps,
            floor.latency_ms
        );
        anyhow::Ok(floor.tps)
    };
    println!("floor, before");
    let floor_before = floor_run().await?;

    stack.start_gateway().await?;
    let warmed = post_all(
        &stack.gateway_url,
        "/v1/codes/check",
        &key,
        check_bodies(&warm),
        opts.connections,
        valid_issued,
    )
    .await?;
    all_expected("warm-up checks", &warmed)?;
    let warmed = post_all(
        &stack.gateway_url,
        "/v1/redemptions",
        &key,
        redeem_bodies(&warm, "acct_warm"),
        opts.connections,
        created,
    )
    .await?;
    all_expected("warm-up redemptions", &warmed)?;

    let mut checked = None;
    if opts.check {
        println!(
            "check: {} fresh codes over {} connections",
            check.len(),
            opts.connections
        );
        let posted = phase(
            &stack,
            "check",
            "/v1/codes/check",
            &key,
            check_bodies(&check),
            opts.connections,
            valid_issued,
        )
        .await?;
        all_expected("checks", &posted)?;
        let still: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM activation_code WHERE batch_id = $1 AND state = 'issued'",
        )
        .bind(CHECK_BATCH)
        .fetch_one(&stack.pool)
        .await?;
        ensure!(
            still as usize == check.len(),
            "{still} of {} checked codes are still issued",
            check.len()
        );
        println!(
            "  verified: {} checks answered valid, issued, KIT-BASIC; none changed a code",
            check.len()
        );
        checked = Some(posted);
    }
    let mut redeemed = None;
    if opts.redeem {
        println!(
            "redeem: {} codes, each once, over {} connections",
            redeem.len(),
            opts.connections
        );
        let posted = phase(
            &stack,
            "redeem",
            "/v1/redemptions",
            &key,
            redeem_bodies(&redeem, "acct_bench"),
            opts.connections,
            created,
        )
        .await?;
        all_expected("redemptions", &posted)?;
        check_redeemed(&stack, &key, &redeem).await?;
        redeemed = Some(posted);
    }

    println!("floor, after");
    // The disk and the neighbours vary: the floor is the mean of both runs.
    let floor_tps = (floor_before + floor_run().await?) / 2.0;
    stack.finish(opts.keep).await?;

    let mut figures = Vec::new();
    if let Some(posted) = checked {
        println!(
            "  check: {:.0} ops/s = {:.2} × the floor ({floor_tps:.0}); p50 {:.2} ms, p99 {:.2} ms",
            posted.rate(),
            posted.rate() / floor_tps,
            posted.p(0.5),
            posted.p(0.99)
        );
        figures.push(Figure {
            what: "code check (vs pgbench update floor)",
            value: posted.rate() / floor_tps,
            unit: "× floor",
            bound: BOUNDS.check_ratio,
            at_least: true,
        });
    }
    if let Some(posted) = redeemed {
        println!(
            "  redeem: {:.0} ops/s = {:.2} × the floor ({floor_tps:.0}); p50 {:.2} ms, p99 {:.2} ms",
            posted.rate(),
            posted.rate() / floor_tps,
            posted.p(0.5),
            posted.p(0.99)
        );
        figures.push(Figure {
            what: "redemption (vs pgbench update floor)",
            value: posted.rate() / floor_tps,
            unit: "× floor",
            bound: BOUNDS.redeem_ratio,
            at_least: true,
        });
        figures.push(Figure {
            what: "redemption p99 at 16 connections",
            value: posted.p(0.99),
            unit: "ms",
            bound: BOUNDS.redeem_p99_ms,
            at_least: false,
        });
    }
    Ok(figures)
}
