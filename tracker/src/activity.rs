//! The activity log: which extents of a group's disks may hold writes that are not yet
//! durable, so a resync after a host crash covers those extents instead of whole
//! disks (the idea of DRBD's activity log).
//!
//! # The contract
//! Every write that may be missing from the durable log after a host crash lies in an
//! extent the persistent record lists, or on a disk the record marks for a whole
//! resync:
//! - before a write is admitted, each extent it touches is in the table, and an extent
//!   newly added is persisted (the superblock written synchronously) first;
//! - an extent leaves the table only when no write to it is in flight and every write
//!   to it finished before a sync of its disk (ring and image) started and that sync
//!   completed ([`ActivityLog::begin_sync`], [`ActivityLog::synced`]);
//! - a write that cannot be listed (it touches more than [`MAX_SPAN`] extents, like a
//!   trim of a whole disk, or no extent can leave because the sync failed) goes on
//!   uncovered, and the record first marks its disk as to be resynchronised whole
//!   after a host crash; the mark goes once every uncovered write to the disk has
//!   finished and a sync of the disk started after that has completed.
//!
//! Everything here runs under the group lock; it does no I/O itself.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::superblock::{ActivityRecord, MAX_ACTIVE_EXTENTS};

/// Extent size: 64 MiB. The granularity of a post-crash resync.
pub const EXTENT_SHIFT: u32 = 26;
/// Extents the table holds: with 64 MiB extents, 12 GiB of recently written space.
pub const SLOTS: usize = MAX_ACTIVE_EXTENTS;
/// Widest operation entered in the table, in extents.
pub const MAX_SPAN: u64 = 4;
/// [`MAX_SPAN`] as an array length.
const SPAN: usize = 4;
const _: () = assert!(MAX_SPAN == 4);

/// Bits of a key holding the extent index; the disk index sits above (see
/// [`ActivityRecord::extents`]).
const DISK_SHIFT: u32 = 48;

/// An extent of a disk, as persisted.
fn key(disk: usize, extent: u64) -> u64 {
    (u64::try_from(disk).unwrap_or(0) << DISK_SHIFT) | extent
}

fn disk_of(key: u64) -> usize {
    usize::try_from(key >> DISK_SHIFT).unwrap_or(usize::MAX)
}

/// The extents `start..end` touches (`end > start`).
fn extents(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    (start >> EXTENT_SHIFT)..=((end - 1) >> EXTENT_SHIFT)
}

/// Hashes extent keys by one multiplication: they are not chosen by a peer (a
/// client picks offsets, but the table never holds more than [`SLOTS`] of them), and
/// the lookup is on every write's path.
#[derive(Default)]
struct ExtentHasher(u64);

impl Hasher for ExtentHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        // Fibonacci hashing: the high bits, which the table uses, mix every input bit.
        self.0 = value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ExtentIndex = HashMap<u64, usize, BuildHasherDefault<ExtentHasher>>;

/// What admitting an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Every extent was already in the table; nothing to persist.
    Active,
    /// Extents were added: persist the record before the write goes ahead.
    Added,
    /// Too wide for the table: admit it uncovered.
    TooWide,
    /// No slot is free: sync this disk (ring and image), then try again.
    SyncDisk(usize),
    /// Every slot has a write in flight: wait for one to finish, then try again.
    Wait,
}

#[derive(Debug, Clone, Copy, Default)]
struct SlotState {
    key: Option<u64>,
    /// Admitted writes not yet finished.
    inflight: u32,
    /// Sync generation when a write last finished here.
    finished_at: u64,
    /// For least-recently-used eviction.
    last_used: u64,
}

/// The in-memory table; see the module documentation for its contract.
#[derive(Debug)]
pub struct ActivityLog {
    slots: Vec<SlotState>,
    index: ExtentIndex,
    /// Bumped when a sync starts.
    generation: u64,
    /// Per disk: the generation at the start of its latest completed sync.
    durable: Vec<u64>,
    tick: u64,
    /// Per disk: uncovered writes in flight, and the generation the last finished at.
    uncovered: Vec<(u32, u64)>,
    /// Disks a host crash resynchronises whole (bit per disk index).
    whole_disks: u32,
}

