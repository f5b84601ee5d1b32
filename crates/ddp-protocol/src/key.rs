//! Keys of a key-value store.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Why a text is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is the empty string.
    #[error("key must not be empty")]
    Empty,
    /// The key is longer than 255 bytes.
    #[error("key is {0} bytes long; the limit is 255")]
    TooLong(usize),
    /// The key holds a character outside `A-Z a-z 0-9 _ - : .`.
    #[error("key holds {0:?}; keys use only A-Z a-z 0-9 _ - : .")]
    BadChar(char),
}

/// A key: 1–255 bytes of `A-Z a-z 0-9 _ - : .` (PROTOCOL.md §3). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(Arc<str>);

impl Key {
    /// Checks `s` against the key rule.
    pub fn validate(s: &str) -> Result<(), KeyError> {
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        if let Some(c) = s.chars().find(|&c| !is_key_char(c)) {
            return Err(KeyError::BadChar(c));
        }
        if s.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong(s.len()));
        }
        Ok(())
    }

    /// The key for `s`, if it obeys the key rule.
    pub fn new(s: &str) -> Result<Key, KeyError> {
        Self::validate(s)?;
        Ok(Key(Arc::from(s)))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `c` may appear in a key.
pub const fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')
}

impl TryFrom<String> for Key {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Key, KeyError> {
        Self::validate(&s)?;
        Ok(Key(Arc::from(s)))
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;
    fn try_from(s: &str) -> Result<Key, KeyError> {
        Key::new(s)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0.to_string()
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["a", "Z9", "temp_target", "sensor-1", "zone:kitchen.temp", &"x".repeat(255)] {
            assert!(Key::new(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert_eq!(Key::new(&"x".repeat(256)), Err(KeyError::TooLong(256)));
        assert_eq!(Key::new("a/b"), Err(KeyError::BadChar('/')));
        assert_eq!(Key::new("a b"), Err(KeyError::BadChar(' ')));
        assert_eq!(Key::new("é"), Err(KeyError::BadChar('é')));
        assert!(serde_json::from_str::<Key>("\"a/b\"").is_err());
    }
}
