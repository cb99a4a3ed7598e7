//! The platform API's front door: redemption and the code check need a
//! platform key (not a staff token), the caller is recorded, revoked keys stop
//! working within seconds, rate limits answer 429 with `Retry-After`,
//! slow-header connections are closed, shutdown is bounded, and a flood of
//! redemptions does not slow webhook intake.

use std::time::{Duration, Instant};

use entitle_jobs::token::Role;
use entitle_tests::{
    Options, PLATFORM_KEY_NAME, TestApp,
    channels::{Channel, Product, Sale},
    eventually,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn quiet() -> Options {
    Options {
        smtp: false,
        worker: false,
    }
}

fn redeem_body(code: &str, account: &str) -> Value {
    json!({ "code": code, "account_id": account, "entity_ref": "me" })
}

/// Redemptions are claimed in group commits by one writer. A code another
/// transaction holds (a revocation, a refund, the reminder sweep) must hold
/// up only its own request: the writer gives it back after a short lock
/// timeout, and the request waits for the code on its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_held_by_another_transaction_holds_up_only_its_own_redemption() {
    let app = std::sync::Arc::new(TestApp::spawn_with(quiet()).await);
    let codes = app.batch_codes("KIT-BASIC", 3).await;
    let held_hash = app
        .ctx
        .keys
        .hash(&entitle_jobs::code::Code::parse(&codes[0]).expect("a code"));
    let mut holder = app.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM activation_code WHERE code_hash = $1 FOR UPDATE")
        .bind(&held_hash)
        .execute(&mut *holder)
        .await
        .unwrap();

    let waiting = {
        let (app, code) = (app.clone(), codes[0].clone());
        tokio::spawn(async move { app.redeem(&code, "acct_held", "me").await })
    };
    // Give the held code's claim time to reach the writer first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (n, code) in codes[1..].iter().enumerate() {
        let started = Instant::now();
        let (status, _) = app.redeem(code, &format!("acct_free_{n}"), "me").await;
        assert_eq!(status, 201);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a free code waited {:?} behind a held one",
            started.elapsed()
        );
    }
    assert!(!waiting.is_finished(), "the held code waits for its holder");

    holder.rollback().await.unwrap();
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(
        (status, answer["account_id"].as_str()),
        (201, Some("acct_held"))
    );
    assert_eq!(
        app.count("SELECT count(*) FROM activation_code WHERE state = 'redeemed'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redemption_needs_a_platform_key_and_records_the_caller() {
    let app = TestApp::spawn_with(quiet()).await;
    let codes = app.batch_codes("KIT-BASIC", 2).await;
    let body = redeem_body(&codes[0], "acct_1");

    let (status, answer) = app.platform("/v1/redemptions", None, &body).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, answer) = app
        .platform("/v1/redemptions", Some("entp_made_up"), &body)
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (401, Some("unauthorized"))
    );
    // Staff tokens of every role are authentic but of the wrong role.
    for role in [Role::Support, Role::Operator, Role::Admin] {
        let staff = app.token(role).await;
        let (status, answer) = app.platform("/v1/redemptions", Some(&staff), &body).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (403, Some("forbidden")),
            "{role:?}: {answer}"
        );
        let (status, _) = app
            .platform(
                "/v1/codes/check",
                Some(&staff),
                &json!({ "code": codes[0] }),
            )
            .await;
        assert_eq!(status, 403, "{role:?} checking");
    }
    // ... and a platform key cannot call the admin API.
    let (status, answer) = app
        .admin(
            "GET",
            "/admin/v1/orders?email=a@b.c",
            Some(&app.platform_key),
            None,
            None,
        )
        .await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        app.count("SELECT count(*) FROM assignment").await,
        0,
        "nothing was redeemed by the refused calls"
    );

    let (status, redeemed) = app.redeem(&codes[0], "acct_1", "me").await;
    assert_eq!(status, 201, "{redeemed}");
    let caller = format!("platform:{PLATFORM_KEY_NAME}");
    let (assigned_by,): (String,) = sqlx::query_as("SELECT assigned_by FROM assignment")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(assigned_by, caller);
    let (actor, data): (String, Value) =
        sqlx::query_as("SELECT actor, data FROM audit_event WHERE action = 'code.redeemed'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(actor, caller);
    assert_eq!(data["after"]["account_id"], "acct_1");
    // The platform hears of it through the outbox, in the same commit.
    let (kind, event): (String, Value) =
        sqlx::query_as("SELECT type, data FROM platform_event WHERE code_id = $1")
            .bind(uuid::Uuid::parse_str(redeemed["code_id"].as_str().unwrap()).unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(kind, "code.redeemed");
    assert_eq!(event["account_id"], "acct_1");
    assert_eq!(event["product_sku"], "KIT-BASIC");
    assert_eq!(event["code_last4"], redeemed["code_last4"]);
    assert!(
        !event.to_string().contains(&codes[0].replace('-', "")),
        "an event never carries the code"
    );

    // The same holder again: the same answer, no second assignment or event.
    let (status, again) = app.redeem(&codes[0], "acct_1", "me").await;
    assert_eq!((status, &again), (200, &redeemed));
    let (status, other) = app.redeem(&codes[0], "acct_2", "me").await;
    assert_eq!(
        (status, other["code"].as_str()),
        (409, Some("code_already_redeemed"))
    );
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM platform_event").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_listed_and_revoked_and_a_revoked_key_stops_within_seconds() {
    let app = TestApp::spawn_configured(
        quiet(),
        json!({ "gateway": { "platform_key_cache_secs": 1 } }),
    )
    .await;
    let admin = app.token(Role::Admin).await;
    let operator = app.token(Role::Operator).await;
    let create = json!({ "name": "partner-app", "reason": "partner integration" });
    let (status, _) = app
        .admin(
            "POST",
            "/admin/v1/platform-keys",
            Some(&operator),
            Some(create.clone()),
            None,
        )
        .await;
    assert_eq!(status, 403, "only admins manage keys");
    let (status, created) = app
        .admin(
            "POST",
            "/admin/v1/platform-keys",
            Some(&admin),
            Some(create.clone()),
            None,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("entp_"));
    let (status, taken) = app
        .admin(
            "POST",
            "/admin/v1/platform-keys",
            Some(&admin),
            Some(create),
            None,
        )
        .await;
    assert_eq!(
        (status, taken["code"].as_str()),
        (409, Some("platform_key_name_taken"))
    );

    let codes = app.batch_codes("KIT-BASIC", 3).await;
    let (status, _) = app
        .platform("/v1/codes/check", Some(&key), &json!({ "code": codes[0] }))
        .await;
    assert_eq!(status, 200);

    let (status, listed) = app
        .admin("GET", "/admin/v1/platform-keys", Some(&admin), None, None)
        .await;
    assert_eq!(status, 200);
    let names: Vec<&str> = listed["platform_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [PLATFORM_KEY_NAME, "partner-app"]);
    assert!(
        !listed.to_string().contains(&key),
        "a key is shown once, never listed"
    );
    assert!(
        listed["platform_keys"][1]["last_used_at"].is_string(),
        "{listed}"
    );

    let (status, revoked) = app
        .admin(
            "POST",
            "/admin/v1/platform-keys/partner-app/revoke",
            Some(&admin),
            Some(json!({ "reason": "partner offboarded" })),
            None,
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    let revoked_at = Instant::now();
    eventually(
        "the revoked key is refused",
        Duration::from_secs(5),
        || async {
            let (status, _) = app
                .platform(
                    "/v1/redemptions",
                    Some(&key),
                    &redeem_body(&codes[1], "acct"),
                )
                .await;
            (status == 401).then_some(())
        },
    )
    .await;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "revocation took {:?}, over the 1 s cache and then some",
        revoked_at.elapsed()
    );
    // The other key is unaffected.
    let (status, _) = app.redeem(&codes[2], "acct", "me").await;
    assert_eq!(status, 201);
    let audited: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, reason FROM audit_event WHERE subject_type = 'platform_key'
           AND subject_id = 'partner-app' ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        audited,
        [
            (
                "platform_key.created".to_owned(),
                "partner integration".to_owned()
            ),
            (
                "platform_key.revoked".to_owned(),
                "partner offboarded".to_owned()
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_code_check_says_what_a_code_is_without_redeeming_it() {
    let app = TestApp::spawn_with(quiet()).await;
    let codes = app.batch_codes("LIC-PRO-1Y", 3).await;

    let (status, checked) = app.check(&codes[0].to_lowercase()).await;
    assert_eq!(status, 200, "{checked}");
    assert_eq!(checked["valid"], true);
    assert_eq!(checked["state"], "issued");
    assert_eq!(checked["product_sku"], "LIC-PRO-1Y");
    assert!(checked["expires_at"].is_string());
    assert!(
        checked.get("account_id").is_none(),
        "a check never says who holds a code"
    );
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 0);

    app.redeem(&codes[0], "acct", "me").await;
    let (_, checked) = app.check(&codes[0]).await;
    assert_eq!(
        (checked["valid"].as_bool(), checked["state"].as_str()),
        (Some(false), Some("redeemed"))
    );

    sqlx::query(
        "UPDATE activation_code SET expires_at = now() - interval '1 day' WHERE last4 = $1",
    )
    .bind(&codes[1][codes[1].len() - 4..])
    .execute(&app.pool)
    .await
    .unwrap();
    let (_, checked) = app.check(&codes[1]).await;
    assert_eq!(
        (checked["valid"].as_bool(), checked["state"].as_str()),
        (Some(false), Some("expired"))
    );

    // A typo is caught by the check symbol; an unknown code is 404.
    let mut typo: Vec<char> = codes[2].chars().collect();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == 'A' { 'B' } else { 'A' };
    let typo: String = typo.into_iter().collect();
    let (status, refused) = app.check(&typo).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (422, Some("code_malformed"))
    );
    let unknown = entitle_jobs::code::Code::generate().display();
    let (status, refused) = app.check(&unknown).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (404, Some("code_not_found"))
    );
    let (status, _) = app
        .platform("/v1/codes/check", None, &json!({ "code": codes[2] }))
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_per_key_and_per_address() {
    let app = TestApp::spawn_configured(
        quiet(),
        json!({ "gateway": { "limits": { "per_key_per_second": 5, "per_address_per_second": 8 } } }),
    )
    .await;
    let codes = app.batch_codes("KIT-BASIC", 1).await;
    let check = json!({ "code": codes[0] });
    let second_key = entitle_jobs::platform_key::create(
        &app.pool,
        &app.ctx.keys,
        "second",
        "test",
        "a second caller from the same address",
    )
    .await
    .unwrap()
    .1;

    // One key: five at once are fine, then the key is over its limit.
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..8 {
        let response = app
            .platform_request("/v1/codes/check", Some(&app.platform_key), &check)
            .await;
        statuses.push(response.status().as_u16());
        if response.status() == 429 && limited.is_none() {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            limited = Some((retry_after, response.json::<Value>().await.unwrap()));
        }
    }
    assert_eq!(&statuses[..5], [200; 5], "{statuses:?}");
    let (retry_after, body) = limited.expect("the key was limited");
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(body["code"], "rate_limited");
    assert!(
        body["detail"].as_str().unwrap().contains("platform key"),
        "{body}"
    );

    // Another key from the same address: the address's allowance (8) is
    // what is left, whatever the key.
    let mut by_address = None;
    for _ in 0..8 {
        let response = app
            .platform_request("/v1/codes/check", Some(&second_key), &check)
            .await;
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
            by_address = Some(response.json::<Value>().await.unwrap());
            break;
        }
    }
    let body = by_address.expect("the address was limited");
    assert!(
        body["detail"].as_str().unwrap().contains("client address"),
        "{body}"
    );

    // Unauthenticated guessing counts against the address too.
    let (status, _) = app
        .platform("/v1/redemptions", None, &redeem_body(&codes[0], "a"))
        .await;
    assert_eq!(status, 429);

    // The allowance comes back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = app.check(&codes[0]).await;
    assert_eq!(status, 200);
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_trickles_its_headers_is_closed() {
    let app = TestApp::spawn_configured(
        quiet(),
        json!({ "gateway": { "timeouts": { "header_read_ms": 300 } } }),
    )
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"POST /v1/redemptions HTTP/1.1\r\nHost: entitle\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    // The rest of the headers never comes; the gateway hangs up.
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the connection was still open after 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    // A prompt client on another connection is served as usual.
    let response = app
        .http
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_open_requests_but_not_for_ever() {
    let app = TestApp::spawn_with(quiet()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = app.ctx.config.clone();
    config.gateway.timeouts.shutdown_grace_secs = 1;
    let ctx = entitle_jobs::Context::connect(config).await.unwrap();
    let gateway = tokio::spawn(entitle_gateway::run(ctx, listener, async {
        let _ = stopped.await;
    }));
    // A request whose body never finishes (its body timeout is 30 s).
    let mut open = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/redemptions HTTP/1.1\r\nHost: entitle\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{",
        app.platform_key
    );
    open.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    stop.send(()).unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(5), gateway).await;
    assert!(finished.is_ok(), "the gateway was still draining after 5 s");
    finished.unwrap().unwrap().unwrap();
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "shut down after {took:?}: the grace period is 1 s"
    );
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "no longer listening"
    );
}

/// Latencies at a quantile, in milliseconds.
fn quantile(mut samples: Vec<Duration>, q: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_intake_stays_fast_under_a_redemption_flood() {
    // Limits high enough that the flood really reaches the database; a
    // small pool, so that redemptions alone could hold every connection.
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: false,
        },
        json!({
            "database": { "max_connections": 4 },
            "gateway": { "limits": { "per_key_per_second": 1000000, "per_address_per_second": 1000000,
                                     "max_in_flight_platform": 256 } }
        }),
    )
    .await;
    let codes = app.batch_codes("KIT-BASIC", 200).await;

    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let redeeming = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut flood = Vec::new();
    for client in 0..64 {
        let (http, url, key) = (
            reqwest::Client::new(),
            format!("{}/v1/redemptions", app.address),
            app.platform_key.clone(),
        );
        let (flooding, served, codes, redeeming) = (
            flooding.clone(),
            served.clone(),
            codes.clone(),
            redeeming.clone(),
        );
        flood.push(tokio::spawn(async move {
            let mut n = client;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let code = &codes[n % codes.len()];
                n += 7;
                let started = Instant::now();
                let sent = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({ "code": code, "account_id": format!("acct_{client}"), "entity_ref": "me" }))
                    .send()
                    .await;
                if sent.is_ok() {
                    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    redeeming.lock().unwrap().push(started.elapsed());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = served.load(std::sync::atomic::Ordering::Relaxed);

    let mut latencies = Vec::new();
    for n in 0..150 {
        let sale = Sale::new(
            &format!("flood-{n}"),
            &format!("buyer{n}@example.com"),
            &[(Product::Kit, 1)],
        );
        let started = Instant::now();
        let response = Channel::Native.purchase(&app, &sale).await;
        latencies.push(started.elapsed());
        assert_eq!(response.status(), 200, "webhook {n} was refused");
    }
    let during = served.load(std::sync::atomic::Ordering::Relaxed) - before;
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    for client in flood {
        client.await.unwrap();
    }
    let (p50, p99) = (quantile(latencies.clone(), 0.5), quantile(latencies, 0.99));
    let redeemed = redeeming.lock().unwrap().clone();
    let (redemption_p50, redemption_p99) =
        (quantile(redeemed.clone(), 0.5), quantile(redeemed, 0.99));
    println!(
        "intake under a flood of {during} redemptions (theirs: p50 {redemption_p50:.1} ms, \
         p99 {redemption_p99:.1} ms): p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    assert!(
        during > 300,
        "the flood was real: {during} redemptions meanwhile"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox").await,
        150,
        "every webhook was filed"
    );
    // Intake has connections of its own: without them, each webhook waited
    // in the pool's queue behind the redemptions, as long as they did. The
    // bounds are relative, so that they hold on a slow or busy machine too.
    assert!(
        p50 < redemption_p50 / 3.0 && p99 < redemption_p99,
        "intake p50 {p50:.1} ms, p99 {p99:.1} ms under the flood; \
         redemptions' p50 {redemption_p50:.1} ms, p99 {redemption_p99:.1} ms"
    );
}

/// Redemptions in flight together share a commit, and each code still goes
/// to exactly one holder: of three requests for one code at once (twice the
/// same holder, once another), one redeems, the same holder's other gets the
/// same redemption, and the other holder is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redemptions_share_commits_and_each_code_goes_to_one_holder() {
    // All 120 requests in flight at once.
    let app = TestApp::spawn_configured(
        quiet(),
        json!({ "gateway": { "limits": { "max_in_flight_platform": 256 } } }),
    )
    .await;
    let codes = app.batch_codes("KIT-BASIC", 40).await;
    let requests = codes.iter().enumerate().flat_map(|(i, code)| {
        [
            format!("acct_{i}"),
            format!("acct_{i}"),
            format!("other_{i}"),
        ]
        .into_iter()
        .map(move |account| (i, code.clone(), account))
    });
    let answers = futures::future::join_all(requests.map(|(i, code, account)| {
        let app = &app;
        async move {
            let (status, body) = app.redeem(&code, &account, "me").await;
            (i, account, status, body)
        }
    }))
    .await;
    for i in 0..codes.len() {
        let of_code: Vec<_> = answers.iter().filter(|a| a.0 == i).collect();
        let new: Vec<_> = of_code.iter().filter(|a| a.2 == 201).collect();
        assert_eq!(new.len(), 1, "code {i}: {of_code:?}");
        let winner = &new[0].1;
        for (_, account, status, body) in &of_code {
            if account == winner {
                assert!(
                    *status == 201 || *status == 200,
                    "{account}: {status} {body}"
                );
                assert_eq!(body["account_id"], winner.as_str());
            } else {
                assert_eq!(
                    (*status, body["code"].as_str()),
                    (409, Some("code_already_redeemed")),
                    "{account}"
                );
            }
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM assignment").await, 40);
    assert_eq!(app.count("SELECT count(*) FROM platform_event").await, 40);
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'code.redeemed'")
            .await,
        40
    );
    let commits = app
        .count("SELECT count(DISTINCT xmin::text) FROM assignment")
        .await;
    assert!(
        commits < 40,
        "40 redemptions took {commits} commits: none shared one"
    );
}
