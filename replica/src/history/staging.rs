//! Appending to an undo segment file around the page cache.
//!
//! Undo data is written once and read rarely (only a failover or a test failover to an
//! older point reads it), yet written through the page cache it costs more than the
//! rest of a capture: every byte lands in a new page-cache page, and the sync before
//! the transfer's first write then has all of it to write. So appends are staged in a
//! block-aligned buffer and written with `O_DIRECT` in large block-aligned writes,
//! straight to the device. A full buffer is written by a thread of its own while the
//! capture stages on in a second one (at most one write runs behind), so reading the
//! disk and writing the segment overlap. The staged bytes past the last whole block
//! are written through the page cache (one page, so the file still ends where its
//! records do), and written again, completed, by the next direct write, which the
//! kernel orders after that page's writeback.
//!
//! Contract:
//! - The file holds every staged byte below [`Staging::written_below`]; bytes from
//!   there to [`Staging::end`] are in the buffers ([`Staging::read`]), and in the file
//!   too only once [`Staging::write_out`] returned since they were staged (durable once
//!   the caller's `fdatasync` returns after that). The file never holds bytes past the
//!   staged end. Dropping the staging waits for the write running behind.
//! - Rewriting the partial last block rewrites the bytes it held with the same values:
//!   a write torn at any sector leaves them as they were.
//! - A write behind that fails is written again by the next write (at once, on the
//!   caller's thread), whose error is reported.
//! - A filesystem that refuses `O_DIRECT` (EINVAL at open or at a write: ramfs, some
//!   FUSE filesystems) gets the same writes through the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    Open(Arc<File>),
    /// Through the segment's own handle: the filesystem refused direct I/O.
    Refused,
}

/// A block-aligned buffer.
#[derive(Debug)]
struct Area {
    memory: Vec<u8>,
    /// Where the aligned bytes start in `memory`.
    aligned: usize,
    capacity: usize,
}

impl Area {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.next_multiple_of(BLOCK);
        let memory = vec![0u8; capacity + BLOCK];
        let aligned = (BLOCK - memory.as_ptr().addr() % BLOCK) % BLOCK;
        Area {
            memory,
            aligned,
            capacity,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.memory[self.aligned..self.aligned + self.capacity]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.memory[self.aligned..self.aligned + self.capacity]
    }
}

/// Whole blocks being written by a thread of their own.
#[derive(Debug)]
struct Behind {
    /// File offset of the first block.
    base: u64,
    /// The blocks: the first `length` bytes, shared with the writing thread.
    area: Arc<Area>,
    length: usize,
    /// The write; `None` if it failed or could not start (the next settle writes
    /// the blocks).
    job: Option<JoinHandle<io::Result<()>>>,
}

/// The staging buffers of one segment file and its direct handle.
#[derive(Debug)]
pub(super) struct Staging {
    path: PathBuf,
    direct: Direct,
    /// The bytes being staged (a whole block while idle).
    area: Area,
    /// File offset of the staged bytes' first byte: a multiple of [`BLOCK`].
    base: u64,
    /// Bytes staged.
    filled: usize,
    /// Whether bytes were staged since the last [`Staging::write_out`].
    unwritten: bool,
    /// The blocks before `base`, while they are written.
    behind: Option<Behind>,
    /// A buffer a finished write left, for the next.
    spare: Option<Area>,
}

impl Staging {
    /// Staging for the segment file at `path`, empty, from the file's start.
    pub(super) fn new(path: &Path) -> Self {
        Staging {
            path: path.to_path_buf(),
            direct: Direct::Unopened,
            area: Area::new(BLOCK),
            base: 0,
            filled: 0,
            unwritten: false,
            behind: None,
            spare: None,
        }
    }

