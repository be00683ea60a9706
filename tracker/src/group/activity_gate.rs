//! Activity gating: before a write is admitted, the extents it touches are listed in
//! the activity log ([`crate::activity`]), which is persisted whenever it grew, so that
//! after a host crash the resync covers every write that may not have been durable.
//! Disk syncs go through here ([`DiskTracker::sync`]) and tell the activity log which
//! writes are durable, so that their extents can leave the list.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::MutexGuard;

use tracing::warn;

use super::{lock, DiskTracker, Range, Shared, State, Waiting};
use crate::activity::Admission;
use crate::TrackerError;

/// How the activity log covers an admitted operation until it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coverage {
    /// Its extents are listed and hold it.
    Extents,
    /// Not covered (too wide, or no room): the activity log is marked incomplete
    /// until the write is durable.
    Uncovered,
}

impl Shared {
    /// Lists the extents of `range` on `disk` in the activity log before a write
    /// is admitted, persisting the list when it grew. May drop the lock (to sync a
    /// disk so an extent can leave the list, or to wait for a slot; with
    /// [`Waiting::Refused`], waiting for a slot fails with
    /// [`TrackerError::WouldWait`] instead).
    pub(super) fn enter_activity<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        disk: usize,
        range: Range,
        waiting: Waiting,
    ) -> Result<(MutexGuard<'a, State>, Coverage), TrackerError> {
        loop {
            match state.activity.admit(disk, range.start, range.end) {
                Admission::Active => return Ok((state, Coverage::Extents)),
                Admission::TooWide => return self.enter_uncovered(state, disk),
                Admission::Added => {
                    if let Err(error) = self.write_superblock(&mut state, true) {
                        state.activity.release(disk, range.start, range.end);
                        return Err(error);
                    }
                    return Ok((state, Coverage::Extents));
                }
                Admission::Wait if waiting == Waiting::Refused => {
                    return Err(TrackerError::WouldWait)
                }
                Admission::Wait => state = self.wait_once(state, None),
                Admission::SyncDisk(victim) => {
                    if self
                        .disks
                        .get(victim)
                        .is_none_or(|d| d.image.get().is_none())
                    {
                        // Nothing to sync that would make the extent durable.
                        return self.enter_uncovered(state, disk);
                    }
                    drop(state);
                    let synced = self.sync_disk(victim);
                    state = lock(&self.state);
                    match synced {
                        Ok(true) => {}
                        failed => {
                            if let Err(error) = &failed {
                                warn!(group = %self.name, %error, "Could not sync a disk to make room in the activity log");
                            }
                            return self.enter_uncovered(state, disk);
                        }
                    }
                }
            }
        }
    }

    /// Admits a write the activity log cannot list: until it is durable, a host
    /// crash resynchronises the whole disk.
    fn enter_uncovered<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        disk: usize,
    ) -> Result<(MutexGuard<'a, State>, Coverage), TrackerError> {
        if state.activity.admit_uncovered(disk) {
            if let Err(error) = self.write_superblock(&mut state, true) {
                state.activity.release_uncovered(disk);
                return Err(error);
            }
        }
        Ok((state, Coverage::Uncovered))
    }

    pub(super) fn leave_activity(state: &mut State, disk: usize, range: Range, coverage: Coverage) {
        match coverage {
            Coverage::Extents => state.activity.release(disk, range.start, range.end),
            Coverage::Uncovered => state.activity.release_uncovered(disk),
        }
    }

    /// Makes the ring and `disk`'s image durable together; the activity log learns
    /// which of the disk's writes are durable. Returns whether the image was synced
    /// (false if none is attached: then only the ring was).
    ///
    /// Concurrent callers, for this disk or others of the group, share syncs
    /// ([`GroupCommit`](crate::durability::GroupCommit)): each returns after a sync
    /// that started after its call covered the ring and its disk's image.
    fn sync_disk(&self, disk: usize) -> Result<bool, TrackerError> {
        self.group_commit
            .sync(disk, |disks| self.sync_disks(disks))
            .map_err(|source| TrackerError::Io {
                what: "sync ring and image",
                path: self.ring_path.clone(),
                source,
            })?;
        Ok(self
            .disks
            .get(disk)
            .is_some_and(|state| state.image.get().is_some()))
    }

    /// One shared sync: the ring and the images of `disks`, in parallel.
    fn sync_disks(&self, disks: &[usize]) -> std::io::Result<()> {
        let started = lock(&self.state).activity.begin_sync();
        let mut fds = Vec::with_capacity(disks.len() + 1);
        fds.push(self.sync_file.as_raw_fd());
        let mut synced = Vec::with_capacity(disks.len());
        for &disk in disks {
            if let Some(image) = self.disks.get(disk).and_then(|state| state.image.get()) {
                fds.push(image.as_raw_fd());
                synced.push(disk);
            }
        }
        self.durability.datasync(&fds)?;
        let mut state = lock(&self.state);
        let mut changed = false;
        for disk in synced {
            changed |= state.activity.synced(disk, started);
        }
        if changed {
            if let Err(error) = self.write_superblock(&mut state, false) {
                warn!(group = %self.name, %error, "Could not record the complete activity log");
            }
        }
        Ok(())
    }
}

impl DiskTracker {
    /// Gives the tracker a descriptor of the disk's image (read-only is enough), so
    /// [`DiskTracker::sync`] makes it durable beside the ring, and the activity log can
    /// sync it when it needs room. The first one attached stays.
    pub fn attach_image(&self, image: File) {
        let _ = self.shared.disks[self.disk].image.set(image);
    }

    /// Makes the ring and the attached image durable together (FLUSH, FUA): every
    /// write to this disk completed before the call is then on stable storage.
    pub fn sync(&self) -> Result<(), TrackerError> {
        self.shared.sync_disk(self.disk).map(drop)
    }
}
