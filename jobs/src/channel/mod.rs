//! Channel adapters: each verifies its own signatures, names its events, and
//! maps them to the channel-neutral [`Command`](crate::command::Command).
//! Adding a channel is one module here and one route in the gateway.

pub mod native;
pub mod shopify;
pub mod stripe;

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

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
