//! The per-VM token the host presents in its Hello.

use std::fmt;
use std::io::Read;

/// Number of random bytes in a token (it travels as 64 hex characters).
pub const TOKEN_BYTES: usize = 32;

/// A per-VM secret: 32 random bytes, carried as lowercase hex.
///
/// `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// A token string that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("token must be {} hex characters", TOKEN_BYTES * 2)]
pub struct BadToken;

impl Token {
    /// A fresh token from the kernel's CSPRNG (`/dev/urandom`).
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = [0u8; TOKEN_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Token(hex::encode(bytes)))
    }

    /// Parses a hex token (case-insensitive, stored lowercase).
    pub fn from_hex(s: &str) -> Result<Self, BadToken> {
        let s = s.trim();
        if s.len() != TOKEN_BYTES * 2 || hex::decode(s).is_err() {
            return Err(BadToken);
        }
        Ok(Token(s.to_ascii_lowercase()))
    }

    /// The hex form, as sent on the wire and stored in the agent config.
    pub fn as_hex(&self) -> &str {
        &self.0
    }

    /// Constant-time check of a presented token against this one.
    pub fn verify(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Compares two byte strings in time that depends only on their lengths.
///
/// Lengths are public (tokens have a fixed size), contents are not.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_hex_and_distinct() {
        let a = Token::generate().unwrap();
        let b = Token::generate().unwrap();
        assert_eq!(a.as_hex().len(), 64);
        assert!(a.as_hex().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(Token::from_hex(a.as_hex()).unwrap(), a);
        assert_eq!(format!("{a:?}"), "Token(<redacted>)");
    }

    #[test]
    fn verify_and_parse() {
        let t = Token::from_hex(&"AB".repeat(32)).unwrap();
        assert_eq!(t.as_hex(), "ab".repeat(32));
        assert!(t.verify(&"ab".repeat(32)));
        assert!(!t.verify(&"ab".repeat(31)));
        assert!(!t.verify(&format!("{}ac", "ab".repeat(31))));
        assert!(!t.verify(""));
        assert!(Token::from_hex("abc").is_err());
        assert!(Token::from_hex(&"zz".repeat(32)).is_err());
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }
}
