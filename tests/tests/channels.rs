//! Every purchase scenario, run against all three channels (Stripe, Shopify,
//! native checkout) through the real gateway and worker: each channel's
//! payloads and signatures, one channel-neutral fulfilment.

use chrono::Utc;
use entitle_tests::{
    TestApp,
    channels::{Channel, GiftSpec, Product, Sale, Signing},
    smtp::ReceivedMail,
};
use serde_json::Value;

/// Generates one test per channel for each scenario function.
macro_rules! for_each_channel {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn stripe() { super::$scenario(Channel::Stripe).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn shopify() { super::$scenario(Channel::Shopify).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn native() { super::$scenario(Channel::Native).await }
            }
        )*
    };
}

for_each_channel!(
    signatures_are_checked_the_channels_way,
    a_webhook_delivered_again_is_fulfilled_once,
    a_self_purchase_emails_the_buyer_and_links_the_account_without_assigning_codes,
    a_gift_sends_codes_and_message_to_the_recipient_and_a_receipt_without_codes_to_the_buyer,
    a_gift_with_a_send_date_waits_for_it_even_across_a_worker_restart,
    a_partner_order_of_two_thousand_units_arrives_as_one_email_with_a_csv,
    a_full_refund_revokes_every_unredeemed_code,
    a_partial_refund_revokes_as_many_codes_as_units_refunded,
    a_cancellation_revokes_every_unredeemed_code,
    a_refund_before_its_purchase_ends_with_the_codes_revoked,
    a_redeemed_code_that_is_refunded_is_kept_and_reported,
    an_unknown_product_is_parked_then_fulfilled_after_the_catalogue_is_fixed,
);

fn ok(response: &reqwest::Response) {
    assert_eq!(response.status(), 200, "the gateway acknowledged");
}

async fn states(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.state FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
         ORDER BY l.line_index, c.unit_index",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn order_state(app: &TestApp) -> String {
    sqlx::query_scalar("SELECT state FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn mail_to<'a>(mails: &'a [ReceivedMail], to: &str) -> &'a ReceivedMail {
    mails
        .iter()
        .find(|m| m.to.iter().any(|t| t == to))
        .unwrap_or_else(|| panic!("no email to {to}"))
}

/// Places a sale and waits for its one email; returns the codes in it.
async fn bought(app: &TestApp, channel: Channel, sale: &Sale) -> Vec<String> {
    ok(&channel.purchase(app, sale).await);
    let mails = app.mails(1).await;
    mail_to(&mails, &sale.buyer).codes()
}

async fn signatures_are_checked_the_channels_way(channel: Channel) {
    let app = TestApp::spawn().await;
    let good = Sale::new("sig_good", "g@example.com", &[(Product::Kit, 1)]);
    let rotated = Sale::new("sig_rotated", "r@example.com", &[(Product::Kit, 1)]);
    let forged = Sale::new("sig_forged", "f@example.com", &[(Product::Kit, 1)]);
    let stale = Sale::new("sig_stale", "s@example.com", &[(Product::Kit, 1)]);

    let response = channel
        .purchase_signed(&app, &forged, Signing::WrongSecret)
        .await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "signature_invalid"
    );
    let response = channel.purchase_signed(&app, &stale, Signing::Stale).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "signature_stale"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox").await,
        0,
        "nothing stored"
    );

    ok(&channel.purchase_signed(&app, &good, Signing::Good).await);
    ok(&channel
        .purchase_signed(&app, &rotated, Signing::Rotated)
        .await);
    app.mails(2).await;
    app.events_settled(2).await;
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 2);
    let channels: Vec<String> = sqlx::query_scalar("SELECT DISTINCT channel FROM orders")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(channels, vec![channel.name().to_owned()]);
}

