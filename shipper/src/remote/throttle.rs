//! Bandwidth limits: token buckets shared by the shippers they cover (one per group,
//! one per daemon). A sender asks before each chunk and sleeps for the answer, so the
//! average rate stays at the limit with bursts of at most one second's worth.
//!
//! A throttle's limit is fixed or follows a [`BandwidthSchedule`]: the limit is looked
//! up at every request, so it changes when a window starts or ends, mid-transfer and
//! without a restart. A chunk already waiting finishes the wait it was given; debt
//! still owed is paid at the new limit; while unlimited, nothing is owed and nothing
//! is saved up.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::info;

use super::bandwidth::{BandwidthSchedule, Clock, SystemClock};

/// A token bucket whose rate is fixed or scheduled.
#[derive(Debug)]
pub struct Throttle {
    schedule: BandwidthSchedule,
    clock: Arc<dyn Clock>,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now without waiting; negative while in debt.
    tokens: f64,
    /// When the bucket was last refilled, on the clock's monotonic scale.
    refilled: Duration,
    /// The limit of the last request (`None`: unlimited), to log changes.
    rate: Option<u64>,
}

impl Throttle {
    /// A fixed limit of `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> Self {
        Throttle::scheduled(
            BandwidthSchedule {
                windows: Vec::new(),
                otherwise: Some(rate),
            },
            Arc::new(SystemClock::default()),
        )
    }

    /// A limit that follows `schedule` on `clock`. Limits below 1 count as 1.
    pub fn scheduled(mut schedule: BandwidthSchedule, clock: Arc<dyn Clock>) -> Self {
        for window in &mut schedule.windows {
            window.limit = window.limit.max(1);
        }
        schedule.otherwise = schedule.otherwise.map(|rate| rate.max(1));
        let rate = schedule.limit_at(clock.local());
        let refilled = clock.elapsed();
        Throttle {
            schedule,
            clock,
            state: Mutex::new(Bucket {
                tokens: 0.0,
                refilled,
                rate,
            }),
        }
    }

    /// The limit now in bytes per second (`None`: unlimited).
    pub fn rate(&self) -> Option<u64> {
        if self.schedule.windows.is_empty() {
            // A fixed limit needs no clock reading per chunk.
            return self.schedule.otherwise;
        }
        self.schedule.limit_at(self.clock.local())
    }

    /// Takes `bytes` from the bucket; returns how long the caller must wait before
    /// sending them.
    pub fn take(&self, bytes: usize) -> Duration {
        let rate = self.rate();
        let now = self.clock.elapsed();
        let mut bucket = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if bucket.rate != rate {
            info!(
                from = %describe(bucket.rate),
                to = %describe(rate),
                "Bandwidth limit changed"
            );
            bucket.rate = rate;
        }
        let elapsed = now.saturating_sub(bucket.refilled).as_secs_f64();
        bucket.refilled = now;
        let Some(rate) = rate else {
            bucket.tokens = 0.0;
            return Duration::ZERO;
        };
        // Precision loss only matters beyond 2^53 bytes per second.
        #[allow(clippy::cast_precision_loss)]
        let rate = rate as f64;
        #[allow(clippy::cast_precision_loss)]
        let bytes = bytes as f64;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.tokens -= bytes;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }
}

/// A limit for people: bytes per second, or unlimited.
fn describe(rate: Option<u64>) -> String {
    rate.map_or_else(|| "unlimited".into(), |rate| format!("{rate} B/s"))
}

#[cfg(test)]
mod tests {
    use super::super::bandwidth::tests::FakeClock;
    use super::super::bandwidth::{Weekday, Window};
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
        assert_eq!(Throttle::new(0).rate(), Some(1));
    }

    /// Sends `total` bytes in `chunk`s, sleeping on the fake clock as told; returns the
    /// time it took.
    fn send(throttle: &Throttle, clock: &FakeClock, total: usize, chunk: usize) -> Duration {
        let start = clock.elapsed();
        let mut sent = 0;
        while sent < total {
            clock.advance(throttle.take(chunk));
            sent += chunk;
        }
        clock.elapsed() - start
    }

    #[test]
    fn the_rate_switches_when_a_window_starts_and_ends_mid_transfer() {
        let clock = Arc::new(FakeClock::at(Weekday::Mon, "07:59:50"));
        let schedule = BandwidthSchedule {
            windows: vec![Window {
                days: vec![Weekday::Mon],
                from: "08:00".parse().expect("from"),
                to: "08:01".parse().expect("to"),
                limit: 1 << 20,
            }],
            otherwise: Some(4 << 20),
        };
        let throttle = Throttle::scheduled(schedule, Arc::clone(&clock) as Arc<dyn Clock>);
        assert_eq!(throttle.rate(), Some(4 << 20));
        // One transfer of 50 MiB from ten seconds before the window: 40 MiB at
        // 4 MiB/s, then the rest at 1 MiB/s, twenty seconds in all (12.5 without the
        // switch).
        let took = send(&throttle, &clock, 50 << 20, 64 << 10);
        assert!(
            took >= Duration::from_millis(19_800) && took <= Duration::from_millis(20_300),
            "{took:?}"
        );
        assert_eq!(throttle.rate(), Some(1 << 20));
        // Past the window the plain limit is back; an idle link saved up one second.
        clock.advance(Duration::from_secs(60));
        assert_eq!(throttle.rate(), Some(4 << 20));
        let after = send(&throttle, &clock, 12 << 20, 64 << 10);
        assert!(
            after >= Duration::from_millis(1900) && after <= Duration::from_millis(2100),
            "{after:?}"
        );
    }

    #[test]
    fn outside_every_window_without_a_plain_limit_nothing_waits() {
        let clock = Arc::new(FakeClock::at(Weekday::Sat, "12:00"));
        let schedule = BandwidthSchedule {
            windows: vec![Window {
                days: Weekday::ALL[..5].to_vec(),
                from: "08:00".parse().expect("from"),
                to: "18:00".parse().expect("to"),
                limit: 1 << 20,
            }],
            otherwise: None,
        };
        let throttle = Throttle::scheduled(schedule, Arc::clone(&clock) as Arc<dyn Clock>);
        assert_eq!(throttle.rate(), None);
        assert_eq!(throttle.take(1 << 30), Duration::ZERO);
        // Monday 08:00: at most one second's worth was saved up over the weekend.
        clock.advance(Duration::from_secs(44 * 3600));
        assert_eq!(throttle.rate(), Some(1 << 20));
        let took = send(&throttle, &clock, 5 << 20, 64 << 10);
        assert!(
            took >= Duration::from_millis(3900) && took <= Duration::from_millis(4100),
            "{took:?}"
        );
    }
}
