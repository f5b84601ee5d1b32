//! Authentication: turning a token into a [`Principal`] (PROTOCOL.md §1).
//!
//! The admin key is compared in constant time against its digest. Device and project keys are
//! looked up by their SHA-256 digest in the store, and found principals are cached. Every admin
//! change that can revoke or narrow a key (rotation, deletion of a key, device or home) clears the
//! cache before the change is acknowledged, so revocation is effective at once. A generation
//! counter keeps a lookup that raced with such a change from re-inserting a stale entry, and
//! lets the gate see that a session it is opening raced with one (it then checks again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ddp_protocol::{DeviceId, HomeId};
use ddp_store::{ApiKeyRecord, KeyHolder, Origin, Permission, Store};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::{locks, secret};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// The operator, with the admin key: may do everything.
    Admin,
    /// A device, with its own key: its own store, its own events, its own record.
    Device(DeviceId),
    /// An app, with a project API key.
    Project(Arc<ApiKeyRecord>),
}

impl Principal {
    /// The origin recorded on changes this principal makes.
    pub(crate) fn origin(&self) -> Origin {
        match self {
            Principal::Admin => Origin::Admin,
            Principal::Device(d) => Origin::Device(*d),
            Principal::Project(k) => Origin::ProjectKey(k.id),
        }
    }

    /// Whether this is the admin key.
    pub(crate) fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin)
    }

    /// Whether a project key may see `home` (admin: always; devices: never).
    pub(crate) fn sees_home(&self, home: HomeId) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Device(_) => false,
            Principal::Project(k) => k.homes.as_ref().is_none_or(|homes| homes.contains(&home)),
        }
    }

    /// Whether this principal may write (read-only project keys may not).
    pub(crate) fn may_write(&self) -> bool {
        match self {
            Principal::Admin | Principal::Device(_) => true,
            Principal::Project(k) => k.permission == Permission::ReadWrite,
        }
    }

    /// Fails with 403 unless this is the admin key.
    pub(crate) fn require_admin(&self) -> Result<()> {
        if self.is_admin() { Ok(()) } else { Err(Error::denied("this needs the admin key")) }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Admin => f.write_str("admin"),
            Principal::Device(d) => write!(f, "device {d}"),
            Principal::Project(k) => write!(f, "project key {}", k.id),
        }
    }
}

/// The token in an `Authorization` header value: `ModeCloud <token>` or `Bearer <token>`.
pub(crate) fn token_from_header(value: &str) -> Result<&str> {
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    let token = token.trim();
    if !(scheme.eq_ignore_ascii_case("ModeCloud") || scheme.eq_ignore_ascii_case("Bearer")) || token.is_empty() {
        return Err(Error::unauthenticated("the Authorization header must be `ModeCloud <token>` or `Bearer <token>`"));
    }
    Ok(token)
}

/// Principals found by key digest, dropped whenever an admin change could revoke one.
#[derive(Default)]
pub(crate) struct AuthCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<[u8; 32], Principal>,
    generation: u64,
}

/// Entries kept before the cache starts over (bounds memory with many distinct keys).
const CACHE_MAX: usize = 100_000;

impl AuthCache {
    /// A cached principal and the generation it was looked up in; a poisoned cache is not
    /// trusted (every lookup goes to the store and nothing is cached again).
    fn get(&self, digest: &[u8; 32]) -> (Option<Principal>, u64) {
        match locks::grant(&self.inner) {
            Ok(c) => (c.entries.get(digest).cloned(), c.generation),
            Err(_) => (None, u64::MAX),
        }
    }

    fn insert(&self, generation: u64, digest: [u8; 32], principal: Principal) {
        if let Ok(mut c) = locks::grant(&self.inner)
            && c.generation == generation
        {
            if c.entries.len() >= CACHE_MAX {
                c.entries.clear();
            }
            c.entries.insert(digest, principal);
        }
    }

    /// Forgets every cached principal (also when the lock was poisoned).
    pub(crate) fn invalidate(&self) {
        let mut c = locks::recover(&self.inner);
        c.entries.clear();
        c.generation = c.generation.wrapping_add(1);
    }

    /// How many times the cache was invalidated: changes whenever an admin change may have
    /// revoked or narrowed a key.
    fn generation(&self) -> u64 {
        locks::recover(&self.inner).generation
    }
}

/// A principal, with what is needed to check again later that its key still stands.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    /// Who it is.
    pub(crate) principal: Principal,
    digest: [u8; 32],
    generation: u64,
}

/// Turns tokens into principals.
pub(crate) struct Authenticator {
    admin_digest: [u8; 32],
    store: Arc<dyn Store>,
    cache: Arc<AuthCache>,
}

impl Authenticator {
    /// An authenticator for the admin key with SHA-256 digest `admin_digest`, looking device and
    /// project keys up in `store`.
    pub(crate) fn new(admin_digest: [u8; 32], store: Arc<dyn Store>, cache: Arc<AuthCache>) -> Authenticator {
        Authenticator { admin_digest, store, cache }
    }

    /// The principal holding `token`, or 401.
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Authenticated> {
        self.by_digest(secret::digest(token)).await
    }

    async fn by_digest(&self, digest: [u8; 32]) -> Result<Authenticated> {
        if bool::from(digest.ct_eq(&self.admin_digest)) {
            return Ok(Authenticated { principal: Principal::Admin, digest, generation: self.cache.generation() });
        }
        let (cached, generation) = self.cache.get(&digest);
        if let Some(principal) = cached {
            return Ok(Authenticated { principal, digest, generation });
        }
        let principal = match self.store.principal_by_key_hash(digest).await? {
            Some(KeyHolder::Device(d)) => Principal::Device(d),
            Some(KeyHolder::Project(k)) => Principal::Project(Arc::new(k)),
            None => return Err(Error::unauthenticated("the token is not valid: unknown, revoked or rotated")),
        };
        self.cache.insert(generation, digest, principal.clone());
        Ok(Authenticated { principal, digest, generation })
    }

    /// Authenticates a device by id and key (MQTT CONNECT): the key must be that device's.
    pub(crate) async fn authenticate_device(&self, device: DeviceId, key: &str) -> Result<Authenticated> {
        let found = self.authenticate(key).await?;
        match found.principal {
            Principal::Device(d) if d == device => Ok(found),
            _ => Err(Error::unauthenticated("the key is not this device's key")),
        }
    }

    /// Whether an admin change may have revoked or narrowed keys since `auth` was looked up.
    pub(crate) fn may_have_changed(&self, auth: &Authenticated) -> bool {
        self.cache.generation() != auth.generation
    }

    /// Looks the key of `auth` up again: `Ok` with the principal it now stands for (the same,
    /// or a project key with another view), 401 if it was revoked or rotated.
    pub(crate) async fn again(&self, auth: &Authenticated) -> Result<Authenticated> {
        self.by_digest(auth.digest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_schemes_are_accepted() {
        assert_eq!(token_from_header("ModeCloud abc"), Ok("abc"));
        assert_eq!(token_from_header("Bearer abc"), Ok("abc"));
        assert_eq!(token_from_header("bearer   abc "), Ok("abc"));
        assert!(token_from_header("Basic abc").is_err());
        assert!(token_from_header("Bearer").is_err());
        assert!(token_from_header("abc").is_err());
    }
}
