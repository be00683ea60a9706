//! A replica's on-disk state: its disks, the transfer being received, the transfers
//! waiting to be applied, and what has been applied.
//!
//! Layout under the replica's directory (`<storage>/<name>/`):
//! - `replica.json`: [`ReplicaState`], replaced atomically (write, fsync, rename, fsync
//!   the directory) after every step, so a crash leaves the old or the new state.
//! - `disks/<disk>.img`: the replica disks, sparse files of the protected disks' sizes.
//! - `incoming/<id>.part`: chunk frames of the transfer being received, back to back.
//!   Each chunk is verified (checksum, records, ranges) before it is written; it is
//!   not synced on its own. On restart the file is cut after its last valid chunk, so
//!   a crash loses at most chunks the primary still holds (it frees nothing before
//!   the commit) and the next offer's answer tells it where to resume.
//! - `received/<id>.xfer`: a committed transfer waiting to be applied. Commit syncs
//!   the `.part`, renames it and records it in the state in the same step; only then
//!   is the transfer acknowledged as durable.
//!
//! Applying takes the oldest received transfer, writes its changes to the disks,
//! fsyncs them, records the transfer as applied and deletes the file. A crash in
//! between re-applies the whole transfer on restart, which gives the same disks:
//! changes say what a range holds, not how to get there. So the disks only ever show
//! a half-applied transfer while it is being applied, and `consistent` stays false
//! until a delta is completely applied.
//!
//! Chain of cycles: after a resync's last batch the next delta may have any cycle
//! number; after that each delta must be the next cycle. A delta at or before the last
//! received one is a retry of a committed transfer and is answered as committed. Any
//! other gap breaks the chain: refused until a resync.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracker::ChangeData;
use wire::api::{
    DiskInfo, Position, RecoveryPointInfo, RecoveryPolicy, ReplicaInfo, Role, TestFailoverInfo,
    TransferAnswer, TransferKind, TransferOffer, FIRST_EPOCH, MAX_EPOCH,
};
use wire::chunk::{CheckedFrame, ChunkError, ChunkHeader, CHUNK_HEADER_LEN};
use wire::media::{transfer_file, Manifest};

use crate::apply::{apply_change, ApplyError, ReplicaDisk};
use crate::history::{History, HistoryError};

/// Transfer ids remembered after commit, to answer retries.
const RECENT_COMMITS: usize = 64;
/// The relationship of a seeded replica no primary has claimed (primaries never
/// choose 0).
const UNCLAIMED: u64 = 0;

/// Errors of a replica store operation.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("Cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The state file is not valid.
    #[error("Replica state {path} is corrupt: {reason}")]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A received chunk is invalid.
    #[error("Invalid chunk")]
    Chunk(#[from] ChunkError),
    /// A change does not fit the replica's disks.
    #[error("Change does not fit the replica")]
    Apply(#[from] ApplyError),
    /// The request does not fit the replica's state.
    #[error("{0}")]
    Conflict(String),
    /// The replica belongs to another relationship.
    #[error("{0}")]
    OtherRelationship(String),
    /// The chain of cycles would break.
    #[error("{0}")]
    ChainBroken(String),
    /// Replication is paused on the replica.
    #[error("Replication to replica {0} is paused")]
    Paused(String),
    /// The replica is busy for a moment (mid-apply); try again.
    #[error("{0}")]
    Busy(String),
    /// The replica was failed over to: its former primary is superseded.
    #[error("{0}")]
    Superseded(String),
    /// The recovery history failed.
    #[error("Recovery history")]
    History(#[from] HistoryError),
    /// The replica was deleted; whoever still holds it must touch nothing at its old
    /// path, where a new replica of the same name may live.
    #[error("Replica {0} was removed")]
    Removed(String),
    /// Not enough free space.
    #[error("Not enough free space for replica {name}: {needed} bytes needed, {free} free")]
    NoSpace {
        /// Replica.
        name: String,
        /// Bytes needed (with the configured reserve).
        needed: u64,
        /// Bytes free.
        free: u64,
    },
}

impl StoreError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { what, path, source }
    }

    /// Whether the error is a full disk.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            StoreError::Apply(ApplyError::Io { source, .. })
            | StoreError::History(HistoryError::Io { source, .. }) => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            _ => false,
        }
    }
}

/// A transfer received and waiting to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Transfer id.
    pub id: u64,
    /// What it carries.
    pub kind: TransferKind,
}

/// Who a request speaks for: a relationship, at a failover epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The relationship id.
    pub relationship: u64,
    /// The failover epoch.
    pub epoch: u64,
}

/// What `replica.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// Replica name (the primary's group name).
    pub name: String,
    /// Trust group of the primaries that may use it.
    pub trust_group: String,
    /// The relationship: set by the primary when it enabled replication; offers for
    /// another relationship are refused.
    pub relationship: u64,
    /// The failover epoch: the primary's when it enabled replication, raised by each
    /// failover; requests of an older epoch are refused.
    #[serde(default = "wire::api::first_epoch")]
    pub epoch: u64,
    /// Host name the primary gave.
    pub primary_host: String,
    /// Identity (certificate name) of the primary that enabled it.
    pub enabled_by: String,
    /// Disks, in group order.
    pub disks: Vec<DiskInfo>,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The disks hold a state the primary had.
    pub consistent: bool,
    /// Newest delta cycle received.
    pub last_received_cycle: Option<u64>,
    /// Newest delta cycle applied.
    pub last_applied_cycle: Option<u64>,
    /// When it was applied.
    pub last_applied_unix: Option<u64>,
    /// The next delta may have any cycle number (a resync just ended, or none began).
    pub accept_any_cycle: bool,
    /// The resync whose batches are being received.
    pub resync_epoch: Option<u64>,
    /// Next batch of that resync.
    pub resync_next_batch: u32,
    /// The transfer being received.
    pub receiving: Option<Queued>,
    /// The record bytes its offer announced: the chunks stored may not decode to
    /// more (the free-space check was made for this much). `None` for a transfer
    /// offered before the bound was kept.
    #[serde(default)]
    pub receiving_bytes: Option<u64>,
    /// Committed transfers, oldest first, not applied yet.
    pub queue: VecDeque<Queued>,
    /// Ids of the latest committed transfers.
    pub recent_commits: VecDeque<u64>,
    /// Paused by an administrator on the replica side.
    pub paused: bool,
    /// Where the data of the latest committed resync batch ends.
    #[serde(default)]
    pub resync_position: Option<Position>,
    /// The initial copy comes by external media: transfers from the network wait
    /// until it is imported.
    #[serde(default)]
    pub awaiting_import: bool,
    /// What applying has cost so far.
    #[serde(default)]
    pub applied: ApplyTotals,
    /// The recovery history to keep.
    #[serde(default)]
    pub recovery: RecoveryPolicy,
    /// Additional recovery points, oldest first (their undo data is under `history/`).
    #[serde(default)]
    pub points: Vec<RecoveryPoint>,
    /// The latest point: the newest delta applied.
    #[serde(default)]
    pub latest: Option<PointStamp>,
    /// Id of the next point taken.
    #[serde(default)]
    pub next_point: u64,
    /// The test failover in progress.
    #[serde(default)]
    pub test: Option<TestFailover>,
    /// When the last test failover started (seconds since the epoch).
    #[serde(default)]
    pub last_test_unix: Option<u64>,
    /// Set once the replica was failed over to: it no longer takes cycles from its
    /// former primary, and its disks are the group's live disks.
    #[serde(default)]
    pub failover: Option<Failover>,
}

