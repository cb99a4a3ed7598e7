//! The support console's jobs in real Chromium, against the real gateway,
//! worker, Postgres and SMTP: trace an order from a buyer's email and revoke
//! a code (refused at redemption afterwards, with the refusal and the audit
//! entry on the code's page); a double-submitted revoke acts once; support
//! sees no operator actions and cannot post one; a finding resolved with a
//! reason; a batch of five downloaded once; a failed event retried after
//! its product is mapped; an order of 2,000 codes a page at a time.

use entitle_jobs::token::Role;
use entitle_tests::{
    TestApp,
    browser::{Browser, staff_member},
    channels::{Channel, Product, Sale},
};
use serde_json::json;
use uuid::Uuid;

async fn app() -> TestApp {
    TestApp::spawn_configured(
        Default::default(),
        json!({ "console": { "secure_cookies": "never" } }),
    )
    .await
}

/// A browser signed in as a new member of `role`.
async fn signed_in(app: &TestApp, name: &str, role: Role) -> Browser {
    let (email, password) = staff_member(&app.pool, name, role).await;
    let browser = Browser::start(&app.address).await;
    browser.sign_in(&email, &password).await;
    browser.wait_for_text("Dashboard").await;
    browser
}

/// Places a native order and waits for its email; returns the codes.
async fn order(app: &TestApp, name: &str, units: u32) -> Vec<String> {
    let sale = Sale::new(
        name,
        &format!("{name}@example.com"),
        &[(Product::Kit, units)],
    );
    assert_eq!(Channel::Native.purchase(app, &sale).await.status(), 200);
    app.mails(1).await[0].codes()
}

