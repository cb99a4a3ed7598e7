//! Activation codes: drawn from a CSPRNG, written in Crockford base32 with a
//! check symbol, normalised from whatever a customer types, looked up by keyed
//! hash and kept sealed for re-delivery.
//!
//! A code is 15 random symbols (75 bits) and one Luhn mod 32 check symbol,
//! grouped as `XXXX-XXXX-XXXX-XXXX`. The check symbol catches every single
//! mistyped symbol before any database lookup.

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit},
};
use hmac::{Hmac, Mac};
use rand::RngExt;
use sha2::Sha256;

/// Crockford's base32 alphabet: no I, L, O or U to misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RANDOM_SYMBOLS: usize = 15;
const SYMBOLS: usize = RANDOM_SYMBOLS + 1;
const NONCE_LEN: usize = 24;

/// A well-formed code: 16 symbols of the alphabet whose check symbol matches.
/// `Debug` shows only the last four symbols, so a code cannot leak into logs
/// through a `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

impl std::fmt::Debug for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Code(…{})", self.last4())
    }
}

/// Why typed text is not a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedCode {
    #[error("a code has 16 symbols, this has {0}")]
    Length(usize),
    #[error("a code uses only digits and the letters A-Z except U")]
    Symbol,
    #[error("the code's check symbol does not match: a symbol was mistyped")]
    Check,
}

impl Code {
    /// Draws a new code from the thread-local CSPRNG (ChaCha, seeded by the OS).
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut values = [0u8; SYMBOLS];
        for v in values.iter_mut().take(RANDOM_SYMBOLS) {
            *v = rng.random_range(0..32u8);
        }
        values[RANDOM_SYMBOLS] = check_value(&values[..RANDOM_SYMBOLS]);
        Code(
            values
                .iter()
                .map(|&v| ALPHABET[v as usize] as char)
                .collect(),
        )
    }

    /// Normalises what a customer typed (case, spaces, dashes, O for 0, I and
    /// L for 1) and verifies the check symbol.
    pub fn parse(typed: &str) -> Result<Self, MalformedCode> {
        let mut values = Vec::with_capacity(SYMBOLS);
        for c in typed.chars() {
            if c.is_whitespace() || c == '-' || c == '_' {
                continue;
            }
            values.push(symbol_value(c).ok_or(MalformedCode::Symbol)?);
        }
        if values.len() != SYMBOLS {
            return Err(MalformedCode::Length(values.len()));
        }
        if check_value(&values[..RANDOM_SYMBOLS]) != values[RANDOM_SYMBOLS] {
            return Err(MalformedCode::Check);
        }
        Ok(Code(
            values
                .iter()
                .map(|&v| ALPHABET[v as usize] as char)
                .collect(),
        ))
    }

    /// The canonical 16 symbols, without grouping.
    pub fn canonical(&self) -> &str {
        &self.0
    }

    /// The code as printed for people: `XXXX-XXXX-XXXX-XXXX`.
    pub fn display(&self) -> String {
        let s = &self.0;
        format!("{}-{}-{}-{}", &s[0..4], &s[4..8], &s[8..12], &s[12..16])
    }

    /// The last four symbols, the only part shown in views.
    pub fn last4(&self) -> &str {
        &self.0[SYMBOLS - 4..]
    }
}

fn symbol_value(c: char) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        'O' => '0',
        'I' | 'L' => '1',
        c => c,
    };
    ALPHABET
        .iter()
        .position(|&a| a as char == c)
        .map(|p| p as u8)
}

/// Luhn mod N (N = 32) over symbol values. Doubling is a permutation of the
/// residues mod 32 once its carry is folded in, so any single substituted
/// symbol changes the sum; most adjacent swaps do too.
fn check_value(values: &[u8]) -> u8 {
    let n = 32u32;
    let mut factor = 2u32;
    let mut sum = 0u32;
    for &v in values.iter().rev() {
        let addend = factor * u32::from(v);
        sum += addend / n + addend % n;
        factor = if factor == 2 { 1 } else { 2 };
    }
    ((n - sum % n) % n) as u8
}

