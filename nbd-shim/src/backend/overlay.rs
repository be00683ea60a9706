//! A copy-on-write overlay: a writable disk over a frozen, read-only base.
//!
//! Used for test failovers (a recovery point served as a writable disk whose writes are
//! thrown away) and for a failed-over disk until the failover is completed (the
//! overlay's blocks are then merged into the real disk, see [`Overlay::extents`]).
//!
//! Contracts:
//! - The base ([`OverlayBase`]) is only ever read. Keeping it frozen while the disk under
//!   it changes is the base's job.
//! - The disk is cut into blocks of `block_size` bytes (the last one may be shorter).
//!   Each block is in one of three states: **Base** (reads from the base), **Data**
//!   (reads from the overlay file, at the same offset) or **Zero** (reads as zeroes,
//!   nothing stored). The states live in memory only, as two bitsets of atomic words
//!   (`held`, `zero`: two bits per block, 64 MiB for 1 TiB at 4 KiB blocks). The
//!   overlay file alone does not say which of its blocks are valid, so **an overlay does
//!   not survive a crash or a restart**: it is discarded, which is fine for a throwaway.
//! - Writes of whole blocks go straight to the file. A partial block is read, patched and
//!   written whole (read-modify-write) under a striped per-block lock, so concurrent
//!   writes to different bytes of one block never lose each other. Overlapping
//!   concurrent requests leave an unspecified mix, as NBD allows.
//! - A block's state is published only after its data is in the file (stores with
//!   `Release`; readers load `held` then `zero` with `Acquire`), so a reader never sees
//!   Data for a block whose data is not written yet.
//! - WRITE_ZEROES and TRIM turn whole blocks into Zero and punch them out of the file
//!   (best effort: the file's content of a Zero block is never read); partial blocks are
//!   written as zero bytes. Zeroing never writes more than the partial edges, so
//!   FAST_ZERO always succeeds; NO_HOLE is not honoured (a throwaway file reserves
//!   nothing, and `base:allocation` reports Zero blocks as holes).
//! - FLUSH and FUA are `fdatasync` of the overlay file.
//! - Dropping an [`Overlay`] keeps its file; [`Overlay::discard`] removes it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::fcntl::{fallocate, FallocateFlags};

use super::{BlockDevice, BlockSizeLimits, Extent, ZeroMode};
use crate::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};

/// Smallest overlay block: a sector.
const MIN_BLOCK: u32 = 512;
/// Largest overlay block; a partial write copies at most this much.
const MAX_BLOCK: u32 = 1 << 20;
/// Largest request advertised: the spec's interoperable maximum, as [`super::ImageFile`].
const MAX_REQUEST: u32 = 32 << 20;
/// Number of read-modify-write locks; block `b` uses lock `b % LOCK_STRIPES`.
const LOCK_STRIPES: u64 = 1024;
/// Most extents one `allocation` call reports; the client asks again for the rest.
const MAX_ALLOCATION_EXTENTS: usize = 1024;
/// Blocks per bitset word.
const WORD_BITS: u64 = u64::BITS as u64;

/// What an overlay reads where it holds nothing: a frozen, read-only view of a disk.
///
/// Called from many threads at once; its content and size must not change while an
/// overlay uses it.
pub trait OverlayBase: Send + Sync {
    /// Size in bytes; the overlay has the same size.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`. The range is within [`OverlayBase::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `base:allocation` extents with the shape rules of [`BlockDevice::allocation`]:
    /// covering at least the first byte of `offset..offset + len`, in order,
    /// contiguous, none past the end. `NBD_STATE_ZERO` must only mark zeroes.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
}

/// A run of blocks an overlay holds, from [`Overlay::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayExtent {
    /// Byte offset in the disk (a multiple of the block size).
    pub offset: u64,
    /// Length in bytes (whole blocks, except at the end of the disk); never zero.
    pub length: u64,
    /// The range reads as zeroes and nothing is stored; otherwise its data is in the
    /// overlay file (read it with [`BlockDevice::read_at`]).
    pub zero: bool,
}

/// State of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockState {
    /// Not held: reads from the base.
    Base,
    /// Held, data in the overlay file.
    Data,
    /// Held, reads as zeroes.
    Zero,
}

/// A writable disk made of a read-only base and a sparse overlay file.
pub struct Overlay {
    base: Arc<dyn OverlayBase>,
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u64,
    blocks: u64,
    /// Bit per block: the overlay holds it (Data or Zero).
    held: Box<[AtomicU64]>,
    /// Bit per block: a held block reads as zeroes. Clear whenever `held` is, except
    /// briefly while a block becomes Zero.
    zero: Box<[AtomicU64]>,
    /// Serialise read-modify-writes of partial blocks.
    locks: Box<[Mutex<()>]>,
}

