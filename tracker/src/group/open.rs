//! Opening a group's ring, recovering after a crash, and the clean shutdown that tells
//! the next open none is needed.
//!
//! Opening learns how the previous run ended from the clean flag and the boot id
//! ([`PreviousShutdown`]), scans the ring from its head for the records it holds,
//! rebuilds the open cycle's dirty map and the resync state, and marks the ring in
//! use. After a daemon crash the caller replays [`Group::recovery_view`] onto the
//! images before serving ([`OpenReport::needs_replay`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use super::{
    lock, usize_of, DiskState, Group, OnRingFull, Shared, State, ThrottleStats, TrackerConfig,
    TrackingMode, MIN_RING_SIZE,
};
use crate::activity::{self, ActivityLog};
use crate::bitmap::AtomicBitmap;
use crate::cycle::ClosedCycle;
use crate::durability::{Durability, GroupCommit};
use crate::record::HEADER_LEN;
use crate::superblock::{
    current_boot_id, ActivityRecord, DiskRecord, ResyncReason, Superblock, SuperblockError,
    DATA_START, MAX_DISKS, MAX_DISK_NAME, SUPERBLOCK_LEN,
};
use crate::TrackerError;

/// How the previous run ended, as found when opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousShutdown {
    /// The ring did not exist: tracking starts now.
    Created,
    /// The previous daemon stopped cleanly.
    Clean,
    /// The previous daemon died on this boot: the page cache kept every write, the log
    /// is complete, and replaying it makes the images agree with it.
    DaemonCrash,
    /// The host went down: unsynced writes may be lost from log and image alike.
    HostCrash,
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    /// How the previous run ended.
    pub previous: PreviousShutdown,
    /// Committed records found between head and tail.
    pub records: u64,
    /// Records found uncommitted (in flight at the crash; never acknowledged).
    pub uncommitted: u64,
    /// Bytes of ring in use.
    pub ring_used: u64,
    /// Whether the group was already tracking by dirty map (a resync pending): then
    /// the images hold writes the log does not, and the images are the truth.
    pub resync_pending: bool,
    /// Disks the configuration has after the ring's: added to the group now, and
    /// marked whole for a resync (their initial copy).
    pub added_disks: usize,
}

impl OpenReport {
    /// Whether the images must be brought up to the log with
    /// [`Group::recovery_view`] before serving.
    ///
    /// Only after a daemon crash while logging: the page cache kept every record and
    /// image write, so replaying makes them agree. With a resync pending, newer writes
    /// went to the images only and replaying older records would undo them; after a
    /// host crash the log may be older than the image, which is resynchronised whole.
    pub fn needs_replay(&self) -> bool {
        self.previous == PreviousShutdown::DaemonCrash && !self.resync_pending && self.records > 0
    }
}

impl Group {
    /// The ring size recorded in the ring file at `path`, if it holds a valid ring:
    /// [`Group::open`] refuses a configuration of another size, so a caller whose
    /// setting may have changed since the ring was made opens it at this one.
    pub fn existing_ring_size(path: &Path) -> Option<u64> {
        existing_superblock(path).map(|superblock| superblock.ring_size)
    }

    /// The names of the disks the ring file at `path` tracks, if it holds a valid
    /// ring: a configuration's disks after these are added when the ring is opened.
    pub fn existing_disk_names(path: &Path) -> Option<Vec<String>> {
        existing_superblock(path)
            .map(|superblock| superblock.disks.into_iter().map(|d| d.name).collect())
    }

