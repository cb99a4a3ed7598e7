//! Reconciliation against wiremock stand-ins for Stripe's and Shopify's
//! APIs: each kind of finding comes from its seeded mismatch and nothing
//! else, healing goes through the normal path, a clean window is clean, a
//! second run repeats nothing, and the APIs' pagination, 429s and 500s are
//! ridden out.

use std::{collections::BTreeSet, time::Duration};

use chrono::Utc;
use entitle_jobs::{reconcile, token::Role};
use entitle_tests::{
    Options, TestApp, WAIT,
    channel_api::{ChannelApi, SHOPIFY_ORDERS_PATH},
    channels::{
        Channel, Product, Sale, Signing, UNIT_PRICE, shopify_order, shopify_refund, stripe_charge,
        stripe_session,
    },
    eventually,
    smtp::UNDELIVERABLE_DOMAIN,
    stripe::mount_line_items,
};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::{
    Mock, ResponseTemplate,
    matchers::{method, path, query_param},
};

/// Records per page in the stand-ins: a handful of orders spans pages.
const PAGE: usize = 2;

/// The last hour, and a minute ahead for clocks.
fn window() -> reconcile::Window {
    let now = Utc::now();
    reconcile::Window {
        start: now - chrono::Duration::hours(1),
        end: now + chrono::Duration::minutes(1),
    }
}

/// Runs a reconciliation in the test and returns its id and recorded row.
async fn reconcile_now(app: &TestApp, channel: Channel) -> (Uuid, Value) {
    let run = reconcile::queue(&app.pool, channel.name(), window(), "test")
        .await
        .unwrap();
    reconcile::execute(&app.ctx, run).await.unwrap();
    (run, run_row(app, run).await)
}

async fn run_row(app: &TestApp, run: Uuid) -> Value {
    sqlx::query_scalar("SELECT to_jsonb(r) FROM reconciliation_run r WHERE id = $1")
        .bind(run)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// A run's findings as (kind, what it is about): the channel's order id,
/// else the channel's reference, else "code".
async fn findings_of(app: &TestApp, run: Uuid) -> BTreeSet<(String, String)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT f.kind, coalesce(o.channel_order_id, f.channel_reference, 'code')
         FROM reconciliation_finding f LEFT JOIN orders o ON o.id = f.order_id
         WHERE f.run_id = $1",
    )
    .bind(run)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Failed events and emails recorded as findings when they failed (by no
/// run), as (kind, channel order id or reference).
async fn findings_of_no_run(app: &TestApp) -> BTreeSet<(String, String)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT f.kind, coalesce(o.channel_order_id, f.channel_reference, 'code')
         FROM reconciliation_finding f LEFT JOIN orders o ON o.id = f.order_id
         WHERE f.run_id IS NULL AND f.kind IN ('delivery_failed', 'event_failed')",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Lists a sale in the channel's API as the channel shows it, with `edit`
/// applied to the listed order first.
fn list(api: &ChannelApi, channel: Channel, sale: &Sale, edit: impl FnOnce(&mut Value)) {
    match channel {
        Channel::Stripe => {
            let mut session = stripe_session(sale);
            edit(&mut session);
            api.stripe_session(session);
        }
        Channel::Shopify => {
            let mut order = shopify_order(sale);
            edit(&mut order);
            api.shopify_order(order);
        }
        Channel::Native => unreachable!("native has no API"),
    }
}

/// Lists the whole sale refunded in the channel.
fn list_full_refund(api: &ChannelApi, channel: Channel, sale: &Sale, refund_id: &str) {
    match channel {
        Channel::Stripe => {
            api.stripe_refund(refund_id, sale.total(), stripe_charge(sale, sale.total()))
        }
        Channel::Shopify => {
            let mut order = shopify_order(sale);
            order["financial_status"] = json!("refunded");
            order["refunds"] = json!([shopify_refund(sale, refund_id, &sale.lines)]);
            api.shopify_updated_order(order);
        }
        Channel::Native => unreachable!(),
    }
}

/// Lists one kit of the sale refunded in the channel.
fn list_one_kit_refunded(api: &ChannelApi, channel: Channel, sale: &Sale, refund_id: &str) {
    match channel {
        Channel::Stripe => {
            api.stripe_refund(refund_id, UNIT_PRICE, stripe_charge(sale, UNIT_PRICE))
        }
        Channel::Shopify => {
            let mut order = shopify_order(sale);
            order["financial_status"] = json!("partially_refunded");
            order["refunds"] = json!([shopify_refund(sale, refund_id, &[(Product::Kit, 1)])]);
            api.shopify_updated_order(order);
        }
        Channel::Native => unreachable!(),
    }
}

async fn purchased(app: &TestApp, channel: Channel, sale: &Sale) {
    assert_eq!(channel.purchase(app, sale).await.status(), 200);
}

/// Five one-kit orders, fulfilled and listed by the channel as they are
/// (`{prefix}-0` … `{prefix}-4`).
async fn five_fulfilled_and_listed(
    app: &TestApp,
    api: &ChannelApi,
    channel: Channel,
    prefix: &str,
) -> Vec<Sale> {
    let sales: Vec<Sale> = (0..5)
        .map(|n| {
            Sale::new(
                &format!("{prefix}-{n}"),
                "pages@example.com",
                &[(Product::Kit, 1)],
            )
        })
        .collect();
    for sale in &sales {
        purchased(app, channel, sale).await;
        list(api, channel, sale, |_| {});
    }
    sales
}

async fn deliveries_settled(app: &TestApp) {
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status IN ('pending', 'sending')",
        0,
    )
    .await;
}

