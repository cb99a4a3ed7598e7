//! Email transport: what lettre does on the wire, checked against a real SMTP
//! server over TCP.

use std::time::{Duration, Instant};

use entitle_jobs::{
    config::EmailConfig,
    email::{Letter, Mailer},
};
use entitle_tests::smtp::SmtpSink;

fn mailer(port: u16) -> Mailer {
    let config: EmailConfig = serde_json::from_value(serde_json::json!({
        "smtp_url": format!("smtp://127.0.0.1:{port}"),
        "from": "Entitle Test <codes@entitle.test>",
        "redeem_url": "https://shop.test/redeem",
        "message_id_domain": "entitle.test",
        "smtp_timeout_secs": 5,
        "templates_dir": "",
        "bulk_threshold": 50,
        "notify_revocations": false,
        "smtp_connections": 1,
        "max_attempts": 3,
        "retry_max_backoff_secs": 1
    }))
    .expect("an email configuration");
    Mailer::new(&config).expect("a mailer")
}

fn letter(i: usize) -> Letter {
    Letter {
        to: "ada@example.com".parse().unwrap(),
        subject: format!("Message {i}"),
        text: "Your codes are on their way.".repeat(40),
        html: "<p>Your codes are on their way.</p>".repeat(40),
        message_id: format!("<nodelay-{i}@entitle.test>"),
        attachment: None,
    }
}

/// lettre writes the end of a message's data on its own; with Nagle's
/// algorithm on, those bytes wait for the server's delayed ACK (40 ms on
/// Linux) on every message. vendor/lettre sets TCP_NODELAY (vendor/README.md):
/// without it, 30 messages on one connection take at least 1.2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pooled_smtp_connection_sends_messages_without_waiting_for_delayed_acks() {
    let sink = SmtpSink::start();
    let mailer = mailer(sink.port);
    // The first message opens the connection.
    mailer.send(letter(0)).await.expect("sent");
    let started = Instant::now();
    for i in 1..=30 {
        mailer.send(letter(i)).await.expect("sent");
    }
    let took = started.elapsed();
    assert_eq!(sink.count(), 31);
    assert!(
        took < Duration::from_millis(600),
        "30 messages took {took:?}: each waited for a delayed ACK"
    );
}

/// A copy of the shipped templates with `file` replaced by `text`.
fn templates_with(file: &str, text: &str) -> std::path::PathBuf {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/templates/default");
    let dir = std::env::temp_dir().join(format!("entitle-templates-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("default")).unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("default").join(entry.file_name())).unwrap();
    }
    if !file.is_empty() {
        std::fs::write(dir.join("default").join(file), text).unwrap();
    }
    dir
}

/// Every template is rendered at start with sample data: a broken one
/// stops the process with its name and fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_template_stops_the_process_at_start() {
    let app = entitle_tests::TestApp::spawn_with(entitle_tests::Options {
        smtp: false,
        worker: false,
    })
    .await;
    let start = |dir: std::path::PathBuf| {
        let mut config = app.ctx.config.clone();
        config.email.templates_dir = dir.display().to_string();
        async move {
            let ctx = entitle_jobs::Context::connect(config).await.unwrap();
            ctx.prepare().await.map_err(|e| format!("{e:#}"))
        }
    };
    assert_eq!(
        start(templates_with("", "")).await,
        Ok(()),
        "the shipped templates pass"
    );
    let unclosed = start(templates_with("codes.html", "{% if codes %}<p>codes</p>")).await;
    let error = unclosed.unwrap_err();
    assert!(error.contains("default/codes"), "{error}");
    let typo = start(templates_with(
        "gift.txt",
        "Hello {{ recipient_name }}, from {{ buyer_nme }}",
    ))
    .await;
    let error = typo.unwrap_err();
    assert!(
        error.contains("default/gift") && error.contains("undefined"),
        "{error}"
    );
}
