//! The platform's event receiver, for tests: it verifies each event's
//! Standard Webhooks signature with the `standardwebhooks` crate (an
//! implementation that is not Entitle's), refuses what does not verify,
//! and records what arrived, in order. It can be made to fail, and it can
//! be started late on a port reserved for it (the platform down, then up).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use serde_json::Value;

/// One event as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    /// `webhook-id`.
    pub id: String,
    pub body: String,
    pub event: Value,
    /// Which of the receiver's secrets verified it (their positions).
    pub verified_by: Vec<usize>,
}

impl Received {
    pub fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap_or_default()
    }

    pub fn seq(&self) -> i64 {
        self.event["seq"].as_i64().unwrap_or_default()
    }

    pub fn code_id(&self) -> Option<&str> {
        self.event["data"]["code_id"].as_str()
    }
}

#[derive(Clone)]
struct Shared {
    secrets: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<Vec<Received>>>,
    refused: Arc<Mutex<usize>>,
    failing: Arc<AtomicBool>,
}

/// A running receiver.
pub struct Receiver {
    /// Where Entitle sends events.
    pub url: String,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// The URL a receiver on `port` will have.
    pub fn url_on(port: u16) -> String {
        format!("http://127.0.0.1:{port}/entitle/events")
    }

    /// Starts on `port`, accepting events signed with any of `secrets`.
    pub async fn start_on(port: u16, secrets: &[String]) -> Receiver {
        let shared = Shared {
            secrets: Arc::new(Mutex::new(secrets.to_vec())),
            received: Arc::default(),
            refused: Arc::default(),
            failing: Arc::default(),
        };
        let app = Router::new()
            .route("/entitle/events", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the receiver's port is free");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: Receiver::url_on(port),
            shared,
            task,
        }
    }

    /// Starts on a free port.
    pub async fn start(secrets: &[String]) -> Receiver {
        Receiver::start_on(crate::smtp::free_port(), secrets).await
    }

    /// Accepts events signed with `secret` too (a rotation).
    pub fn add_secret(&self, secret: &str) {
        self.shared.secrets.lock().unwrap().push(secret.to_owned());
    }

    /// While set, every event is answered 500 (after being verified).
    pub fn fail(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// What arrived and verified, in arrival order (duplicates included).
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// How many requests did not verify.
    pub fn refused(&self) -> usize {
        *self.shared.refused.lock().unwrap()
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let secrets = shared.secrets.lock().unwrap().clone();
    let verified_by: Vec<usize> = secrets
        .iter()
        .enumerate()
        .filter(|(_, secret)| {
            standardwebhooks::Webhook::new(secret)
                .and_then(|hook| hook.verify(&body, &headers))
                .is_ok()
        })
        .map(|(i, _)| i)
        .collect();
    if verified_by.is_empty() {
        *shared.refused.lock().unwrap() += 1;
        return StatusCode::BAD_REQUEST;
    }
    if shared.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let body = String::from_utf8(body.to_vec()).expect("an event is UTF-8");
    let event: Value = serde_json::from_str(&body).expect("an event is JSON");
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    shared.received.lock().unwrap().push(Received {
        id,
        body,
        event,
        verified_by,
    });
    StatusCode::NO_CONTENT
}
