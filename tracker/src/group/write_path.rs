//! The disk write path: [`DiskTracker::log_write`] and [`DiskTracker::log_zero`] log
//! an operation before the image is written (step 1 of the write protocol), and its
//! [`LogGuard`] releases it once the image write is done (step 3), or reports that the
//! image write failed.
//!
//! Under the group lock a write waits for overlapping writes of its disk, finds ring
//! room (or falls back to the dirty map) and reserves its records; it then copies its
//! payload from the caller's buffer into the ring without the lock. The guard keeps no
//! buffer: it holds the write's range and records, so overlapping writes and readers
//! of its cycle wait until it is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::activity_gate::Coverage;
use super::ring::{Contents, Slot, WHOLE_PAYLOAD_MAX};
use super::ring_full::usable_ring;
use super::{lock, usize_of, DiskTracker, OnRingFull, Range, Shared, TrackingMode, Waiting};
use crate::record::{record_len, RecordKind};
use crate::superblock::ResyncReason;
use crate::TrackerError;

/// Holds a logged write's range until the image write is done. Drop it after the image
/// write succeeded; call [`LogGuard::image_failed`] if it did not.
#[must_use = "the guard must live until the image write has completed"]
pub struct LogGuard {
    shared: Arc<Shared>,
    held: Option<Held>,
    /// A write tracked by dirty map only: it still holds its range (so a later
    /// logged write to the same blocks waits for its image write) and is counted (so
    /// a resync waits for it before reading the images).
    unlogged: Option<(usize, Range, Coverage)>,
}
/// The records of one logged operation, and the range it holds.
#[derive(Debug)]
struct Held {
    disk: usize,
    cycle: u64,
    kind: RecordKind,
    range: Range,
    coverage: Coverage,
    first: Slot,
    /// Further records of a write split at [`MAX_RECORD_PAYLOAD`]; empty (and so
    /// not allocated) for most writes.
    rest: Vec<Slot>,
}

impl Held {
    fn slots(&self) -> impl Iterator<Item = &Slot> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }
}

/// Largest payload of one record: larger writes are split into several records,
/// reserved together, so any write that fits the ring's free space is logged.
pub const MAX_RECORD_PAYLOAD: u32 = 1 << 20;

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard")
            .field("held", &self.held)
            .finish()
    }
}

impl Shared {
    fn finish(&self, held: &Held) {
        let mut state = lock(&self.state);
        Self::leave_activity(&mut state, held.disk, held.range, held.coverage);
        if let Some(ranges) = state.ranges.get_mut(held.disk) {
            if let Some(index) = ranges.iter().position(|range| *range == held.range) {
                ranges.swap_remove(index);
            }
        }
        let records = u32::try_from(1 + held.rest.len()).unwrap_or(u32::MAX);
        if let Some(entry) = state
            .inflight
            .iter_mut()
            .find(|(cycle, _)| *cycle == held.cycle)
        {
            entry.1 = entry.1.saturating_sub(records);
        }
        while state.inflight.front().is_some_and(|(_, count)| *count == 0) {
            state.inflight.pop_front();
        }
        self.wake(&state);
    }

    /// Gives up on a logged operation's records: they are withdrawn (best effort)
    /// and its range is marked for resync, with the group tracking by dirty map from
    /// now on. `ring_error` is the failed ring write that made the records useless;
    /// without, the image write failed after logging.
    fn abandon(&self, held: &Held, ring_error: Option<&std::io::Error>) {
        for slot in held.slots() {
            // Best effort: a record left committed is harmless, the resync copies
            // its range again from the image.
            let _ = self.store_commit(slot, 0);
        }
        if let Some(disk) = self.disks.get(held.disk) {
            disk.resync_bits
                .set_range(held.range.start, held.range.end - held.range.start);
        }
        let mut state = lock(&self.state);
        if let Some(error) = ring_error {
            self.ring_write_failed(&mut state, error);
        } else if state.resync.is_none() {
            warn!(group = %self.name, "An image write failed after logging; the range is marked for resync");
            state.resync = Some(ResyncReason::ImageWriteError);
            state.mode = TrackingMode::DirtyMap;
            // Recorded now, so a crash before the next superblock write still
            // resyncs the range rather than ship around it.
            if let Err(error) = self.write_superblock(&mut state, true) {
                warn!(group = %self.name, %error, "Could not record the resync in the superblock");
            }
        }
    }

