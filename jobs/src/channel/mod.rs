//! Channel adapters: each verifies its own signatures, names its events, and
//! maps them to the channel-neutral [`Command`](crate::command::Command).
//! Adding a channel is one module here and one route in the gateway.

pub mod native;
pub mod shopify;
pub mod stripe;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::JobError;

/// Header lookup, so adapters do not depend on an HTTP library.
pub trait Headers {
    /// The header's value, when present and text.
    fn header(&self, name: &str) -> Option<&str>;
}

/// How the gateway files an authentic event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The channel's own id for the event (what duplicates share).
    pub event_id: String,
    /// The channel's event type or topic.
    pub event_type: String,
}

/// The longest id Entitle keeps (event ids, order ids, refund ids, SKUs,
/// accounts): well inside what a Postgres index entry can hold.
pub const MAX_ID_BYTES: usize = 255;

/// The event type of an authentic event that could not be named (no event
/// id, no topic): it is kept, under an id derived from its body, and failed.
pub const UNREADABLE: &str = "unreadable";

impl Envelope {
    /// An envelope whose id and type the inbox can keep: present, at most
    /// [`MAX_ID_BYTES`], no control characters (Postgres text refuses NUL).
    pub fn checked(event_id: &str, event_type: &str) -> Result<Envelope, String> {
        id_problem("the event id", event_id)
            .or_else(|| id_problem("the event type", event_type))
            .map_or_else(
                || {
                    Ok(Envelope {
                        event_id: event_id.to_owned(),
                        event_type: event_type.to_owned(),
                    })
                },
                Err,
            )
    }

    /// The envelope of an authentic event that cannot be named: the same
    /// body sent again is the same event.
    pub fn unreadable(body: &[u8]) -> Envelope {
        use sha2::Digest as _;
        Envelope {
            event_id: format!("{UNREADABLE}:{}", hex::encode(Sha256::digest(body))),
            event_type: UNREADABLE.to_owned(),
        }
    }
}

/// Why an id cannot be kept as it is, if it cannot.
pub(crate) fn id_problem(what: &str, id: &str) -> Option<String> {
    if id.trim().is_empty() {
        Some(format!("{what} is empty"))
    } else if id.len() > MAX_ID_BYTES {
        Some(format!(
            "{what} is {} bytes long; at most {MAX_ID_BYTES} are kept",
            id.len()
        ))
    } else if id.chars().any(char::is_control) {
        Some(format!("{what} {id:?} holds a control character"))
    } else {
        None
    }
}

/// Why an authentic event can never be carried out as it is: its stable
/// code (`event_malformed`, `topic_mismatch`, `order_too_large`) and a
/// sentence naming what is wrong. The native channel answers it as a 400;
/// Stripe and Shopify events are kept and marked failed with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Unusable {
    pub code: &'static str,
    pub detail: String,
}

impl Unusable {
    /// The body is not what the channel's schema says.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Unusable {
            code: "event_malformed",
            detail: detail.into(),
        }
    }
}

impl From<Unusable> for JobError {
    fn from(unusable: Unusable) -> Self {
        JobError::Permanent {
            code: unusable.code,
            detail: unusable.detail,
        }
    }
}

/// What intake makes of an authentic Stripe or Shopify event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screened {
    /// Filed for the worker to carry out.
    Usable(Envelope),
    /// Filed already failed, so the channel, answered 2xx, does not retry an
    /// event no retry can mend, and operations see it at once.
    Unusable { envelope: Envelope, why: Unusable },
}

/// A body as JSON text. JSON is UTF-8 (RFC 8259), so a body that is not
/// cannot be read; it is kept byte for byte all the same.
pub fn json_text(body: &[u8]) -> Result<&str, Unusable> {
    std::str::from_utf8(body)
        .map_err(|e| Unusable::malformed(format!("the body is not UTF-8, so it is not JSON: {e}")))
}

/// The engine's unit cap (`worker.max_units_per_order`), as every channel
/// meets it: an order of more units is never issued.
pub fn check_unit_cap(order_id: &str, units: u64, cap: u32) -> Result<(), Unusable> {
    if units > u64::from(cap) {
        return Err(Unusable {
            code: "order_too_large",
            detail: format!(
                "order {order_id} has {units} units; at most {cap} (worker.max_units_per_order) can be issued"
            ),
        });
    }
    Ok(())
}

/// Why a webhook's signature was not accepted. Nothing is stored for these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is missing")]
    Missing,
    #[error("the signature header cannot be parsed")]
    Malformed,
    #[error("the signature's timestamp is outside the accepted tolerance")]
    Stale,
    #[error("no signature matches the body under any configured secret")]
    Mismatch,
    #[error("this channel has no webhook secret configured")]
    NotConfigured,
}

impl SignatureError {
    /// The stable error code answered to the sender.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Stale => "signature_stale",
            SignatureError::Mismatch => "signature_invalid",
            SignatureError::NotConfigured => "channel_not_configured",
        }
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Whether any of `candidates` is the MAC of `parts` under any of `keys`;
/// each comparison is constant-time.
pub(crate) fn any_matches(keys: &[Vec<u8>], parts: &[&[u8]], candidates: &[Vec<u8>]) -> bool {
    keys.iter().any(|key| {
        let mac = hmac_sha256(key, parts);
        candidates
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    })
}

pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