async fn a_webhook_delivered_again_is_fulfilled_once(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new(
        "dup",
        "dup@example.com",
        &[(Product::Kit, 2), (Product::Licence, 1)],
    );
    let posts = (0..4).map(|_| channel.purchase(&app, &sale));
    for response in futures::future::join_all(posts).await {
        ok(&response);
    }
    let mails = app.mails(1).await;
    app.events_settled(1).await;
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        1,
    )
    .await;
    // A late retry after fulfilment too.
    let again = channel.purchase(&app, &sale).await;
    assert_eq!(again.json::<Value>().await.unwrap()["duplicate"], true);

    assert_eq!(app.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 3);
    assert_eq!(mails[0].codes().len(), 3);
    assert_eq!(app.mailbox().messages().len(), 1);
}

async fn a_self_purchase_emails_the_buyer_and_links_the_account_without_assigning_codes(
    channel: Channel,
) {
    let app = TestApp::spawn().await;
    let mut sale = Sale::new("self", "self@example.com", &[(Product::Licence, 2)]);
    sale.account_id = Some("acct_self_1".into());
    let codes = bought(&app, channel, &sale).await;
    assert_eq!(codes.len(), 2);

    let (account, order_id): (Option<String>, String) =
        sqlx::query_as("SELECT account_id, channel_order_id FROM orders")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(account.as_deref(), Some("acct_self_1"));
    assert_eq!(order_id, channel.channel_order_id(&sale));
    assert_eq!(states(&app).await, ["issued", "issued"]);
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 0);

    // Buy now, assign later: anyone holding a code redeems it.
    let (status, body) = app.redeem(&codes[1], "acct_friend", "friend").await;
    assert_eq!(status, 201, "{body}");
}

fn gift(send_at: Option<chrono::DateTime<Utc>>) -> GiftSpec {
    GiftSpec {
        recipient_email: "rae@example.com".into(),
        recipient_name: "Rae".into(),
        message: "Happy birthday, Rae!".into(),
        send_at,
    }
}

async fn a_gift_sends_codes_and_message_to_the_recipient_and_a_receipt_without_codes_to_the_buyer(
    channel: Channel,
) {
    let app = TestApp::spawn().await;
    let mut sale = Sale::new("gift", "giver@example.com", &[(Product::Kit, 2)]);
    sale.gift = Some(gift(None));
    ok(&channel.purchase(&app, &sale).await);
    let mails = app.mails(2).await;

    let present = mail_to(&mails, "rae@example.com");
    assert_eq!(present.codes().len(), 2);
    assert!(
        present.text().contains("Happy birthday, Rae!"),
        "{}",
        present.text()
    );
    assert!(present.html().contains("Happy birthday, Rae!"));
    let receipt = mail_to(&mails, "giver@example.com");
    assert!(
        receipt.codes().is_empty(),
        "the buyer's receipt carries no code"
    );
    assert!(
        receipt.text().contains("rae@example.com"),
        "{}",
        receipt.text()
    );
    assert!(
        receipt.subject().contains("was sent"),
        "{}",
        receipt.subject()
    );
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        2,
    )
    .await;
    assert_eq!(app.mailbox().messages().len(), 2);
}

async fn a_gift_with_a_send_date_waits_for_it_even_across_a_worker_restart(channel: Channel) {
    let app = TestApp::spawn().await;
    let send_at = Utc::now() + chrono::Duration::seconds(4);
    let mut sale = Sale::new("later", "planner@example.com", &[(Product::Kit, 1)]);
    sale.gift = Some(gift(Some(send_at)));
    ok(&channel.purchase(&app, &sale).await);

    // The buyer hears at once that the gift is scheduled.
    let mails = app.mails(1).await;
    let receipt = mail_to(&mails, "planner@example.com");
    assert!(
        receipt.subject().contains("scheduled"),
        "{}",
        receipt.subject()
    );
    assert!(receipt.codes().is_empty());
    assert!(
        Utc::now() < send_at,
        "the receipt came before the send date"
    );
    assert_eq!(app.mailbox().messages().len(), 1, "the gift waits");

    app.restart_worker().await;
    let mails = app.mails(2).await;
    assert!(Utc::now() >= send_at, "not before its time");
    let present = mail_to(&mails, "rae@example.com");
    assert_eq!(present.codes().len(), 1);
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        2,
    )
    .await;
    let sent_at: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT sent_at FROM email_delivery WHERE kind = 'gift_codes'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(sent_at >= send_at);
    assert!(
        sent_at - send_at < chrono::Duration::seconds(60),
        "within minutes of its time"
    );
}