    /// Opens (or creates) the group's ring, recovering after a crash.
    ///
    /// After a crash, call [`Group::recovery_view`] and apply it to the images before
    /// serving, when [`OpenReport::needs_replay`] says so.
    pub fn open(config: &TrackerConfig) -> Result<(Self, OpenReport), TrackerError> {
        validate(config)?;
        let block_shift = config.block_size.trailing_zeros();
        let disks: Vec<DiskRecord> = config
            .disks
            .iter()
            .map(|d| DiskRecord {
                name: d.name.clone(),
                size: d.size,
            })
            .collect();
        let path = &config.ring_path;
        let file_len = DATA_START + config.ring_size;
        let (file, created) = open_ring_file(config, file_len)?;
        let boot_id = current_boot_id();
        let map = MmapOptions::new()
            .len(usize_of(file_len))
            .map_raw_read_only(&*file)
            .map_err(io_error("map ring", path))?;
        // No readahead on faults: it fills the page cache with large folios, and every
        // `pwrite` into a large folio walks all of its blocks (2 MiB folios halved the
        // rate of 4 KiB writes; benches/RESULTS.md, session 14). Readers of long
        // stretches read ahead explicitly (`Shared::read_ahead`), in single pages.
        if let Err(error) = map.advise(memmap2::Advice::Random) {
            warn!(path = %path.display(), %error, "Could not advise random access on the ring mapping");
        }
        // SAFETY: the mapping is at least DATA_START bytes long (file_len, which
        // `open_ring_file` checked) and nothing writes it before the group is constructed.
        let superblocks = unsafe { std::slice::from_raw_parts(map.as_ptr(), usize_of(DATA_START)) };
        // A crash between preallocating and the first superblock write leaves a ring of
        // zeroes: it never held a record, so it is started afresh.
        let created = created || superblocks.iter().all(|byte| *byte == 0);
        let superblock = if created {
            new_superblock(config, block_shift, disks.clone(), boot_id)
        } else {
            // SAFETY: the mapping is at least DATA_START bytes long (file_len, which
            // `open_ring_file` checked) and nothing writes it before the group is
            // constructed.
            let (first, second) = unsafe {
                (
                    std::slice::from_raw_parts(map.as_ptr(), SUPERBLOCK_LEN),
                    std::slice::from_raw_parts(map.as_ptr().add(SUPERBLOCK_LEN), SUPERBLOCK_LEN),
                )
            };
            read_superblock(first, second, config, &disks, block_shift)?
        };
        let added_disks = disks.len() - superblock.disks.len();
        let previous = previous_shutdown(created, &superblock, boot_id);
        let state = State::opened(superblock, previous, config.disks.len());
        let shared = Shared::new(config, block_shift, file, map, state)?;
        let mut report = shared.recover(previous, boot_id)?;
        if added_disks > 0 {
            shared.add_disks(disks)?;
            report.added_disks = added_disks;
        }
        info!(
            group = %config.name,
            ring = %path.display(),
            previous = ?previous,
            records = report.records,
            uncommitted = report.uncommitted,
            "Opened log ring"
        );
        Ok((Self { shared }, report))
    }

    /// Everything the ring holds, coalesced, for replaying onto the images after a
    /// crash. Call before serving; it cannot be acknowledged.
    pub fn recovery_view(&self) -> Result<ClosedCycle, TrackerError> {
        let (head, head_seq, tail, cycle, next_seq) = {
            let mut state = lock(&self.shared.state);
            if state.consumer_busy {
                return Err(TrackerError::ConsumerBusy);
            }
            state.consumer_busy = true;
            (
                state.head,
                state.head_seq,
                state.tail,
                state.open_cycle,
                state.next_seq,
            )
        };
        Ok(self
            .shared
            .view(head, head_seq, tail, next_seq, cycle, true))
    }

    /// Makes the ring and `image_fds` durable together (disks sync through
    /// [`DiskTracker::sync`](super::DiskTracker::sync), which tells the activity log).
    fn sync(&self, image_fds: &[RawFd]) -> Result<(), TrackerError> {
        let mut fds = Vec::with_capacity(image_fds.len() + 1);
        fds.push(self.shared.sync_file.as_raw_fd());
        fds.extend_from_slice(image_fds);
        self.shared
            .durability
            .datasync(&fds)
            .map_err(|source| TrackerError::Io {
                what: "sync ring and images",
                path: self.shared.ring_path.clone(),
                source,
            })
    }

    /// Marks the ring cleanly shut down. Call after the images were synced and no
    /// writer is left; the group keeps working if more writes come.
    pub fn shutdown_clean(&self, image_fds: &[RawFd]) -> Result<(), TrackerError> {
        self.sync(image_fds)?;
        let mut state = lock(&self.shared.state);
        if state.mode == TrackingMode::DirtyMap {
            self.shared.save_resync_bits()?;
        }
        state.superblock.clean = true;
        self.shared.write_superblock(&mut state, true)
    }
}

