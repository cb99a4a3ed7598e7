//! The support console in real Chromium: signing in and out, refusals
//! (wrong password, missing CSRF token, a role too low, too many attempts),
//! the Staff page's audited actions, and sessions that end when a member is
//! disabled or idle. Plus the session store, cookie attributes and SSO over
//! plain HTTP.

use entitle_gateway::console::{members, session_store::PgSessionStore};
use entitle_jobs::token::Role;
use entitle_tests::{Options, TestApp, browser::Browser};
use serde_json::json;
use tower_sessions::{
    SessionStore,
    cookie::time::{Duration, OffsetDateTime},
    session::{Id, Record},
};

async fn staff(app: &TestApp, name: &str, role: Role) -> (String, String) {
    entitle_tests::browser::staff_member(&app.pool, name, role).await
}

/// Work waiting, open findings and a finished reconciliation run, as the
/// dashboard should show them (the worker is off, so nothing moves).
async fn seed_dashboard(app: &TestApp) {
    sqlx::raw_sql(
        "INSERT INTO webhook_inbox (id, channel, event_id, event_type, body, received_at)
         VALUES (gen_random_uuid(), 'stripe', 'evt_1', 'checkout.session.completed', '{}',
                 now() - interval '5 minutes'),
                (gen_random_uuid(), 'stripe', 'evt_2', 'checkout.session.completed', '{}', now());
         INSERT INTO reconciliation_finding (id, kind, detail, dedupe_key)
         VALUES (gen_random_uuid(), 'refunded_but_redeemed', 'refund after redemption', 'f1'),
                (gen_random_uuid(), 'refunded_but_redeemed', 'refund after redemption', 'f2'),
                (gen_random_uuid(), 'orphan_payment', 'paid, no order', 'f3');
         INSERT INTO reconciliation_run (id, channel, window_start, window_end, trigger, status,
                                         started_at, finished_at, duration_ms, channel_records,
                                         entitle_orders)
         VALUES (gen_random_uuid(), 'stripe', now() - interval '2 hours', now() - interval '1 hour',
                 'schedule', 'finished', now() - interval '3 minutes', now() - interval '3 minutes',
                 812, 120, 119);",
    )
    .execute(&app.pool)
    .await
    .expect("the dashboard's rows are seeded");
}

