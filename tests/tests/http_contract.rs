//! The HTTP contract: the OpenAPI document is valid OpenAPI 3.1 and
//! describes exactly the routes the gateway serves, each with the role its
//! handler enforces; real answers fit their documented schemas; every error
//! body is `{code, detail}`, whoever refused the request (an unknown route,
//! a wrong method, an unparsable path id, a body over the limit); and the
//! bearer scheme is case-insensitive.

use std::collections::{BTreeMap, BTreeSet};

use entitle_jobs::token::Role;
use entitle_tests::{
    Options, TestApp,
    channels::{self, Channel, Product, Sale},
};
use serde_json::{Value, json};

async fn app() -> TestApp {
    TestApp::spawn_configured(
        Options {
            smtp: false,
            worker: false,
        },
        json!({ "gateway": { "max_body_bytes": 4096 } }),
    )
    .await
}

async fn json_error(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.unwrap();
    assert!(
        content_type.starts_with("application/json"),
        "{status} {content_type}: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert!(
        body["code"].is_string() && body["detail"].is_string(),
        "{status}: {body}"
    );
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_answers_one_json_shape() {
    let app = app().await;
    let http = reqwest::Client::new();
    let token = app.token(Role::Support).await;
    let url = |path: &str| format!("{}{path}", app.address);

    let (status, body) = json_error(http.get(url("/nowhere")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("route_not_found"))
    );

    let (status, body) =
        json_error(http.delete(url("/v1/redemptions")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    let (status, body) = json_error(
        http.get(url("/admin/v1/codes/not-a-uuid"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));

    let big = "x".repeat(10_000);
    let (status, body) = json_error(
        http.post(url("/v1/redemptions"))
            .bearer_auth(&app.platform_key)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"code":"{big}","account_id":"a","entity_ref":"b"}}"#
            ))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("body_too_large"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = app().await;
    let token = app.token(Role::Support).await;
    let http = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = http
            .get(format!("{}/admin/v1/products", app.address))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
    let response = http
        .get(format!("{}/admin/v1/products", app.address))
        .header("authorization", format!("Basic {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

// ------------------------------------------------------------ the document

/// The roles `x-entitle-role` may name, and what each may be called with.
const STAFF_ROLES: [Role; 3] = [Role::Support, Role::Operator, Role::Admin];

/// The gateway's HTML pages: not part of the API, so not in the document.
const PAGES: [&str; 2] = ["/console", "/redeem"];

/// The document as the gateway serves it, to anyone.
async fn served_document(app: &TestApp) -> Value {
    let response = app
        .http
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    response.json().await.unwrap()
}

/// Every operation: (method, path template, operation).
fn operations(document: &Value) -> Vec<(String, String, Value)> {
    let mut all = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            all.push((method.to_uppercase(), path.clone(), operation.clone()));
        }
    }
    all
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'d>(document: &'d Value, value: &'d Value) -> &'d Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(target) => resolve(
            document,
            document
                .pointer(target.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{target} resolves")),
        ),
        None => value,
    }
}

/// The path with each `{parameter}` filled in: a fresh UUID where the
/// document says uuid, a name nobody has otherwise.
fn concrete(path: &str, operation: &Value) -> String {
    let mut concrete = path.to_owned();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        if parameter["in"] != "path" {
            continue;
        }
        let name = parameter["name"].as_str().unwrap();
        let value = if parameter["schema"]["format"] == "uuid" {
            uuid::Uuid::new_v4().to_string()
        } else {
            "nobody".to_owned()
        };
        concrete = concrete.replace(&format!("{{{name}}}"), &value);
    }
    concrete
}

/// The example body of an operation's JSON request schema.
fn example_body(document: &Value, operation: &Value) -> Option<Value> {
    let body = resolve(document, operation.get("requestBody")?);
    let schema = resolve(document, &body["content"]["application/json"]["schema"]);
    Some(
        schema["examples"][0]
            .as_object()
            .map(|o| Value::Object(o.clone()))
            .unwrap_or_else(|| panic!("{} documents an example body", operation["operationId"])),
    )
}

/// A JSON Schema validator for the document's schema at `pointer`, with its
/// `$ref`s resolved within the document. `closed`: objects may hold only
/// the properties they document, so an answer with an undocumented field
/// fails (answers are checked closed; channels' bodies open, as they carry
/// much more than Entitle reads).
fn validator(document: &Value, pointer: &str, closed: bool) -> jsonschema::Validator {
    let mut root = document.clone();
    if closed {
        close(&mut root["components"]["schemas"]);
        close(&mut root["paths"]);
    }
    // A JSON pointer in a URI fragment: `{` and `}` percent-encoded.
    let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
    root["$ref"] = json!(format!("#{fragment}"));
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("the schema at {pointer} compiles: {e}"))
}

/// Forbids undocumented properties in every object schema under `value`.
fn close(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if object.contains_key("properties") && !object.contains_key("additionalProperties") {
                object.insert("additionalProperties".to_owned(), json!(false));
            }
            object.values_mut().for_each(close);
        }
        Value::Array(items) => items.iter_mut().for_each(close),
        _ => {}
    }
}