/// A failover to this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// When it happened (seconds since the epoch).
    pub at_unix: u64,
    /// The state the disks were brought to.
    pub stamp: PointStamp,
    /// Started by the primary after it shipped everything (no data lost), rather than
    /// on the replica with the primary unreachable.
    pub planned: bool,
    /// The administrator completed it: the other recovery points are gone and the
    /// point can no longer be changed.
    pub completed: bool,
}

/// A test failover in progress: a point served as writable exports whose writes go to
/// throwaway overlays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailover {
    /// The point served (a temporary one for the latest).
    pub point: u64,
    /// Its state.
    pub stamp: PointStamp,
    /// When the test started (seconds since the epoch).
    pub started_unix: u64,
}

/// What a delta says of the state it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointStamp {
    /// The delta's cycle.
    pub cycle: u64,
    /// When the primary closed it (milliseconds since the epoch).
    pub closed_unix_ms: u64,
    /// Taken while the guest's filesystems were frozen.
    pub app_consistent: bool,
}

/// An additional recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    /// Id, unique within the replica.
    pub id: u64,
    /// The state it keeps.
    pub stamp: PointStamp,
    /// Taken for a test failover of the latest point, removed when the test stops;
    /// not counted against the policy.
    #[serde(default)]
    pub temporary: bool,
}

/// Running totals of applied transfers, for the apply rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyTotals {
    /// Transfers applied.
    pub transfers: u64,
    /// Data bytes written by them.
    pub bytes: u64,
    /// Time they took, in microseconds.
    pub micros: u64,
    /// Time the latest took, in microseconds.
    pub last_micros: u64,
}

impl ReplicaState {
    /// The state of a new replica: nothing received yet, not consistent.
    pub fn new(
        name: String,
        trust_group: String,
        claim: Claim,
        primary_host: String,
        enabled_by: String,
        disks: Vec<DiskInfo>,
    ) -> Self {
        ReplicaState {
            name,
            trust_group,
            relationship: claim.relationship,
            epoch: claim.epoch,
            primary_host,
            enabled_by,
            disks,
            created_unix: now_unix(),
            consistent: false,
            last_received_cycle: None,
            last_applied_cycle: None,
            last_applied_unix: None,
            accept_any_cycle: false,
            resync_epoch: None,
            resync_next_batch: 0,
            receiving: None,
            receiving_bytes: None,
            queue: VecDeque::new(),
            recent_commits: VecDeque::new(),
            paused: false,
            resync_position: None,
            awaiting_import: false,
            applied: ApplyTotals::default(),
            recovery: RecoveryPolicy::default(),
            points: Vec::new(),
            latest: None,
            next_point: 1,
            test: None,
            last_test_unix: None,
            failover: None,
        }
    }
}

impl ReplicaState {
    /// The state of an existing copy no relationship has claimed yet, at `epoch`;
    /// `origin` says where it came from.
    pub fn unclaimed(
        name: String,
        trust_group: String,
        epoch: u64,
        origin: &str,
        disks: Vec<DiskInfo>,
    ) -> Self {
        Self::new(
            name,
            trust_group,
            Claim {
                relationship: UNCLAIMED,
                epoch,
            },
            String::new(),
            origin.to_string(),
            disks,
        )
    }
}

/// The answer to an offer of a transfer committed before.
const ALREADY_COMMITTED: TransferAnswer = TransferAnswer {
    have_chunks: 0,
    committed: true,
    resume_from: None,
};

/// One replica on disk. Not thread-safe by itself: the server keeps each behind a
/// mutex.
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    state: ReplicaState,
    /// Chunks stored in the `.part` file of `state.receiving`, its length, and the
    /// record bytes those chunks decode to.
    part_chunks: u32,
    part_len: u64,
    part_raw: u64,
    /// Where the last record stored in the `.part` file ends.
    part_end: Option<Position>,
    /// Free space kept in reserve, in bytes.
    reserve: u64,
    /// Undo data of the additional recovery points.
    history: Arc<History>,
    /// The disks opened for applying, kept from one transfer to the next; each use
    /// checks they are still the files at their paths.
    apply_disks: Option<Arc<[ReplicaDisk]>>,
    /// Set by [`Replica::remove`]: every later operation is refused.
    removed: bool,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync directory", dir))
}

/// Where a record ends, as a [`Position`].
fn record_end(disk: usize, offset: u64, length: u64) -> Option<Position> {
    Some(Position {
        disk: u32::try_from(disk).ok()?,
        offset: offset.checked_add(length)?,
    })
}

/// Opens the undo data of `state`'s points; points whose data is lost are dropped
/// from `state` (returns whether any was).
fn open_history(dir: &Path, state: &mut ReplicaState) -> Result<(Arc<History>, bool), StoreError> {
    let sizes = state.disks.iter().map(|d| d.size).collect();
    let ids: Vec<u64> = state.points.iter().map(|p| p.id).collect();
    let (history, lost) = History::open(&dir.join("history"), sizes, &ids)?;
    let before = state.points.len();
    state.points.retain(|p| !lost.contains(&p.id));
    Ok((Arc::new(history), state.points.len() != before))
}

/// The epoch after `epoch`, as a failover raises it.
fn next_epoch(epoch: u64) -> Result<u64, StoreError> {
    epoch
        .checked_add(1)
        .filter(|next| *next <= MAX_EPOCH)
        .ok_or_else(|| StoreError::Conflict(format!("The failover epoch {epoch} is the last one")))
}

/// Free bytes on the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<u64, StoreError> {
    let stat = nix::sys::statvfs::statvfs(path)
        .map_err(|e| StoreError::io("check free space of", path)(e.into()))?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

