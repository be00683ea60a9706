//! The achieved recovery point objective, measured in milliseconds.
//!
//! The replica holds the primary's state as of the close of the newest delivered
//! cycle; its age (the lag) is what a disaster at that moment would lose. The age
//! grows until the next cycle lands, then drops, so its peaks are the worst case.
//! Each delivery records one peak in an [`RpoHistogram`]: the age of the replica's
//! newest state just before the delivery, that is the delivery time minus the close
//! time of the cycle delivered before it.

use serde::{Deserialize, Serialize};

/// Upper bounds of the histogram's buckets, in milliseconds (a last, unbounded bucket
/// follows). Fine below a few seconds, where 1 s intervals live; coarse up to the
/// hour, where Hyper-V's health rules start to warn.
pub const RPO_BUCKETS_MS: [u64; 16] = [
    250, 500, 750, 1_000, 1_250, 1_500, 2_000, 2_500, 3_000, 5_000, 10_000, 30_000, 60_000,
    300_000, 900_000, 3_600_000,
];

/// Achieved RPO peaks since start, by bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RpoHistogram {
    /// Peaks at most `RPO_BUCKETS_MS[i]` and above the bound before it; the last
    /// entry counts the peaks above every bound.
    pub counts: Vec<u64>,
    /// Peaks recorded.
    pub count: u64,
    /// Their sum, in milliseconds.
    pub sum_ms: u64,
    /// The largest peak, in milliseconds.
    pub max_ms: u64,
}

impl RpoHistogram {
    /// Records a peak of `ms` milliseconds.
    pub fn observe(&mut self, ms: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; RPO_BUCKETS_MS.len() + 1];
        }
        let bucket = RPO_BUCKETS_MS.partition_point(|bound| *bound < ms);
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.max_ms = self.max_ms.max(ms);
    }

    /// `(upper bound in ms, peaks at or below it)` for every bound, cumulative, as
    /// Prometheus histograms count; the total is [`RpoHistogram::count`].
    pub fn cumulative(&self) -> Vec<(u64, u64)> {
        let mut total = 0;
        RPO_BUCKETS_MS
            .iter()
            .enumerate()
            .map(|(i, bound)| {
                total += self.counts.get(i).copied().unwrap_or(0);
                (*bound, total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_land_in_their_bucket_and_accumulate() {
        let mut histogram = RpoHistogram::default();
        assert!(histogram.cumulative().iter().all(|(_, n)| *n == 0));
        for ms in [0, 250, 251, 1_000, 1_999, 4_000_000] {
            histogram.observe(ms);
        }
        assert_eq!(histogram.count, 6);
        assert_eq!(histogram.max_ms, 4_000_000);
        assert_eq!(histogram.sum_ms, 4_003_500);
        let cumulative = histogram.cumulative();
        let at = |bound: u64| {
            cumulative
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, n)| *n)
        };
        // 0 and 250 are at most 250; 251 falls in (250, 500].
        assert_eq!(at(250), Some(2));
        assert_eq!(at(500), Some(3));
        assert_eq!(at(1_000), Some(4));
        assert_eq!(at(2_000), Some(5));
        // The 4 000 s peak is above every bound: only in the count.
        assert_eq!(at(3_600_000), Some(5));
        assert_eq!(histogram.counts.last(), Some(&1));
    }
}
