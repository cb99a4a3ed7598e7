//! Channel adapters: each verifies its own signatures and maps its events to
//! the channel-neutral [`Command`](crate::command::Command).

pub mod stripe;

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
}

impl SignatureError {
    /// The stable error code answered to the sender.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Stale => "signature_stale",
            SignatureError::Mismatch => "signature_invalid",
        }
    }
}
