//! The spare transfer file: the file of the last applied transfer, kept to receive the
//! next one into.
//!
//! Why: writing a transfer into a new file makes the kernel find new page-cache pages
//! and new blocks for every byte of it, which costs several times what overwriting the
//! pages and blocks of an existing file does (on this project's test machine, a VM,
//! 1 GiB written into a new file took 2.6-3.5 s of system time, over the same file
//! 0.3 s). PostgreSQL recycles its WAL segments for the same reason. Written past
//! the page cache (`transfer_file`), a transfer still needs no new blocks in a
//! recycled file. So once a
//! transfer is applied, its file becomes the replica's spare (`spare.part` in the
//! replica's directory, cut to at most [`SPARE_MAX`]), and the next offer moves it to
//! `incoming/` where the chunks overwrite it.
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

impl Replica {
    pub(super) fn spare_path(&self) -> PathBuf {
        self.dir.join("spare.part")
    }

    /// Creates the `.part` file of transfer `id` at `path`: the spare moved there when
    /// it may serve (see the module doc), else a new empty file.
    pub(super) fn create_part(&self, path: &Path, id: u64) -> Result<(), StoreError> {
        let spare = self.spare_path();
        if spare_serves(&spare, id) && fs::rename(&spare, path).is_ok() {
            return Ok(());
        }
        let _ = fs::remove_file(&spare);
        File::create(path)
            .and_then(|f| f.sync_all())
            .map_err(StoreError::io("create", path))
    }

    /// Keeps the file of an applied transfer as the spare, cut to [`SPARE_MAX`], when
    /// the storage has room to spare for it; deletes it otherwise.
    pub(super) fn keep_as_spare(&self, path: &Path) {
        let kept = OpenOptions::new()
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
            .filter(|len| self.room_for_spare(*len))
            .is_some_and(|_| fs::rename(path, self.spare_path()).is_ok());
        if !kept {
            let _ = fs::remove_file(path);
        }
    }

    /// Deletes the spare; whether there was one.
    pub(super) fn drop_spare(&self) -> bool {
        fs::remove_file(self.spare_path()).is_ok()
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
