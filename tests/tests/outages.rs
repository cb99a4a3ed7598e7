//! Outages are bounded: with Postgres down the gateway answers `503
//! database_unavailable` within a second (channels retry later) and serves
//! again within seconds of it coming back; with Redis down, webhooks are
//! still filed and answered at once, since the gateway never needs Redis.

use std::time::{Duration, Instant};

use entitle_jobs::token::Role;
use entitle_tests::{
    Options, TestApp,
    channels::{Channel, Product, Sale},
    eventually,
    smtp::free_port,
};
use serde_json::json;

/// What `/readyz` answers.
async fn readiness(app: &TestApp) -> reqwest::StatusCode {
    app.http
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_down_the_gateway_answers_503_within_a_second_and_recovers_within_5_s() {
    let app = TestApp::spawn_behind_proxy(
        Options {
            smtp: true,
            worker: true,
        },
        json!({}),
    )
    .await;
    let support = app.token(Role::Support).await;
    let before = Sale::new("ord-outage-before", "a@example.test", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &before).await.status(), 200);
    let codes = app.batch_codes("KIT-BASIC", 1).await;

    let postgres = app.postgres.as_ref().unwrap();
    postgres.down();
    let during = Sale::new("ord-outage-during", "b@example.test", &[(Product::Kit, 1)]);
    for channel in Channel::ALL {
        let started = Instant::now();
        let answer = channel.purchase(&app, &during).await;
        let took = started.elapsed();
        let status = answer.status().as_u16();
        let retry_after = answer.headers().get("retry-after").cloned();
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("database_unavailable")),
            "{channel:?}: {body}"
        );
        assert!(retry_after.is_some(), "{channel:?}: Retry-After");
        eprintln!("{channel:?} answered 503 in {took:?}");
        assert!(took < Duration::from_secs(1), "{channel:?} took {took:?}");
    }
    let started = Instant::now();
    let (status, body) = app
        .admin(
            "GET",
            "/admin/v1/orders?email=a@example.test",
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("database_unavailable"))
    );
    let (status, body) = app.redeem(&codes[0], "acct_1", "me").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("database_unavailable"))
    );
    let ready = readiness(&app).await;
    assert_eq!(ready, 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "three answers in {:?}",
        started.elapsed()
    );

    postgres.up();
    let back = Instant::now();
    eventually(
        "the gateway serves again",
        Duration::from_secs(5),
        || async {
            let status = Channel::Native.purchase(&app, &during).await.status();
            (status == 200).then_some(())
        },
    )
    .await;
    assert!(back.elapsed() < Duration::from_secs(5));
    let ready = readiness(&app).await;
    assert_eq!(ready, 200);
    // Both orders are fulfilled: the refused webhook, sent again, was filed.
    app.wait_count("SELECT count(*) FROM orders WHERE issued_at IS NOT NULL", 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_webhooks_are_filed_and_answered_at_once() {
    // Nothing listens on this port: Redis is down.
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: false,
        },
        json!({ "redis": { "url": format!("redis://127.0.0.1:{}", free_port()) } }),
    )
    .await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let sale = Sale::new(
            &format!("ord-redis-down-{i}"),
            "a@example.test",
            &[(Product::Kit, 1)],
        );
        let channel = Channel::ALL[i % 3];
        let started = Instant::now();
        let status = channel.purchase(&app, &sale).await.status();
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 200, "{channel:?}");
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest webhook {slowest:?}"
    );
    let started = Instant::now();
    let ready = readiness(&app).await;
    assert_eq!(ready, 200, "the gateway does not need Redis");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'pending'")
            .await,
        20,
        "every webhook is in Postgres, waiting for the worker"
    );
}

/// Postgres goes away in the moment between the SMTP server accepting an
/// email and the sender recording it. The sender keeps trying to record it
/// until Postgres is back (within the delivery's lease), so the email is
/// recorded as sent and not sent again once its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_accepted_as_postgres_goes_down_is_recorded_once_it_is_back() {
    let app = TestApp::spawn_behind_proxy(
        Options {
            smtp: false,
            worker: false,
        },
        json!({}),
    )
    .await;
    let sale = Sale::new("ord-outage-mail", "m@example.test", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    let inbox: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM webhook_inbox")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    entitle_jobs::handlers::process_now(&app.ctx, &inbox)
        .await
        .expect("the order is fulfilled");
    let delivery: uuid::Uuid = sqlx::query_scalar("SELECT id FROM email_delivery")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    // The sink takes Postgres away as it accepts the first message, before
    // its "250" reaches the sender.
    let cutter = app.postgres.as_ref().unwrap().cutter();
    let once = std::sync::Once::new();
    let sink = entitle_tests::smtp::SmtpSink::start_on(
        app.smtp_port,
        Some(std::sync::Arc::new(move |_| {
            once.call_once(|| cutter.cut())
        })),
    );
    let (token, leased) = entitle_jobs::feed::lease_now(
        &app.pool,
        entitle_jobs::feed::Work::Deliveries,
        &[delivery],
        app.ctx.config.lease(),
    )
    .await
    .unwrap();
    assert_eq!(leased, [delivery]);
    let ctx = app.ctx.clone();
    let batch = tokio::spawn(async move {
        entitle_jobs::handlers::send_deliveries(&ctx, token, &[delivery]).await
    });
    eventually(
        "the sink accepted the email",
        Duration::from_secs(10),
        || async { (sink.count() == 1).then_some(()) },
    )
    .await;
    // Down for a second: well within the lease (3 s in the tests).
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.postgres.as_ref().unwrap().up();
    let done = batch.await.unwrap().expect("the batch ends");

    assert_eq!(done.sent, 1, "{done:?}");
    // Read once the pool has passed over the connections the outage broke
    // (nothing else writes: there is no worker).
    let (status, attempts, recorded): (String, i32, i64) = eventually(
        "Postgres answers through the proxy",
        Duration::from_secs(5),
        || async {
            sqlx::query_as(
                "SELECT status, attempts,
                        (SELECT count(*) FROM audit_event WHERE action = 'delivery.sent')
                 FROM email_delivery WHERE id = $1",
            )
            .bind(delivery)
            .fetch_one(&app.pool)
            .await
            .ok()
        },
    )
    .await;
    assert_eq!(
        (status.as_str(), attempts, recorded),
        ("sent", 1, 1),
        "recorded, once, when the batch ended"
    );
    assert_eq!(sink.count(), 1, "the email went once");
}