/// The two keys codes are protected with: one to hash for lookup, one to seal
/// for re-delivery.
#[derive(Clone)]
pub struct CodeKeys {
    hash_key: [u8; 32],
    seal: XChaCha20Poly1305,
    /// Earlier sealing keys (`codes.previous_seal_keys`), newest first:
    /// what they sealed still opens, until `reseal` moves it to `seal`.
    previous: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for CodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CodeKeys([REDACTED])")
    }
}

/// A sealed code could not be opened: wrong key or tampered data.
#[derive(Debug, thiserror::Error)]
#[error("a sealed code could not be opened (wrong codes.seal_key, or damaged data)")]
pub struct UnsealError;

impl CodeKeys {
    pub fn new(hash_key: [u8; 32], seal_key: [u8; 32]) -> Self {
        Self::rotated(hash_key, seal_key, &[])
    }

    /// Keys during a rotation of the sealing key: everything is sealed with
    /// `seal_key`, and what `previous` sealed still opens.
    pub fn rotated(hash_key: [u8; 32], seal_key: [u8; 32], previous: &[[u8; 32]]) -> Self {
        Self {
            hash_key,
            seal: XChaCha20Poly1305::new(&seal_key.into()),
            previous: previous
                .iter()
                .map(|key| XChaCha20Poly1305::new(&(*key).into()))
                .collect(),
        }
    }