fn validate(config: &TrackerConfig) -> Result<(), TrackerError> {
    if config.ring_size < MIN_RING_SIZE || config.ring_size % 4096 != 0 {
        return Err(TrackerError::Config(format!(
            "ring size must be a multiple of 4 KiB and at least {} MiB",
            MIN_RING_SIZE >> 20
        )));
    }
    if !config.block_size.is_power_of_two()
        || config.block_size < 512
        || config.block_size > (1 << 30)
    {
        return Err(TrackerError::Config(
            "block size must be a power of two from 512 bytes to 1 GiB".into(),
        ));
    }
    if config.disks.is_empty() || config.disks.len() > MAX_DISKS {
        return Err(TrackerError::Config(format!(
            "a group has 1 to {MAX_DISKS} disks"
        )));
    }
    if let Some(disk) = config
        .disks
        .iter()
        .find(|d| d.name.is_empty() || d.name.len() > MAX_DISK_NAME)
    {
        return Err(TrackerError::Config(format!(
            "disk name {:?} must be 1 to {MAX_DISK_NAME} bytes",
            disk.name
        )));
    }
    Ok(())
}

/// The error of `what` failing on the ring file at `path`.
fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrackerError {
    let path = path.to_path_buf();
    move |source: std::io::Error| TrackerError::Io { what, path, source }
}

/// Opens and locks the ring file, `file_len` bytes long: preallocates it if it is new
/// (then returns `true`), or checks its length if it is not.
fn open_ring_file(
    config: &TrackerConfig,
    file_len: u64,
) -> Result<(Flock<File>, bool), TrackerError> {
    let path = &config.ring_path;
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| TrackerError::Io {
            what: "open ring",
            path: path.clone(),
            source,
        })?;
    let file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| TrackerError::RingInUse(path.clone()))?;
    let actual_len = file.metadata().map_err(io_error("stat ring", path))?.len();
    let created = !existed || actual_len == 0;
    if created {
        nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            i64::try_from(file_len)
                .map_err(|_| TrackerError::Config("ring size too large".into()))?,
        )
        .map_err(|errno| io_error("preallocate ring", path)(errno.into()))?;
        write_zeroes(path, &file, file_len)?;
    } else if actual_len != file_len {
        return Err(TrackerError::RingMismatch {
            path: path.clone(),
            detail: format!(
                "it holds {} bytes of records but the configuration asks for {}",
                actual_len.saturating_sub(DATA_START),
                config.ring_size
            ),
        });
    }
    Ok((file, created))
}

/// Writes zeroes over a new ring file, so that its blocks are written rather than
/// just allocated. `fallocate` leaves unwritten extents, and the first write to each
/// makes the next `fdatasync` commit the file system's journal: every FLUSH and FUA
/// during the ring's first lap paid for an extent conversion (benches/RESULTS.md,
/// session 16). Through the page cache, and left there: a record that ends inside a
/// page the cache does not hold makes its `pwrite` read that page from the disk first
/// (zeroes written with O_DIRECT made 4 KiB writes 5 times slower), which is also how a
/// ring stands after its first lap. One to a few seconds per GiB (2 GiB took 4.6 s on
/// the test machine), once, when the ring is made.
fn write_zeroes(path: &Path, file: &File, len: u64) -> Result<(), TrackerError> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 8 << 20;
    let started = std::time::Instant::now();
    let zeroes = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let chunk = &zeroes[..usize_of((len - offset).min(CHUNK as u64))];
        file.write_all_at(chunk, offset)
            .map_err(io_error("write zeroes over ring", path))?;
        offset += chunk.len() as u64;
    }
    file.sync_data().map_err(io_error("sync ring", path))?;
    info!(path = %path.display(), mib = len >> 20, ms = started.elapsed().as_millis(), "New ring written with zeroes");
    Ok(())
}

