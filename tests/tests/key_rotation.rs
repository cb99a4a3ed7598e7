//! Rotating the code-sealing key: with the old key in
//! `codes.previous_seal_keys`, new codes are sealed with the new key, old
//! codes (and endpoint secrets) still open, and `reseal` moves every one to
//! the new key, after which the old key opens nothing.

use std::time::Duration;

use base64::Engine as _;
use entitle_jobs::{Context, code::CodeKeys, token::Role};
use entitle_tests::{
    Options, TestApp,
    channels::{Channel, Product, Sale},
    eventually,
    receiver::Receiver,
    smtp::free_port,
};
use secrecy::SecretString;
use serde_json::{Value, json};

/// A process of its own (gateway and worker) on `ctx`, stopped on drop.
struct Process {
    address: String,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Process {
    async fn start(ctx: &Context) -> Process {
        let (stop, _) = tokio::sync::watch::channel(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let stopped = |stop: &tokio::sync::watch::Sender<bool>| {
            let mut rx = stop.subscribe();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        tokio::spawn(entitle_gateway::run(ctx.clone(), listener, stopped(&stop)));
        tokio::spawn(entitle_worker::run(ctx.clone(), stopped(&stop)));
        Process { address, stop }
    }

    async fn call(&self, http: &reqwest::Client, token: &str, path: &str, body: Value) -> Value {
        let answer = http
            .post(format!("{}{path}", self.address))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = answer.status();
        let text = answer.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn sealed_codes(app: &TestApp) -> Vec<Vec<u8>> {
    sqlx::query_scalar("SELECT code_sealed FROM activation_code")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sealing_key_rotates_without_losing_a_code() {
    let old_key = [7u8; 32];
    let encode = |key: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(key);
    let app = TestApp::spawn_configured(
        Options {
            smtp: true,
            worker: false,
        },
        json!({ "codes": { "seal_key": encode(&old_key) },
                "platform": { "retry_min_backoff_ms": 100, "retry_max_backoff_secs": 1 } }),
    )
    .await;
    let hash_key = app.ctx.config.hash_key();
    let admin = app.token(Role::Admin).await;
    let operator = app.token(Role::Operator).await;
    let http = reqwest::Client::new();

    // Before the rotation: an order emailed, batch codes, an endpoint.
    let before = Process::start(&app.ctx).await;
    let port = free_port();
    let endpoint = before
        .call(
            &http,
            &admin,
            "/admin/v1/platform/endpoints",
            json!({
            "name": "platform", "url": Receiver::url_on(port), "reason": "events" }),
        )
        .await;
    let receiver =
        Receiver::start_on(port, &[endpoint["secret"].as_str().unwrap().to_owned()]).await;
    let sale = Sale::new("ord-rotation", "rot@example.com", &[(Product::Kit, 1)]);
    assert_eq!(Channel::Native.purchase(&app, &sale).await.status(), 200);
    let first_mail = app.mails(1).await;
    let old_codes = app.batch_codes("KIT-BASIC", 2).await;
    drop(before);

    // The rotation: a new key, the old one kept to open what it sealed.
    let new_key = [9u8; 32];
    let mut config = app.ctx.config.clone();
    config.codes.seal_key = SecretString::from(encode(&new_key));
    config.codes.previous_seal_keys = vec![SecretString::from(encode(&old_key))];
    let rotated = Context::connect(config).await.unwrap();
    let after = Process::start(&rotated).await;
    let only_old = CodeKeys::new(hash_key, old_key);
    let only_new = CodeKeys::new(hash_key, new_key);

    // New codes are sealed with the new key.
    let batch = after
        .call(
            &http,
            &operator,
            "/admin/v1/batches",
            json!({
            "product_sku": "KIT-BASIC", "quantity": 1, "kind": "test_account", "reason": "after" }),
        )
        .await;
    let new_sealed: Vec<u8> =
        sqlx::query_scalar("SELECT code_sealed FROM activation_code WHERE batch_id = $1")
            .bind(uuid::Uuid::parse_str(batch["id"].as_str().unwrap()).unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(only_new.unseal(&new_sealed).is_ok());
    assert!(only_old.unseal(&new_sealed).is_err());

    // Old codes still open: the order's email is sent again with its code.
    let delivery: uuid::Uuid = sqlx::query_scalar("SELECT id FROM email_delivery LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    after
        .call(
            &http,
            &operator,
            &format!("/admin/v1/deliveries/{delivery}/resend"),
            json!({ "reason": "lost it" }),
        )
        .await;
    let mails = app.mails(2).await;
    assert_eq!(
        mails[1].codes(),
        first_mail[0].codes(),
        "the old code, opened with the old key"
    );
    // ... and the endpoint's old secret still signs.
    let (status, _) = app.redeem(&old_codes[0], "acct_1", "me").await;
    assert_eq!(status, 201);
    eventually(
        "the event reaches the platform",
        Duration::from_secs(30),
        || async {
            receiver
                .received()
                .into_iter()
                .find(|r| r.kind() == "code.redeemed")
        },
    )
    .await;

    // Reseal: everything moves to the new key.
    let done = entitle_jobs::reseal::reseal(&app.pool, &rotated.keys, 2)
        .await
        .unwrap();
    assert_eq!(
        (done.codes, done.current, done.unreadable),
        (3, 1, 0),
        "{done:?}"
    );
    assert_eq!(done.endpoint_secrets, 1);
    for sealed in sealed_codes(&app).await {
        assert!(only_new.unseal(&sealed).is_ok());
        assert!(only_old.unseal(&sealed).is_err());
    }
    let secret: Vec<u8> = sqlx::query_scalar("SELECT secret_sealed FROM platform_endpoint")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(only_new.unseal_bytes(&secret).is_ok());
    let again = entitle_jobs::reseal::reseal(&app.pool, &rotated.keys, 2)
        .await
        .unwrap();
    assert_eq!(
        (again.codes, again.current),
        (0, 4),
        "a second reseal has nothing to do"
    );
    drop(after);
}
