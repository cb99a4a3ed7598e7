//! The HTTP contract's edges: every error body is `{code, detail}`, whoever
//! refused the request (an unknown route, a wrong method, an unparsable
//! path id, a body over the limit), and the bearer scheme is
//! case-insensitive.

use entitle_jobs::token::Role;
use entitle_tests::{Options, TestApp};
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
