//! Events for the platform, end to end: written with each change, signed
//! per Standard Webhooks (verified here by the `standardwebhooks` crate),
//! retried while the receiver is down, delivered in order per code, logged
//! attempt by attempt, replayable, and given up (with a finding) only after
//! `platform.retry_for_secs`.

use std::{collections::HashSet, time::Duration};

use entitle_jobs::{platform_event::sign::Secret, token::Role};
use entitle_tests::{
    Options, TestApp,
    channels::{Channel, Product, Sale},
    eventually,
    receiver::{Received, Receiver},
    smtp::free_port,
};
use serde_json::{Value, json};
use uuid::Uuid;

fn fast_retries(extra: Value) -> Value {
    let mut platform = json!({ "retry_min_backoff_ms": 100, "retry_max_backoff_secs": 1 });
    if let (Some(platform), Value::Object(extra)) = (platform.as_object_mut(), extra) {
        platform.extend(extra);
    }
    json!({ "platform": platform })
}

async fn all_delivered(app: &TestApp, events: i64) {
    eventually("every event delivered", Duration::from_secs(60), || async {
        let delivered = app
            .count("SELECT count(*) FROM platform_delivery WHERE status = 'delivered'")
            .await;
        (delivered == events).then_some(())
    })
    .await;
}

/// The first arrival of each event, in arrival order.
fn first_arrivals(received: &[Received]) -> Vec<Received> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|r| seen.insert(r.id.clone()))
        .cloned()
        .collect()
}

async fn code_id(app: &TestApp, code: &str) -> Uuid {
    let (status, checked) = app.redeem(code, "acct_a", "kid-1").await;
    assert_eq!(status, 201, "{checked}");
    let _ = app;
    Uuid::parse_str(checked["code_id"].as_str().unwrap()).unwrap()
}

