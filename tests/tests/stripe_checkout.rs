//! A paid Stripe Checkout order, end to end: webhook → codes → one email →
//! redemption, with duplicates, bad signatures and flaky dependencies.

use entitle_tests::{
    STRIPE_WEBHOOK_SECRET, TestApp, WAIT, eventually,
    stripe::{line_items_page, line_items_path, mount_line_items, paid_session},
};
use serde_json::Value;
use wiremock::{Mock, ResponseTemplate, matchers::method, matchers::path};

/// A paid checkout of `items` by `buyer` through the whole path; returns the
/// codes from the email that arrives.
async fn buy(app: &TestApp, session: &str, items: &[(&str, u32)], buyer: &str) -> Vec<String> {
    mount_line_items(&app.stripe, session, items).await;
    let response = app
        .post_stripe(&paid_session(&format!("evt_{session}"), session, buyer))
        .await;
    assert_eq!(response.status(), 200);
    app.mails(1).await[0].codes()
}

/// Waits until every delivery row is sent.
async fn all_deliveries_sent(app: &TestApp) {
    eventually("every delivery sent", WAIT, || async {
        let unsent = app
            .count("SELECT count(*) FROM email_delivery WHERE status <> 'sent'")
            .await;
        let total = app.count("SELECT count(*) FROM email_delivery").await;
        (total > 0 && unsent == 0).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_checkout_for_three_units_emails_three_distinct_codes_in_one_message() {
    let app = TestApp::spawn().await;
    mount_line_items(&app.stripe, "cs_test_three", &[("price_basic_kit", 3)]).await;

    let response = app
        .post_stripe(&paid_session(
            "evt_three",
            "cs_test_three",
            "ada@example.com",
        ))
        .await;
    assert_eq!(response.status(), 200);

    let messages = app.mails(1).await;
    all_deliveries_sent(&app).await;
    let mail = &messages[0];
    assert_eq!(mail.to, vec!["ada@example.com".to_owned()]);
    assert_eq!(mail.subject(), "Your 3 activation codes");
    let codes = mail.codes();
    assert_eq!(codes.len(), 3, "three distinct codes in {}", mail.text());
    for code in &codes {
        assert!(
            mail.html().contains(code.as_str()),
            "HTML part lists {code}"
        );
    }
    assert!(mail.text().contains("https://shop.test/redeem"));
    assert!(mail.message_id().ends_with("@entitle.test"));
    assert_eq!(
        app.mailbox().messages().len(),
        1,
        "one message, not one per code"
    );

    let order: (String, Option<String>, String) = sqlx::query_as(
        "SELECT buyer_email, account_id, state FROM orders WHERE channel_order_id = 'cs_test_three'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        order,
        (
            "ada@example.com".into(),
            Some("acct_42".into()),
            "paid".into()
        )
    );
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT last4, state FROM activation_code ORDER BY unit_index")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 3);
    for (last4, state) in &stored {
        assert_eq!(state, "issued");
        assert!(codes.iter().any(|c| c.ends_with(last4.as_str())));
    }
    // Codes are secrets: the database holds no plain copy of any of them.
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM activation_code c, audit_event a
         WHERE position(replace($1, '-', '') in a.data::text) > 0
            OR position(replace($1, '-', '') in encode(c.code_sealed, 'escape')) > 0",
    )
    .bind(&codes[0])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(plain, 0);
    // Nor does Redis: its jobs carry ids only.
    let redis = app.redis_contents().await;
    assert!(redis.contains("\"ids\""), "the jobs were found: {redis}");
    for code in &codes {
        let canonical = code.replace('-', "");
        assert!(!redis.contains(code.as_str()) && !redis.contains(&canonical));
    }
    assert!(!redis.contains("ada@example.com"), "nor personal data");
    let issued_events = app
        .count("SELECT count(*) FROM audit_event WHERE action = 'code.issued'")
        .await;
    assert_eq!(issued_events, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_emailed_code_redeems_once_and_another_account_is_told_it_is_already_redeemed() {
    let app = TestApp::spawn().await;
    let code = buy(
        &app,
        "cs_test_redeem",
        &[("price_pro_licence", 1)],
        "bo@example.com",
    )
    .await[0]
        .clone();

    // Typed sloppily, as customers do.
    let typed = format!(" {} ", code.to_lowercase().replace('-', " "));
    let (status, body) = app.redeem(&typed, "acct_bo", "profile_7").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["account_id"], "acct_bo");
    assert_eq!(body["entity_ref"], "profile_7");
    assert_eq!(body["product_sku"], "LIC-PRO-1Y");
    assert_eq!(body["code_last4"], code[15..]);
    assert!(
        !body.to_string().contains(&code),
        "the answer never echoes the code"
    );

    let (again, same) = app.redeem(&code, "acct_bo", "profile_7").await;
    assert_eq!(
        again, 200,
        "redeeming again for the same holder is idempotent"
    );
    assert_eq!(same["id"], body["id"]);

    let (status, err) = app.redeem(&code, "acct_eve", "profile_1").await;
    assert_eq!(status, 409);
    assert_eq!(err["code"], "code_already_redeemed");

    let (status, err) = app.redeem(&code, "acct_bo", "profile_other").await;
    assert_eq!(status, 409, "same account, other entity is someone else");
    assert_eq!(err["code"], "code_already_redeemed");

    let state: String = sqlx::query_scalar("SELECT state FROM activation_code")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "redeemed");
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 1);
    let (actor, data): (String, Value) =
        sqlx::query_as("SELECT actor, data FROM audit_event WHERE action = 'code.redeemed'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // The caller is the platform key; the account is in the event.
    assert_eq!(
        actor,
        format!("platform:{}", entitle_tests::PLATFORM_KEY_NAME)
    );
    assert_eq!(data["after"]["account_id"], "acct_bo");
    assert_eq!(data["before"]["state"], "issued");
    assert_eq!(data["after"]["state"], "redeemed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redemption_answers_carry_stable_error_codes() {
    let app = TestApp::spawn().await;
    let codes = buy(
        &app,
        "cs_test_states",
        &[("price_basic_kit", 3)],
        "cy@example.com",
    )
    .await;

    // Unknown but well-formed: a fresh code that was never issued.
    let unknown = entitle_jobs::code::Code::generate().display();
    let (status, body) = app.redeem(&unknown, "acct", "e").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("code_not_found"))
    );

    sqlx::query(
        "UPDATE activation_code SET state = 'revoked', revoked_at = now() WHERE last4 = $1",
    )
    .bind(&codes[0][15..])
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, body) = app.redeem(&codes[0], "acct", "e").await;
    assert_eq!((status, body["code"].as_str()), (410, Some("code_revoked")));

    sqlx::query(
        "UPDATE activation_code SET expires_at = now() - interval '1 day' WHERE last4 = $1",
    )
    .bind(&codes[1][15..])
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, body) = app.redeem(&codes[1], "acct", "e").await;
    assert_eq!((status, body["code"].as_str()), (410, Some("code_expired")));

    let (status, body) = app.redeem("ABCD", "acct", "e").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("code_malformed"))
    );

    let (status, body) = app.redeem(&codes[2], "", "e").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_request"))
    );
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE state = 'redeemed'")
            .await,
        0,
        "a rejected request changes nothing"
    );
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.redeemed'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_event_delivered_five_times_at_once_yields_one_order_three_codes_one_email() {
    let app = TestApp::spawn().await;
    mount_line_items(&app.stripe, "cs_test_dup", &[("price_basic_kit", 3)]).await;
    let body = paid_session("evt_dup", "cs_test_dup", "dee@example.com");

    let posts = (0..5).map(|_| app.post_stripe(&body));
    for response in futures_join_all(posts).await {
        assert_eq!(response.status(), 200);
    }
    app.mails(1).await;
    all_deliveries_sent(&app).await;
    eventually("the event processed", WAIT, || async {
        (app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'")
            .await
            == 1)
            .then_some(())
    })
    .await;

    assert_eq!(app.count("SELECT count(*) FROM webhook_inbox").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM email_delivery").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM email_delivery WHERE attempts = 1")
            .await,
        1,
        "the delivery was attempted once"
    );
    assert_eq!(app.mailbox().messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_jobs_for_the_same_event_issue_its_codes_once() {
    // No worker: the jobs are run directly, five at once, as five worker
    // processes holding duplicated queue entries (the same lease) would.
    let app = TestApp::spawn_with(entitle_tests::Options {
        smtp: true,
        worker: false,
    })
    .await;
    mount_line_items(
        &app.stripe,
        "cs_test_race",
        &[("price_basic_kit", 2), ("price_pro_licence", 1)],
    )
    .await;
    let inbox_id = filed_session(&app, "evt_race", "cs_test_race", "eli@example.com").await;

    let token = leased(&app, entitle_jobs::feed::Work::Events, &[inbox_id]).await;
    let ids = [inbox_id];
    let runs = (0..5).map(|_| entitle_jobs::handlers::process_events(&app.ctx, token, &ids));
    for result in futures_join_all(runs).await {
        result.expect("every run succeeds");
    }
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM order_line").await, 2);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM email_delivery").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'order.created'")
            .await,
        1
    );
}

