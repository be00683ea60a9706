//! A disk group (one VM): its disks share one log ring and one sequence, so a cycle
//! closes at one instant across all of them.
//!
//! # The write protocol
//! For every write, trim and write-zeroes the caller (the NBD export):
//! 1. calls [`DiskTracker::log_write`] / [`DiskTracker::log_zero`], which under the group
//!    lock waits for overlapping in-flight writes of the same disk, reserves ring space
//!    and marks the dirty map. A record with a payload of up to 64 KiB (and every zero,
//!    trim and close marker) is written whole there, header, commit CRC and payload in
//!    one `pwritev`; a larger one gets its header there and, without the lock, its
//!    payload and then its commit marker, so large writers copy in parallel (the
//!    commit word's two forms: [`crate::record`]);
//! 2. writes the image;
//! 3. drops the returned [`LogGuard`] (or reports an image failure through it);
//! 4. acknowledges the client.
//!
//! Ordering: overlapping writes are serialised from step 1 to step 3, so the ring's
//! order of overlapping records is the order they reached the image. Records are
//! committed before the image is written, so after a daemon crash every image change
//! has a committed record; recovery replays committed records onto the images, which
//! makes image and log agree.
//!
//! Cycles: a record belongs to the cycle that was open when it was reserved. Closing a
//! cycle only bumps the number under the lock (microseconds); readers of the closed
//! cycle wait until its in-flight writes have completed. So every write acknowledged
//! before the close is in the closed cycle and none issued after it is.
//!
//! Durability: the ring is a preallocated file, written with `pwrite` and read back
//! through a read-only mapping. Not written through the mapping: a store through a
//! shared mapping dirties its whole page-cache folio (up to 2 MiB with the large folios
//! of recent kernels), where `pwrite` dirties only the blocks it wrote, and flushes
//! after stores were measurably slower (benches/RESULTS.md, session 14). [`Group::sync`] makes the ring
//! and the given image files durable together (FLUSH, FUA). After a daemon crash the
//! page cache holds everything that was written; after a host crash or power loss,
//! unsynced writes may be missing from both image and log, and since the image may hold
//! writes the log lost, the group marks itself for a resync (it knows it shut down
//! uncleanly from the clean flag and the boot id). The resync covers what the log
//! still holds and the extents of the activity log ([`crate::activity`]), which lists
//! every extent that may hold a write not yet durable: a write into an extent not
//! listed waits for the list to be persisted first. Disk syncs go through
//! [`DiskTracker::sync`] so the tracker knows which writes are durable.
//!
//! Overflow: what happens when the ring has no room (the consumer is behind or gone)
//! is the group's [`OnRingFull`] policy (module `ring_full`). Writes never fail either
//! way.
//!
//! # Layers
//! This module holds the group's state and the lock over it; each layer is a module:
//! `open` (opening, crash recovery, clean shutdown), `ring` (records and the
//! superblock), `ring_full` (the policy when the ring is full), `activity_gate` (the
//! activity log's admission of writes, disk syncs), `write_path` (logging a write and
//! its [`LogGuard`]) and `resync` (dirty-map resynchronisation).

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use memmap2::MmapRaw;
use nix::fcntl::Flock;

use crate::activity::ActivityLog;
use crate::bitmap::AtomicBitmap;
use crate::durability::{Durability, GroupCommit};
use crate::superblock::{ResyncReason, Superblock};

mod activity_gate;
mod open;
mod resync;
mod ring;
mod ring_full;
mod write_path;

use ring::CloseMark;

pub use open::{OpenReport, PreviousShutdown};
pub use ring_full::{OnRingFull, ThrottleStats};
pub use write_path::{LogGuard, MAX_RECORD_PAYLOAD};

/// Smallest ring accepted.
pub const MIN_RING_SIZE: u64 = 4 << 20;

/// A disk of a group, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Export name (recorded in the ring so a changed configuration is noticed).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// What a group needs to open.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Group name, for logs.
    pub name: String,
    /// The ring file; created and preallocated if missing.
    pub ring_path: PathBuf,
    /// Bytes of record area (a multiple of 4 KiB).
    pub ring_size: u64,
    /// Dirty-map granularity (a power of two, at least 512).
    pub block_size: u64,
    /// The disks, in index order.
    pub disks: Vec<DiskSpec>,
}

/// How the group is tracking writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingMode {
    /// Every write is in the log ring.
    Logging,
    /// Only the dirty map is kept; a resync is required.
    DirtyMap,
}