async fn a_partner_order_of_two_thousand_units_arrives_as_one_email_with_a_csv(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("partner", "partner@example.com", &[(Product::Kit, 2000)]);
    ok(&channel.purchase(&app, &sale).await);
    let mails = app.mails(1).await;
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status = 'sent'",
        1,
    )
    .await;
    assert_eq!(
        app.mailbox().messages().len(),
        1,
        "one email, not one per code"
    );

    let mail = &mails[0];
    assert!(
        mail.codes().is_empty(),
        "the codes are in the attachment, not the text"
    );
    let (name, csv) = mail.attachment().expect("a CSV attachment");
    assert_eq!(name, "activation-codes.csv");
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some("code,product,valid_until"));
    let codes: std::collections::HashSet<&str> =
        rows.map(|row| row.split(',').next().unwrap()).collect();
    assert_eq!(codes.len(), 2000, "2,000 distinct codes");
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code").await,
        2000
    );
    assert_eq!(
        app.count("SELECT count(DISTINCT code_hash) FROM activation_code")
            .await,
        2000
    );
    // Issued in bounded batches: four transactions of 500 codes.
    let batches = app
        .count("SELECT count(DISTINCT xmin::text) FROM activation_code")
        .await;
    assert_eq!(batches, 4);
    let any = codes.iter().next().unwrap();
    let (status, body) = app.redeem(any, "acct_partner_customer", "p1").await;
    assert_eq!(status, 201, "{body}");
}

async fn a_full_refund_revokes_every_unredeemed_code(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("refund_all", "ref@example.com", &[(Product::Kit, 3)]);
    let codes = bought(&app, channel, &sale).await;
    ok(&channel.refund_all(&app, &sale, "rf_all").await);
    app.events_settled(2).await;

    assert_eq!(states(&app).await, ["revoked", "revoked", "revoked"]);
    assert_eq!(order_state(&app).await, "refunded");
    let (status, body) = app.redeem(&codes[0], "acct", "e").await;
    assert_eq!((status, body["code"].as_str()), (410, Some("code_revoked")));
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.revoked'")
            .await,
        3
    );
    assert_eq!(
        app.mailbox().messages().len(),
        1,
        "holders are not emailed by default"
    );
}

async fn a_partial_refund_revokes_as_many_codes_as_units_refunded(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("refund_some", "part@example.com", &[(Product::Kit, 4)]);
    bought(&app, channel, &sale).await;

    ok(&channel
        .refund_units(&app, &sale, "rf_one", Product::Kit, 1, 0)
        .await);
    app.events_settled(2).await;
    assert_eq!(
        states(&app).await,
        ["issued", "issued", "issued", "revoked"]
    );
    assert_eq!(order_state(&app).await, "partially_refunded");

    ok(&channel
        .refund_units(&app, &sale, "rf_two", Product::Kit, 2, 1)
        .await);
    app.events_settled(3).await;
    assert_eq!(
        states(&app).await,
        ["issued", "revoked", "revoked", "revoked"]
    );
    assert_eq!(order_state(&app).await, "partially_refunded");
}

async fn a_cancellation_revokes_every_unredeemed_code(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("cancel", "cancel@example.com", &[(Product::Licence, 2)]);
    bought(&app, channel, &sale).await;
    ok(&channel.cancel(&app, &sale).await);
    app.events_settled(2).await;
    assert_eq!(states(&app).await, ["revoked", "revoked"]);
    assert_eq!(order_state(&app).await, "cancelled");
}

