//! The channels' edges, through the real gateway and worker: what each
//! channel does with an authentic event it can never carry out (the native
//! checkout answers 400 and keeps nothing; Stripe and Shopify events are
//! kept failed, with a finding, and answered 200 so they are not retried for
//! days), Shopify bodies that contradict their topic, and bodies kept byte
//! for byte.

use entitle_jobs::{channel::shopify, inbox::RetryFilter};
use entitle_tests::{
    SHOPIFY_SECRET, TestApp, WAIT,
    channels::{Channel, Product, Sale, Signing, native_purchase, shopify_order},
    eventually,
};
use serde_json::{Value, json};

/// An event's status, error code and attempts, by the channel's event id.
async fn outcome(app: &TestApp, event_id: &str) -> (String, Option<String>, i32) {
    sqlx::query_as("SELECT status, error_code, attempts FROM webhook_inbox WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("event {event_id} was filed: {e}"))
}

/// Open `event_failed` findings naming this event.
async fn findings_for(app: &TestApp, event_id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM reconciliation_finding
         WHERE kind = 'event_failed' AND status = 'open' AND channel_reference = $1",
    )
    .bind(event_id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON answer: {text}"));
    (status, body)
}

async fn post_native(app: &TestApp, event_id: &str, body: &[u8], signing: Signing) -> (u16, Value) {
    answer(
        Channel::Native
            .post_bytes(app, event_id, "", body, signing)
            .await,
    )
    .await
}

fn issued_codes(app: &TestApp) -> impl Future<Output = i64> + '_ {
    app.count("SELECT count(*) FROM activation_code WHERE state = 'issued'")
}

