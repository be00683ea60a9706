//! Appending to an undo segment file around the page cache.
//!
//! Undo data is written once and read rarely (only a failover or a test failover to an
//! older point reads it), yet written through the page cache it costs more than the
//! rest of a capture: every byte lands in a new page-cache page, and the sync before
//! the transfer's first write then has all of it to write. So appends are staged in a
//! block-aligned buffer and written with `O_DIRECT` in large block-aligned writes,
//! straight to the device. The staged bytes past the last whole block are written
//! through the page cache (one page, so the file still ends where its records do),
//! and written again, completed, by the next direct write, which the kernel orders
//! after that page's writeback.
//!
//! Contract:
//! - The file holds every staged byte below [`Staging::base`]; bytes from there to
//!   [`Staging::end`] are in the buffer, and in the file too only once
//!   [`Staging::write_out`] returned since they were staged (durable once the caller's
//!   `fdatasync` returns after that). The file never holds bytes past the staged end.
//! - Rewriting the partial last block rewrites the bytes it held with the same values:
//!   a write torn at any sector leaves them as they were.
//! - A filesystem that refuses `O_DIRECT` (EINVAL at open or at a write: ramfs, some
//!   FUSE filesystems) gets the same writes through the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment of direct writes: offsets, lengths and the buffer's address. 4 KiB is
/// the logical block size of every disk and filesystem block size in use here.
pub(super) const BLOCK: usize = 4096;
const BLOCK_LEN: u64 = BLOCK as u64;
/// Staging size while appending: large writes keep the device streaming. It holds a
/// largest record with its header after a partial block.
const STAGING: usize = 16 << 20;

/// How staged bytes reach the file.
#[derive(Debug)]
enum Direct {
    /// Not written yet: the direct handle is opened by the first write (most segments
    /// are never appended to again once opened).
    Unopened,
    /// Through this handle, opened with `O_DIRECT`.
    Open(File),
    /// Through the segment's own handle: the filesystem refused direct I/O.
    Refused,
}

/// The staging buffer of one segment file and its direct handle.
#[derive(Debug)]
pub(super) struct Staging {
    path: PathBuf,
    direct: Direct,
    /// Holds the block-aligned staging area (a whole block while idle).
    memory: Vec<u8>,
    /// Where the staging area starts in `memory`.
    aligned: usize,
    /// Bytes of the staging area.
    capacity: usize,
    /// File offset of the staged bytes' first byte: a multiple of [`BLOCK`].
    base: u64,
    /// Bytes staged.
    filled: usize,
    /// Whether bytes were staged since the last [`Staging::write_out`].
    unwritten: bool,
}

impl Staging {
    /// Staging for the segment file at `path`, empty, from the file's start.
    pub(super) fn new(path: &Path) -> Self {
        let mut staging = Staging {
            path: path.to_path_buf(),
            direct: Direct::Unopened,
            memory: Vec::new(),
            aligned: 0,
            capacity: 0,
            base: 0,
            filled: 0,
            unwritten: false,
        };
        staging.reallocate(BLOCK);
        staging
    }

    /// Stages from `end` of `file` on (where its valid bytes end): the partial block
    /// before `end` is read back, to be rewritten completed.
    pub(super) fn resume(&mut self, file: &File, end: u64) -> io::Result<()> {
        self.base = end - end % BLOCK_LEN;
        self.filled = 0;
        self.unwritten = false;
        let partial = usize::try_from(end - self.base).unwrap_or(0);
        let base = self.base;
        file.read_exact_at(&mut self.area_mut()[..partial], base)?;
        self.filled = partial;
        Ok(())
    }

    /// Whether writes bypass the page cache: `None` until the first write.
    #[cfg(test)]
    pub(super) fn is_direct(&self) -> Option<bool> {
        match self.direct {
            Direct::Unopened => None,
            Direct::Open(_) => Some(true),
            Direct::Refused => Some(false),
        }
    }

    /// File offset of the first staged byte.
    pub(super) fn base(&self) -> u64 {
        self.base
    }

    /// File offset just past the last staged byte.
    pub(super) fn end(&self) -> u64 {
        self.base + self.filled as u64
    }