impl Replica {
    /// Whether a replica directory exists at `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join("replica.json").exists()
    }

    /// Creates a replica in the new directory `dir`, which must not exist (only its
    /// parent): the disks as sparse files and the state. Whatever exists at `dir` is
    /// someone else's and is refused, never reused; if creating fails, only what this
    /// call created is removed.
    pub fn create(dir: &Path, state: ReplicaState, reserve: u64) -> Result<Self, StoreError> {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Conflict(format!(
                    "{} exists already and is not a replica; a new replica needs a new directory",
                    dir.display()
                )));
            }
            Err(error) => return Err(StoreError::io("create", dir)(error)),
        }
        Self::fill(dir, state, reserve).inspect_err(|_| {
            let _ = fs::remove_dir_all(dir);
        })
    }

    /// Fills the new directory of [`Replica::create`].
    fn fill(dir: &Path, state: ReplicaState, reserve: u64) -> Result<Self, StoreError> {
        for sub in ["disks", "incoming", "received"] {
            let path = dir.join(sub);
            fs::create_dir(&path).map_err(StoreError::io("create", &path))?;
        }
        for disk in &state.disks {
            let path = dir.join("disks").join(format!("{}.img", disk.name));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(StoreError::io("create replica disk", &path))?;
            file.set_len(disk.size)
                .and_then(|()| file.sync_all())
                .map_err(StoreError::io("size replica disk", &path))?;
        }
        sync_dir(&dir.join("disks"))?;
        let mut state = state;
        let (history, _) = open_history(dir, &mut state)?;
        let mut replica = Replica {
            dir: dir.to_path_buf(),
            state,
            part_chunks: 0,
            part_len: 0,
            part_raw: 0,
            part_end: None,
            reserve,
            history,
            apply_disks: None,
            removed: false,
        };
        replica.save()?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(replica)
    }

    /// Makes existing disk images (a restored backup, an old replica's disks) the
    /// replica `name` of `trust_group` in `dir`, which must not exist: the images are
    /// copied sparsely, or moved when `move_images` (same filesystem). The replica has
    /// no relationship yet: the first primary of the trust group that enables
    /// replication of that name with an existing copy as its initial replication claims
    /// it, and only blocks that differ are sent. Built under a temporary name and
    /// renamed into place, so a crash leaves no half-seeded replica.
    pub fn seed(
        dir: &Path,
        name: &str,
        trust_group: &str,
        images: &[(String, PathBuf)],
        move_images: bool,
    ) -> Result<Self, StoreError> {
        if Self::exists(dir) {
            return Err(StoreError::Conflict(format!(
                "{} already holds a replica",
                dir.display()
            )));
        }
        let mut disks = Vec::new();
        for (disk, image) in images {
            let size = fs::metadata(image)
                .map_err(StoreError::io("read", image))?
                .len();
            disks.push(DiskInfo {
                name: disk.clone(),
                size,
            });
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        let building = parent.join(format!(".seeding-{name}"));
        let _ = fs::remove_dir_all(&building);
        // Its epoch is the claiming primary's.
        let state = ReplicaState::unclaimed(
            name.to_string(),
            trust_group.to_string(),
            FIRST_EPOCH,
            "an existing copy (blkrep replica seed)",
            disks,
        );
        let replica = Self::create(&building, state, 0)?;
        for (disk, image) in images {
            let target = replica.disk_path(disk);
            if move_images {
                fs::rename(image, &target).map_err(StoreError::io("move", image))?;
            } else {
                crate::copy::sparse_copy(image, &target).map_err(StoreError::io("copy", image))?;
            }
        }
        sync_dir(&building.join("disks"))?;
        fs::rename(&building, dir).map_err(StoreError::io("move into place", &building))?;
        sync_dir(parent)?;
        Self::open(dir, 0)
    }

    /// Whether the replica is an existing copy no primary has claimed yet.
    pub fn is_unclaimed(&self) -> bool {
        self.state.relationship == UNCLAIMED
    }

    /// Gives an unclaimed replica (an existing copy) to `claim`'s relationship, at
    /// its epoch; a claim of an older epoch than the copy's is superseded.
    pub fn claim(
        &mut self,
        claim: Claim,
        primary_host: &str,
        identity: &str,
    ) -> Result<(), StoreError> {
        if !self.is_unclaimed() || claim.relationship == UNCLAIMED {
            return Err(StoreError::OtherRelationship(format!(
                "replica {} is not an unclaimed existing copy",
                self.state.name
            )));
        }
        if claim.epoch < self.state.epoch {
            return Err(StoreError::Superseded(format!(
                "the existing copy {} is at epoch {}: a failover since superseded this primary (epoch {}); it must stop writing to its disks",
                self.state.name, self.state.epoch, claim.epoch
            )));
        }
        // A handed-back copy knows its epoch: a claim can be at most one failover
        // ahead of it. A seeded copy is at the first epoch and takes the claimer's.
        let seeded = self.state.epoch == FIRST_EPOCH;
        if claim.epoch > MAX_EPOCH
            || (!seeded
                && self
                    .state
                    .epoch
                    .checked_add(1)
                    .is_none_or(|next| claim.epoch > next))
        {
            return Err(StoreError::OtherRelationship(format!(
                "the existing copy {} is at epoch {}; a primary at epoch {} cannot claim it",
                self.state.name, self.state.epoch, claim.epoch
            )));
        }
        self.state.relationship = claim.relationship;
        self.state.epoch = self.state.epoch.max(claim.epoch);
        self.state.primary_host = primary_host.to_string();
        self.state.enabled_by = identity.to_string();
        self.save()
    }

    /// Fails unless `claim`'s relationship owns the replica at its epoch (a failover
    /// raises the epoch, which supersedes the primary).
    pub fn check_relationship(&self, claim: Claim) -> Result<(), StoreError> {
        self.check_present()?;
        let epoch = self.state.epoch;
        if let Some(failover) = &self.state.failover {
            return Err(StoreError::Superseded(format!(
                "replica {} was failed over to at {} (to cycle {}) and is now the live copy at epoch {epoch}: this primary (epoch {}) is superseded and must stop writing to its disks; to replicate back, reverse replication from the new primary",
                self.state.name,
                failover.at_unix,
                failover.stamp.cycle,
                claim.epoch,
            )));
        }
        if claim.epoch < epoch {
            return Err(StoreError::Superseded(format!(
                "replica {} is at epoch {epoch}: a failover since superseded this primary (epoch {}); it must stop writing to its disks",
                self.state.name, claim.epoch
            )));
        }
        if self.is_unclaimed() {
            return Err(StoreError::OtherRelationship(format!(
                "replica {} is an existing copy no primary has claimed; enable replication with the existing copy as its initial replication",
                self.state.name
            )));
        }
        if claim.relationship != self.state.relationship {
            return Err(StoreError::OtherRelationship(format!(
                "replica {} belongs to another replication relationship (enabled by {} from {}); remove it on the replica first",
                self.state.name, self.state.enabled_by, self.state.primary_host
            )));
        }
        if claim.epoch > epoch {
            return Err(StoreError::OtherRelationship(format!(
                "replica {} is at epoch {epoch}, older than its primary's {}: it is not the copy this relationship left (restored from a backup?); remove it on the replica and enable replication again",
                self.state.name, claim.epoch
            )));
        }
        Ok(())
    }

    /// Opens the replica in `dir` and recovers a transfer interrupted mid-chunk.
    pub fn open(dir: &Path, reserve: u64) -> Result<Self, StoreError> {
        let path = dir.join("replica.json");
        let bytes = fs::read(&path).map_err(StoreError::io("read", &path))?;
        let mut state: ReplicaState =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptState {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let (history, lost_points) = open_history(dir, &mut state)?;
        let mut replica = Replica {
            dir: dir.to_path_buf(),
            state,
            part_chunks: 0,
            part_len: 0,
            part_raw: 0,
            part_end: None,
            reserve,
            history,
            apply_disks: None,
            removed: false,
        };
        if lost_points {
            replica.save()?;
        }
        replica.recover_part()?;
        replica.remove_strays()?;
        Ok(replica)
    }

    /// The state.
    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    /// The replica's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of disk `name`.
    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.dir.join("disks").join(format!("{name}.img"))
    }

    /// The summary the API returns.
    pub fn info(&self) -> ReplicaInfo {
        let s = &self.state;
        ReplicaInfo {
            name: s.name.clone(),
            trust_group: s.trust_group.clone(),
            disks: s.disks.clone(),
            consistent: s.consistent,
            last_received_cycle: s.last_received_cycle,
            last_applied_cycle: s.last_applied_cycle,
            last_applied_unix: s.last_applied_unix,
            pending_transfers: u32::try_from(s.queue.len()).unwrap_or(u32::MAX),
            resync_epoch: s.resync_epoch,
            paused: s.paused,
            awaiting_import: s.awaiting_import,
            applied_transfers: s.applied.transfers,
            applied_bytes: s.applied.bytes,
            apply_micros: s.applied.micros,
            last_apply_micros: (s.applied.transfers > 0).then_some(s.applied.last_micros),
            recovery: s.recovery,
            recovery_points: self.recovery_points(),
            test_failover: s.test.as_ref().map(|test| TestFailoverInfo {
                cycle: test.stamp.cycle,
                time_unix_ms: test.stamp.closed_unix_ms,
                app_consistent: test.stamp.app_consistent,
                started_unix: test.started_unix,
                exports: s
                    .disks
                    .iter()
                    .map(|disk| crate::failover_drill::test_export(&s.name, &disk.name))
                    .collect(),
            }),
            last_test_unix: s.last_test_unix,
            role: if s.failover.is_some() {
                Role::Primary
            } else {
                Role::Replica
            },
            epoch: s.epoch,
            unclaimed: self.is_unclaimed(),
            failover: s.failover.map(|f| wire::api::FailoverInfo {
                at_unix: f.at_unix,
                cycle: f.stamp.cycle,
                time_unix_ms: f.stamp.closed_unix_ms,
                app_consistent: f.stamp.app_consistent,
                planned: f.planned,
                completed: f.completed,
            }),
        }
    }

    fn part_path(&self, id: u64) -> PathBuf {
        self.dir.join("incoming").join(format!("{id:016x}.part"))
    }

    fn received_path(&self, id: u64) -> PathBuf {
        self.dir.join("received").join(format!("{id:016x}.xfer"))
    }

    /// Fails once the replica was removed.
    fn check_present(&self) -> Result<(), StoreError> {
        if self.removed {
            return Err(StoreError::Removed(self.state.name.clone()));
        }
        Ok(())
    }

    /// Deletes the replica: its directory and everything in it. Whoever still holds
    /// this object (a request, the applier) is refused from now on, so nothing is
    /// written at the old path, where a new replica of the same name may be created.
    pub fn remove(&mut self) -> Result<(), StoreError> {
        self.check_present()?;
        self.removed = true;
        self.apply_disks = None;
        fs::remove_dir_all(&self.dir).map_err(StoreError::io("remove", &self.dir))?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// The disks to apply the next transfer to: the ones opened before if they are
    /// still the files at the replica's disk paths, else opened anew.
    pub fn disks_for_apply(&mut self) -> Result<Arc<[ReplicaDisk]>, StoreError> {
        self.check_present()?;
        if let Some(disks) = &self.apply_disks {
            if disks.iter().all(ReplicaDisk::is_at_path) {
                return Ok(Arc::clone(disks));
            }
            tracing::warn!(replica = %self.state.name, "A replica disk was replaced since it was opened; opening the files now at its paths");
        }
        let disks: Arc<[ReplicaDisk]> = self.open_disks()?.into();
        self.apply_disks = Some(Arc::clone(&disks));
        Ok(disks)
    }

    /// Closes the disks kept open for applying (after an error: the next apply opens
    /// them again).
    pub fn forget_disks(&mut self) {
        self.apply_disks = None;
    }

    /// Writes the state atomically.
    fn save(&mut self) -> Result<(), StoreError> {
        self.check_present()?;
        let path = self.dir.join("replica.json");
        let tmp = self.dir.join("replica.json.tmp");
        let bytes =
            serde_json::to_vec_pretty(&self.state).map_err(|e| StoreError::CorruptState {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let mut file = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(StoreError::io("replace", &path))?;
        sync_dir(&self.dir)
    }

    /// Cuts the `.part` file after its last valid chunk.
    fn recover_part(&mut self) -> Result<(), StoreError> {
        let Some(receiving) = self.state.receiving else {
            return Ok(());
        };
        let path = self.part_path(receiving.id);
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.part_chunks = 0;
                self.part_len = 0;
                self.part_raw = 0;
                return Ok(());
            }
            Err(e) => return Err(StoreError::io("open", &path)(e)),
        };
        let (mut chunks, mut len, mut raw, mut end) = (0u32, 0u64, 0u64, None);
        let (mut frame, mut scratch) = (Vec::new(), Vec::new());
        while let Ok(true) = read_frame(&mut file, &mut frame) {
            let Ok(checked) = CheckedFrame::check(&frame) else {
                break;
            };
            if checked.header.expect(receiving.id, chunks).is_err() {
                break;
            }
            // Checked when it was stored; a frame that no longer decodes ends the file.
            let Ok(records) = checked.records(&mut scratch) else {
                break;
            };
            let mut frame_end = end;
            let mut whole = true;
            for change in records {
                match change {
                    Ok(change) => frame_end = record_end(change.disk, change.offset, change.length),
                    Err(_) => whole = false,
                }
            }
            if !whole {
                break;
            }
            end = frame_end;
            chunks += 1;
            len += frame.len() as u64;
            raw += u64::from(checked.header.raw_len);
        }
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io("truncate", &path))?;
        self.part_chunks = chunks;
        self.part_len = len;
        self.part_raw = raw;
        self.part_end = end;
        Ok(())
    }

    /// Deletes files no state refers to (a crash between a rename and the state save).
    fn remove_strays(&self) -> Result<(), StoreError> {
        let keep_part = self.state.receiving.map(|r| self.part_path(r.id));
        let keep: Vec<PathBuf> = self
            .state
            .queue
            .iter()
            .map(|q| self.received_path(q.id))
            .collect();
        for (sub, wanted) in [
            ("incoming", keep_part.into_iter().collect::<Vec<_>>()),
            ("received", keep),
        ] {
            let dir = self.dir.join(sub);
            let entries = fs::read_dir(&dir).map_err(StoreError::io("list", &dir))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if !wanted.contains(&path) {
                    tracing::info!(path = %path.display(), "Removing a transfer file no state refers to");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// Checks a new transfer against the chain and the replica's state; for a retry of
    /// the transfer being received, says how many chunks are stored.
    pub fn offer(
        &mut self,
        claim: Claim,
        offer: &TransferOffer,
    ) -> Result<TransferAnswer, StoreError> {
        self.check_relationship(claim)?;
        if self.is_committed(offer.id) {
            return Ok(match offer.kind {
                TransferKind::Resync { .. } => TransferAnswer {
                    resume_from: self.state.resync_position,
                    ..ALREADY_COMMITTED
                },
                TransferKind::Delta { .. } => ALREADY_COMMITTED,
            });
        }
        if self.state.paused {
            return Err(StoreError::Paused(self.state.name.clone()));
        }
        match offer.kind {
            TransferKind::Delta { cycle, .. } => {
                if self.state.resync_epoch.is_some() {
                    return Err(StoreError::ChainBroken(format!(
                        "cycle {cycle} offered while a resync is unfinished"
                    )));
                }
                match self.state.last_received_cycle {
                    Some(last) if cycle <= last && !self.state.accept_any_cycle => {
                        return Ok(ALREADY_COMMITTED);
                    }
                    Some(last) if cycle == last + 1 => {}
                    _ if self.state.accept_any_cycle => {}
                    last => {
                        return Err(StoreError::ChainBroken(format!(
                            "cycle {cycle} does not follow the last received cycle ({})",
                            last.map_or(
                                "none; the initial replication has not finished".into(),
                                |l| l.to_string()
                            )
                        )));
                    }
                }
            }
            TransferKind::Resync { epoch, batch, .. } => {
                let expected = if self.state.resync_epoch == Some(epoch) {
                    self.state.resync_next_batch
                } else {
                    0
                };
                if batch != expected {
                    return Err(StoreError::ChainBroken(format!(
                        "resync {epoch:#x} batch {batch} offered where batch {expected} was expected"
                    )));
                }
            }
        }
        let retry = Queued {
            id: offer.id,
            kind: offer.kind,
        };
        if self
            .state
            .receiving
            .is_some_and(|r| r.id == retry.id && same_transfer(r.kind, retry.kind))
        {
            return Ok(TransferAnswer {
                have_chunks: self.part_chunks,
                committed: false,
                resume_from: self.part_end,
            });
        }
        // The transfer's file, and as much again at worst for the blocks its apply
        // allocates in the replica disks (writes into holes): a committed transfer must
        // be appliable, or the replica would sit half-applied until space is freed.
        self.ensure_free(offer.bytes.saturating_mul(2))?;
        // A new transfer abandons an unfinished one.
        if let Some(old) = self.state.receiving.take() {
            let _ = fs::remove_file(self.part_path(old.id));
        }
        let path = self.part_path(offer.id);
        File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(StoreError::io("create", &path))?;
        self.state.receiving = Some(Queued {
            id: offer.id,
            kind: offer.kind,
        });
        self.state.receiving_bytes = Some(offer.bytes);
        self.part_chunks = 0;
        self.part_len = 0;
        self.part_raw = 0;
        self.part_end = None;
        self.save()?;
        Ok(TransferAnswer {
            have_chunks: 0,
            committed: false,
            resume_from: None,
        })
    }

    /// Fails unless `bytes` more fit on the storage with the reserve left free.
    fn ensure_free(&self, bytes: u64) -> Result<(), StoreError> {
        let needed = bytes.saturating_add(self.reserve);
        let free = free_space(&self.dir)?;
        if free < needed {
            return Err(StoreError::NoSpace {
                name: self.state.name.clone(),
                needed,
                free,
            });
        }
        Ok(())
    }

    /// Whether transfer `id` was committed (and is queued or applied).
    fn is_committed(&self, id: u64) -> bool {
        self.state.recent_commits.contains(&id) || self.state.queue.iter().any(|q| q.id == id)
    }

    /// Stores chunk `index` of transfer `id`, after checking it completely. Not
    /// synced: [`Replica::commit`] makes the transfer durable.
    pub fn put_chunk(
        &mut self,
        claim: Claim,
        id: u64,
        index: u32,
        frame: &[u8],
    ) -> Result<u32, StoreError> {
        self.check_relationship(claim)?;
        let Some(receiving) = self.state.receiving.filter(|r| r.id == id) else {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} was not offered (or was abandoned)"
            )));
        };
        if index < self.part_chunks {
            // An upload the primary gave up on that arrived after all: the chunk is
            // stored already (a retry re-encodes the same bytes).
            return Ok(self.part_chunks);
        }
        if index != self.part_chunks {
            return Err(StoreError::Conflict(format!(
                "chunk {index} of transfer {id:#x} arrived where chunk {} was expected",
                self.part_chunks
            )));
        }
        let checked = CheckedFrame::check(frame)?;
        checked.header.expect(receiving.id, index)?;
        if checked.header.frame_len() != frame.len() {
            return Err(ChunkError::Truncated {
                have: frame.len(),
                need: checked.header.frame_len(),
            }
            .into());
        }
        // The offer's size is what the space check allowed for: a primary may not
        // send more than it announced.
        let raw = self.part_raw + u64::from(checked.header.raw_len);
        if let Some(offered) = self.state.receiving_bytes.filter(|offered| raw > *offered) {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} was offered with {offered} bytes; chunk {index} brings it to {raw}"
            )));
        }
        // Other replicas share the storage: the reserve is checked again for each
        // chunk, not just at the offer.
        self.ensure_free(frame.len() as u64)?;
        let mut scratch = Vec::new();
        let mut end = self.part_end;
        for change in checked.records(&mut scratch)? {
            let change = change?;
            end = record_end(change.disk, change.offset, change.length);
            let fits = self.state.disks.get(change.disk).is_some_and(|d| {
                change
                    .offset
                    .checked_add(change.length)
                    .is_some_and(|end| end <= d.size)
            });
            if !fits {
                return Err(ApplyError::OutOfRange {
                    disk: change.disk,
                    offset: change.offset,
                    length: change.length,
                }
                .into());
            }
        }
        let path = self.part_path(id);
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(StoreError::io("open", &path))?;
        let written = file
            .seek(SeekFrom::Start(self.part_len))
            .and_then(|_| file.write_all(frame));
        if written.is_ok() {
            // The commit's sync then finds the chunks written already.
            crate::writeback::start_writeback(&file, self.part_len, frame.len() as u64);
        }
        if let Err(source) = written {
            // Leave no partial frame behind (a full disk, typically).
            let _ = file.set_len(self.part_len);
            return Err(StoreError::Io {
                what: "store chunk in",
                path,
                source,
            });
        }
        self.part_chunks += 1;
        self.part_len += frame.len() as u64;
        self.part_raw = raw;
        self.part_end = end;
        Ok(self.part_chunks)
    }

    /// Ends transfer `id` of `chunks` chunks: it becomes durable and queued for apply.
    pub fn commit(&mut self, claim: Claim, id: u64, chunks: u32) -> Result<(), StoreError> {
        self.check_relationship(claim)?;
        if self.is_committed(id) {
            return Ok(());
        }
        let Some(receiving) = self.state.receiving.filter(|r| r.id == id) else {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} was not offered"
            )));
        };
        if chunks != self.part_chunks {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} has {} chunks stored, the primary sent {chunks}",
                self.part_chunks
            )));
        }
        let (part, received) = (self.part_path(id), self.received_path(id));
        // The chunks were written as they came; one sync makes them all durable.
        File::open(&part)
            .and_then(|file| file.sync_data())
            .map_err(StoreError::io("sync", &part))?;
        fs::rename(&part, &received).map_err(StoreError::io("move", &part))?;
        sync_dir(&self.dir.join("received"))?;
        sync_dir(&self.dir.join("incoming"))?;
        let state = &mut self.state;
        state.receiving = None;
        state.receiving_bytes = None;
        state.queue.push_back(receiving);
        state.recent_commits.push_back(id);
        while state.recent_commits.len() > RECENT_COMMITS {
            state.recent_commits.pop_front();
        }
        match receiving.kind {
            TransferKind::Delta { cycle, .. } => {
                state.last_received_cycle = Some(cycle);
                state.accept_any_cycle = false;
            }
            TransferKind::Resync { epoch, batch, last } => {
                state.resync_position = self.part_end;
                if batch == 0 {
                    // A resync restarts the chain: the cycles it replaces are void.
                    state.last_received_cycle = None;
                    state.consistent = false;
                }
                state.resync_epoch = (!last).then_some(epoch);
                state.resync_next_batch = batch + 1;
                state.accept_any_cycle = last;
            }
        }
        self.part_chunks = 0;
        self.part_len = 0;
        self.part_raw = 0;
        self.part_end = None;
        self.save()
    }

    /// Applies the oldest received transfer, if any. Returns what it was.
    pub fn apply_next(&mut self, disks: &[ReplicaDisk]) -> Result<Option<Queued>, StoreError> {
        let Some((next, path)) = self.begin_apply()? else {
            return Ok(None);
        };
        let started = Instant::now();
        let applied = apply_transfer(&path, next.id, disks, &self.history)?;
        self.note_apply(applied.written, started.elapsed());
        self.finish_apply(next)?;
        Ok(Some(next))
    }

    /// First step of applying: the oldest received transfer and its file; the replica
    /// is marked inconsistent until [`Replica::finish_apply`]. The file is applied with
    /// [`apply_transfer`] without holding the replica (receiving goes on meanwhile).
    pub fn begin_apply(&mut self) -> Result<Option<(Queued, PathBuf)>, StoreError> {
        self.check_present()?;
        let Some(next) = self.state.queue.front().copied() else {
            return Ok(None);
        };
        if let (TransferKind::Resync { .. }, Some(latest)) = (next.kind, self.state.latest) {
            // The resync's blocks make the disks fuzzy until the delta after it: the
            // last consistent state survives only as a point.
            if self.state.recovery.points > 0 {
                self.take_point(latest, true)?;
            } else {
                tracing::warn!(replica = %self.state.name, cycle = latest.cycle, "A resync overwrites the replica's only consistent state: no failover is possible until it ends (keep recovery points to keep one)");
            }
            self.state.latest = None;
            self.save()?;
        }
        if self.state.consistent {
            // From here until the apply ends the disks are mid-change.
            self.state.consistent = false;
            self.save()?;
        }
        Ok(Some((next, self.received_path(next.id))))
    }

    /// The undo data of the recovery points, shared with the applier and readers.
    pub fn history(&self) -> Arc<History> {
        Arc::clone(&self.history)
    }

    /// Makes the disks' current state (`stamp`) an additional point if the policy
    /// keeps points and one is due (`force`: whenever the policy keeps points). The
    /// caller saves the state, then ages points out.
    fn take_point(&mut self, stamp: PointStamp, force: bool) -> Result<(), StoreError> {
        let policy = self.state.recovery;
        if policy.points == 0 {
            return Ok(());
        }
        let newest = self.state.points.iter().rev().find(|p| !p.temporary);
        if newest.is_some_and(|p| p.stamp.cycle == stamp.cycle) {
            return Ok(());
        }
        let spacing_ms = policy.spacing_secs.saturating_mul(1000);
        let due = force
            || stamp.app_consistent
            || newest.is_none_or(|p| {
                stamp.closed_unix_ms.saturating_sub(p.stamp.closed_unix_ms) >= spacing_ms
            });
        if due {
            self.add_point(stamp, false)?;
        }
        Ok(())
    }

    /// Adds a point of the disks' current state; the caller saves the state.
    fn add_point(&mut self, stamp: PointStamp, temporary: bool) -> Result<u64, StoreError> {
        let id = self.state.next_point.max(1);
        {
            let _guard = self.history.apply_guard();
            self.history.add_point(id)?;
        }
        self.state.next_point = id + 1;
        self.state.points.push(RecoveryPoint {
            id,
            stamp,
            temporary,
        });
        Ok(id)
    }

    /// Removes additional points beyond the policy, oldest first (a point a test
    /// failover serves stays until the test ends).
    fn age_out(&mut self) -> Result<(), StoreError> {
        // A point of the latest state does not count: it is the latest until the
        // next cycle, and the policy names points besides the latest.
        let latest = self.state.latest.map(|l| l.cycle);
        loop {
            let kept = self
                .state
                .points
                .iter()
                .filter(|p| !p.temporary && Some(p.stamp.cycle) != latest)
                .count();
            if kept <= self.state.recovery.points as usize {
                return Ok(());
            }
            let test = self.state.test.as_ref().map(|t| t.point);
            let Some(oldest) = self
                .state
                .points
                .iter()
                .find(|p| !p.temporary && Some(p.id) != test)
                .map(|p| p.id)
            else {
                return Ok(());
            };
            self.remove_point(oldest)?;
        }
    }

    /// Removes point `id`, keeping every other point's state (see
    /// [`History::merge_into_older`]): merged, recorded, then deleted.
    fn remove_point(&mut self, id: u64) -> Result<(), StoreError> {
        let history = Arc::clone(&self.history);
        let _guard = history.apply_guard();
        history.merge_into_older(id)?;
        self.state.points.retain(|p| p.id != id);
        self.save()?;
        self.history.forget(id)?;
        Ok(())
    }

    /// The additional point `id` (as [`Replica::recovery_points`] lists it).
    fn kept_point(&self, id: u64) -> Result<RecoveryPoint, StoreError> {
        let name = &self.state.name;
        self.state
            .points
            .iter()
            .find(|p| p.id == id && !p.temporary)
            .copied()
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "Replica {name} has no recovery point {id}; list them with `blkrep replica points --name {name}`"
                ))
            })
    }

    /// Starts a test failover of point `point` (the latest if `None`; its id in
    /// [`Replica::recovery_points`] otherwise). The latest is kept
    /// as a temporary point until the test ends, so replication goes on underneath.
    /// Fails while the disks are mid-apply ([`StoreError::Busy`]): try again.
    pub fn begin_test(&mut self, point: Option<u64>) -> Result<TestFailover, StoreError> {
        let name = self.state.name.clone();
        if let Some(test) = &self.state.test {
            return Err(StoreError::Conflict(format!(
                "A test failover of {name} (cycle {}) is running; stop it first with `blkrep replica test-failover stop --name {name}`",
                test.stamp.cycle
            )));
        }
        if self.state.failover.is_some() {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was failed over to: its disks are the live copy, not a replica to test"
            )));
        }
        let (point, stamp) = match point.filter(|id| *id != 0) {
            Some(id) => {
                let found = self.kept_point(id)?;
                (found.id, found.stamp)
            }
            None => {
                let Some(latest) = self.state.latest else {
                    return Err(StoreError::Conflict(format!(
                        "Replica {name} holds no consistent state yet (the initial replication or a resync has not finished); pick an earlier point with --point"
                    )));
                };
                if !self.state.consistent {
                    return Err(StoreError::Busy(format!(
                        "Replica {name} is applying a transfer"
                    )));
                }
                (self.add_point(latest, true)?, latest)
            }
        };
        let test = TestFailover {
            point,
            stamp,
            started_unix: now_unix(),
        };
        self.state.test = Some(test.clone());
        self.state.last_test_unix = Some(test.started_unix);
        self.save()?;
        Ok(test)
    }

    /// Ends the test failover, if one runs: its temporary point is merged away.
    pub fn end_test(&mut self) -> Result<Option<TestFailover>, StoreError> {
        let Some(test) = self.state.test.take() else {
            return Ok(None);
        };
        self.save()?;
        if self
            .state
            .points
            .iter()
            .any(|p| p.id == test.point && p.temporary)
        {
            self.remove_point(test.point)?;
        }
        // Points the test kept beyond the policy go now.
        self.age_out()?;
        Ok(Some(test))
    }

    /// Sets the recovery history to keep; points beyond it age out at once.
    pub fn set_recovery(&mut self, policy: RecoveryPolicy) -> Result<(), StoreError> {
        if let Some(problem) = policy.problem() {
            return Err(StoreError::Conflict(problem));
        }
        self.state.recovery = policy;
        self.save()?;
        self.age_out()
    }

    /// The recovery points, oldest first, the latest last.
    pub fn recovery_points(&self) -> Vec<RecoveryPointInfo> {
        let sizes = self.history.sizes();
        let latest = self.state.latest;
        let mut points: Vec<RecoveryPointInfo> = self
            .state
            .points
            .iter()
            .filter(|p| !p.temporary && latest.is_none_or(|l| l.cycle != p.stamp.cycle))
            .map(|p| RecoveryPointInfo {
                id: p.id,
                cycle: p.stamp.cycle,
                time_unix_ms: p.stamp.closed_unix_ms,
                app_consistent: p.stamp.app_consistent,
                latest: false,
                size: sizes
                    .iter()
                    .find(|(id, _)| *id == p.id)
                    .map_or(0, |(_, size)| *size),
            })
            .collect();
        if let Some(latest) = latest {
            points.push(RecoveryPointInfo {
                id: 0,
                cycle: latest.cycle,
                time_unix_ms: latest.closed_unix_ms,
                app_consistent: latest.app_consistent,
                latest: true,
                size: 0,
            });
        }
        points
    }

    /// Last step of applying `applied` (the transfer [`Replica::begin_apply`] returned,
    /// applied and synced): records it and deletes its file.
    pub fn finish_apply(&mut self, applied: Queued) -> Result<(), StoreError> {
        // Points are taken below: no history file may be made at a removed path.
        self.check_present()?;
        if self.state.queue.front() != Some(&applied) {
            return Err(StoreError::Conflict(format!(
                "transfer {:#x} is not the next to apply",
                applied.id
            )));
        }
        let state = &mut self.state;
        state.queue.pop_front();
        if let TransferKind::Delta {
            cycle,
            closed_unix_ms,
            app_consistent,
        } = applied.kind
        {
            state.last_applied_cycle = Some(cycle);
            state.last_applied_unix = Some(now_unix());
            // A delta is offered only after every batch of a resync was committed, and
            // applies after them: whatever came before, the disks now hold the
            // primary's state at this cycle.
            state.consistent = true;
            let stamp = PointStamp {
                cycle,
                closed_unix_ms,
                app_consistent,
            };
            state.latest = Some(stamp);
            self.take_point(stamp, false)?;
        }
        self.save()?;
        let _ = fs::remove_file(self.received_path(applied.id));
        self.age_out()
    }

    /// Opens the replica disks for applying.
    pub fn open_disks(&self) -> Result<Vec<ReplicaDisk>, StoreError> {
        self.state
            .disks
            .iter()
            .map(|d| ReplicaDisk::open(&self.disk_path(&d.name), d.size).map_err(StoreError::from))
            .collect()
    }

    /// Feeds the transfers of an export (external media) in `dir`, as described by
    /// `manifest`, through the same checks as transfers from the network; the
    /// replica then accepts transfers from the network again. Transfers committed
    /// before (an import run twice, or cut short) are skipped. Returns the transfers
    /// newly committed.
    pub fn import(&mut self, dir: &Path, manifest: &Manifest) -> Result<u32, StoreError> {
        let state = &self.state;
        if manifest.name != state.name || manifest.disks != state.disks {
            return Err(StoreError::Conflict(format!(
                "the export is of {} with other disks than replica {}",
                manifest.name, state.name
            )));
        }
        // The export was made by the primary that owns the replica, at its epoch.
        let claim = Claim {
            relationship: manifest.relationship,
            epoch: self.state.epoch,
        };
        self.check_relationship(claim)?;
        if !manifest.complete {
            return Err(StoreError::Conflict(
                "the export is incomplete: its last transfer is missing (run the export again to finish it)".into(),
            ));
        }
        let mut imported = 0;
        let mut frame = Vec::new();
        for transfer in &manifest.transfers {
            let offer = TransferOffer {
                id: transfer.id,
                kind: transfer.kind,
                bytes: transfer.bytes,
            };
            let answer = self.offer(claim, &offer)?;
            if answer.committed {
                continue;
            }
            let path = dir.join(transfer_file(transfer.id));
            let mut file = File::open(&path).map_err(StoreError::io("open", &path))?;
            let mut index = 0u32;
            while read_frame(&mut file, &mut frame).map_err(StoreError::io("read", &path))? {
                if index >= answer.have_chunks {
                    self.put_chunk(claim, transfer.id, index, &frame)?;
                }
                index += 1;
            }
            self.commit(claim, transfer.id, transfer.chunks)?;
            imported += 1;
        }
        self.state.awaiting_import = false;
        self.save()?;
        Ok(imported)
    }

    /// Counts an applied transfer of `bytes` data bytes that took `took` (saved with
    /// the next [`Replica::finish_apply`]).
    pub fn note_apply(&mut self, bytes: u64, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let applied = &mut self.state.applied;
        applied.transfers += 1;
        applied.bytes = applied.bytes.saturating_add(bytes);
        applied.micros = applied.micros.saturating_add(micros);
        applied.last_micros = micros;
    }

    /// Fails the replica over to point `point` (the latest if `None`): fenced against
    /// its primary first, then, for an earlier point, the disks are rolled back to it,
    /// the state they leave kept as a point so another point can still be chosen until
    /// [`Replica::complete_failover`]. Fails while a transfer is received but not yet
    /// applied ([`StoreError::Busy`]): the latest point includes it, so wait.
    pub fn fail_over(&mut self, point: Option<u64>, planned: bool) -> Result<Failover, StoreError> {
        let name = self.state.name.clone();
        if let Some(test) = &self.state.test {
            return Err(StoreError::Conflict(format!(
                "A test failover of {name} (cycle {}) is running; stop it first with `blkrep replica test-failover stop --name {name}`",
                test.stamp.cycle
            )));
        }
        if self.state.failover.is_some_and(|f| f.completed) {
            return Err(StoreError::Conflict(format!(
                "The failover of {name} was completed: its disks are live and no other point is kept"
            )));
        }
        if !self.state.queue.is_empty() {
            return Err(StoreError::Busy(format!(
                "Replica {name} is applying {} received transfer(s)",
                self.state.queue.len()
            )));
        }
        let target = match point.filter(|id| *id != 0) {
            Some(id) => self.kept_point(id)?,
            None => {
                let latest = self.state.latest.ok_or_else(|| {
                    StoreError::Conflict(format!(
                        "Replica {name} holds no consistent latest state (an initial replication or resync is unfinished); fail over to an earlier point with --point"
                    ))
                })?;
                RecoveryPoint {
                    id: 0,
                    stamp: latest,
                    temporary: false,
                }
            }
        };
        // Fence first: from here the former primary's requests are refused.
        if let Some(receiving) = self.state.receiving.take() {
            let _ = fs::remove_file(self.part_path(receiving.id));
        }
        let failover = Failover {
            at_unix: now_unix(),
            stamp: target.stamp,
            planned,
            completed: false,
        };
        let current = self.state.latest;
        if self.state.failover.is_none() {
            self.state.epoch = next_epoch(self.state.epoch)?;
        }
        self.state.failover = Some(failover);
        self.save()?;
        if current != Some(target.stamp) {
            // Keep the state the disks leave as a point (temporary when it is not a
            // consistent state), then write the target's state over it.
            let keep = current.map_or((target.stamp, true), |latest| (latest, false));
            let newest = self.state.points.last().map(|p| p.stamp);
            if newest != Some(keep.0) || keep.1 {
                self.add_point(keep.0, keep.1)?;
                self.save()?;
            }
            let disks = self.open_disks()?;
            let history = Arc::clone(&self.history);
            let _guard = history.apply_guard();
            history.roll_back(&disks, target.id)?;
        }
        self.state.latest = Some(target.stamp);
        self.state.consistent = true;
        self.state.resync_epoch = None;
        self.save()?;
        Ok(failover)
    }

    /// Completes a failover: the point chosen stays, every other recovery point is
    /// deleted (their undo data would no longer describe the disks once they are
    /// written as the live copy).
    pub fn complete_failover(&mut self) -> Result<Failover, StoreError> {
        let name = self.state.name.clone();
        let Some(mut failover) = self.state.failover else {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was not failed over; fail over first with `blkrep replica failover --name {name}`"
            )));
        };
        failover.completed = true;
        self.state.failover = Some(failover);
        self.state.points.clear();
        self.save()?;
        self.history.clear()?;
        Ok(failover)
    }

    /// Failback: a planned failover handed this failed-over replica's live disks over
    /// to the replica it replicated to, after every block compared equal. The disks
    /// become an existing copy no relationship has claimed, at the epoch after this
    /// one (the new primary's: its failover raised the epoch this side replicated at
    /// once), so replication the other way claims them and sends only what differs,
    /// and nothing of an older epoch (this side's former live group) can. Recovery
    /// points go: they describe states from before the failover. The recovery policy
    /// and the time of the last test stay.
    pub fn hand_back(&mut self) -> Result<(), StoreError> {
        let name = self.state.name.clone();
        if self.state.failover.is_none() {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was not failed over, so it has no live disks to hand back"
            )));
        }
        let previous = &self.state;
        let mut state = ReplicaState::unclaimed(
            name,
            previous.trust_group.clone(),
            next_epoch(previous.epoch)?,
            "the live disks handed back by a planned failover",
            previous.disks.clone(),
        );
        state.created_unix = previous.created_unix;
        state.recovery = previous.recovery;
        state.last_test_unix = previous.last_test_unix;
        self.state = state;
        self.save()?;
        self.history.clear()?;
        Ok(())
    }

    /// Pauses or resumes replication on the replica side.
    pub fn set_paused(&mut self, paused: bool) -> Result<(), StoreError> {
        self.state.paused = paused;
        self.save()
    }
}

