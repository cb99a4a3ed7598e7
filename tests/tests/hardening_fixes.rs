//! The smaller fixes of the hardening issue: a batch's CSV downloadable
//! again for a short window by the one actor who took it, each download
//! audited; indexes for the findings export and the prune sweep, checked
//! by their plans; failed admin authentications limited per address; every
//! CSV written by the `csv` crate with formula cells neutralised.

use std::collections::HashMap;

use entitle_jobs::{code::Code, token::Role};
use entitle_tests::{Options, TestApp};
use serde_json::{Value, json};
use sqlx::{Arguments as _, postgres::PgArguments};
use uuid::Uuid;

/// A product name and a SKU as a careless catalogue might have them: a
/// comma, quotes, and a leading `=` a spreadsheet would run.
const NASTY_NAME: &str = "=HYPERLINK(\"http://evil.test\"), \"Pro\" kit";
const NASTY_SKU: &str = "=KIT,\"B\"";

/// Every record of a CSV file, read by the `csv` crate, by column name.
fn records(csv: &str) -> Vec<HashMap<String, String>> {
    csv::Reader::from_reader(csv.as_bytes())
        .deserialize::<HashMap<String, String>>()
        .map(|row| row.expect("a well-formed CSV record"))
        .collect()
}

/// Renames the kit product to [`NASTY_SKU`] / [`NASTY_NAME`], as a
/// catalogue could.
async fn make_the_kit_nasty(app: &TestApp) {
    let renamed = sqlx::query("UPDATE product SET sku = $1, name = $2 WHERE sku = 'KIT-BASIC'")
        .bind(NASTY_SKU)
        .bind(NASTY_NAME)
        .execute(&app.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(renamed, 1);
}

async fn create_batch(app: &TestApp, token: &str, sku: &str, quantity: u32) -> String {
    let (status, batch) = app
        .admin(
            "POST",
            "/admin/v1/batches",
            Some(token),
            Some(json!({ "product_sku": sku, "quantity": quantity,
                         "kind": "partner_distribution", "reason": "partner launch" })),
            None,
        )
        .await;
    assert_eq!(status, 201, "{batch}");
    batch["id"].as_str().unwrap().to_owned()
}

async fn export(app: &TestApp, token: &str, batch: &str) -> (u16, Value) {
    app.admin(
        "POST",
        &format!("/admin/v1/batches/{batch}/export"),
        Some(token),
        Some(json!({ "reason": "to the partner" })),
        None,
    )
    .await
}

/// The `batch.exported` events of a batch: (actor, download number).
async fn downloads(app: &TestApp, batch: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT actor, (data->'after'->>'downloads')::bigint FROM audit_event
         WHERE action = 'batch.exported' AND subject_id = $1 ORDER BY id",
    )
    .bind(batch)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// The actor a batch was created by (a token's name).
async fn creator(app: &TestApp, batch: &str) -> String {
    sqlx::query_scalar(
        "SELECT actor FROM audit_event WHERE action = 'batch.created' AND subject_id = $1",
    )
    .bind(batch)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

// ------------------------------------------------------------ batch export

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_csv_is_downloaded_again_by_its_holder_within_the_window_and_by_nobody_else() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    make_the_kit_nasty(&app).await;
    let olga = app.token(Role::Operator).await;
    let batch = create_batch(&app, &olga, NASTY_SKU, 3).await;
    let olga_name = creator(&app, &batch).await;

    let (status, first) = export(&app, &olga, &batch).await;
    assert_eq!(status, 200, "{first}");
    let first = first.as_str().expect("a CSV").to_owned();
    let rows = records(&first);
    assert_eq!(rows.len(), 3, "{first}");
    for row in &rows {
        assert!(Code::parse(&row["code"]).is_ok(), "a whole code: {row:?}");
        // The SKU survives its comma and quotes, and cannot run.
        assert_eq!(row["product"], format!("'{NASTY_SKU}"), "{first}");
        assert_eq!(row["state"], "issued");
    }

    // The connection dropped: the same actor downloads it again, and gets
    // the same codes; both downloads are audited, numbered.
    let (status, second) = export(&app, &olga, &batch).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second.as_str().unwrap(), first);
    assert_eq!(
        downloads(&app, &batch).await,
        [(olga_name.clone(), 1), (olga_name.clone(), 2)]
    );

    // Anyone else is refused, however soon, and nothing is audited.
    let oscar = app.token(Role::Operator).await;
    let (status, refused) = export(&app, &oscar, &batch).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("export_taken_by_another")),
        "{refused}"
    );
    assert!(
        refused["detail"].as_str().unwrap().contains(&olga_name),
        "{refused}"
    );

    // Past the window (15 minutes by default), the holder is refused too.
    sqlx::query("UPDATE code_batch SET exported_at = now() - interval '16 minutes' WHERE id = $1")
        .bind(Uuid::parse_str(&batch).unwrap())
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, refused) = export(&app, &olga, &batch).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("export_window_closed")),
        "{refused}"
    );
    assert_eq!(downloads(&app, &batch).await.len(), 2);

    // The batch view still says when it was taken.
    let (status, view) = app
        .admin(
            "GET",
            &format!("/admin/v1/batches/{batch}"),
            Some(&olga),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(view["exported_at"].is_string(), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_zero_makes_the_batch_csv_one_download() {
    let app = TestApp::spawn_configured(
        Options {
            smtp: true,
            worker: false,
        },
        json!({ "codes": { "export_window_secs": 0 } }),
    )
    .await;
    let olga = app.token(Role::Operator).await;
    let batch = create_batch(&app, &olga, "KIT-BASIC", 2).await;
    let (status, csv) = export(&app, &olga, &batch).await;
    assert_eq!(status, 200, "{csv}");
    assert_eq!(records(csv.as_str().unwrap()).len(), 2);
    let (status, refused) = export(&app, &olga, &batch).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("export_window_closed")),
        "{refused}"
    );
    assert_eq!(downloads(&app, &batch).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_actors_downloading_at_once_leave_one_holder() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    let olga = app.token(Role::Operator).await;
    let oscar = app.token(Role::Operator).await;
    let batch = create_batch(&app, &olga, "KIT-BASIC", 5).await;
    let (a, b) = tokio::join!(export(&app, &olga, &batch), export(&app, &oscar, &batch));
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let refused = if a.0 == 409 { &a.1 } else { &b.1 };
    assert_eq!(refused["code"], "export_taken_by_another");
    assert_eq!(downloads(&app, &batch).await.len(), 1);
}

// ------------------------------------------------------------ bulk email CSV

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_email_attachment_quotes_and_neutralises_product_names() {
    // Three codes make a bulk mail, with the codes as a CSV attachment.
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "email": { "bulk_threshold": 2 } }),
    )
    .await;
    make_the_kit_nasty(&app).await;
    let olga = app.token(Role::Operator).await;
    let (status, batch) = app
        .admin(
            "POST",
            "/admin/v1/batches",
            Some(&olga),
            Some(
                json!({ "product_sku": NASTY_SKU, "quantity": 3, "kind": "customer_service",
                         "reason": "replacement kits", "email": "ada@example.com" }),
            ),
            None,
        )
        .await;
    assert_eq!(status, 201, "{batch}");
    let mail = app.mails(1).await.remove(0);
    let (name, csv) = mail.attachment().expect("a CSV attachment");
    assert!(name.ends_with(".csv"), "{name}");
    let rows = records(&csv);
    assert_eq!(rows.len(), 3, "{csv}");
    for row in &rows {
        assert!(Code::parse(&row["code"]).is_ok(), "{row:?}");
        assert_eq!(row["product"], format!("'{NASTY_NAME}"), "{csv}");
        assert_eq!(row["valid_until"].len(), 10, "{row:?}");
    }
    assert!(csv.contains("\r\n"), "RFC 4180 line ends");
}