impl ActivityLog {
    /// A table for `disks` disks (at most 32), holding `inherited`: the extents and
    /// whole disks a crashed run left, not yet known durable; they stay until their
    /// disk is synced in this run.
    pub fn new(disks: usize, inherited: &ActivityRecord) -> Self {
        Self::with_slots(disks, inherited, SLOTS)
    }

    fn with_slots(disks: usize, inherited: &ActivityRecord, slots: usize) -> Self {
        let all_disks = u32::try_from((1u64 << disks.min(32)) - 1).unwrap_or(u32::MAX);
        let usable = inherited.valid && inherited.extent_shift == EXTENT_SHIFT;
        let whole_disks = if usable {
            inherited.whole_disks & all_disks
        } else {
            all_disks
        };
        let mut log = Self {
            slots: vec![SlotState::default(); slots],
            index: ExtentIndex::with_capacity_and_hasher(slots, BuildHasherDefault::default()),
            generation: 1,
            durable: vec![0; disks],
            tick: 0,
            uncovered: (0..disks)
                .map(|disk| (0, u64::from(whole_disks >> disk & 1)))
                .collect(),
            whole_disks,
        };
        for &extent_key in inherited.extents.iter().filter(|_| usable).take(slots) {
            if disk_of(extent_key) < disks && !log.index.contains_key(&extent_key) {
                let slot = log.index.len();
                log.slots[slot] = SlotState {
                    key: Some(extent_key),
                    inflight: 0,
                    // Durable once their disk has been synced in this run.
                    finished_at: 1,
                    last_used: 0,
                };
                log.index.insert(extent_key, slot);
            }
        }
        log
    }

    /// Enters the extents of `start..end` on `disk` for a write about to be admitted.
    /// On [`Admission::Active`] or [`Admission::Added`] the write holds them until
    /// [`ActivityLog::release`].
    pub fn admit(&mut self, disk: usize, start: u64, end: u64) -> Admission {
        let span = extents(start, end);
        if span.end() - span.start() >= MAX_SPAN {
            return Admission::TooWide;
        }
        // One lookup per extent (at most MAX_SPAN of them): the write path runs this.
        let mut slots = [0usize; SPAN];
        let mut listed = 0;
        let mut missing = [0u64; SPAN];
        let mut missing_count = 0;
        for extent in span {
            let extent_key = key(disk, extent);
            match self.index.get(&extent_key) {
                Some(&slot) => {
                    slots[listed] = slot;
                    listed += 1;
                }
                None => {
                    missing[missing_count] = extent_key;
                    missing_count += 1;
                }
            }
        }
        // The write's own listed extents are not evicted to make room for the others.
        for index in listed..listed + missing_count {
            match self.victim(&slots[..index]) {
                Some(slot) => slots[index] = slot,
                None => return self.blocked(&slots[..index]),
            }
        }
        for (extent_key, slot) in missing[..missing_count].iter().zip(&slots[listed..]) {
            if let Some(old) = self.slots[*slot].key.take() {
                self.index.remove(&old);
            }
            self.slots[*slot] = SlotState {
                key: Some(*extent_key),
                ..SlotState::default()
            };
            self.index.insert(*extent_key, *slot);
        }
        self.tick += 1;
        for &slot in &slots[..listed + missing_count] {
            let state = &mut self.slots[slot];
            state.inflight += 1;
            state.last_used = self.tick;
        }
        if missing_count == 0 {
            Admission::Active
        } else {
            Admission::Added
        }
    }

