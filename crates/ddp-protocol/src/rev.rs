//! Store revisions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A store's revision: 0 when new and empty, then incremented by exactly one per committed set or
/// delete, and never reused. Every item also remembers the rev at which it was last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rev(pub u64);

impl Rev {
    /// The rev of a new, empty store.
    pub const ZERO: Rev = Rev(0);

    /// The rev that follows this one.
    pub const fn next(self) -> Rev {
        Rev(self.0 + 1)
    }

    /// The rev as an HTTP entity tag: the decimal number in double quotes.
    pub fn etag(self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
