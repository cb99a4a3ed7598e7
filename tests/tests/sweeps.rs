//! The scheduled sweeps: each tick runs once across worker processes; work
//! Redis lost is finished from Postgres, exactly once, once its lease
//! lapses; codes expire in batches that never wait on a redemption; raw
//! bodies are pruned.

use std::time::Duration;

use entitle_tests::{
    Options, TestApp,
    channels::{Channel, Product, Sale},
    eventually,
};
use serde_json::json;

const EVERY_SECOND: &str = "* * * * * *";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_worker_processes_run_each_sweep_tick_once() {
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "schedule": { "housekeeping": EVERY_SECOND, "expire": EVERY_SECOND } }),
    )
    .await;
    app.start_another_worker();
    app.start_another_worker();

    eventually(
        "five housekeeping ticks",
        Duration::from_secs(20),
        || async {
            (app.count(
            "SELECT count(*) FROM sweep_run WHERE job = 'housekeeping' AND finished_at IS NOT NULL",
        )
        .await
            >= 5)
            .then_some(())
        },
    )
    .await;
    let ticks: Vec<(String, chrono::DateTime<chrono::Utc>, String)> =
        sqlx::query_as("SELECT job, tick_at, worker FROM sweep_run ORDER BY job, tick_at")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    // One row per job and tick (the key), and no tick of the covered span
    // was skipped: every second between the first and last has its run.
    for job in ["housekeeping", "expire"] {
        let times: Vec<i64> = ticks
            .iter()
            .filter(|(j, _, _)| j == job)
            .map(|(_, t, _)| t.timestamp())
            .collect();
        assert!(times.len() >= 4, "{job}: {times:?}");
        let span = times.last().unwrap() - times.first().unwrap() + 1;
        assert_eq!(
            span as usize,
            times.len(),
            "{job}: a tick was skipped: {times:?}"
        );
        assert!(
            times.windows(2).all(|w| w[1] > w[0]),
            "{job}: no tick twice"
        );
    }
    // Every run was done by a worker that then recorded what it did.
    assert_eq!(
        app.count("SELECT count(*) FROM sweep_run WHERE finished_at IS NULL AND tick_at < now() - interval '2 seconds'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_workers_claiming_one_tick_at_once_exactly_one_runs_it() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    let tick = chrono::Utc::now();
    let claims = (0..10).map(|i| {
        let pool = app.pool.clone();
        async move {
            entitle_jobs::sweep::claim_tick(&pool, "expire", tick, &format!("sweep-expire-{i}"))
                .await
                .unwrap()
        }
    });
    let won = futures::future::join_all(claims).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    // The next tick is another run.
    let next = tick + chrono::Duration::seconds(1);
    assert!(
        entitle_jobs::sweep::claim_tick(&app.pool, "expire", next, "sweep-expire-0")
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_lost_with_redis_is_finished_from_postgres_exactly_once() {
    let app = TestApp::spawn_configured(
        Options {
            smtp: true,
            worker: false,
        },
        json!({ "schedule": { "housekeeping": EVERY_SECOND } }),
    )
    .await;
    let sales: Vec<Sale> = (0..3)
        .map(|i| {
            Sale::new(
                &format!("lost_{i}"),
                &format!("lost{i}@example.com"),
                &[(Product::Kit, 2)],
            )
        })
        .collect();
    for sale in &sales {
        assert_eq!(Channel::Native.purchase(&app, sale).await.status(), 200);
    }
    // A worker feeds the events into Redis and is gone before it runs them
    // (as when a process is killed): they are leased, and Redis is flushed.
    let queues = app.queues().await;
    let settings = entitle_jobs::feed::FeedSettings {
        batch_size: 100,
        window: 16,
        lease: Duration::from_secs(3),
    };
    let fed = entitle_jobs::feed::feed(
        &app.pool,
        &queues,
        entitle_jobs::feed::Work::Events,
        settings,
    )
    .await
    .unwrap();
    assert_eq!(fed.ids, 3);
    app.flush_redis().await;
    app.restart_worker().await;

    let mails = app.mails(3).await;
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        3,
    )
    .await;
    // Several more sweeps find nothing left to do.
    let runs_now = app.count("SELECT count(*) FROM sweep_run").await;
    eventually("three more sweeps", Duration::from_secs(10), || async {
        (app.count("SELECT count(*) FROM sweep_run").await >= runs_now + 3).then_some(())
    })
    .await;
    assert_eq!(app.mailbox().messages().len(), 3, "each email once");
    assert_eq!(mails.iter().map(|m| m.codes().len()).sum::<usize>(), 6);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 6);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'order.created'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_flush_mid_flight_still_sends_each_email_once() {
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: true,
        },
        json!({ "schedule": { "housekeeping": EVERY_SECOND } }),
    )
    .await;
    let sale = Sale::new("midflight", "mid@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Stripe.purchase(&app, &sale).await.status(), 200);
    // The delivery is being retried (SMTP is down) when Redis is flushed.
    eventually(
        "a failed sending attempt",
        Duration::from_secs(20),
        || async {
            (app.count("SELECT count(*) FROM email_delivery WHERE attempts >= 1")
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    app.flush_redis().await;
    app.start_smtp();
    // The workers keep serving new work after losing their registration.
    let next = Sale::new("after_flush", "next@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Stripe.purchase(&app, &next).await.status(), 200);

    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        2,
    )
    .await;
    let runs_now = app.count("SELECT count(*) FROM sweep_run").await;
    eventually("three more sweeps", Duration::from_secs(10), || async {
        (app.count("SELECT count(*) FROM sweep_run").await >= runs_now + 3).then_some(())
    })
    .await;
    assert_eq!(app.mailbox().messages().len(), 2, "each email once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_codes_expire_in_batches_without_waiting_on_a_redemption() {
    let app = TestApp::spawn().await;
    let sale = Sale::new("old", "old@example.com", &[(Product::Kit, 5)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    let codes = app.mails(1).await[0].codes();
    sqlx::query(
        "UPDATE activation_code SET expires_at = now() - interval '1 minute'
         WHERE unit_index < 4",
    )
    .execute(&app.pool)
    .await
    .unwrap();

    // A redemption holds one of them while the sweep runs.
    let mut held = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM activation_code WHERE unit_index = 0 FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();
    let summary = tokio::time::timeout(
        Duration::from_secs(10),
        entitle_jobs::sweep::expire(&app.pool, 2),
    )
    .await
    .expect("the sweep does not wait on the held row")
    .unwrap();
    assert_eq!(summary["expired"], 3);
    held.rollback().await.unwrap();

    let summary = entitle_jobs::sweep::expire(&app.pool, 2).await.unwrap();
    assert_eq!(
        summary["expired"], 1,
        "the held code is expired on the next run"
    );
    assert_eq!(
        entitle_jobs::sweep::expire(&app.pool, 2).await.unwrap()["expired"],
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE state = 'expired'")
            .await,
        4
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.expired'")
            .await,
        4
    );
    let (status, body) = app.redeem(&codes[0], "acct", "e").await;
    assert_eq!((status, body["code"].as_str()), (410, Some("code_expired")));
    let (status, _) = app.redeem(&codes[4], "acct", "e").await;
    assert_eq!(status, 201, "the unexpired code still works");
}

/// Redemption's update of a code touches no indexed column, so Postgres
/// makes it HOT (no new index entries: redemption is the hot path). The
/// expiry index therefore holds redeemed codes too, until the sweep passes
/// their expiry: it marks them swept and leaves them redeemed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redemptions_add_no_index_entries_and_the_sweep_passes_redeemed_codes_once() {
    // No worker: a HOT update needs room on the code's page, which pruning
    // makes from the versions no transaction can still see; a worker's
    // queries in the same database could hold those versions a moment.
    let app = TestApp::spawn_with(Options {
        smtp: false,
        worker: false,
    })
    .await;
    let codes = app.batch_codes("KIT-BASIC", 40).await;
    for (i, code) in codes.iter().enumerate().take(30) {
        let (status, _) = app.redeem(code, &format!("acct-{i}"), "e").await;
        assert_eq!(status, 201);
    }
    let (updates, hot): (i64, i64) = eventually(
        "the redemptions counted in the table's statistics",
        Duration::from_secs(20),
        || async {
            let counted: (i64, i64) = sqlx::query_as(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                 WHERE relname = 'activation_code'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (counted.0 >= 30).then_some(counted)
        },
    )
    .await;
    assert_eq!(hot, updates, "every redemption was a HOT update");

    sqlx::query("UPDATE activation_code SET expires_at = now() - interval '1 minute'")
        .execute(&app.pool)
        .await
        .unwrap();
    let summary = entitle_jobs::sweep::expire(&app.pool, 16).await.unwrap();
    assert_eq!(summary["expired"], 10, "only the unredeemed codes expire");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM activation_code WHERE state = 'redeemed' AND swept_at IS NOT NULL"
        )
        .await,
        30,
        "redeemed codes stay redeemed, passed by the sweep"
    );
    assert_eq!(
        entitle_jobs::sweep::expire(&app.pool, 16).await.unwrap()["expired"],
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE swept_at IS NULL")
            .await,
        0,
        "the sweep has nothing left to pass"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.expired'")
            .await,
        10
    );

    // A redeemed code the sweep passed, unassigned: issued again, its
    // expiry behind it, so the next sweep expires it.
    let passed: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM activation_code WHERE state = 'redeemed' LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let operator = app.token(entitle_jobs::token::Role::Operator).await;
    let (status, answer) = app
        .admin(
            "POST",
            &format!("/admin/v1/codes/{passed}/unassign"),
            Some(&operator),
            Some(json!({ "reason": "assigned to the wrong account" })),
            Some("unassign-after-sweep"),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        entitle_jobs::sweep::expire(&app.pool, 16).await.unwrap()["expired"],
        1,
        "the unassigned code is expired by the next sweep"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_bodies_are_pruned_after_the_retention_period_and_nothing_else() {
    let app = TestApp::spawn().await;
    let sale = Sale::new("pruned", "pru@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    app.mails(1).await;
    app.events_settled(1).await;
    sqlx::query("UPDATE webhook_inbox SET received_at = now() - interval '31 days'")
        .execute(&app.pool)
        .await
        .unwrap();

    let summary = entitle_jobs::sweep::prune(&app.pool, 30, 100)
        .await
        .unwrap();
    assert_eq!(summary["bodies_pruned"], 1);
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE body IS NULL")
            .await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 1);
    assert!(app.count("SELECT count(*) FROM audit_event").await > 0);
    assert_eq!(
        entitle_jobs::sweep::prune(&app.pool, 30, 100)
            .await
            .unwrap()["bodies_pruned"],
        0
    );
    // Redis forgets the finished jobs (the event's and the email's) too,
    // once each.
    let queues = app.queues().await;
    let deadline = std::time::Instant::now() + entitle_tests::WAIT;
    let mut forgotten = 0;
    while forgotten < 2 && std::time::Instant::now() < deadline {
        forgotten += queues.vacuum(Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(forgotten, 2);
    assert_eq!(queues.vacuum(Duration::ZERO).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_worker_picks_up_each_new_order_without_waiting_for_a_heartbeat() {
    // The shipped polling interval; a missed wake-up would leave a job
    // waiting for the next 30-second heartbeat.
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "worker": { "poll_interval_ms": 200 } }),
    )
    .await;
    for i in 0..6 {
        let sale = Sale::new(
            &format!("idle_{i}"),
            &format!("idle{i}@example.com"),
            &[(Product::Kit, 1)],
        );
        assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
        eventually(
            &format!("order {i} emailed"),
            Duration::from_secs(10),
            || async { (app.mailbox().messages().len() > i).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holders_are_reminded_once_of_codes_about_to_expire() {
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "schedule": { "remind": EVERY_SECOND, "remind_days_before": 7 } }),
    )
    .await;
    let mut sale = Sale::new("remind", "rem@example.com", &[(Product::Kit, 3)]);
    sale.gift = Some(entitle_tests::channels::GiftSpec {
        recipient_email: "holder@example.com".into(),
        recipient_name: "Holder".into(),
        message: "for you".into(),
        send_at: None,
    });
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    let codes = app
        .mails(2)
        .await
        .iter()
        .find(|m| m.to == vec!["holder@example.com".to_owned()])
        .unwrap()
        .codes();
    app.redeem(&codes[2], "acct_h", "me").await;
    // One code expires in two days, one in a year; one is already redeemed.
    sqlx::query("UPDATE activation_code SET expires_at = now() + interval '2 days' WHERE unit_index IN (0, 2)")
        .execute(&app.pool)
        .await
        .unwrap();

    let mails = app.mails(3).await;
    let reminder = mails
        .iter()
        .find(|m| m.subject().contains("expires soon"))
        .expect("a reminder");
    assert_eq!(
        reminder.to,
        vec!["holder@example.com".to_owned()],
        "the gift's holder is reminded"
    );
    assert_eq!(
        reminder.codes(),
        vec![codes[0].clone()],
        "only the unredeemed code about to expire"
    );
    let runs_now = app
        .count("SELECT count(*) FROM sweep_run WHERE job = 'remind'")
        .await;
    eventually(
        "three more reminder sweeps",
        Duration::from_secs(10),
        || async {
            (app.count("SELECT count(*) FROM sweep_run WHERE job = 'remind'")
                .await
                >= runs_now + 3)
                .then_some(())
        },
    )
    .await;
    assert_eq!(app.mailbox().messages().len(), 3, "reminded once");
}