/// The superblock of a ring created now.
fn new_superblock(
    config: &TrackerConfig,
    block_shift: u32,
    disks: Vec<DiskRecord>,
    boot_id: [u8; 16],
) -> Superblock {
    Superblock {
        generation: 0,
        clean: false,
        ring_size: config.ring_size,
        head_pos: 0,
        head_seq: 1,
        acked_cycle: 0,
        resync: None,
        copy_position: None,
        boot_id,
        block_shift,
        disks,
        activity: ActivityRecord::default(),
    }
}

/// Decodes the ring's superblock pair and checks that it tracks the configured disks
/// at the configured block and ring sizes.
fn read_superblock(
    first: &[u8],
    second: &[u8],
    config: &TrackerConfig,
    disks: &[DiskRecord],
    block_shift: u32,
) -> Result<Superblock, TrackerError> {
    let path = &config.ring_path;
    let superblock = Superblock::decode_pair(first, second).map_err(|error| match error {
        SuperblockError::NotARing => TrackerError::RingMismatch {
            path: path.clone(),
            detail: "it is not a blkrep ring".into(),
        },
        other => TrackerError::Superblock(other),
    })?;
    // Disks may be added after the ones the ring tracks, never changed or removed:
    // records name disks by index.
    let extends = disks.len() >= superblock.disks.len()
        && disks[..superblock.disks.len()] == superblock.disks[..];
    if !extends || superblock.block_shift != block_shift || superblock.ring_size != config.ring_size
    {
        return Err(TrackerError::RingMismatch {
            path: path.clone(),
            detail: format!(
                "it tracks disks {:?} at {} byte blocks, the configuration has {:?} at {}{}",
                superblock
                    .disks
                    .iter()
                    .map(|d| format!("{} ({} bytes)", d.name, d.size))
                    .collect::<Vec<_>>(),
                1u64 << superblock.block_shift.min(63),
                disks
                    .iter()
                    .map(|d| format!("{} ({} bytes)", d.name, d.size))
                    .collect::<Vec<_>>(),
                config.block_size,
                if extends {
                    ""
                } else {
                    " (disks can only be added after the ones the ring tracks)"
                }
            ),
        });
    }
    Ok(superblock)
}

/// The superblock of the ring file at `path`, if it holds a valid ring.
fn existing_superblock(path: &Path) -> Option<Superblock> {
    use std::os::unix::fs::FileExt;
    let mut superblocks = [0u8; 2 * SUPERBLOCK_LEN];
    File::open(path)
        .ok()?
        .read_exact_at(&mut superblocks, 0)
        .ok()?;
    let (first, second) = superblocks.split_at(SUPERBLOCK_LEN);
    Superblock::decode_pair(first, second).ok()
}

/// How the previous run ended: from whether the ring was created now, its clean flag,
/// and whether it was last used on this boot.
fn previous_shutdown(
    created: bool,
    superblock: &Superblock,
    boot_id: [u8; 16],
) -> PreviousShutdown {
    if created {
        PreviousShutdown::Created
    } else if superblock.clean {
        PreviousShutdown::Clean
    } else if superblock.boot_id == boot_id {
        PreviousShutdown::DaemonCrash
    } else {
        PreviousShutdown::HostCrash
    }
}

impl State {
    /// The state of a group just opened, from its superblock: the ring empty at the
    /// head until [`Shared::recover`] finds its tail.
    fn opened(superblock: Superblock, previous: PreviousShutdown, disks: usize) -> Self {
        // After a clean stop everything was synced; after a crash the extents listed
        // stay listed until their disks are synced again.
        let inherited = match previous {
            PreviousShutdown::Created | PreviousShutdown::Clean => ActivityRecord {
                valid: true,
                extent_shift: activity::EXTENT_SHIFT,
                whole_disks: 0,
                extents: Vec::new(),
            },
            PreviousShutdown::DaemonCrash | PreviousShutdown::HostCrash => {
                superblock.activity.clone()
            }
        };
        State {
            activity: ActivityLog::new(disks, &inherited),
            head: superblock.head_pos,
            head_seq: superblock.head_seq,
            tail: superblock.head_pos,
            next_seq: superblock.head_seq,
            open_cycle: superblock.acked_cycle + 1,
            acked_cycle: superblock.acked_cycle,
            closed: VecDeque::new(),
            inflight: VecDeque::new(),
            ranges: vec![Vec::new(); disks],
            waiters: 0,
            unlogged: 0,
            mode: TrackingMode::Logging,
            resync: superblock.resync,
            superblock,
            consumer_busy: false,
            records_logged: 0,
            broken: false,
            resumable_copy: None,
            writes_refused: false,
            on_ring_full: OnRingFull::Bitmap,
            throttle: ThrottleStats::default(),
        }
    }
}