async fn console_app() -> TestApp {
    // The console needs neither the worker nor email.
    TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: false,
        },
        json!({ "console": { "secure_cookies": "never" } }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_signs_in_and_sees_the_dashboard() {
    let app = console_app().await;
    let (email, password) = staff(&app, "alice", Role::Admin).await;
    seed_dashboard(&app).await;
    let browser = Browser::start(&app.address).await;

    browser.goto("/console").await;
    assert_eq!(
        browser.path().await,
        "/console/sign-in",
        "signed out, sent to sign in"
    );
    browser.screenshot("console-sign-in").await;
    browser.sign_in(&email, &password).await;

    let text = browser.wait_for_text("Dashboard").await;
    assert_eq!(browser.path().await, "/console");
    for expected in [
        "Webhook events waiting\n2\nOldest received 5 min ago",
        "refunded_but_redeemed 2",
        "orphan_payment 1",
        "Open findings (3)",
        "stripe",
        "finished",
        "Emails waiting",
        "Codes today",
        "Open findings",
        "Last reconciliation run",
        "alice",
        "Staff",
    ] {
        assert!(
            text.contains(expected),
            "the dashboard shows {expected:?}:\n{text}"
        );
    }
    browser.screenshot("console-dashboard").await;
    let signed_in: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_sign_in_at FROM staff_member WHERE name = 'alice'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(signed_in.is_some(), "the sign-in is noted");

    browser.fill("#q", "nobody@example.com").await;
    browser.click("form.search button").await;
    browser.wait_for_text("No orders match").await;
    assert_eq!(browser.path().await, "/console/search");

    browser.click(".who button").await;
    browser.wait_for_text("Sign in").await;
    assert_eq!(browser.path().await, "/console/sign-in");
    browser.goto("/console").await;
    assert_eq!(
        browser.path().await,
        "/console/sign-in",
        "signed out for good"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_without_saying_whether_the_email_exists() {
    let app = console_app().await;
    let (email, _) = staff(&app, "bob", Role::Support).await;
    let browser = Browser::start(&app.address).await;

    browser.sign_in(&email, "not-the-password-at-all").await;
    let wrong_password = browser.wait_for_text("do not match").await;
    assert_eq!(browser.path().await, "/console/sign-in");
    browser.screenshot("console-sign-in-refused").await;

    browser
        .sign_in("nobody@staff.test", "not-the-password-at-all")
        .await;
    let unknown_email = browser.wait_for_text("do not match").await;
    let message = |text: &str| {
        text.lines()
            .find(|l| l.contains("do not match"))
            .unwrap()
            .to_owned()
    };
    assert_eq!(message(&wrong_password), message(&unknown_email));

    browser.goto("/console").await;
    assert_eq!(browser.path().await, "/console/sign-in", "still signed out");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_posted_without_its_csrf_token_is_refused_with_403() {
    let app = console_app().await;
    let (email, password) = staff(&app, "carol", Role::Admin).await;
    let browser = Browser::start(&app.address).await;
    browser.sign_in(&email, &password).await;
    browser.wait_for_text("Dashboard").await;

    browser.goto("/console/staff").await;
    browser.fill("#invite-name", "mallory").await;
    browser.fill("#invite-email", "mallory@staff.test").await;
    browser.fill("#invite-reason", "forged").await;
    browser
        .script(
            "document.querySelectorAll('form.stacked input[name=csrf_token]')
                 .forEach(e => e.remove())",
        )
        .await;
    browser.click("form.stacked button[type=submit]").await;
    let text = browser.wait_for_text("csrf_invalid").await;
    assert!(text.contains("403"), "{text}");
    browser.screenshot("console-csrf-refused").await;
    assert_eq!(
        app.count("SELECT count(*) FROM staff_member WHERE name = 'mallory'")
            .await,
        0,
        "nothing was done"
    );

    // A token from another session is as bad as none.
    browser.goto("/console/staff").await;
    browser.fill("#invite-name", "mallory").await;
    browser.fill("#invite-email", "mallory@staff.test").await;
    browser.fill("#invite-reason", "forged").await;
    browser
        .script(
            "document.querySelector('form.stacked input[name=csrf_token]').value = 'a'.repeat(64)",
        )
        .await;
    browser.click("form.stacked button[type=submit]").await;
    browser.wait_for_text("csrf_invalid").await;

    // Signing out is a form too.
    browser.goto("/console").await;
    browser
        .script("document.querySelector('.who input[name=csrf_token]').remove()")
        .await;
    browser.click(".who button").await;
    browser.wait_for_text("csrf_invalid").await;
    browser.goto("/console").await;
    assert_eq!(browser.path().await, "/console", "still signed in");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_support_member_can_neither_see_nor_use_the_staff_page() {
    let app = console_app().await;
    let (email, password) = staff(&app, "dave", Role::Support).await;
    let browser = Browser::start(&app.address).await;
    browser.sign_in(&email, &password).await;
    let dashboard = browser.wait_for_text("Dashboard").await;
    let nav: String = browser
        .script("return document.querySelector('nav.main-nav').innerText")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(nav.contains("Failed work"), "{nav}");
    assert!(!nav.contains("Staff"), "no Staff link for support: {nav}");
    assert!(dashboard.contains("dave"));

    browser.goto("/console/staff").await;
    let text = browser.wait_for_text("Not allowed").await;
    assert!(text.contains("admin role"), "{text}");
    browser.screenshot("console-staff-forbidden").await;

    // Posting the invite form anyway, with a valid CSRF token, is refused.
    browser.goto("/console").await;
    browser
        .script(
            "const token = document.querySelector('.who input[name=csrf_token]').value;
             const form = document.createElement('form');
             form.method = 'post'; form.action = '/console/staff';
             for (const [k, v] of Object.entries({csrf_token: token, name: 'eve',
                 email: 'eve@staff.test', role: 'admin', reason: 'self-promotion'})) {
               const input = document.createElement('input');
               input.type = 'hidden'; input.name = k; input.value = v; form.appendChild(input);
             }
             document.body.appendChild(form); form.submit();",
        )
        .await;
    let text = browser.wait_for_text("Not allowed").await;
    assert!(text.contains("forbidden"), "{text}");
    assert_eq!(
        app.count("SELECT count(*) FROM staff_member WHERE name = 'eve'")
            .await,
        0
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_invites_and_disables_a_member_and_the_audit_log_names_the_admin() {
    let app = console_app().await;
    let (email, password) = staff(&app, "erin", Role::Admin).await;
    let browser = Browser::start(&app.address).await;
    browser.sign_in(&email, &password).await;
    browser.wait_for_text("Dashboard").await;

    browser.click("nav a[href='/console/staff']").await;
    browser.wait_for_text("Invite a staff member").await;
    browser.fill("#invite-name", "frank").await;
    browser.fill("#invite-email", "Frank@Staff.test").await;
    browser
        .find("#invite-role option[value=operator]")
        .await
        .click()
        .await
        .unwrap();
    browser.fill("#invite-reason", "new operations hire").await;
    browser.screenshot("console-staff").await;
    browser.click("form.stacked button[type=submit]").await;
    browser.wait_for_text("frank is invited").await;
    let one_time = browser
        .find("#one-time-password")
        .await
        .prop("value")
        .await
        .unwrap()
        .expect("the password is shown");
    assert!(one_time.len() >= 20, "{one_time}");
    browser.screenshot("console-staff-invited").await;

    let (actor, reason, data): (String, Option<String>, serde_json::Value) = sqlx::query_as(
        "SELECT actor, reason, data FROM audit_event
         WHERE action = 'staff.created' AND subject_id = 'frank'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("one staff.created event");
    assert_eq!(actor, "erin", "the admin's name is the actor");
    assert_eq!(reason.as_deref(), Some("new operations hire"));
    assert_eq!(data["after"]["role"], "operator");

    // The one-time password works (email in any case).
    let frank = Browser::start(&app.address).await;
    frank.sign_in("frank@staff.test", &one_time).await;
    frank.wait_for_text("Dashboard").await;

    // Disable frank from the Staff page: his session ends at once.
    browser.goto("/console/staff").await;
    let row = "//tr[th[contains(., 'frank')]]";
    browser
        .client
        .find(fantoccini::Locator::XPath(&format!("{row}//summary")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .client
        .find(fantoccini::Locator::XPath(&format!(
            "{row}//form[contains(@action, '/enabled')]//input[@name='reason']"
        )))
        .await
        .unwrap()
        .send_keys("left the team")
        .await
        .unwrap();
    browser
        .client
        .find(fantoccini::Locator::XPath(&format!(
            "{row}//form[contains(@action, '/enabled')]//button"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_for_text("frank is disabled and signed out")
        .await;
    browser.screenshot("console-staff-disabled").await;
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM audit_event WHERE action = 'staff.disabled' AND subject_id = 'frank'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(actor, "erin");

    frank.goto("/console").await;
    assert_eq!(frank.path().await, "/console/sign-in");
    frank.sign_in("frank@staff.test", &one_time).await;
    frank.wait_for_text("do not match").await;
    frank.close().await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sign_in_attempts_are_answered_429() {
    let app = TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: false,
        },
        json!({ "console": {
            "secure_cookies": "never",
            "sign_in_per_minute_per_email": 3,
            "sign_in_per_minute_per_address": 100
        } }),
    )
    .await;
    let (email, password) = staff(&app, "gina", Role::Support).await;
    let browser = Browser::start(&app.address).await;
    for _ in 0..3 {
        browser.sign_in(&email, "guessing-wrongly-1234").await;
        browser.wait_for_text("do not match").await;
    }
    // The fourth attempt is refused even with the right password.
    browser.sign_in(&email, &password).await;
    let text = browser.wait_for_text("Too many sign-in attempts").await;
    assert!(text.contains("429"), "{text}");
    browser.screenshot("console-sign-in-rate-limited").await;
    browser.goto("/console").await;
    assert_eq!(browser.path().await, "/console/sign-in");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_or_idle_members_session_stops_working() {
    let app = console_app().await;
    let (email, password) = staff(&app, "hana", Role::Operator).await;
    let browser = Browser::start(&app.address).await;
    browser.sign_in(&email, &password).await;
    browser.wait_for_text("Dashboard").await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM console_session s JOIN staff_member m ON m.id = s.staff_id
             WHERE m.name = 'hana'"
        )
        .await,
        1
    );

    // Idle past the timeout: the session is over.
    sqlx::query("UPDATE console_session SET expires_at = now() - interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    browser.goto("/console").await;
    assert_eq!(browser.path().await, "/console/sign-in");

    browser.sign_in(&email, &password).await;
    browser.wait_for_text("Dashboard").await;
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM staff_member WHERE name = 'hana'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    members::set_enabled(&app.pool, id, false, "an-admin", "left the team")
        .await
        .unwrap();
    assert_eq!(
        app.count("SELECT count(*) FROM console_session WHERE staff_id IS NOT NULL")
            .await,
        0,
        "disabling deletes the sessions"
    );
    browser.goto("/console/search?q=x").await;
    assert_eq!(browser.path().await, "/console/sign-in");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_round_trip_through_postgres_and_a_deleted_one_stays_deleted() {
    let app = console_app().await;
    let store = PgSessionStore::new(app.pool.clone());
    let mut record = Record {
        id: Id::default(),
        data: [("csrf_token".to_owned(), json!("t"))]
            .into_iter()
            .collect(),
        expiry_date: OffsetDateTime::now_utc() + Duration::minutes(30),
    };
    store.create(&mut record).await.unwrap();
    let loaded = store.load(&record.id).await.unwrap().expect("loaded");
    assert_eq!(loaded.data, record.data);
    assert_eq!(
        loaded.expiry_date.unix_timestamp(),
        record.expiry_date.unix_timestamp()
    );
    let stored_ids: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id_hash FROM console_session")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(
        !stored_ids
            .iter()
            .any(|h| h == record.id.to_string().as_bytes()),
        "only a hash of the id is stored"
    );

    record.data.insert("k".to_owned(), json!(1));
    store.save(&record).await.unwrap();
    assert_eq!(store.load(&record.id).await.unwrap().unwrap().data["k"], 1);

    store.delete(&record.id).await.unwrap();
    assert!(store.load(&record.id).await.unwrap().is_none());
    store.save(&record).await.unwrap();
    assert!(
        store.load(&record.id).await.unwrap().is_none(),
        "a save after a delete does not bring the session back"
    );

    let mut expired = Record {
        id: Id::default(),
        data: Default::default(),
        expiry_date: OffsetDateTime::now_utc() - Duration::seconds(1),
    };
    store.create(&mut expired).await.unwrap();
    assert!(store.load(&expired.id).await.unwrap().is_none());
    assert_eq!(store.delete_expired().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_http_only_lax_and_secure_when_the_request_came_over_tls() {
    let app = TestApp::spawn_with(Options {
        smtp: false,
        worker: false,
    })
    .await;
    let cookie = |headers: &reqwest::header::HeaderMap| {
        headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .find(|c| c.starts_with("entitle_console="))
            .expect("the session cookie is set")
    };
    let url = format!("{}/console/sign-in", app.address);
    let plain = app.http.get(&url).send().await.unwrap();
    let plain = cookie(plain.headers());
    assert!(plain.contains("HttpOnly"), "{plain}");
    assert!(plain.contains("SameSite=Lax"), "{plain}");
    assert!(plain.contains("Path=/console"), "{plain}");
    assert!(!plain.contains("Secure"), "plain HTTP: {plain}");
    let tls = app
        .http
        .get(&url)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let tls = cookie(tls.headers());
    assert!(tls.contains("; Secure"), "over TLS: {tls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sso_header_signs_in_an_enabled_member_only_when_configured() {
    let options = Options {
        smtp: false,
        worker: false,
    };
    let off = TestApp::spawn_with(options).await;
    staff(&off, "ivan", Role::Support).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/console", off.address))
        .header("x-forwarded-email", "ivan@staff.test")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        303,
        "off by default: the header is ignored"
    );

    let on = TestApp::spawn_configured(
        options,
        json!({ "console": { "sso_header": "X-Forwarded-Email" } }),
    )
    .await;
    staff(&on, "ivan", Role::Support).await;
    let response = client
        .get(format!("{}/console", on.address))
        .header("x-forwarded-email", "IVAN@staff.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("ivan"));
    let response = client
        .get(format!("{}/console", on.address))
        .header("x-forwarded-email", "stranger@staff.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-entitle-code"], "no_staff_account");
}