/// What applying one transfer took, phase by phase (the log line of each apply shows
/// it, so an admin can tell a slow disk from a slow history).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppliedTransfer {
    /// Data bytes written to the disks.
    pub written: u64,
    /// Reading what the changes overwrite into the recovery history.
    pub capture: Duration,
    /// Making that undo data durable.
    pub history_sync: Duration,
    /// Writing the changes to the disks.
    pub write: Duration,
    /// Making the disks durable.
    pub disk_sync: Duration,
}

/// Applies every change of the received transfer file `path` (transfer `id`) to
/// `disks` and syncs them. With recovery points kept, what the changes overwrite is
/// first captured in `history` and synced.
pub fn apply_transfer(
    path: &Path,
    id: u64,
    disks: &[ReplicaDisk],
    history: &History,
) -> Result<AppliedTransfer, StoreError> {
    let _guard = history.apply_guard();
    let mut applied = AppliedTransfer::default();
    let mut phase = Instant::now();
    let mut lap = |took: &mut Duration| {
        *took = phase.elapsed();
        phase = Instant::now();
    };
    if history.is_active() {
        for_each_change(path, id, |change| {
            history.capture(disks, change.disk, change.offset, change.length)?;
            Ok(())
        })?;
        lap(&mut applied.capture);
        history.sync()?;
        lap(&mut applied.history_sync);
    }
    for_each_change(path, id, |change| {
        apply_change(disks, change)?;
        if let ChangeData::Write(bytes) = change.data {
            applied.written += bytes.len() as u64;
        }
        Ok(())
    })?;
    lap(&mut applied.write);
    for disk in disks {
        disk.sync()?;
    }
    lap(&mut applied.disk_sync);
    Ok(applied)
}

