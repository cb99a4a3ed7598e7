//! No input from any client makes any route answer 5xx, panic, or leave
//! something half-written: property-based requests (proptest) to every
//! route of the OpenAPI document, with every kind of caller, odd path ids,
//! queries and bodies, authentic webhooks with arbitrary bodies, and a
//! corpus of inputs that once looped or answered 500.

use std::sync::{Arc, Mutex};

use entitle_jobs::token::Role;
use entitle_tests::{
    TestApp,
    channels::{Channel, Signing},
};
use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, TestCaseError, TestRunner},
};
use serde_json::{Value, json};

/// Arbitrary JSON, nested a little, with strings that like to break things.
fn json_value() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        "[a-z0-9_-]{0,12}".boxed(),
        any::<String>().boxed(),
        Just("\u{0}".to_owned()).boxed(),
        Just("x".repeat(3000)).boxed(),
        Just("2026-13-45".to_owned()).boxed(),
        Just("0000-0000-0000-0000".to_owned()).boxed(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just(2_147_483_648i64),
            Just(2_147_483_647),
            Just(-1),
            Just(0),
            Just(1_000_000)
        ]
        .prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        text.prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,16}".boxed(),
                    prop::sample::select(vec![
                        "code",
                        "reason",
                        "quantity",
                        "product_sku",
                        "kind",
                        "account_id",
                        "entity_ref",
                        "email",
                        "name",
                        "role",
                        "lines",
                        "order_id",
                        "id",
                        "type",
                        "data",
                        "sku",
                        "buyer",
                        "gift",
                        "expires_at",
                        "url",
                    ])
                    .prop_map(str::to_owned)
                    .boxed(),
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for a path parameter.
fn path_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(uuid::Uuid::new_v4().to_string()),
        Just(uuid::Uuid::nil().to_string()),
        "[a-zA-Z0-9._~-]{1,20}",
        Just("%00".to_owned()),
        Just("%E2%82".to_owned()),
        Just("a".repeat(2000)),
        Just("..%2F..%2Fetc".to_owned()),
    ]
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Json(Value),
    Bytes(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        Just(Body::None),
        json_value().prop_map(Body::Json),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
    ]
}

/// One operation of the document: its method and path template.
#[derive(Debug, Clone)]
struct Operation {
    method: String,
    path: String,
}

async fn operations(app: &TestApp) -> Vec<Operation> {
    let document: Value = app
        .http
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.push(Operation {
                    method: method.to_uppercase(),
                    path: path.clone(),
                });
            }
        }
    }
    out
}