    /// The keyed hash a code is stored and looked up by.
    pub fn hash(&self, code: &Code) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.hash_key).expect("HMAC takes any key length");
        mac.update(code.canonical().as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The keyed hash of another secret (a platform key), under the same
    /// hashing key but a separate `domain`, so it can never equal a code's.
    pub fn hash_secret(&self, domain: &str, secret: &[u8]) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.hash_key).expect("HMAC takes any key length");
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(secret);
        mac.finalize().into_bytes().to_vec()
    }

    /// Encrypts a code with a fresh random nonce: `nonce || ciphertext`.
    pub fn seal(&self, code: &Code) -> Vec<u8> {
        self.seal_bytes(code.canonical().as_bytes())
    }

    /// Opens a sealed code.
    pub fn unseal(&self, sealed: &[u8]) -> Result<Code, UnsealError> {
        let plain = self.unseal_bytes(sealed)?;
        let text = String::from_utf8(plain).map_err(|_| UnsealError)?;
        Code::parse(&text).map_err(|_| UnsealError)
    }

    /// Encrypts another secret (an endpoint's signing secret) the way codes
    /// are: `nonce || ciphertext`, with a fresh random nonce.
    pub fn seal_bytes(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let sealed = self
            .seal
            .encrypt(&XNonce::from(nonce), plain)
            .expect("encrypting a short plaintext cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`CodeKeys::seal_bytes`] sealed, under the current key
    /// or an earlier one.
    pub fn unseal_bytes(&self, sealed: &[u8]) -> Result<Vec<u8>, UnsealError> {
        self.open(sealed).map(|(plain, _)| plain)
    }

    /// Opens sealed bytes; says whether an earlier key was needed (so they
    /// should be sealed again under the current one).
    pub fn open(&self, sealed: &[u8]) -> Result<(Vec<u8>, bool), UnsealError> {
        if sealed.len() <= NONCE_LEN {
            return Err(UnsealError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = XNonce::from(<[u8; NONCE_LEN]>::try_from(nonce).map_err(|_| UnsealError)?);
        if let Ok(plain) = self.seal.decrypt(&nonce, ciphertext) {
            return Ok((plain, false));
        }
        // The AEAD tag tells a wrong key apart: try the earlier ones.
        self.previous
            .iter()
            .find_map(|key| key.decrypt(&nonce, ciphertext).ok())
            .map(|plain| (plain, true))
            .ok_or(UnsealError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_parse_back_in_any_typing() {
        for _ in 0..200 {
            let code = Code::generate();
            let shown = code.display();
            assert_eq!(shown.len(), 19);
            assert_eq!(Code::parse(&shown).unwrap(), code);
            let sloppy = format!(" {} ", shown.to_lowercase().replace('-', " "));
            assert_eq!(Code::parse(&sloppy).unwrap(), code);
        }
    }

    #[test]
    fn look_alike_letters_are_read_as_digits() {
        // Build a valid code that contains 0 and 1, then type O and l instead.
        let body = "0123456789ABCDE";
        let values: Vec<u8> = body.chars().map(|c| symbol_value(c).unwrap()).collect();
        let check = ALPHABET[check_value(&values) as usize] as char;
        let code = Code::parse(&format!("{body}{check}")).unwrap();
        let typed = format!("Ol23456789abcde{check}");
        assert_eq!(Code::parse(&typed).unwrap(), code);
    }

    #[test]
    fn every_single_mistyped_symbol_is_caught() {
        for _ in 0..50 {
            let code = Code::generate();
            let canonical = code.canonical().as_bytes().to_vec();
            for pos in 0..SYMBOLS {
                for &replacement in ALPHABET.iter() {
                    if replacement == canonical[pos] {
                        continue;
                    }
                    let mut typo = canonical.clone();
                    typo[pos] = replacement;
                    let typo = String::from_utf8(typo).unwrap();
                    assert_eq!(Code::parse(&typo), Err(MalformedCode::Check), "{pos}");
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_and_symbols_are_malformed() {
        assert_eq!(Code::parse("ABCD-EFGH"), Err(MalformedCode::Length(8)));
        assert_eq!(
            Code::parse("ABCD-EFGH-JKMN-PQRU"),
            Err(MalformedCode::Symbol)
        );
        assert_eq!(
            Code::parse("ABCD-EFGH-JKMN-PQR!"),
            Err(MalformedCode::Symbol)
        );
    }

    #[test]
    fn codes_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(Code::generate().0));
        }
    }

    #[test]
    fn sealing_round_trips_and_detects_the_wrong_key() {
        let keys = CodeKeys::new([1; 32], [2; 32]);
        let code = Code::generate();
        let sealed = keys.seal(&code);
        assert!(!sealed.windows(16).any(|w| w == code.canonical().as_bytes()));
        assert_eq!(keys.unseal(&sealed).unwrap(), code);
        let other = CodeKeys::new([1; 32], [3; 32]);
        assert!(other.unseal(&sealed).is_err());
    }

    #[test]
    fn hashing_is_keyed_and_stable() {
        let code = Code::generate();
        let a = CodeKeys::new([1; 32], [2; 32]);
        let b = CodeKeys::new([9; 32], [2; 32]);
        assert_eq!(a.hash(&code), a.hash(&code));
        assert_ne!(a.hash(&code), b.hash(&code));
    }

    #[test]
    fn debug_output_hides_all_but_the_last_four_symbols() {
        let code = Code::generate();
        let debug = format!("{code:?}");
        assert!(!debug.contains(&code.canonical()[..12]));
        assert!(debug.contains(code.last4()));
    }

    #[test]
    fn a_rotated_key_opens_what_the_previous_one_sealed_and_seals_anew() {
        let code = Code::generate();
        let old = CodeKeys::new([1; 32], [2; 32]);
        let sealed_before = old.seal(&code);
        let rotated = CodeKeys::rotated([1; 32], [3; 32], &[[2; 32]]);
        assert_eq!(rotated.unseal(&sealed_before).unwrap(), code);
        assert!(rotated.open(&sealed_before).unwrap().1, "needs the old key");
        let sealed_after = rotated.seal(&code);
        assert!(!rotated.open(&sealed_after).unwrap().1);
        assert!(
            old.unseal(&sealed_after).is_err(),
            "new seals use the new key"
        );
        let only_new = CodeKeys::new([1; 32], [3; 32]);
        assert!(only_new.unseal(&sealed_before).is_err());
        assert_eq!(only_new.unseal(&sealed_after).unwrap(), code);
    }
}
