//! Refunds and cancellations that race their purchase settle right: one
//! that arrives before the purchase, at the same moment, or twice is
//! applied exactly once, once the order exists, on every channel and with
//! two workers taking the events side by side. Reconciliation never calls
//! a recorded adjustment applied until it is.

use std::time::Duration;

use chrono::Utc;
use entitle_jobs::reconcile;
use entitle_tests::{
    TestApp,
    channel_api::ChannelApi,
    channels::{Channel, Product, Sale, stripe_charge, stripe_session},
};
use futures::future::join_all;
use rand::RngExt;

/// The orders of a race: each is bought, refunded or cancelled, and sent
/// the adjustment a second time (a channel's retry), in one of every order,
/// all at once.
const ORDERS: usize = 12;

async fn race(channel: Channel) {
    let app = TestApp::spawn().await;
    app.start_another_worker();
    let sales: Vec<Sale> = (0..ORDERS)
        .map(|i| {
            Sale::new(
                &format!("race-{}-{i}", channel.name()),
                "race@example.com",
                &[(Product::Kit, 2)],
            )
        })
        .collect();
    // Six orderings of purchase (P), adjustment (A) and its retry (A'),
    // each order cancelled or refunded by turns.
    let orderings = [
        "PAA", "APA", "AAP", "PAA", "APA", "AAP", "PAA", "APA", "AAP", "PAA", "APA", "AAP",
    ];
    let sends = sales.iter().enumerate().flat_map(|(i, sale)| {
        let app = &app;
        orderings[i]
            .chars()
            .enumerate()
            .map(move |(step, what)| async move {
                // Staggered a little, so the steps interleave with the worker
                // rather than arriving strictly in their order.
                let jitter = rand::rng().random_range(0..40) + step as u64 * 15;
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                let answer = match (what, i % 2 == 0) {
                    ('P', _) => channel.purchase(app, sale).await,
                    (_, true) => channel.refund_all(app, sale, &format!("rf{i}")).await,
                    (_, false) => channel.cancel(app, sale).await,
                };
                assert_eq!(answer.status(), 200, "{} {what}", sale.order);
            })
    });
    join_all(sends).await;
    // Two events per order are filed (the retry is the same delivery).
    app.events_settled(2 * ORDERS as i64).await;

    assert_eq!(
        app.count("SELECT count(*) FROM orders").await,
        ORDERS as i64
    );
    assert_eq!(
        app.count("SELECT count(*) FROM order_adjustment").await,
        ORDERS as i64,
        "each adjustment is recorded once"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM order_adjustment WHERE applied_at IS NULL")
            .await,
        0,
        "every adjustment is applied once its order exists"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE state <> 'revoked'")
            .await,
        0,
        "no code of a refunded or cancelled order stays usable"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code").await,
        2 * ORDERS as i64,
        "each unit got one code"
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM (SELECT subject_id FROM audit_event WHERE action = 'code.revoked'
                                   GROUP BY subject_id HAVING count(*) = 1) once"
        )
        .await,
        2 * ORDERS as i64,
        "each code was revoked exactly once"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orders WHERE state NOT IN ('refunded', 'cancelled')")
            .await,
        0
    );
    // Codes revoked before they were sent are never emailed.
    app.wait_count(
        "SELECT count(*) FROM email_delivery WHERE status IN ('pending', 'sending')",
        0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stripe_adjustments_racing_their_purchase_apply_exactly_once() {
    race(Channel::Stripe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shopify_adjustments_racing_their_purchase_apply_exactly_once() {
    race(Channel::Shopify).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn native_adjustments_racing_their_purchase_apply_exactly_once() {
    race(Channel::Native).await;
}

/// A refund recorded but not applied (the state a lost refund leaves) is
/// not "applied" to reconciliation: the run takes the codes back through
/// the normal path and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_applies_a_recorded_refund_that_was_never_applied() {
    let app = TestApp::spawn().await;
    let api = ChannelApi::mount(&app.stripe, 10).await;
    let sale = Sale::new("lost-refund", "lost@example.com", &[(Product::Kit, 2)]);
    assert_eq!(Channel::Stripe.purchase(&app, &sale).await.status(), 200);
    api.stripe_session(stripe_session(&sale));
    app.events_settled(1).await;
    assert_eq!(
        Channel::Stripe
            .refund_all(&app, &sale, "rf_lost")
            .await
            .status(),
        200
    );
    app.events_settled(2).await;
    api.stripe_refund("rf_lost", sale.total(), stripe_charge(&sale, sale.total()));
    // As if the refund had been recorded and then lost before it applied.
    sqlx::query("UPDATE order_adjustment SET applied_at = NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE activation_code SET state = 'issued', revoked_at = NULL, revoked_cause = NULL",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE orders SET state = 'paid'")
        .execute(&app.pool)
        .await
        .unwrap();

    let now = Utc::now();
    let window = reconcile::Window {
        start: now - chrono::Duration::hours(1),
        end: now + chrono::Duration::minutes(1),
    };
    let run = reconcile::queue(&app.pool, "stripe", window, "test")
        .await
        .unwrap();
    reconcile::execute(&app.ctx, run).await.unwrap();
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE state = 'revoked'")
            .await,
        2,
        "the run took the codes back"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM order_adjustment WHERE applied_at IS NOT NULL")
            .await,
        1,
        "and the refund is applied now"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM reconciliation_finding WHERE run_id IS NOT NULL")
            .await,
        1,
        "and says so"
    );
}