    /// The staged bytes.
    pub(super) fn staged(&self) -> &[u8] {
        &self.memory[self.aligned..self.aligned + self.filled]
    }

    fn area_mut(&mut self) -> &mut [u8] {
        &mut self.memory[self.aligned..self.aligned + self.capacity]
    }

    /// A staging area of at least `capacity` bytes holding what is staged.
    fn reallocate(&mut self, capacity: usize) {
        let capacity = capacity.next_multiple_of(BLOCK);
        let mut memory = vec![0u8; capacity + BLOCK];
        let aligned = (BLOCK - memory.as_ptr().addr() % BLOCK) % BLOCK;
        memory[aligned..aligned + self.filled].copy_from_slice(self.staged());
        (self.memory, self.aligned, self.capacity) = (memory, aligned, capacity);
    }

    /// Room for `length` more bytes at the end: the returned slice, which
    /// [`Staging::commit`] makes staged. Writes staged whole blocks to `file` first if
    /// the buffer is full.
    pub(super) fn reserve(&mut self, file: &File, length: usize) -> io::Result<&mut [u8]> {
        if self.filled + length > self.capacity {
            if self.capacity < STAGING.max(length + BLOCK) {
                self.reallocate(STAGING.max(length + BLOCK));
            }
            if self.filled + length > self.capacity {
                self.write_whole_blocks(file)?;
            }
        }
        Ok(self.room(length))
    }

    /// The room a [`Staging::reserve`] of at least `length` bytes made.
    pub(super) fn room(&mut self, length: usize) -> &mut [u8] {
        let filled = self.filled;
        &mut self.area_mut()[filled..filled + length]
    }

    /// Stages the first `length` bytes of the last [`Staging::reserve`]d room.
    pub(super) fn commit(&mut self, length: usize) {
        self.filled += length;
        self.unwritten = true;
    }

    /// Writes the staged whole blocks and keeps the partial last one staged.
    fn write_whole_blocks(&mut self, file: &File) -> io::Result<()> {
        let whole = self.filled - self.filled % BLOCK;
        if whole == 0 {
            return Ok(());
        }
        self.write_at(file, whole)?;
        self.keep_partial_block();
        Ok(())
    }

    /// Drops the staged whole blocks (written): the partial one moves to the front.
    fn keep_partial_block(&mut self) {
        let whole = self.filled - self.filled % BLOCK;
        let (aligned, filled) = (self.aligned, self.filled);
        self.memory
            .copy_within(aligned + whole..aligned + filled, aligned);
        self.base += whole as u64;
        self.filled -= whole;
    }

    /// Writes everything staged to `file`: the whole blocks directly, the partial last
    /// block through the page cache (so the file ends where the records do), then
    /// shrinks the buffer to that block: an idle segment holds no staging memory.
    pub(super) fn write_out(&mut self, file: &File) -> io::Result<()> {
        if self.unwritten {
            self.write_whole_blocks(file)?;
            file.write_all_at(self.staged(), self.base)?;
            self.unwritten = false;
        }
        if self.capacity > BLOCK {
            self.reallocate(BLOCK);
        }
        Ok(())
    }

    /// Writes the first `length` bytes of the staging area (whole blocks) at `base`.
    fn write_at(&mut self, file: &File, length: usize) -> io::Result<()> {
        if let Direct::Unopened = self.direct {
            self.direct = match open_direct(&self.path)? {
                Some(direct) => Direct::Open(direct),
                None => Direct::Refused,
            };
        }
        let bytes = &self.memory[self.aligned..self.aligned + length];
        if let Direct::Open(direct) = &self.direct {
            match direct.write_all_at(bytes, self.base) {
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %self.path.display(), "Direct writes of undo data refused; writing through the page cache");
                    self.direct = Direct::Refused;
                }
                written => return written,
            }
        }
        file.write_all_at(bytes, self.base)
    }
}

/// `path` opened for direct writes, or `None` where the filesystem refuses them.
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(path = %path.display(), "The filesystem refuses direct writes of undo data; writing through the page cache");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests;