    fn finish_unlogged(&self, disk: usize, range: Range, coverage: Coverage) {
        let mut state = lock(&self.state);
        Self::leave_activity(&mut state, disk, range, coverage);
        if let Some(ranges) = state.ranges.get_mut(disk) {
            if let Some(index) = ranges.iter().position(|held| *held == range) {
                ranges.swap_remove(index);
            }
        }
        state.unlogged = state.unlogged.saturating_sub(1);
        self.wake(&state);
    }
}

impl DiskTracker {
    /// Logs a write of `data` at `offset` (step 1 of the write protocol).
    pub fn log_write(&self, offset: u64, data: &[u8]) -> Result<LogGuard, TrackerError> {
        let len = u64::try_from(data.len()).map_err(|_| TrackerError::OutOfRange)?;
        self.log(RecordKind::Write, offset, len, data, Waiting::Allowed)
    }

    /// Logs a write like [`DiskTracker::log_write`], but fails with
    /// [`TrackerError::WouldWait`] rather than wait for other writes to finish (an
    /// overlapping write of the disk, a full activity log, a throttled ring). For a
    /// thread that holds guards of writes still in flight: it must not wait for them
    /// itself, nor for another thread that waits for them. After `WouldWait` it
    /// finishes its own writes, then calls `log_write`.
    pub fn try_log_write(&self, offset: u64, data: &[u8]) -> Result<LogGuard, TrackerError> {
        let len = u64::try_from(data.len()).map_err(|_| TrackerError::OutOfRange)?;
        self.log(RecordKind::Write, offset, len, data, Waiting::Refused)
    }

    /// Logs a write-zeroes (`trim = false`) or a trim of `len` bytes at `offset`.
    pub fn log_zero(&self, offset: u64, len: u64, trim: bool) -> Result<LogGuard, TrackerError> {
        let kind = if trim {
            RecordKind::Trim
        } else {
            RecordKind::Zero
        };
        self.log(kind, offset, len, &[], Waiting::Allowed)
    }

