//! Typed ids. Every id is a positive integer (u64, never 0) written in decimal on the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a text is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an id must be a positive decimal integer, got {0:?}")]
pub struct IdError(pub String);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u64")]
        pub struct $name(u64);

        impl $name {
            /// The id for `n`, or `None` for 0.
            pub const fn new(n: u64) -> Option<Self> {
                if n == 0 { None } else { Some(Self(n)) }
            }

            /// The id as a plain integer.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl TryFrom<u64> for $name {
            type Error = IdError;
            fn try_from(n: u64) -> Result<Self, IdError> {
                Self::new(n).ok_or_else(|| IdError(n.to_string()))
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            /// Only plain decimal digits are accepted: no sign, no spaces, no leading `+`.
            fn from_str(s: &str) -> Result<Self, IdError> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(IdError(s.to_owned()));
                }
                s.parse::<u64>().ok().and_then(Self::new).ok_or_else(|| IdError(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// A device's id.
    DeviceId
);
id_type!(
    /// A home's id.
    HomeId
);
id_type!(
    /// A project API key's id (not its secret).
    ApiKeyId
);
id_type!(
    /// A fleet job's id (PROTOCOL.md §12).
    JobId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_positive_decimal_only() {
        assert_eq!("42".parse::<DeviceId>().map(DeviceId::get), Ok(42));
        for bad in ["", "0", "-1", "+1", " 1", "1 ", "0x10", "abc", "18446744073709551616"] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn serializes_as_a_number() {
        let id = HomeId::new(7).expect("nonzero");
        assert_eq!(serde_json::to_string(&id).expect("serialize"), "7");
        assert!(serde_json::from_str::<HomeId>("0").is_err());
    }
}
