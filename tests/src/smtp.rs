//! A real SMTP server for tests and local runs: it accepts every message over
//! TCP and keeps it, so a test can read the email a customer would get.

use std::{
    net::TcpListener,
    sync::{Arc, Mutex},
    time::Duration,
};

use mail_parser::MimeHeaders;
use mailin_embedded::{Handler, Response, Server, response};

/// One message as it arrived.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub to: Vec<String>,
    pub raw: Vec<u8>,
}

impl ReceivedMail {
    fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.raw)
            .expect("a parseable message")
    }

    pub fn subject(&self) -> String {
        self.parsed().subject().unwrap_or_default().to_owned()
    }

    pub fn message_id(&self) -> String {
        self.parsed().message_id().unwrap_or_default().to_owned()
    }

    /// The plain-text part, decoded.
    pub fn text(&self) -> String {
        self.parsed()
            .body_text(0)
            .map(|t| t.into_owned())
            .unwrap_or_default()
    }

    /// The HTML part, decoded.
    pub fn html(&self) -> String {
        self.parsed()
            .body_html(0)
            .map(|t| t.into_owned())
            .unwrap_or_default()
    }

    /// The first attachment: its file name and its text.
    pub fn attachment(&self) -> Option<(String, String)> {
        let parsed = self.parsed();
        let part = parsed.attachments().next()?;
        Some((
            part.attachment_name().unwrap_or_default().to_owned(),
            String::from_utf8_lossy(part.contents()).into_owned(),
        ))
    }

    /// Every distinct `XXXX-XXXX-XXXX-XXXX` in the text part, in order.
    pub fn codes(&self) -> Vec<String> {
        let text = self.text();
        let mut codes: Vec<String> = Vec::new();
        for word in text.split_whitespace() {
            let looks_like_code = word.len() == 19
                && word.split('-').count() == 4
                && word
                    .split('-')
                    .all(|g| g.len() == 4 && g.chars().all(|c| c.is_ascii_alphanumeric()));
            if looks_like_code && !codes.iter().any(|c| c == word) {
                codes.push(word.to_owned());
            }
        }
        codes
    }
}

type OnReceive = Arc<dyn Fn(&ReceivedMail) + Send + Sync>;

#[derive(Clone)]
struct Sink {
    current: Vec<u8>,
    to: Vec<String>,
    store: Arc<Mutex<Vec<ReceivedMail>>>,
    on_receive: Option<OnReceive>,
}

/// Recipients at this domain are refused for good (550), as a real server
/// refuses a mailbox that does not exist.
pub const UNDELIVERABLE_DOMAIN: &str = "undeliverable.test";

/// Recipients at this domain are deferred every time (451), as a server
/// that keeps asking to try again later would.
pub const DEFERRED_DOMAIN: &str = "deferred.test";

impl Handler for Sink {
    fn rcpt(&mut self, to: &str) -> Response {
        let to = to.trim_end_matches('>');
        if to.ends_with(UNDELIVERABLE_DOMAIN) {
            return Response::custom(550, "5.1.1 No such mailbox here".to_owned());
        }
        if to.ends_with(DEFERRED_DOMAIN) {
            return Response::custom(451, "4.7.1 Try again later".to_owned());
        }
        response::OK
    }

    fn data_start(&mut self, _domain: &str, _from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.current.clear();
        self.to = to.to_vec();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let mail = ReceivedMail {
            to: std::mem::take(&mut self.to),
            raw: std::mem::take(&mut self.current),
        };
        if let Some(f) = &self.on_receive {
            f(&mail);
        }
        self.store.lock().expect("sink lock").push(mail);
        response::OK
    }
}

/// An SMTP server on 127.0.0.1 that keeps what it receives. It runs on its
/// own threads until the process ends.
#[derive(Clone)]
pub struct SmtpSink {
    pub port: u16,
    store: Arc<Mutex<Vec<ReceivedMail>>>,
}

/// A port nobody listens on right now (it was free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl SmtpSink {
    /// Starts on a free port.
    pub fn start() -> Self {
        Self::start_on(0, None)
    }

    /// Starts on `port` (0 for any), calling `on_receive` for each message.
    pub fn start_on(port: u16, on_receive: Option<OnReceive>) -> Self {
        // The port may still be in TIME_WAIT from an earlier listener.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(%e, port, "SMTP port busy, retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot listen for SMTP on port {port}: {e}"),
            }
        };
        let port = listener.local_addr().expect("local address").port();
        let store = Arc::new(Mutex::new(Vec::new()));
        let sink = Sink {
            current: Vec::new(),
            to: Vec::new(),
            store: store.clone(),
            on_receive,
        };
        let mut server = Server::new(sink);
        server
            .with_name("entitle-sink")
            // A thread per connection: enough for every pooled connection of
            // three worker processes.
            .with_num_threads(32)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            if let Err(e) = server.serve() {
                tracing::error!(%e, "SMTP sink stopped");
            }
        });
        Self { port, store }
    }

    /// How many messages arrived so far (without copying them).
    pub fn count(&self) -> usize {
        self.store.lock().expect("sink lock").len()
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.store.lock().expect("sink lock").clone()
    }
}