    fn log(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        waiting: Waiting,
    ) -> Result<LogGuard, TrackerError> {
        let shared = &self.shared;
        let disk = &shared.disks[self.disk];
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= disk.size)
            .ok_or(TrackerError::OutOfRange)?;
        if len == 0 {
            return Ok(LogGuard {
                shared: Arc::clone(shared),
                held: None,
                unlogged: None,
            });
        }
        let range = Range { start: offset, end };
        let write = kind == RecordKind::Write;
        let pieces = if write {
            len.div_ceil(u64::from(MAX_RECORD_PAYLOAD))
        } else {
            1
        };
        // A write is logged whole or not at all: every piece must fit, with the
        // padding at the ring's end and room to close the cycle, before any is
        // reserved.
        let payload = if write {
            len.next_multiple_of(crate::record::RECORD_ALIGN)
        } else {
            0
        };
        let logged = pieces * record_len(0) + payload;
        let (arrived, paused) = shared.pace(logged);
        let (state, coverage) =
            shared.enter_activity(lock(&shared.state), self.disk, range, waiting)?;
        let (mut state, waited) =
            self.wait_for_room(state, range, coverage, logged, arrived, waiting)?;
        if !(paused + waited).is_zero() {
            state.throttle.record(paused + waited);
        }
        disk.open_bits.set_range(offset, len);
        let mut first = None;
        let mut rest = Vec::new();
        let mut piece_start = offset;
        while piece_start < end {
            let piece_end = if write {
                end.min(piece_start + u64::from(MAX_RECORD_PAYLOAD))
            } else {
                end
            };
            // At most MAX_RECORD_PAYLOAD for writes; other kinds carry no payload.
            let payload_len = if write {
                u32::try_from(piece_end - piece_start).unwrap_or(0)
            } else {
                0
            };
            let piece = Range {
                start: piece_start,
                end: piece_end,
            };
            let contents = if !write {
                Contents::Whole(&[])
            } else if usize_of(u64::from(payload_len)) <= WHOLE_PAYLOAD_MAX {
                Contents::Whole(&data[usize_of(piece_start - offset)..usize_of(piece_end - offset)])
            } else {
                Contents::Later(payload_len)
            };
            let reserved = shared.reserve(&mut state, self.disk, kind, piece, contents);
            let Some(slot) = reserved.inspect_err(|_| {
                Shared::leave_activity(&mut state, self.disk, range, coverage);
            })?
            else {
                // The ring is full (only possible for the first piece: room for all
                // was checked) or a ring write failed. Either way the group now tracks
                // by dirty map, and the resync covers the whole write, including any
                // piece already reserved.
                disk.resync_bits.set_range(offset, len);
                state.ranges[self.disk].push(range);
                state.unlogged += 1;
                return Ok(LogGuard {
                    shared: Arc::clone(shared),
                    held: None,
                    unlogged: Some((self.disk, range, coverage)),
                });
            };
            match first {
                None => first = Some(slot),
                Some(_) => rest.push(slot),
            }
            piece_start = piece_end;
        }
        let Some(first) = first else {
            // Unreachable (len > 0 gives a first piece), but the admission is given back.
            Shared::leave_activity(&mut state, self.disk, range, coverage);
            return Ok(LogGuard {
                shared: Arc::clone(shared),
                held: None,
                unlogged: None,
            });
        };
        state.ranges[self.disk].push(range);
        let records = u32::try_from(pieces).unwrap_or(u32::MAX);
        match state.inflight.back_mut() {
            Some((cycle, count)) if *cycle == first.cycle => *count += records,
            _ => state.inflight.push_back((first.cycle, records)),
        }
        state.records_logged += pieces;
        drop(state);
        let held = Held {
            disk: self.disk,
            cycle: first.cycle,
            kind,
            range,
            coverage,
            first,
            rest,
        };
        let committed = held
            .slots()
            .filter(|slot| !slot.committed)
            .try_for_each(|slot| shared.commit(slot, piece_of(data, offset, slot)));
        if let Err(error) = committed {
            // The write still goes to the image: the resync map covers it instead.
            shared.abandon(&held, Some(&error));
        }
        Ok(LogGuard {
            shared: Arc::clone(shared),
            held: Some(held),
            unlogged: None,
        })
    }

    /// Waits until no overlapping write of the disk is in flight and the ring has room
    /// for `logged` bytes (or the group stops logging, or a throttled ring overflows);
    /// returns how long a throttled ring made it wait. With [`Waiting::Refused`] it
    /// fails with [`TrackerError::WouldWait`] instead of waiting. On error the
    /// activity admission of `range` is given back.
    fn wait_for_room<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, super::State>,
        range: Range,
        coverage: Coverage,
        logged: u64,
        mut arrived: Option<Instant>,
        waiting: Waiting,
    ) -> Result<(std::sync::MutexGuard<'a, super::State>, Duration), TrackerError> {
        let shared = &self.shared;
        let usable = usable_ring(shared.ring_size);
        // A write larger than the whole ring would wait in vain.
        let can_fit = logged <= usable;
        let mut waited = Duration::ZERO;
        loop {
            let overlaps = |state: &super::State| {
                state.ranges[self.disk]
                    .iter()
                    .any(|other| other.start < range.end && range.start < other.end)
            };
            if waiting == Waiting::Refused && overlaps(&state) {
                Shared::leave_activity(&mut state, self.disk, range, coverage);
                return Err(TrackerError::WouldWait);
            }
            state = shared.wait_while(state, overlaps);
            if state.writes_refused {
                Shared::leave_activity(&mut state, self.disk, range, coverage);
                return Err(TrackerError::WritesRefused);
            }
            if state.mode != TrackingMode::Logging
                || state.broken
                || state.tail - state.head + logged <= usable
            {
                return Ok((state, waited));
            }
            if let (OnRingFull::Throttle { max_delay }, true) = (state.on_ring_full, can_fit) {
                // Set by `pace` unless the policy changed since.
                let arrived = *arrived.get_or_insert_with(Instant::now);
                let now = Instant::now();
                let left = (arrived + max_delay).saturating_duration_since(now);
                if !left.is_zero() && waiting == Waiting::Refused {
                    Shared::leave_activity(&mut state, self.disk, range, coverage);
                    return Err(TrackerError::WouldWait);
                }
                if !left.is_zero() {
                    // The lock is released while waiting: an overlapping write may
                    // have been admitted meanwhile, so the loop checks again.
                    state = shared.wait_once(state, Some(left));
                    waited += now.elapsed();
                    continue;
                }
                state.throttle.expired += 1;
            }
            shared.overflow(&mut state);
            return Ok((state, waited));
        }
    }
}

