//! How many connections the listeners hold, and who gives way when they are full.
//!
//! Every listener (HTTP, MQTT, MQTT over TLS) admits each accepted connection through its
//! [`Door`] before serving it. A listener has a cap of its own, and all of them share one
//! budget, derived from the process's open-file limit with room left for the database (see
//! [`connection_budget`]), so that the process never runs out of file descriptors: an
//! exhausted process cannot even accept `/healthz`.
//!
//! At a cap the server **sheds the oldest connection that has not authenticated** (a silent or
//! trickling socket, an MQTT client that has not sent a valid CONNECT, an HTTP connection that
//! never carried a valid token) rather than refusing the new one: an attacker holding sockets
//! open cannot starve well-behaved clients. Only when every open connection has authenticated
//! is the new one refused (closed at once). A connection marks itself authenticated
//! ([`Conn::authenticated`]) once a credential checked out: after an HTTP request with a valid
//! token, an upgraded WebSocket, an accepted MQTT CONNECT.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::locks;

/// Files kept free of connections for everything else the process opens: stdio, the listeners,
/// the runtime's own descriptors, log files, the lock file.
const RESERVED_FILES: u64 = 64;
/// Fewest connections a budget allows, whatever the limit.
const MIN_BUDGET: usize = 16;
/// A listener at its cap says so in the log at most this often (the counters count every time).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The connection budget of a process whose open-file limit is `limit`, when storage holds
/// `storage_files` descriptors.
pub(crate) fn connection_budget(limit: u64, storage_files: u64) -> usize {
    let budget = limit.saturating_sub(RESERVED_FILES + storage_files);
    usize::try_from(budget).unwrap_or(usize::MAX).max(MIN_BUDGET)
}

/// The process's open-file limit (the soft one, which is what applies).
pub(crate) fn open_file_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
}

/// The caps of every listener of one server, over one shared budget.
pub(crate) struct Caps {
    total: usize,
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    open: usize,
    listeners: Vec<Listener>,
}

struct Listener {
    name: &'static str,
    cap: usize,
    open: usize,
    /// Connections in accept order that had not authenticated when they came; stale entries
    /// (gone, authenticated, already shed) are dropped as they are met.
    unauthenticated: VecDeque<Weak<Conn>>,
    /// When it last logged being at its cap.
    logged: Option<Instant>,
}

impl Listener {
    /// Whether to log being at the cap now (at most every [`LOG_EVERY`]).
    fn may_log(&mut self) -> bool {
        let now = Instant::now();
        if self.logged.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return false;
        }
        self.logged = Some(now);
        true
    }

    /// The oldest connection that may still be shed, dropping stale entries in front of it.
    fn oldest(&mut self) -> Option<Arc<Conn>> {
        while let Some(front) = self.unauthenticated.front() {
            match front.upgrade() {
                Some(conn) if conn.may_be_shed() => return Some(conn),
                _ => {
                    self.unauthenticated.pop_front();
                }
            }
        }
        None
    }
}

impl Caps {
    /// Caps whose listeners share a budget of `total` open connections.
    pub(crate) fn new(total: usize) -> Arc<Caps> {
        Arc::new(Caps {
            total: total.max(1),
            next_id: AtomicU64::new(1),
            inner: Mutex::new(Inner { open: 0, listeners: Vec::new() }),
        })
    }

    /// The shared budget.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// A listener named `name` (for logs and metrics) holding at most `cap` connections.
    pub(crate) fn door(self: &Arc<Self>, name: &'static str, cap: usize) -> Door {
        let mut inner = locks::recover(&self.inner);
        inner.listeners.push(Listener {
            name,
            cap: cap.max(1),
            open: 0,
            unauthenticated: VecDeque::new(),
            logged: None,
        });
        Door { caps: self.clone(), index: inner.listeners.len() - 1 }
    }

    fn release(&self, index: usize) {
        let mut inner = locks::recover(&self.inner);
        inner.open = inner.open.saturating_sub(1);
        if let Some(l) = inner.listeners.get_mut(index) {
            l.open = l.open.saturating_sub(1);
            metrics::gauge!("ddp_connections", "listener" => l.name).decrement(1.0);
        }
    }
}

/// Where one listener admits its connections.
pub(crate) struct Door {
    caps: Arc<Caps>,
    index: usize,
}