impl fmt::Debug for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .finish_non_exhaustive()
    }
}

/// Byte counts as u64 (usize is at most 64 bits on every target this crate builds for).
fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// An in-memory index or length; callers only pass values bounded by a live buffer or
/// bitset, which fit a usize.
fn idx(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY)
    ) || err.kind() == io::ErrorKind::Unsupported
}

/// Sets (or clears) the bits of blocks `first..end`. Each word is one atomic operation
/// with `Release`, so whatever was written before is visible to a reader that sees it.
fn update_bits(bits: &[AtomicU64], first: u64, end: u64, set: bool) {
    let mut block = first;
    while block < end {
        let word = block / WORD_BITS;
        let low = block % WORD_BITS;
        // high is in 1..=64: the bits of this word inside the range are low..high.
        let high = (end - word * WORD_BITS).min(WORD_BITS);
        let mask = (u64::MAX << low) & (u64::MAX >> (WORD_BITS - high));
        let cell = &bits[idx(word)];
        if set {
            cell.fetch_or(mask, Ordering::Release);
        } else {
            cell.fetch_and(!mask, Ordering::Release);
        }
        block = word * WORD_BITS + high;
    }
}

/// Appends an extent, merging it into the last one when the flags match.
fn push_extent(extents: &mut Vec<Extent>, length: u64, flags: u32) {
    if length == 0 {
        return;
    }
    match extents.last_mut() {
        Some(last) if last.flags == flags => last.length += length,
        _ => extents.push(Extent { length, flags }),
    }
}

/// The blocks a byte range touches, split into whole blocks and partial edges.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    /// Whole blocks, `first..end` (may be empty).
    whole: (u64, u64),
    /// Partially covered blocks (at most two: head and tail).
    partial: [Option<u64>; 2],
}