// The native checkout ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_native_event_with_fields_entitle_does_not_know_is_carried_out() {
    let app = TestApp::spawn_configured(
        Default::default(),
        json!({ "worker": { "max_units_per_order": 10 } }),
    )
    .await;
    // At the limits themselves: an id of 255 bytes (in two-byte letters),
    // and as many units as the cap allows.
    let order_id = "é".repeat(127) + "x";
    assert_eq!(order_id.len(), 255);
    let sale = Sale::new(&order_id, "extra@example.com", &[(Product::Kit, 10)]);
    let mut body = native_purchase(&sale);
    body["coupon"] = json!("X");
    body["buyer"]["loyalty_tier"] = json!({ "level": 3 });
    body["lines"][0]["colour"] = json!("red");
    body["metadata"] = json!(["anything", 1, null]);
    let (status, answered) = post_native(
        &app,
        "msg_extra",
        body.to_string().as_bytes(),
        Signing::Good,
    )
    .await;
    assert_eq!((status, answered["received"].clone()), (200, json!(true)));
    let mails = app.mails(1).await;
    assert_eq!(mails[0].codes().len(), 10, "every unit's code, emailed");
    assert_eq!(outcome(&app, "msg_extra").await.0, "processed");
    let recorded: String = sqlx::query_scalar("SELECT channel_order_id FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(recorded, order_id);

    // A refund with a field of its own is applied too.
    let refund = json!({
        "type": "purchase.refunded", "order_id": order_id, "refund_id": "rf_extra",
        "lines": [{ "sku": "KIT-BASIC", "quantity": 3, "restock": false }],
        "refunded_by": "support",
    });
    let (status, _) = post_native(
        &app,
        "msg_refund_extra",
        refund.to_string().as_bytes(),
        Signing::Good,
    )
    .await;
    assert_eq!(status, 200);
    app.events_settled(2).await;
    assert_eq!(outcome(&app, "msg_refund_extra").await.0, "processed");
    assert_eq!(issued_codes(&app).await, 7);

    // A type Entitle does not act on is recorded and acknowledged, as the
    // published schema says.
    let (status, _) = post_native(
        &app,
        "msg_new_type",
        br#"{"type": "purchase.disputed", "order_id": "whatever"}"#,
        Signing::Good,
    )
    .await;
    assert_eq!(status, 200);
    app.events_settled(3).await;
    assert_eq!(outcome(&app, "msg_new_type").await.0, "ignored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_native_event_that_can_never_be_carried_out_is_answered_400_and_nothing_is_stored() {
    let app = TestApp::spawn_configured(
        Default::default(),
        json!({ "worker": { "max_units_per_order": 10 } }),
    )
    .await;
    let sale = Sale::new("ord_bad", "bad@example.com", &[(Product::Kit, 2)]);
    let good = native_purchase(&sale);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut body = good.clone();
        edit(&mut body);
        body.to_string().into_bytes()
    };
    let refund = |lines: Value| {
        json!({ "type": "purchase.refunded", "order_id": "ord_bad", "refund_id": "rf_1", "lines": lines })
            .to_string()
            .into_bytes()
    };
    // (what, body, code, what the detail must name)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "not JSON",
            br#"{"type": "purchase.paid", "order_id": "#.to_vec(),
            "event_malformed",
            "not JSON",
        ),
        (
            "not an object",
            b"[\"purchase.paid\"]".to_vec(),
            "event_malformed",
            "JSON object",
        ),
        (
            "no type",
            with(&|b| {
                b.as_object_mut().unwrap().remove("type");
            }),
            "event_malformed",
            "type",
        ),
        (
            "an empty type",
            with(&|b| b["type"] = json!("")),
            "event_malformed",
            "type is empty",
        ),
        (
            "no order id",
            with(&|b| {
                b.as_object_mut().unwrap().remove("order_id");
            }),
            "event_malformed",
            "order_id",
        ),
        (
            "an empty order id",
            with(&|b| b["order_id"] = json!("")),
            "event_malformed",
            "order_id is empty",
        ),
        (
            "an order id of 256 bytes",
            with(&|b| b["order_id"] = json!("é".repeat(128))),
            "event_malformed",
            "order_id is 256 bytes",
        ),
        (
            "a NUL in the order id",
            with(&|b| b["order_id"] = json!("ord\u{0}1")),
            "event_malformed",
            "order_id",
        ),
        (
            "an account id of 256 bytes",
            with(&|b| b["account_id"] = json!("a".repeat(256))),
            "event_malformed",
            "account_id is 256 bytes",
        ),
        (
            "no buyer",
            with(&|b| {
                b.as_object_mut().unwrap().remove("buyer");
            }),
            "event_malformed",
            "buyer",
        ),
        (
            "an empty buyer email",
            with(&|b| b["buyer"]["email"] = json!("")),
            "event_malformed",
            "buyer.email is empty",
        ),
        (
            "a buyer email that is no address",
            with(&|b| b["buyer"]["email"] = json!("ada at example")),
            "event_malformed",
            "buyer.email",
        ),
        (
            "a NUL in the buyer's name",
            with(&|b| b["buyer"]["name"] = json!("Ada\u{0}Byte")),
            "event_malformed",
            "buyer.name holds a NUL",
        ),
        (
            "a NUL in the gift message",
            with(&|b| {
                b["gift"] = json!({ "recipient_email": "rae@example.com", "message": "hi\u{0}" })
            }),
            "event_malformed",
            "gift.message holds a NUL",
        ),
        (
            "a gift without a recipient",
            with(&|b| b["gift"] = json!({ "message": "hi" })),
            "event_malformed",
            "recipient_email",
        ),
        (
            "a send date that is no date",
            with(&|b| {
                b["gift"] = json!({ "recipient_email": "rae@example.com", "send_at": "next week" })
            }),
            "event_malformed",
            "gift.send_at",
        ),
        (
            "a paid_at that is no time",
            with(&|b| b["paid_at"] = json!("yesterday")),
            "event_malformed",
            "paid_at",
        ),
        (
            "no lines",
            with(&|b| b["lines"] = json!([])),
            "event_malformed",
            "no lines",
        ),
        (
            "a quantity of 0",
            with(&|b| b["lines"][0]["quantity"] = json!(0)),
            "event_malformed",
            "lines[0].quantity is 0",
        ),
        (
            "a negative quantity",
            with(&|b| b["lines"][0]["quantity"] = json!(-1)),
            "event_malformed",
            "lines[0].quantity is -1",
        ),
        (
            "a quantity that is text",
            with(&|b| b["lines"][0]["quantity"] = json!("2")),
            "event_malformed",
            "lines[0].quantity",
        ),
        (
            "an empty SKU",
            with(&|b| b["lines"][0]["sku"] = json!("")),
            "event_malformed",
            "lines[0].sku is empty",
        ),
        (
            "an amount beyond any",
            with(&|b| b["lines"][0]["unit_amount"] = json!(i64::MAX)),
            "event_malformed",
            "lines[0].unit_amount",
        ),
        (
            "a line above the unit cap",
            with(&|b| b["lines"][0]["quantity"] = json!(11)),
            "order_too_large",
            "11 units",
        ),
        (
            "lines above the unit cap together",
            with(
                &|b| b["lines"] = json!([{ "sku": "KIT-BASIC", "quantity": 6 }, { "sku": "LIC-PRO-1Y", "quantity": 5 }]),
            ),
            "order_too_large",
            "11 units",
        ),
        (
            "a quantity beyond the database's integers",
            with(&|b| b["lines"][0]["quantity"] = json!(2_147_483_648u64)),
            "order_too_large",
            "2147483648 units",
        ),
        (
            "a refund without its id",
            br#"{"type": "purchase.refunded", "order_id": "ord_bad"}"#.to_vec(),
            "event_malformed",
            "refund_id",
        ),
        (
            "a refund of 0 units",
            refund(json!([{ "sku": "KIT-BASIC", "quantity": 0 }])),
            "event_malformed",
            "lines[0].quantity is 0",
        ),
        (
            "a refund above the unit cap",
            refund(json!([{ "sku": "KIT-BASIC", "quantity": 11 }])),
            "event_malformed",
            "lines[0].quantity is 11",
        ),
        (
            "a cancellation of a 300-byte order id",
            json!({ "type": "purchase.cancelled", "order_id": "c".repeat(300) })
                .to_string()
                .into_bytes(),
            "event_malformed",
            "order_id is 300 bytes",
        ),
    ];
    for (i, (what, body, code, names)) in cases.iter().enumerate() {
        let (status, answered) =
            post_native(&app, &format!("msg_bad_{i}"), body, Signing::Good).await;
        assert_eq!(status, 400, "{what}: {answered}");
        assert_eq!(answered["code"], *code, "{what}: {answered}");
        let detail = answered["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(names), "{what}: {detail:?} names {names:?}");
    }
    // The envelope's own id is held to the id rules too.
    let (status, answered) = post_native(
        &app,
        &"m".repeat(256),
        good.to_string().as_bytes(),
        Signing::Good,
    )
    .await;
    assert_eq!(
        (status, answered["code"].as_str()),
        (400, Some("event_malformed"))
    );
    assert!(
        answered["detail"].as_str().unwrap().contains("webhook-id"),
        "{answered}"
    );
    // The signature is checked first: a forged event learns nothing of its body.
    let (status, answered) = post_native(&app, "msg_forged", b"{", Signing::WrongSecret).await;
    assert_eq!(
        (status, answered["code"].as_str()),
        (400, Some("signature_invalid"))
    );

    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox").await,
        0,
        "nothing stored"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE subject_type = 'webhook_event'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding")
            .await,
        0
    );

    // Fixed, the same event goes through.
    let (status, _) = post_native(
        &app,
        "msg_fixed",
        good.to_string().as_bytes(),
        Signing::Good,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(app.mails(1).await[0].codes().len(), 2);
}