// ------------------------------------------------------------ findings CSV

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_findings_export_neutralises_formula_cells() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    for (i, detail) in [
        "@SUM(1+1)*cmd|' /C calc'!A0",
        "-2+3",
        "a plain, \"quoted\" line",
    ]
    .iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO reconciliation_finding (id, kind, detail, dedupe_key, channel_reference)
             VALUES ($1, 'paid_not_fulfilled', $2, $3, '+1 555 0100')",
        )
        .bind(Uuid::now_v7())
        .bind(detail)
        .bind(format!("neutralise-{i}"))
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let support = app.token(Role::Support).await;
    let (status, csv) = app
        .admin(
            "GET",
            "/admin/v1/findings/export",
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{csv}");
    let csv = csv.as_str().unwrap();
    let rows = records(csv);
    let details: Vec<&str> = rows.iter().map(|r| r["detail"].as_str()).collect();
    assert_eq!(
        details,
        [
            "'@SUM(1+1)*cmd|' /C calc'!A0",
            "'-2+3",
            "a plain, \"quoted\" line"
        ],
        "{csv}"
    );
    assert!(
        rows.iter()
            .all(|r| r["channel_reference"] == "'+1 555 0100")
    );
    // Ids and times are left as they are.
    assert!(rows.iter().all(|r| Uuid::parse_str(&r["id"]).is_ok()));
}