/// The queue may hand one delivery job to two senders at once (a job
/// redelivered while its first run still goes). The claim moves the rows to
/// the claiming sender's own token, so the fed token sends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_jobs_for_the_same_delivery_send_its_email_once() {
    let app = TestApp::spawn_with(entitle_tests::Options {
        smtp: true,
        worker: false,
    })
    .await;
    mount_line_items(&app.stripe, "cs_test_twice", &[("price_basic_kit", 2)]).await;
    let inbox_id = filed_session(&app, "evt_twice", "cs_test_twice", "gus@example.com").await;
    entitle_jobs::handlers::process_now(&app.ctx, &[inbox_id])
        .await
        .expect("the event is processed");
    let delivery: uuid::Uuid = sqlx::query_scalar("SELECT id FROM email_delivery")
        .fetch_one(&app.pool)
        .await
        .unwrap();

    let token = leased(&app, entitle_jobs::feed::Work::Deliveries, &[delivery]).await;
    let ids = [delivery];
    let runs = (0..5).map(|_| entitle_jobs::handlers::send_deliveries(&app.ctx, token, &ids));
    let done = futures_join_all(runs).await;
    let claimed: usize = done
        .into_iter()
        .map(|d| d.expect("every run succeeds").claimed)
        .sum();

    assert_eq!(claimed, 1, "one run claimed the delivery");
    assert_eq!(app.mailbox().messages().len(), 1, "the email went once");
    assert_eq!(
        app.count("SELECT count(*) FROM email_delivery WHERE status = 'sent' AND attempts = 1")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_signature_or_a_stale_timestamp_gets_400_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let body = paid_session("evt_bad", "cs_test_bad", "fay@example.com");
    let now = chrono::Utc::now().timestamp();

    let forged = entitle_jobs::channel::stripe::sign(body.as_bytes(), "whsec_wrong", now);
    let response = app.post_stripe_signed(&body, Some(&forged)).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "signature_invalid"
    );

    let stale =
        entitle_jobs::channel::stripe::sign(body.as_bytes(), STRIPE_WEBHOOK_SECRET, now - 301);
    let response = app.post_stripe_signed(&body, Some(&stale)).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "signature_stale"
    );

    let response = app.post_stripe_signed(&body, None).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "signature_missing"
    );

    let tampered = body.replace("fay@example.com", "mallory@example.com");
    let signed_original =
        entitle_jobs::channel::stripe::sign(body.as_bytes(), STRIPE_WEBHOOK_SECRET, now);
    let response = app
        .post_stripe_signed(&tampered, Some(&signed_original))
        .await;
    assert_eq!(response.status(), 400);

    assert_eq!(app.count("SELECT count(*) FROM webhook_inbox").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
    assert!(
        app.stripe.received_requests().await.unwrap().is_empty(),
        "nothing was looked up for a rejected event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn line_items_failing_twice_then_succeeding_still_end_in_one_correct_order() {
    let app = TestApp::spawn().await;
    Mock::given(method("GET"))
        .and(path(line_items_path("cs_test_flaky")))
        .respond_with(ResponseTemplate::new(500).set_body_string("{\"error\":{}}"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path(line_items_path("cs_test_flaky")))
        .respond_with(ResponseTemplate::new(200).set_body_json(line_items_page(
            "cs_test_flaky",
            &[("price_basic_kit", 2), ("price_pro_licence", 1)],
            false,
        )))
        .with_priority(2)
        .mount(&app.stripe)
        .await;

    app.post_stripe(&paid_session(
        "evt_flaky",
        "cs_test_flaky",
        "gus@example.com",
    ))
    .await;
    let messages = app.mails(1).await;
    assert_eq!(messages[0].codes().len(), 3);

    let requests = app.stripe.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3, "two failures, then the answer");
    let lines: Vec<(String, i32)> =
        sqlx::query_as("SELECT channel_reference, quantity FROM order_line ORDER BY line_index")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        lines,
        vec![
            ("price_basic_kit".into(), 2),
            ("price_pro_licence".into(), 1)
        ]
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    let (status, attempts): (String, i32) =
        sqlx::query_as("SELECT status, attempts FROM webhook_inbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("processed", 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn line_items_spread_over_pages_are_all_issued() {
    let app = TestApp::spawn().await;
    let session = "cs_test_pages";
    Mock::given(method("GET"))
        .and(path(line_items_path(session)))
        .and(wiremock::matchers::query_param(
            "starting_after",
            format!("li_{session}_price_basic_kit_0"),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(line_items_page(
            "second",
            &[("price_pro_licence", 2)],
            false,
        )))
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path(line_items_path(session)))
        .respond_with(ResponseTemplate::new(200).set_body_json(line_items_page(
            session,
            &[("price_basic_kit", 1)],
            true,
        )))
        .with_priority(2)
        .mount(&app.stripe)
        .await;
    app.post_stripe(&paid_session("evt_pages", session, "hal@example.com"))
        .await;
    assert_eq!(app.mails(1).await[0].codes().len(), 3);
    assert_eq!(app.count("SELECT count(*) FROM order_line").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smtp_down_at_first_then_up_still_delivers_exactly_one_email() {
    let app = TestApp::spawn_with(entitle_tests::Options {
        smtp: false,
        worker: true,
    })
    .await;
    mount_line_items(&app.stripe, "cs_test_smtp", &[("price_basic_kit", 2)]).await;
    app.post_stripe(&paid_session("evt_smtp", "cs_test_smtp", "ivy@example.com"))
        .await;

    let last_error: String = eventually("two failed sending attempts", WAIT, || async {
        sqlx::query_as::<_, (i32, Option<String>)>(
            "SELECT attempts, last_error FROM email_delivery",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .and_then(|(attempts, error)| (attempts >= 2).then_some(error).flatten())
    })
    .await;
    assert!(!last_error.is_empty());
    assert_eq!(
        app.count("SELECT count(*) FROM email_delivery WHERE status IN ('pending', 'sending')")
            .await,
        1,
        "still being retried (pending, or claimed by an attempt), not given up"
    );

    let sink = app.start_smtp();
    all_deliveries_sent(&app).await;
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].codes().len(), 2);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'delivery.sent'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mistyped_code_is_reported_as_malformed_without_a_database_lookup() {
    let app = TestApp::spawn().await;
    let code = buy(
        &app,
        "cs_test_typo",
        &[("price_basic_kit", 1)],
        "jo@example.com",
    )
    .await[0]
        .clone();

    // One symbol changed: the fifth, to another valid symbol.
    let mut typo: Vec<char> = code.chars().collect();
    typo[5] = if typo[5] == 'X' { 'Y' } else { 'X' };
    let typo: String = typo.into_iter().collect();

    // The platform key is verified once and then trusted for a few seconds.
    let (status, _) = app.check(&code).await;
    assert_eq!(status, 200);
    // Close the gateway's database pool: any lookup would now fail (503).
    app.pool.close().await;
    let (status, body) = app.redeem(&typo, "acct_jo", "me").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "code_malformed");
    assert!(body["detail"].as_str().unwrap().contains("check symbol"));

    let (status, body) = app.check(&typo).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("code_malformed"))
    );

    // (Redemptions are claimed on the writers' own connections, which this
    // does not close; the check reads through the pool it closed.)
    let (status, body) = app.check(&code).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("database_unavailable")),
        "the real code does need the database: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_price_leaves_the_event_failed_with_its_reason() {
    let app = TestApp::spawn().await;
    mount_line_items(&app.stripe, "cs_test_unknown", &[("price_nobody_knows", 1)]).await;
    let response = app
        .post_stripe(&paid_session(
            "evt_unknown",
            "cs_test_unknown",
            "kim@example.com",
        ))
        .await;
    assert_eq!(response.status(), 200, "authentic events are acknowledged");
    let (error_code, last_error): (Option<String>, Option<String>) =
        eventually("the event marked failed", WAIT, || async {
            sqlx::query_as(
                "SELECT error_code, last_error FROM webhook_inbox WHERE status = 'failed'",
            )
            .fetch_optional(&app.pool)
            .await
            .unwrap()
        })
        .await;
    assert_eq!(error_code.as_deref(), Some("unknown_product"));
    assert!(last_error.unwrap().contains("price_nobody_knows"));
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE body IS NOT NULL")
            .await,
        1,
        "the event is kept to be retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unpaid_sessions_and_other_event_types_are_recorded_and_acknowledged() {
    let app = TestApp::spawn().await;
    let unpaid = entitle_tests::stripe::checkout_event(
        "evt_unpaid",
        "checkout.session.completed",
        "cs_test_unpaid",
        "lu@example.com",
        "unpaid",
    );
    let other = entitle_tests::stripe::checkout_event(
        "evt_expired",
        "checkout.session.expired",
        "cs_test_expired",
        "lu@example.com",
        "unpaid",
    );
    assert_eq!(app.post_stripe(&unpaid).await.status(), 200);
    assert_eq!(app.post_stripe(&other).await.status(), 200);
    eventually("both events ignored", WAIT, || async {
        (app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'ignored'")
            .await
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);

    // The delayed payment succeeds later: now the order is fulfilled.
    mount_line_items(&app.stripe, "cs_test_unpaid", &[("price_basic_kit", 1)]).await;
    let succeeded = entitle_tests::stripe::checkout_event(
        "evt_succeeded",
        "checkout.session.async_payment_succeeded",
        "cs_test_unpaid",
        "lu@example.com",
        "paid",
    );
    assert_eq!(app.post_stripe(&succeeded).await.status(), 200);
    assert_eq!(app.mails(1).await[0].codes().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_reports_postgres_the_one_thing_the_gateway_needs() {
    let app = TestApp::spawn().await;
    let health = app
        .http
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = app
        .http
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["postgres"], "ok");
    // The gateway never uses Redis (the workers do): it is not asked.
    assert!(body.get("redis").is_none(), "{body}");

    app.pool.close().await;
    let ready = app
        .http
        .get(format!("{}/readyz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["postgres"],
        "unavailable"
    );
}

/// Polls all the futures together, so they really overlap.
/// Posts a paid checkout session and answers its inbox event's id.
async fn filed_session(app: &TestApp, event: &str, session: &str, email: &str) -> uuid::Uuid {
    let response = app.post_stripe(&paid_session(event, session, email)).await;
    response.json::<Value>().await.unwrap()["event"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Leases these rows of `work` at once, as a feeder would, and answers
/// the token (every one of them leased).
async fn leased(app: &TestApp, work: entitle_jobs::feed::Work, ids: &[uuid::Uuid]) -> uuid::Uuid {
    let (token, leased) =
        entitle_jobs::feed::lease_now(&app.pool, work, ids, std::time::Duration::from_secs(30))
            .await
            .unwrap();
    assert_eq!(leased, ids);
    token
}

async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    futures::future::join_all(futures).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mailbox_the_server_refuses_marks_the_delivery_failed_with_the_reason() {
    let app = TestApp::spawn().await;
    mount_line_items(&app.stripe, "cs_test_bounce", &[("price_basic_kit", 1)]).await;
    let buyer = format!("nobody@{}", entitle_tests::smtp::UNDELIVERABLE_DOMAIN);
    app.post_stripe(&paid_session("evt_bounce", "cs_test_bounce", &buyer))
        .await;
    let (attempts, error): (i32, String) =
        eventually("the delivery marked failed", WAIT, || async {
            sqlx::query_as(
                "SELECT attempts, last_error FROM email_delivery WHERE status = 'failed'",
            )
            .fetch_optional(&app.pool)
            .await
            .unwrap()
        })
        .await;
    assert_eq!(attempts, 1, "a permanent refusal is not retried");
    assert!(
        error.contains("550") || error.contains("No such mailbox"),
        "{error}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'delivery.failed'")
            .await,
        1
    );
    assert!(app.mailbox().messages().is_empty());
    // The codes themselves are intact and can be re-delivered later.
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE state = 'issued'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_ten_accounts_redeeming_one_code_at_once_exactly_one_wins() {
    let app = TestApp::spawn().await;
    let code = buy(
        &app,
        "cs_test_rush",
        &[("price_basic_kit", 1)],
        "max@example.com",
    )
    .await[0]
        .clone();

    let accounts: Vec<String> = (0..10).map(|i| format!("acct_{i}")).collect();
    let attempts = accounts.iter().map(|a| app.redeem(&code, a, "someone"));
    let answers = futures_join_all(attempts).await;
    let winners: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == 201)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*status, 409);
        assert_eq!(body["code"], "code_already_redeemed");
    }
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.redeemed'")
            .await,
        1
    );
    let holder: String = sqlx::query_scalar("SELECT account_id FROM assignment")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(winners[0]["account_id"], holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authentic_event_that_is_not_json_is_kept_marked_failed_and_answered_200() {
    let app = TestApp::spawn().await;
    let response = app.post_stripe("this is not an event").await;
    // 2xx: Stripe would retry anything else for three days, and no retry
    // can mend it.
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["failed"]["code"],
        "event_malformed"
    );
    let (status, error_code, body): (String, Option<String>, Option<String>) =
        sqlx::query_as("SELECT status, error_code, body FROM webhook_inbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert_eq!(error_code.as_deref(), Some("event_malformed"));
    assert_eq!(body.as_deref(), Some("this is not an event"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_refuses_to_update_or_delete_audit_events() {
    let app = TestApp::spawn().await;
    mount_line_items(&app.stripe, "cs_test_audit", &[("price_basic_kit", 1)]).await;
    app.post_stripe(&paid_session(
        "evt_audit",
        "cs_test_audit",
        "ned@example.com",
    ))
    .await;
    app.mails(1).await;
    let before = app.count("SELECT count(*) FROM audit_event").await;
    assert!(before > 0);

    for statement in [
        "UPDATE audit_event SET actor = 'someone else'",
        "DELETE FROM audit_event",
        "TRUNCATE audit_event",
    ] {
        let err = sqlx::query(statement)
            .execute(&app.pool)
            .await
            .expect_err(statement);
        assert!(
            err.to_string().contains("append-only"),
            "{statement}: {err}"
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM audit_event").await, before);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE actor = 'someone else'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_event_after_fulfilment_is_acknowledged_and_changes_nothing() {
    let app = TestApp::spawn().await;
    mount_line_items(&app.stripe, "cs_test_again", &[("price_basic_kit", 2)]).await;
    let body = paid_session("evt_again", "cs_test_again", "ola@example.com");
    app.post_stripe(&body).await;
    app.mails(1).await;
    all_deliveries_sent(&app).await;

    let response = app.post_stripe(&body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["duplicate"], true);
    // A different event for the same session (Stripe's async success after
    // completed) is filed but fulfils nothing twice.
    let other = entitle_tests::stripe::checkout_event(
        "evt_again_async",
        "checkout.session.async_payment_succeeded",
        "cs_test_again",
        "ola@example.com",
        "paid",
    );
    assert_eq!(app.post_stripe(&other).await.status(), 200);
    eventually("both events processed", WAIT, || async {
        (app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'")
            .await
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 2);
    assert_eq!(app.count("SELECT count(*) FROM email_delivery").await, 1);
    assert_eq!(app.mailbox().messages().len(), 1);
}