// Shopify: the body must say what the topic says ---------------------------------

async fn post_shopify(app: &TestApp, webhook_id: &str, topic: &str, body: &Value) -> (u16, Value) {
    answer(
        Channel::Shopify
            .post(app, webhook_id, topic, &body.to_string(), Signing::Good)
            .await,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_order_body_posted_again_as_a_cancellation_revokes_nothing() {
    let app = TestApp::spawn().await;
    let sale = Sale::new("replayed", "replayed@example.com", &[(Product::Kit, 2)]);
    assert_eq!(Channel::Shopify.purchase(&app, &sale).await.status(), 200);
    app.mails(1).await;
    app.events_settled(1).await;

    // The captured orders/paid body, correctly signed, under another topic.
    let (status, answered) =
        post_shopify(&app, "wh_replay", "orders/cancelled", &shopify_order(&sale)).await;
    assert_eq!(
        status, 200,
        "answered 2xx, so Shopify does not retry it: {answered}"
    );
    assert_eq!(answered["failed"]["code"], "topic_mismatch", "{answered}");
    assert_eq!(
        outcome(&app, "wh_replay").await,
        ("failed".to_owned(), Some("topic_mismatch".to_owned()), 0),
        "failed at once, never pending"
    );
    assert_eq!(
        findings_for(&app, "wh_replay").await,
        1,
        "operations see it"
    );
    assert_eq!(issued_codes(&app).await, 2, "no code revoked");
    assert_eq!(app.count("SELECT count(*) FROM order_adjustment").await, 0);
    let state: String = sqlx::query_scalar("SELECT state FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "paid");

    // Retried by an operator, the worker holds it to the same rule.
    let reopened = entitle_jobs::handlers::retry_failed_events(
        &app.ctx,
        &RetryFilter {
            error_code: Some("topic_mismatch".into()),
            ..Default::default()
        },
        "operator:test",
        "was it real?",
    )
    .await
    .unwrap();
    assert_eq!(reopened.len(), 1);
    let code = eventually("the retried event to fail again", WAIT, || async {
        let (status, code, attempts) = outcome(&app, "wh_replay").await;
        (status == "failed" && attempts == 1).then_some(code)
    })
    .await;
    assert_eq!(code.as_deref(), Some("topic_mismatch"));
    assert_eq!(issued_codes(&app).await, 2);

    // A real cancellation still cancels.
    assert_eq!(Channel::Shopify.cancel(&app, &sale).await.status(), 200);
    app.events_settled(3).await;
    assert_eq!(issued_codes(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_body_that_is_not_paid_issues_no_codes_under_orders_paid() {
    let app = TestApp::spawn().await;
    let mut refused = Vec::new();
    for status in [
        "pending",
        "authorized",
        "partially_paid",
        "refunded",
        "voided",
    ] {
        let sale = Sale::new(
            &format!("unpaid_{status}"),
            "unpaid@example.com",
            &[(Product::Kit, 1)],
        );
        let mut body = shopify_order(&sale);
        body["financial_status"] = json!(status);
        let id = format!("wh_{status}");
        let (code, answered) = post_shopify(&app, &id, "orders/paid", &body).await;
        assert_eq!(code, 200, "{status}: {answered}");
        assert_eq!(
            answered["failed"]["code"], "topic_mismatch",
            "{status}: {answered}"
        );
        refused.push(id);
    }
    // Paid, but cancelled since: not a purchase to fulfil either.
    let sale = Sale::new(
        "paid_then_cancelled",
        "unpaid@example.com",
        &[(Product::Kit, 1)],
    );
    let mut body = shopify_order(&sale);
    body["cancelled_at"] = json!(chrono::Utc::now().to_rfc3339());
    let (_, answered) = post_shopify(&app, "wh_cancelled_paid", "orders/paid", &body).await;
    assert_eq!(answered["failed"]["code"], "topic_mismatch", "{answered}");
    refused.push("wh_cancelled_paid".into());
    // An order paid in full, then partly refunded, was paid: it is fulfilled
    // (its refunds/create revokes the refunded units), as reconciliation
    // would fulfil it.
    let sale = Sale::new(
        "partly_refunded",
        "partly@example.com",
        &[(Product::Kit, 2)],
    );
    let mut body = shopify_order(&sale);
    body["financial_status"] = json!("partially_refunded");
    let (code, answered) = post_shopify(&app, "wh_partly", "orders/paid", &body).await;
    assert_eq!(code, 200);
    assert!(answered.get("failed").is_none(), "{answered}");
    assert_eq!(app.mails(1).await[0].codes().len(), 2);

    app.events_settled(refused.len() as i64 + 1).await;
    for id in &refused {
        let (status, code, attempts) = outcome(&app, id).await;
        assert_eq!(
            (status.as_str(), code.as_deref(), attempts),
            ("failed", Some("topic_mismatch"), 0),
            "{id}"
        );
        assert_eq!(findings_for(&app, id).await, 1, "{id}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM orders").await,
        1,
        "only the paid one"
    );
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancellation_body_without_a_cancellation_and_a_nameless_event_are_kept_failed() {
    let app = TestApp::spawn().await;
    let sale = Sale::new("not_cancelled", "nc@example.com", &[(Product::Kit, 1)]);
    // A refunds/create body under orders/cancelled: it has an id, but
    // cancels nothing.
    let refund = entitle_tests::channels::shopify_refund(&sale, "rf_x", &[(Product::Kit, 1)]);
    let (status, answered) =
        post_shopify(&app, "wh_refund_as_cancel", "orders/cancelled", &refund).await;
    assert_eq!(
        (status, answered["failed"]["code"].as_str()),
        (200, Some("topic_mismatch"))
    );
    // Signed, but with no topic to name it by.
    let body = shopify_order(&sale).to_string();
    let response = app
        .http
        .post(format!("{}/webhooks/shopify", app.address))
        .header(
            "x-shopify-hmac-sha256",
            shopify::sign(body.as_bytes(), SHOPIFY_SECRET),
        )
        .header("x-shopify-webhook-id", "wh_no_topic")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, answered) = answer(response).await;
    assert_eq!(
        (status, answered["failed"]["code"].as_str()),
        (200, Some("event_malformed")),
        "{answered}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'failed'")
            .await,
        2
    );
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding WHERE kind = 'event_failed'")
            .await,
        2
    );
}

// Exact bytes -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shopify_body_with_a_byte_that_is_not_utf8_is_kept_byte_for_byte() {
    let app = TestApp::spawn().await;
    let sale = Sale::new("latin1", "latin1@example.com", &[(Product::Kit, 1)]);
    let mut order = shopify_order(&sale);
    order["customer"]["first_name"] = json!("MARK");
    // "Adé" in Latin-1: the é is a lone 0xE9, which is not UTF-8.
    let text = order.to_string();
    let at = text.find("MARK").unwrap();
    let mut bytes = text.as_bytes()[..at].to_vec();
    bytes.extend_from_slice(b"Ad\xe9");
    bytes.extend_from_slice(&text.as_bytes()[at + 4..]);
    assert!(std::str::from_utf8(&bytes).is_err());

    let response = Channel::Shopify
        .post_bytes(&app, "wh_latin1", "orders/paid", &bytes, Signing::Good)
        .await;
    let (status, answered) = answer(response).await;
    assert_eq!(status, 200, "{answered}");
    // JSON is UTF-8: this cannot be read, so it is kept failed, for people.
    assert_eq!(answered["failed"]["code"], "event_malformed", "{answered}");
    assert!(
        answered["failed"]["detail"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    let id: uuid::Uuid = answered["event"].as_str().unwrap().parse().unwrap();
    let stored = entitle_jobs::inbox::load(&app.pool, id)
        .await
        .unwrap()
        .unwrap();
    let kept = stored.body.expect("the body is kept");
    assert_eq!(kept, bytes, "byte for byte");
    assert_eq!(
        shopify::sign(&kept, SHOPIFY_SECRET),
        shopify::sign(&bytes, SHOPIFY_SECRET),
        "its signature verifies over what was stored"
    );
    let (text, raw): (Option<String>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT body, body_bytes FROM webhook_inbox WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(raw.as_deref(), Some(bytes.as_slice()));
    assert!(
        text.unwrap().contains("Ad\u{FFFD}"),
        "a readable rendering beside it"
    );
    assert_eq!(findings_for(&app, "wh_latin1").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);

    // A body text holds exactly (multi-byte letters, escapes, spacing) stays
    // text, exactly as sent, and is carried out.
    let other = Sale::new("utf8", "utf8@example.com", &[(Product::Kit, 1)]);
    let mut order = shopify_order(&other);
    order["customer"]["first_name"] = json!("Zoë \u{1F600}");
    let sent = format!("  {}\n", serde_json::to_string_pretty(&order).unwrap())
        .replace("\"Zoë", "\"Zo\\u00eb");
    let (status, _) = answer(
        Channel::Shopify
            .post(&app, "wh_utf8", "orders/paid", &sent, Signing::Good)
            .await,
    )
    .await;
    assert_eq!(status, 200);
    app.mails(1).await;
    let (text, raw): (Option<String>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT body, body_bytes FROM webhook_inbox WHERE event_id = 'wh_utf8'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(text.as_deref(), Some(sent.as_str()));
    assert_eq!(raw, None, "no second copy");

    // Pruned, the exact bytes go with the body.
    sqlx::query("UPDATE webhook_inbox SET received_at = now() - interval '31 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.events_settled(2).await;
    entitle_jobs::sweep::prune(&app.pool, 30, 100)
        .await
        .unwrap();
    assert_eq!(
        app.count(
            "SELECT count(*) FROM webhook_inbox WHERE body IS NOT NULL OR body_bytes IS NOT NULL"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_filed_before_bodies_were_kept_as_bytes_is_read_as_before() {
    let app = TestApp::spawn().await;
    // As rows were written before `body_bytes`: the text alone.
    let sale = Sale::new("filed_before", "before@example.com", &[(Product::Kit, 2)]);
    sqlx::query(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body)
         VALUES (gen_random_uuid(), 'native', 'msg_before', 'purchase.paid', $1)",
    )
    .bind(native_purchase(&sale).to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    assert_eq!(app.mails(1).await[0].codes().len(), 2);
    assert_eq!(outcome(&app, "msg_before").await.0, "processed");
}

// Stripe ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_stripe_events_that_cannot_be_carried_out_are_kept_failed_and_answered_200() {
    let app = TestApp::spawn().await;
    let long_id: String = (0..3000)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random_range(0..36)]))
        .collect();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"this is not an event".to_vec()),
        (
            "no id",
            br#"{"type": "checkout.session.completed", "data": {"object": {}}}"#.to_vec(),
        ),
        (
            "a NUL in the id",
            br#"{"id": "evt_\u0000", "type": "checkout.session.completed"}"#.to_vec(),
        ),
        (
            "an id of 3,000 bytes",
            json!({ "id": long_id, "type": "checkout.session.completed" })
                .to_string()
                .into_bytes(),
        ),
        (
            "a raw NUL byte",
            b"{\"id\": \"evt_raw_nul\", \"type\": \"x\"}\0".to_vec(),
        ),
        (
            "a byte that is not UTF-8",
            b"{\"id\": \"evt_\xff\", \"type\": \"x\"}".to_vec(),
        ),
    ];
    for (what, body) in &bodies {
        let response = Channel::Stripe
            .post_bytes(&app, "", "", body, Signing::Good)
            .await;
        let (status, answered) = answer(response).await;
        assert_eq!(status, 200, "{what}: {answered}");
        assert_eq!(
            answered["failed"]["code"], "event_malformed",
            "{what}: {answered}"
        );
        let id: uuid::Uuid = answered["event"].as_str().unwrap().parse().unwrap();
        let stored = entitle_jobs::inbox::load(&app.pool, id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.status, "failed", "{what}");
        assert_eq!(
            stored.body.as_deref(),
            Some(body.as_slice()),
            "{what}: byte for byte"
        );
    }
    let n = bodies.len() as i64;
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'failed' AND error_code = 'event_malformed'")
            .await,
        n
    );
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding WHERE kind = 'event_failed'")
            .await,
        n
    );
    // Stripe's retry of one is the same event again.
    let (status, answered) = answer(
        Channel::Stripe
            .post_bytes(&app, "", "", &bodies[0].1, Signing::Good)
            .await,
    )
    .await;
    assert_eq!((status, answered["duplicate"].clone()), (200, json!(true)));
    assert_eq!(app.count("SELECT count(*) FROM webhook_inbox").await, n);

    // Named, but hollow: the worker fails it on its first attempt.
    let hollow = br#"{"id": "evt_hollow", "type": "checkout.session.completed", "data": {}}"#;
    let (status, answered) = answer(
        Channel::Stripe
            .post_bytes(&app, "", "", hollow, Signing::Good)
            .await,
    )
    .await;
    assert_eq!(status, 200);
    assert!(answered.get("failed").is_none(), "{answered}");
    app.events_settled(n + 1).await;
    assert_eq!(
        outcome(&app, "evt_hollow").await,
        ("failed".to_owned(), Some("event_malformed".to_owned()), 1)
    );
    assert_eq!(findings_for(&app, "evt_hollow").await, 1);
}