// ------------------------------------------------------------ indexes

/// The plan Postgres makes for `sql` with these parameters (bound as the
/// code binds them, so the plan is the one it gets), as text.
async fn plan(app: &TestApp, sql: &str, arguments: PgArguments) -> String {
    let lines: Vec<String> =
        sqlx::query_scalar_with(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")), arguments)
            .fetch_all(&app.pool)
            .await
            .expect("EXPLAIN runs");
    lines.join("\n")
}

/// Arguments for [`plan`].
macro_rules! arguments {
    ($($value:expr),* $(,)?) => {{
        let mut arguments = PgArguments::default();
        $(arguments.add($value).expect("an encodable argument");)*
        arguments
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_findings_export_pages_through_its_indexes() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    // 6,000 findings of 60 runs over 100 minutes, a tenth of them open.
    sqlx::query(
        "INSERT INTO reconciliation_finding (id, run_id, kind, status, detail, dedupe_key, created_at)
         SELECT gen_random_uuid(), runs.id[1 + i % 60], 'paid_not_fulfilled',
                CASE WHEN i % 10 = 0 THEN 'open' ELSE 'resolved' END,
                'seeded', 'seed-' || i, now() - make_interval(secs => i)
         FROM generate_series(1, 6000) i,
              (SELECT array_agg(gen_random_uuid()) AS id FROM generate_series(1, 60)) runs",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'reconciliation_finding' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for index in [
        "reconciliation_finding_export_idx",
        "reconciliation_finding_run_idx",
    ] {
        assert!(indexes.iter().any(|i| i == index), "{index} in {indexes:?}");
    }
    sqlx::query("ANALYZE reconciliation_finding")
        .execute(&app.pool)
        .await
        .unwrap();
    let sql = entitle_gateway::admin::findings::EXPORT_PAGE_SQL;
    // A page in the middle of everything: a range of the export index.
    let (cursor_at, cursor_id): (chrono::DateTime<chrono::Utc>, Uuid) = sqlx::query_as(
        "SELECT created_at, id FROM reconciliation_finding ORDER BY created_at, id OFFSET 3000 LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let all = plan(
        &app,
        sql,
        arguments![
            None::<String>,
            None::<String>,
            None::<Uuid>,
            cursor_at,
            cursor_id,
            1000_i64
        ],
    )
    .await;
    assert!(
        all.contains("reconciliation_finding_export_idx"),
        "the export's page:\n{all}"
    );
    assert!(!all.contains("Seq Scan"), "{all}");
    // One run's findings, from the start.
    let run: Uuid = sqlx::query_scalar("SELECT run_id FROM reconciliation_finding LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let by_run = plan(
        &app,
        sql,
        arguments![
            None::<String>,
            None::<String>,
            Some(run),
            chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            Uuid::nil(),
            1000_i64
        ],
    )
    .await;
    assert!(
        by_run.contains("reconciliation_finding_run_idx"),
        "one run's findings:\n{by_run}"
    );
    assert!(!by_run.contains("Seq Scan"), "{by_run}");

    // And the export itself pages through all of them.
    let support = app.token(Role::Support).await;
    let (status, csv) = app
        .admin(
            "GET",
            "/admin/v1/findings/export",
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(records(csv.as_str().unwrap()).len(), 6000);
}

/// The prune sweep's query in `entitle_jobs::sweep::prune`, word for word.
const PRUNE_SQL: &str = "UPDATE webhook_inbox SET body = NULL
             WHERE id IN (SELECT id FROM webhook_inbox
                          WHERE body IS NOT NULL AND status <> 'pending'
                            AND received_at < now() - make_interval(days => $1)
                          LIMIT $2 FOR UPDATE SKIP LOCKED)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prune_sweep_finds_old_bodies_through_its_index() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    // 5,000 finished events of the last few days, 100 past the retention
    // period (30 days), 300 already pruned long ago, and a few pending.
    // Bodies of 1.5 KB, as channels send them.
    sqlx::query(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body, received_at, status)
         SELECT gen_random_uuid(), 'native', 'evt_' || i, 'order.paid',
                CASE WHEN i <= 5100 THEN
                    (SELECT string_agg(md5(i::text || '/' || j), '') FROM generate_series(1, 48) j)
                END,
                CASE WHEN i <= 5000 THEN now() - make_interval(mins => i)
                     ELSE now() - make_interval(days => 40 + i % 30) END,
                CASE WHEN i % 500 = 7 AND i <= 5000 THEN 'pending' ELSE 'processed' END
         FROM generate_series(1, 5400) i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE webhook_inbox")
        .execute(&app.pool)
        .await
        .unwrap();
    let retention_days = app.ctx.config.schedule.retention_days as i32;
    assert!(retention_days <= 40, "the seeded old events are past it");
    let prune = plan(&app, PRUNE_SQL, arguments![retention_days, 1000_i64]).await;
    assert!(
        prune.contains("webhook_inbox_prune_idx"),
        "the prune sweep:\n{prune}"
    );
    assert!(!prune.contains("Seq Scan on webhook_inbox"), "{prune}");

    // The sweep itself (not a copy of its query) reads that index.
    let scans = || async {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&app.pool)
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'webhook_inbox_prune_idx'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let before = scans().await;
    let pruned = entitle_jobs::sweep::prune(&app.pool, retention_days as u32, 1000)
        .await
        .expect("the sweep runs");
    assert_eq!(pruned["bodies_pruned"], 100, "{pruned}");
    entitle_tests::eventually(
        "the prune index's scan count to grow",
        entitle_tests::WAIT,
        || async { (scans().await > before).then_some(()) },
    )
    .await;
}

// ------------------------------------------------------------ failed auth

async fn products(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(format!("{}/admin/v1/products", app.address))
        .bearer_auth(token)
        .send()
        .await
        .expect("the gateway answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_bearer_authentications_are_limited_per_address_even_for_a_good_token() {
    let app = TestApp::spawn_configured(
        Options {
            smtp: true,
            worker: false,
        },
        json!({ "gateway": { "limits": { "failed_auth_per_minute_per_address": 20 } } }),
    )
    .await;
    let support = app.token(Role::Support).await;
    // Good tokens never count.
    for _ in 0..30 {
        assert_eq!(products(&app, &support).await.status(), 200);
    }
    // Twenty wrong ones are each answered for what they are...
    for i in 0..20 {
        let response = products(&app, &format!("ent_wrong_{i}")).await;
        assert_eq!(response.status(), 401, "attempt {i}");
    }
    // ... and then the address is refused, a good token too.
    for token in [support.as_str(), "ent_wrong_again"] {
        let response = products(&app, token).await;
        assert_eq!(response.status(), 429);
        let wait: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // Twenty a minute: one attempt back every 3 s.
        assert!((1..=3).contains(&wait), "Retry-After: {wait}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "rate_limited", "{body}");
    }
    // The platform API is not the admin API's business.
    let (status, _) = app.check("AAAA-BBBB-CCCC-DDDD").await;
    assert_ne!(status, 429);

    // Once the limit allows another attempt, a good token is let in.
    let wait = {
        let response = products(&app, &support).await;
        assert_eq!(response.status(), 429);
        response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
    assert_eq!(products(&app, &support).await.status(), 200);
    // One more wrong one uses the attempt that came back, and the address
    // is refused again.
    assert_eq!(products(&app, "ent_wrong_later").await.status(), 401);
    assert_eq!(products(&app, &support).await.status(), 429);
}

/// The expiry sweep reads its index (`swept_at IS NULL`, by expiry), which
/// holds only codes it has not passed yet, whatever their state: not a walk
/// over every code ever issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_sweep_reads_its_index() {
    let app = TestApp::spawn_with(Options {
        smtp: false,
        worker: false,
    })
    .await;
    // 20,000 codes: most redeemed and passed long ago, some still to come,
    // a hundred due now.
    sqlx::query(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4, state,
                                      expires_at, swept_at)
         SELECT gen_random_uuid(), (SELECT id FROM product LIMIT 1),
                decode(md5(i::text), 'hex'), '\\x00', 'ABCD',
                CASE WHEN i % 4 = 0 THEN 'issued' ELSE 'redeemed' END,
                CASE WHEN i % 4 = 0 AND i <= 400 THEN now() - interval '1 hour'
                     WHEN i % 4 = 0 THEN now() + interval '1 year'
                     ELSE now() - interval '1 year' END,
                CASE WHEN i % 4 = 0 THEN NULL ELSE now() - interval '1 year' END
         FROM generate_series(1, 20000) i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE activation_code")
        .execute(&app.pool)
        .await
        .unwrap();
    let expire = plan(&app, entitle_jobs::sweep::EXPIRE_SQL, arguments![1000_i64]).await;
    // The due codes come from the index; joining a thousand of them back
    // for the update may scan a table this small, by primary key a large one.
    assert!(
        expire.contains("Index Scan using activation_code_expiry_idx"),
        "the expiry sweep:\n{expire}"
    );
    let summary = entitle_jobs::sweep::expire(&app.pool, 1000).await.unwrap();
    assert_eq!(summary["expired"], 100);
}
