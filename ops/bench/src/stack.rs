//! The real Entitle under benchmark: the release `entitle-gateway` and
//! `entitle-worker` binaries as processes of their own, on a fresh database
//! and Redis namespace, configured through a file, sending to the counting
//! SMTP sink in this process.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use tokio::process::{Child, Command};

use crate::{random_key, seed, sink::Sink};

/// The native checkout's Standard Webhooks secret in the benchmarks.
pub const NATIVE_SECRET: &str = "whsec_YmVuY2htYXJrLW5hdGl2ZS1jaGVja291dC1zZWNyZXQ=";
/// Stripe's webhook signing secret in the benchmarks (intake files Stripe
/// events; nothing calls Stripe's API).
pub const STRIPE_SECRET: &str = "whsec_benchmark_stripe_signing_secret";
/// Shopify's webhook secret in the benchmarks.
pub const SHOPIFY_SECRET: &str = "shpss_benchmark_shopify_webhook_secret";

/// A running gateway, its workers and what they talk to.
pub struct Stack {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The benchmark database's URL (what the floor's pgbench connects to).
    pub database_url: String,
    pub pool: PgPool,
    pub gateway_url: String,
    pub sink: Sink,
    binaries: PathBuf,
    admin_url: String,
    redis_url: String,
    namespace: String,
    /// Settings layered over the file, as environment variables.
    env: Vec<(String, String)>,
    gateway: Option<Child>,
    workers: Vec<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The folder the gateway and worker binaries are in: `dir`, or beside this
