//! Replication figures over a time window, as Hyper-V's Measure-VMReplication gives
//! them: transfer sizes and times, successes, failures and missed intervals, the
//! achieved recovery point's percentiles, bytes sent and the compression ratio.
//!
//! Contract: the shipper records every interval's outcome in a [`DeliveryLog`]: each
//! delivered cycle, each failed attempt, and each interval skipped while backing off
//! after network failures. The log is in memory (since the daemon started) and
//! bounded to [`DELIVERY_LOG_CAPACITY`] entries, oldest dropped first; a
//! [`Measurement`] says which span it actually covers. Initial replication and resync
//! copies are not cycle deliveries and are not counted.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Entries kept per group: a day of 5-second intervals, about 1 MiB.
pub const DELIVERY_LOG_CAPACITY: usize = 17_280;

/// What became of one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A cycle reached the consumer.
    Delivered {
        /// Data bytes of the cycle (after coalescing).
        data_bytes: u64,
        /// Bytes the network carried for it (after compression; 0 for local
        /// consumers).
        network_bytes: u64,
        /// How long delivering it took, in milliseconds.
        duration_ms: u64,
        /// The achieved recovery point just before it landed: its delivery time minus
        /// the close time of the cycle delivered before it (`None` for the first).
        rpo_ms: Option<u64>,
    },
    /// An attempt failed.
    Failed,
    /// The interval passed without an attempt (backing off after network failures).
    Skipped,
}

/// One entry of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// When, in milliseconds since the epoch.
    pub unix_ms: u64,
    /// What happened.
    pub outcome: Outcome,
}

/// The bounded history of a group's intervals.
#[derive(Debug, Clone)]
pub struct DeliveryLog {
    events: VecDeque<Event>,
    capacity: usize,
}

impl Default for DeliveryLog {
    fn default() -> Self {
        DeliveryLog::with_capacity(DELIVERY_LOG_CAPACITY)
    }
}

/// The figures of a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The window asked for starts here (milliseconds since the epoch).
    pub since_unix_ms: u64,
    /// It ends here (now).
    pub until_unix_ms: u64,
    /// The oldest entry the log still holds, if any: figures before it are not
    /// known (the daemon started later, or the log dropped them).
    pub history_from_unix_ms: Option<u64>,
    /// Cycles delivered.
    pub successes: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// Intervals without a delivered cycle: failed attempts and intervals skipped
    /// while backing off.
    pub missed_intervals: u64,
    /// Average data bytes of a delivered cycle.
    pub avg_transfer_bytes: Option<u64>,
    /// The largest delivered cycle, in data bytes.
    pub max_transfer_bytes: Option<u64>,
    /// Average time a delivery took, in milliseconds.
    pub avg_transfer_ms: Option<u64>,
    /// The median achieved recovery point, in milliseconds.
    pub rpo_p50_ms: Option<u64>,
    /// Its 99th percentile.
    pub rpo_p99_ms: Option<u64>,
    /// The worst.
    pub rpo_max_ms: Option<u64>,
    /// Data bytes delivered.
    pub data_bytes: u64,
    /// Bytes the network carried for them (after compression, resent frames
    /// included).
    pub network_bytes: u64,
    /// Data bytes per network byte (above 1: compression saved), for network
    /// consumers that sent anything.
    pub compression_ratio: Option<f64>,
}

impl DeliveryLog {
    /// An empty log keeping at most `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        DeliveryLog {
            events: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records `outcome` at `unix_ms`.
    pub fn record(&mut self, unix_ms: u64, outcome: Outcome) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Event { unix_ms, outcome });
    }

    /// The figures of the entries from `since_unix_ms` to `now_unix_ms`.
    pub fn measure(&self, since_unix_ms: u64, now_unix_ms: u64) -> Measurement {
        let mut figures = Measurement {
            since_unix_ms,
            until_unix_ms: now_unix_ms,
            history_from_unix_ms: self.events.front().map(|event| event.unix_ms),
            ..Measurement::default()
        };
        let (mut max_bytes, mut total_ms) = (0, 0u64);
        let mut rpos = Vec::new();
        let window = self
            .events
            .iter()
            .filter(|event| (since_unix_ms..=now_unix_ms).contains(&event.unix_ms));
        for event in window {
            match event.outcome {
                Outcome::Delivered {
                    data_bytes,
                    network_bytes,
                    duration_ms,
                    rpo_ms,
                } => {
                    figures.successes += 1;
                    figures.data_bytes += data_bytes;
                    figures.network_bytes += network_bytes;
                    max_bytes = max_bytes.max(data_bytes);
                    total_ms += duration_ms;
                    rpos.extend(rpo_ms);
                }
                Outcome::Failed => {
                    figures.failures += 1;
                    figures.missed_intervals += 1;
                }
                Outcome::Skipped => figures.missed_intervals += 1,
            }
        }
        figures.avg_transfer_bytes = figures.data_bytes.checked_div(figures.successes);
        figures.avg_transfer_ms = total_ms.checked_div(figures.successes);
        figures.max_transfer_bytes = (figures.successes > 0).then_some(max_bytes);
        rpos.sort_unstable();
        figures.rpo_p50_ms = percentile(&rpos, 50);
        figures.rpo_p99_ms = percentile(&rpos, 99);
        figures.rpo_max_ms = rpos.last().copied();
        if figures.network_bytes > 0 {
            // Ratios of byte counts; precision beyond 2^53 bytes does not matter.
            #[allow(clippy::cast_precision_loss)]
            let ratio = figures.data_bytes as f64 / figures.network_bytes as f64;
            figures.compression_ratio = Some(ratio);
        }
        figures
    }
}

