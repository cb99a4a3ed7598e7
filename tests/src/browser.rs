//! Real Chromium for the console's browser tests: starts `chromedriver` on a
//! free port and a headless Chromium session with a fresh profile, drives it
//! with fantoccini, and saves screenshots to `target/screenshots/<name>.png`
//! under the workspace root. Needs Debian's `chromium` and `chromium-driver`
//! (`.ci/run` and `ops/test.sh` install them).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Browsers running at once across the test binary: each is a few hundred
/// megabytes and a core's worth of start-up.
static BROWSERS: Semaphore = Semaphore::const_new(2);

/// How long a page or an element may take to appear.
const WAIT: Duration = Duration::from_secs(20);

/// A headless Chromium session, pointed at one app.
pub struct Browser {
    pub client: Client,
    /// `http://127.0.0.1:PORT` of the app's gateway.
    base: String,
    driver: Child,
    profile: PathBuf,
    _permit: SemaphorePermit<'static>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn binary(candidates: &[&str]) -> String {
    candidates
        .iter()
        .find(|c| std::path::Path::new(c).exists())
        .map(|c| (*c).to_owned())
        .unwrap_or_else(|| {
            panic!(
                "none of {candidates:?} exists: install chromium and chromium-driver \
                 (ops/test.sh does)"
            )
        })
}

/// Where screenshots go: `target/screenshots` in the workspace.
pub fn screenshots_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/screenshots"
    ))
}

impl Browser {
    /// Starts chromedriver and a browser for the app at `base`.
    pub async fn start(base: &str) -> Self {
        let permit = BROWSERS.acquire().await.expect("the semaphore is open");
        let port = free_port();
        let driver = Command::new(binary(&[
            "/usr/bin/chromedriver",
            "/usr/lib/chromium/chromedriver",
        ]))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
        let profile = std::env::temp_dir().join(format!(
            "entitle-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": binary(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]),
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        let capabilities = match capabilities {
            serde_json::Value::Object(map) => map,
            _ => unreachable!(),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        // chromedriver takes a moment to listen.
        let client = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "chromedriver not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no browser session from chromedriver: {e}"),
            }
        };
        Self {
            client,
            base: base.to_owned(),
            driver,
            profile,
            _permit: permit,
        }
    }

    /// Opens `path` of the app.
    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("{path} opens: {e}"));
    }

    /// The path of the page shown now.
    pub async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("the browser has a URL")
            .path()
            .to_owned()
    }

    /// Waits for the element at `css`.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("an element {css}: {e}"))
    }

    /// Types `text` into the field at `css`, replacing what it held.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("the field clears");
        field.send_keys(text).await.expect("the field takes text");
    }

    /// Clicks the element at `css`.
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("{css} clicks: {e}"));
    }

    /// The visible text of the page's `<main>`, or the whole body.
    pub async fn text(&self) -> String {
        // A page that is being replaced (a form posting) leaves a stale
        // element behind: read the new one.
        for _ in 0..50 {
            match self.find("body").await.text().await {
                Ok(text) => return text,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("the page has no readable text");
    }

    /// Runs a script in the page; returns its value.
    pub async fn script(&self, js: &str) -> serde_json::Value {
        self.client
            .execute(js, vec![])
            .await
            .unwrap_or_else(|e| panic!("the script runs: {e}"))
    }

    /// Waits until the page's text contains `needle`; returns the text.
    pub async fn wait_for_text(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.text().await;
            if text.contains(needle) {
                return text;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {needle:?} on {}; the page says:\n{text}",
                    self.path().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signs in through the sign-in page.
    pub async fn sign_in(&self, email: &str, password: &str) {
        self.goto("/console/sign-in").await;
        self.fill("#email", email).await;
        self.fill("#password", password).await;
        self.click("form button[type=submit]").await;
        self.find("body").await;
    }

    /// Saves a PNG of the page to `target/screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("the screenshots directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("the screenshot is written");
        path
    }

    /// Posts the form at `css` (as the browser would, with its fields and
    /// hidden tokens, the same values each time) `times` times from the
    /// page, as a double click or a resubmission would; returns each answer's
    /// status, `X-Entitle-Code` header and body.
    pub async fn post_form(&self, css: &str, times: usize) -> Vec<(u16, String, String)> {
        let answers = self
            .client
            .execute(
                "const form = document.querySelector(arguments[0]);
                 const body = new URLSearchParams(new FormData(form)).toString();
                 const answers = [];
                 for (let i = 0; i < arguments[1]; i++) {
                     const xhr = new XMLHttpRequest();
                     xhr.open('POST', form.action, false);
                     xhr.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');
                     xhr.send(body);
                     answers.push([xhr.status, xhr.getResponseHeader('x-entitle-code') || '',
                                   xhr.responseText]);
                 }
                 return answers;",
                vec![json!(css), json!(times)],
            )
            .await
            .unwrap_or_else(|e| panic!("the form {css} posts: {e}"));
        serde_json::from_value(answers).expect("status, code and body per post")
    }

    /// Ends the session (Chromium exits) and stops chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A console staff member with a known password; returns their email and
/// password.
pub async fn staff_member(
    pool: &sqlx::PgPool,
    name: &str,
    role: entitle_jobs::token::Role,
) -> (String, String) {
    let email = format!("{name}@staff.test");
    let password = format!("{name}-correct-horse-battery");
    entitle_gateway::console::members::create(
        pool,
        entitle_gateway::console::members::NewMember {
            name,
            email: &email,
            role,
            password: &password,
        },
        "operator:bootstrap",
        "test staff",
    )
    .await
    .expect("the staff member is created");
    (email, password)
}
