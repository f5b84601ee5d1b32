//! Where committed changes go. The store calls [`Fanout`] with every committed batch, in commit
//! order, before any writer is answered.

use std::sync::Arc;

use ddp_store::{CommitSink, Committed};

use crate::auth::AuthCache;

/// The server's [`CommitSink`].
pub struct Fanout {
    auth_cache: Arc<AuthCache>,
}

impl Fanout {
    /// A fan-out that keeps `auth_cache` true to admin changes.
    pub fn new(auth_cache: Arc<AuthCache>) -> Fanout {
        Fanout { auth_cache }
    }
}

impl CommitSink for Fanout {
    fn committed(&self, batch: &[Committed]) {
        if batch.iter().any(|c| matches!(c, Committed::Admin(_))) {
            self.auth_cache.invalidate();
        }
    }
}
