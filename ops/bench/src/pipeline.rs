//! The pipeline benchmarks: webhook intake, backlog drains with one and two
//! worker processes, a 100,000-order drain, and latency at a steady rate,
//! all on the release binaries, each figure next to a `pgbench` floor
//! measured in the same run.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};
use hdrhistogram::Histogram;

use crate::{
    Figure,
    floor::{self, FloorKind},
    load,
    stack::{self, Stack},
};

/// What the pipeline benchmarks run with.
#[derive(Debug, Clone)]
pub struct Options {
    pub admin_url: String,
    pub redis_url: String,
    /// Orders in each of the one- and two-worker drains (and in intake).
    pub orders: usize,
    /// Orders in the big drain.
    pub backlog: usize,
    /// Webhooks a second in the steady phase, and for how long.
    pub rate: f64,
    pub steady_secs: u64,
    /// Connections posting webhooks at once.
    pub connections: usize,
    /// Postgres connections per Entitle process.
    pub pool_size: u32,
    /// `section.key=value` settings layered over Entitle's configuration.
    pub settings: Vec<String>,
    pub keep: bool,
    /// Only the floor and intake (quick, for tuning the gateway).
    pub intake_only: bool,
}

/// One drain: how long, and what the machine did meanwhile.
struct Drained {
    seconds: f64,
    busy: f64,
    worker_cpu: f64,
    postgres_cpu: f64,
    peak_rss: f64,
    rss_first: f64,
    rss_last: f64,
}

/// Waits until `expected` order emails are accepted by the sink and marked
/// sent, sampling worker memory; fails after `limit`.
async fn wait_drained(
    stack: &Stack,
    expected: usize,
    started: Instant,
    limit: Duration,
) -> anyhow::Result<Drained> {
    let pids = stack.worker_pids();
    let cpu_before: f64 = pids.iter().filter_map(|p| stack::cpu_seconds(*p)).sum();
    let postgres_before = stack::postgres_cpu_seconds();
    let (busy_before, total_before) = stack::machine_jiffies();
    let mut rss = Vec::new();
    let mut emails = Vec::new();
    let mut first_email = None;
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    loop {
        if first_email.is_none() && stack.sink.distinct() > 0 {
            first_email = Some(started.elapsed().as_secs_f64());
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            last_sample = Instant::now();
            rss.push(pids.iter().filter_map(|p| stack::rss_mib(*p)).sum::<f64>());
            emails.push(stack.sink.distinct());
        }
        if stack.sink.distinct() >= expected {
            let sent: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM email_delivery WHERE status = 'sent' AND kind = 'order_codes'",
            )
            .fetch_one(&stack.pool)
            .await?;
            if sent as usize >= expected {
                break;
            }
        }
        if started.elapsed() > limit {
            bail!(
                "the drain did not finish in {limit:?}: {} of {expected} emails (see {})",
                stack.sink.distinct(),
                stack.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Emails a second over the drain: flat, or slowing as tables grow?
    let rates: Vec<usize> = emails.windows(2).map(|w| w[1] - w[0]).collect();
    if rates.len() >= 3 {
        let third = rates.len() / 3;
        let mean = |r: &[usize]| r.iter().sum::<usize>() as f64 / r.len().max(1) as f64;
        println!(
            "    first email after {:.1} s; emails/s by thirds of the drain: {:.0}, {:.0}, {:.0}",
            first_email.unwrap_or(f64::NAN),
            mean(&rates[..third]),
            mean(&rates[third..2 * third]),
            mean(&rates[2 * third..])
        );
    }
    let (busy_after, total_after) = stack::machine_jiffies();
    let cpu_after: f64 = pids.iter().filter_map(|p| stack::cpu_seconds(*p)).sum();
    Ok(Drained {
        seconds,
        busy: (busy_after - busy_before) as f64 / (total_after - total_before).max(1) as f64,
        worker_cpu: (cpu_after - cpu_before) / seconds,
        postgres_cpu: (stack::postgres_cpu_seconds() - postgres_before) / seconds,
        peak_rss: pids.iter().filter_map(|p| stack::peak_rss_mib(*p)).sum(),
        rss_first: rss.first().copied().unwrap_or(0.0),
        rss_last: rss.last().copied().unwrap_or(0.0),
    })
}

/// Checks what a finished drain did: one order, one code and one email per
/// webhook, nothing twice.
async fn check_exactly_once(stack: &Stack, run: &str, expected: usize) -> anyhow::Result<()> {
    let like = format!("ord_{run}_%");
    let (orders, codes, deliveries): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT o.id), count(c.id),
                (SELECT count(*) FROM email_delivery d JOIN orders o2 ON o2.id = d.order_id
                 WHERE o2.channel_order_id LIKE $1 AND d.kind = 'order_codes' AND d.status = 'sent')
         FROM orders o JOIN order_line l ON l.order_id = o.id
         LEFT JOIN activation_code c ON c.order_line_id = l.id
         WHERE o.channel_order_id LIKE $1",
    )
    .bind(&like)
    .fetch_one(&stack.pool)
    .await?;
    ensure!(
        orders as usize == expected,
        "{orders} orders for {expected} webhooks"
    );
    ensure!(
        codes as usize == expected,
        "{codes} codes for {expected} one-unit orders"
    );
    ensure!(
        deliveries as usize == expected,
        "{deliveries} sent emails for {expected} orders"
    );
    ensure!(
        stack.sink.total() == stack.sink.distinct(),
        "{} emails arrived for {} distinct messages: some were sent twice",
        stack.sink.total(),
        stack.sink.distinct()
    );
    Ok(())
}

