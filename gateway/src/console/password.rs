//! Staff passwords: argon2id hashes (PHC strings), verified off the async
//! threads because hashing is slow on purpose.

use std::sync::LazyLock;

use argon2::{
    Argon2,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};

/// The shortest password accepted.
pub const MIN_LENGTH: usize = 12;

/// The PHC string of `password`.
pub fn hash(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("Failed to hash a password: {e}"))
}

/// Whether `password` matches `hash`; a malformed hash matches nothing.
pub fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).ok().is_some_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Checks `password` against `hash`, or, with no member to check against,
/// against a throwaway hash: a wrong email then takes as long as a wrong
/// password, so timing does not tell which emails have accounts.
pub async fn verify_or_pretend(password: String, hash: Option<String>) -> bool {
    static DECOY: LazyLock<String> =
        LazyLock::new(|| self::hash(&generate()).expect("a decoy hash"));
    tokio::task::spawn_blocking(move || match hash {
        Some(hash) => verify(&password, &hash),
        None => {
            verify(&password, &DECOY);
            false
        }
    })
    .await
    .unwrap_or(false)
}

/// Hashes off the async threads.
pub async fn hash_blocking(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || hash(&password)).await?
}

/// A one-time password for a new member: 20 symbols from an alphabet
/// without look-alikes (about 100 bits), easy to read out or type.
pub fn generate() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    rand::fill(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}