/// An authentic event that cannot be carried out and concerns no listed
/// order: a refund without the order it refunds.
async fn post_broken_refund(app: &TestApp, channel: Channel) {
    let response = match channel {
        Channel::Stripe => {
            let body = json!({
                "id": "evt_broken_refund", "object": "event", "type": "charge.refunded",
                "data": { "object": { "id": "ch_orphan", "object": "charge", "amount_refunded": 100, "refunded": false } }
            });
            channel
                .post(
                    app,
                    "evt_broken_refund",
                    "charge.refunded",
                    &body.to_string(),
                    Signing::Good,
                )
                .await
        }
        _ => {
            let body = json!({ "id": 77, "refund_line_items": [] , "note": "no order" });
            channel
                .post(
                    app,
                    "evt_broken_refund",
                    "refunds/create",
                    &body.to_string(),
                    Signing::Good,
                )
                .await
        }
    };
    assert_eq!(response.status(), 200);
}

async fn insert_code_without_origin(app: &TestApp) {
    sqlx::query(
        "INSERT INTO activation_code (id, product_id, code_hash, code_sealed, last4, expires_at)
         SELECT gen_random_uuid(), id, sha256(random()::text::bytea), '\\x00'::bytea, 'ZZZZ',
                now() + interval '1 year'
         FROM product WHERE sku = 'KIT-BASIC'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn each_kind_comes_from_its_seeded_mismatch_alone(channel: Channel) {
    let app = TestApp::spawn().await;
    let api = ChannelApi::mount(&app.stripe, PAGE).await;
    let kit = |order: &str, units: u32| {
        Sale::new(
            order,
            &format!("{order}@example.com"),
            &[(Product::Kit, units)],
        )
    };
    let id = |sale: &Sale| channel.channel_order_id(sale);

    // Clean: fulfilled, listed as they are, one partly refunded on both sides.
    let clean = kit("rc-clean", 1);
    let clean_refunded = kit("rc-clean-refunded", 2);
    // Each seeded with one mismatch.
    let lost = kit("rc-lost", 1);
    let unpaid = kit("rc-unpaid", 1);
    let unknown = kit("rc-unknown", 1);
    let refunded = kit("rc-refunded", 2);
    let amount = kit("rc-amount", 1);
    let quantity = kit("rc-quantity", 1);
    let bounced = Sale::new(
        "rc-bounced",
        &format!("bounce@{UNDELIVERABLE_DOMAIN}"),
        &[(Product::Kit, 1)],
    );

    for sale in [
        &clean,
        &clean_refunded,
        &unpaid,
        &unknown,
        &refunded,
        &amount,
        &quantity,
        &bounced,
    ] {
        purchased(&app, channel, sale).await;
    }
    assert_eq!(
        channel
            .refund_units(&app, &clean_refunded, "rf-clean", Product::Kit, 1, 0)
            .await
            .status(),
        200
    );
    post_broken_refund(&app, channel).await;
    app.events_settled(10).await;
    deliveries_settled(&app).await;
    // One of the codes the channel will say were refunded is in use.
    let refunded_mail = app
        .mails(7)
        .await
        .into_iter()
        .find(|m| m.to.iter().any(|t| t.contains("rc-refunded")))
        .expect("the buyer got the codes");
    let (status, _) = app
        .redeem(&refunded_mail.codes()[0], "acct_r", "child_r")
        .await;
    assert_eq!(status, 201);
    insert_code_without_origin(&app).await;

    for sale in [&clean, &clean_refunded, &refunded, &bounced, &lost] {
        list(&api, channel, sale, |_| {});
    }
    list_one_kit_refunded(&api, channel, &clean_refunded, "rf-clean");
    list_full_refund(&api, channel, &refunded, "rf-lost-webhook");
    if channel == Channel::Stripe {
        // Healing reads the lost session's line items, as the webhook would.
        mount_line_items(&app.stripe, "rc-lost", &[("price_basic_kit", 1)]).await;
    }
    list(&api, channel, &unpaid, |o| match channel {
        Channel::Stripe => o["payment_status"] = json!("unpaid"),
        _ => o["financial_status"] = json!("pending"),
    });
    list(&api, channel, &amount, |o| match channel {
        Channel::Stripe => o["amount_total"] = json!(UNIT_PRICE + 500),
        _ => o["total_price"] = json!("25.00"),
    });
    list(&api, channel, &quantity, |o| match channel {
        Channel::Stripe => o["line_items"]["data"][0]["quantity"] = json!(2),
        _ => o["line_items"][0]["quantity"] = json!(2),
    });

    let (run, row) = reconcile_now(&app, channel).await;
    assert_eq!(row["status"], "finished", "{row}");
    let expected: BTreeSet<(String, String)> = [
        ("paid_not_fulfilled", id(&lost)),
        ("fulfilled_not_paid", id(&unpaid)),
        ("unknown_to_channel", id(&unknown)),
        ("refunded_codes_active", id(&refunded)),
        ("amount_mismatch", id(&amount)),
        ("quantity_mismatch", id(&quantity)),
        ("code_without_origin", "code".to_owned()),
    ]
    .into_iter()
    .map(|(k, r)| (k.to_owned(), r))
    .collect();
    assert_eq!(findings_of(&app, run).await, expected);
    // The bounced email and the broken event were findings from the moment
    // they failed: the run finds them on record and opens nothing again.
    let at_failure: BTreeSet<(String, String)> = findings_of_no_run(&app).await;
    assert_eq!(
        at_failure,
        [
            ("delivery_failed".to_owned(), id(&bounced)),
            ("event_failed".to_owned(), "evt_broken_refund".to_owned()),
        ]
        .into()
    );
    assert_eq!(row["channel_records"], 8, "{row}");
    assert_eq!(row["counts"]["actions"], 2, "{row}");
    assert_eq!(row["counts"]["channel_compared"], true);
    assert!(
        row["duration_ms"].as_i64().is_some() && row["peak_memory_bytes"].as_i64().unwrap() > 0
    );

    // Paid but never fulfilled: fulfilled now, and the buyer has the code.
    let healed = eventually("the healed order's email", WAIT, || async {
        app.mailbox()
            .messages()
            .into_iter()
            .find(|m| m.to.iter().any(|t| t.contains("rc-lost")))
    })
    .await;
    assert_eq!(healed.codes().len(), 1);
    let (status, _) = app.redeem(&healed.codes()[0], "acct_l", "child_l").await;
    assert_eq!(status, 201, "the healed code works");
    // Refunded in the channel, codes active: the unredeemed one revoked,
    // the redeemed one kept and flagged.
    let states: Vec<String> = sqlx::query_scalar(
        "SELECT c.state FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
         JOIN orders o ON o.id = l.order_id WHERE o.channel_order_id = $1 ORDER BY c.state",
    )
    .bind(id(&refunded))
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(states, ["redeemed", "revoked"]);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM reconciliation_finding WHERE kind = 'refunded_but_redeemed'"
        )
        .await,
        1
    );
    let action: String = sqlx::query_scalar(
        "SELECT action_taken FROM reconciliation_finding WHERE kind = 'refunded_codes_active'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        action.contains("1 unredeemed code(s) revoked, 1 redeemed"),
        "{action}"
    );

    // The same window again: nothing new found, nothing done twice.
    deliveries_settled(&app).await;
    let before = snapshot(&app).await;
    let (again, row) = reconcile_now(&app, channel).await;
    assert_eq!(row["status"], "finished");
    assert!(findings_of(&app, again).await.is_empty());
    assert_eq!(row["counts"]["findings"], json!({}));
    assert_eq!(row["counts"]["actions"], 0);
    // Still unpaid, unknown, and mismatched in amount and units; the rest
    // was healed by the first run.
    assert_eq!(row["counts"]["seen_again"], 4, "{row}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(snapshot(&app).await, before);
}

/// Counts that a repeated run must leave alone.
async fn snapshot(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for sql in [
        "SELECT count(*) FROM reconciliation_finding",
        "SELECT count(*) FROM webhook_inbox",
        "SELECT count(*) FROM email_delivery",
        "SELECT count(*) FROM activation_code WHERE state = 'revoked'",
        "SELECT count(*) FROM order_adjustment",
        "SELECT count(*) FROM audit_event WHERE actor <> 'system:reconciler'",
    ] {
        counts.push(app.count(sql).await);
    }
    counts.push(app.mailbox().messages().len() as i64);
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stripe_each_kind_comes_from_its_seeded_mismatch_alone() {
    each_kind_comes_from_its_seeded_mismatch_alone(Channel::Stripe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shopify_each_kind_comes_from_its_seeded_mismatch_alone() {
    each_kind_comes_from_its_seeded_mismatch_alone(Channel::Shopify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_window_yields_no_findings_on_any_channel() {
    let app = TestApp::spawn().await;
    let api = ChannelApi::mount(&app.stripe, PAGE).await;
    let mut filed = 0;
    for channel in Channel::ALL {
        for n in 0..3 {
            let sale = Sale::new(
                &format!("clean-{}-{n}", channel.name()),
                "clean@example.com",
                &[(Product::Kit, 2), (Product::Licence, 1)],
            );
            purchased(&app, channel, &sale).await;
            filed += 1;
            if channel != Channel::Native {
                list(&api, channel, &sale, |_| {});
            }
            if n == 0 {
                channel
                    .refund_all(&app, &sale, &format!("rf-clean-{}", channel.name()))
                    .await;
                filed += 1;
                match channel {
                    Channel::Native => {}
                    _ => list_full_refund(
                        &api,
                        channel,
                        &sale,
                        &format!("rf-clean-{}", channel.name()),
                    ),
                }
            }
        }
    }
    app.events_settled(filed).await;
    deliveries_settled(&app).await;
    for channel in Channel::ALL {
        let (run, row) = reconcile_now(&app, channel).await;
        assert_eq!(row["status"], "finished", "{row}");
        assert!(
            findings_of(&app, run).await.is_empty(),
            "{channel:?}: {row}"
        );
        assert_eq!(row["entitle_orders"], 3, "{row}");
        let listed = if channel == Channel::Native { 0 } else { 3 };
        assert_eq!(row["channel_records"], listed, "{row}");
        assert_eq!(
            row["counts"]["channel_compared"],
            channel != Channel::Native
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stripe_pages_are_followed_through_a_429_and_a_500() {
    let app = TestApp::spawn().await;
    let api = ChannelApi::mount(&app.stripe, PAGE).await;
    five_fulfilled_and_listed(&app, &api, Channel::Stripe, "pg").await;
    app.events_settled(5).await;
    // Page two is refused once with 429 and a Retry-After, page three
    // fails once with a 500.
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .and(query_param("starting_after", "pg-1"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .set_body_json(json!({ "error": { "type": "rate_limit_error" } })),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .and(query_param("starting_after", "pg-3"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.stripe)
        .await;

    let started = std::time::Instant::now();
    let (run, row) = reconcile_now(&app, Channel::Stripe).await;
    assert_eq!(row["status"], "finished", "{row}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the Retry-After was waited out"
    );
    assert_eq!(row["channel_records"], 5);
    assert_eq!(row["counts"]["api_retries"], 2);
    assert!(findings_of(&app, run).await.is_empty());
    let session_requests = app
        .stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/v1/checkout/sessions")
        .count();
    assert_eq!(
        session_requests,
        3 + 2,
        "three pages, two of them asked twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shopify_link_pages_are_followed_through_a_429_a_500_and_a_full_bucket() {
    let app = TestApp::spawn().await;
    let api = ChannelApi::mount(&app.stripe, PAGE).await;
    let sales = five_fulfilled_and_listed(&app, &api, Channel::Shopify, "spg").await;
    app.events_settled(5).await;
    Mock::given(method("GET"))
        .and(path(SHOPIFY_ORDERS_PATH))
        .and(query_param("page_info", "processed:2"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1.0")
                .set_body_json(json!({ "errors": "Exceeded 2 calls per second for api client." })),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path(SHOPIFY_ORDERS_PATH))
        .and(query_param("page_info", "processed:4"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&app.stripe)
        .await;
    // The first page says the bucket is nearly full (36 of 40): the run
    // waits for it to drain below 80% before the next call.
    Mock::given(method("GET"))
        .and(path(SHOPIFY_ORDERS_PATH))
        .and(query_param("status", "any"))
        .and(query_param("limit", "250"))
        .and(wiremock::matchers::query_param_is_missing("updated_at_min"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-shopify-shop-api-call-limit", "36/40")
                .insert_header(
                    "link",
                    format!(
                        "<{}{SHOPIFY_ORDERS_PATH}?limit=250&page_info=processed:2>; rel=\"next\"",
                        app.stripe.uri()
                    ),
                )
                .set_body_json(
                    json!({ "orders": [shopify_order(&sales[0]), shopify_order(&sales[1])] }),
                ),
        )
        .with_priority(2)
        .mount(&app.stripe)
        .await;

    let started = std::time::Instant::now();
    let (run, row) = reconcile_now(&app, Channel::Shopify).await;
    assert_eq!(row["status"], "finished", "{row}");
    // 1 s Retry-After, plus 2 s for the bucket to drain from 36 to 32.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(row["channel_records"], 5, "{row}");
    assert_eq!(row["counts"]["api_retries"], 2);
    assert!(findings_of(&app, run).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_api_that_stays_down_fails_the_run_and_calls_nothing_unknown() {
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "reconcile": { "max_attempts": 3 } }),
    )
    .await;
    let sale = Sale::new("down-1", "down@example.com", &[(Product::Kit, 1)]);
    purchased(&app, Channel::Stripe, &sale).await;
    app.events_settled(1).await;
    Mock::given(method("GET"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&app.stripe)
        .await;
    let (run, row) = reconcile_now(&app, Channel::Stripe).await;
    assert_eq!(row["status"], "failed", "{row}");
    let error = row["error"].as_str().unwrap();
    assert!(
        error.contains("channel_api_unavailable") && error.contains("3 attempts"),
        "{error}"
    );
    // The channel was not read to the end, so its silence proves nothing.
    assert!(findings_of(&app, run).await.is_empty());
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_seen").await,
        0,
        "scratch rows are removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_start_a_run_and_review_its_report_through_the_api_and_cli() {
    let app = TestApp::spawn().await;
    let api = ChannelApi::mount(&app.stripe, PAGE).await;
    let lost = Sale::new("op-lost", "op-lost@example.com", &[(Product::Kit, 1)]);
    let amount = Sale::new("op-amount", "op-amount@example.com", &[(Product::Kit, 1)]);
    purchased(&app, Channel::Stripe, &amount).await;
    app.events_settled(1).await;
    mount_line_items(&app.stripe, "op-lost", &[("price_basic_kit", 1)]).await;
    list(&api, Channel::Stripe, &lost, |_| {});
    list(&api, Channel::Stripe, &amount, |o| {
        o["amount_total"] = json!(1)
    });

    let operator = app.token(Role::Operator).await;
    let support = app.token(Role::Support).await;
    let w = window();
    let body =
        json!({ "channel": "stripe", "from": w.start, "to": w.end, "reason": "webhook outage" });
    let (status, refused) = app
        .admin(
            "POST",
            "/admin/v1/reconciliations",
            Some(&support),
            Some(body.clone()),
            None,
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    let (status, bad) = app
        .admin(
            "POST",
            "/admin/v1/reconciliations",
            Some(&operator),
            Some(json!({ "channel": "ebay", "reason": "x" })),
            None,
        )
        .await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (422, Some("unknown_channel"))
    );
    let (status, started) = app
        .admin(
            "POST",
            "/admin/v1/reconciliations",
            Some(&operator),
            Some(body),
            None,
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let run = started["id"].as_str().unwrap().to_owned();

    // The worker runs it from the queue.
    let shown = eventually("the run to finish", WAIT, || async {
        let (_, shown) = app
            .admin(
                "GET",
                &format!("/admin/v1/reconciliations/{run}"),
                Some(&support),
                None,
                None,
            )
            .await;
        (shown["status"] == "finished").then_some(shown)
    })
    .await;
    assert!(
        shown["trigger"].as_str().unwrap().starts_with("operator-"),
        "{shown}"
    );
    assert_eq!(
        shown["findings"],
        json!([
            { "kind": "amount_mismatch", "status": "open", "count": 1 },
            { "kind": "paid_not_fulfilled", "status": "open", "count": 1 },
        ])
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'reconciliation.requested'")
            .await,
        1
    );

    // JSON, filtered by run, kind and status.
    let (_, found) = app
        .admin(
            "GET",
            &format!("/admin/v1/findings?run={run}&kind=amount_mismatch&status=open"),
            Some(&support),
            None,
            None,
        )
        .await;
    let found = found["findings"].as_array().unwrap().clone();
    assert_eq!(found.len(), 1);
    assert!(found[0]["detail"].as_str().unwrap().contains("totals 1"));

    // CSV, every finding of the run, quoted where the text needs it.
    let csv = app
        .http
        .get(format!(
            "{}/admin/v1/findings/export?run={run}",
            app.address
        ))
        .bearer_auth(&support)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = csv.text().await.unwrap();
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let kinds: BTreeSet<String> = reader.records().map(|r| r.unwrap()[2].to_owned()).collect();
    assert_eq!(
        kinds,
        ["amount_mismatch", "paid_not_fulfilled"]
            .map(String::from)
            .into()
    );
    assert!(
        csv.contains("\"fulfilled through the normal path (event"),
        "{csv}"
    );

    // The CLI: a readable summary, and the same CSV.
    let summary = app.cli(&support, &["reconcile", "show", &run]).await;
    for expected in [
        "of stripe: finished",
        "2 channel order(s)",
        "amount_mismatch",
        "paid_not_fulfilled",
        "peak memory",
    ] {
        assert!(summary.contains(expected), "{expected} in {summary}");
    }
    let exported = app
        .cli(&support, &["findings", "export", "--run", &run])
        .await;
    assert_eq!(exported.lines().count(), 3, "{exported}");

    // Resolving takes a reason and is audited.
    let id = found[0]["id"].as_str().unwrap();
    let (status, _) = app
        .admin(
            "POST",
            &format!("/admin/v1/findings/{id}/resolve"),
            Some(&operator),
            Some(json!({ "reason": "price changed after checkout; confirmed with finance" })),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (_, open) = app
        .admin(
            "GET",
            &format!("/admin/v1/findings?run={run}&status=open"),
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(open["findings"].as_array().unwrap().len(), 1);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'finding.resolved' AND reason LIKE 'price changed%'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_worker_processes_reconcile_each_tick_once_per_channel() {
    let app = TestApp::spawn_configured(
        Options::default(),
        json!({ "schedule": { "reconcile": "* * * * * *" } }),
    )
    .await;
    ChannelApi::mount(&app.stripe, PAGE).await;
    app.start_another_worker();
    app.start_another_worker();
    eventually("three reconcile ticks", Duration::from_secs(20), || async {
        (app.count(
            "SELECT count(*) FROM sweep_run WHERE job = 'reconcile' AND finished_at IS NOT NULL",
        )
        .await
            >= 3)
            .then_some(())
    })
    .await;
    let ticks: Vec<chrono::DateTime<Utc>> = sqlx::query_scalar(
        "SELECT tick_at FROM sweep_run WHERE job = 'reconcile' AND finished_at IS NOT NULL ORDER BY tick_at",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    // Each finished tick made one run per channel, all scheduled, all
    // finished: three workers fired it, one ran it.
    let runs: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT channel, trigger, status FROM reconciliation_run WHERE created_at <= (
             SELECT max(finished_at) FROM sweep_run WHERE job = 'reconcile')",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(runs.len(), ticks.len() * 3, "{runs:?}");
    for channel in ["stripe", "shopify", "native"] {
        assert_eq!(
            runs.iter().filter(|(c, _, _)| c == channel).count(),
            ticks.len()
        );
    }
    assert!(
        runs.iter()
            .all(|(_, t, s)| t == "schedule" && s == "finished"),
        "{runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_runs_are_fed_again_and_housekeeping_ends_abandoned_ones() {
    let app = TestApp::spawn_with(Options {
        smtp: true,
        worker: false,
    })
    .await;
    let lost = reconcile::queue(&app.pool, "native", window(), "test")
        .await
        .unwrap();
    let abandoned = reconcile::queue(&app.pool, "native", window(), "test")
        .await
        .unwrap();
    sqlx::query(
        "UPDATE reconciliation_run SET created_at = now() - interval '10 minutes' WHERE id = $1",
    )
    .bind(lost)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE reconciliation_run SET status = 'running', started_at = now() - interval '7 hours' WHERE id = $1",
    )
    .bind(abandoned)
    .execute(&app.pool)
    .await
    .unwrap();
    // The queued run was fed to Redis, which then lost it.
    sqlx::query(
        "UPDATE reconciliation_run SET leased_until = now() + interval '2 seconds' WHERE id = $1",
    )
    .bind(lost)
    .execute(&app.pool)
    .await
    .unwrap();
    let summary =
        entitle_jobs::sweep::housekeeping(&app.pool, &app.queues().await, Duration::from_secs(300))
            .await
            .unwrap();
    assert_eq!(summary["reconciliations_abandoned"], 1);
    let row = run_row(&app, abandoned).await;
    assert_eq!(row["status"], "failed");
    assert!(row["error"].as_str().unwrap().starts_with("abandoned"));
    // Once its lease lapses, the queued one is fed again: a worker started
    // now runs it.
    app.restart_worker().await;
    eventually("the lost run finished", WAIT, || async {
        (run_row(&app, lost).await["status"] == "finished").then_some(())
    })
    .await;
}