/// The nearest-rank `pct`th percentile of `sorted`.
fn percentile(sorted: &[u64], pct: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(data_bytes: u64, network_bytes: u64, duration_ms: u64, rpo: u64) -> Outcome {
        Outcome::Delivered {
            data_bytes,
            network_bytes,
            duration_ms,
            rpo_ms: Some(rpo),
        }
    }

    #[test]
    fn an_empty_window_has_counts_of_zero_and_no_averages() {
        let log = DeliveryLog::default();
        let figures = log.measure(0, 1000);
        assert_eq!(
            figures.successes + figures.failures + figures.missed_intervals,
            0
        );
        assert_eq!(figures.avg_transfer_bytes, None);
        assert_eq!(figures.rpo_p50_ms, None);
        assert_eq!(figures.compression_ratio, None);
        assert_eq!(figures.history_from_unix_ms, None);
    }

    #[test]
    fn figures_add_up_over_the_window() {
        let mut log = DeliveryLog::default();
        log.record(1_000, delivered(100, 50, 10, 30_000));
        log.record(2_000, delivered(300, 100, 30, 31_000));
        log.record(3_000, Outcome::Failed);
        log.record(4_000, Outcome::Skipped);
        log.record(5_000, delivered(200, 0, 20, 90_000));
        let figures = log.measure(0, 10_000);
        assert_eq!(figures.successes, 3);
        assert_eq!(figures.failures, 1);
        assert_eq!(figures.missed_intervals, 2);
        assert_eq!(figures.avg_transfer_bytes, Some(200));
        assert_eq!(figures.max_transfer_bytes, Some(300));
        assert_eq!(figures.avg_transfer_ms, Some(20));
        assert_eq!(figures.data_bytes, 600);
        assert_eq!(figures.network_bytes, 150);
        assert_eq!(figures.compression_ratio, Some(4.0));
        assert_eq!(figures.rpo_p50_ms, Some(31_000));
        assert_eq!(figures.rpo_p99_ms, Some(90_000));
        assert_eq!(figures.rpo_max_ms, Some(90_000));
        assert_eq!(figures.history_from_unix_ms, Some(1_000));
    }

    #[test]
    fn the_window_excludes_older_entries() {
        let mut log = DeliveryLog::default();
        log.record(1_000, Outcome::Failed);
        log.record(5_000, delivered(10, 10, 1, 100));
        let figures = log.measure(2_000, 6_000);
        assert_eq!((figures.successes, figures.failures), (1, 0));
        assert_eq!(figures.since_unix_ms, 2_000);
        assert_eq!(figures.until_unix_ms, 6_000);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50), Some(50));
        assert_eq!(percentile(&values, 99), Some(99));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[1, 2], 50), Some(1));
        assert_eq!(percentile(&[], 50), None);
        // The first delivery has no recovery point before it and adds none.
        let mut log = DeliveryLog::default();
        log.record(
            1,
            Outcome::Delivered {
                data_bytes: 1,
                network_bytes: 1,
                duration_ms: 1,
                rpo_ms: None,
            },
        );
        assert_eq!(log.measure(0, 2).rpo_p50_ms, None);
    }

    #[test]
    fn the_log_drops_its_oldest_entries_beyond_its_capacity() {
        let mut log = DeliveryLog::with_capacity(3);
        for at in 1..=5 {
            log.record(at * 1000, delivered(at, at, 1, 1));
        }
        let figures = log.measure(0, 10_000);
        assert_eq!(figures.successes, 3);
        assert_eq!(figures.history_from_unix_ms, Some(3_000));
        assert_eq!(figures.max_transfer_bytes, Some(5));
    }
}