impl Door {
    /// Admits a connection just accepted: at once under the caps; at a cap, by shedding the
    /// oldest connection that has not authenticated (of this listener when its own cap is the
    /// one reached, else of any); `None` — refuse it — when every open connection concerned has
    /// authenticated.
    pub(crate) fn admit(&self) -> Option<Arc<Conn>> {
        let caps = &self.caps;
        let mut inner = locks::recover(&caps.inner);
        let listener = inner.listeners.get(self.index)?;
        let name = listener.name;
        let own_cap_reached = listener.open >= listener.cap;
        let budget_reached = inner.open >= caps.total;
        if own_cap_reached || budget_reached {
            let victim = if own_cap_reached {
                inner.listeners.get_mut(self.index).and_then(Listener::oldest)
            } else {
                // The oldest over every listener: connection ids grow in accept order.
                let mut oldest: Option<Arc<Conn>> = None;
                for l in inner.listeners.iter_mut() {
                    if let Some(c) = l.oldest()
                        && oldest.as_ref().is_none_or(|o| c.id < o.id)
                    {
                        oldest = Some(c);
                    }
                }
                oldest
            };
            let log = inner.listeners.get_mut(self.index).is_some_and(Listener::may_log);
            let (open, total) = (inner.open, caps.total);
            let Some(victim) = victim else {
                metrics::counter!("ddp_connections_refused_total", "listener" => name).increment(1);
                if log {
                    tracing::warn!(
                        listener = name,
                        open,
                        total,
                        "refusing connections: at the connection cap and every open connection has \
                         authenticated (raise --max-connections or the open-file limit)"
                    );
                }
                return None;
            };
            victim.shed();
            metrics::counter!("ddp_connections_shed_total", "listener" => name).increment(1);
            if log {
                tracing::warn!(
                    listener = name,
                    open,
                    total,
                    "at the connection cap: shedding the oldest connections that have not authenticated"
                );
            }
        }
        let conn = Arc::new(Conn {
            id: caps.next_id.fetch_add(1, Ordering::Relaxed),
            caps: caps.clone(),
            listener: self.index,
            authenticated: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            wake: Notify::new(),
        });
        inner.open += 1;
        if let Some(l) = inner.listeners.get_mut(self.index) {
            l.open += 1;
            l.unauthenticated.push_back(Arc::downgrade(&conn));
            // Entries go stale as connections end or authenticate; sweep them out when they
            // outnumber the live ones, so the queue stays in proportion to what is open
            // (amortized constant time per connection).
            if l.unauthenticated.len() > 2 * l.open + 64 {
                l.unauthenticated.retain(|w| w.upgrade().is_some_and(|c| c.may_be_shed()));
            }
        }
        metrics::gauge!("ddp_connections", "listener" => name).increment(1.0);
        Some(conn)
    }
}

/// One admitted connection. Dropping the last handle gives its place back.
pub(crate) struct Conn {
    id: u64,
    caps: Arc<Caps>,
    listener: usize,
    authenticated: AtomicBool,
    shed: AtomicBool,
    wake: Notify,
}

impl Conn {
    /// Marks the connection as having presented a valid credential: it is never shed.
    pub(crate) fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Release);
    }

    fn may_be_shed(&self) -> bool {
        !self.authenticated.load(Ordering::Acquire) && !self.shed.load(Ordering::Acquire)
    }

    fn shed(&self) {
        self.shed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Completes when the connection is shed; its task then drops it. Cancel-safe.
    pub(crate) async fn shed_now(&self) {
        while !self.shed.load(Ordering::Acquire) {
            self.wake.notified().await;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.caps.release(self.listener);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shed(conn: &Conn) -> bool {
        conn.shed.load(Ordering::Acquire)
    }

    #[test]
    fn the_budget_leaves_room_for_storage_and_never_drops_to_nothing() {
        assert_eq!(connection_budget(256, 18), 256 - 64 - 18);
        assert_eq!(connection_budget(20, 18), MIN_BUDGET);
    }

    #[test]
    fn at_its_cap_a_listener_sheds_its_oldest_unauthenticated_connection() {
        let caps = Caps::new(100);
        let door = caps.door("http", 3);
        let a = door.admit().expect("a");
        let b = door.admit().expect("b");
        let c = door.admit().expect("c");
        a.authenticated();
        let d = door.admit().expect("admitted by shedding");
        assert!(!shed(&a) && shed(&b) && !shed(&c), "b is the oldest that never authenticated");
        drop(b);
        let e = door.admit().expect("e");
        assert!(shed(&c));
        drop(c);
        d.authenticated();
        e.authenticated();
        assert!(door.admit().is_none(), "every connection authenticated: the new one is refused");
        drop(a);
        assert!(door.admit().is_some(), "a place freed is taken");
    }

    #[test]
    fn ended_and_authenticated_connections_do_not_pile_up_in_the_queue() {
        let caps = Caps::new(1_000_000);
        let door = caps.door("http", 1_000_000);
        let held: Vec<Arc<Conn>> = (0..10).map(|_| door.admit().expect("admitted")).collect();
        for i in 0..100_000 {
            let c = door.admit().expect("admitted");
            if i % 2 == 0 {
                c.authenticated();
            }
        }
        let queued = locks::recover(&caps.inner).listeners[0].unauthenticated.len();
        assert!(queued <= 2 * held.len() + 64 + 1, "the queue holds {queued} entries for {} open", held.len());
    }

    #[test]
    fn the_shared_budget_sheds_across_listeners() {
        let caps = Caps::new(2);
        let http = caps.door("http", 10);
        let mqtt = caps.door("mqtt", 10);
        let silent = mqtt.admit().expect("silent");
        let device = mqtt.admit().expect("device");
        device.authenticated();
        let request = http.admit().expect("admitted by shedding the other listener's silent connection");
        assert!(shed(&silent) && !shed(&device));
        drop(request);
    }
}