async fn code_id(app: &TestApp, unit: i32) -> Uuid {
    sqlx::query_scalar("SELECT id FROM activation_code WHERE unit_index = $1")
        .bind(unit)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// Fills an action form's reason and ticks its confirmation.
async fn confirm(browser: &Browser, id: &str, reason: &str) {
    browser.fill(&format!("#{id}-reason"), reason).await;
    browser.click(&format!("#{id}-confirm")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn support_traces_an_order_and_a_revoked_code_is_refused_with_its_story_on_the_page() {
    let app = app().await;
    let codes = order(&app, "sam", 2).await;
    let browser = signed_in(&app, "olga", Role::Operator).await;

    browser.fill("#q", "sam@example.com").await;
    browser.click("form.search button").await;
    browser.wait_for_text("1 order").await;
    browser.click("main table a").await;
    let text = browser.wait_for_text("Lines").await;
    assert!(browser.path().await.starts_with("/console/orders/"));
    for expected in [
        "sam@example.com",
        "native",
        "order_codes",
        "sent",
        "Timeline",
    ] {
        assert!(
            text.contains(expected),
            "the order page shows {expected:?}:\n{text}"
        );
    }
    browser.screenshot("console-order").await;

    let first = code_id(&app, 0).await;
    browser
        .click(&format!("a[href='/console/codes/{first}']"))
        .await;
    browser.wait_for_text("Refused redemptions").await;
    confirm(&browser, "revoke", "fraud reported by the buyer").await;
    browser.click("form[action$='/revoke'] button").await;
    let text = browser.wait_for_text("The code was revoked.").await;
    assert!(text.contains("revoked"));

    let (status, answer) = app.redeem(&codes[0], "acct_thief", "someone").await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (410, Some("code_revoked"))
    );

    browser.goto(&format!("/console/codes/{first}")).await;
    let text = browser.wait_for_text("code_revoked").await;
    assert!(
        text.contains("acct_thief"),
        "the refused attempt names the account:\n{text}"
    );
    assert!(
        text.contains("code.revoked")
            && text.contains("olga")
            && text.contains("fraud reported by the buyer"),
        "the history has the revocation with actor and reason:\n{text}"
    );
    browser.screenshot("console-code").await;

    // A code pasted into the header's box opens its page, never a URL
    // holding it.
    let second = code_id(&app, 1).await;
    browser.fill("#q", &codes[1]).await;
    browser.click("form.search button").await;
    browser.wait_for_text("Refused redemptions").await;
    assert_eq!(browser.path().await, format!("/console/codes/{second}"));
    let url = browser.client.current_url().await.unwrap().to_string();
    assert!(!url.contains(&codes[1][..4]), "{url}");

    // A double-submitted revoke acts once.
    browser.goto(&format!("/console/codes/{second}")).await;
    browser.wait_for_text("Refused redemptions").await;
    confirm(&browser, "revoke", "duplicate order").await;
    let answers = browser.post_form("form[action$='/revoke']", 2).await;
    assert!(
        answers.iter().all(|(status, _, _)| *status == 200),
        "both posts end on the code's page: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(
        answers[1].2.contains("already sent"),
        "the second post says it acted already"
    );
    let revocations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_event WHERE action = 'code.revoked' AND subject_id = $1",
    )
    .bind(second.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(revocations, 1, "one revocation for two posts");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_support_member_sees_no_operator_actions_and_posting_one_is_refused() {
    let app = app().await;
    order(&app, "tess", 1).await;
    let browser = signed_in(&app, "sue", Role::Support).await;
    let code = code_id(&app, 0).await;
    browser.goto(&format!("/console/codes/{code}")).await;
    let text = browser.wait_for_text("Refused redemptions").await;
    for operator_only in ["Revoke the code", "Reissue", "Change expiry"] {
        assert!(
            !text.contains(operator_only),
            "support sees no {operator_only:?}"
        );
    }
    browser.screenshot("console-code-support").await;
    // The sign-out form holds this session's CSRF token; forge a revoke.
    let answer = browser
        .script(&format!(
            "const token = document.querySelector('input[name=csrf_token]').value;
             const xhr = new XMLHttpRequest();
             xhr.open('POST', '/console/codes/{code}/revoke', false);
             xhr.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');
             xhr.send('csrf_token=' + token + '&reason=forged&confirm=yes');
             return [xhr.status, xhr.getResponseHeader('x-entitle-code')];"
        ))
        .await;
    assert_eq!(answer, json!([403, "forbidden"]));
    let state: String = sqlx::query_scalar("SELECT state FROM activation_code WHERE id = $1")
        .bind(code)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(state, "issued", "nothing changed");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciliation_report_lists_a_seeded_finding_and_it_is_resolved_with_a_reason() {
    let app = app().await;
    let finding: Uuid = sqlx::query_scalar(
        "INSERT INTO reconciliation_finding (id, kind, detail, dedupe_key, channel, channel_reference)
         VALUES (gen_random_uuid(), 'fulfilled_not_paid', 'the channel says unpaid', 'seeded',
                 'stripe', 'cs_test_seeded') RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let browser = signed_in(&app, "opal", Role::Operator).await;
    browser.click("nav a[href='/console/reconciliation']").await;
    let text = browser.wait_for_text("the channel says unpaid").await;
    assert!(
        text.contains("fulfilled_not_paid") && text.contains("Decide"),
        "{text}"
    );
    browser.screenshot("console-reconciliation").await;
    browser.click("main details summary").await;
    confirm(
        &browser,
        &format!("resolve-{finding}"),
        "paid by bank transfer",
    )
    .await;
    browser
        .click(&format!(
            "form[action='/console/findings/{finding}/resolve'] button"
        ))
        .await;
    browser.wait_for_text("The finding was resolved.").await;
    let (status, by, reason): (String, String, String) = sqlx::query_as(
        "SELECT status, resolved_by, resolution_reason FROM reconciliation_finding WHERE id = $1",
    )
    .bind(finding)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), by.as_str(), reason.as_str()),
        ("resolved", "opal", "paid by bank transfer")
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_five_is_created_and_its_csv_downloaded_by_its_holder() {
    let app = app().await;
    let browser = signed_in(&app, "bea", Role::Operator).await;
    browser.click("nav a[href='/console/batches']").await;
    browser.wait_for_text("Create codes outside checkout").await;
    browser.fill("#b-quantity", "5").await;
    browser.fill("#b-account", "acct_partner").await;
    confirm(&browser, "batch", "partner launch kit").await;
    browser
        .click("form[action='/console/batches'] button")
        .await;
    browser.wait_for_text("The batch was created.").await;
    browser.screenshot("console-batch").await;
    assert_eq!(app.count("SELECT count(*) FROM activation_code").await, 5);

    confirm(&browser, "export", "to the partner").await;
    // A double click: the same form twice gets the same file twice.
    let answers = browser.post_form("form[action$='/export']", 2).await;
    let (status, _, csv) = &answers[0];
    assert_eq!(*status, 200);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "a header and five codes:\n{csv}");
    for line in &lines[1..] {
        let code = line.split(',').next().unwrap();
        assert!(
            entitle_jobs::code::Code::parse(code).is_ok(),
            "{code} is a whole code"
        );
    }
    assert_eq!(
        (answers[1].0, &answers[1].2),
        (200, csv),
        "the same form again"
    );
    // The same member again within the window (a download that broke
    // off): the same file; every download is audited.
    browser
        .script("document.querySelector('form[action$=\"/export\"] input[name=form_key]').value = crypto.randomUUID();")
        .await;
    let again = browser.post_form("form[action$='/export']", 1).await;
    assert_eq!((again[0].0, &again[0].2), (200, csv), "downloaded again");
    assert_eq!(
        app.count("SELECT count(*) FROM audit_event WHERE action = 'batch.exported'")
            .await,
        3
    );
    browser.goto(browser.path().await.as_str()).await;
    let text = browser.wait_for_text("downloaded").await;
    assert!(text.contains("bea"), "who downloaded it:\n{text}");
    // The holder is offered the file again, within the window.
    assert!(
        text.contains("Download the codes again") && text.contains("download it again until"),
        "the holder may download again:\n{text}"
    );
    browser.screenshot("console-batch-download-again").await;

    // Governance: the codes report counts them by origin and state.
    browser.click("nav a[href='/console/codes-report']").await;
    let text = browser.wait_for_text("batch: customer_service").await;
    assert!(
        text.contains("batch: customer_service 5 0 0 0 0 5"),
        "five issued codes from a customer-service batch:\n{text}"
    );
    browser.screenshot("console-codes-report").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_event_is_retried_from_the_console_after_its_product_is_mapped() {
    let app = app().await;
    let sale = Sale::new("newthing", "nina@example.com", &[(Product::Unmapped, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    app.wait_count(
        "SELECT count(*) FROM webhook_inbox WHERE status = 'failed'",
        1,
    )
    .await;
    let browser = signed_in(&app, "otto", Role::Operator).await;
    browser.click("nav a[href='/console/failed']").await;
    let text = browser.wait_for_text("unknown_product").await;
    assert!(text.contains("purchase.paid"), "{text}");
    browser.screenshot("console-failed").await;

    entitle_tests::channels::map_unmapped_product(&app, Channel::Native).await;

    let event: Uuid = sqlx::query_scalar("SELECT id FROM webhook_inbox")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    browser.click("main table details summary").await;
    confirm(&browser, &format!("retry-{event}"), "BUNDLE-NEW mapped").await;
    browser
        .click(&format!(
            "form[action='/console/events/{event}/retry'] button"
        ))
        .await;
    browser.wait_for_text("The event was queued again.").await;
    let mails = app.mails(1).await;
    assert_eq!(mails[0].codes().len(), 1, "the order is fulfilled");
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM audit_event WHERE action = 'event.retried' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(actor, "otto");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_of_two_thousand_codes_is_shown_a_page_at_a_time() {
    let app = app().await;
    let sale = Sale::new("bulk", "bulk@example.com", &[(Product::Kit, 2000)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    app.wait_count("SELECT count(*) FROM activation_code", 2000)
        .await;
    let order: Uuid = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let browser = signed_in(&app, "paz", Role::Support).await;
    let started = std::time::Instant::now();
    browser.goto(&format!("/console/orders/{order}")).await;
    let text = browser.wait_for_text("of 2000").await;
    println!(
        "the order page of 2,000 codes took {:?} (debug build)",
        started.elapsed()
    );
    assert!(
        text.contains("1–100 of 2000") && text.contains("Page 1 of 20"),
        "{text}"
    );
    let rows = browser
        .script("return document.querySelectorAll('#codes ~ table')[0].querySelectorAll('tbody tr').length;")
        .await;
    assert_eq!(rows, json!(100), "one page of codes");
    browser
        .goto(&format!("/console/orders/{order}?page=20"))
        .await;
    browser.wait_for_text("1901–2000 of 2000").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_double_submitted_invitation_creates_the_member_once() {
    let app = app().await;
    let browser = signed_in(&app, "ada", Role::Admin).await;
    browser.click("nav a[href='/console/staff']").await;
    browser.wait_for_text("Invite").await;
    browser.fill("#invite-name", "nell").await;
    browser.fill("#invite-email", "nell@staff.test").await;
    browser.fill("#invite-reason", "joined support").await;
    let answers = browser.post_form("form[action='/console/staff']", 2).await;
    assert_eq!(answers[0].0, 200, "the first creates the member");
    assert_eq!(
        (answers[1].0, answers[1].1.as_str()),
        (409, "already_invited"),
        "the second says so, and creates nothing"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM staff_member WHERE email = 'nell@staff.test'")
            .await,
        1
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM audit_event WHERE action = 'staff.created' AND actor = 'ada'"
        )
        .await,
        1
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_link_in_a_code_email_opens_the_redeem_page_with_the_code_and_redeems_it() {
    let app = TestApp::spawn_configured(
        Default::default(),
        json!({ "email": { "redeem_url": "https://shop.test/redeem#code={code}" } }),
    )
    .await;
    let codes = order(&app, "lena", 1).await;
    let mail = &app.mails(1).await[0];
    let link = mail
        .text()
        .split_whitespace()
        .find(|w| w.starts_with("https://shop.test/redeem#code="))
        .map(str::to_owned)
        .expect("the email links to the redeem page");
    assert_eq!(
        link,
        format!("https://shop.test/redeem#code={}", codes[0]),
        "in the fragment"
    );

    // The demo's page, where the link would point on a local run.
    let browser = Browser::start(&app.address).await;
    browser.goto(&link.replace("https://shop.test", "")).await;
    browser.wait_for_text("Redeem a code").await;
    let filled = browser
        .script("return document.getElementById('code').value;")
        .await;
    assert_eq!(
        filled,
        json!(codes[0]),
        "the page took the code from the link"
    );
    browser.fill("#account", "acct_lena").await;
    browser.fill("#entity", "Lena").await;
    browser.screenshot("redeem-page").await;
    browser.click("form button").await;
    let text = browser.wait_for_text("Redeemed").await;
    assert!(
        text.contains("Basic test kit") && text.contains("Lena"),
        "{text}"
    );
    let (state, account): (String, String) = sqlx::query_as(
        "SELECT c.state, a.account_id FROM activation_code c JOIN assignment a ON a.code_id = c.id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), account.as_str()),
        ("redeemed", "acct_lena")
    );

    // The same code again, for someone else: refused, and said so.
    browser.goto("/redeem").await;
    browser.fill("#code", &codes[0]).await;
    browser.fill("#account", "acct_other").await;
    browser.fill("#entity", "Other").await;
    browser.click("form button").await;
    browser.wait_for_text("already redeemed").await;
    browser.close().await;
}