async fn act(app: &TestApp, token: &str, path: String, body: Value) -> Value {
    let (status, answer) = app
        .admin("POST", &path, Some(token), Some(body), None)
        .await;
    assert_eq!(status, 200, "{path}: {answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_receiver_that_is_down_then_arrive_signed_and_in_order_per_code() {
    let port = free_port();
    let secret = Secret::generate().expose();
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: true,
        },
        fast_retries(json!({ "endpoints": [{
            "name": "platform", "url": Receiver::url_on(port), "secret": secret
        }] })),
    )
    .await;
    let operator = app.token(Role::Operator).await;
    let codes = app.batch_codes("KIT-BASIC", 5).await;
    // The receiver is down (nothing listens on its port) while codes
    // change: each code's history is several events.
    let mut ids = Vec::new();
    for code in &codes {
        ids.push(code_id(&app, code).await);
    }
    let reason = "asked by the customer";
    for id in &ids[..3] {
        act(
            &app,
            &operator,
            format!("/admin/v1/codes/{id}/reassign"),
            json!({ "reason": reason, "account_id": "acct_b", "entity_ref": "kid-2" }),
        )
        .await;
    }
    for id in &ids[..2] {
        act(
            &app,
            &operator,
            format!("/admin/v1/codes/{id}/unassign"),
            json!({ "reason": reason }),
        )
        .await;
    }
    act(
        &app,
        &operator,
        format!("/admin/v1/codes/{}/revoke", ids[0]),
        json!({ "reason": reason }),
    )
    .await;
    let events = app.count("SELECT count(*) FROM platform_event").await;
    assert_eq!(events, 5 + 3 + 2 + 1);

    eventually("attempts refused while down", Duration::from_secs(30), || async {
        let retried = app
            .count("SELECT count(*) FROM platform_delivery WHERE attempts >= 2 AND last_error = 'connect_failed'")
            .await;
        (retried >= 3).then_some(())
    })
    .await;
    // While a code's first event is undelivered, its later ones wait.
    assert_eq!(
        app.count(
            "SELECT count(*) FROM platform_delivery d WHERE d.attempts > 0 AND EXISTS (
                 SELECT 1 FROM platform_delivery p WHERE p.code_id = d.code_id AND p.seq < d.seq)"
        )
        .await,
        0,
        "a code's later events are not tried before its earlier ones"
    );

    let receiver = Receiver::start_on(port, std::slice::from_ref(&secret)).await;
    all_delivered(&app, events).await;
    assert_eq!(receiver.refused(), 0, "every signature verified");
    let arrived = first_arrivals(&receiver.received());
    let stored: HashSet<String> = sqlx::query_scalar::<_, Uuid>("SELECT id FROM platform_event")
        .fetch_all(&app.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    let got: HashSet<String> = arrived.iter().map(|r| r.id.clone()).collect();
    assert_eq!(got, stored, "every event arrived, under its stable id");
    for (i, id) in ids.iter().enumerate() {
        let of_code: Vec<&Received> = arrived
            .iter()
            .filter(|r| r.code_id() == Some(&id.to_string()))
            .collect();
        let seqs: Vec<i64> = of_code.iter().map(|r| r.seq()).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "code {i}: events in order, got {seqs:?}"
        );
        let kinds: Vec<&str> = of_code.iter().map(|r| r.kind()).collect();
        let expected: &[&str] = match i {
            0 => &[
                "code.redeemed",
                "code.reassigned",
                "code.unassigned",
                "code.revoked",
            ],
            1 => &["code.redeemed", "code.reassigned", "code.unassigned"],
            2 => &["code.redeemed", "code.reassigned"],
            _ => &["code.redeemed"],
        };
        assert_eq!(kinds, expected, "code {i}");
    }
    // Every code event has the same common fields, whoever wrote it.
    let common = [
        "code_id",
        "code_last4",
        "state",
        "product_sku",
        "product_name",
        "order_id",
        "batch_id",
        "expires_at",
        "account_id",
        "entity_ref",
    ];
    for r in &arrived {
        let data = r.event["data"].as_object().unwrap();
        let missing: Vec<_> = common.iter().filter(|k| !data.contains_key(**k)).collect();
        assert!(missing.is_empty(), "{}: {missing:?} missing", r.kind());
        assert!(data["batch_id"].is_string(), "{}", r.kind());
    }
    let reassigned = arrived
        .iter()
        .find(|r| r.kind() == "code.reassigned")
        .unwrap();
    let data = &reassigned.event["data"];
    assert_eq!(data["account_id"], "acct_b");
    assert_eq!(data["entity_ref"], "kid-2");
    assert_eq!(data["previous"]["account_id"], "acct_a");
    assert_eq!(data["product_sku"], "KIT-BASIC");
    assert_eq!(data["code_last4"].as_str().unwrap().len(), 4);
    for r in &receiver.received() {
        for code in &codes {
            let bare = code.replace('-', "");
            assert!(
                !r.body.contains(code.as_str()) && !r.body.contains(&bare),
                "an event never carries a code: {}",
                r.body
            );
        }
    }

    // The delivery log shows each attempt: refused while down, then 2xx.
    let support = app.token(Role::Support).await;
    let (status, log) = app
        .admin(
            "GET",
            &format!("/admin/v1/platform/deliveries?code_id={}", ids[4]),
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{log}");
    let delivery = &log["deliveries"][0];
    assert_eq!(delivery["status"], "delivered");
    assert_eq!(delivery["endpoint"], "platform");
    let (status, detail) = app
        .admin(
            "GET",
            &format!(
                "/admin/v1/platform/deliveries/{}",
                delivery["id"].as_str().unwrap()
            ),
            Some(&support),
            None,
            None,
        )
        .await;
    assert_eq!(status, 200, "{detail}");
    let attempts = detail["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{detail}");
    assert_eq!(attempts[0]["error"], "connect_failed");
    assert_eq!(attempts.last().unwrap()["status_code"], 204);
    assert_eq!(detail["data"]["code_id"], ids[4].to_string());
    receiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reassign_reaches_the_platform_and_rotation_replay_and_giving_up_work() {
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: true,
        },
        fast_retries(json!({ "retry_for_secs": 2, "rotation_overlap_secs": 3600 })),
    )
    .await;
    let admin = app.token(Role::Admin).await;
    let operator = app.token(Role::Operator).await;
    let port = free_port();
    let (status, made) = app
        .admin(
            "POST",
            "/admin/v1/platform/endpoints",
            Some(&operator),
            Some(json!({ "name": "shop", "url": Receiver::url_on(port), "reason": "r" })),
            None,
        )
        .await;
    assert_eq!(status, 403, "only an admin makes endpoints: {made}");
    let (status, made) = app
        .admin(
            "POST",
            "/admin/v1/platform/endpoints",
            Some(&admin),
            Some(json!({ "name": "shop", "url": "ftp://x", "reason": "r" })),
            None,
        )
        .await;
    assert_eq!(
        (status, made["code"].as_str()),
        (422, Some("invalid_request"))
    );
    let (status, made) = app
        .admin(
            "POST",
            "/admin/v1/platform/endpoints",
            Some(&admin),
            Some(json!({ "name": "shop", "url": Receiver::url_on(port),
                         "reason": "the shop's receiver" })),
            None,
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let endpoint_id = made["endpoint"]["id"].as_str().unwrap().to_owned();
    let first_secret = made["secret"].as_str().unwrap().to_owned();
    assert!(first_secret.starts_with("whsec_"));
    let receiver = Receiver::start_on(port, std::slice::from_ref(&first_secret)).await;

    // Support moves a redeemed code to another account: the platform hears.
    let codes = app.batch_codes("KIT-BASIC", 1).await;
    let id = code_id(&app, &codes[0]).await;
    act(
        &app,
        &operator,
        format!("/admin/v1/codes/{id}/reassign"),
        json!({ "reason": "wrong child", "account_id": "acct_a", "entity_ref": "kid-2" }),
    )
    .await;
    let reassigned = eventually(
        "code.reassigned arrives",
        Duration::from_secs(30),
        || async {
            receiver
                .received()
                .into_iter()
                .find(|r| r.kind() == "code.reassigned")
        },
    )
    .await;
    assert_eq!(reassigned.event["data"]["entity_ref"], "kid-2");
    assert_eq!(reassigned.event["data"]["previous"]["entity_ref"], "kid-1");
    assert_eq!(reassigned.verified_by, vec![0]);

    // Rotation: the new secret signs, and the old one still does.
    let (status, rotated) = app
        .admin(
            "POST",
            &format!("/admin/v1/platform/endpoints/{endpoint_id}/rotate"),
            Some(&admin),
            Some(json!({ "reason": "yearly rotation" })),
            None,
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let second_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(second_secret, first_secret);
    assert!(rotated["endpoint"]["previous_until"].is_string());
    receiver.add_secret(&second_secret);

    // Replay: the same event again, under the same id, signed by both.
    let delivery: Uuid = sqlx::query_scalar(
        "SELECT d.id FROM platform_delivery d JOIN platform_event e ON e.id = d.event_id
         WHERE e.type = 'code.reassigned'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    act(
        &app,
        &operator,
        format!("/admin/v1/platform/deliveries/{delivery}/replay"),
        json!({ "reason": "the platform lost it" }),
    )
    .await;
    let again = eventually("the replay arrives", Duration::from_secs(30), || async {
        let same: Vec<Received> = receiver
            .received()
            .into_iter()
            .filter(|r| r.id == reassigned.id)
            .collect();
        (same.len() == 2).then(|| same[1].clone())
    })
    .await;
    assert_eq!(
        again.verified_by,
        vec![0, 1],
        "both secrets sign during the overlap"
    );
    assert_eq!(again.event, reassigned.event, "a replay is the same event");

    // A receiver that keeps failing: tried until retry_for_secs, then the
    // delivery fails with a finding; a replay once it is back delivers it.
    receiver.fail(true);
    act(
        &app,
        &operator,
        format!("/admin/v1/codes/{id}/unassign"),
        json!({ "reason": "the family asked" }),
    )
    .await;
    let failed: Uuid = eventually(
        "the delivery is given up",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar(
                "SELECT d.id FROM platform_delivery d JOIN platform_event e ON e.id = d.event_id
             WHERE e.type = 'code.unassigned' AND d.status = 'failed' AND d.attempts >= 2",
            )
            .fetch_optional(&app.pool)
            .await
            .unwrap()
        },
    )
    .await;
    let finding = "SELECT count(*) FROM reconciliation_finding
                   WHERE kind = 'platform_delivery_failed' AND status = 'open'";
    assert_eq!(app.count(finding).await, 1);
    receiver.fail(false);
    act(
        &app,
        &operator,
        format!("/admin/v1/platform/deliveries/{failed}/replay"),
        json!({ "reason": "the platform is back" }),
    )
    .await;
    eventually(
        "the replayed delivery arrives",
        Duration::from_secs(30),
        || async {
            receiver
                .received()
                .into_iter()
                .find(|r| r.kind() == "code.unassigned")
        },
    )
    .await;
    all_delivered(&app, 3).await;
    assert_eq!(
        app.count(finding).await,
        0,
        "the replay settled the finding"
    );
    let audited = app
        .count(
            "SELECT count(*) FROM audit_event WHERE action IN
             ('platform_endpoint.created', 'platform_endpoint.rotated', 'platform_delivery.replayed')",
        )
        .await;
    assert_eq!(audited, 4);

    // The same from a terminal.
    let listed = app.cli(&admin, &["endpoint", "list"]).await;
    assert!(
        listed.contains("shop") && listed.contains(&endpoint_id),
        "{listed}"
    );
    let support = app.token(Role::Support).await;
    let log = app
        .cli(&support, &["delivery", "list", "--code", &id.to_string()])
        .await;
    assert_eq!(log.matches("delivered").count(), 3, "{log}");
    assert!(log.contains("code.unassigned"), "{log}");
    receiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulfilment_refunds_and_expiry_reach_the_platform_without_codes() {
    let secret = Secret::generate().expose();
    let port = free_port();
    let receiver = Receiver::start_on(port, std::slice::from_ref(&secret)).await;
    let app = TestApp::spawn_configured(
        Options::default(),
        fast_retries(json!({ "endpoints": [{
            "name": "platform", "url": Receiver::url_on(port), "secret": secret,
            "events": ["order.fulfilled", "code.revoked", "code.expired"]
        }] })),
    )
    .await;
    let sale = Sale::new("ord-events-1", "buyer@example.test", &[(Product::Kit, 2)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    let fulfilled = eventually(
        "order.fulfilled arrives",
        Duration::from_secs(30),
        || async {
            receiver
                .received()
                .into_iter()
                .find(|r| r.kind() == "order.fulfilled")
        },
    )
    .await;
    let data = &fulfilled.event["data"];
    assert_eq!(data["channel"], "native");
    assert_eq!(
        data["channel_order_id"],
        Channel::Native.channel_order_id(&sale)
    );
    let codes = data["codes"].as_array().unwrap();
    assert_eq!(codes.len(), 2);
    assert!(
        codes
            .iter()
            .all(|c| c["code_last4"].as_str().unwrap().len() == 4 && c.get("code").is_none())
    );

    assert_eq!(
        Channel::Native
            .refund_all(&app, &sale, "refund-1")
            .await
            .status(),
        200
    );
    eventually(
        "both revocations arrive",
        Duration::from_secs(30),
        || async {
            let revoked: Vec<Received> = receiver
                .received()
                .into_iter()
                .filter(|r| r.kind() == "code.revoked")
                .collect();
            (revoked.len() == 2
                && revoked.iter().all(|r| {
                    r.event["data"]["cause"] == "adjustment"
                        && r.event["data"]["state"] == "revoked"
                }))
            .then_some(())
        },
    )
    .await;

    // An expired batch code: the sweep writes code.expired.
    let batch = app.batch_codes("KIT-BASIC", 1).await;
    assert_eq!(batch.len(), 1);
    sqlx::query("UPDATE activation_code SET expires_at = now() - interval '1 day' WHERE batch_id IS NOT NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    entitle_jobs::sweep::expire(&app.pool, 100).await.unwrap();
    eventually("code.expired arrives", Duration::from_secs(30), || async {
        receiver
            .received()
            .into_iter()
            .find(|r| r.kind() == "code.expired" && r.event["data"]["state"] == "expired")
    })
    .await;
    // The endpoint hears only the types it asked for (no code.redeemed was
    // made, and none of the others is among them).
    assert!(
        receiver
            .received()
            .iter()
            .all(|r| ["order.fulfilled", "code.revoked", "code.expired"].contains(&r.kind()))
    );

    // Pruning takes delivered events with their deliveries and attempts,
    // and keeps any still pending.
    let events = app.count("SELECT count(*) FROM platform_event").await;
    sqlx::query(
        "UPDATE platform_delivery SET status = 'pending', due_at = now() + interval '1 day'
         WHERE event_id = (SELECT id FROM platform_event WHERE type = 'code.expired')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let pruned = entitle_jobs::sweep::prune(&app.pool, 0, 2).await.unwrap();
    assert_eq!(pruned["platform_events_pruned"], events - 1, "{pruned}");
    assert_eq!(app.count("SELECT count(*) FROM platform_event").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM platform_delivery").await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM platform_attempt a JOIN platform_delivery d ON d.id = a.delivery_id WHERE d.status = 'delivered'").await,
        0
    );
    receiver.stop();
}

/// The README's example receiver (Python, standard library only) verifies
/// real events: a third implementation of the signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_receiver_verifies_and_prints_each_event_once() {
    use tokio::io::AsyncBufReadExt;

    let secret = Secret::generate().expose();
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/examples/receiver.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .env("ENTITLE_EVENTS_SECRET", &secret)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs the example receiver");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: true,
        },
        fast_retries(json!({ "endpoints": [{
            "name": "example", "url": Receiver::url_on(port), "secret": secret
        }] })),
    )
    .await;
    let codes = app.batch_codes("KIT-BASIC", 2).await;
    for code in &codes {
        code_id(&app, code).await;
    }
    let mut printed = Vec::new();
    while printed.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the receiver prints each event")
            .unwrap()
            .expect("the receiver is running");
        printed.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert!(printed.iter().all(|e| e["type"] == "code.redeemed"));
    all_delivered(&app, 2).await;
    // A replay is answered 2xx but not printed again.
    let delivery: Uuid = sqlx::query_scalar("SELECT id FROM platform_delivery LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let operator = app.token(Role::Operator).await;
    act(
        &app,
        &operator,
        format!("/admin/v1/platform/deliveries/{delivery}/replay"),
        json!({ "reason": "dedupe check" }),
    )
    .await;
    all_delivered(&app, 2).await;
    let attempts = app
        .count("SELECT count(*) FROM platform_attempt WHERE status_code = 204")
        .await;
    assert_eq!(attempts, 3, "the replay was accepted");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), lines.next_line())
            .await
            .is_err(),
        "a duplicate is not printed"
    );
    child.kill().await.ok();
}

