//! The floor every pipeline figure is compared with, measured in the same
//! run on the same machine: `pgbench` committing one ~1.6 KB JSON insert per
//! transaction (what filing a webhook must at least cost), or one single-row
//! update by primary key (what redeeming a code must at least cost).

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::Command;

/// What a floor run measured.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub tps: f64,
    pub latency_ms: f64,
}

/// Which statement the floor commits.
#[derive(Debug, Clone, Copy)]
pub enum FloorKind {
    /// One ~1.6 KB JSON document inserted per transaction.
    JsonInsert,
    /// One single-row `UPDATE ... WHERE id = :id` by primary key per
    /// transaction, over a table of this many rows (spread so that clients
    /// rarely wait on each other's row locks, as redeemers of distinct codes
    /// do not).
    UpdateByKey { rows: u64 },
}

impl FloorKind {
    /// What the floor commits, for the figures' captions.
    pub fn describe(&self) -> &'static str {
        match self {
            FloorKind::JsonInsert => "one ~1.6 KB JSON insert per transaction",
            FloorKind::UpdateByKey { .. } => "one single-row update by primary key per transaction",
        }
    }
}

/// A body of about 1.6 KB, shaped like a native purchase event.
pub fn sample_body() -> String {
    let filler = "x".repeat(1200);
    format!(
        r#"{{"type":"purchase.paid","order_id":"ord_floor","buyer":{{"email":"floor@example.com","name":"Floor"}},"currency":"EUR","amount_total":2000,"lines":[{{"sku":"KIT-BASIC","quantity":1,"unit_amount":2000}}],"note":"{filler}"}}"#
    )
}

/// Runs pgbench with `clients` connections for `duration` against the
/// database at `url` (which it may write a scratch table to).
pub async fn measure(
    url: &str,
    kind: FloorKind,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Floor> {
    let dir = std::env::temp_dir().join(format!("entitle-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("floor.sql");
    let pool = sqlx::PgPool::connect(url).await?;
    match kind {
        FloorKind::JsonInsert => {
            sqlx::raw_sql(
                "DROP TABLE IF EXISTS bench_floor;
                 CREATE TABLE bench_floor (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                           event_id text NOT NULL, body text NOT NULL)",
            )
            .execute(&pool)
            .await?;
            let body = sample_body().replace('\'', "''");
            std::fs::write(
                &script,
                format!(
                    "\\set n random(1, 1000000000)\n\
                     INSERT INTO bench_floor (event_id, body) VALUES ('evt_' || :n, '{body}');\n"
                ),
            )?;
        }
        FloorKind::UpdateByKey { rows } => {
            sqlx::raw_sql(
                "DROP TABLE IF EXISTS bench_floor;
                 CREATE TABLE bench_floor (id bigint PRIMARY KEY, hits bigint NOT NULL DEFAULT 0)",
            )
            .execute(&pool)
            .await?;
            sqlx::query("INSERT INTO bench_floor (id) SELECT generate_series(1, $1)")
                .bind(rows.max(1) as i64)
                .execute(&pool)
                .await?;
            sqlx::raw_sql("VACUUM ANALYZE bench_floor")
                .execute(&pool)
                .await?;
            std::fs::write(
                &script,
                format!(
                    "\\set id random(1, {rows})\n\
                     UPDATE bench_floor SET hits = hits + 1 WHERE id = :id;\n",
                    rows = rows.max(1)
                ),
            )?;
        }
    }
    let output = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg("-c")
        .arg(clients.to_string())
        .arg("-T")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&script)
        .arg(url)
        .output()
        .await
        .context("pgbench could not be run (install postgresql-client)")?;
    sqlx::raw_sql("DROP TABLE IF EXISTS bench_floor")
        .execute(&pool)
        .await?;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let number_after = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let tps = number_after("tps = ").context("pgbench printed no tps")?;
    let latency_ms = number_after("latency average = ").unwrap_or(f64::NAN);
    Ok(Floor { tps, latency_ms })
}