/// A snapshot of a group's state for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// Tracking mode.
    pub mode: TrackingMode,
    /// Why a resync is required, if it is.
    pub resync: Option<ResyncReason>,
    /// The open cycle.
    pub open_cycle: u64,
    /// The newest closed cycle (0: none).
    pub last_closed: u64,
    /// The newest acknowledged cycle (0: none).
    pub last_acked: u64,
    /// Ring capacity in bytes.
    pub ring_size: u64,
    /// Ring bytes holding unacknowledged records.
    pub ring_used: u64,
    /// Records logged since the daemon started.
    pub records_logged: u64,
    /// What the group does when the ring is full.
    pub on_ring_full: OnRingFull,
    /// Writes slowed to keep the log.
    pub throttle: ThrottleStats,
    /// Per disk: bytes written in the open cycle, and bytes awaiting resync.
    pub disks: Vec<DiskStatus>,
    /// Whether writes are refused ([`Group::refuse_writes`]: the group was handed over
    /// by a planned failover, or is being).
    pub writes_refused: bool,
}

/// Per-disk figures of [`GroupStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStatus {
    /// Disk name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes marked in the open cycle's dirty map.
    pub dirty_bytes: u64,
    /// Bytes marked for resync.
    pub resync_bytes: u64,
}

/// Whether logging an operation may wait for other writes of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Allowed,
    /// Fail with [`TrackerError::WouldWait`] instead.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
}

#[derive(Debug)]
struct State {
    head: u64,
    head_seq: u64,
    tail: u64,
    next_seq: u64,
    open_cycle: u64,
    acked_cycle: u64,
    closed: VecDeque<CloseMark>,
    /// Reserved but not finished records, per cycle (few cycles at once).
    inflight: VecDeque<(u64, u32)>,
    /// In-flight write ranges, per disk.
    ranges: Vec<Vec<Range>>,
    waiters: u32,
    /// Writes in flight that were tracked by dirty map only.
    unlogged: u32,
    mode: TrackingMode,
    resync: Option<ResyncReason>,
    superblock: Superblock,
    consumer_busy: bool,
    records_logged: u64,
    /// A fatal ring error (e.g. superblock write failed); writes keep going by map.
    broken: bool,
    /// After a daemon crash mid-copy: where the resync copy stood (disk, offset). The
    /// resync maps hold every block from there on, and the log every write since the
    /// copy began, until the consumer takes them with [`Group::resume_copy`].
    resumable_copy: Option<(usize, u64)>,
    /// Writes are refused ([`Group::refuse_writes`]).
    writes_refused: bool,
    /// Extents that may hold writes not yet durable.
    activity: ActivityLog,
    on_ring_full: OnRingFull,
    throttle: ThrottleStats,
}

struct DiskState {
    name: String,
    size: u64,
    /// Blocks written in the open cycle.
    open_bits: AtomicBitmap,
    /// Blocks that must be resynchronised.
    resync_bits: AtomicBitmap,
    /// A descriptor of the image, for syncing it beside the ring
    /// ([`DiskTracker::attach_image`]).
    image: OnceLock<File>,
}

/// State shared by the group handle, its disk trackers and its closed cycles.
pub(crate) struct Shared {
    name: String,
    ring_path: PathBuf,
    /// The ring file, locked exclusively (one daemon per ring). Records and
    /// superblocks are written through it with `pwrite`, never through the mapping.
    file: Flock<File>,
    /// The ring opened with `O_DSYNC`, for superblock writes that must be durable on
    /// return: the kernel syncs just their range.
    dsync_file: File,
    /// A second open of the ring, for syncs: an fsync in flight in io_uring keeps its
    /// file referenced past the daemon's death, and the exclusive lock belongs to the
    /// first open, which must be released the moment the daemon dies.
    sync_file: File,
    /// A read-only mapping of the ring, for reading records back.
    map: MmapRaw,
    ring_size: u64,
    state: Mutex<State>,
    changed: Condvar,
    /// Whether the policy is [`OnRingFull::Throttle`] (a copy of the state's, read
    /// without the lock).
    throttling: AtomicBool,
    disks: Vec<DiskState>,
    durability: Durability,
    /// Joins concurrent FLUSH and FUA syncs of the group's disks.
    group_commit: GroupCommit,
    /// Records whose last page was filled with zeroes (tests).
    #[cfg(test)]
    page_fills: std::sync::atomic::AtomicU64,
}