impl Overlay {
    /// Creates the overlay file at `path` (which must not exist) as a sparse file of the
    /// base's size, readable and writable by the owner only. `block_size` is the
    /// granularity of the overlay: a power of two from 512 to 1 MiB (4096 suits most
    /// guests).
    pub fn create(base: Arc<dyn OverlayBase>, path: &Path, block_size: u32) -> io::Result<Self> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "Overlay block size {block_size} is not a power of two in {MIN_BLOCK}..={MAX_BLOCK}"
                ),
            ));
        }
        let size = base.size();
        let block_size = u64::from(block_size);
        let blocks = size.div_ceil(block_size);
        let words = usize::try_from(blocks.div_ceil(WORD_BITS)).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "Base too large for an overlay")
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        if let Err(err) = file.set_len(size) {
            // Do not leave a half-made overlay behind; the original error matters more.
            let _ = std::fs::remove_file(path);
            return Err(err);
        }
        let bitset = || (0..words).map(|_| AtomicU64::new(0)).collect();
        tracing::debug!(path = %path.display(), size, block_size, "created overlay");
        Ok(Overlay {
            base,
            file,
            path: path.to_owned(),
            size,
            block_size,
            blocks,
            held: bitset(),
            zero: bitset(),
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Path of the overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The overlay's block size.
    pub fn overlay_block_size(&self) -> u32 {
        u32::try_from(self.block_size).unwrap_or(MAX_BLOCK)
    }

    /// Runs of blocks the overlay holds (written or zeroed), in order, adjacent runs of
    /// the same kind merged. This is what a merge into the real disk must copy: zero
    /// extents as zeroes, the others from [`BlockDevice::read_at`] (whole blocks: a
    /// partial write copied the rest of its block from the base, so a merge writes
    /// those bytes back unchanged). The answer is a snapshot: writes completing
    /// meanwhile may or may not be in it, so a merge should run with writers stopped.
    pub fn extents(&self) -> Vec<OverlayExtent> {
        let mut extents = Vec::new();
        let mut block = 0;
        while block < self.blocks {
            let (state, end) = self.run(block, self.blocks);
            if state != BlockState::Base {
                let offset = self.block_start(block);
                extents.push(OverlayExtent {
                    offset,
                    length: self.block_end(end - 1) - offset,
                    zero: state == BlockState::Zero,
                });
            }
            block = end;
        }
        extents
    }

    /// Bytes the overlay holds (Data and Zero blocks).
    pub fn held_bytes(&self) -> u64 {
        let blocks: u64 = self
            .held
            .iter()
            .map(|word| u64::from(word.load(Ordering::Acquire).count_ones()))
            .sum();
        let mut bytes = blocks * self.block_size;
        if let Some(last) = self.blocks.checked_sub(1) {
            if self.run(last, self.blocks).0 != BlockState::Base {
                // The last block may be shorter than the others.
                bytes -= self.block_size - (self.block_end(last) - self.block_start(last));
            }
        }
        bytes
    }

    /// Closes the overlay and removes its file.
    pub fn discard(self) -> io::Result<()> {
        let path = self.path.clone();
        drop(self);
        std::fs::remove_file(&path)?;
        tracing::debug!(path = %path.display(), "discarded overlay");
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Range past the end of the overlay",
            )),
        }
    }

    fn block_start(&self, block: u64) -> u64 {
        block.saturating_mul(self.block_size).min(self.size)
    }

    fn block_end(&self, block: u64) -> u64 {
        self.block_start(block.saturating_add(1))
    }

    fn lock(&self, block: u64) -> MutexGuard<'_, ()> {
        self.locks[idx(block % LOCK_STRIPES)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The run of blocks starting at `first` that share its state: the state and the
    /// block after the run (at most `limit`). `first < limit <= blocks`; the run is
    /// never empty, even while the states change.
    fn run(&self, first: u64, limit: u64) -> (BlockState, u64) {
        let mut word = first / WORD_BITS;
        let mut mask = u64::MAX << (first % WORD_BITS);
        let mut state = None;
        loop {
            // held before zero: see the module doc.
            let held = self.held[idx(word)].load(Ordering::Acquire);
            let zero = self.zero[idx(word)].load(Ordering::Acquire);
            // The state comes from the same loads as the comparison, so the first block
            // always matches it.
            let state = *state.get_or_insert_with(|| {
                let bit = 1u64 << (first % WORD_BITS);
                match (held & bit != 0, zero & bit != 0) {
                    (false, _) => BlockState::Base,
                    (true, false) => BlockState::Data,
                    (true, true) => BlockState::Zero,
                }
            });
            let same = match state {
                BlockState::Base => !held,
                BlockState::Data => held & !zero,
                BlockState::Zero => held & zero,
            };
            let differ = !same & mask;
            let word_start = word * WORD_BITS;
            if differ != 0 {
                let end = word_start + u64::from(differ.trailing_zeros());
                return (state, end.min(limit));
            }
            if word_start + WORD_BITS >= limit {
                return (state, limit);
            }
            word += 1;
            mask = u64::MAX;
        }
    }

    /// Publishes blocks `first..end` as Data (their data is written) or Zero.
    fn mark(&self, first: u64, end: u64, state: BlockState) {
        match state {
            BlockState::Data => {
                update_bits(&self.zero, first, end, false);
                update_bits(&self.held, first, end, true);
            }
            BlockState::Zero => {
                update_bits(&self.zero, first, end, true);
                update_bits(&self.held, first, end, true);
            }
            // Blocks never go back to the base.
            BlockState::Base => {}
        }
    }

    /// The blocks `offset..offset + len` touches (`len > 0`, within the disk).
    fn span(&self, offset: u64, len: u64) -> Span {
        let end = offset + len;
        let first = offset / self.block_size;
        let last = (end - 1) / self.block_size;
        let whole_first = if offset == self.block_start(first) {
            first
        } else {
            first + 1
        };
        let whole_end = if end == self.block_end(last) {
            last + 1
        } else {
            last
        };
        let head = (whole_first != first).then_some(first);
        let tail = (whole_end == last && head != Some(last)).then_some(last);
        Span {
            whole: (whole_first, whole_end.max(whole_first)),
            partial: [head, tail],
        }
    }

    /// Fills `buf` from `offset` with the current content, one I/O per run of blocks.
    fn read_content(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + len64(buf.len());
        if end == offset {
            return Ok(());
        }
        let limit = (end - 1) / self.block_size + 1;
        let mut block = offset / self.block_size;
        let mut at = offset;
        while at < end {
            let (state, run_end) = self.run(block, limit);
            let stop = self.block_start(run_end).min(end);
            let piece = &mut buf[idx(at - offset)..idx(stop - offset)];
            match state {
                BlockState::Base => self.base.read_at(piece, at)?,
                BlockState::Data => self.file.read_exact_at(piece, at)?,
                BlockState::Zero => piece.fill(0),
            }
            at = stop;
            block = run_end;
        }
        Ok(())
    }

    /// Read-modify-write of one block: `patch` (or `len` zeroes when `None`) lands `at`
    /// bytes into it.
    fn patch_block(
        &self,
        block: u64,
        at: usize,
        len: usize,
        patch: Option<&[u8]>,
    ) -> io::Result<()> {
        let start = self.block_start(block);
        let _guard = self.lock(block);
        let (state, _) = self.run(block, block + 1);
        match (state, patch) {
            (BlockState::Zero, None) => return Ok(()),
            // The rest of the block is already in the file.
            (BlockState::Data, Some(data)) => {
                return self.file.write_all_at(data, start + len64(at));
            }
            (BlockState::Data, None) => {
                return self.file.write_all_at(&vec![0u8; len], start + len64(at));
            }
            _ => {}
        }
        let mut content = vec![0u8; idx(self.block_end(block) - start)];
        if state == BlockState::Base {
            self.base.read_at(&mut content, start)?;
        }
        let target = &mut content[at..at + len];
        match patch {
            Some(data) => target.copy_from_slice(data),
            None => target.fill(0),
        }
        self.file.write_all_at(&content, start)?;
        self.mark(block, block + 1, BlockState::Data);
        Ok(())
    }

    /// Where partial block `block` meets the range `offset..end`: offset into the block
    /// and length.
    fn partial_part(&self, block: u64, offset: u64, end: u64) -> (u64, u64) {
        let from = self.block_start(block).max(offset);
        let to = self.block_end(block).min(end);
        (from, to - from)
    }

    fn zero_range(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let span = self.span(offset, len);
        for block in span.partial.into_iter().flatten() {
            let (from, n) = self.partial_part(block, offset, offset + len);
            let at = idx(from - self.block_start(block));
            self.patch_block(block, at, idx(n), None)?;
        }
        let (first, end) = span.whole;
        if first < end {
            let start = self.block_start(first);
            let stop = self.block_end(end - 1);
            // Reclaims space only: the file's content of a Zero block is never read.
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(
                self.file.as_raw_fd(),
                punch,
                to_off(start)?,
                to_off(stop - start)?,
            )
            .map_err(io::Error::from)
            {
                Err(err) if !is_unsupported(&err) => return Err(err),
                _ => {}
            }
            self.mark(first, end, BlockState::Zero);
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn block_size(&self) -> BlockSizeLimits {
        BlockSizeLimits {
            minimum: 1,
            preferred: self.overlay_block_size(),
            maximum: MAX_REQUEST,
        }
    }

    fn can_trim(&self) -> bool {
        true
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn can_multi_conn(&self) -> bool {
        // One descriptor, positioned I/O: fdatasync covers every connection's writes.
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, len64(buf.len()))?;
        self.read_content(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let len = len64(buf.len());
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let span = self.span(offset, len);
        for block in span.partial.into_iter().flatten() {
            let (from, n) = self.partial_part(block, offset, offset + len);
            let data = &buf[idx(from - offset)..idx(from - offset + n)];
            self.patch_block(
                block,
                idx(from - self.block_start(block)),
                data.len(),
                Some(data),
            )?;
        }
        let (first, end) = span.whole;
        if first < end {
            let start = self.block_start(first);
            let stop = self.block_end(end - 1);
            self.file
                .write_all_at(&buf[idx(start - offset)..idx(stop - offset)], start)?;
            self.mark(first, end, BlockState::Data);
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode, fua: bool) -> io::Result<()> {
        // Both modes are served the same way: see the module doc.
        self.zero_range(offset, len, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // A trimmed range must read back as zeroes, so it is zeroed.
        self.zero_range(offset, len, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // A hint: nothing worth prefetching that the page cache does not do anyway.
        self.check_range(offset, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        let limit = (end - 1) / self.block_size + 1;
        let mut extents = Vec::new();
        let mut block = offset / self.block_size;
        let mut at = offset;
        while at < end && extents.len() < MAX_ALLOCATION_EXTENTS {
            let (state, run_end) = self.run(block, limit);
            let stop = self.block_start(run_end).min(end);
            match state {
                BlockState::Data => push_extent(&mut extents, stop - at, 0),
                BlockState::Zero => {
                    push_extent(&mut extents, stop - at, NBD_STATE_HOLE | NBD_STATE_ZERO);
                }
                BlockState::Base => {
                    let want = stop - at;
                    let mut covered = 0;
                    for extent in self.base.allocation(at, want)? {
                        if extent.length == 0 || covered == want {
                            break;
                        }
                        let piece = extent.length.min(want - covered);
                        push_extent(&mut extents, piece, extent.flags);
                        covered += piece;
                    }
                    if covered == 0 {
                        // A base that answers nothing: "allocated" is always true.
                        push_extent(&mut extents, want, 0);
                    } else if covered < want {
                        // The base answered for less (its own cap): stop here so the
                        // extents stay contiguous; the client asks again.
                        break;
                    }
                }
            }
            at = stop;
            block = run_end;
        }
        extents.truncate(MAX_ALLOCATION_EXTENTS);
        Ok(extents)
    }
}

#[cfg(test)]
mod tests;
