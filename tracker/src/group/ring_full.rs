//! Overflow: what happens when the ring has no room for a write (the consumer is
//! behind or gone) is the group's [`OnRingFull`] policy. Writes never fail either way.
//! - [`OnRingFull::Bitmap`] (the default): writes never wait; the group switches to
//!   dirty-map tracking, marks itself as needing a resync, and says so in its status
//!   and logs.
//! - [`OnRingFull::Throttle`]: writers are slowed so the log, and with it the recovery
//!   point, is kept. Past `THROTTLE_HIGH_WATER_PERCENT` of the ring a write first
//!   sleeps, with no lock and no admission held, for a pause that grows with the fill
//!   (`throttle_pause`), so writers settle at the rate acknowledgements free space
//!   rather than run into a wall. A write that finds no room waits on the group's
//!   condition variable, which acknowledging a cycle signals. Pause and wait together
//!   never exceed the policy's `max_delay` per write: when it passes with still no
//!   room, the group falls back to dirty maps as with `Bitmap`, so a dead consumer
//!   never hangs a writer. Writers always leave room for a cycle-close record
//!   (`CLOSE_HEADROOM`), so the consumer can close the cycle that frees them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::warn;

use super::{lock, Group, Shared, State, TrackingMode, MAX_RECORD_PAYLOAD};
use crate::record::{record_len, HEADER_LEN};
use crate::superblock::ResyncReason;

/// What a group does when its log ring has no room for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRingFull {
    /// Switch to dirty-map tracking at once; a resync follows (the recovery point is
    /// lost until it ends). Writes are never delayed.
    #[default]
    Bitmap,
    /// Slow writers so the log is kept; a write is delayed at most `max_delay`, after
    /// which the group falls back to dirty maps as with `Bitmap`.
    Throttle {
        /// The most a write is delayed waiting for ring space.
        max_delay: Duration,
    },
}

impl OnRingFull {
    /// The delay bound, under [`OnRingFull::Throttle`].
    pub fn max_delay(self) -> Option<Duration> {
        match self {
            OnRingFull::Bitmap => None,
            OnRingFull::Throttle { max_delay } => Some(max_delay),
        }
    }
}

/// Throttled writes since the group was opened ([`OnRingFull::Throttle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleStats {
    /// Writes that were delayed.
    pub writes: u64,
    /// Delay added to them all.
    pub total_delay: Duration,
    /// The longest delay added to one write.
    pub max_delay: Duration,
    /// Writes that waited the whole bound without finding room, so the group fell
    /// back to dirty maps.
    pub expired: u64,
}

impl ThrottleStats {
    pub(super) fn record(&mut self, delay: Duration) {
        self.writes += 1;
        self.total_delay += delay;
        self.max_delay = self.max_delay.max(delay);
    }
}

/// Under [`OnRingFull::Throttle`], writes that would leave more than this share of the
/// ring in use are paused.
pub(super) const THROTTLE_HIGH_WATER_PERCENT: u64 = 90;

/// Ring space every write leaves free, so the consumer can always close the cycle
/// (a close record, and the padding up to the ring's end before it).
const CLOSE_HEADROOM: u64 = 2 * HEADER_LEN as u64;

/// Ring bytes a write can use: the rest is kept for the padding before a record at
/// the ring's end and for closing the cycle.
pub(super) fn usable_ring(ring_size: u64) -> u64 {
    ring_size.saturating_sub(record_len(MAX_RECORD_PAYLOAD) + CLOSE_HEADROOM)
}

