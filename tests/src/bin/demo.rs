//! `entitle-demo`: lets someone without a Stripe account watch an order go
//! through a local Entitle.
//!
//! - `entitle-demo stripe-api PORT` answers Stripe's line-items API the way
//!   Stripe does, for demo sessions named `cs_demo_…_q<QUANTITY>`, and lists
//!   the demo sessions (and no refunds) for reconciliation.
//! - `entitle-demo order GATEWAY SECRET EMAIL QUANTITY` records a paid
//!   session with the stand-in (`ENTITLE_DEMO_STRIPE_API`, default
//!   `http://127.0.0.1:12111`) and posts its signed
//!   `checkout.session.completed` to the gateway.

use entitle_tests::{
    channel_api::ChannelApi,
    stripe::{line_items_page, paid_session},
};
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{method, path},
};

fn usage() -> ! {
    eprintln!(
        "usage: entitle-demo stripe-api PORT\n       entitle-demo order GATEWAY_URL WEBHOOK_SECRET EMAIL QUANTITY"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("stripe-api") => {
            let port: u16 = args
                .get(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| usage());
            stripe_api(port).await
        }
        Some("order") if args.len() == 5 => {
            let quantity: u32 = args[4].parse().unwrap_or_else(|_| usage());
            order(&args[1], &args[2], &args[3], quantity).await
        }
        _ => usage(),
    }
}

async fn stripe_api(port: u16) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let server = MockServer::builder().listener(listener).start().await;
    let api = ChannelApi::mount_for(&server, 100, None).await;
    Mock::given(method("POST"))
        .and(path("/demo/sessions"))
        .respond_with(
            move |request: &Request| match serde_json::from_slice(&request.body) {
                Ok(session) => {
                    api.stripe_session(session);
                    ResponseTemplate::new(201)
                }
                Err(_) => ResponseTemplate::new(400),
            },
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(|request: &Request| {
            // /v1/checkout/sessions/{id}/line_items
            let segments: Vec<&str> = request.url.path().split('/').collect();
            let session = segments.get(4).copied().unwrap_or_default();
            let quantity = session
                .rsplit_once("_q")
                .and_then(|(_, q)| q.parse().ok())
                .unwrap_or(1);
            ResponseTemplate::new(200).set_body_json(line_items_page(
                session,
                &[("price_basic_kit", quantity)],
                false,
            ))
        })
        .with_priority(10)
        .mount(&server)
        .await;
    println!("entitle-demo: Stripe API stand-in on {}", server.uri());
    std::future::pending::<()>().await;
}

async fn order(gateway: &str, secret: &str, email: &str, quantity: u32) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let session = format!("cs_demo_{id}_q{quantity}");
    let body = paid_session(&format!("evt_demo_{id}"), &session, email);
    // The stand-in lists what Stripe would: the session, its items expanded.
    let mut listed: serde_json::Value = serde_json::from_str(&body).expect("fixtures are JSON");
    let mut listed = listed["data"]["object"].take();
    listed["line_items"] = line_items_page(&session, &[("price_basic_kit", quantity)], false);
    let standin = std::env::var("ENTITLE_DEMO_STRIPE_API")
        .unwrap_or_else(|_| "http://127.0.0.1:12111".to_owned());
    if let Err(e) = reqwest::Client::new()
        .post(format!("{standin}/demo/sessions"))
        .json(&listed)
        .send()
        .await
    {
        eprintln!(
            "the Stripe stand-in did not take the session ({e}); reconciliation will not see it"
        );
    }
    let signature = entitle_jobs::channel::stripe::sign(
        body.as_bytes(),
        secret,
        chrono::Utc::now().timestamp(),
    );
    let response = reqwest::Client::new()
        .post(format!("{}/webhooks/stripe", gateway.trim_end_matches('/')))
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("the gateway at {gateway} did not answer: {e}"));
    let status = response.status();
    println!("{status} {}", response.text().await.unwrap_or_default());
    println!("order {session}: {quantity} code(s) for {email}");
    if !status.is_success() {
        std::process::exit(1);
    }
}
