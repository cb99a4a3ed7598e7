//! Seeding the benchmark databases in Postgres itself (generate_series), so
//! millions of rows cost the benchmark process nothing; and batch codes the
//! benchmark must type back, drawn here and inserted as arrays.

use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::standin::amount_differs;
use entitle_jobs::{
    code::{Code, CodeKeys},
    reconcile::Window,
};

/// Drops and creates database `name` beside the admin URL's; returns its URL.
pub async fn fresh_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let base = admin_url.split('?').next().unwrap_or(admin_url);
    let server = &base[..base.rfind('/').unwrap_or(base.len())];
    Ok(format!("{server}/{name}"))
}

/// Drops a benchmark database (they hold gigabytes).
pub async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// What the order seed planted for the run to find.
pub struct SeededOrders {
    pub orders: i64,
    /// Paid in the channel, missing here.
    pub lost: i64,
    /// Here, missing in the channel.
    pub unknown: i64,
    /// Totals that differ.
    pub mismatched: i64,
}

/// Entitle's side of the reconciliation: every channel order fulfilled (an
/// order, a line, a code) except every 10,000th, which is "lost", plus 100
/// orders the channel does not know.
pub async fn orders(pool: &PgPool, orders: i64, window: &Window) -> anyhow::Result<SeededOrders> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut *conn)
        .await?;
    let start = window.start;
    let unknown = 100;
    // paid_at mirrors the stand-in's `created` (whole seconds).
    sqlx::query(
        "INSERT INTO orders (id, channel, channel_order_id, buyer_email, currency, amount_total,
                             paid_at, issued_at, payment_reference)
         SELECT gen_random_uuid(), 'stripe', 'cs_bench_' || lpad(n::text, 8, '0'),
                'buyer' || n || '@bench.invalid', 'eur', 2000,
                date_trunc('second', $2 + n * interval '10 milliseconds'), now(), 'pi_bench_' || n
         FROM generate_series(1, $1) n WHERE n % 10000 <> 7",
    )
    .bind(orders)
    .bind(start)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO orders (id, channel, channel_order_id, buyer_email, currency, amount_total,
                             paid_at, issued_at)
         SELECT gen_random_uuid(), 'stripe', 'cs_bench_unknown_' || n, 'ghost@bench.invalid',
                'eur', 2000, $2 + n * interval '1 second', now()
         FROM generate_series(1, $1) n",
    )
    .bind(unknown)
    .bind(start)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO order_line (id, order_id, line_index, channel_reference, product_id, quantity,
                                 unit_amount, amount_total)
         SELECT gen_random_uuid(), o.id, 0, 'price_basic_kit', p.id, 1, 2000, 2000
         FROM orders o, product p WHERE p.sku = 'KIT-BASIC'",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4, order_line_id,
                                      unit_index, expires_at)
         SELECT gen_random_uuid(), l.product_id, sha256(l.id::text::bytea), '\\x00'::bytea, 'BNCH',
                l.id, 0, now() + interval '1 year'
         FROM order_line l",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query("ANALYZE").execute(&mut *conn).await?;
    let lost = (1..=orders).filter(|n| n % 10_000 == 7).count() as i64;
    let mismatched = (1..=orders)
        .filter(|n| amount_differs(*n) && n % 10_000 != 7)
        .count() as i64;
    Ok(SeededOrders {
        orders: orders - lost + unknown,
        lost,
        unknown,
        mismatched,
    })
}

/// `codes` codes of one batch, `expiring` of them past their expiry.
pub async fn codes(pool: &PgPool, codes: i64, expiring: i64) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO code_batch (id, product_id, kind, quantity, requested_by, reason)
         SELECT '00000000-0000-0000-0000-00000000b0b0', id, 'partner_distribution', $1, 'benchmark', 'benchmark'
         FROM product WHERE sku = 'KIT-BASIC'",
    )
    .bind(codes.min(i64::from(i32::MAX)) as i32)
    .execute(&mut *conn)
    .await?;
    // Every (codes / expiring)-th code expired yesterday; the rest expire
    // over the next months.
    let every = (codes / expiring.max(1)).max(1);
    sqlx::query(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4, batch_id, expires_at)
         SELECT gen_random_uuid(), b.product_id, sha256(n::text::bytea), '\\x00'::bytea, 'BNCH', b.id,
                CASE WHEN n % $2 = 0 AND n / $2 <= $3
                     THEN now() - interval '1 day' - n * interval '1 millisecond'
                     ELSE now() + interval '30 days' + n * interval '1 millisecond' END
         FROM code_batch b, generate_series(1, $1) n",
    )
    .bind(codes)
    .bind(every)
    .bind(expiring)
    .execute(&mut *conn)
    .await?;
    sqlx::query("ANALYZE").execute(&mut *conn).await?;
    Ok(())
}

/// A batch of `n` KIT-BASIC codes, hashed and sealed with `keys` as the
/// gateway's own issuance does (`issuance::issue_batch_codes`); returns the
/// plain codes, which only a benchmark ever gets back.
pub async fn batch_codes(
    pool: &PgPool,
    keys: &CodeKeys,
    batch: Uuid,
    n: usize,
) -> anyhow::Result<Vec<Code>> {
    let mut tx = pool.begin().await?;
    // Seeding is not measured; LOCAL keeps the setting off the pool.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO code_batch (id, product_id, kind, quantity, requested_by, reason)
         SELECT $1, id, 'partner_distribution', $2, 'benchmark', 'benchmark'
         FROM product WHERE sku = 'KIT-BASIC'",
    )
    .bind(batch)
    .bind(n.clamp(1, i32::MAX as usize) as i32)
    .execute(&mut *tx)
    .await?;
    let mut codes = Vec::with_capacity(n);
    while codes.len() < n {
        let chunk: Vec<Code> = (0..(n - codes.len()).min(10_000))
            .map(|_| Code::generate())
            .collect();
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let hashes: Vec<Vec<u8>> = chunk.iter().map(|c| keys.hash(c)).collect();
        let sealed: Vec<Vec<u8>> = chunk.iter().map(|c| keys.seal(c)).collect();
        let last4: Vec<&str> = chunk.iter().map(|c| c.last4()).collect();
        sqlx::query(
            "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4, batch_id,
                                          expires_at)
             SELECT u.id, b.product_id, u.hash, u.sealed, u.last4, b.id,
                    now() + make_interval(days => p.validity_days)
             FROM UNNEST($1::uuid[], $2::bytea[], $3::bytea[], $4::text[]) AS u(id, hash, sealed, last4)
             JOIN code_batch b ON b.id = $5
             JOIN product p ON p.id = b.product_id",
        )
        .bind(&ids)
        .bind(&hashes)
        .bind(&sealed)
        .bind(&last4)
        .bind(batch)
        .execute(&mut *tx)
        .await?;
        codes.extend(chunk);
    }
    tx.commit().await?;
    Ok(codes)
}
