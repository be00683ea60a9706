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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::hash::{DefaultHasher, Hasher};
    use std::os::unix::fs::MetadataExt;

    const HOLE_ZERO: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
    const ZERO_MODE: ZeroMode = ZeroMode {
        may_trim: true,
        fast_only: false,
    };

    /// An in-memory base. `allocation` reports each `granularity` chunk as a hole when
    /// it is all zeroes, and answers at most `max_extents` extents (so the overlay meets
    /// short answers). A `slow` base takes a while to read, like a real one, which
    /// widens the windows concurrent read-modify-writes race in.
    struct MemBase {
        data: Vec<u8>,
        granularity: u64,
        max_extents: usize,
        slow: bool,
    }

    impl MemBase {
        fn flags_at(&self, at: u64) -> u32 {
            let start = at / self.granularity * self.granularity;
            let end = (start + self.granularity).min(self.size());
            if self.data[idx(start)..idx(end)].iter().all(|&b| b == 0) {
                HOLE_ZERO
            } else {
                0
            }
        }
    }

    impl OverlayBase for MemBase {
        fn size(&self) -> u64 {
            len64(self.data.len())
        }

        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let start = idx(offset);
            let source = start
                .checked_add(buf.len())
                .and_then(|end| self.data.get(start..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            if self.slow {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            buf.copy_from_slice(source);
            Ok(())
        }

        fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            assert!(len > 0 && offset + len <= self.size(), "{offset} + {len}");
            let end = offset + len;
            let mut extents = Vec::new();
            let mut at = offset;
            while at < end {
                let stop = ((at / self.granularity + 1) * self.granularity).min(end);
                let flags = self.flags_at(at);
                if extents.len() == self.max_extents
                    && extents.last().is_some_and(|e: &Extent| e.flags != flags)
                {
                    break;
                }
                push_extent(&mut extents, stop - at, flags);
                at = stop;
            }
            Ok(extents)
        }
    }

    /// A base read from a file opened read-only.
    struct FileBase {
        file: File,
        size: u64,
    }

    impl OverlayBase for FileBase {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }
        fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
            Ok(vec![Extent {
                length: len.min(self.size - offset),
                flags: 0,
            }])
        }
    }

    /// Base content: 256-byte chunks, each all zeroes or a pattern, chosen by `seed`.
    fn base_content(size: usize, seed: u64) -> Vec<u8> {
        (0..size)
            .map(|i| {
                let chunk = i / 256;
                if (seed >> (chunk % 64)) & 1 == 0 {
                    0
                } else {
                    u8::try_from((i * 7 + chunk) % 255).unwrap() + 1
                }
            })
            .collect()
    }

    fn mem_overlay(
        dir: &tempfile::TempDir,
        data: Vec<u8>,
        block: u32,
        max_extents: usize,
    ) -> (Arc<MemBase>, Overlay) {
        let base = Arc::new(MemBase {
            data,
            granularity: 256,
            max_extents,
            slow: false,
        });
        let overlay = Overlay::create(base.clone(), &dir.path().join("overlay"), block).unwrap();
        (base, overlay)
    }

    /// The reference: what the disk reads and which blocks the overlay holds.
    struct Model {
        current: Vec<u8>,
        states: Vec<BlockState>,
        block: usize,
    }

    impl Model {
        fn new(base: &[u8], block: u32) -> Self {
            let block = idx(u64::from(block));
            Model {
                current: base.to_vec(),
                states: vec![BlockState::Base; base.len().div_ceil(block)],
                block,
            }
        }

        fn bounds(&self, block: usize) -> (usize, usize) {
            let start = block * self.block;
            (start, (start + self.block).min(self.current.len()))
        }

        fn touched(&self, offset: usize, len: usize) -> std::ops::RangeInclusive<usize> {
            if len == 0 {
                #[allow(clippy::reversed_empty_ranges)]
                return 1..=0;
            }
            offset / self.block..=(offset + len - 1) / self.block
        }

        fn write(&mut self, offset: usize, data: &[u8]) {
            self.current[offset..offset + data.len()].copy_from_slice(data);
            for block in self.touched(offset, data.len()) {
                self.states[block] = BlockState::Data;
            }
        }

        fn zero(&mut self, offset: usize, len: usize) {
            self.current[offset..offset + len].fill(0);
            for block in self.touched(offset, len) {
                let (start, end) = self.bounds(block);
                if offset <= start && end <= offset + len {
                    self.states[block] = BlockState::Zero;
                } else if self.states[block] != BlockState::Zero {
                    self.states[block] = BlockState::Data;
                }
            }
        }

        fn extents(&self) -> Vec<OverlayExtent> {
            let mut extents: Vec<OverlayExtent> = Vec::new();
            for (block, &state) in self.states.iter().enumerate() {
                if state == BlockState::Base {
                    continue;
                }
                let (start, end) = self.bounds(block);
                let zero = state == BlockState::Zero;
                match extents.last_mut() {
                    Some(last)
                        if last.zero == zero && last.offset + last.length == len64(start) =>
                    {
                        last.length += len64(end - start);
                    }
                    _ => extents.push(OverlayExtent {
                        offset: len64(start),
                        length: len64(end - start),
                        zero,
                    }),
                }
            }
            extents
        }
    }

    /// Checks the shape and truth of `allocation(offset, len)` against the model.
    fn check_allocation(overlay: &Overlay, base: &MemBase, model: &Model, offset: u64, len: u64) {
        let extents = overlay.allocation(offset, len).unwrap();
        if len == 0 {
            assert!(extents.is_empty());
            return;
        }
        assert!(!extents.is_empty(), "no extent for {offset}+{len}");
        let mut at = offset;
        for extent in &extents {
            assert!(extent.length > 0);
            let stop = at + extent.length;
            assert!(stop <= offset + len, "{extents:?} past {offset}+{len}");
            for byte in at..stop {
                let expected = match model.states[idx(byte) / model.block] {
                    BlockState::Data => 0,
                    BlockState::Zero => HOLE_ZERO,
                    BlockState::Base => base.flags_at(byte),
                };
                assert_eq!(extent.flags, expected, "byte {byte} in {extents:?}");
                if extent.flags & NBD_STATE_ZERO != 0 {
                    assert_eq!(model.current[idx(byte)], 0, "byte {byte}");
                }
            }
            at = stop;
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Read,
        Write,
        Zero,
        Trim,
        Allocation,
        Flush,
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            2 => Just(Kind::Read),
            4 => Just(Kind::Write),
            2 => Just(Kind::Zero),
            1 => Just(Kind::Trim),
            2 => Just(Kind::Allocation),
            1 => Just(Kind::Flush),
        ]
    }

    /// An operation's range: anywhere, up to four blocks long; `aligned` snaps it to
    /// block boundaries (the end may still be the disk's unaligned end).
    fn resolve(size: u64, block: u64, a: u64, b: u64, aligned: bool) -> (u64, u64) {
        let mut offset = a % (size + 1);
        if aligned {
            offset = offset / block * block;
        }
        let room = (size - offset).min(4 * block);
        let mut len = b % (room + 1);
        if aligned {
            len = (len.div_ceil(block) * block).min(size - offset);
        }
        (offset, len)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn behaves_like_the_model(
            block in prop_oneof![Just(512u32), Just(1024), Just(4096)],
            blocks in 1u64..20,
            tail in 0u64..4096,
            seed in any::<u64>(),
            max_extents in prop_oneof![Just(1usize), Just(3), Just(1000)],
            ops in proptest::collection::vec(
                (kind(), any::<u64>(), any::<u64>(), any::<bool>(), any::<u8>()),
                1..40,
            ),
        ) {
            let size = blocks * u64::from(block) + tail % u64::from(block);
            let dir = tempfile::tempdir().unwrap();
            let data = base_content(idx(size), seed);
            let (base, overlay) = mem_overlay(&dir, data.clone(), block, max_extents);
            let mut model = Model::new(&data, block);
            let block64 = u64::from(block);
            for (kind, a, b, aligned, fill) in ops {
                let (offset, len) = resolve(size, block64, a, b, aligned);
                let (at, n) = (idx(offset), idx(len));
                match kind {
                    Kind::Read => {
                        let mut buf = vec![0xee; n];
                        overlay.read_at(&mut buf, offset).unwrap();
                        prop_assert_eq!(&buf[..], &model.current[at..at + n]);
                    }
                    Kind::Write => {
                        let buf: Vec<u8> = (0..n)
                            .map(|i| fill.wrapping_add(u8::try_from(i % 199).unwrap()))
                            .collect();
                        overlay.write_at(&buf, offset, fill % 5 == 0).unwrap();
                        model.write(at, &buf);
                    }
                    Kind::Zero => {
                        let mode = ZeroMode { may_trim: fill % 2 == 0, fast_only: fill % 3 == 0 };
                        overlay.write_zeroes(offset, len, mode, fill % 5 == 0).unwrap();
                        model.zero(at, n);
                    }
                    Kind::Trim => {
                        overlay.trim(offset, len, fill % 5 == 0).unwrap();
                        model.zero(at, n);
                    }
                    Kind::Allocation => check_allocation(&overlay, &base, &model, offset, len),
                    Kind::Flush => overlay.flush().unwrap(),
                }
            }
            let mut all = vec![0xee; idx(size)];
            overlay.read_at(&mut all, 0).unwrap();
            prop_assert_eq!(&all, &model.current);
            prop_assert_eq!(overlay.extents(), model.extents());
            let held: u64 = model.extents().iter().map(|e| e.length).sum();
            prop_assert_eq!(overlay.held_bytes(), held);
            check_allocation(&overlay, &base, &model, 0, size);
            // Whole-disk allocation, asked again from where each answer stopped.
            let mut at = 0;
            while at < size {
                let extents = overlay.allocation(at, size - at).unwrap();
                at += extents.iter().map(|e| e.length).sum::<u64>();
            }
            prop_assert_eq!(&base.data, &data);
        }

        #[test]
        fn any_range_is_checked_without_panicking(offset in any::<u64>(), len in any::<u64>()) {
            let dir = tempfile::tempdir().unwrap();
            let (_, overlay) = mem_overlay(&dir, vec![1; 5000], 512, 10);
            let inside = offset.checked_add(len).is_some_and(|end| end <= 5000);
            prop_assert_eq!(overlay.allocation(offset, len).is_ok(), inside);
            prop_assert_eq!(overlay.write_zeroes(offset, len, ZERO_MODE, false).is_ok(), inside);
            prop_assert_eq!(overlay.trim(offset, len, false).is_ok(), inside);
            prop_assert_eq!(overlay.cache(offset, len).is_ok(), inside);
            let short = len % 64;
            let inside = offset.checked_add(short).is_some_and(|end| end <= 5000);
            let mut buf = vec![0; idx(short)];
            prop_assert_eq!(overlay.read_at(&mut buf, offset).is_ok(), inside);
            prop_assert_eq!(overlay.write_at(&buf, offset, false).is_ok(), inside);
        }
    }

    #[test]
    fn create_checks_its_arguments_and_discard_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = Arc::new(MemBase {
            data: vec![3; 10_000],
            granularity: 256,
            max_extents: 10,
            slow: false,
        });
        for bad in [0, 256, 3000, 2 << 20] {
            let err = Overlay::create(base.clone(), &dir.path().join("x"), bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
        }
        assert!(!dir.path().join("x").exists());
        let path = dir.path().join("overlay");
        let overlay = Overlay::create(base.clone(), &path, 4096).unwrap();
        assert_eq!(overlay.path(), path);
        assert_eq!(overlay.size(), 10_000);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 10_000);
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.blocks(), 0, "created sparse");
        // The path is taken: a second overlay there is refused.
        let err = Overlay::create(base.clone(), &path, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        drop(overlay);
        assert!(path.exists(), "drop keeps the file");
        std::fs::remove_file(&path).unwrap();
        let overlay = Overlay::create(base, &path, 4096).unwrap();
        overlay.discard().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn an_empty_base_makes_an_empty_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let (_, overlay) = mem_overlay(&dir, Vec::new(), 4096, 10);
        overlay.read_at(&mut [], 0).unwrap();
        overlay.write_at(&[], 0, true).unwrap();
        overlay.write_zeroes(0, 0, ZERO_MODE, false).unwrap();
        overlay.trim(0, 0, false).unwrap();
        assert!(overlay.allocation(0, 0).unwrap().is_empty());
        assert!(overlay.allocation(0, 1).is_err());
        assert!(overlay.write_at(&[1], 0, false).is_err());
        assert!(overlay.extents().is_empty());
        assert_eq!(overlay.held_bytes(), 0);
    }

    #[test]
    fn advertises_a_writable_trimmable_device() {
        let dir = tempfile::tempdir().unwrap();
        let (_, overlay) = mem_overlay(&dir, vec![0; 8192], 4096, 10);
        assert!(!overlay.read_only());
        assert!(overlay.can_trim());
        assert!(overlay.can_fast_zero());
        assert!(overlay.can_multi_conn());
        assert_eq!(
            overlay.block_size(),
            BlockSizeLimits {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20
            }
        );
        assert_eq!(overlay.overlay_block_size(), 4096);
        overlay.cache(0, 8192).unwrap();
    }

    #[test]
    fn extents_and_held_bytes_follow_the_operations() {
        let dir = tempfile::tempdir().unwrap();
        // Five blocks of 512 and a 100-byte sixth.
        let (base, overlay) = mem_overlay(&dir, vec![9; 2660], 512, 10);
        assert!(overlay.extents().is_empty());
        assert_eq!(overlay.held_bytes(), 0);
        overlay.write_at(b"abc", 510, false).unwrap(); // blocks 0 and 1, partially
        overlay.write_zeroes(1024, 1024, ZERO_MODE, false).unwrap(); // blocks 2 and 3, whole
        overlay.trim(2560, 100, false).unwrap(); // the short last block, whole
        let expected = vec![
            OverlayExtent {
                offset: 0,
                length: 1024,
                zero: false,
            },
            OverlayExtent {
                offset: 1024,
                length: 1024,
                zero: true,
            },
            OverlayExtent {
                offset: 2560,
                length: 100,
                zero: true,
            },
        ];
        assert_eq!(overlay.extents(), expected);
        assert_eq!(overlay.held_bytes(), 2148);
        let mut buf = vec![0; 2660];
        overlay.read_at(&mut buf, 0).unwrap();
        assert!(buf[..510].iter().all(|&b| b == 9));
        assert_eq!(&buf[510..513], b"abc");
        assert!(buf[513..1024].iter().all(|&b| b == 9));
        assert!(buf[1024..2048].iter().all(|&b| b == 0));
        assert!(buf[2048..2560].iter().all(|&b| b == 9));
        assert!(buf[2560..].iter().all(|&b| b == 0));
        // Allocation: data, hole, the base's data, hole.
        assert_eq!(
            overlay.allocation(0, 2660).unwrap(),
            vec![
                Extent {
                    length: 1024,
                    flags: 0
                },
                Extent {
                    length: 1024,
                    flags: HOLE_ZERO
                },
                Extent {
                    length: 512,
                    flags: 0
                },
                Extent {
                    length: 100,
                    flags: HOLE_ZERO
                },
            ]
        );
        // A partial zeroing of a Zero block keeps it Zero; of a Data block, Data.
        overlay.write_zeroes(1100, 10, ZERO_MODE, true).unwrap();
        overlay.write_zeroes(0, 10, ZERO_MODE, false).unwrap();
        assert_eq!(overlay.extents(), expected);
        // Writing into a Zero block makes it Data, zeroes around the write.
        overlay.write_at(b"z", 1500, false).unwrap();
        overlay.read_at(&mut buf[..512], 1024).unwrap();
        assert!(buf[..512]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == if i == 476 { b'z' } else { 0 }));
        assert_eq!(
            overlay.extents()[..2],
            [
                OverlayExtent {
                    offset: 0,
                    length: 1536,
                    zero: false,
                },
                OverlayExtent {
                    offset: 1536,
                    length: 512,
                    zero: true,
                },
            ]
        );
        assert_eq!(base.data, vec![9; 2660]);
    }

    #[test]
    fn whole_block_zeroing_punches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, overlay) = mem_overlay(&dir, vec![1; 4 << 20], 4096, 10);
        overlay.write_at(&vec![2; 2 << 20], 1 << 20, true).unwrap();
        let written = std::fs::metadata(overlay.path()).unwrap().blocks();
        assert!(written >= 4096, "{written} sectors allocated");
        overlay.trim(1 << 20, 2 << 20, false).unwrap();
        let after = std::fs::metadata(overlay.path()).unwrap().blocks();
        if after >= written {
            eprintln!("the filesystem cannot punch holes; skipping the space check");
        }
        let mut buf = vec![7; 2 << 20];
        overlay.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(overlay.held_bytes(), 2 << 20);
    }

    #[test]
    fn allocation_stops_where_a_short_base_answer_stops() {
        let dir = tempfile::tempdir().unwrap();
        // Chunks of 256: data, zero, data, zero...; the base answers one extent at a time.
        let data: Vec<u8> = (0..4096).map(|i| u8::from((i / 256) % 2 == 0)).collect();
        let (_, overlay) = mem_overlay(&dir, data, 512, 1);
        overlay.write_at(&[5; 512], 1024, false).unwrap();
        assert_eq!(
            overlay.allocation(0, 4096).unwrap(),
            vec![Extent {
                length: 256,
                flags: 0
            }]
        );
        // Hole (base), data (overlay) and the base's data merge; the base's one-extent
        // answer for blocks 3 and 4 ends the reply there.
        assert_eq!(
            overlay.allocation(768, 2048).unwrap(),
            vec![
                Extent {
                    length: 256,
                    flags: HOLE_ZERO
                },
                Extent {
                    length: 768,
                    flags: 0
                },
            ]
        );
    }

    fn file_checksum(path: &Path) -> u64 {
        let mut hasher = DefaultHasher::new();
        hasher.write(&std::fs::read(path).unwrap());
        hasher.finish()
    }

    #[test]
    fn the_base_file_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.img");
        std::fs::write(&base_path, base_content(300_000, 0xdead_beef_f00d)).unwrap();
        let before = file_checksum(&base_path);
        let base = Arc::new(FileBase {
            file: File::open(&base_path).unwrap(),
            size: 300_000,
        });
        let overlay = Overlay::create(base, &dir.path().join("overlay"), 4096).unwrap();
        let mut model = Model::new(&std::fs::read(&base_path).unwrap(), 4096);
        for step in 0..200u64 {
            let offset = (step * 7919) % 290_000;
            let len = (step * 104_729) % 10_000;
            match step % 4 {
                0 | 1 => {
                    let buf = vec![u8::try_from(step % 256).unwrap(); idx(len)];
                    overlay.write_at(&buf, offset, false).unwrap();
                    model.write(idx(offset), &buf);
                }
                2 => {
                    overlay.write_zeroes(offset, len, ZERO_MODE, false).unwrap();
                    model.zero(idx(offset), idx(len));
                }
                _ => {
                    overlay.trim(offset, len, false).unwrap();
                    model.zero(idx(offset), idx(len));
                }
            }
        }
        overlay.flush().unwrap();
        let mut all = vec![0; 300_000];
        overlay.read_at(&mut all, 0).unwrap();
        assert_eq!(all, model.current);
        assert_eq!(overlay.extents(), model.extents());
        assert_eq!(file_checksum(&base_path), before);
    }

    /// Writers own interleaved, unaligned 37-byte chunks of the same blocks (every
    /// ninth chunk belongs to nobody) and start together on a slow base, so their
    /// read-modify-writes of a block race; without the block locks writes get lost.
    /// A reader checks meanwhile that nobody's chunks always read as the base, which
    /// fails if a block is published as Data before its data is written.
    #[test]
    fn concurrent_writes_to_one_block_keep_each_other() {
        const CHUNK: usize = 37;
        const WRITERS: usize = 8;
        const ROUNDS: usize = 6;
        const SIZE: usize = 64 * 512;
        let value =
            |writer: usize, round: usize| u8::try_from(writer * 31 + round * 7 + 1).unwrap();
        let owner = |byte: usize| {
            let chunk = byte / CHUNK;
            (chunk < SIZE / CHUNK && chunk % (WRITERS + 1) < WRITERS)
                .then_some(chunk % (WRITERS + 1))
        };
        let base: Vec<u8> = (0..SIZE)
            .map(|i| u8::try_from(i % 251).unwrap() | 0x80)
            .collect();
        for iteration in 0..16 {
            let dir = tempfile::tempdir().unwrap();
            let slow = Arc::new(MemBase {
                data: base.clone(),
                granularity: 256,
                max_extents: 10,
                slow: true,
            });
            let overlay = Overlay::create(slow, &dir.path().join("overlay"), 512).unwrap();
            let done = std::sync::atomic::AtomicBool::new(false);
            let start = std::sync::Barrier::new(WRITERS);
            std::thread::scope(|scope| {
                let reader = scope.spawn(|| {
                    let mut buf = vec![0; SIZE];
                    let mut reads = 0;
                    while !done.load(Ordering::Acquire) || reads == 0 {
                        overlay.read_at(&mut buf, 0).unwrap();
                        for (byte, (&got, &want)) in buf.iter().zip(&base).enumerate() {
                            if owner(byte).is_none() {
                                assert_eq!(got, want, "unowned byte {byte}");
                            }
                        }
                        reads += 1;
                    }
                });
                let writers: Vec<_> = (0..WRITERS)
                    .map(|writer| {
                        let overlay = &overlay;
                        let start = &start;
                        scope.spawn(move || {
                            // Together, so the first writes of each block race.
                            start.wait();
                            for round in 0..ROUNDS {
                                let chunks = (writer..SIZE / CHUNK).step_by(WRITERS + 1);
                                for chunk in chunks {
                                    let offset = len64(chunk * CHUNK);
                                    if round % 4 == 2 {
                                        let len = len64(CHUNK);
                                        overlay
                                            .write_zeroes(offset, len, ZERO_MODE, false)
                                            .unwrap();
                                    } else {
                                        let data = [value(writer, round); CHUNK];
                                        overlay.write_at(&data, offset, false).unwrap();
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                for writer in writers {
                    writer.join().unwrap();
                }
                done.store(true, Ordering::Release);
                reader.join().unwrap();
            });
            let mut buf = vec![0; SIZE];
            overlay.read_at(&mut buf, 0).unwrap();
            for (byte, &got) in buf.iter().enumerate() {
                let want = owner(byte).map_or(base[byte], |writer| value(writer, ROUNDS - 1));
                assert_eq!(got, want, "iteration {iteration}, byte {byte}");
            }
        }
    }
}
