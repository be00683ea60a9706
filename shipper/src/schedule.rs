//! When to try again, and how healthy replication is.
//!
//! The retry table is Hyper-V Replica's: after a network failure, retries at 1, 2,
//! 4, 8 and 10 minutes, then every 30 minutes, all multiplied by a configurable scale
//! (tests run it in seconds). Health follows the same product: Critical when
//! replication is suspended; Warning when more than 20% of the cycles of the last
//! hour were missed or the replica lags by more than an hour; Normal otherwise.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Delays before the retries after consecutive network failures, in minutes; the last
/// repeats.
const RETRY_MINUTES: [u64; 6] = [1, 2, 4, 8, 10, 30];
/// The window of the missed-cycle ratio.
const HEALTH_WINDOW_SECS: u64 = 3600;
/// Missed share of the window above which health is Warning.
const MISSED_WARNING_RATIO: f64 = 0.2;
/// Lag above which health is Warning.
const LAG_WARNING_SECS: u64 = 3600;

/// The retry table, scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Multiplies every delay (1.0 in production).
    pub scale: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { scale: 1.0 }
    }
}

/// The first wait after the replica answered Busy (it is applying what it received),
/// doubled after each further Busy answer up to [`BUSY_RETRY_MAX`]. A busy replica is
/// retried sooner than the next interval when the interval is longer.
pub const BUSY_RETRY_FIRST: Duration = Duration::from_secs(10);
/// The longest wait between retries of a busy replica.
pub const BUSY_RETRY_MAX: Duration = Duration::from_secs(5 * 60);

impl RetryPolicy {
    /// The wait after `failures` consecutive Busy answers (1 for the first).
    pub fn busy_delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        BUSY_RETRY_FIRST
            .saturating_mul(1 << doublings)
            .min(BUSY_RETRY_MAX)
            .mul_f64(self.scale.max(0.0))
    }

    /// The wait after `failures` consecutive network failures (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let index = usize::try_from(failures.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .min(RETRY_MINUTES.len() - 1);
        let minutes = RETRY_MINUTES[index];
        Duration::from_secs(minutes * 60).mul_f64(self.scale.max(0.0))
    }
}

/// Replication health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Replicating as configured.
    Normal,
    /// Falling behind; it may recover by itself.
    Warning,
    /// Stopped until an administrator acts.
    Critical,
}

/// Outcomes of the cycles of the last hour.
#[derive(Debug, Default, Clone)]
pub struct CycleHistory {
    /// (time in seconds since the epoch, delivered)
    outcomes: VecDeque<(u64, bool)>,
}

impl CycleHistory {
    /// Records one interval's outcome at `now`.
    pub fn record(&mut self, now: u64, delivered: bool) {
        self.outcomes.push_back((now, delivered));
        self.expire(now);
    }

    fn expire(&mut self, now: u64) {
        while self
            .outcomes
            .front()
            .is_some_and(|(at, _)| at + HEALTH_WINDOW_SECS < now)
        {
            self.outcomes.pop_front();
        }
    }

    /// (missed, total) within the window ending at `now`.
    pub fn counts(&self, now: u64) -> (u64, u64) {
        let recent = self
            .outcomes
            .iter()
            .filter(|(at, _)| at + HEALTH_WINDOW_SECS >= now);
        let (mut missed, mut total) = (0, 0);
        for (_, delivered) in recent {
            total += 1;
            if !delivered {
                missed += 1;
            }
        }
        (missed, total)
    }
}

/// Health and the reason for it.
pub fn assess(
    suspended: Option<&str>,
    missed: u64,
    total: u64,
    lag_secs: Option<u64>,
) -> (Health, Option<String>) {
    if let Some(reason) = suspended {
        return (Health::Critical, Some(format!("Suspended: {reason}")));
    }
    // Small counts: the ratio is only a ratio of whole intervals.
    #[allow(clippy::cast_precision_loss)]
    let ratio = if total == 0 {
        0.0
    } else {
        missed as f64 / total as f64
    };
    if ratio > MISSED_WARNING_RATIO {
        return (
            Health::Warning,
            Some(format!(
                "{missed} of the last hour's {total} cycles were missed"
            )),
        );
    }
    if let Some(lag) = lag_secs.filter(|lag| *lag > LAG_WARNING_SECS) {
        return (
            Health::Warning,
            Some(format!("The replica is {} minutes behind", lag / 60)),
        );
    }
    (Health::Normal, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_table_scales() {
        let policy = RetryPolicy::default();
        let minutes: Vec<u64> = (1..=8).map(|n| policy.delay(n).as_secs() / 60).collect();
        assert_eq!(minutes, vec![1, 2, 4, 8, 10, 30, 30, 30]);
        let fast = RetryPolicy { scale: 1.0 / 60.0 };
        assert_eq!(fast.delay(1), Duration::from_secs(1));
        assert_eq!(fast.delay(6), Duration::from_secs(30));
        assert_eq!(fast.delay(0), Duration::from_secs(1));
    }

    #[test]
    fn busy_waits_double_up_to_five_minutes() {
        let policy = RetryPolicy::default();
        let seconds: Vec<u64> = (1..=7).map(|n| policy.busy_delay(n).as_secs()).collect();
        assert_eq!(seconds, vec![10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(policy.busy_delay(u32::MAX), BUSY_RETRY_MAX);
        let fast = RetryPolicy { scale: 0.1 };
        assert_eq!(fast.busy_delay(1), Duration::from_secs(1));
    }

    #[test]
    fn health_follows_misses_lag_and_suspension() {
        let mut history = CycleHistory::default();
        for second in 0..10 {
            history.record(1000 + second, second != 3);
        }
        assert_eq!(history.counts(1010), (1, 10));
        assert_eq!(assess(None, 1, 10, Some(30)).0, Health::Normal);
        assert_eq!(assess(None, 3, 10, Some(30)).0, Health::Warning);
        assert_eq!(assess(None, 0, 10, Some(3601)).0, Health::Warning);
        let (health, reason) = assess(Some("Forbidden"), 0, 10, None);
        assert_eq!(health, Health::Critical);
        assert!(reason.is_some_and(|r| r.contains("Forbidden")));
        // An hour later the old outcomes no longer count.
        history.record(1000 + 3700, true);
        assert_eq!(history.counts(1000 + 3700), (0, 1));
    }
}
