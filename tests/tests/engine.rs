//! The fulfilment engine under load and failure: a backlog of any size
//! drains through a bounded Redis window, exactly once; work that can never
//! succeed ends `failed` with a finding after its attempts (or at once, when
//! no retry can help) and spares the rest of its batch; orders above the unit
//! cap fail clearly; worker processes racing over one backlog issue each
//! code once; dead workers' Redis registrations are forgotten.

use std::time::Duration;

use entitle_tests::{
    Options, TestApp,
    channels::{Channel, Product, Sale, Signing, shopify_order},
    eventually,
    smtp::DEFERRED_DOMAIN,
    stripe::{checkout_event, line_items_path},
};
use serde_json::json;
use wiremock::{Mock, ResponseTemplate, matchers::path};

fn stopped() -> Options {
    Options {
        smtp: true,
        worker: false,
    }
}

/// Jobs waiting in the events queue right now.
async fn waiting_events(app: &TestApp) -> u64 {
    let queues = app.queues().await;
    queues
        .waiting(queues.events.get_config())
        .await
        .expect("Redis answers")
}

/// A native purchase body with this order id, buyer name and quantity.
fn native_purchase(order_id: &str, buyer_name: &str, quantity: u64) -> String {
    json!({
        "type": "purchase.paid",
        "order_id": order_id,
        "buyer": { "email": "buyer@example.com", "name": buyer_name },
        "lines": [{ "sku": "KIT-BASIC", "quantity": quantity, "unit_amount": 2000 }],
    })
    .to_string()
}

/// A Shopify `orders/paid` body of one line of `quantity` kits. The native
/// checkout refuses such orders at the door (400); Shopify's are filed, so
/// the worker's own checks are what stops them.
fn shopify_paid(order: &str, quantity: u32, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut body = shopify_order(&Sale::new(
        order,
        "buyer@example.com",
        &[(Product::Kit, quantity)],
    ));
    edit(&mut body);
    body.to_string()
}