/// The queue may hand one platform job to two workers at once (a job
/// redelivered while its first run still goes). The claim moves the rows to
/// the claiming run's own token, so the fed token sends each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_jobs_for_the_same_platform_delivery_send_its_event_once() {
    let secret = Secret::generate().expose();
    let receiver = Receiver::start(std::slice::from_ref(&secret)).await;
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: false,
        },
        fast_retries(json!({ "endpoints": [{
            "name": "platform", "url": receiver.url, "secret": secret
        }] })),
    )
    .await;
    // No worker runs, so the configured endpoint is synced as a worker's
    // start would.
    entitle_jobs::platform_event::endpoint::sync_config(
        &app.pool,
        &app.ctx.keys,
        &app.ctx.config.platform.endpoints,
    )
    .await
    .unwrap();
    let codes = app.batch_codes("KIT-BASIC", 1).await;
    code_id(&app, &codes[0]).await;
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM platform_delivery WHERE status = 'pending'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(ids.len(), 1, "the redemption's event, for one endpoint");

    let (token, leased) = entitle_jobs::feed::lease_now(
        &app.pool,
        entitle_jobs::feed::Work::Platform,
        &ids,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(leased, ids);
    // Connections open beforehand, so the five runs claim at the same
    // moment rather than one by one as the pool grows.
    let warm: Vec<_> = futures::future::join_all((0..6).map(|_| app.pool.acquire()))
        .await
        .into_iter()
        .map(|connection| connection.unwrap())
        .collect();
    drop(warm);
    let runs =
        (0..5).map(|_| entitle_jobs::platform_event::deliver::send_batch(&app.ctx, token, &ids));
    let claimed: usize = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|sent| sent.expect("every run succeeds").claimed)
        .sum();

    assert_eq!(claimed, 1, "one run claimed the delivery");
    assert_eq!(receiver.received().len(), 1, "the event went once");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM platform_delivery WHERE status = 'delivered' AND attempts = 1"
        )
        .await,
        1
    );
}