fn fill(template: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        out.push_str(&rest[..open]);
        out.push_str(value);
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// The 5xx answers seen: (what was sent, status, body).
type Failures = Arc<Mutex<Vec<String>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_request_to_any_route_answers_5xx_or_leaves_a_half_written_order() {
    let app = TestApp::spawn().await;
    let operations = operations(&app).await;
    assert!(operations.len() > 40, "{} operations", operations.len());
    let tokens = [
        None,
        Some("ent_not_a_token".to_owned()),
        Some(app.token(Role::Support).await),
        Some(app.token(Role::Operator).await),
        Some(app.token(Role::Admin).await),
        Some(app.platform_key.clone()),
    ];
    let failures: Failures = Arc::default();
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 400,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let strategy = (
        0..operations.len(),
        0..tokens.len(),
        path_value(),
        prop::option::of("[a-z_]{1,8}=[a-zA-Z0-9%]{0,12}"),
        body(),
    );
    let outcome = tokio::task::block_in_place(|| {
        runner.run(&strategy, |(op, token, id, query, body)| {
            let operation = &operations[op];
            let mut url = format!("{}{}", app.address, fill(&operation.path, &id));
            if let Some(query) = &query {
                url.push('?');
                url.push_str(query);
            }
            let method = reqwest::Method::from_bytes(operation.method.as_bytes()).unwrap();
            let mut request = app.http.request(method, &url);
            if let Some(token) = &tokens[token] {
                request = request.bearer_auth(token);
            }
            request = match &body {
                Body::None => request,
                Body::Json(value) => request.json(value),
                Body::Bytes(bytes) => request
                    .header("content-type", "application/json")
                    .body(bytes.clone()),
            };
            let (status, text) = handle.block_on(async {
                let answer = request.send().await.expect("the gateway answers");
                (answer.status(), answer.text().await.unwrap_or_default())
            });
            if status.is_server_error() {
                failures.lock().unwrap().push(format!(
                    "{} {url} {body:?} -> {status} {text}",
                    operation.method
                ));
                return Err(TestCaseError::fail(format!(
                    "{status} from {} {url}",
                    operation.method
                )));
            }
            Ok(())
        })
    });
    let seen = failures.lock().unwrap().clone();
    assert!(
        outcome.is_ok() && seen.is_empty(),
        "{outcome:?}\n{}",
        seen.join("\n")
    );

    // Authentic webhooks with arbitrary bodies: a clear refusal or filed,
    // never a 5xx, and nothing filed loops.
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 150,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let channels = (
        0..3usize,
        "[A-Za-z0-9_]{1,24}",
        prop::sample::select(vec![
            "purchase.paid",
            "purchase.refunded",
            "purchase.cancelled",
            "checkout.session.completed",
            "charge.refunded",
            "orders/paid",
            "orders/cancelled",
            "refunds/create",
            "something.else",
        ]),
        body(),
    );
    let outcome = tokio::task::block_in_place(|| {
        runner.run(&channels, |(channel, event_id, topic, body)| {
            let channel = Channel::ALL[channel];
            let bytes = match &body {
                Body::None => Vec::new(),
                Body::Json(value) => value.to_string().into_bytes(),
                Body::Bytes(bytes) => bytes.clone(),
            };
            let (status, text) = handle.block_on(async {
                let answer = channel
                    .post_bytes(&app, &event_id, topic, &bytes, Signing::Good)
                    .await;
                (answer.status(), answer.text().await.unwrap_or_default())
            });
            prop_assert!(
                !status.is_server_error(),
                "{channel:?} {topic}: {status} {text}"
            );
            Ok(())
        })
    });
    assert!(outcome.is_ok(), "{outcome:?}");
    settled(&app).await;
}

/// Every filed event ends (none loops), and no order is half-written.
async fn settled(app: &TestApp) {
    entitle_tests::eventually("every filed event ends", entitle_tests::WAIT, || async {
        (app.count("SELECT count(*) FROM webhook_inbox WHERE status = 'pending'")
            .await
            == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM orders o WHERE o.issued_at IS NOT NULL AND
               (SELECT coalesce(sum(quantity), 0) FROM order_line WHERE order_id = o.id)
               <> (SELECT count(*) FROM activation_code c JOIN order_line l ON l.id = c.order_line_id
                   WHERE l.order_id = o.id)"
        )
        .await,
        0,
        "every issued order has exactly one code per unit"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM order_line WHERE order_id = o.id)")
            .await,
        0,
        "no order without lines"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM webhook_inbox WHERE attempts > 3")
            .await,
        0,
        "no event is tried again and again"
    );
}

/// Inputs that once looped as `transient` or answered 500, signed as the
/// channel would: each gets a clear 4xx (or is filed failed), at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_of_once_broken_inputs_is_refused_clearly() {
    let app = TestApp::spawn().await;
    let line =
        |quantity: i64| json!({ "sku": "KIT-BASIC", "quantity": quantity, "unit_amount": 100 });
    let purchase = |id: &str, name: &str, message: &str, lines: Value| {
        json!({
            "type": "purchase.paid",
            "order_id": id, "currency": "EUR", "amount_total": 100,
            "buyer": { "email": "corpus@example.com", "name": name },
            "gift": { "recipient_email": "r@example.com", "recipient_name": "R", "message": message },
            "lines": lines
        })
    };
    let cases = [
        (
            "quantity 2^31",
            purchase("c1", "A", "m", json!([line(2_147_483_648)])),
        ),
        (
            "two lines of 2^31",
            purchase(
                "c2",
                "A",
                "m",
                json!([line(2_147_483_648), line(2_147_483_648)]),
            ),
        ),
        (
            "quantity 2^31-1",
            purchase("c3", "A", "m", json!([line(2_147_483_647)])),
        ),
        (
            "quantity 1,000,000",
            purchase("c4", "A", "m", json!([line(1_000_000)])),
        ),
        (
            "a 3 KB order id",
            purchase(&"o".repeat(3000), "A", "m", json!([line(1)])),
        ),
        (
            "NUL in the buyer's name",
            purchase("c6", "A\u{0}B", "m", json!([line(1)])),
        ),
        (
            "NUL in the gift message",
            purchase("c7", "A", "m\u{0}", json!([line(1)])),
        ),
        (
            "NUL in the order id",
            purchase("c8\u{0}", "A", "m", json!([line(1)])),
        ),
        ("no lines", purchase("c9", "A", "m", json!([]))),
        ("an empty line", purchase("c10", "A", "m", json!([{}]))),
        ("a bad date", {
            let mut p = purchase("c11", "A", "m", json!([line(1)]));
            p["gift"]["send_at"] = json!("2026-02-30T25:00:00Z");
            p
        }),
    ];
    // The same event, well formed, is taken: the refusals below are for
    // what each case breaks, not for its shape.
    let good = purchase("c0", "A", "m", json!([line(1)]));
    let answer = Channel::Native
        .post(
            &app,
            "msg_good",
            "purchase.paid",
            &good.to_string(),
            Signing::Good,
        )
        .await;
    assert_eq!(answer.status(), 200);
    for (i, (what, body)) in cases.iter().enumerate() {
        let answer = Channel::Native
            .post(
                &app,
                &format!("msg_corpus_{i}"),
                "purchase.paid",
                &body.to_string(),
                Signing::Good,
            )
            .await;
        let status = answer.status();
        let refusal: Value = answer.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 400, "{what}: {refusal}");
        assert!(
            refusal["code"].is_string(),
            "{what}: a stable code, {refusal}"
        );
    }
    // Authentic but unusable Stripe events, and odd event ids: filed
    // failed at once (200, so the channel stops), or refused; never 5xx.
    for (id, body) in [
        (
            "evt_malformed",
            json!({ "id": "evt_malformed", "type": "checkout.session.completed", "data": {} }),
        ),
        (
            "evt_\u{1}odd",
            json!({ "id": "evt_\u{1}odd", "type": "charge.refunded", "data": { "object": 5 } }),
        ),
        (
            &*"e".repeat(600),
            json!({ "id": "e".repeat(600), "type": "charge.refunded", "data": {} }),
        ),
    ] {
        let answer = Channel::Stripe
            .post(&app, "ignored", "ignored", &body.to_string(), Signing::Good)
            .await;
        assert!(
            answer.status().is_client_error() || answer.status() == 200,
            "{id}: {}",
            answer.status()
        );
    }
    // The admin routes that once answered 500 on malformed input.
    let admin = app.token(Role::Admin).await;
    for (path, body) in [
        (
            "/admin/v1/batches",
            json!({ "product_sku": 5, "quantity": "many", "kind": null, "reason": "x" }),
        ),
        (
            "/admin/v1/batches",
            json!({ "product_sku": "KIT-BASIC", "quantity": 2_147_483_648i64, "kind": "test_account", "reason": "x" }),
        ),
        (
            "/admin/v1/tokens",
            json!({ "name": "\u{0}", "role": "emperor", "reason": "x" }),
        ),
        (
            "/admin/v1/tokens",
            json!({ "name": "x".repeat(5000), "role": "admin", "reason": "x" }),
        ),
    ] {
        let (status, answer) = app
            .admin("POST", path, Some(&admin), Some(body), None)
            .await;
        assert!((400..500).contains(&status), "{path}: {status} {answer}");
        assert!(answer["code"].is_string(), "{path}: {answer}");
    }
    settled(&app).await;
    assert_eq!(
        app.count("SELECT count(*) FROM orders").await,
        1,
        "only the well-formed order was made"
    );
}