async fn a_refund_before_its_purchase_ends_with_the_codes_revoked(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("early_refund", "early@example.com", &[(Product::Kit, 2)]);
    ok(&channel.refund_all(&app, &sale, "rf_early").await);
    app.events_settled(1).await;
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM order_adjustment WHERE applied_at IS NULL")
            .await,
        1,
        "the refund waits for its order"
    );

    ok(&channel.purchase(&app, &sale).await);
    app.events_settled(2).await;
    assert_eq!(states(&app).await, ["revoked", "revoked"]);
    assert_eq!(order_state(&app).await, "refunded");
    assert_eq!(
        app.count("SELECT count(*) FROM email_delivery").await,
        0,
        "no codes to send"
    );

    // The purchase replayed after the refund changes nothing.
    channel.purchase(&app, &sale).await;
    app.events_settled(2).await;
    assert_eq!(states(&app).await, ["revoked", "revoked"]);
    assert!(app.mailbox().messages().is_empty());
}

async fn a_redeemed_code_that_is_refunded_is_kept_and_reported(channel: Channel) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("used", "used@example.com", &[(Product::Kit, 2)]);
    let codes = bought(&app, channel, &sale).await;
    let (status, _) = app.redeem(&codes[0], "acct_user", "me").await;
    assert_eq!(status, 201);

    ok(&channel.refund_all(&app, &sale, "rf_used").await);
    app.events_settled(2).await;
    assert_eq!(states(&app).await, ["redeemed", "revoked"]);
    let (kind, status, detail): (String, String, String) = sqlx::query_as(
        "SELECT f.kind, f.status, f.detail FROM reconciliation_finding f
         JOIN activation_code c ON c.id = f.code_id WHERE c.state = 'redeemed'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), status.as_str()),
        ("refunded_but_redeemed", "open")
    );
    assert!(detail.contains("already redeemed"));

    // The same refund reported again records nothing new.
    channel.refund_all(&app, &sale, "rf_used").await;
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding")
            .await,
        1
    );
}

async fn an_unknown_product_is_parked_then_fulfilled_after_the_catalogue_is_fixed(
    channel: Channel,
) {
    let app = TestApp::spawn().await;
    let sale = Sale::new("unknown", "new@example.com", &[(Product::Unmapped, 2)]);
    ok(&channel.purchase(&app, &sale).await);
    app.events_settled(1).await;
    let (status, code): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_code FROM webhook_inbox")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), code.as_deref()),
        ("failed", Some("unknown_product"))
    );
    assert_eq!(app.count("SELECT count(*) FROM orders").await, 0);

    // Operations map the new product and re-run the parked event.
    entitle_tests::channels::map_unmapped_product(&app, channel).await;
    let retried = entitle_jobs::handlers::retry_failed_events(
        &app.ctx,
        &entitle_jobs::inbox::RetryFilter {
            error_code: Some("unknown_product".into()),
            ..Default::default()
        },
        "operator:test",
        "catalogue fixed",
    )
    .await
    .unwrap();
    assert_eq!(retried.len(), 1);

    let mails = app.mails(1).await;
    assert_eq!(mails[0].codes().len(), 2);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'event.retried' AND actor = 'operator:test'").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holders_are_told_of_revoked_codes_when_configured() {
    let app = TestApp::spawn_configured(
        entitle_tests::Options::default(),
        serde_json::json!({ "email": { "notify_revocations": true } }),
    )
    .await;
    let channel = Channel::Native;
    let mut sale = Sale::new("notify", "buyer@example.com", &[(Product::Kit, 2)]);
    sale.gift = Some(gift(None));
    ok(&channel.purchase(&app, &sale).await);
    let codes = mail_to(&app.mails(2).await, "rae@example.com").codes();
    ok(&channel
        .refund_units(&app, &sale, "rf_notify", Product::Kit, 1, 0)
        .await);

    let mails = app.mails(3).await;
    let notice = mails
        .iter()
        .find(|m| m.subject().contains("cancelled"))
        .expect("a revocation notice");
    assert_eq!(
        notice.to,
        vec!["rae@example.com".to_owned()],
        "the holder is the recipient"
    );
    let revoked: String =
        sqlx::query_scalar("SELECT last4 FROM activation_code WHERE state = 'revoked'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(notice.text().contains(&revoked), "{}", notice.text());
    assert!(
        notice.codes().is_empty(),
        "the notice names codes by their last four symbols only"
    );
    assert!(codes.iter().any(|c| c.ends_with(&revoked)));
}
