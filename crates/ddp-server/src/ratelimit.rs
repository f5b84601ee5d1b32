//! Request rates per key: a token bucket for each device key and each project API key.
//!
//! Only the gate ([`Kv`](crate::kv::Kv)) asks it, so every write, read, event and session open
//! of a key is counted the same way whatever the transport; transports only map a refusal to
//! their wire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ddp_protocol::{ApiKeyId, DeviceId, Reason};

use crate::auth::Principal;
use crate::config::RateLimits;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Subject {
    Device(DeviceId),
    Project(ApiKeyId),
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Limits requests per key; the admin key is never limited.
pub(crate) struct RateLimiter {
    limits: RateLimits,
    buckets: Mutex<HashMap<Subject, Bucket>>,
}

/// Buckets kept before full ones are swept out.
const SWEEP_AT: usize = 50_000;

impl RateLimiter {
    /// A limiter with `limits`.
    pub(crate) fn new(limits: RateLimits) -> RateLimiter {
        RateLimiter { limits, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from the caller's bucket, or answers 429 with how long until the next
    /// token. A poisoned lock refuses (503).
    pub(crate) fn check(&self, principal: &Principal) -> Result<()> {
        self.check_at(principal, Instant::now())
    }

    fn check_at(&self, principal: &Principal, now: Instant) -> Result<()> {
        let (subject, rate) = match principal {
            Principal::Admin => return Ok(()),
            Principal::Device(d) => (Subject::Device(*d), self.limits.device_per_sec),
            Principal::Project(k) => (Subject::Project(k.id), self.limits.project_per_sec),
        };
        if rate == 0 {
            return Ok(());
        }
        let rate = f64::from(rate);
        let capacity = 2.0 * rate;
        let mut buckets = crate::locks::grant(&self.buckets)?;
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < capacity);
        }
        let bucket = buckets.entry(subject).or_insert(Bucket { tokens: capacity, last: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * rate).min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        Err(Error::new(
            Reason::RateLimitExceeded,
            format!("{principal} is over its limit of {rate} requests per second"),
        )
        .with_retry_after(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_of_twice_the_rate_then_refills() {
        let limiter = RateLimiter::new(RateLimits { device_per_sec: 5, project_per_sec: 0 });
        let dev = Principal::Device(DeviceId::new(1).expect("id"));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limiter.check_at(&dev, t0).is_ok());
        }
        let refused = limiter.check_at(&dev, t0).expect_err("over the burst");
        assert_eq!((refused.reason, refused.retry_after_secs()), (Reason::RateLimitExceeded, Some(1)));
        let wait = refused.retry_after.expect("a wait");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200), "exactly until the next token: {wait:?}");
        assert!(limiter.check_at(&dev, t0 + Duration::from_millis(200)).is_ok(), "one token back after 1/rate s");
        let other = Principal::Device(DeviceId::new(2).expect("id"));
        assert!(limiter.check_at(&other, t0).is_ok(), "buckets are per key");
        assert!(limiter.check_at(&Principal::Admin, t0).is_ok());
    }
}