impl LogGuard {
    /// Whether the write was logged (false while tracking by dirty map).
    pub fn is_logged(&self) -> bool {
        self.held.is_some()
    }

    /// Withdraws the records: the image refused the operation without changing
    /// anything (e.g. WRITE_ZEROES with FAST_ZERO that cannot be fast).
    pub fn cancel(mut self) {
        if let Some(held) = self.held.take() {
            let withdrawn = held
                .slots()
                .try_for_each(|slot| self.shared.store_commit(slot, 0));
            if let Err(error) = withdrawn {
                self.shared.abandon(&held, Some(&error));
            }
            self.shared.finish(&held);
        }
    }

    /// Reports that the image write failed after logging. For a write, `read_back`
    /// fills the record's payload with what the image now holds (it may be partly
    /// written), so log and image still agree. If that fails too, or for zeroes and
    /// trims, the record is cancelled and the range marked for resync.
    pub fn image_failed(mut self, read_back: impl FnOnce(&mut [u8]) -> std::io::Result<()>) {
        let Some(held) = self.held.take() else { return };
        let shared = Arc::clone(&self.shared);
        let mut recovered = false;
        if held.kind == RecordKind::Write {
            // The error path: a buffer for the whole range, then back into the records.
            let mut image = vec![0u8; usize_of(held.range.end - held.range.start)];
            if read_back(&mut image).is_ok() {
                // Uncommit first: a crash mid-copy must not leave a valid-looking
                // commit CRC over a half-rewritten payload.
                recovered = held.slots().all(|slot| {
                    shared.store_commit(slot, 0).is_ok()
                        && shared
                            .commit(slot, piece_of(&image, held.range.start, slot))
                            .is_ok()
                });
            }
        }
        if !recovered {
            shared.abandon(&held, None);
        }
        shared.finish(&held);
    }
}

/// The part of `data` (which starts at disk offset `start`) that `slot` records.
fn piece_of<'a>(data: &'a [u8], start: u64, slot: &Slot) -> &'a [u8] {
    let at = usize_of(slot.offset - start);
    let len = usize_of(u64::from(slot.payload_len));
    &data[at.min(data.len())..(at + len).min(data.len())]
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            self.shared.finish(&held);
        }
        if let Some((disk, range, coverage)) = self.unlogged.take() {
            self.shared.finish_unlogged(disk, range, coverage);
        }
    }
}
