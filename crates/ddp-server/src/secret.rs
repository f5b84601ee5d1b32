//! Secrets: device keys, project API keys and the admin key.
//!
//! A secret is 32 random bytes, base64url-encoded behind a short prefix that tells its kind
//! (`ddpd_` device, `ddpp_` project, `ddpa_` admin). Only its SHA-256 digest is stored: for
//! high-entropy secrets that is as safe as a slow password hash and costs nanoseconds, which
//! matters when thousands of devices reconnect at once.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngExt;
use sha2::{Digest, Sha256};

/// The kind of a secret, shown in its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SecretKind {
    /// A device API key.
    Device,
    /// A project API key.
    Project,
    /// The operator's admin key.
    Admin,
}

impl SecretKind {
    const fn prefix(self) -> &'static str {
        match self {
            SecretKind::Device => "ddpd_",
            SecretKind::Project => "ddpp_",
            SecretKind::Admin => "ddpa_",
        }
    }
}

/// A new random secret of `kind`.
pub(crate) fn generate(kind: SecretKind) -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("{}{}", kind.prefix(), URL_SAFE_NO_PAD.encode(bytes))
}

/// The SHA-256 digest under which a secret is stored.
pub(crate) fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefixed_random_and_long() {
        let a = generate(SecretKind::Device);
        let b = generate(SecretKind::Device);
        assert!(a.starts_with("ddpd_") && a.len() == 5 + 43, "{a}");
        assert_ne!(a, b);
        assert!(generate(SecretKind::Project).starts_with("ddpp_"));
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest("x"), digest("x"));
    }
}