/// Calls `each` with every change of the transfer file `path` (transfer `id`), in order.
fn for_each_change(
    path: &Path,
    id: u64,
    mut each: impl FnMut(&tracker::Change<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut file = File::open(path).map_err(StoreError::io("open", path))?;
    let (mut frame, mut scratch) = (Vec::new(), Vec::new());
    let mut index = 0u32;
    while read_frame(&mut file, &mut frame).map_err(StoreError::io("read", path))? {
        let checked = CheckedFrame::check(&frame)?;
        checked.header.expect(id, index)?;
        for change in checked.records(&mut scratch)? {
            each(&change?)?;
        }
        index += 1;
    }
    Ok(())
}

/// Whether two offers with the same id are the same transfer. A delta's point
/// metadata may differ between attempts: a primary that restarted dates a cycle closed
/// before anew.
fn same_transfer(a: TransferKind, b: TransferKind) -> bool {
    match (a, b) {
        (TransferKind::Delta { cycle: x, .. }, TransferKind::Delta { cycle: y, .. }) => x == y,
        _ => a == b,
    }
}

/// Reads the next frame of a transfer file into `frame`; `false` at the end of the file.
/// A frame whose header is invalid or whose body is cut short is an error.
fn read_frame(file: &mut File, frame: &mut Vec<u8>) -> io::Result<bool> {
    frame.resize(CHUNK_HEADER_LEN, 0);
    let mut got = 0;
    while got < CHUNK_HEADER_LEN {
        match file.read(&mut frame[got..])? {
            0 if got == 0 => return Ok(false),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let header =
        ChunkHeader::parse(frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    frame.resize(header.frame_len(), 0);
    file.read_exact(&mut frame[CHUNK_HEADER_LEN..])?;
    Ok(true)
}

#[cfg(test)]
mod tests;