    /// A free slot, or the least recently used one whose writes are all durable,
    /// other than `taken`.
    fn victim(&self, taken: &[usize]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(slot, _)| !taken.contains(slot))
            .filter(|(_, state)| match state.key {
                None => true,
                Some(k) => {
                    state.inflight == 0
                        && self
                            .durable
                            .get(disk_of(k))
                            .is_some_and(|durable| state.finished_at <= *durable)
                }
            })
            .min_by_key(|(_, state)| (state.key.is_some(), state.last_used))
            .map(|(slot, _)| slot)
    }

    /// Why no more can be evicted beside `victims` (taken, or the write's own): the
    /// least recently used idle extent's disk to sync, or writes in flight everywhere
    /// to wait for.
    fn blocked(&self, victims: &[usize]) -> Admission {
        self.slots
            .iter()
            .enumerate()
            .filter(|(slot, state)| state.inflight == 0 && !victims.contains(slot))
            .min_by_key(|(_, state)| state.last_used)
            .and_then(|(_, state)| state.key)
            .map_or(Admission::Wait, |k| Admission::SyncDisk(disk_of(k)))
    }

    /// Admits a write to `disk` the table cannot list: the disk is marked for a
    /// whole resync until the write is durable. Returns whether the record changed
    /// and must be persisted before the write goes ahead.
    pub fn admit_uncovered(&mut self, disk: usize) -> bool {
        let Some(uncovered) = self.uncovered.get_mut(disk) else {
            return false;
        };
        uncovered.0 += 1;
        let bit = 1u32 << disk;
        let added = self.whole_disks & bit == 0;
        self.whole_disks |= bit;
        added
    }

    /// The write admitted for `start..end` on `disk` finished.
    pub fn release(&mut self, disk: usize, start: u64, end: u64) {
        for extent in extents(start, end) {
            if let Some(&slot) = self.index.get(&key(disk, extent)) {
                let state = &mut self.slots[slot];
                state.inflight = state.inflight.saturating_sub(1);
                state.finished_at = self.generation;
            }
        }
    }

    /// An uncovered write to `disk` finished.
    pub fn release_uncovered(&mut self, disk: usize) {
        if let Some(uncovered) = self.uncovered.get_mut(disk) {
            uncovered.0 = uncovered.0.saturating_sub(1);
            uncovered.1 = self.generation;
        }
    }

    /// A sync of ring and image is starting; pass the result to
    /// [`ActivityLog::synced`] once it completed.
    pub fn begin_sync(&mut self) -> u64 {
        let started = self.generation;
        self.generation += 1;
        started
    }

    /// The sync of `disk` begun at `started` completed: every write to it that had
    /// finished by then is durable. Returns whether the disk's whole-resync mark went
    /// (worth persisting, though not urgent).
    pub fn synced(&mut self, disk: usize, started: u64) -> bool {
        let (Some(durable), Some(&(in_flight, finished_at))) =
            (self.durable.get_mut(disk), self.uncovered.get(disk))
        else {
            return false;
        };
        *durable = (*durable).max(started);
        let bit = 1u32 << disk;
        if self.whole_disks & bit != 0 && in_flight == 0 && *durable >= finished_at {
            self.whole_disks &= !bit;
            return true;
        }
        false
    }

    /// The record to persist.
    pub fn record(&self) -> ActivityRecord {
        let mut extents: Vec<u64> = self.slots.iter().filter_map(|state| state.key).collect();
        extents.sort_unstable();
        ActivityRecord {
            valid: true,
            extent_shift: EXTENT_SHIFT,
            whole_disks: self.whole_disks,
            extents,
        }
    }
}

/// The byte ranges of `record` on `disk` (of `size` bytes) to resynchronise after a
/// host crash, or `None` when the whole disk must be.
pub fn crash_ranges(record: &ActivityRecord, disk: usize, size: u64) -> Option<Vec<(u64, u64)>> {
    let whole = u32::try_from(disk)
        .ok()
        .and_then(|disk| record.whole_disks.checked_shr(disk))
        .is_none_or(|bits| bits & 1 == 1);
    if !record.valid || record.extent_shift != EXTENT_SHIFT || whole {
        return None;
    }
    Some(
        record
            .extents
            .iter()
            .filter(|k| disk_of(**k) == disk)
            .map(|k| {
                let start = (k & ((1 << DISK_SHIFT) - 1)) << EXTENT_SHIFT;
                let start = start.min(size);
                (start, (start + (1 << EXTENT_SHIFT)).min(size) - start)
            })
            .filter(|(_, len)| *len > 0)
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
