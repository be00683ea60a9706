//! What `replica.json` holds ([`ReplicaState`]), and the replica directory's life:
//! created (or seeded from existing images), opened, saved atomically after every
//! step, grown by disks added to the group, removed.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wire::api::{valid_name, DiskInfo, Position, RecoveryPolicy, TransferKind, FIRST_EPOCH};

use super::{now_unix, sync_dir, Claim, Replica, StoreError};
use crate::history::History;

/// The relationship of a seeded replica no primary has claimed (primaries never
/// choose 0).
pub(super) const UNCLAIMED: u64 = 0;

/// A transfer received and waiting to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Transfer id.
    pub id: u64,
    /// What it carries.
    pub kind: TransferKind,
    /// Chunks of a committed transfer. Its file can hold more bytes after them (a
    /// recycled file; see `spare`); `None` while it is received, and in states saved
    /// before files were recycled, whose files hold exactly their chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u32>,
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
    /// Transfers applied since the disks were last synced, oldest first. Their files
    /// stay in `received/` as a redo log until the next sync (see `applying`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsynced: Vec<Unsynced>,
}

/// A transfer applied to the disks' page cache but not yet synced with them: its
/// file is kept, and a restart applies it again before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsynced {
    /// Transfer id.
    pub id: u64,
    /// Chunks of the transfer (see [`Queued::chunks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u32>,
    /// Data bytes it wrote.
    pub bytes: u64,
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
            unsynced: Vec::new(),
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

/// Creates the new replica disk `path` as a sparse file of `size` zero bytes, synced
/// (its directory entry is the caller's to sync).
fn create_disk(path: &Path, size: u64) -> Result<(), StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(StoreError::io("create replica disk", path))?;
    file.set_len(size)
        .and_then(|()| file.sync_all())
        .map_err(StoreError::io("size replica disk", path))
}

impl Replica {
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
            create_disk(
                &dir.join("disks").join(format!("{}.img", disk.name)),
                disk.size,
            )?;
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
            part_writer: None,
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
                image_ops::copy::sparse_copy(image, &target)
                    .map_err(StoreError::io("copy", image))?;
            }
        }
        sync_dir(&building.join("disks"))?;
        fs::rename(&building, dir).map_err(StoreError::io("move into place", &building))?;
        sync_dir(parent)?;
        Self::open(dir, 0)
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
            part_writer: None,
            reserve,
            history,
            apply_disks: None,
            removed: false,
        };
        if lost_points {
            replica.save()?;
        }
        replica.recover_part()?;
        replica.redo_unsynced()?;
        replica.remove_strays()?;
        Ok(replica)
    }

    /// Writes the state atomically.
    pub(super) fn save(&mut self) -> Result<(), StoreError> {
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

    /// Fails unless disks `new` can be added after the replica's: it is claimed by a
    /// primary, not failed over, not waiting for an import from external media and
    /// not under a test failover, and the new disks' names are valid and unused.
    pub fn check_add_disks(&self, new: &[DiskInfo]) -> Result<(), StoreError> {
        self.check_present()?;
        let state = &self.state;
        let name = &state.name;
        if self.is_unclaimed() {
            return Err(StoreError::Conflict(format!(
                "Replica {name} is an existing copy no primary has claimed yet, and disks can be added only to a claimed replica: seed the copy again with an image of every disk (`blkrep replica seed`), or remove it on the replica server and enable replication with the network initial replication"
            )));
        }
        if state.failover.is_some() {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was failed over to and is the group's live copy: no primary can add disks to it"
            )));
        }
        if state.awaiting_import {
            return Err(StoreError::Conflict(format!(
                "Replica {name} waits for its initial copy to be imported from external media, and disks can be added only after it: import it first (`blkrep replica import` on the replica server); the primary adds the disks on its next try"
            )));
        }
        if let Some(test) = &state.test {
            return Err(StoreError::Conflict(format!(
                "A test failover of {name} (cycle {}) is running, and disks cannot be added under it: stop it first with `blkrep replica test-failover stop --name {name}`; the primary retries on its schedule",
                test.stamp.cycle
            )));
        }
        for (index, disk) in new.iter().enumerate() {
            let mut taken = state.disks.iter().chain(&new[..index]);
            if !valid_name(&disk.name) || taken.any(|d| d.name == disk.name) {
                return Err(StoreError::Conflict(format!(
                    "Disk name {:?} cannot be added to replica {name}: it is invalid or in use",
                    disk.name
                )));
            }
        }
        Ok(())
    }

    /// Adds disks `new` after the replica's (disks added to the group on the
    /// primary), each a sparse file of zeroes of its size. The files are created and
    /// synced before the state naming them is saved, so a crash leaves the replica
    /// with its disks before or after, never a state naming a disk whose file is
    /// missing or of another size; a leftover file of a new disk's name (an add cut
    /// short) is replaced. Recovery points taken before read the new disks as zeroes;
    /// the next apply opens every disk. See [`Replica::check_add_disks`] for when
    /// disks can be added.
    pub fn add_disks(&mut self, new: &[DiskInfo]) -> Result<(), StoreError> {
        self.check_add_disks(new)?;
        if new.is_empty() {
            return Ok(());
        }
        for disk in new {
            let path = self.disk_path(&disk.name);
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "Replacing the file of a disk whose add was cut short");
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(StoreError::io("remove", &path)(error)),
            }
            create_disk(&path, disk.size)?;
        }
        sync_dir(&self.dir.join("disks"))?;
        let had = self.state.disks.len();
        self.state.disks.extend_from_slice(new);
        if let Err(error) = self.save() {
            self.state.disks.truncate(had);
            return Err(error);
        }
        let sizes: Vec<u64> = new.iter().map(|d| d.size).collect();
        {
            let _guard = self.history.apply_guard();
            self.history.add_disks(&sizes);
        }
        self.forget_disks();
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
}