impl Shared {
    /// The shared state of a group opened with `config`: its locked ring `file`, the
    /// ring's `map`, the `state` read from it, and empty dirty maps at `block_shift`.
    fn new(
        config: &TrackerConfig,
        block_shift: u32,
        file: Flock<File>,
        map: MmapRaw,
        state: State,
    ) -> Result<Arc<Self>, TrackerError> {
        let path = &config.ring_path;
        let disks: Vec<DiskState> = config
            .disks
            .iter()
            .map(|d| DiskState {
                name: d.name.clone(),
                size: d.size,
                open_bits: AtomicBitmap::new(d.size, block_shift),
                resync_bits: AtomicBitmap::new(d.size, block_shift),
                image: OnceLock::new(),
            })
            .collect();
        Ok(Arc::new(Shared {
            name: config.name.clone(),
            ring_path: path.clone(),
            file,
            map,
            ring_size: config.ring_size,
            state: Mutex::new(state),
            changed: Condvar::new(),
            throttling: AtomicBool::new(false),
            disks,
            durability: Durability::new().map_err(io_error("set up io_uring", path))?,
            group_commit: GroupCommit::default(),
            #[cfg(test)]
            page_fills: std::sync::atomic::AtomicU64::new(0),
            sync_file: File::open(path).map_err(io_error("open ring", path))?,
            dsync_file: OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .open(path)
                .map_err(io_error("open ring", path))?,
        }))
    }

    /// Recovers after opening: finds the ring's tail and closed cycles, rebuilds the
    /// open cycle's dirty map and the resync state, and marks the ring in use (not
    /// clean, on this boot).
    fn recover(
        &self,
        previous: PreviousShutdown,
        boot_id: [u8; 16],
    ) -> Result<OpenReport, TrackerError> {
        let mut report = OpenReport {
            previous,
            records: 0,
            uncommitted: 0,
            ring_used: 0,
            resync_pending: false,
            added_disks: 0,
        };
        let mut state = lock(&self.state);
        let scan = self.scan(state.head, state.head_seq);
        state.tail = scan.tail;
        state.next_seq = scan.next_seq;
        state.closed = scan.closed;
        let last_cycle = scan
            .max_cycle
            .max(state.closed.back().map_or(0, |mark| mark.cycle + 1));
        state.open_cycle = state.open_cycle.max(last_cycle);
        report.records = scan.committed;
        report.uncommitted = scan.uncommitted_at.len() as u64;
        // Live readers (the shipper after a replay) take a nonzero commit CRC as
        // committed without checking the payload; make that true again.
        for pos in &scan.uncommitted_at {
            self.withdraw_at(*pos).map_err(|source| TrackerError::Io {
                what: "withdraw an uncommitted record",
                path: self.ring_path.clone(),
                source,
            })?;
        }
        report.ring_used = state.tail - state.head;
        // The open cycle's dirty map is what its logged records cover.
        let open_cycle = state.open_cycle;
        self.for_each_record(state.head, state.tail, |header| {
            if header.cycle >= open_cycle {
                if let Some(disk) = self.disks.get(usize::from(header.disk)) {
                    disk.open_bits.set_range(header.offset, header.length);
                }
            }
        });
        self.restore_resync(&mut state, previous)?;
        report.resync_pending = state.resync.is_some() && state.resumable_copy.is_none();
        if previous == PreviousShutdown::HostCrash {
            // Writeback may have lost a header while later records reached the
            // disk; the scan stopped there. Numbering new records far past anything
            // the ring can hold keeps those stale records from ever matching.
            state.next_seq += self.ring_size / HEADER_LEN as u64 + 1;
        }
        state.superblock.clean = false;
        state.superblock.boot_id = boot_id;
        self.write_superblock(&mut state, true)?;
        Ok(report)
    }

