//! Email: renders code messages from templates (HTML and plain text) and sends
//! them over SMTP with lettre.

use std::time::Duration;

use anyhow::Context as _;
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart, header::ContentType},
    transport::smtp::PoolConfig,
};
use minijinja::Environment;
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::config::EmailConfig;

/// The built-in templates, used unless `email.templates_dir` names a folder.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "default/codes.subject.txt",
        include_str!("../../ops/templates/default/codes.subject.txt"),
    ),
    (
        "default/codes.txt",
        include_str!("../../ops/templates/default/codes.txt"),
    ),
    (
        "default/codes.html",
        include_str!("../../ops/templates/default/codes.html"),
    ),
    (
        "default/bulk.subject.txt",
        include_str!("../../ops/templates/default/bulk.subject.txt"),
    ),
    (
        "default/bulk.txt",
        include_str!("../../ops/templates/default/bulk.txt"),
    ),
    (
        "default/bulk.html",
        include_str!("../../ops/templates/default/bulk.html"),
    ),
    (
        "default/gift.subject.txt",
        include_str!("../../ops/templates/default/gift.subject.txt"),
    ),
    (
        "default/gift.txt",
        include_str!("../../ops/templates/default/gift.txt"),
    ),
    (
        "default/gift.html",
        include_str!("../../ops/templates/default/gift.html"),
    ),
    (
        "default/receipt.subject.txt",
        include_str!("../../ops/templates/default/receipt.subject.txt"),
    ),
    (
        "default/receipt.txt",
        include_str!("../../ops/templates/default/receipt.txt"),
    ),
    (
        "default/receipt.html",
        include_str!("../../ops/templates/default/receipt.html"),
    ),
    (
        "default/revoked.subject.txt",
        include_str!("../../ops/templates/default/revoked.subject.txt"),
    ),
    (
        "default/revoked.txt",
        include_str!("../../ops/templates/default/revoked.txt"),
    ),
    (
        "default/revoked.html",
        include_str!("../../ops/templates/default/revoked.html"),
    ),
    (
        "default/reminder.subject.txt",
        include_str!("../../ops/templates/default/reminder.subject.txt"),
    ),
    (
        "default/reminder.txt",
        include_str!("../../ops/templates/default/reminder.txt"),
    ),
    (
        "default/reminder.html",
        include_str!("../../ops/templates/default/reminder.html"),
    ),
];

/// One code as an email shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CodeLine {
    pub display: String,
    pub last4: String,
    pub product: String,
    pub expires_on: String,
}

/// A file sent along with a message.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// A rendered message, ready to send.
#[derive(Debug, Clone)]
pub struct Letter {
    pub to: Mailbox,
    pub subject: String,
    pub text: String,
    pub html: String,
    pub message_id: String,
    pub attachment: Option<Attachment>,
}

/// Why a message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The server refused for good (5xx: no such mailbox, policy).
    #[error("rejected permanently: {0}")]
    Permanent(String),
    /// Worth retrying: connection refused, timeout, 4xx.
    #[error("not sent (will retry): {0}")]
    Transient(String),
}

/// Renders and sends email.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// lettre's pool caps the connections it keeps idle, not the ones it
    /// opens: every concurrent send beyond them opens one more. This caps
    /// the messages (so the connections) in flight per process.
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
    /// The longest one message may take, connection included.
    timeout: Duration,
    from: Mailbox,
    redeem_url: String,
    templates: Environment<'static>,
}

/// The redeem page of `url` without its `{code}` slot: up to the `?` or
/// `#` that starts the part holding it (or the URL as it is, without one).
pub fn redeem_page(url: &str) -> String {
    match url.find("{code}") {
        None => url.to_owned(),
        Some(slot) => {
            let cut = url[..slot].rfind(['?', '#']).unwrap_or(slot);
            url[..cut].to_owned()
        }
    }
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer").field("from", &self.from).finish()
    }
}