fn pointer_segment(text: &str) -> String {
    text.replace('~', "~0").replace('/', "~1")
}

/// Checks an answer against the schema the document gives for its
/// operation and status.
fn check_answer(document: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let operation = &document["paths"][path][method.to_lowercase()];
    assert!(operation.is_object(), "{method} {path} is documented");
    let response = operation["responses"]
        .get(status.to_string())
        .unwrap_or_else(|| panic!("{method} {path} documents {status}: {body}"));
    let response = resolve(document, response);
    let Some(content) = response["content"].as_object() else {
        panic!("{method} {path} {status} documents a body");
    };
    if let Some(text) = body.as_str() {
        assert!(content.contains_key("text/csv"), "{method} {path}: {text}");
        return;
    }
    let media = if operation["responses"][status.to_string()]["$ref"].is_string() {
        let target = operation["responses"][status.to_string()]["$ref"]
            .as_str()
            .unwrap()
            .trim_start_matches('#')
            .to_owned();
        format!("{target}/content/application~1json/schema")
    } else {
        format!(
            "/paths/{}/{}/responses/{status}/content/application~1json/schema",
            pointer_segment(path),
            method.to_lowercase()
        )
    };
    let validator = validator(document, &media, true);
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} answered {status} outside its documented schema: {errors:?}\n{body}"
    );
}

/// Checks a request body against the operation's documented schema (open:
/// a channel sends more than Entitle reads).
fn check_request(document: &Value, path: &str, body: &Value) {
    let pointer = format!(
        "/paths/{}/post/requestBody/content/application~1json/schema",
        pointer_segment(path)
    );
    let validator = validator(document, &pointer, false);
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "a body POST {path} accepts is outside its documented schema: {errors:?}\n{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_openapi_3_1() {
    let app = app().await;
    let document = served_document(&app).await;

    // The OpenAPI Initiative's schema for 3.1 documents (tests/schemas).
    let specification: Value =
        serde_json::from_str(include_str!("../schemas/openapi-3.1.schema.json")).unwrap();
    let oas = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&specification)
        .expect("the OpenAPI 3.1 schema compiles");
    let errors: Vec<String> = oas
        .iter_errors(&document)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "not OpenAPI 3.1: {errors:?}");
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1."));

    // That schema leaves Schema Objects to JSON Schema: each is valid
    // draft 2020-12 and compiles, its references resolving.
    for (name, schema) in document["components"]["schemas"].as_object().unwrap() {
        if let Err(e) = jsonschema::meta::validate(schema) {
            panic!("components.schemas.{name} is not JSON Schema: {e}");
        }
        validator(&document, &format!("/components/schemas/{name}"), false);
    }

    // What the schema cannot say.
    let mut operation_ids = BTreeSet::new();
    for (method, path, operation) in operations(&document) {
        let what = format!("{method} {path}");
        let id = operation["operationId"].as_str().expect("an operationId");
        assert!(
            operation_ids.insert(id.to_owned()),
            "{what}: {id} is unique"
        );
        let in_template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let declared: BTreeSet<&str> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(in_template, declared, "{what}: path parameters");
        // The role, for machines, and as the security requirement's roles.
        let role = operation["x-entitle-role"]
            .as_str()
            .unwrap_or_else(|| panic!("{what} names its role"));
        let security = &operation["security"];
        match role {
            "public" => assert!(security.is_null(), "{what} is public"),
            "platform" => assert_eq!(security, &json!([{ "platform_key": ["platform"] }])),
            staff => {
                assert!(
                    STAFF_ROLES.iter().any(|r| r.as_str() == staff),
                    "{what}: {staff}"
                );
                assert_eq!(security, &json!([{ "bearer": [staff] }]), "{what}");
            }
        }
        // Every refusal is the one Error schema.
        for (status, response) in operation["responses"].as_object().unwrap() {
            if status.starts_with('4') || (status.starts_with('5') && status != "503") {
                let response = resolve(&document, response);
                assert_eq!(
                    response["content"]["application/json"]["schema"],
                    json!({ "$ref": "#/components/schemas/Error" }),
                    "{what} {status} is an Error"
                );
            }
        }
    }
    let error = &document["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["code", "detail"]));

    // The answer check itself refuses what a schema does not allow: an
    // undocumented field, a value of the wrong type.
    for wrong in [
        json!({ "orders": [], "next": 1 }),
        json!({ "orders": [{ "id": "not-a-uuid" }] }),
    ] {
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_answer(&document, "GET", "/admin/v1/orders", 200, &wrong)
        }));
        assert!(checked.is_err(), "{wrong} is refused");
    }

    // Where the admin API's document used to be, this one is.
    let response = app
        .http
        .get(format!("{}/admin/v1/openapi.json", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.url().path(), "/openapi.json");
    assert_eq!(response.json::<Value>().await.unwrap(), document);
}

