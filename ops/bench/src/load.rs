//! The load the pipeline benchmarks send: signed native `purchase.paid`
//! webhooks, prepared before the clock starts, posted by many connections at
//! once (as fast as the gateway answers) or at a steady rate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use entitle_jobs::channel::native;
use hdrhistogram::Histogram;

use crate::stack::NATIVE_SECRET;

/// One webhook ready to post.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub event_id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
}

/// `n` one-unit purchases, ids prefixed with `run` so phases never collide.
pub fn purchases(run: &str, n: usize) -> Vec<Webhook> {
    let timestamp = chrono::Utc::now().timestamp();
    (0..n)
        .map(|i| {
            let event_id = format!("evt_{run}_{i}");
            let body = format!(
                r#"{{"type":"purchase.paid","order_id":"ord_{run}_{i}","buyer":{{"email":"buyer{i}@example.com","name":"Buyer {i}"}},"currency":"EUR","amount_total":2000,"lines":[{{"sku":"KIT-BASIC","quantity":1,"unit_amount":2000}}]}}"#
            );
            let signature = native::sign(&event_id, timestamp, body.as_bytes(), NATIVE_SECRET);
            Webhook {
                event_id,
                timestamp: timestamp.to_string(),
                signature,
                body,
            }
        })
        .collect()
}

/// What posting measured.
pub struct Posted {
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    /// When each webhook was sent (it was answered 200), by event id.
    pub sent_at: Vec<(String, Instant)>,
}

impl Posted {
    pub fn p(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client")
}

/// Posts one webhook; returns when it was sent and how long the answer took.
async fn post_one(
    http: &reqwest::Client,
    url: &str,
    hook: &Webhook,
) -> anyhow::Result<(Instant, Duration)> {
    let started = Instant::now();
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &hook.event_id)
        .header("webhook-timestamp", &hook.timestamp)
        .header("webhook-signature", &hook.signature)
        .body(hook.body.clone())
        .send()
        .await?;
    let status = response.status();
    let _ = response.bytes().await?;
    if !status.is_success() {
        bail!("the gateway answered {status} to {}", hook.event_id);
    }
    Ok((started, started.elapsed()))
}

/// Posts every webhook over `connections` connections as fast as answers
/// come back.
pub async fn post_all(
    gateway: &str,
    hooks: Vec<Webhook>,
    connections: usize,
) -> anyhow::Result<Posted> {
    let url = format!("{gateway}/webhooks/native");
    let http = client(connections);
    let hooks = Arc::new(hooks);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (http, url, hooks, next) = (http.clone(), url.clone(), hooks.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("a histogram");
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(hook) = hooks.get(i) else { break };
                let (at, took) = post_one(&http, &url, hook).await?;
                histogram.record(took.as_micros() as u64).ok();
                sent.push((hook.event_id.clone(), at));
            }
            anyhow::Ok((histogram, sent))
        }));
    }
    let mut latency = Histogram::<u64>::new(3).expect("a histogram");
    let mut sent_at = Vec::new();
    for task in tasks {
        let (histogram, sent) = task.await??;
        latency.add(histogram).ok();
        sent_at.extend(sent);
    }
    Ok(Posted {
        elapsed: started.elapsed(),
        latency,
        sent_at,
    })
}

/// Posts the webhooks at `rate` a second (each on its own task, so a slow
/// answer does not slow the rate).
pub async fn post_at_rate(gateway: &str, hooks: Vec<Webhook>, rate: f64) -> anyhow::Result<Posted> {
    let url = format!("{gateway}/webhooks/native");
    let http = client(64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(hooks.len());
    for (i, hook) in hooks.into_iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (at, took) = post_one(&http, &url, &hook).await?;
            anyhow::Ok((hook.event_id, took, at))
        }));
    }
    let mut latency = Histogram::<u64>::new(3).expect("a histogram");
    let mut sent_at = Vec::new();
    for task in tasks {
        let (event_id, took, at) = task.await??;
        latency.record(took.as_micros() as u64).ok();
        sent_at.push((event_id, at));
    }
    Ok(Posted {
        elapsed: started.elapsed(),
        latency,
        sent_at,
    })
}
