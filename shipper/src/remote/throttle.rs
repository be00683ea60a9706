//! Bandwidth limits: token buckets shared by the shippers they cover (one per group,
//! one per daemon). A sender asks before each chunk and sleeps for the answer, so the
//! average rate stays at the limit with bursts of at most one second's worth.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket of `rate` bytes per second.
#[derive(Debug)]
pub struct Throttle {
    rate: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now without waiting; negative while in debt.
    tokens: f64,
    refilled: Instant,
}

impl Throttle {
    /// A limit of `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        Throttle {
            rate,
            state: Mutex::new(Bucket {
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// The limit in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` from the bucket; returns how long the caller must wait before
    /// sending them.
    pub fn take(&self, bytes: usize) -> Duration {
        // Precision loss only matters beyond 2^53 bytes per second.
        #[allow(clippy::cast_precision_loss)]
        let rate = self.rate as f64;
        #[allow(clippy::cast_precision_loss)]
        let bytes = bytes as f64;
        let mut bucket = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.refilled = now;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.tokens -= bytes;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_turns_into_waiting_at_the_rate() {
        let throttle = Throttle::new(1 << 20);
        let first = throttle.take(1 << 20);
        assert!(
            first > Duration::from_millis(900) && first <= Duration::from_secs(1),
            "{first:?}"
        );
        let second = throttle.take(1 << 19);
        assert!(second > Duration::from_millis(1400), "{second:?}");
        assert_eq!(Throttle::new(0).rate(), 1);
    }
}