    /// Takes the disks the configuration added after the ring's into the group:
    /// records them in the superblock and marks them whole for a resync, their
    /// initial copy. A resync copy a crash interrupted takes them along as it resumes;
    /// otherwise the group tracks by dirty map until its consumer begins the resync.
    fn add_disks(&self, disks: Vec<DiskRecord>) -> Result<(), TrackerError> {
        let mut state = lock(&self.state);
        let first_added = state.superblock.disks.len();
        for disk in &self.disks[first_added..] {
            disk.resync_bits.set_all();
        }
        let names: Vec<&str> = disks[first_added..]
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        info!(group = %self.name, added = ?names, "Disks added to the group; they are copied whole by a resync");
        state.superblock.disks = disks;
        if state.resumable_copy.is_none() {
            state.mode = TrackingMode::DirtyMap;
            state.resync.get_or_insert(ResyncReason::DiskAdded);
        }
        self.write_superblock(&mut state, true)
    }

    /// Puts the resync state back after opening: the saved dirty map after a clean
    /// shutdown in dirty-map mode, every block when that map or the log can't be trusted.
    fn restore_resync(
        &self,
        state: &mut State,
        previous: PreviousShutdown,
    ) -> Result<(), TrackerError> {
        let path = self.dirty_map_path();
        let copy_position = state.superblock.copy_position.take();
        if let (Some(reason), Some((disk, offset)), PreviousShutdown::DaemonCrash) =
            (state.resync, copy_position, previous)
        {
            // The daemon died mid-copy with logging on: the page cache kept the log of
            // every write since the copy began, so only the blocks from the copy's
            // position on need copying; the log ships as usual afterwards.
            let disk = usize_of(u64::from(disk));
            info!(group = %self.name, %reason, disk, offset, "The daemon stopped mid-copy; the resync copy resumes where it stood");
            for (index, state_disk) in self.disks.iter().enumerate() {
                match index.cmp(&disk) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => state_disk
                        .resync_bits
                        .set_range(offset, state_disk.size.saturating_sub(offset)),
                    std::cmp::Ordering::Greater => state_disk.resync_bits.set_all(),
                }
            }
            state.superblock.copy_position = Some((u32::try_from(disk).unwrap_or(0), offset));
            state.resumable_copy = Some((disk, offset));
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        if let Some(reason) = state.resync {
            state.mode = TrackingMode::DirtyMap;
            let restored = previous == PreviousShutdown::Clean
                && self.load_resync_bits(&path, state.superblock.disks.len());
            if !restored {
                warn!(group = %self.name, %reason, "Resync required; its dirty map was not saved, so every block is marked");
                for disk in &self.disks {
                    disk.resync_bits.set_all();
                }
            }
        } else if previous == PreviousShutdown::HostCrash {
            state.mode = TrackingMode::DirtyMap;
            state.resync = Some(ResyncReason::UncleanHostShutdown);
            // Writes that may be missing from the log lie in the activity log's
            // extents; what the log kept is marked below.
            let mut active = 0u64;
            let mut whole = false;
            for (index, disk) in self.disks.iter().enumerate() {
                match activity::crash_ranges(&state.superblock.activity, index, disk.size) {
                    Some(ranges) => {
                        for (start, len) in ranges {
                            disk.resync_bits.set_range(start, len);
                            active += len;
                        }
                    }
                    None => {
                        disk.resync_bits.set_all();
                        whole = true;
                    }
                }
            }
            if whole {
                warn!(
                    group = %self.name,
                    active_mib = active >> 20,
                    "The host shut down uncleanly with writes the activity log could not list: whole disks are marked for resync"
                );
            } else {
                warn!(
                    group = %self.name,
                    active_mib = active >> 20,
                    "The host shut down uncleanly: writes since the last flush may be missing from the log; the resync covers the recently written extents and the unshipped log"
                );
            }
        }
        if state.mode == TrackingMode::DirtyMap {
            // Resync maps cover the log; drop the log so cycles restart after the resync.
            self.mark_ring_for_resync(state.head, state.tail);
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}
