//! Resynchronisation: when the log cannot bring the replica up to date (the ring
//! overflowed, the host crashed, an image write failed, or a full copy was asked for),
//! the group tracks by dirty map and the consumer copies the marked blocks from the
//! images. This module hands those maps out and takes them back, records where a
//! running copy stands so that a daemon crash resumes it, and keeps the resync maps in
//! a file across a clean shutdown.

use std::fs::File;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{lock, usize_of, Group, Shared, TrackingMode};
use crate::bitmap::DirtyBits;
use crate::superblock::ResyncReason;
use crate::TrackerError;

impl Group {
    /// Starts a resync: logging restarts now (so every write from this instant on is in
    /// the log again) and the blocks to copy are handed out, one map per disk. The
    /// consumer copies those blocks from the images (a fuzzy copy, as writes go on),
    /// then ships the next cycle, which makes the copy consistent; then it calls
    /// [`Group::finish_resync`].
    ///
    /// The unacknowledged log is dropped: its blocks are in the returned maps.
    pub fn begin_resync(&self) -> Result<Vec<DirtyBits>, TrackerError> {
        let shared = &self.shared;
        let (head, tail) = {
            let mut state = lock(&shared.state);
            if state.consumer_busy {
                return Err(TrackerError::ConsumerBusy);
            }
            // Stop logging: from now on nothing is reserved, so the old log's headers
            // (written only under the lock) stay as they are while they are read below
            // without it. Writers meanwhile mark the resync map; throttled ones stop
            // waiting for room.
            state.mode = TrackingMode::DirtyMap;
            shared.wake(&state);
            state = shared.wait_while(state, |state| {
                state.inflight.iter().any(|(_, count)| *count > 0)
            });
            (state.head, state.tail)
        };
        // Every unacknowledged record's range joins the resync set; scanning a large
        // ring takes milliseconds, which writers must not wait for.
        shared.mark_ring_for_resync(head, tail);
        let mut state = lock(&shared.state);
        // The ring restarts empty at the current position, and logging resumes: every
        // write from here on is in the log. Until finish_resync the reason stays in
        // the superblock, so a crash mid-resync resyncs again.
        let (old_head, old_head_seq, old_acked) = (state.head, state.head_seq, state.acked_cycle);
        state.head = state.tail;
        state.head_seq = state.next_seq;
        // Cycles before the resync are all superseded by it.
        state.acked_cycle = state.open_cycle - 1;
        state.superblock.copy_position = Some((0, 0));
        state.resumable_copy = None;
        if let Err(error) = shared.write_superblock(&mut state, true) {
            // Nothing was taken yet: the marks stay for the next attempt.
            (state.head, state.head_seq, state.acked_cycle) = (old_head, old_head_seq, old_acked);
            state.superblock.copy_position = None;
            return Err(error);
        }
        state.closed.clear();
        state.broken = false;
        state.mode = TrackingMode::Logging;
        // Writes that were tracked by map only may still be writing the images: the
        // copy must not read a block before its write landed.
        state = shared.wait_while(state, |state| state.unlogged > 0);
        for disk in &shared.disks {
            disk.resync_bits.merge(&disk.open_bits.take());
        }
        let maps = shared
            .disks
            .iter()
            .map(|disk| disk.resync_bits.take())
            .collect();
        state.resync = None;
        info!(group = %shared.name, "Resync started; logging resumed");
        Ok(maps)
    }

    /// Ends a resync started with [`Group::begin_resync`]: the copy is consistent.
    pub fn finish_resync(&self) -> Result<(), TrackerError> {
        let mut state = lock(&self.shared.state);
        state.superblock.resync = None;
        state.superblock.copy_position = None;
        self.shared.write_superblock(&mut state, true)?;
        info!(group = %self.shared.name, "Resync finished");
        Ok(())
    }

    /// Marks every block of every disk for a resync (initial replication, or an
    /// administrator's request). Tracking continues by dirty map until the consumer's
    /// next [`Group::begin_resync`]; the request survives a restart.
    pub fn request_full_resync(&self, reason: ResyncReason) -> Result<(), TrackerError> {
        let mut state = lock(&self.shared.state);
        for disk in &self.shared.disks {
            disk.resync_bits.set_all();
        }
        state.mode = TrackingMode::DirtyMap;
        state.resync = Some(reason);
        state.superblock.copy_position = None;
        state.resumable_copy = None;
        // Throttled writers stop waiting: they go by dirty map now.
        self.shared.wake(&state);
        self.shared.write_superblock(&mut state, true)?;
        info!(group = %self.shared.name, %reason, "Full resync requested");
        Ok(())
    }