/// one (release beside release, debug beside debug).
fn binaries(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = match dir {
        Some(dir) => dir,
        None => me.parent().context("the benchmark binary has a folder")?,
    };
    for bin in ["entitle-gateway", "entitle-worker"] {
        if !dir.join(bin).exists() {
            bail!(
                "{} is missing: build it (ops/bench.sh does) with cargo build --release --bins",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir.to_owned())
}

impl Stack {
    /// A fresh database `name` with the schema and catalogue, a config file
    /// and the SMTP sink; nothing runs until asked. `settings` are
    /// `section.key=value` pairs (or `section.table.key=value`) layered over
    /// the configuration (as `ENTITLE_SECTION__KEY` environment variables).
    pub async fn prepare(
        admin_url: &str,
        redis_url: &str,
        name: &str,
        pool_size: u32,
        settings: &[String],
    ) -> anyhow::Result<Self> {
        Self::prepare_with(admin_url, redis_url, name, pool_size, settings, None).await
    }

    /// [`Stack::prepare`] with the gateway and worker binaries taken from
    /// `binaries` (default: beside this one).
    pub async fn prepare_with(
        admin_url: &str,
        redis_url: &str,
        name: &str,
        pool_size: u32,
        settings: &[String],
        binaries: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let database_url = seed::fresh_database(admin_url, name).await?;
        let sink = Sink::start()?;
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let namespace = format!("entitle-bench-{name}");
        let catalogue = Path::new(env!("CARGO_MANIFEST_DIR")).join("../catalogue.toml");
        let config = dir.join("entitle.toml");
        std::fs::write(
            &config,
            format!(
                r#"[database]
url = "{database_url}"
max_connections = {pool_size}

[redis]
url = "{redis_url}"
namespace = "{namespace}"

[gateway]
listen = "127.0.0.1:{port}"

[codes]
hash_key = "{hash}"
seal_key = "{seal}"

[catalogue]
file = "{catalogue}"

[native]
webhook_secrets = ["{NATIVE_SECRET}"]

[stripe]
webhook_secrets = ["{STRIPE_SECRET}"]

[shopify]
webhook_secrets = ["{SHOPIFY_SECRET}"]

[email]
smtp_url = "smtp://127.0.0.1:{smtp}"
redeem_url = "https://platform.bench/redeem"
message_id_domain = "entitle.bench"
"#,
                hash = random_key(),
                seal = random_key(),
                catalogue = catalogue.display(),
                smtp = sink.port,
            ),
        )?;
        let binaries = self::binaries(binaries)?;
        let mut env = Vec::new();
        for setting in settings {
            let (key, value) = setting
                .split_once('=')
                .with_context(|| format!("--set {setting}: expected section.key=value"))?;
            if !key.contains('.') {
                bail!("--set {setting}: expected section.key=value");
            }
            // Nested tables too: `gateway.limits.per_key_per_second`.
            env.push((
                format!("ENTITLE_{}", key.to_uppercase().replace('.', "__")),
                value.to_owned(),
            ));
        }
        let stack = Self {
            env,
            name: name.to_owned(),
            dir,
            config,
            // Named, so profiles of the gateway's connections leave it out.
            pool: PgPool::connect(&format!("{database_url}?application_name=entitle-bench"))
                .await?,
            database_url,
            gateway_url: format!("http://127.0.0.1:{port}"),
            sink,
            binaries,
            admin_url: admin_url.to_owned(),
            redis_url: redis_url.to_owned(),
            namespace,
            gateway: None,
            workers: Vec::new(),
        };
        stack.forget_queues().await?;
        let migrated = stack
            .command("entitle-gateway", "migrate")
            .output()
            .await
            .context("entitle-gateway migrate")?;
        if !migrated.status.success() {
            bail!(
                "entitle-gateway migrate failed: {}",
                String::from_utf8_lossy(&migrated.stderr)
            );
        }
        Ok(stack)
    }

    fn command(&self, binary: &str, subcommand: &str) -> Command {
        let mut command = Command::new(self.binaries.join(binary));
        command
            .arg(subcommand)
            .env("ENTITLE_CONFIG", &self.config)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    fn log(&self, what: &str) -> anyhow::Result<Stdio> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{what}.log")))?;
        Ok(Stdio::from(file))
    }

    /// Sets an environment variable for the processes started from now on
    /// (e.g. `ENTITLE_EMAIL__SMTP_URL`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the gateway and waits until it answers.
    pub async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let child = self
            .command("entitle-gateway", "serve")
            .env("ENTITLE_GATEWAY__METRICS_LISTEN", "127.0.0.1:0")
            .stdout(self.log("gateway")?)
            .stderr(self.log("gateway")?)
            .spawn()
            .context("starting entitle-gateway")?;
        self.gateway = Some(child);
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if http
                .get(format!("{}/healthz", self.gateway_url))
                .send()
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the gateway did not answer (see {})",
            self.dir.join("gateway.log").display()
        )
    }

    /// Starts `n` worker processes, each with a metrics listener of its own
    /// (on the default port the second would fail to start).
    pub fn start_workers(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let child = self.spawn_worker(self.workers.len())?;
            self.workers.push(child);
        }
        Ok(())
    }

    /// Starts worker process `i` (its log is `worker-{i}.log`, appended).
    fn spawn_worker(&self, i: usize) -> anyhow::Result<Child> {
        let what = format!("worker-{i}");
        self.command("entitle-worker", "run")
            .env("ENTITLE_WORKER__METRICS_LISTEN", "127.0.0.1:0")
            .stdout(self.log(&what)?)
            .stderr(self.log(&what)?)
            .spawn()
            .context("starting entitle-worker")
    }

    /// Kills worker process `i` with SIGKILL (no shutdown, no cleanup, as a
    /// crash or the OOM killer would) and waits until it is gone.
    pub async fn kill_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let worker = self.workers.get_mut(i).context("no such worker")?;
        worker.start_kill()?;
        worker.wait().await?;
        Ok(())
    }

    /// Starts worker process `i` again in its slot (after [`Stack::kill_worker`]).
    pub fn restart_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.spawn_worker(i)?;
        *self.workers.get_mut(i).context("no such worker")? = child;
        Ok(())
    }

    /// Fails when a worker process has exited (a drain would then measure
    /// fewer workers than it says).
    pub fn check_workers(&mut self) -> anyhow::Result<()> {
        for (i, worker) in self.workers.iter_mut().enumerate() {
            if let Some(status) = worker.try_wait()? {
                bail!(
                    "worker-{i} exited ({status}); see {}",
                    self.dir.join(format!("worker-{i}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// The worker processes' ids.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.id()).collect()
    }

    /// The gateway's process id.
    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().and_then(|g| g.id())
    }

    /// Stops every worker (SIGTERM, then waits).
    pub async fn stop_workers(&mut self) -> anyhow::Result<()> {
        for mut worker in self.workers.drain(..) {
            terminate(&mut worker).await;
        }
        Ok(())
    }

    /// Stops everything, drops the database and the Redis keys.
    pub async fn finish(mut self, keep: bool) -> anyhow::Result<()> {
        self.stop_workers().await?;
        if let Some(mut gateway) = self.gateway.take() {
            terminate(&mut gateway).await;
        }
        self.pool.close().await;
        if !keep {
            seed::drop_database(&self.admin_url, &self.name).await?;
            self.forget_queues().await?;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        Ok(())
    }

    /// Removes this stack's Redis keys.
    pub async fn forget_queues(&self) -> anyhow::Result<()> {
        let client = redis::Client::open(self.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.namespace))
            .query_async(&mut conn)
            .await?;
        for chunk in keys.chunks(1000) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
        }
        Ok(())
    }

    /// How many keys and how much memory this stack's queues hold in Redis.
    pub async fn redis_footprint(&self) -> anyhow::Result<(usize, i64)> {
        let client = redis::Client::open(self.redis_url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.namespace))
            .query_async(&mut conn)
            .await?;
        let mut bytes = 0i64;
        for key in &keys {
            let used: Option<i64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap_or(None);
            bytes += used.unwrap_or(0);
        }
        Ok((keys.len(), bytes))
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Flushes Postgres' dirty buffers now, so a measured phase does not pay
/// for the checkpoint an earlier phase's writes would trigger.
pub async fn checkpoint(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

/// CPU seconds a process has used (user and system), from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A process's peak resident memory (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A process's resident memory now (VmRSS), in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
pub fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().sum();
    // idle and iowait
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds used so far by every Postgres process on this machine.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .filter_map(cpu_seconds)
        .sum()
}
