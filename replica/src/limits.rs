//! What a peer may hold of the replica server: connections (in all and per address,
//! counted before any TLS work), time before its first request, time a request body
//! may stall, and chunk uploads in progress per primary.
//!
//! Contracts: a [`Slot`] is held for as long as what it counts lives (a connection, an
//! upload's body in memory) and gives its place back when dropped, so nothing leaks a
//! place on an error path. Taking a slot never blocks; a full limit is an answer at
//! once ([`LimitReached`]), so the caller refuses without reading anything more from the peer.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Default of [`Limits::max_connections`]: a few hundred primaries, each with a data
/// connection per replicating group and short control connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default of [`Limits::max_connections_per_address`]: a primary host with a hundred
/// groups and their control requests (primaries behind one NAT address share it).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// Default of [`Limits::max_uploads_per_primary`]: a 2 MiB chunk each, so 32 MiB of
/// bodies per primary identity at most.
pub const DEFAULT_MAX_UPLOADS_PER_PRIMARY: usize = 16;
/// Default of [`Limits::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Limits::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The server's limits on its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, from everyone; more are closed as they arrive.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_address: usize,
    /// Chunk uploads in progress at once for one primary identity; more are answered
    /// `Busy` without their body being read (the primary retries).
    pub max_uploads_per_primary: usize,
    /// How long a new connection may take to finish its TLS handshake and send its
    /// first request's headers.
    pub handshake_timeout: Duration,
    /// How long a request body may go without a byte arriving. Idle time rather than
    /// total time: a body crossing a slow link keeps moving and is never cut.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_uploads_per_primary: DEFAULT_MAX_UPLOADS_PER_PRIMARY,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// Which limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReached {
    /// The limit of all keys together.
    Total,
    /// The limit of this key.
    Key,
}

/// Places counted in all and per key (an address, an identity).
#[derive(Debug)]
pub struct Slots<K: Hash + Eq> {
    max_total: usize,
    max_per_key: usize,
    taken: Mutex<Taken<K>>,
}

#[derive(Debug)]
struct Taken<K> {
    total: usize,
    per_key: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    /// At most `max_total` places in all and `max_per_key` per key.
    pub fn new(max_total: usize, max_per_key: usize) -> Arc<Self> {
        Arc::new(Slots {
            max_total,
            max_per_key,
            taken: Mutex::new(Taken {
                total: 0,
                per_key: HashMap::new(),
            }),
        })
    }

    /// A place for `key`, or which limit is reached.
    pub fn take(self: &Arc<Self>, key: K) -> Result<Slot<K>, LimitReached> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        if taken.total >= self.max_total {
            return Err(LimitReached::Total);
        }
        let count = taken.per_key.entry(key.clone()).or_insert(0);
        if *count >= self.max_per_key {
            return Err(LimitReached::Key);
        }
        *count += 1;
        taken.total += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            key: Some(key),
        })
    }

    /// Places taken in all.
    pub fn total(&self) -> usize {
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq> {
    slots: Arc<Slots<K>>,
    key: Option<K>,
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let mut taken = self
            .slots
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        taken.total -= 1;
        if let Some(count) = taken.per_key.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                taken.per_key.remove(&key);
            }
        }
    }
}

/// Counts refusals so that a flood logs one line per `every`, not one per refusal.
#[derive(Debug)]
pub struct RefusalLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    /// Lets a line through at most once per `every`.
    pub fn new(every: Duration) -> Self {
        RefusalLog {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one refusal; returns how many there were since the last line (this one
    /// included) when it is time to log another.
    pub fn note(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, count) = &mut *state;
        *count += 1;
        if last.is_some_and(|at| at.elapsed() < self.every) {
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(count))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_at_most_its_share_and_all_keys_at_most_the_total() {
        let slots = Slots::new(3, 2);
        let a1 = slots.take("a").unwrap();
        let _a2 = slots.take("a").unwrap();
        assert_eq!(slots.take("a").unwrap_err(), LimitReached::Key);
        let _b1 = slots.take("b").unwrap();
        assert_eq!(slots.total(), 3);
        assert_eq!(slots.take("c").unwrap_err(), LimitReached::Total);
        // A refused key holds nothing.
        assert_eq!(slots.taken.lock().unwrap().per_key.get("c"), None);
        drop(a1);
        assert_eq!(slots.total(), 2);
        let _c1 = slots.take("c").unwrap();
        assert_eq!(slots.take("a").unwrap_err(), LimitReached::Total);
    }

    #[test]
    fn dropped_slots_give_their_places_back_and_forget_the_key() {
        let slots = Slots::new(100, 1);
        for _ in 0..10 {
            let held = slots.take(7u32).unwrap();
            assert_eq!(slots.take(7).unwrap_err(), LimitReached::Key);
            drop(held);
        }
        assert_eq!(slots.total(), 0);
        assert!(slots.taken.lock().unwrap().per_key.is_empty());
    }

    #[test]
    fn slots_are_counted_right_across_threads() {
        let slots = Slots::new(1000, 1000);
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let slots = Arc::clone(&slots);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let _slot = slots.take(n % 3).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(slots.total(), 0);
    }

    #[test]
    fn a_flood_of_refusals_logs_once_per_period_with_the_count() {
        let log = RefusalLog::new(Duration::from_millis(200));
        assert_eq!(log.note(), Some(1));
        for _ in 0..99 {
            assert_eq!(log.note(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(log.note(), Some(100));
        assert_eq!(log.note(), None);
    }
}
