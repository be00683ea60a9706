//! The last hour of figures, in memory: per series (a group, or a replica on the
//! replica daemon) a bounded ring of samples and of the deliveries seen.
//!
//! Contract: a series holds at most the history's capacity in samples and as many
//! deliveries, none older than [`WINDOW`] before the newest recording; a series that
//! is absent from a recording (its group was removed) is dropped, so memory follows
//! what the daemon runs now.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// How far back figures are kept.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// One look at a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// When, in milliseconds since the epoch.
    pub at_ms: u64,
    /// How far the copy is behind, in milliseconds; none while it holds no state.
    pub lag_ms: Option<u64>,
    /// Cycles and bytes delivered (or applied) since the daemon started.
    pub totals: Option<Totals>,
}

/// Counts since the daemon started; their differences between samples give the
/// average cycle of every interval, however many cycles it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Cycles delivered or transfers applied.
    pub cycles: u64,
    /// Their data bytes.
    pub bytes: u64,
}

/// A cycle delivered (primary) or applied (replica), as one sample saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The cycle.
    pub cycle: u64,
    /// When it was delivered or applied, in milliseconds since the epoch.
    pub at_ms: u64,
    /// When the primary closed it (the state the copy then holds), if known.
    pub closed_ms: Option<u64>,
    /// How long delivering or applying it took, in milliseconds, if known.
    pub duration_ms: Option<u64>,
}

/// What a sampler saw of one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The series: unique within one recording.
    pub key: String,
    /// The sample.
    pub sample: Sample,
    /// The newest delivery, if any; recorded once per cycle.
    pub delivery: Option<Delivery>,
}

/// The figures of one series, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Series {
    samples: VecDeque<Sample>,
    deliveries: VecDeque<Delivery>,
}

impl Series {
    /// Samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// Deliveries, oldest first.
    pub fn deliveries(&self) -> impl Iterator<Item = &Delivery> {
        self.deliveries.iter()
    }

    /// The average cycle between each two samples that saw cycles delivered:
    /// (time of the later sample, data bytes per cycle).
    pub fn average_cycles(&self) -> Vec<(u64, u64)> {
        let samples: Vec<&Sample> = self.samples.iter().collect();
        samples
            .windows(2)
            .filter_map(|pair| {
                let (before, after) = (pair[0].totals?, pair[1].totals?);
                let cycles = after.cycles.checked_sub(before.cycles)?;
                let bytes = after.bytes.checked_sub(before.bytes)?;
                (cycles > 0).then(|| (pair[1].at_ms, bytes / cycles))
            })
            .collect()
    }
}

/// Every series the daemon runs now.
#[derive(Debug, Clone)]
pub struct History {
    series: BTreeMap<String, Series>,
    capacity: usize,
}

impl History {
    /// An empty history keeping at most `capacity` samples per series.
    pub fn new(capacity: usize) -> Self {
        History {
            series: BTreeMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The series `key`, if it was recorded.
    pub fn series(&self, key: &str) -> Option<&Series> {
        self.series.get(key)
    }

    /// Records one look at every series the daemon runs now, at `now_ms`.
    pub fn record(&mut self, now_ms: u64, observations: Vec<Observation>) {
        let window_ms = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        let oldest = now_ms.saturating_sub(window_ms);
        let mut seen = BTreeMap::new();
        for observation in observations {
            let mut series = self.series.remove(&observation.key).unwrap_or_default();
            push_bounded(&mut series.samples, observation.sample, self.capacity);
            if let Some(delivery) = observation.delivery {
                let newer = series
                    .deliveries
                    .back()
                    .is_none_or(|last| delivery.cycle > last.cycle);
                if newer {
                    push_bounded(&mut series.deliveries, delivery, self.capacity);
                }
            }
            while series.samples.front().is_some_and(|s| s.at_ms < oldest) {
                series.samples.pop_front();
            }
            while series.deliveries.front().is_some_and(|d| d.at_ms < oldest) {
                series.deliveries.pop_front();
            }
            seen.insert(observation.key, series);
        }
        self.series = seen;
    }
}

fn push_bounded<T>(ring: &mut VecDeque<T>, item: T, capacity: usize) {
    if ring.len() == capacity {
        ring.pop_front();
    }
    ring.push_back(item);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn look(key: &str, at_ms: u64, cycle: Option<u64>) -> Observation {
        Observation {
            key: key.into(),
            sample: Sample {
                at_ms,
                lag_ms: Some(at_ms / 1000),
                totals: cycle.map(|cycle| Totals {
                    cycles: cycle,
                    bytes: cycle * 100,
                }),
            },
            delivery: cycle.map(|cycle| Delivery {
                cycle,
                at_ms,
                closed_ms: None,
                duration_ms: None,
            }),
        }
    }

    #[test]
    fn keeps_at_most_capacity_samples_oldest_dropped_first() {
        let mut history = History::new(3);
        for i in 0..5 {
            history.record(1_000_000 + i, vec![look("vm1", 1_000_000 + i, None)]);
        }
        let kept: Vec<u64> = history
            .series("vm1")
            .unwrap()
            .samples()
            .map(|s| s.at_ms)
            .collect();
        assert_eq!(kept, [1_000_002, 1_000_003, 1_000_004]);
    }

    #[test]
    fn records_each_delivery_once_and_forgets_what_is_older_than_the_window() {
        let mut history = History::new(720);
        let hour = 3_600_000;
        history.record(hour, vec![look("vm1", hour, Some(4))]);
        history.record(hour + 5_000, vec![look("vm1", hour + 5_000, Some(4))]);
        history.record(hour + 10_000, vec![look("vm1", hour + 10_000, Some(5))]);
        let cycles: Vec<u64> = history
            .series("vm1")
            .unwrap()
            .deliveries()
            .map(|d| d.cycle)
            .collect();
        assert_eq!(cycles, [4, 5]);
        // No cycle between the first two samples; one of 500 - 400 bytes after.
        assert_eq!(
            history.series("vm1").unwrap().average_cycles(),
            [(hour + 10_000, 100)]
        );

        let later = 2 * hour + 7_000;
        history.record(later, vec![look("vm1", later, Some(5))]);
        let series = history.series("vm1").unwrap();
        let samples: Vec<u64> = series.samples().map(|s| s.at_ms).collect();
        assert_eq!(samples, [hour + 10_000, later]);
        assert_eq!(
            series.deliveries().map(|d| d.cycle).collect::<Vec<_>>(),
            [5]
        );
    }

    #[test]
    fn a_series_no_longer_observed_is_dropped() {
        let mut history = History::new(10);
        history.record(1, vec![look("vm1", 1, None), look("vm2", 1, None)]);
        history.record(2, vec![look("vm2", 2, None)]);
        assert!(history.series("vm1").is_none());
        assert_eq!(history.series("vm2").unwrap().samples().count(), 2);
    }
}
