//! Seeding the benchmark databases in Postgres itself (generate_series), so
//! millions of rows cost the benchmark process nothing.

use sqlx::{Connection, PgConnection, PgPool};

use crate::standin::amount_differs;
use entitle_jobs::reconcile::Window;

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
