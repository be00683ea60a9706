//! Recovery history: earlier states of a replica's disks, kept as undo data.
//!
//! A recovery point is a state the disks had once a delta was applied. The latest point
//! is the disks themselves. Every additional point owns an undo *segment*: the content,
//! as of that point, of each block first overwritten after it and before the next point
//! was taken (or up to now, for the newest). A point's state is, block by block, the
//! first segment from its own onwards that holds the block, otherwise the disks. So
//! history costs each apply one read and one append per block it overwrites for the
//! first time since the newest point, never a copy of the disks.
//!
//! Disks added later: a point taken before a disk was added to the replica reads that
//! disk as zeroes, its content before any write reached it. The point's segment holds
//! the added disk whole as a zero run, in its index only (rebuilt on every open from
//! the disk count of the segment's header), so no capture saves the disk's blocks
//! there and nothing is written to history when a disk is added.
//!
//! Ageing out: the oldest point's segment is deleted (no later point reads it). Removing
//! a point with an older one (a test failover's temporary point) merges its segment into
//! the older point's: the blocks the older segment lacks are appended to it, which keeps
//! every remaining point's state.
//!
//! Durability: [`History::capture`] appends the undo data of the ranges a transfer is
//! about to overwrite (staged in memory, written to the segment file with `O_DIRECT`
//! as the staging buffer fills); [`History::sync`] writes out the rest and makes it
//! durable before the transfer's first write. Applying is idempotent, so after a crash
//! the re-apply captures again what was not synced, and nothing new for blocks held
//! already; a block captured but not yet overwritten holds the same bytes in the
//! segment as in the disk. Segment files are a header and checksummed records; a torn
//! tail (or the zero padding of a direct write) is cut when the segment is opened.
//!
//! Concurrency: the applier captures and applies while readers (a test failover's view
//! of a point) read. A reader holds the index's read lock from lookup to the end of its
//! disk read; a capture updates the index under the write lock before the apply writes
//! the disks, so a reader never sees an overwritten block as unchanged. The apply lock
//! ([`History::apply_guard`]) is held for a whole transfer, so a point taken by another
//! thread never starts between a transfer's capture and its writes.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use thiserror::Error;

use image_ops::apply::ReplicaDisk;
use image_ops::copy::{next_data, next_hole};

mod segment;
mod staging;

use segment::{Held, Segment};

/// Unit of undo data: a capture saves whole blocks of this size (the last block of a
/// disk may be shorter).
pub const UNDO_BLOCK: u64 = 4096;
/// Largest record: captures of longer runs are split.
const MAX_RECORD: u64 = 4 << 20;
/// Runs up to this long are read without asking where their holes are.
const SMALL_GAP: u64 = 256 << 10;

/// Errors of the recovery history.
#[derive(Debug, Error)]
pub enum HistoryError {
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
    /// A segment file is not one, or belongs to another point.
    #[error("Undo segment {path} is invalid: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No point with this id.
    #[error("No recovery point {0}")]
    NoSuchPoint(u64),
    /// Writing a replica disk failed.
    #[error("Cannot write a point's state to the replica disk")]
    Apply(#[from] image_ops::ApplyError),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HistoryError {
    let path = path.to_path_buf();
    move |source| HistoryError::Io { what, path, source }
}

/// Where a piece of a point's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The disk, as it is now.
    Disk,
    /// Zeroes (the block was a hole at the point).
    Zero,
    /// Segment `segment` (an index into the history's segments), from this file offset.
    Segment {
        /// Index of the segment, oldest first.
        segment: usize,
        /// Offset of the bytes in the segment file.
        at: u64,
    },
}

/// A piece of a disk at a point: `length` bytes at `offset`, read from `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the disk.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// Where they are.
    pub source: Source,
}

/// The undo segments of one replica, oldest point first.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    /// The disks' sizes, in group order; grows when disks are added.
    sizes: RwLock<Vec<u64>>,
    segments: RwLock<Vec<Segment>>,
    apply: Mutex<()>,
}

/// A read lock on the history: point reads resolved and performed under it see one
/// state.
#[derive(Debug)]
pub struct HistoryRead<'a> {
    segments: RwLockReadGuard<'a, Vec<Segment>>,
}

impl History {
    /// The path of point `point`'s segment in `dir`.
    fn segment_path(dir: &Path, point: u64) -> PathBuf {
        dir.join(format!("{point:016x}.undo"))
    }