/// The pause of a write after which `used_after` ring bytes would be in use, in a ring
/// of `ring_size` bytes, under [`OnRingFull::Throttle`] with `max_delay`: none up to
/// the high-water mark ([`THROTTLE_HIGH_WATER_PERCENT`] of [`usable_ring`]), then
/// growing with the square of how far past it the write goes, to
/// [`MAX_THROTTLE_PAUSE`] (or a quarter of `max_delay` if less) where writes stop
/// fitting. The gentle start leaves writers nearly unslowed at the mark; the steep end
/// makes them meet the rate space is freed before the ring is full. A longer pause
/// would pace no better than waiting for room, which ends the moment room is freed;
/// the quarter leaves most of the bound for that wait.
pub(super) fn throttle_pause(used_after: u64, ring_size: u64, max_delay: Duration) -> Duration {
    let usable = usable_ring(ring_size);
    let high_water = usable / 100 * THROTTLE_HIGH_WATER_PERCENT;
    if used_after <= high_water || usable <= high_water {
        return Duration::ZERO;
    }
    // Exact enough: ring sizes are far below 2^52.
    #[allow(clippy::cast_precision_loss)]
    let pressure = ((used_after - high_water) as f64 / (usable - high_water) as f64).min(1.0);
    MAX_THROTTLE_PAUSE
        .min(max_delay / 4)
        .mul_f64(pressure * pressure)
}

/// The longest pause [`throttle_pause`] gives a write (as Linux's dirty-page
/// throttling, whose pauses stop at 200 ms).
pub(super) const MAX_THROTTLE_PAUSE: Duration = Duration::from_millis(100);

impl Group {
    /// Sets what the group does when its ring is full (from the next write on).
    pub fn set_on_ring_full(&self, policy: OnRingFull) {
        let mut state = lock(&self.shared.state);
        state.on_ring_full = policy;
        self.shared.throttling.store(
            matches!(policy, OnRingFull::Throttle { .. }),
            Ordering::Relaxed,
        );
        // Writers waiting for room under the old policy decide again.
        self.shared.wake(&state);
    }
}

impl Shared {
    /// Switches to dirty-map tracking when the ring is full.
    pub(super) fn overflow(&self, state: &mut State) {
        if state.mode == TrackingMode::DirtyMap {
            return;
        }
        match state.on_ring_full {
            OnRingFull::Bitmap => warn!(
                group = %self.name,
                ring_size = self.ring_size,
                "Log ring full: the consumer is behind or gone; tracking by dirty map from now on, a resync is required"
            ),
            OnRingFull::Throttle { max_delay } => warn!(
                group = %self.name,
                ring_size = self.ring_size,
                max_delay = ?max_delay,
                "Log ring full: the throttle could not keep the log (the consumer freed no room within the bound, or a write is larger than the ring); tracking by dirty map from now on, a resync is required"
            ),
        }
        // Nothing else to do under the lock: what the log holds stays in the ring
        // until a resync marks it (outside the lock), and writers from now on mark
        // the resync map themselves.
        state.mode = TrackingMode::DirtyMap;
        state.resync = Some(ResyncReason::RingOverflow);
        // Writes from now on are not logged: a copy in progress cannot resume after a
        // crash.
        state.superblock.copy_position = None;
        state.resumable_copy = None;
        // Synchronously: writes from now on are covered by the resync map alone, which
        // a host crash loses, so the reason to resync everything must be on disk.
        if let Err(error) = self.write_superblock(state, true) {
            warn!(group = %self.name, %error, "Could not record the overflow in the superblock");
        }
        // Throttled writers stop waiting: they go by dirty map now.
        self.wake(state);
    }

    /// Under [`OnRingFull::Throttle`], pauses a write that logs `logged` ring bytes
    /// for [`throttle_pause`], holding no lock and no admission, so reads, syncs and
    /// other writers go on. Returns when the write arrived (throttling only) and how
    /// long it slept.
    pub(super) fn pace(&self, logged: u64) -> (Option<Instant>, Duration) {
        // Checked without the lock: the default policy costs writers nothing, not
        // even a clock read.
        if !self.throttling.load(Ordering::Relaxed) {
            return (None, Duration::ZERO);
        }
        let arrived = Instant::now();
        let pause = {
            let state = lock(&self.state);
            match state.on_ring_full {
                OnRingFull::Throttle { max_delay }
                    if state.mode == TrackingMode::Logging && !state.broken =>
                {
                    throttle_pause(state.tail - state.head + logged, self.ring_size, max_delay)
                }
                _ => Duration::ZERO,
            }
        };
        if pause.is_zero() {
            return (Some(arrived), Duration::ZERO);
        }
        let started = Instant::now();
        std::thread::sleep(pause);
        (Some(arrived), started.elapsed())
    }
}