/// Posts a backlog of `n` with no worker running, then drains it with
/// `workers` processes.
async fn drain(
    stack: &mut Stack,
    run: &str,
    n: usize,
    workers: usize,
    connections: usize,
) -> anyhow::Result<Drained> {
    stack.sink.clear();
    let posted = load::post_all(&stack.gateway_url, load::purchases(run, n), connections).await?;
    println!(
        "  {run}: {n} webhooks filed in {:.1} s; starting {workers} worker process(es)",
        posted.elapsed.as_secs_f64()
    );
    stack::checkpoint(&stack.pool).await?;
    let started = Instant::now();
    stack.start_workers(workers)?;
    let limit = Duration::from_secs(120 + (n / 50) as u64);
    let drained = wait_drained(stack, n, started, limit).await?;
    stack.check_workers()?;
    stack.stop_workers().await?;
    check_exactly_once(stack, run, n).await?;
    println!(
        "  {run}: drained in {:.1} s = {:.0} orders/s; machine {:.0} % busy (workers {:.2} cores, \
         Postgres {:.2}), worker RSS {:.1} → {:.1} MiB (peak {:.1})",
        drained.seconds,
        n as f64 / drained.seconds,
        drained.busy * 100.0,
        drained.worker_cpu,
        drained.postgres_cpu,
        drained.rss_first,
        drained.rss_last,
        drained.peak_rss
    );
    Ok(drained)
}

/// Webhook sent → its email accepted by the sink, per order, at a steady
/// rate with one worker process running.
async fn steady(stack: &mut Stack, opts: &Options) -> anyhow::Result<Histogram<u64>> {
    let run = "steady";
    let n = (opts.rate * opts.steady_secs as f64) as usize;
    stack.sink.clear();
    stack.start_workers(1)?;
    // Let the worker start before the clock does.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let posted = load::post_at_rate(&stack.gateway_url, load::purchases(run, n), opts.rate).await?;
    let started = Instant::now();
    wait_drained(stack, n, started, Duration::from_secs(120)).await?;
    stack.check_workers()?;
    stack.stop_workers().await?;
    check_exactly_once(stack, run, n).await?;
    let pairs: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.event_id, d.message_id FROM webhook_inbox i
         JOIN email_delivery d ON d.order_id = i.order_id AND d.kind = 'order_codes'
         WHERE i.event_id LIKE 'evt_steady_%'",
    )
    .fetch_all(&stack.pool)
    .await?;
    let message_of: HashMap<String, String> = pairs.into_iter().collect();
    let arrivals = stack.sink.arrivals();
    let mut latency = Histogram::<u64>::new(3).expect("a histogram");
    for (event_id, sent) in &posted.sent_at {
        let arrived = message_of
            .get(event_id)
            .and_then(|m| arrivals.get(m))
            .ok_or_else(|| anyhow::anyhow!("no email for {event_id}"))?;
        latency
            .record(arrived.saturating_duration_since(*sent).as_micros() as u64)
            .ok();
    }
    println!(
        "  steady: {n} webhooks at {:.0}/s; webhook → email accepted p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         webhook answer p99 {:.1} ms",
        opts.rate,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0,
        posted.p(0.99),
    );
    Ok(latency)
}

