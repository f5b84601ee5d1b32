//! What a poisoned lock means here: a thread panicked while holding it, so the data behind it may
//! be half-updated. The server **fails closed**:
//!
//! - [`grant`]: operations that give something — admit a session, let a request past a rate
//!   limit, trust a cached key — refuse with an error instead;
//! - [`recover`]: operations that only take something away or hand out what is already owed —
//!   closing sessions, unsubscribing, delivering a committed change — go ahead on the data as it
//!   is, since skipping them would keep a revoked session open or lose a change.

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Locks `mutex` for an operation that grants access; a poisoned lock refuses.
pub(crate) fn grant<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    mutex.lock().map_err(|_| Error::internal("a lock was poisoned by a panic; refusing"))
}

/// Locks `mutex` for an operation that only takes access away or delivers; a poisoned lock is
/// used as it is.
pub(crate) fn recover<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_refuses_grants_and_allows_revocations() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let poisoner = m.clone();
        let _ = std::thread::spawn(move || {
            let _held = poisoner.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(grant(&m).map(|g| *g).map_err(|e| e.reason), Err(ddp_protocol::Reason::InternalError));
        assert_eq!(*recover(&m), 1);
    }
}