/// A group of disks sharing a log ring.
#[derive(Clone)]
pub struct Group {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// The tracker of one disk of a group.
#[derive(Clone)]
pub struct DiskTracker {
    shared: Arc<Shared>,
    disk: usize,
}

impl std::fmt::Debug for DiskTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTracker")
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

// A panicking writer leaves the ring state consistent (every update is completed
// before the guard drops), so poisoning is not a reason to stop tracking.
use base::sync::lock;

fn usize_of(value: u64) -> usize {
    // The ring is mapped whole, so every offset into it fits in usize.
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl Group {
    /// The tracker of disk `index`.
    pub fn disk(&self, index: usize) -> Option<DiskTracker> {
        (index < self.shared.disks.len()).then(|| DiskTracker {
            shared: Arc::clone(&self.shared),
            disk: index,
        })
    }

    /// Sizes of the disks in bytes, in group order.
    pub fn disk_sizes(&self) -> Vec<u64> {
        self.shared.disks.iter().map(|disk| disk.size).collect()
    }

    /// Group name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Refuses every write, trim and write-zeroes from now on with
    /// [`TrackerError::WritesRefused`](crate::TrackerError::WritesRefused) (or accepts
    /// them again). Admission is decided under the group lock, so every write admitted
    /// before is in the open cycle: the next cycle closed holds every write the group
    /// will ever have acknowledged.
    pub fn refuse_writes(&self, refuse: bool) {
        lock(&self.shared.state).writes_refused = refuse;
    }

    /// Why a resync is required, if it is. Cheap (unlike [`Group::status`], which
    /// counts dirty bits): for callers that poll.
    pub fn resync_reason(&self) -> Option<ResyncReason> {
        lock(&self.shared.state).resync
    }

    /// Current figures.
    pub fn status(&self) -> GroupStatus {
        // The maps are atomic: counting them (milliseconds on a large disk) must not
        // hold the lock writers take.
        let disks = self
            .shared
            .disks
            .iter()
            .map(|disk| DiskStatus {
                name: disk.name.clone(),
                size: disk.size,
                dirty_bytes: disk.open_bits.dirty_bytes(),
                resync_bytes: disk.resync_bits.dirty_bytes(),
            })
            .collect();
        let state = lock(&self.shared.state);
        GroupStatus {
            mode: state.mode,
            resync: state.resync,
            open_cycle: state.open_cycle,
            last_closed: state
                .closed
                .back()
                .map_or(state.acked_cycle, |mark| mark.cycle),
            last_acked: state.acked_cycle,
            ring_size: self.shared.ring_size,
            ring_used: state.tail - state.head,
            records_logged: state.records_logged,
            on_ring_full: state.on_ring_full,
            throttle: state.throttle,
            disks,
            writes_refused: state.writes_refused,
        }
    }
}

impl Shared {
    /// Waits on the group's condition variable while `blocked` holds. Finishing
    /// writers wake waiters whenever ranges or in-flight counts change.
    fn wait_while<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        mut blocked: impl FnMut(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while blocked(&state) {
            state = self.wait_once(state, None);
        }
        state
    }

    /// Wakes every waiter on the group's condition variable, if there is one.
    fn wake(&self, state: &State) {
        if state.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits once on the group's condition variable (see [`Shared::wait_while`]), at
    /// most `timeout` if one is given.
    fn wait_once<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        state.waiters += 1;
        state = match timeout {
            None => self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some(timeout) => {
                self.changed
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        state.waiters -= 1;
        state
    }
}

impl DiskTracker {
    /// `x-blkrep:dirty` extents: runs of blocks written in the open cycle (`true`) or
    /// not, covering `offset..offset + len` clipped to the disk.
    pub fn dirty_extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let disk = &self.shared.disks[self.disk];
        let mut runs = disk.open_bits.extents(offset, len);
        if lock(&self.shared.state).mode == TrackingMode::DirtyMap {
            // While tracking by map, everything awaiting resync will ship next.
            let resync = disk.resync_bits.extents(offset, len);
            runs = merge_runs(&runs, &resync);
        }
        runs
    }

    /// The group this disk belongs to.
    pub fn group(&self) -> Group {
        Group {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Index of this disk in its group.
    pub fn index(&self) -> usize {
        self.disk
    }
}

/// OR of two run lists over the same range.
fn merge_runs(a: &[(u64, bool)], b: &[(u64, bool)]) -> Vec<(u64, bool)> {
    let mut out: Vec<(u64, bool)> = Vec::new();
    let (mut ia, mut ib) = (a.iter().copied(), b.iter().copied());
    let (mut ca, mut cb) = (ia.next(), ib.next());
    while let (Some((la, da)), Some((lb, db))) = (ca, cb) {
        let step = la.min(lb);
        let dirty = da || db;
        match out.last_mut() {
            Some((len, state)) if *state == dirty => *len += step,
            _ => out.push((step, dirty)),
        }
        ca = if la > step {
            Some((la - step, da))
        } else {
            ia.next()
        };
        cb = if lb > step {
            Some((lb - step, db))
        } else {
            ib.next()
        };
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