impl Mailer {
    pub fn new(config: &EmailConfig) -> anyhow::Result<Self> {
        let transport =
            AsyncSmtpTransport::<Tokio1Executor>::from_url(config.smtp_url.expose_secret())
                .context("Failed to read email.smtp_url")?
                .timeout(Some(Duration::from_secs(config.smtp_timeout_secs)))
                // Connections are reused across messages and batches.
                .pool_config(PoolConfig::new().max_size(config.smtp_connections))
                .build();
        let mut templates = Environment::new();
        // Printing a name the context lacks (a typo) is an error, found by
        // [`Mailer::check`] at start rather than by a customer's empty email.
        templates.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
        if config.templates_dir.is_empty() {
            for (name, source) in BUILT_IN {
                templates
                    .add_template(name, source)
                    .with_context(|| format!("Failed to parse built-in template {name}"))?;
            }
        } else {
            templates.set_loader(minijinja::path_loader(&config.templates_dir));
        }
        Ok(Self {
            transport,
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(
                config.smtp_connections as usize,
            )),
            timeout: Duration::from_secs(config.smtp_timeout_secs),
            from: config.from.parse().context("Failed to read email.from")?,
            redeem_url: config.redeem_url.clone(),
            templates,
        })
    }

    /// Renders template `name` (`codes`, `bulk`, `gift`, `receipt`,
    /// `revoked`) of template family `family`, falling back to the default
    /// family for templates it does not have. `context` is merged with
    /// `recipient_name` and `redeem_url`.
    pub fn letter(
        &self,
        family: &str,
        name: &str,
        to: Mailbox,
        message_id: &str,
        context: minijinja::Value,
        attachment: Option<Attachment>,
    ) -> anyhow::Result<Letter> {
        let context = minijinja::context! {
            recipient_name => to.name.clone(),
            // `redeem_link | replace("{code}", code.display)`: a link that
            // carries the code, when the platform's URL has a `{code}` slot
            // (best in the fragment, `#code={code}`, which no server logs);
            // `redeem_url`: the page itself.
            redeem_url => redeem_page(&self.redeem_url),
            redeem_link => self.redeem_url,
            attachment_name => attachment.as_ref().map(|a| a.filename.clone()),
            ..context
        };
        let render = |part: &str| -> anyhow::Result<String> {
            let wanted = format!("{family}/{name}.{part}");
            let template = match self.templates.get_template(&wanted) {
                Ok(t) => t,
                Err(_) => {
                    let fallback = format!("default/{name}.{part}");
                    self.templates.get_template(&fallback).with_context(|| {
                        format!("Failed to find email template {wanted} or {fallback}")
                    })?
                }
            };
            template
                .render(&context)
                .with_context(|| format!("Failed to render email template {wanted}"))
        };
        Ok(Letter {
            subject: render("subject.txt")?.trim().to_owned(),
            text: render("txt")?,
            html: render("html")?,
            message_id: message_id.to_owned(),
            attachment,
            to,
        })
    }

    /// Renders every template of every family in `families` (and the
    /// default one) with sample data, so a broken template stops the
    /// process at start with its name and fault, not a send months later.
    pub fn check<'a>(&self, families: impl IntoIterator<Item = &'a str>) -> anyhow::Result<()> {
        let mut families: Vec<&str> = families.into_iter().collect();
        families.push("default");
        families.sort_unstable();
        families.dedup();
        let to: Mailbox = "Sam Sample <sam@example.com>"
            .parse()
            .expect("a sample address");
        let codes: Vec<CodeLine> = ["7K3M-Q9XD-2WPA-HT5C", "Q9XD-2WPA-HT5C-7K3M"]
            .iter()
            .map(|display| CodeLine {
                display: (*display).to_owned(),
                last4: display[display.len() - 4..].to_owned(),
                product: "Sample product".to_owned(),
                expires_on: "2027-12-31".to_owned(),
            })
            .collect();
        for family in families {
            for name in ["codes", "bulk", "gift", "receipt", "revoked", "reminder"] {
                let attachment = (name == "bulk").then(|| Attachment {
                    filename: "activation-codes.csv".to_owned(),
                    content_type: "text/csv; charset=utf-8",
                    body: Vec::new(),
                });
                let context = minijinja::context! {
                    codes => codes,
                    buyer_name => Some("Bea Buyer"),
                    message => Some("Happy birthday!"),
                    gift_recipient_email => Some("sam@example.com"),
                    gift_recipient_name => Some("Sam Sample"),
                    code_count => 2,
                    sent => true,
                    send_on => Some("2027-01-01 09:00 UTC"),
                };
                self.letter(
                    family,
                    name,
                    to.clone(),
                    "<check@entitle>",
                    context,
                    attachment,
                )
                .with_context(|| {
                    format!(
                        "email template check failed ({family}/{name}, rendered with sample data)"
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Sends a letter; the answer is the server's reply, kept on the delivery.
    pub async fn send(&self, letter: Letter) -> Result<String, SendError> {
        let body = MultiPart::alternative_plain_html(letter.text, letter.html);
        let body = match letter.attachment {
            None => body,
            Some(a) => {
                let content_type = ContentType::parse(a.content_type)
                    .map_err(|e| SendError::Permanent(format!("attachment type: {e}")))?;
                MultiPart::mixed().multipart(body).singlepart(
                    lettre::message::Attachment::new(a.filename).body(a.body, content_type),
                )
            }
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(letter.to)
            .subject(letter.subject)
            .message_id(Some(letter.message_id))
            .multipart(body)
            .map_err(|e| SendError::Permanent(format!("message could not be built: {e}")))?;
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| SendError::Transient(e.to_string()))?;
        // lettre bounds connecting, not every read: a server that accepts the
        // connection and then says nothing would hold the send (and, through
        // its renewed lease, the delivery) for ever.
        let sent = tokio::time::timeout(self.timeout, self.transport.send(message))
            .await
            .map_err(|_| {
                SendError::Transient(format!(
                    "the SMTP server did not finish within {} s",
                    self.timeout.as_secs()
                ))
            })?;
        match sent {
            Ok(response) => Ok(format!(
                "{} {}",
                response.code(),
                response.message().collect::<Vec<_>>().join(" ")
            )),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(e.to_string())),
            Err(e) => Err(SendError::Transient(e.to_string())),
        }
    }
}