    /// Gives back resync maps that could not be copied (the resync failed).
    pub fn abort_resync(&self, maps: &[DirtyBits], reason: ResyncReason) {
        for (disk, bits) in self.shared.disks.iter().zip(maps) {
            disk.resync_bits.merge(bits);
        }
        let mut state = lock(&self.shared.state);
        state.resync = Some(reason);
        state.mode = TrackingMode::DirtyMap;
        state.superblock.copy_position = None;
        state.resumable_copy = None;
        if let Err(error) = self.shared.write_superblock(&mut state, false) {
            warn!(group = %self.shared.name, %error, "Could not record the stopped copy in the superblock");
        }
    }

    /// Records where the running resync copy stands: its consumer holds every block
    /// below `(disk, offset)` of the copy. After a daemon crash the copy resumes there
    /// ([`Group::resume_copy`]). Not synced: only a daemon crash, which keeps the page
    /// cache, resumes a copy; a host crash copies everything again.
    pub fn note_copy_position(&self, disk: usize, offset: u64) -> Result<(), TrackerError> {
        let mut state = lock(&self.shared.state);
        if state.superblock.copy_position.is_none() || state.mode != TrackingMode::Logging {
            return Ok(());
        }
        let disk = u32::try_from(disk).map_err(|_| TrackerError::Config("disk index".into()))?;
        state.superblock.copy_position = Some((disk, offset));
        self.shared.write_superblock(&mut state, false)
    }

    /// Where a copy interrupted by a daemon crash can resume, if one can.
    pub fn resumable_copy(&self) -> Option<(usize, u64)> {
        lock(&self.shared.state).resumable_copy
    }

    /// Resumes the copy interrupted by a daemon crash ([`Group::resumable_copy`]):
    /// returns the resync maps (every block from the copy's position on) and leaves
    /// the log as it is, since it holds every write since the copy began. Without such
    /// a copy, the same as [`Group::begin_resync`].
    pub fn resume_copy(&self) -> Result<Vec<DirtyBits>, TrackerError> {
        {
            let mut state = lock(&self.shared.state);
            if state.resumable_copy.take().is_some() && state.mode == TrackingMode::Logging {
                state.resync = None;
                info!(group = %self.shared.name, "Resync copy resumed; logging continues");
                return Ok(self
                    .shared
                    .disks
                    .iter()
                    .map(|disk| disk.resync_bits.take())
                    .collect());
            }
        }
        self.begin_resync()
    }
}

impl Shared {
    /// Marks every record between head and tail in the resync maps.
    pub(super) fn mark_ring_for_resync(&self, head: u64, tail: u64) {
        self.for_each_record(head, tail, |header| {
            if let Some(disk) = self.disks.get(usize::from(header.disk)) {
                disk.resync_bits.set_range(header.offset, header.length);
            }
        });
    }

    pub(super) fn dirty_map_path(&self) -> PathBuf {
        let mut path = self.ring_path.clone().into_os_string();
        path.push(".dirtymap");
        PathBuf::from(path)
    }

    pub(super) fn save_resync_bits(&self) -> Result<(), TrackerError> {
        let path = self.dirty_map_path();
        let mut bytes = Vec::new();
        for disk in &self.disks {
            for word in disk.resync_bits.snapshot().as_raw_slice() {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        write_file_durably(&path, &bytes).map_err(|source| TrackerError::Io {
            what: "save dirty map",
            path: path.clone(),
            source,
        })
    }

    pub(super) fn load_resync_bits(&self, path: &Path, disks: usize) -> bool {
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        // The file has the disks the ring had when it was saved, `disks` of them: the
        // ones added since are marked whole anyway.
        let saved = &self.disks[..disks.min(self.disks.len())];
        let expected: usize = saved
            .iter()
            .map(|d| usize_of(d.resync_bits.blocks().div_ceil(64)) * 8)
            .sum();
        if bytes.len() != expected + 4 {
            return false;
        }
        let (body, crc) = bytes.split_at(expected);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return false;
        }
        let mut words = body.chunks_exact(8).map(|chunk| {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            u64::from_le_bytes(word)
        });
        for disk in saved {
            let count = usize_of(disk.resync_bits.blocks().div_ceil(64));
            let mut bits: DirtyBits = words.by_ref().take(count).collect();
            bits.truncate(usize_of(disk.resync_bits.blocks()));
            disk.resync_bits.merge(&bits);
        }
        true
    }
}

fn write_file_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut temporary = path.to_path_buf().into_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}