/// The paths a router serves, as axum's router lists them in its `Debug`
/// output (`path_router: … RouteId(3): "/healthz"`; its `fallback_router`
/// lists the fallback's catch-all): the one view of its routes it gives.
/// The caller checks a path it knows is there, so a change in that output
/// fails loudly rather than passing with nothing found.
fn served_paths(router: &impl std::fmt::Debug) -> BTreeSet<String> {
    let listing = format!("{router:?}");
    let (routes, _fallback) = listing
        .split_once("fallback_router")
        .expect("a Router lists its fallback router");
    routes
        .split("RouteId(")
        .skip(1)
        .filter_map(|entry| {
            let (_, rest) = entry.split_once("): \"")?;
            let (path, _) = rest.split_once('"')?;
            (path.starts_with('/') && !path.contains("__private__axum")).then(|| path.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_the_gateway_serves_is_documented_and_only_those() {
    let app = app().await;
    let document = served_document(&app).await;
    let documented: BTreeMap<String, BTreeSet<String>> =
        operations(&document)
            .into_iter()
            .fold(BTreeMap::new(), |mut all, (method, path, _)| {
                all.entry(path).or_default().insert(method);
                all
            });

    let state = entitle_gateway::AppState {
        ctx: app.ctx.clone(),
        metrics: entitle_jobs::telemetry::metrics(),
        intake: entitle_jobs::inbox::Intake::start(app.pool.clone(), 1),
        redeemer: entitle_jobs::redemption::Redeemer::start(app.pool.clone(), app.pool.clone(), 1),
        platform: std::sync::Arc::new(entitle_gateway::platform::Gate::new(
            &app.ctx.config.gateway,
        )),
    };
    let served: BTreeSet<String> = served_paths(&entitle_gateway::router(state))
        .into_iter()
        .filter(|path| !PAGES.iter().any(|page| path.starts_with(page)))
        .collect();
    assert!(served.contains("/healthz"), "the router's paths are read");
    let expected: BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(served, expected, "served paths = documented paths");

    // At each path, exactly the documented methods are served: the others
    // answer 405. No token is sent, so no action runs.
    for (path, methods) in &documented {
        if !served.contains(path) {
            continue;
        }
        let operation = &document["paths"][path][methods.first().unwrap().to_lowercase()];
        let url = format!("{}{}", app.address, concrete(path, operation));
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let response = app
                .http
                .request(
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                    &url,
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            if methods.contains(method) {
                assert_ne!(status, 405, "{method} {path} is served");
                assert_ne!(status, 404, "{method} {path} is routed");
            } else {
                assert_eq!(status, 405, "{method} {path} is not served");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_admin_operation_refuses_the_roles_below_its_documented_one() {
    let app = TestApp::spawn().await;
    let document = served_document(&app).await;
    let mut tokens = Vec::new();
    for role in STAFF_ROLES {
        tokens.push((role, app.token(role).await));
    }
    let mut checked = 0;
    for (method, path, operation) in operations(&document) {
        let Some(needed) = operation["x-entitle-role"].as_str().and_then(Role::parse) else {
            continue;
        };
        let what = format!("{method} {path}");
        let target = concrete(&path, &operation);
        let body = example_body(&document, &operation);
        let (status, answer) = app.admin(&method, &target, None, body.clone(), None).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (401, Some("unauthorized")),
            "{what} without a token"
        );
        let (status, _) = app
            .admin(
                &method,
                &target,
                Some("ent_not_a_token"),
                body.clone(),
                None,
            )
            .await;
        assert_eq!(status, 401, "{what} with a wrong token");
        for (role, token) in &tokens {
            let (status, answer) = app
                .admin(&method, &target, Some(token), body.clone(), None)
                .await;
            if *role < needed {
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (403, Some("forbidden")),
                    "{what} as {role:?}"
                );
            } else {
                assert!(
                    status != 401 && status != 403,
                    "{what} as {role:?}: {status} {answer}"
                );
                assert!(
                    status < 400 || answer["code"] != "route_not_found",
                    "{what} as {role:?} is routed: {status} {answer}"
                );
                check_answer(&document, &method, &path, status, &answer);
            }
        }
        checked += 1;
    }
    assert!(checked >= 30, "{checked} admin operations checked");
}

/// Every operation documented for the platform role refuses callers
/// without a platform key (401) and staff tokens (403), and serves one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_platform_operation_refuses_callers_without_a_platform_key() {
    let app = app().await;
    let document = served_document(&app).await;
    let staff = app.token(Role::Admin).await;
    let mut checked = 0;
    for (method, path, operation) in operations(&document) {
        if operation["x-entitle-role"] != "platform" {
            continue;
        }
        let body = example_body(&document, &operation);
        let (status, _) = app.admin(&method, &path, None, body.clone(), None).await;
        assert_eq!(status, 401, "{method} {path} without a key");
        let (status, _) = app
            .admin(&method, &path, Some(&staff), body.clone(), None)
            .await;
        assert_eq!(status, 403, "{method} {path} with a staff token");
        let (status, answer) = app
            .admin(&method, &path, Some(&app.platform_key), body, None)
            .await;
        assert!(
            status != 401 && status != 403,
            "{method} {path} with a platform key: {status} {answer}"
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "redemption and the code check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_and_channel_bodies_fit_their_documented_schemas() {
    let app = TestApp::spawn().await;
    let document = served_document(&app).await;
    let doc = &document;
    let support = app.token(Role::Support).await;
    let operator = app.token(Role::Operator).await;
    let admin = app.token(Role::Admin).await;

    // What the channels send fits what the document says they may.
    let sale = Sale::new("contract", "cleo@example.com", &[(Product::Kit, 3)]);
    let stripe: Value = serde_json::from_str(&channels::stripe_session_event(
        &sale,
        "evt_contract",
        "checkout.session.completed",
    ))
    .unwrap();
    check_request(doc, "/webhooks/stripe", &stripe);
    let charge = json!({ "id": "evt_refund", "type": "charge.refunded",
                         "data": { "object": channels::stripe_charge(&sale, 100) } });
    check_request(doc, "/webhooks/stripe", &charge);
    check_request(doc, "/webhooks/shopify", &channels::shopify_order(&sale));
    check_request(
        doc,
        "/webhooks/shopify",
        &channels::shopify_refund(&sale, "r1", &[(Product::Kit, 1)]),
    );
    check_request(
        doc,
        "/webhooks/native",
        &json!({ "type": "purchase.paid", "order_id": "o1", "buyer": { "email": "b@example.com" },
                 "lines": [{ "sku": "KIT-BASIC", "quantity": 1 }] }),
    );
    check_request(
        doc,
        "/webhooks/native",
        &json!({ "type": "purchase.refunded", "order_id": "o1", "refund_id": "r1" }),
    );

    // A purchase through a channel, its email, a redemption.
    let response = Channel::Native.purchase(&app, &sale).await;
    let status = response.status().as_u16();
    check_answer(
        doc,
        "POST",
        "/webhooks/native",
        status,
        &response.json().await.unwrap(),
    );
    let codes = app.mails(1).await[0].codes();
    let (status, redemption) = app.redeem(&codes[2], "acct_cleo", "child_1").await;
    assert_eq!(status, 201);
    check_answer(doc, "POST", "/v1/redemptions", status, &redemption);
    let (status, again) = app.redeem(&codes[2], "acct_cleo", "child_1").await;
    assert_eq!(status, 200);
    check_answer(doc, "POST", "/v1/redemptions", status, &again);
    let (status, taken) = app.redeem(&codes[2], "acct_other", "child_9").await;
    check_answer(doc, "POST", "/v1/redemptions", status, &taken);

    // Every view and action, with real data.
    let call = |method: &'static str,
                template: &'static str,
                path: String,
                token: &str,
                body: Option<Value>| {
        let token = token.to_owned();
        let app = &app;
        async move {
            let (status, answer) = app.admin(method, &path, Some(&token), body, None).await;
            check_answer(doc, method, template, status, &answer);
            assert!(status < 300, "{method} {path}: {status} {answer}");
            answer
        }
    };
    let found = call(
        "GET",
        "/admin/v1/orders",
        "/admin/v1/orders?email=cleo@example.com".to_owned(),
        &support,
        None,
    )
    .await;
    let order = found["orders"][0]["id"].as_str().unwrap().to_owned();
    let view = call(
        "GET",
        "/admin/v1/orders/{id}",
        format!("/admin/v1/orders/{order}"),
        &support,
        None,
    )
    .await;
    let code = |i: usize| view["codes"][i]["id"].as_str().unwrap().to_owned();
    let delivery = view["deliveries"][0]["id"].as_str().unwrap().to_owned();
    call(
        "GET",
        "/admin/v1/accounts/{account_id}",
        "/admin/v1/accounts/acct_cleo".to_owned(),
        &support,
        None,
    )
    .await;
    call(
        "GET",
        "/admin/v1/codes/{id}",
        format!("/admin/v1/codes/{}", code(2)),
        &support,
        None,
    )
    .await;
    call(
        "POST",
        "/admin/v1/codes/lookup",
        "/admin/v1/codes/lookup".to_owned(),
        &support,
        Some(json!({ "code": codes[0] })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/codes/{id}/reassign",
        format!("/admin/v1/codes/{}/reassign", code(2)),
        &operator,
        Some(json!({ "reason": "sibling", "account_id": "acct_cleo", "entity_ref": "child_2" })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/codes/{id}/unassign",
        format!("/admin/v1/codes/{}/unassign", code(2)),
        &operator,
        Some(json!({ "reason": "mistake" })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/codes/{id}/expiry",
        format!("/admin/v1/codes/{}/expiry", code(2)),
        &operator,
        Some(json!({ "reason": "goodwill", "expires_at": "2035-01-01T00:00:00Z" })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/orders/{id}/expiry",
        format!("/admin/v1/orders/{order}/expiry"),
        &operator,
        Some(json!({ "reason": "goodwill", "expires_at": "2036-01-01T00:00:00Z" })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/codes/{id}/revoke",
        format!("/admin/v1/codes/{}/revoke", code(0)),
        &operator,
        Some(json!({ "reason": "fraud" })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/codes/{id}/reissue",
        format!("/admin/v1/codes/{}/reissue", code(1)),
        &operator,
        Some(json!({ "reason": "lost" })),
    )
    .await;
    call(
        "POST",
        "/admin/v1/deliveries/{id}/resend",
        format!("/admin/v1/deliveries/{delivery}/resend"),
        &support,
        Some(json!({ "reason": "not received" })),
    )
    .await;
    // The order again, now with a replacement, a resend and more history.
    call(
        "GET",
        "/admin/v1/orders/{id}",
        format!("/admin/v1/orders/{order}"),
        &support,
        None,
    )
    .await;

    let batch = call(
        "POST",
        "/admin/v1/batches",
        "/admin/v1/batches".to_owned(),
        &operator,
        Some(
            json!({ "product_sku": "LIC-PRO-1Y", "quantity": 2, "kind": "test_account",
                     "reason": "QA", "email": "qa@example.com" }),
        ),
    )
    .await;
    let batch = batch["id"].as_str().unwrap().to_owned();
    call(
        "GET",
        "/admin/v1/batches/{id}",
        format!("/admin/v1/batches/{batch}"),
        &support,
        None,
    )
    .await;
    call(
        "POST",
        "/admin/v1/batches/{id}/export",
        format!("/admin/v1/batches/{batch}/export"),
        &operator,
        Some(json!({ "reason": "to QA" })),
    )
    .await;

    call(
        "GET",
        "/admin/v1/events",
        "/admin/v1/events".to_owned(),
        &support,
        None,
    )
    .await;
    call(
        "POST",
        "/admin/v1/events/retry",
        "/admin/v1/events/retry".to_owned(),
        &operator,
        Some(json!({ "reason": "nothing failed" })),
    )
    .await;
    call(
        "GET",
        "/admin/v1/audit",
        "/admin/v1/audit".to_owned(),
        &support,
        None,
    )
    .await;

    let finding: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO reconciliation_finding (id, kind, detail, dedupe_key)
         VALUES (gen_random_uuid(), 'refund_unallocated', 'seeded', 'seeded') RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    call(
        "GET",
        "/admin/v1/findings",
        "/admin/v1/findings".to_owned(),
        &support,
        None,
    )
    .await;
    call(
        "GET",
        "/admin/v1/findings/export",
        "/admin/v1/findings/export".to_owned(),
        &support,
        None,
    )
    .await;
    call(
        "POST",
        "/admin/v1/findings/{id}/ignore",
        format!("/admin/v1/findings/{finding}/ignore"),
        &operator,
        Some(json!({ "reason": "test order" })),
    )
    .await;
    let run = call(
        "POST",
        "/admin/v1/reconciliations",
        "/admin/v1/reconciliations".to_owned(),
        &operator,
        Some(json!({ "channel": "native", "reason": "contract" })),
    )
    .await;
    let run = run["id"].as_str().unwrap().to_owned();
    entitle_tests::eventually("the run finishes", entitle_tests::WAIT, || async {
        let (_, shown) = app
            .admin(
                "GET",
                &format!("/admin/v1/reconciliations/{run}"),
                Some(&support),
                None,
                None,
            )
            .await;
        (shown["status"] == "finished").then_some(())
    })
    .await;
    call(
        "GET",
        "/admin/v1/reconciliations/{id}",
        format!("/admin/v1/reconciliations/{run}"),
        &support,
        None,
    )
    .await;
    call(
        "GET",
        "/admin/v1/reconciliations",
        "/admin/v1/reconciliations".to_owned(),
        &support,
        None,
    )
    .await;

    call(
        "POST",
        "/admin/v1/tokens",
        "/admin/v1/tokens".to_owned(),
        &admin,
        Some(json!({ "name": "sue", "role": "support", "reason": "new agent" })),
    )
    .await;
    call(
        "GET",
        "/admin/v1/tokens",
        "/admin/v1/tokens".to_owned(),
        &admin,
        None,
    )
    .await;
    call(
        "POST",
        "/admin/v1/tokens/{name}/revoke",
        "/admin/v1/tokens/sue/revoke".to_owned(),
        &admin,
        Some(json!({ "reason": "left" })),
    )
    .await;
    call(
        "GET",
        "/admin/v1/products",
        "/admin/v1/products".to_owned(),
        &support,
        None,
    )
    .await;
    call(
        "POST",
        "/admin/v1/products/reload",
        "/admin/v1/products/reload".to_owned(),
        &admin,
        Some(json!({ "reason": "new price" })),
    )
    .await;
    for path in ["/healthz", "/readyz"] {
        let (status, answer) = app.admin("GET", path, None, None, None).await;
        check_answer(doc, "GET", path, status, &answer);
    }
}
