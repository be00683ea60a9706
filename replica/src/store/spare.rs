//! Spare transfer files: files of applied transfers, kept to receive the next ones
//! into.
//!
//! Why: writing a transfer into a new file makes the kernel find new page-cache pages
//! and new blocks for every byte of it, which costs several times what overwriting the
//! pages and blocks of an existing file does (on this project's test machine, a VM,
//! 1 GiB written into a new file took 2.6-3.5 s of system time, over the same file
//! 0.3 s). PostgreSQL recycles its WAL segments for the same reason. So once the
//! disks were synced after a run of applied transfers, their files become the
//! replica's spares (`spare.part`, then `spare-1.part` up to [`SPARE_SLOTS`] files in
//! the replica's directory, the newest first, each cut to at most [`SPARE_MAX`], all
//! together at most [`SPARES_MAX`]), and each offer moves one to `incoming/` where the
//! chunks overwrite it. Several are kept because a sync frees a run of files at once,
//! and a backlog of transfers received meanwhile would otherwise get new files.
//!
//! Contract: a recycled file can be longer than what it holds; the bytes past the
//! transfer's chunks are frames of earlier transfers of the same replica. Nothing
//! takes them for chunks: chunks are written at the end of the stored ones, the queue
//! records how many chunks a committed transfer has and the apply reads that many,
//! and recovery after a crash keeps only frames of the transfer being received, in
//! order from the first (it stops at a frame of another transfer and cuts the file
//! there). A frame counts only as the next chunk of the offered transfer's id, and a
//! primary never offers an id twice (ids carry a random chain number and the cycle;
//! an id committed before is answered as committed); a spare whose first frame has
//! the offered id is not used all the same. Whatever a primary sends, stale frames
//! are the same replica's own data: nothing of another replica's can reach it.
//!
//! The spare is a cache, never state: it is not synced, a crash may lose it, and it is
//! deleted first when the storage runs short of space.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use wire::chunk::{ChunkHeader, CHUNK_HEADER_LEN};

use super::{free_space, Replica, StoreError};

/// Largest spare kept; a longer transfer's file is cut to this before it is kept.
pub const SPARE_MAX: u64 = 1 << 30;
/// Spare files kept at most.
pub const SPARE_SLOTS: usize = 8;
/// Bytes all spares may hold together.
pub const SPARES_MAX: u64 = 2 << 30;

impl Replica {
    /// The path of spare slot `slot`.
    fn spare_path(&self, slot: usize) -> PathBuf {
        if slot == 0 {
            self.dir.join("spare.part")
        } else {
            self.dir.join(format!("spare-{slot}.part"))
        }
    }

    /// The spares there are: slot, path and length.
    fn spares(&self) -> Vec<(usize, PathBuf, u64)> {
        (0..SPARE_SLOTS)
            .filter_map(|slot| {
                let path = self.spare_path(slot);
                let len = fs::metadata(&path).ok()?.len();
                Some((slot, path, len))
            })
            .collect()
    }

    /// Creates the `.part` file of transfer `id` at `path`: a spare moved there when
    /// one may serve (see the module doc), else a new empty file.
    pub(super) fn create_part(&self, path: &Path, id: u64) -> Result<(), StoreError> {
        for (_, spare, _) in self.spares() {
            if spare_serves(&spare, id) && fs::rename(&spare, path).is_ok() {
                return Ok(());
            }
            let _ = fs::remove_file(&spare);
        }
        File::create(path)
            .and_then(|f| f.sync_all())
            .map_err(StoreError::io("create", path))
    }

    /// Keeps the file of an applied transfer as a spare, cut to [`SPARE_MAX`], when a
    /// slot is free and the spares and the storage have room for it; deletes it
    /// otherwise.
    pub(super) fn keep_as_spare(&self, path: &Path) {
        let spares = self.spares();
        let held: u64 = spares.iter().map(|(_, _, len)| len).sum();
        let free_slot = (0..SPARE_SLOTS).find(|slot| spares.iter().all(|(s, _, _)| s != slot));
        let kept = free_slot.is_some_and(|slot| {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| {
                    let len = file.metadata()?.len();
                    if len > SPARE_MAX {
                        file.set_len(SPARE_MAX)?;
                    }
                    Ok(len.min(SPARE_MAX))
                })
                .ok()
                .filter(|len| held.saturating_add(*len) <= SPARES_MAX && self.room_for_spare(*len))
                .is_some_and(|_| fs::rename(path, self.spare_path(slot)).is_ok())
        });
        if !kept {
            let _ = fs::remove_file(path);
        }
    }

    /// Deletes the spares; whether there was one.
    pub(super) fn drop_spare(&self) -> bool {
        let spares = self.spares();
        for (_, path, _) in &spares {
            let _ = fs::remove_file(path);
        }
        !spares.is_empty()
    }

    /// Whether keeping `len` bytes as a spare leaves at least as much again free
    /// above the reserve.
    fn room_for_spare(&self, len: u64) -> bool {
        free_space(&self.dir).is_ok_and(|free| free >= self.reserve.saturating_add(len))
    }
}

/// Whether the spare at `path` may become the `.part` file of transfer `id`: it is a
/// file, and its first frame (if it has one) is not one of `id`'s.
fn spare_serves(path: &Path, id: u64) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let mut header = [0u8; CHUNK_HEADER_LEN];
    match file.read_exact(&mut header) {
        Ok(()) => ChunkHeader::parse(&header).map_or(true, |h| h.transfer != id),
        // Shorter than a header: no frame to mistake.
        Err(_) => file.metadata().is_ok_and(|m| m.is_file()),
    }
}