    /// Opens the history in `dir` (created if missing) for disks of `sizes`, with the
    /// segments of `points` (oldest first); a point taken before some of the disks
    /// were added reads them as zeroes. Segment files of other points are deleted.
    /// Returns the history and the points whose state can no longer be read (their
    /// segment, or a later one, is missing or unreadable): the caller drops them.
    pub fn open(
        dir: &Path,
        sizes: Vec<u64>,
        points: &[u64],
    ) -> Result<(Self, Vec<u64>), HistoryError> {
        fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        let mut segments = Vec::new();
        let mut lost = Vec::new();
        for &point in points {
            let path = Self::segment_path(dir, point);
            match Segment::open(&path, point, sizes.len()) {
                Ok(mut segment) => {
                    let had = segment.held.len();
                    segment.add_disks(&sizes[had..]);
                    segments.push(segment);
                }
                Err(error) => {
                    tracing::warn!(point, error = %wire::error_chain(&error), "A recovery point's undo data is unreadable; it and older points are dropped");
                    // Older points read through this segment: they are lost too.
                    lost.extend(segments.drain(..).map(|s: Segment| s.point));
                    lost.push(point);
                }
            }
        }
        let keep: Vec<PathBuf> = segments.iter().map(|s| s.path.clone()).collect();
        for entry in fs::read_dir(dir).map_err(io_error("list", dir))?.flatten() {
            let path = entry.path();
            if !keep.contains(&path) {
                tracing::info!(path = %path.display(), "Removing undo data no recovery point refers to");
                let _ = fs::remove_file(&path);
            }
        }
        Ok((
            History {
                dir: dir.to_path_buf(),
                sizes: RwLock::new(sizes),
                segments: RwLock::new(segments),
                apply: Mutex::new(()),
            },
            lost,
        ))
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Segment>> {
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A consistent read of the history (see [`HistoryRead`]).
    pub fn read(&self) -> HistoryRead<'_> {
        HistoryRead {
            segments: self.segments.read().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Held for a whole apply (capture, sync, writes); see the module doc.
    pub fn apply_guard(&self) -> MutexGuard<'_, ()> {
        self.apply.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any point is kept (captures do something).
    pub fn is_active(&self) -> bool {
        !self.read().segments.is_empty()
    }

    /// Points kept, oldest first.
    pub fn points(&self) -> Vec<u64> {
        self.read().segments.iter().map(|s| s.point).collect()
    }

    /// Bytes of each point's segment, oldest first.
    pub fn sizes(&self) -> Vec<(u64, u64)> {
        self.read()
            .segments
            .iter()
            .map(|s| (s.point, s.len))
            .collect()
    }

    /// The disks' sizes, in group order.
    fn disk_sizes(&self) -> Vec<u64> {
        self.sizes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds disks of `sizes` after the others (disks added to the replica): every
    /// point kept so far reads them as zeroes (see the module doc), later points as
    /// they are. Nothing is written. The caller holds the apply guard.
    pub fn add_disks(&self, sizes: &[u64]) {
        let mut segments = self.write();
        for segment in segments.iter_mut() {
            segment.add_disks(sizes);
        }
        self.sizes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(sizes);
    }

    /// Makes the disks' current state point `point`: later captures go to its new,
    /// empty segment. The caller holds the apply guard (no transfer is mid-apply).
    pub fn add_point(&self, point: u64) -> Result<(), HistoryError> {
        let path = Self::segment_path(&self.dir, point);
        let segment = Segment::create(&path, point, self.disk_sizes().len())?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync", &self.dir))?;
        self.write().push(segment);
        Ok(())
    }

    /// Saves, in the newest point's segment, what `length` bytes at `offset` of disk
    /// `disk` hold now, for the blocks it does not hold yet. Call before overwriting
    /// them, then [`History::sync`] before the first write. Returns the bytes captured.
    pub fn capture(
        &self,
        disks: &[ReplicaDisk],
        disk: usize,
        offset: u64,
        length: u64,
    ) -> Result<u64, HistoryError> {
        let size = self.disk_sizes().get(disk).copied();
        let mut segments = self.write();
        let Some(segment) = segments.last_mut() else {
            return Ok(0);
        };
        let (Some(image), Some(size)) = (disks.get(disk), size) else {
            return Ok(0);
        };
        let start = offset - offset % UNDO_BLOCK;
        let end = offset
            .saturating_add(length)
            .div_ceil(UNDO_BLOCK)
            .saturating_mul(UNDO_BLOCK)
            .min(size);
        let mut captured = 0;
        for (gap_start, gap_end) in segment.gaps(disk, start, end) {
            if gap_end - gap_start <= SMALL_GAP {
                // Reading a small run costs less than asking where its holes are; a
                // run that reads as zeroes is kept as a hole all the same.
                let room = segment.stage(gap_end - gap_start)?;
                image
                    .file()
                    .read_exact_at(room, gap_start)
                    .map_err(io_error("read", image.path()))?;
                let zero = room.iter().all(|b| *b == 0);
                segment.commit(disk, gap_start, gap_end - gap_start, zero);
                if !zero {
                    captured += gap_end - gap_start;
                }
                continue;
            }
            let mut at = gap_start;
            while at < gap_end {
                // Records start on block boundaries: a hole counts from the block
                // after its first byte's.
                let data = next_data(image.file(), at).unwrap_or(gap_end).min(gap_end);
                let data = (data - data % UNDO_BLOCK).max(at);
                if data > at {
                    // A hole: nothing to read.
                    for piece in split(at, data) {
                        segment.append_zero(disk, piece.0, piece.1)?;
                    }
                    at = data;
                    continue;
                }
                // Holes are block-aligned on every filesystem that reports them; round
                // anyway so records stay whole blocks.
                let hole = next_hole(image.file(), at, gap_end)
                    .div_ceil(UNDO_BLOCK)
                    .saturating_mul(UNDO_BLOCK)
                    .min(gap_end);
                for (piece_start, piece_len) in split(at, hole) {
                    // Read straight into the segment's staging buffer: no copy.
                    let room = segment.stage(piece_len)?;
                    image
                        .file()
                        .read_exact_at(room, piece_start)
                        .map_err(io_error("read", image.path()))?;
                    segment.commit(disk, piece_start, piece_len, false);
                    captured += piece_len;
                }
                at = hole;
            }
        }
        Ok(captured)
    }

    /// Makes every capture durable. The write-out holds the index's write lock (it
    /// moves staged records), the `fdatasync` only its read lock.
    pub fn sync(&self) -> Result<(), HistoryError> {
        if let Some(segment) = self.write().last_mut() {
            segment.write_out()?;
        }
        if let Some(segment) = self.read().segments.last() {
            segment
                .file
                .sync_data()
                .map_err(io_error("sync", &segment.path))?;
        }
        Ok(())
    }

    /// Removes point `point`: [`History::merge_into_older`], then
    /// [`History::forget`]. The caller holds the apply guard.
    pub fn remove_point(&self, point: u64) -> Result<(), HistoryError> {
        self.merge_into_older(point)?;
        self.forget(point)
    }

    /// First step of removing point `point`: its segment's blocks that the older
    /// point's segment lacks are appended to it and synced, so the older point keeps
    /// its state without it. Harmless if repeated, or if the removal stops here (the
    /// older segment then answers for those blocks with the same bytes).
    pub fn merge_into_older(&self, point: u64) -> Result<(), HistoryError> {
        let mut segments = self.write();
        let index = segments
            .iter()
            .position(|s| s.point == point)
            .ok_or(HistoryError::NoSuchPoint(point))?;
        if index > 0 {
            let (older, rest) = segments.split_at_mut(index);
            let (previous, removed) = (&mut older[index - 1], &rest[0]);
            let mut appended = false;
            for disk in 0..removed.held.len() {
                let runs: Vec<(u64, Held)> =
                    removed.held[disk].iter().map(|(s, h)| (*s, *h)).collect();
                for (run_start, held) in runs {
                    for (gap_start, gap_end) in
                        previous.gaps(disk, run_start, run_start + held.length)
                    {
                        let length = gap_end - gap_start;
                        if held.zero {
                            previous.append_zero(disk, gap_start, length)?;
                        } else {
                            let room = previous.stage(length)?;
                            removed.read(room, held.data_at + (gap_start - run_start))?;
                            previous.commit(disk, gap_start, length, false);
                        }
                        appended = true;
                    }
                }
            }
            if appended {
                previous.sync()?;
            }
        }
        Ok(())
    }

    /// Last step of removing point `point` (once no record names it): drops its
    /// segment.
    pub fn forget(&self, point: u64) -> Result<(), HistoryError> {
        let mut segments = self.write();
        let index = segments
            .iter()
            .position(|s| s.point == point)
            .ok_or(HistoryError::NoSuchPoint(point))?;
        let removed = segments.remove(index);
        fs::remove_file(&removed.path).map_err(io_error("remove", &removed.path))?;
        Ok(())
    }

    /// Removes every point.
    pub fn clear(&self) -> Result<(), HistoryError> {
        let mut segments = self.write();
        for segment in segments.drain(..) {
            fs::remove_file(&segment.path).map_err(io_error("remove", &segment.path))?;
        }
        Ok(())
    }

    /// Writes point `point`'s state into the disks, through capture (the caller has
    /// added a point for the current state first, so the state left behind stays a
    /// point). Syncs the disks. The caller holds the apply guard and nothing else
    /// applies meanwhile. Returns the bytes written.
    pub fn roll_back(&self, disks: &[ReplicaDisk], point: u64) -> Result<u64, HistoryError> {
        let mut written = 0;
        let mut buffer = Vec::new();
        for disk in 0..self.disk_sizes().len() {
            let Some(image) = disks.get(disk) else {
                continue;
            };
            // The union of the runs from the point's segment onwards, except the
            // newest (the current state's, which these writes fill).
            let pieces = {
                let read = self.read();
                let first = read.index_of(point)?;
                let last = read.segments.len().saturating_sub(1);
                let mut starts: Vec<(u64, u64)> = Vec::new();
                for segment in &read.segments[first..last] {
                    starts.extend(segment.held[disk].iter().map(|(s, h)| (*s, s + h.length)));
                }
                starts.sort_unstable();
                let mut pieces = Vec::new();
                for (start, end) in merge_ranges(starts) {
                    pieces.extend(read.resolve_at(first, last, disk, start, end));
                }
                pieces
            };
            for piece in &pieces {
                self.capture(disks, disk, piece.offset, piece.length)?;
            }
            self.sync()?;
            for piece in pieces {
                match piece.source {
                    Source::Disk => {}
                    Source::Zero => {
                        image.apply(piece.offset, piece.length, tracker::ChangeData::Zero)?;
                    }
                    Source::Segment { segment, at } => {
                        buffer.resize(usize::try_from(piece.length).unwrap_or(0), 0);
                        self.read().segments[segment].read(&mut buffer, at)?;
                        image
                            .file()
                            .write_all_at(&buffer, piece.offset)
                            .map_err(io_error("write", image.path()))?;
                        written += piece.length;
                    }
                }
            }
            image.sync()?;
        }
        Ok(written)
    }
}

/// Splits `start..end` into records of at most [`MAX_RECORD`].
fn split(start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    (start..end)
        .step_by(usize::try_from(MAX_RECORD).unwrap_or(usize::MAX))
        .map(move |at| (at, (end - at).min(MAX_RECORD)))
}

/// Sorted ranges merged where they touch.
fn merge_ranges(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

impl HistoryRead<'_> {
    fn index_of(&self, point: u64) -> Result<usize, HistoryError> {
        self.segments
            .iter()
            .position(|s| s.point == point)
            .ok_or(HistoryError::NoSuchPoint(point))
    }

    /// Where the bytes `offset..offset + length` of disk `disk` at point `point` are.
    pub fn resolve(
        &self,
        point: u64,
        disk: usize,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Piece>, HistoryError> {
        let first = self.index_of(point)?;
        Ok(self.resolve_at(first, self.segments.len(), disk, offset, offset + length))
    }

    /// Resolves through segments `first..last` (then the disk).
    fn resolve_at(
        &self,
        first: usize,
        last: usize,
        disk: usize,
        start: u64,
        end: u64,
    ) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = Vec::new();
        let mut at = start;
        while at < end {
            let mut found = None;
            // Where the next segment in priority order starts holding something: the
            // disk (or a lower-priority segment) answers only up to there.
            let mut limit = end;
            for (index, segment) in self.segments[first..last].iter().enumerate() {
                if let Some((run_start, held)) = segment.holding(disk, at) {
                    let run_end = (run_start + held.length).min(limit);
                    let source = if held.zero {
                        Source::Zero
                    } else {
                        Source::Segment {
                            segment: first + index,
                            at: held.data_at + (at - run_start),
                        }
                    };
                    found = Some((run_end, source));
                    break;
                }
                limit = limit.min(segment.next_held(disk, at, limit));
            }
            let (piece_end, source) = found.unwrap_or((limit, Source::Disk));
            let piece = Piece {
                offset: at,
                length: piece_end - at,
                source,
            };
            match pieces.last_mut() {
                Some(last) if contiguous(last, &piece) => last.length += piece.length,
                _ => pieces.push(piece),
            }
            at = piece_end;
        }
        pieces
    }

    /// Fills `buf` with disk `disk` at point `point`, from `offset`, reading the
    /// current disk from `image` (a handle on that disk at `path`).
    pub fn read_at(
        &self,
        point: u64,
        disk: usize,
        (image, path): (&File, &Path),
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), HistoryError> {
        let pieces = self.resolve(point, disk, offset, buf.len() as u64)?;
        for piece in pieces {
            let from = usize::try_from(piece.offset - offset).unwrap_or(0);
            let to = from + usize::try_from(piece.length).unwrap_or(0);
            let target = &mut buf[from..to];
            match piece.source {
                Source::Disk => image
                    .read_exact_at(target, piece.offset)
                    .map_err(io_error("read", path))?,
                Source::Zero => target.fill(0),
                Source::Segment { segment, at } => self.segments[segment].read(target, at)?,
            }
        }
        Ok(())
    }
}

/// Whether `next` continues `last` from the same source.
fn contiguous(last: &Piece, next: &Piece) -> bool {
    last.offset + last.length == next.offset
        && match (last.source, next.source) {
            (Source::Disk, Source::Disk) | (Source::Zero, Source::Zero) => true,
            (Source::Segment { segment: a, at: x }, Source::Segment { segment: b, at: y }) => {
                a == b && x + last.length == y
            }
            _ => false,
        }
}

#[cfg(test)]
mod tests;
