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
