//! A replica's on-disk state: its disks, the transfer being received, the transfers
//! waiting to be applied, and what has been applied.
//!
//! Layout under the replica's directory (`<storage>/<name>/`):
//! - `replica.json`: [`ReplicaState`], replaced atomically (write, fsync, rename, fsync
//!   the directory) after every step, so a crash leaves the old or the new state.
//! - `disks/<disk>.img`: the replica disks, sparse files of the protected disks' sizes,
//!   in group order. Disks added to the group on the primary are added after the
//!   others ([`Replica::add_disks`]): each file is created zero-filled and synced
//!   before the state names it, so the state never names a missing or missized file.
//! - `incoming/<id>.part`: chunk frames of the transfer being received, back to back.
//!   Each chunk is verified (checksum, records, ranges) before it is written (with
//!   `O_DIRECT` where possible, see `transfer_file`); it is not synced on its own. On restart the file is cut after its last valid chunk, so
//!   a crash loses at most chunks the primary still holds (it frees nothing before
//!   the commit) and the next offer's answer tells it where to resume.
//! - `received/<id>.xfer`: a committed transfer waiting to be applied. Commit syncs
//!   the `.part`, renames it and records it in the state in the same step; only then
//!   is the transfer acknowledged as durable.
//!
//! - `spare.part`: the file of the last applied transfer, which the next offer
//!   recycles as its `.part` (overwriting pages and blocks is cheaper than new ones;
//!   see `spare` for why stale frames in it are never taken for chunks).
//!
//! Applying takes the oldest received transfer, writes its changes to the disks and
//! records the transfer as applied; its file stays as a redo log until the disks are
//! synced (after a run of transfers; see `applying`), then the newest such file
//! becomes the spare. A crash in between re-applies the transfer on restart, and the
//! unsynced ones before it, which gives the same disks: changes say what a range
//! holds, not how to get there. So the disks only ever show a half-applied transfer
//! while it is being applied, and `consistent` stays false until a delta is
//! completely applied.
//!
//! Disks added: the disks only ever grow by disks appended to the list (none removed,
//! renamed, resized or reordered). A recovery point taken before a disk was added
//! reads it as zeroes, its content before any write reached it, so failing over or
//! test failing over to that point gives the added disk zeroed (see `history`).
//!
//! Chain of cycles: after a resync's last batch the next delta may have any cycle
//! number; after that each delta must be the next cycle. A delta at or before the last
//! received one is a retry of a committed transfer and is answered as committed. Any
//! other gap breaks the chain: refused until a resync.
//!
//! The layers, one module each: `state` (what `replica.json` holds, and
//! the directory created, opened, saved, grown by added disks and removed), `receive` (offers, chunks into
//! the `.part` file, commit, part recovery, imports from external media), `applying`
//! (the received transfers written to the disks), `points` (recovery points) and
//! `failover` (failovers, test failovers and failback). This module holds the
//! [`Replica`] they share, its errors and its ownership checks.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use wire::api::{Position, ReplicaInfo, Role, TestFailoverInfo, FIRST_EPOCH, MAX_EPOCH};
use wire::chunk::ChunkError;

use crate::history::{History, HistoryError};
use image_ops::apply::{ApplyError, ReplicaDisk};

mod applying;
mod failover;
mod points;
mod receive;
mod spare;
mod state;
mod transfer_file;

pub use applying::{
    apply_transfer, sync_all, AppliedTransfer, SYNC_AFTER_BYTES, SYNC_AFTER_TRANSFERS,
};
use state::UNCLAIMED;
pub use state::{
    ApplyTotals, Failover, PointStamp, Queued, RecoveryPoint, ReplicaState, TestFailover, Unsynced,
};

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
    /// A committed transfer's file ends before its last chunk.
    #[error("Transfer file {path} holds {have} of its {chunks} chunks")]
    ShortTransfer {
        /// The file.
        path: PathBuf,
        /// Whole chunks it holds.
        have: u32,
        /// Chunks committed.
        chunks: u32,
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

/// Who a request speaks for: a relationship, at a failover epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The relationship id.
    pub relationship: u64,
    /// The failover epoch.
    pub epoch: u64,
}

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
    /// The open `.part` file, kept from one chunk to the next.
    part_writer: Option<transfer_file::PartWriter>,
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

use base::time::unix_secs as now_unix;

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync directory", dir))
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
            unsynced_transfers: u32::try_from(s.unsynced.len()).unwrap_or(u32::MAX),
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

    /// The disks to apply the next transfer to: the ones opened before if they are
    /// still every disk of the replica (none added since) and the files at its disk
    /// paths, else opened anew.
    pub fn disks_for_apply(&mut self) -> Result<Arc<[ReplicaDisk]>, StoreError> {
        self.check_present()?;
        if let Some(disks) = &self.apply_disks {
            if disks.len() == self.state.disks.len() && disks.iter().all(ReplicaDisk::is_at_path) {
                return Ok(Arc::clone(disks));
            }
            if disks.len() == self.state.disks.len() {
                tracing::warn!(replica = %self.state.name, "A replica disk was replaced since it was opened; opening the files now at its paths");
            }
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

    /// Opens the replica disks for applying.
    pub fn open_disks(&self) -> Result<Vec<ReplicaDisk>, StoreError> {
        self.state
            .disks
            .iter()
            .map(|d| ReplicaDisk::open(&self.disk_path(&d.name), d.size).map_err(StoreError::from))
            .collect()
    }

    /// Pauses or resumes replication on the replica side.
    pub fn set_paused(&mut self, paused: bool) -> Result<(), StoreError> {
        self.state.paused = paused;
        self.save()
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
}

#[cfg(test)]
mod tests;
