//! The code lifecycle's rules, through the admin API: a code is replaced at
//! most once and a refund is not undone without an explicit override; a
//! resend to another address needs an operator and kills the misdirected
//! copy; a delivery never emails codes that died before it was due; refused
//! redemptions are recorded on the code, bounded.

use std::time::Duration;

use entitle_jobs::token::Role;
use entitle_tests::{
    TestApp, WAIT,
    channels::{Channel, GiftSpec, Product, Sale},
    eventually,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// Places a native order of `units` kits and waits for its email; returns
/// the codes as mailed and their ids in unit order.
async fn order(app: &TestApp, name: &str, units: u32) -> (Sale, Vec<String>, Vec<String>) {
    let sale = Sale::new(
        name,
        &format!("{name}@example.com"),
        &[(Product::Kit, units)],
    );
    assert_eq!(Channel::Native.purchase(app, &sale).await.status(), 200);
    let codes = app.mails(1).await[0].codes();
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM activation_code WHERE order_line_id IS NOT NULL ORDER BY unit_index",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    (sale, codes, ids.iter().map(Uuid::to_string).collect())
}

async fn post(app: &TestApp, token: &str, path: &str, body: Value) -> (u16, Value) {
    app.admin("POST", path, Some(token), Some(body), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_is_replaced_once_and_a_refund_is_not_reissued_without_an_override() {
    let app = TestApp::spawn().await;
    let (sale, _, ids) = order(&app, "rita", 2).await;
    let operator = app.token(Role::Operator).await;
    let reissue = |id: &str| format!("/admin/v1/codes/{id}/reissue");

    let (status, first) = post(
        &app,
        &operator,
        &reissue(&ids[0]),
        json!({ "reason": "lost" }),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = post(
        &app,
        &operator,
        &reissue(&ids[0]),
        json!({ "reason": "lost again" }),
    )
    .await;
    assert_eq!(
        (status, again["code"].as_str()),
        (409, Some("code_already_replaced")),
        "{again}"
    );
    let live = "SELECT count(*) FROM activation_code WHERE state = 'issued'";
    assert_eq!(
        app.count(live).await,
        2,
        "one replacement and the untouched code"
    );
    let (status, forced) = post(
        &app,
        &operator,
        &reissue(&ids[0]),
        json!({ "reason": "customer lost both", "force": true }),
    )
    .await;
    assert_eq!(status, 201, "{forced}");
    let recorded: Value = sqlx::query_scalar(
        "SELECT data FROM audit_event WHERE action = 'code.reissued' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(recorded["forced"], true, "the override is on record");

    // The refund revokes the untouched code; reissuing it would undo the refund.
    assert_eq!(
        Channel::Native
            .refund_all(&app, &sale, "re_rita")
            .await
            .status(),
        200
    );
    app.wait_count(
        "SELECT count(*) FROM activation_code WHERE revoked_cause = 'adjustment'",
        1,
    )
    .await;
    let (status, refused) = post(
        &app,
        &operator,
        &reissue(&ids[1]),
        json!({ "reason": "asked" }),
    )
    .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("code_revoked_by_refund")),
        "{refused}"
    );
    let (status, _) = post(
        &app,
        &operator,
        &reissue(&ids[1]),
        json!({ "reason": "refund reversed by hand", "force": true }),
    )
    .await;
    assert_eq!(status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resend_to_another_address_needs_an_operator_and_kills_the_misdirected_copy() {
    let app = TestApp::spawn().await;
    let (_, codes, _) = order(&app, "tom", 2).await;
    let delivery: Uuid =
        sqlx::query_scalar("SELECT id FROM email_delivery WHERE kind = 'order_codes'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let path = format!("/admin/v1/deliveries/{delivery}/resend");
    let support = app.token(Role::Support).await;
    let operator = app.token(Role::Operator).await;

    let (status, refused) = post(
        &app,
        &support,
        &path,
        json!({ "reason": "typo", "email": "tom.right@example.com" }),
    )
    .await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        app.count("SELECT count(*) FROM email_delivery").await,
        1,
        "nothing was created"
    );

    // The same address: support may, and the same codes go again.
    let (status, same) = post(&app, &support, &path, json!({ "reason": "not received" })).await;
    assert_eq!(status, 201, "{same}");
    assert_eq!(same["replaced"], json!([]));
    let mails = app.mails(2).await;
    assert_eq!(mails[1].codes(), codes);

    // Another address: the codes are replaced, the old copies die.
    let (status, moved) = post(
        &app,
        &operator,
        &path,
        json!({ "reason": "typo", "email": "tom.right@example.com" }),
    )
    .await;
    assert_eq!(status, 201, "{moved}");
    assert_eq!(moved["replaced"].as_array().unwrap().len(), 2);
    let mails = app.mails(3).await;
    let to_right = mails
        .iter()
        .find(|m| m.to == vec!["tom.right@example.com".to_owned()])
        .expect("a message to the corrected address");
    let new_codes = to_right.codes();
    assert_eq!(new_codes.len(), 2);
    assert!(new_codes.iter().all(|c| !codes.contains(c)), "new codes");
    let (status, answer) = app.redeem(&codes[0], "acct_x", "someone").await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (410, Some("code_revoked")),
        "the copy at the wrong address no longer works"
    );
    let (status, _) = app.redeem(&new_codes[0], "acct_tom", "tom").await;
    assert_eq!(status, 201, "the replacement works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gift_refunded_before_its_send_date_never_emails_its_dead_codes() {
    let app = TestApp::spawn().await;
    let send_at = chrono::Utc::now() + chrono::Duration::seconds(3);
    let mut sale = Sale::new("early", "giver@example.com", &[(Product::Kit, 1)]);
    sale.gift = Some(GiftSpec {
        recipient_email: "rae@example.com".into(),
        recipient_name: "Rae".into(),
        message: "For later".into(),
        send_at: Some(send_at),
    });
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    assert!(app.mails(1).await[0].codes().is_empty(), "the receipt");
    assert_eq!(
        Channel::Native
            .refund_all(&app, &sale, "re_early")
            .await
            .status(),
        200
    );
    app.wait_count(
        "SELECT count(*) FROM activation_code WHERE state = 'revoked'",
        1,
    )
    .await;
    eventually("the gift's delivery is skipped", WAIT, || async {
        let status: String =
            sqlx::query_scalar("SELECT status FROM email_delivery WHERE kind = 'gift_codes'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        (status == "skipped").then_some(())
    })
    .await;
    assert!(chrono::Utc::now() >= send_at);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let to_rae = app
        .mailbox()
        .messages()
        .into_iter()
        .filter(|m| m.to == vec!["rae@example.com".to_owned()])
        .count();
    assert_eq!(to_rae, 0, "no email carried the refunded code");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_redemptions_are_recorded_on_the_code_and_bounded() {
    let app = TestApp::spawn().await;
    let (_, codes, ids) = order(&app, "una", 2).await;
    let operator = app.token(Role::Operator).await;
    let (status, _) = post(
        &app,
        &operator,
        &format!("/admin/v1/codes/{}/revoke", ids[0]),
        json!({ "reason": "fraud" }),
    )
    .await;
    assert_eq!(status, 200);
    for i in 0..25 {
        let (status, _) = app.redeem(&codes[0], &format!("acct_{i}"), "me").await;
        assert_eq!(status, 410);
    }
    let (status, _) = app.redeem(&codes[1], "acct_una", "una").await;
    assert_eq!(status, 201);
    let (status, _) = app.redeem(&codes[1], "acct_other", "other").await;
    assert_eq!(status, 409);

    let support = app.token(Role::Support).await;
    let (status, view) = app
        .admin(
            "GET",
            &format!("/admin/v1/codes/{}", ids[0]),
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let refusals = view["refusals"].as_array().expect("refusals on the code");
    assert_eq!(
        refusals.len(),
        entitle_jobs::lifecycle::REFUSALS_KEPT as usize,
        "only the latest are kept"
    );
    assert_eq!(refusals[0]["reason"], "code_revoked");
    assert_eq!(refusals[0]["account_id"], "acct_24", "newest first");
    let (_, other) = app
        .admin(
            "GET",
            &format!("/admin/v1/codes/{}", ids[1]),
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(other["refusals"][0]["reason"], "code_already_redeemed");
    assert_eq!(other["refusals"][0]["account_id"], "acct_other");
    assert_eq!(other["refusals"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reissues_of_one_code_yield_one_replacement_and_an_expired_original_dies() {
    let app = TestApp::spawn().await;
    let (_, _, ids) = order(&app, "vic", 2).await;
    let reissue = |id: &str| format!("/admin/v1/codes/{id}/reissue");
    let (a, b) = (
        app.token(Role::Operator).await,
        app.token(Role::Operator).await,
    );
    let path = reissue(&ids[0]);
    let (first, second) = tokio::join!(
        post(&app, &a, &path, json!({ "reason": "lost" })),
        post(&app, &b, &path, json!({ "reason": "lost too" })),
    );
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{first:?} {second:?}");
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE replaces IS NOT NULL")
            .await,
        1,
        "one replacement"
    );

    // An expired code is replaced and dies: extending it cannot revive it.
    sqlx::query(
        "UPDATE activation_code SET state = 'expired', expired_at = now(), expires_at = now()
         WHERE id = $1::uuid",
    )
    .bind(&ids[1])
    .execute(&app.pool)
    .await
    .unwrap();
    let (status, _) = post(
        &app,
        &a,
        &reissue(&ids[1]),
        json!({ "reason": "expired early" }),
    )
    .await;
    assert_eq!(status, 201);
    let state: String = sqlx::query_scalar("SELECT state FROM activation_code WHERE id = $1::uuid")
        .bind(&ids[1])
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "revoked");
    let (status, answer) = post(
        &app,
        &a,
        &format!("/admin/v1/codes/{}/expiry", ids[1]),
        json!({ "reason": "goodwill", "expires_at": "2035-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (409, Some("code_already_revoked"))
    );

    // Replacement batches come only from reissues.
    let (status, answer) = post(
        &app,
        &a,
        "/admin/v1/batches",
        json!({ "product_sku": "KIT-BASIC", "quantity": 1, "kind": "replacement", "reason": "hand-made" }),
    )
    .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (422, Some("invalid_request"))
    );
}
