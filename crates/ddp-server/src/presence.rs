//! Which devices have a live sync session on this node, over any transport.

use std::collections::HashMap;
use std::sync::Mutex;

use ddp_protocol::DeviceId;

/// Live sync sessions per device.
#[derive(Default)]
pub struct Presence {
    sessions: Mutex<HashMap<DeviceId, usize>>,
}

impl Presence {
    /// Counts a new session for `device` if it has fewer than `max`; `Some(true)` when it is the
    /// device's first, `None` when the device is at its limit.
    pub fn open(&self, device: DeviceId, max: usize) -> Option<bool> {
        let mut sessions = self.sessions.lock().ok()?;
        let n = sessions.entry(device).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(*n == 1)
    }

    /// Uncounts a session of `device`; true when it was the last.
    pub fn close(&self, device: DeviceId) -> bool {
        let Ok(mut sessions) = self.sessions.lock() else { return false };
        match sessions.get_mut(&device) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                sessions.remove(&device);
                true
            }
            None => false,
        }
    }

    /// Whether `device` has a live session.
    pub fn is_connected(&self, device: DeviceId) -> bool {
        self.sessions.lock().map(|s| s.contains_key(&device)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sessions_up_to_the_cap() {
        let p = Presence::default();
        let d = DeviceId::new(3).expect("id");
        assert_eq!(p.open(d, 2), Some(true));
        assert_eq!(p.open(d, 2), Some(false));
        assert_eq!(p.open(d, 2), None);
        assert!(p.is_connected(d));
        assert!(!p.close(d));
        assert!(p.close(d));
        assert!(!p.is_connected(d));
        assert!(!p.close(d), "closing an unknown session is harmless");
    }
}