async fn post_shopify(app: &TestApp, event_id: &str, body: &str) {
    let response = Channel::Shopify
        .post(app, event_id, "orders/paid", body, Signing::Good)
        .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

async fn post_native(app: &TestApp, event_id: &str, body: &str) {
    let response = Channel::Native
        .post(app, event_id, "purchase.paid", body, Signing::Good)
        .await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

/// An event's status, error code and attempts.
async fn event_outcome(app: &TestApp, event_id: &str) -> (String, Option<String>, i32) {
    sqlx::query_as("SELECT status, error_code, attempts FROM webhook_inbox WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_purchases_due_at_once_drain_through_a_window_of_sixteen_jobs() {
    let app = TestApp::spawn_configured(stopped(), json!({ "worker": { "window": 16 } })).await;
    let n = 20_000i64;
    // Seeded in Postgres itself, as a sale (or a worker outage) leaves them:
    // filed, due, never processed.
    sqlx::query(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body)
         SELECT gen_random_uuid(), 'native', 'msg_backlog_' || g, 'purchase.paid',
                json_build_object('type', 'purchase.paid', 'order_id', 'backlog_' || g,
                    'buyer', json_build_object('email', 'b' || g || '@example.com'),
                    'lines', json_build_array(json_build_object('sku', 'KIT-BASIC', 'quantity', 1)))::text
         FROM generate_series(1, $1) AS g",
    )
    .bind(n)
    .execute(&app.pool)
    .await
    .unwrap();
    app.restart_worker().await;

    let mailbox = app.mailbox();
    let deepest = std::sync::atomic::AtomicU64::new(0);
    eventually(
        "every email of the backlog",
        Duration::from_secs(600),
        || async {
            let waiting = waiting_events(&app).await;
            deepest.fetch_max(waiting, std::sync::atomic::Ordering::Relaxed);
            (mailbox.count() >= n as usize).then_some(())
        },
    )
    .await;
    let deepest = deepest.into_inner();
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        n,
    )
    .await;
    assert!(deepest <= 16, "Redis held {deepest} jobs; the window is 16");
    assert_eq!(app.count("SELECT count(*) FROM orders").await, n);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, n);
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'")
            .await,
        n
    );
    assert_eq!(app.count("SELECT count(*) FROM email_delivery").await, n);
    let messages = app.mailbox().messages();
    let ids: std::collections::HashSet<String> = messages.iter().map(|m| m.message_id()).collect();
    assert_eq!(messages.len(), n as usize, "no email twice");
    assert_eq!(ids.len(), n as usize, "one message per order");
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'order.created'")
            .await,
        n
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_that_keeps_failing_ends_failed_after_its_attempts_with_a_finding() {
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "worker": { "max_attempts": 3 } }),
    )
    .await;
    // Stripe's API answers this session's line items with 500, every time.
    Mock::given(path(line_items_path("cs_test_poison")))
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .mount(&app.stripe)
        .await;
    let body = checkout_event(
        "evt_poison",
        "checkout.session.completed",
        "cs_test_poison",
        "poison@example.com",
        "paid",
    );
    assert_eq!(app.post_stripe(&body).await.status(), 200);
    // A healthy order beside it goes through.
    let healthy = Sale::new("healthy", "healthy@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &healthy).await.status(), 200);

    eventually("the event to fail", entitle_tests::WAIT, || async {
        (event_outcome(&app, "evt_poison").await.0 == "failed").then_some(())
    })
    .await;
    let (_, code, attempts) = event_outcome(&app, "evt_poison").await;
    assert_eq!(code.as_deref(), Some("attempts_exhausted"));
    assert_eq!(attempts, 3, "tried exactly max_attempts times");
    let last_error: String =
        sqlx::query_scalar("SELECT last_error FROM webhook_inbox WHERE event_id = 'evt_poison'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(last_error.contains("after 3 attempts"), "{last_error}");
    let finding: (String, String) = sqlx::query_as(
        "SELECT status, detail FROM reconciliation_finding
         WHERE kind = 'event_failed' AND channel_reference = 'evt_poison'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(finding.0, "open");
    assert!(finding.1.contains("attempts_exhausted"), "{}", finding.1);
    app.mails(1).await;
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    // Nothing tries it again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(event_outcome(&app, "evt_poison").await.2, 3);
    // The process's recorder (what the metrics listeners serve).
    let metrics = entitle_jobs::telemetry::metrics().render();
    assert!(
        metrics.contains("entitle_attempts_exhausted_total{what=\"event\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_the_server_keeps_deferring_ends_failed_after_its_attempts_with_a_finding() {
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "email": { "max_attempts": 3 } }),
    )
    .await;
    let deferred = Sale::new(
        "deferred",
        &format!("someone@{DEFERRED_DOMAIN}"),
        &[(Product::Kit, 1)],
    );
    let fine = Sale::new("fine", "fine@example.com", &[(Product::Kit, 1)]);
    for sale in [&deferred, &fine] {
        assert_eq!(Channel::Native.purchase(&app, sale).await.status(), 200);
    }
    let failed = "SELECT count(*) FROM email_delivery WHERE status = 'failed'";
    app.wait_count(failed, 1).await;
    let (attempts, code, error): (i32, String, String) = sqlx::query_as(
        "SELECT attempts, error_code, last_error FROM email_delivery WHERE status = 'failed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 3);
    assert_eq!(code, "attempts_exhausted");
    assert!(error.contains("451"), "{error}");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM reconciliation_finding f JOIN orders o ON o.id = f.order_id
             WHERE f.kind = 'delivery_failed' AND o.channel_order_id = 'deferred'"
        )
        .await,
        1
    );
    let mails = app.mails(1).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec!["fine@example.com".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_above_the_unit_cap_fails_clearly_and_mints_nothing() {
    let app = TestApp::spawn().await;
    post_shopify(
        &app,
        "msg_huge",
        &shopify_paid("huge", 2_147_483_648, |_| {}),
    )
    .await;
    post_shopify(&app, "msg_large", &shopify_paid("large", 1_000_000, |_| {})).await;
    for event in ["msg_huge", "msg_large"] {
        eventually(event, entitle_tests::WAIT, || async {
            (event_outcome(&app, event).await.0 == "failed").then_some(())
        })
        .await;
        let (_, code, attempts) = event_outcome(&app, event).await;
        assert_eq!(code.as_deref(), Some("order_too_large"));
        assert_eq!(attempts, 1, "no retry can help");
    }
    let error: String =
        sqlx::query_scalar("SELECT last_error FROM webhook_inbox WHERE event_id = 'msg_large'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(
        error.contains("1000000 units") && error.contains("worker.max_units_per_order"),
        "{error}"
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding WHERE kind = 'event_failed'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_the_database_refuses_fails_its_event_at_once_and_spares_the_rest_of_its_batch() {
    let app = TestApp::spawn_with(stopped()).await;
    for i in 0..10 {
        post_native(
            &app,
            &format!("msg_good_{i}"),
            &native_purchase(&format!("good_{i}"), "Good", 1),
        )
        .await;
    }
    // A NUL byte (Postgres text refuses it) and an order id too long for its
    // index (random, so it does not compress below the limit): no retry can
    // store either.
    post_shopify(
        &app,
        "msg_nul",
        &shopify_paid("nul", 1, |b| {
            b["customer"]["first_name"] = json!("Nul\u{0}Byte")
        }),
    )
    .await;
    let long: String = (0..8000)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random_range(0..36)]))
        .collect();
    post_shopify(
        &app,
        "msg_long",
        &shopify_paid("long", 1, |b| b["id"] = json!(long)),
    )
    .await;
    // One worker takes them all in one batch.
    app.restart_worker().await;

    app.mails(10).await;
    app.events_settled(12).await;
    let (_, code, attempts) = event_outcome(&app, "msg_nul").await;
    assert_eq!((code.as_deref(), attempts), (Some("invalid_data"), 1));
    let (_, code, attempts) = event_outcome(&app, "msg_long").await;
    assert_eq!((code.as_deref(), attempts), (Some("value_too_large"), 1));
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 10);
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'")
            .await,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_worker_processes_racing_over_one_backlog_fulfil_each_order_once() {
    let app = TestApp::spawn_configured(
        stopped(),
        // Small batches, so both processes take many.
        json!({ "worker": { "batch_size": 7 } }),
    )
    .await;
    let n = 300;
    for i in 0..n {
        post_native(
            &app,
            &format!("msg_race_{i}"),
            &native_purchase(&format!("race_{i}"), "Racer", 2),
        )
        .await;
    }
    app.restart_worker().await;
    app.start_another_worker();

    let mails = app.mails(n).await;
    app.events_settled(n as i64).await;
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        n as i64,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mails_after = app.mailbox().messages();
    assert_eq!(mails_after.len(), n, "no email twice");
    let ids: std::collections::HashSet<String> = mails.iter().map(|m| m.message_id()).collect();
    assert_eq!(ids.len(), n);
    let codes: std::collections::HashSet<String> =
        mails_after.iter().flat_map(|m| m.codes()).collect();
    assert_eq!(codes.len(), 2 * n, "two distinct codes per order");
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code").await,
        2 * n as i64
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, n as i64);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.issued'")
            .await,
        2 * n as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_claimed_by_a_worker_that_died_are_done_once_its_lease_lapses() {
    let app = TestApp::spawn_with(stopped()).await;
    for i in 0..3 {
        post_native(
            &app,
            &format!("msg_orphan_{i}"),
            &native_purchase(&format!("orphan_{i}"), "Orphan", 1),
        )
        .await;
    }
    // A worker leased and claimed them, then was killed: nothing of its
    // work was recorded but the claim (an attempt each).
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM webhook_inbox")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let (token, leased) = entitle_jobs::feed::lease_now(
        &app.pool,
        entitle_jobs::feed::Work::Events,
        &ids,
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(leased.len(), 3);
    let claimed = entitle_jobs::inbox::claim(&app.pool, token, &leased, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    app.restart_worker().await;

    let mails = app.mails(3).await;
    app.events_settled(3).await;
    assert_eq!(mails.len(), 3);
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM webhook_inbox")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        attempts,
        vec![2, 2, 2],
        "the dead worker's claim, then one more"
    );
    // The dead worker's job, had Redis kept it, finds nothing left to do.
    let late = entitle_jobs::handlers::process_events(&app.ctx, token, &leased)
        .await
        .unwrap();
    assert_eq!(late.claimed, 0);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn housekeeping_forgets_the_redis_registrations_of_workers_that_died() {
    let app = TestApp::spawn().await;
    let queues = app.queues().await;
    let config = queues.events.get_config().clone();
    let client = redis::Client::open(
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Three workers killed an hour ago left their registration, what they
    // held, and their metadata.
    let an_hour_ago = chrono::Utc::now().timestamp() - 3600;
    for i in 0..3 {
        let name = format!("events-dead-{i}");
        let _: () = redis::pipe()
            .cmd("ZADD")
            .arg(config.workers_set())
            .arg(an_hour_ago)
            .arg(&name)
            .cmd("SADD")
            .arg(format!("{}:{name}", config.inflight_jobs_set()))
            .arg("01JOBHELD")
            .cmd("HSET")
            .arg(format!("{}:workers:metadata:{name}", config.queue.as_ref()))
            .arg("backend_name")
            .arg("RedisStorage")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The live worker registers itself.
    eventually(
        "the live worker's registration",
        entitle_tests::WAIT,
        || {
            let mut conn = conn.clone();
            let key = config.workers_set();
            async move {
                let n: usize = redis::cmd("ZCARD")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (n >= 4).then_some(())
            }
        },
    )
    .await;

    let summary = entitle_jobs::sweep::housekeeping(&app.pool, &queues, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(summary["dead_workers_forgotten"], 3);
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(config.workers_set())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with("events-"), "{left:?}");
    assert!(!left[0].contains("dead"), "{left:?}");
    let contents = app.redis_contents().await;
    assert!(!contents.contains("events-dead-"), "{contents}");
    // The live worker still works.
    let sale = Sale::new("after", "after@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    app.mails(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_smtp_server_that_accepts_and_never_answers_delays_an_email_but_never_wedges_it() {
    // Accepts connections and says nothing, ever.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: true,
        },
        json!({ "email": { "smtp_url": format!("smtp://127.0.0.1:{port}"), "smtp_timeout_secs": 1 } }),
    )
    .await;
    let sale = Sale::new("silent", "silent@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    eventually("a second attempt", entitle_tests::WAIT, || async {
        let row: Option<(String, i32, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT status, attempts, error_code, last_error FROM email_delivery
             WHERE attempts >= 2 AND status = 'pending'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        row
    })
    .await;
    let (code, error): (String, String) =
        sqlx::query_as("SELECT error_code, last_error FROM email_delivery")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(code, "smtp_unavailable");
    assert!(error.contains("did not finish within 1 s"), "{error}");
}