    /// Stages from `end` of `file` on (where its valid bytes end): the partial block
    /// before `end` is read back, to be rewritten completed.
    pub(super) fn resume(&mut self, file: &File, end: u64) -> io::Result<()> {
        self.base = end - end % BLOCK_LEN;
        self.filled = 0;
        self.unwritten = false;
        let partial = usize::try_from(end - self.base).unwrap_or(0);
        file.read_exact_at(&mut self.area.bytes_mut()[..partial], self.base)?;
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

    /// File offset below which the file holds every byte.
    pub(super) fn written_below(&self) -> u64 {
        self.behind.as_ref().map_or(self.base, |behind| behind.base)
    }

    /// File offset just past the last staged byte.
    pub(super) fn end(&self) -> u64 {
        self.base + self.filled as u64
    }

    /// Fills `buf` with the bytes from `at` (at least [`Staging::written_below`]), from
    /// the buffers; `false` if they are not all staged.
    pub(super) fn read(&self, buf: &mut [u8], at: u64) -> bool {
        let pieces = [
            Some((self.base, &self.area.bytes()[..self.filled])),
            self.behind
                .as_ref()
                .map(|behind| (behind.base, &behind.area.bytes()[..behind.length])),
        ];
        let mut done = 0;
        while done < buf.len() {
            let offset = at + done as u64;
            let Some(bytes) = pieces.iter().flatten().find_map(|(base, bytes)| {
                let start = usize::try_from(offset.checked_sub(*base)?).ok()?;
                bytes.get(start..).filter(|rest| !rest.is_empty())
            }) else {
                return false;
            };
            let step = bytes.len().min(buf.len() - done);
            buf[done..done + step].copy_from_slice(&bytes[..step]);
            done += step;
        }
        true
    }

    /// Room for `length` more bytes at the end: the returned slice, which
    /// [`Staging::commit`] makes staged. Hands the staged whole blocks to a writing
    /// thread first if the buffer is full.
    pub(super) fn reserve(&mut self, file: &File, length: usize) -> io::Result<&mut [u8]> {
        if self.filled + length > self.area.capacity {
            // Grown as needed (a small transfer stages little), up to the staging size.
            let wanted = (self.filled + length)
                .next_power_of_two()
                .min(STAGING)
                .max(length + BLOCK);
            if self.area.capacity < wanted {
                self.replace_area(Area::new(wanted));
            }
            if self.filled + length > self.area.capacity {
                self.write_behind(file)?;
            }
        }
        Ok(self.room(length))
    }

    /// The room a [`Staging::reserve`] of at least `length` bytes made.
    pub(super) fn room(&mut self, length: usize) -> &mut [u8] {
        let filled = self.filled;
        &mut self.area.bytes_mut()[filled..filled + length]
    }

    /// Stages the first `length` bytes of the last [`Staging::reserve`]d room.
    pub(super) fn commit(&mut self, length: usize) {
        self.filled += length;
        self.unwritten = true;
    }

    /// Makes `area` (at least as large as what is staged) the staging area, moving the
    /// staged bytes there.
    fn replace_area(&mut self, mut area: Area) {
        area.bytes_mut()[..self.filled].copy_from_slice(&self.area.bytes()[..self.filled]);
        self.area = area;
    }

    /// Starts writing the staged whole blocks on a thread of their own (at once
    /// through the page cache), after the write behind finished; the partial last
    /// block stays staged, in the other buffer.
    fn write_behind(&mut self, file: &File) -> io::Result<()> {
        let whole = self.filled - self.filled % BLOCK;
        if whole == 0 {
            return Ok(());
        }
        self.settle(file)?;
        let Some(direct) = self.direct_handle()?.map(Arc::clone) else {
            return self.write_whole_blocks(file);
        };
        let next = match self.spare.take() {
            Some(spare) if spare.capacity >= self.area.capacity => spare,
            _ => Area::new(self.area.capacity),
        };
        let (base, partial) = (self.base, self.filled - whole);
        let area = Arc::new(std::mem::replace(&mut self.area, next));
        self.area.bytes_mut()[..partial].copy_from_slice(&area.bytes()[whole..whole + partial]);
        // Without a thread (none could be started) the blocks are written by the next
        // settle, as after a failed write.
        let job = std::thread::Builder::new()
            .name("undo-writer".into())
            .spawn({
                let area = Arc::clone(&area);
                move || direct.write_all_at(&area.bytes()[..whole], base)
            })
            .ok();
        self.behind = Some(Behind {
            base,
            area,
            length: whole,
            job,
        });
        self.base += whole as u64;
        self.filled = partial;
        Ok(())
    }

    /// Waits for the write behind; one that failed is written again, here.
    fn settle(&mut self, file: &File) -> io::Result<()> {
        let Some(behind) = self.behind.as_mut() else {
            return Ok(());
        };
        let written = match behind.job.take() {
            Some(job) => job
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("The undo writer panicked"))),
            None => Err(io::Error::other("An earlier write failed")),
        };
        if written.is_err() {
            let bytes = &behind.area.bytes()[..behind.length];
            write_blocks(&mut self.direct, file, bytes, behind.base)?;
        }
        if let Some(behind) = self.behind.take() {
            self.spare = Arc::into_inner(behind.area);
        }
        Ok(())
    }

    /// Writes the staged whole blocks here and now; the partial last one stays staged.
    fn write_whole_blocks(&mut self, file: &File) -> io::Result<()> {
        let whole = self.filled - self.filled % BLOCK;
        if whole > 0 {
            self.direct_handle()?;
            write_blocks(
                &mut self.direct,
                file,
                &self.area.bytes()[..whole],
                self.base,
            )?;
            self.keep_partial_block();
        }
        Ok(())
    }

    /// Drops the staged whole blocks (written): the partial one moves to the front.
    fn keep_partial_block(&mut self) {
        let whole = self.filled - self.filled % BLOCK;
        self.area.bytes_mut().copy_within(whole..self.filled, 0);
        self.base += whole as u64;
        self.filled -= whole;
    }

    /// Writes everything staged to `file`: the whole blocks directly, the partial last
    /// block through the page cache (so the file ends where the records do), then
    /// shrinks the buffers to that block: an idle segment holds no staging memory.
    pub(super) fn write_out(&mut self, file: &File) -> io::Result<()> {
        self.settle(file)?;
        if self.unwritten {
            self.write_whole_blocks(file)?;
            file.write_all_at(&self.area.bytes()[..self.filled], self.base)?;
            self.unwritten = false;
        }
        self.spare = None;
        if self.area.capacity > BLOCK {
            self.replace_area(Area::new(BLOCK));
        }
        Ok(())
    }

    /// The direct handle, opened on first use; `None` if direct writes are refused.
    fn direct_handle(&mut self) -> io::Result<Option<&Arc<File>>> {
        if let Direct::Unopened = self.direct {
            self.direct = match open_direct(&self.path)? {
                Some(direct) => Direct::Open(Arc::new(direct)),
                None => Direct::Refused,
            };
        }
        Ok(match &self.direct {
            Direct::Open(direct) => Some(direct),
            Direct::Unopened | Direct::Refused => None,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // No write may reach the file after the segment is gone.
        if let Some(job) = self.behind.take().and_then(|behind| behind.job) {
            let _ = job.join();
        }
    }
}

/// Writes whole blocks `bytes` at `offset` (block-aligned), directly unless `direct`
/// says refused; a direct write refused (EINVAL) makes it so and goes through `file`.
fn write_blocks(direct: &mut Direct, file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    if let Direct::Open(handle) = direct {
        match handle.write_all_at(bytes, offset) {
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(error = %error, "Direct writes of undo data refused; writing through the page cache");
                *direct = Direct::Refused;
            }
            written => return written,
        }
    }
    file.write_all_at(bytes, offset)
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
