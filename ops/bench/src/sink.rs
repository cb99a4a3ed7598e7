//! A counting SMTP sink for the pipeline benchmarks: a real SMTP server over
//! TCP that keeps, for each message, only its Message-ID and when it was
//! accepted, so it can take thousands of messages a second.

use std::{
    collections::HashMap,
    net::TcpListener,
    sync::{Arc, Mutex},
    time::Instant,
};

use mailin_embedded::{Handler, Response, Server, response};

/// Message-ID → when the sink accepted it (the first time), and how many
/// messages arrived in all (a duplicate counts again).
#[derive(Default)]
struct Received {
    first: HashMap<String, Instant>,
    /// Message-ID → the wall-clock time it was first accepted (to set
    /// beside the time Postgres recorded it as sent).
    first_wall: HashMap<String, std::time::SystemTime>,
    /// Message-ID → how many times it arrived.
    times: HashMap<String, usize>,
    total: usize,
}

#[derive(Clone)]
struct Counting {
    current: Vec<u8>,
    received: Arc<Mutex<Received>>,
}

/// The value of the Message-ID header, found without parsing the message.
fn message_id(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let at = text
        .find("\nMessage-ID:")
        .or_else(|| text.find("\nMessage-Id:"))?;
    let rest = &text[at + 12..];
    let start = rest.find('<')?;
    let end = rest[start..].find('>')?;
    Some(rest[start..start + end + 1].to_owned())
}

impl Handler for Counting {
    fn data_start(&mut self, _: &str, _: &str, _: bool, _: &[String]) -> Response {
        self.current.clear();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let now = Instant::now();
        let id = message_id(&self.current).unwrap_or_default();
        let mut received = self.received.lock().expect("sink lock");
        received.total += 1;
        *received.times.entry(id.clone()).or_insert(0) += 1;
        received
            .first_wall
            .entry(id.clone())
            .or_insert_with(std::time::SystemTime::now);
        received.first.entry(id).or_insert(now);
        response::OK
    }
}

/// The sink, running on its own threads until the process ends.
#[derive(Clone)]
pub struct Sink {
    pub port: u16,
    received: Arc<Mutex<Received>>,
}

impl Sink {
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Received::default()));
        let handler = Counting {
            current: Vec::new(),
            received: received.clone(),
        };
        let mut server = Server::new(handler);
        server
            .with_name("entitle-bench-sink")
            .with_num_threads(256)
            .with_tcp_listener(listener);
        std::thread::spawn(move || {
            if let Err(e) = server.serve() {
                eprintln!("the benchmark's SMTP sink stopped: {e}");
            }
        });
        Ok(Self { port, received })
    }

    /// Messages accepted so far, duplicates included.
    pub fn total(&self) -> usize {
        self.received.lock().expect("sink lock").total
    }

    /// Distinct Message-IDs accepted so far.
    pub fn distinct(&self) -> usize {
        self.received.lock().expect("sink lock").first.len()
    }

    /// When each Message-ID was first accepted.
    pub fn arrivals(&self) -> HashMap<String, Instant> {
        self.received.lock().expect("sink lock").first.clone()
    }

    /// When each of `ids` was first accepted, if it was: the lock is held
    /// for the look-ups only, so a tracker asking often does not keep the
    /// sink from accepting (copying the whole map held it for milliseconds
    /// once it had thousands of entries).
    pub fn arrivals_of<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a String>,
    ) -> Vec<Option<Instant>> {
        let received = self.received.lock().expect("sink lock");
        ids.into_iter()
            .map(|id| received.first.get(id).copied())
            .collect()
    }

    /// When each Message-ID was first accepted, by the wall clock.
    pub fn arrivals_wall(&self) -> HashMap<String, std::time::SystemTime> {
        self.received.lock().expect("sink lock").first_wall.clone()
    }

    /// How many times each Message-ID arrived (more than once: a duplicate).
    pub fn times(&self) -> HashMap<String, usize> {
        self.received.lock().expect("sink lock").times.clone()
    }

    /// Forgets what arrived (between phases).
    pub fn clear(&self) {
        let mut received = self.received.lock().expect("sink lock");
        received.first.clear();
        received.first_wall.clear();
        received.times.clear();
        received.total = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::message_id;

    #[test]
    fn the_message_id_is_read_from_the_headers() {
        let raw = b"From: a@b\r\nMessage-ID: <0190-1@entitle.bench>\r\nSubject: x\r\n\r\nbody";
        assert_eq!(message_id(raw).as_deref(), Some("<0190-1@entitle.bench>"));
        assert_eq!(message_id(b"Subject: none\r\n\r\n"), None);
    }
}