/// Floors (absolute) the pipeline is held to on a 2-core machine.
pub struct Bounds {
    pub intake_ratio: f64,
    pub intake_p99_ms: f64,
    pub one_worker_per_sec: f64,
    pub two_worker_speedup: f64,
    pub steady_p99_ms: f64,
    pub backlog_rss_mib: f64,
}

pub const BOUNDS: Bounds = Bounds {
    intake_ratio: 0.5,
    intake_p99_ms: 25.0,
    one_worker_per_sec: 1000.0,
    two_worker_speedup: 1.6,
    steady_p99_ms: 2000.0,
    backlog_rss_mib: 128.0,
};

pub async fn run(opts: &Options) -> anyhow::Result<Vec<Figure>> {
    let name = "entitle_bench_pipeline";
    let mut stack = Stack::prepare(
        &opts.admin_url,
        &opts.redis_url,
        name,
        opts.pool_size,
        &opts.settings,
    )
    .await?;
    let stack_pool = stack.pool.clone();
    let database_url = {
        let base = opts.admin_url.split('?').next().unwrap_or(&opts.admin_url);
        format!("{}/{name}", &base[..base.rfind('/').unwrap_or(base.len())])
    };
    let floor_run = || async {
        stack::checkpoint(&stack_pool).await?;
        let floor = floor::measure(
            &database_url,
            FloorKind::JsonInsert,
            16,
            Duration::from_secs(10),
        )
        .await?;
        println!(
            "  floor: pgbench, one ~1.6 KB JSON insert per transaction, 16 clients: {:.0} transactions/s (latency {:.2} ms)",
            floor.tps, floor.latency_ms
        );
        anyhow::Ok(floor.tps)
    };
    println!("floor, before intake");
    let floor_before = floor_run().await?;
    stack.start_gateway().await?;

    println!(
        "intake: {} signed Stripe events over {} connections, no worker running",
        opts.orders, opts.connections
    );
    let warmup = load::post_all(&stack.gateway_url, load::stripe_events("warm", 500), 4).await?;
    drop(warmup);
    let events = load::stripe_events("intake", opts.orders);
    let mean_body = events.iter().map(|e| e.body.len()).sum::<usize>() / events.len().max(1);
    // Each measured phase starts after a checkpoint, as the floor does: one
    // triggered by an earlier phase's WAL would stall whichever runs then.
    stack::checkpoint(&stack.pool).await?;
    let gateway_cpu = stack.gateway_pid().and_then(stack::cpu_seconds);
    let intake = load::post_all(&stack.gateway_url, events, opts.connections).await?;
    let intake_rate = opts.orders as f64 / intake.elapsed.as_secs_f64();
    let filed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_inbox WHERE channel = 'stripe' AND event_id LIKE 'evt_intake_%'",
    )
    .fetch_one(&stack.pool)
    .await?;
    ensure!(
        filed as usize == opts.orders,
        "{filed} events filed for {} answered",
        opts.orders
    );
    println!("floor, after intake");
    // The disk and the neighbours vary: the floor is the mean of both runs.
    let floor_tps = (floor_before + floor_run().await?) / 2.0;
    let gateway_cores = match (
        gateway_cpu,
        stack.gateway_pid().and_then(stack::cpu_seconds),
    ) {
        (Some(before), Some(after)) => (after - before) / intake.elapsed.as_secs_f64(),
        _ => f64::NAN,
    };
    println!(
        "  intake: {intake_rate:.0} webhooks/s (bodies of {mean_body} B) = {:.2} × the floor ({floor_tps:.0}); \
         p50 {:.1} ms, p99 {:.1} ms; gateway {gateway_cores:.2} cores",
        intake_rate / floor_tps,
        intake.p(0.5),
        intake.p(0.99)
    );
    // Nothing here calls Stripe's API: the drains fulfil native orders only.
    sqlx::query("DELETE FROM webhook_inbox WHERE channel = 'stripe'")
        .execute(&stack.pool)
        .await?;

    if opts.intake_only {
        stack.finish(opts.keep).await?;
        return Ok(vec![
            Figure {
                what: "intake (vs pgbench insert floor)",
                value: intake_rate / floor_tps,
                unit: "× floor",
                bound: BOUNDS.intake_ratio,
                at_least: true,
            },
            Figure {
                what: "intake p99 at 16 connections",
                value: intake.p(0.99),
                unit: "ms",
                bound: BOUNDS.intake_p99_ms,
                at_least: false,
            },
        ]);
    }

    println!(
        "drain: a backlog of {} with one worker process",
        opts.orders
    );
    let one = drain(&mut stack, "one", opts.orders, 1, opts.connections).await?;
    let one_rate = opts.orders as f64 / one.seconds;

    println!(
        "drain: a backlog of {} with two worker processes",
        opts.orders
    );
    let two = drain(&mut stack, "two", opts.orders, 2, opts.connections).await?;
    let two_rate = opts.orders as f64 / two.seconds;

    println!(
        "drain: a backlog of {} with one worker process",
        opts.backlog
    );
    let big = drain(&mut stack, "big", opts.backlog, 1, opts.connections).await?;
    let (keys, bytes) = stack.redis_footprint().await?;
    println!(
        "  Redis after the drain: {keys} keys, {:.1} KiB",
        bytes as f64 / 1024.0
    );

    println!(
        "steady: {:.0} webhooks/s for {} s, one worker process",
        opts.rate, opts.steady_secs
    );
    let latency = steady(&mut stack, opts).await?;
    stack.finish(opts.keep).await?;

    // Two processes cannot be faster than the cores they share: the 1.6 ×
    // applies until the machine is saturated. When two saturate it, the most
    // they could gain is the CPU one left idle (two.busy / one.busy, printed);
    // then they are held to not being slower than one (0.9, for noise).
    let saturated = two.busy > 0.9;
    let headroom = (two.busy / one.busy.max(0.01)).max(1.0);
    let two_bound = if saturated {
        0.9
    } else {
        BOUNDS.two_worker_speedup
    };
    println!(
        "  two workers / one: {:.2} ×; the machine was {:.0} % busy with one, {:.0} % with two{}",
        two_rate / one_rate,
        one.busy * 100.0,
        two.busy * 100.0,
        if saturated {
            format!(" (saturated: at most {headroom:.2} × was left to gain)")
        } else {
            String::new()
        }
    );
    Ok(vec![
        Figure {
            what: "intake (vs pgbench insert floor)",
            value: intake_rate / floor_tps,
            unit: "× floor",
            bound: BOUNDS.intake_ratio,
            at_least: true,
        },
        Figure {
            what: "intake p99 at 16 connections",
            value: intake.p(0.99),
            unit: "ms",
            bound: BOUNDS.intake_p99_ms,
            at_least: false,
        },
        Figure {
            what: "end to end, one worker process",
            value: one_rate,
            unit: "orders/s",
            bound: BOUNDS.one_worker_per_sec,
            at_least: true,
        },
        Figure {
            what: if saturated {
                "two workers / one (CPU saturated by two)"
            } else {
                "two workers / one"
            },
            value: two_rate / one_rate,
            unit: "×",
            bound: two_bound,
            at_least: true,
        },
        Figure {
            what: "backlog drain, worker peak RSS",
            value: big.peak_rss,
            unit: "MiB",
            bound: BOUNDS.backlog_rss_mib,
            at_least: false,
        },
        Figure {
            what: "steady rate: webhook → email p99",
            value: latency.value_at_quantile(0.99) as f64 / 1000.0,
            unit: "ms",
            bound: BOUNDS.steady_p99_ms,
            at_least: false,
        },
    ])
}
