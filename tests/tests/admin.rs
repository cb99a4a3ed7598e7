//! Support and operations through the admin API and the CLI: one audit
//! event per action, idempotency keys, the revoke-versus-redeem race,
//! look-ups that trace orders and codes, and a CLI round trip. (The role
//! every operation needs, as documented and as enforced, is checked with
//! the rest of the API contract in http_contract.rs.)

use entitle_jobs::token::Role;
use entitle_tests::{
    TestApp,
    channels::{Channel, Product, Sale},
};
use serde_json::{Value, json};

/// An order of three kit codes, one redeemed; returns (order id, codes).
async fn order_with_codes(app: &TestApp) -> (String, Vec<Value>) {
    let sale = Sale::new("support", "sam@example.com", &[(Product::Kit, 3)]);
    assert_eq!(Channel::Native.purchase(app, &sale).await.status(), 200);
    let codes = app.mails(1).await[0].codes();
    let (status, _) = app.redeem(&codes[2], "acct_sam", "child_1").await;
    assert_eq!(status, 201);
    let order_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let support = app.token(Role::Support).await;
    let (_, order) = app
        .admin(
            "GET",
            &format!("/admin/v1/orders/{order_id}"),
            Some(&support),
            None,
            None,
        )
        .await;
    (
        order_id.to_string(),
        order["codes"].as_array().unwrap().clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn support_look_ups_trace_an_order_and_a_code_without_showing_codes() {
    let app = TestApp::spawn().await;
    let sale = Sale::new("trace", "tia@example.com", &[(Product::Kit, 2)]);
    assert_eq!(Channel::Shopify.purchase(&app, &sale).await.status(), 200);
    let codes = app.mails(1).await[0].codes();
    app.redeem(&codes[0], "acct_tia", "me").await;
    let token = app.token(Role::Support).await;

    let by_channel = format!(
        "/admin/v1/orders?channel=shopify&channel_order_id={}",
        Channel::Shopify.channel_order_id(&sale)
    );
    let (status, found) = app
        .admin("GET", &by_channel, Some(&token), None, None)
        .await;
    assert_eq!(status, 200);
    let order_id = found["orders"][0]["id"].as_str().unwrap().to_owned();
    let (_, by_email) = app
        .admin(
            "GET",
            "/admin/v1/orders?email=TIA@example.com",
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!(by_email["orders"][0]["id"], order_id.as_str());

    let (status, order) = app
        .admin(
            "GET",
            &format!("/admin/v1/orders/{order_id}"),
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let text = order.to_string();
    for code in &codes {
        assert!(
            !text.contains(code.as_str()) && !text.contains(&code.replace('-', "")),
            "no full code in views"
        );
    }
    assert_eq!(order["lines"][0]["product_sku"], "KIT-BASIC");
    assert_eq!(order["codes"].as_array().unwrap().len(), 2);
    assert_eq!(order["codes"][0]["assignment"]["account_id"], "acct_tia");
    assert_eq!(order["deliveries"][0]["status"], "sent");
    let actions: Vec<&str> = order["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for expected in [
        "order.created",
        "code.issued",
        "delivery.sent",
        "code.redeemed",
        "event.processed",
    ] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }

    let (status, code) = app
        .admin(
            "POST",
            "/admin/v1/codes/lookup",
            Some(&token),
            Some(json!({ "code": codes[0].to_lowercase() })),
            None,
        )
        .await;
    assert_eq!(status, 200, "{code}");
    assert_eq!(code["state"], "redeemed");
    assert_eq!(code["origin"]["type"], "order_line");
    assert_eq!(code["origin"]["channel"], "shopify");
    assert_eq!(code["assignment"]["entity_ref"], "me");
    assert!(
        code["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "code.redeemed")
    );
    assert_eq!(code["deliveries"][0]["kind"], "order_codes");

    let (_, account) = app
        .admin(
            "GET",
            "/admin/v1/accounts/acct_tia",
            Some(&token),
            None,
            None,
        )
        .await;
    assert_eq!(account["codes"].as_array().unwrap().len(), 1);
}

/// Runs an action as `actor_token` and checks it wrote exactly one audit
/// event, by that actor, with the reason and a before and after.
async fn audited(
    app: &TestApp,
    token: &str,
    actor: &str,
    path: &str,
    body: Value,
    action: &str,
) -> Value {
    let before = app.count_actor(actor).await;
    let (status, answer) = app
        .admin("POST", path, Some(token), Some(body.clone()), None)
        .await;
    assert!(status == 200 || status == 201, "{path}: {status} {answer}");
    assert_eq!(
        app.count_actor(actor).await,
        before + 1,
        "{path}: exactly one audit event"
    );
    let (got, reason, data): (String, Option<String>, Value) = sqlx::query_as(
        "SELECT action, reason, data FROM audit_event WHERE actor = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(actor)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(got, action);
    assert_eq!(reason.as_deref(), body["reason"].as_str());
    assert!(
        data.get("before").is_some() && data.get("after").is_some(),
        "{action}: {data}"
    );
    answer
}

trait CountActor {
    async fn count_actor(&self, actor: &str) -> i64;
}

impl CountActor for TestApp {
    async fn count_actor(&self, actor: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_event WHERE actor = $1")
            .bind(actor)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_action_writes_one_audit_event_with_actor_reason_and_before_after() {
    let app = TestApp::spawn().await;
    let (order_id, codes) = order_with_codes(&app).await;
    let operator = entitle_jobs::token::create(&app.pool, "olga", Role::Operator, "test", "test")
        .await
        .unwrap();
    let id = |i: usize| codes[i]["id"].as_str().unwrap().to_owned();

    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/codes/{}/revoke", id(0)),
        json!({ "reason": "fraud" }),
        "code.revoked",
    )
    .await;
    let reissued = audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/codes/{}/reissue", id(1)),
        json!({ "reason": "lost", "email": "sam.new@example.com" }),
        "code.reissued",
    )
    .await;
    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/codes/{}/reassign", id(2)),
        json!({ "reason": "wrong child", "account_id": "acct_sam", "entity_ref": "child_2" }),
        "code.reassigned",
    )
    .await;
    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/codes/{}/unassign", id(2)),
        json!({ "reason": "mistake" }),
        "code.unassigned",
    )
    .await;
    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/codes/{}/expiry", id(2)),
        json!({ "reason": "goodwill", "expires_at": "2035-01-01T00:00:00Z" }),
        "code.expiry_changed",
    )
    .await;
    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/orders/{order_id}/expiry"),
        json!({ "reason": "goodwill", "expires_at": "2036-01-01T00:00:00Z" }),
        "order.expiry_changed",
    )
    .await;
    let delivery = reissued["delivery"].as_str().unwrap();
    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/deliveries/{delivery}/resend"),
        json!({ "reason": "not received" }),
        "delivery.resent",
    )
    .await;
    let batch = audited(&app, &operator, "olga", "/admin/v1/batches", json!({ "product_sku": "LIC-PRO-1Y", "quantity": 3, "kind": "test_account", "reason": "QA accounts" }), "batch.created").await;
    let before = app.count_actor("olga").await;
    let (status, csv) = app
        .admin(
            "POST",
            &format!("/admin/v1/batches/{}/export", batch["id"].as_str().unwrap()),
            Some(&operator),
            Some(json!({ "reason": "to QA" })),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        csv.as_str().unwrap().lines().count(),
        4,
        "a header and three codes"
    );
    assert_eq!(app.count_actor("olga").await, before + 1);
    // The same actor again, within the window: the same file, audited again.
    let (status, again) = app
        .admin(
            "POST",
            &format!("/admin/v1/batches/{}/export", batch["id"].as_str().unwrap()),
            Some(&operator),
            Some(json!({ "reason": "the download broke off" })),
            None,
        )
        .await;
    assert_eq!((status, &again), (200, &csv));
    assert_eq!(app.count_actor("olga").await, before + 2);
    // Anyone else is refused: the file has one holder.
    let other = app.token(Role::Operator).await;
    let (status, refused) = app
        .admin(
            "POST",
            &format!("/admin/v1/batches/{}/export", batch["id"].as_str().unwrap()),
            Some(&other),
            Some(json!({ "reason": "me too" })),
            None,
        )
        .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("export_taken_by_another"))
    );
    audited(
        &app,
        &operator,
        "olga",
        "/admin/v1/events/retry",
        json!({ "reason": "nothing failed" }),
        "event.retried",
    )
    .await;

    let finding: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO reconciliation_finding (id, kind, detail, dedupe_key)
         VALUES (gen_random_uuid(), 'refund_unallocated', 'seeded', 'seeded') RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    audited(
        &app,
        &operator,
        "olga",
        &format!("/admin/v1/findings/{finding}/resolve"),
        json!({ "reason": "refunded by hand" }),
        "finding.resolved",
    )
    .await;
    let admin = entitle_jobs::token::create(&app.pool, "ada", Role::Admin, "test", "test")
        .await
        .unwrap();
    let created = audited(
        &app,
        &admin,
        "ada",
        "/admin/v1/tokens",
        json!({ "name": "sue", "role": "support", "reason": "new agent" }),
        "token.created",
    )
    .await;
    assert!(created["token"].as_str().unwrap().starts_with("ent_"));
    audited(
        &app,
        &admin,
        "ada",
        "/admin/v1/tokens/sue/revoke",
        json!({ "reason": "left" }),
        "token.revoked",
    )
    .await;
    let (status, _) = app
        .admin(
            "GET",
            "/admin/v1/products",
            Some(created["token"].as_str().unwrap()),
            None,
            None,
        )
        .await;
    assert_eq!(status, 401, "a revoked token no longer works");
    audited(
        &app,
        &admin,
        "ada",
        "/admin/v1/products/reload",
        json!({ "reason": "new price" }),
        "catalogue.synced",
    )
    .await;

    // The reissue and the resend both reached the corrected address.
    let mails = app.mails(3).await;
    let to_new: Vec<_> = mails
        .iter()
        .filter(|m| m.to == vec!["sam.new@example.com".to_owned()])
        .collect();
    assert_eq!(to_new.len(), 2);
    assert_eq!(to_new[0].codes(), to_new[1].codes());
    let state: String = sqlx::query_scalar("SELECT state FROM activation_code WHERE id = $1::uuid")
        .bind(id(1))
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "revoked");
    let (status, _) = app
        .redeem(&to_new[0].codes()[0], "acct_sam", "child_1")
        .await;
    assert_eq!(status, 201, "the replacement works");
    // Wrong states get clear errors and change nothing.
    let (status, err) = app
        .admin(
            "POST",
            &format!("/admin/v1/codes/{}/revoke", id(0)),
            Some(&operator),
            Some(json!({ "reason": "again" })),
            None,
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("code_already_revoked"))
    );
    let (status, err) = app
        .admin(
            "POST",
            &format!("/admin/v1/codes/{}/revoke", id(0)),
            Some(&operator),
            Some(json!({ "reason": "" })),
            None,
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("reason_required"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_create_twice_with_one_idempotency_key_yields_one_batch() {
    let app = TestApp::spawn().await;
    let operator = app.token(Role::Operator).await;
    let body = json!({ "product_sku": "KIT-BASIC", "quantity": 2, "kind": "customer_service", "reason": "broken kit" });
    let first = app
        .admin(
            "POST",
            "/admin/v1/batches",
            Some(&operator),
            Some(body.clone()),
            Some("ticket-4711"),
        )
        .await;
    let second = app
        .admin(
            "POST",
            "/admin/v1/batches",
            Some(&operator),
            Some(body.clone()),
            Some("ticket-4711"),
        )
        .await;
    assert_eq!(first.0, 201);
    assert_eq!(first, second, "the retry answers the same");
    assert_eq!(app.count("SELECT count(*) FROM code_batch").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'batch.created'")
            .await,
        1
    );

    let other = json!({ "product_sku": "KIT-BASIC", "quantity": 5, "kind": "customer_service", "reason": "other" });
    let (status, err) = app
        .admin(
            "POST",
            "/admin/v1/batches",
            Some(&operator),
            Some(other),
            Some("ticket-4711"),
        )
        .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    // Concurrent retries with one key also act once.
    let posts = (0..5).map(|_| {
        app.admin(
            "POST",
            "/admin/v1/batches",
            Some(&operator),
            Some(body.clone()),
            Some("ticket-4712"),
        )
    });
    let answers = futures::future::join_all(posts).await;
    assert!(
        answers.iter().all(|a| a == &answers[0] && a.0 == 201),
        "{answers:?}"
    );
    assert_eq!(app.count("SELECT count(*) FROM code_batch").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoke_racing_a_redemption_ends_with_exactly_one_applied_every_time() {
    let app = TestApp::spawn().await;
    let operator = app.token(Role::Operator).await;
    let (_, batch) = app
        .admin("POST", "/admin/v1/batches", Some(&operator), Some(json!({ "product_sku": "KIT-BASIC", "quantity": 30, "kind": "test_account", "reason": "race" })), None)
        .await;
    let (_, csv) = app
        .admin(
            "POST",
            &format!("/admin/v1/batches/{}/export", batch["id"].as_str().unwrap()),
            Some(&operator),
            Some(json!({ "reason": "race" })),
            None,
        )
        .await;
    let codes: Vec<String> = csv
        .as_str()
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    assert_eq!(codes.len(), 30);
    for (i, code) in codes.iter().enumerate() {
        let (_, found) = app
            .admin(
                "POST",
                "/admin/v1/codes/lookup",
                Some(&operator),
                Some(json!({ "code": code })),
                None,
            )
            .await;
        let id = found["id"].as_str().unwrap().to_owned();
        let revoke_path = format!("/admin/v1/codes/{id}/revoke");
        let account = format!("acct_{i}");
        let revoke = app.admin(
            "POST",
            &revoke_path,
            Some(&operator),
            Some(json!({ "reason": "race" })),
            None,
        );
        let redeem = app.redeem(code, &account, "e");
        let ((revoke_status, revoke_body), (redeem_status, redeem_body)) =
            tokio::join!(revoke, redeem);
        let state: String =
            sqlx::query_scalar("SELECT state FROM activation_code WHERE id = $1::uuid")
                .bind(&id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        let assignments: i64 =
            sqlx::query_scalar("SELECT count(*) FROM assignment WHERE code_id = $1::uuid")
                .bind(&id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        match (revoke_status, redeem_status) {
            (200, 410) => {
                assert_eq!(redeem_body["code"], "code_revoked");
                assert_eq!((state.as_str(), assignments), ("revoked", 0));
            }
            (409, 201) => {
                assert_eq!(revoke_body["code"], "code_already_redeemed");
                assert_eq!((state.as_str(), assignments), ("redeemed", 1));
            }
            other => {
                panic!("round {i}: both or neither applied: {other:?} {revoke_body} {redeem_body}")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_round_trips_create_look_up_reissue_and_resend() {
    let app = TestApp::spawn().await;
    let token = app.token(Role::Operator).await;

    let created = app
        .cli(
            &token,
            &[
                "--json",
                "batch",
                "create",
                "--product",
                "KIT-BASIC",
                "--quantity",
                "1",
                "--kind",
                "customer_service",
                "--reason",
                "kit arrived broken",
                "--email",
                "cara@example.com",
            ],
        )
        .await;
    let created: Value = serde_json::from_str(&created).unwrap();
    let code = app.mails(1).await[0].codes()[0].clone();

    let shown = app.cli(&token, &["code", "lookup", &code]).await;
    assert!(
        shown.contains(&code[15..]) && shown.contains("issued"),
        "{shown}"
    );
    assert!(
        !shown.contains(&code),
        "tables show the last four symbols only"
    );
    let found: Value =
        serde_json::from_str(&app.cli(&token, &["--json", "code", "lookup", &code]).await).unwrap();
    assert_eq!(found["origin"]["batch_id"], created["id"]);

    let id = found["id"].as_str().unwrap();
    let reissued: Value = serde_json::from_str(
        &app.cli(
            &token,
            &[
                "--json",
                "code",
                "reissue",
                id,
                "--reason",
                "typo in address",
                "--email",
                "cara.c@example.com",
            ],
        )
        .await,
    )
    .unwrap();
    let mails = app.mails(2).await;
    let replacement = mails
        .iter()
        .find(|m| m.to == vec!["cara.c@example.com".to_owned()])
        .unwrap()
        .codes()[0]
        .clone();
    assert_ne!(replacement, code);

    let delivery = reissued["delivery"].as_str().unwrap();
    let resent = app
        .cli(
            &token,
            &["resend", delivery, "--reason", "customer asked again"],
        )
        .await;
    assert!(resent.contains("cara.c@example.com"), "{resent}");
    let mails = app.mails(3).await;
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.codes() == vec![replacement.clone()])
            .count(),
        2
    );

    let chain = app
        .cli(
            &token,
            &[
                "--json",
                "code",
                "show",
                reissued["code"]["id"].as_str().unwrap(),
            ],
        )
        .await;
    let chain: Value = serde_json::from_str(&chain).unwrap();
    assert_eq!(
        chain["reissue_chain"].as_array().unwrap().len(),
        2,
        "the replacement links to the code it replaced"
    );
    assert_eq!(chain["replaces"], id);
    let audit = app
        .cli(&token, &["audit", "--action", "code.reissued"])
        .await;
    assert!(audit.contains("typo in address"), "{audit}");
}
