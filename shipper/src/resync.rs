//! Reading the blocks of a resync (and of the initial replication) from the images.
//!
//! A resync copies the blocks marked in its maps while writes go on (a fuzzy copy;
//! the cycle that follows makes it consistent). Runs of marked blocks are read in
//! pieces of at most [`READ_PIECE`]; unallocated ranges (found with `SEEK_DATA` and
//! `SEEK_HOLE`, without reading) and all-zero blocks become zero records, so a thin
//! image sends only its data.
//!
//! Positions: a [`Cursor`] names a byte of one disk. Changes come out in cursor order,
//! each starting where the previous one ended or at the next marked block, so a copy
//! interrupted after any change resumes exactly at that change's end.

use std::fs::File;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use image_ops::copy::{next_data, next_hole, DropBehind};
use tracker::{Change, ChangeData, DirtyBits};

/// Largest read, and largest write record, of a resync: two records with their
/// headers fill most of a 2 MiB chunk (two whole MiB would need 48 bytes more, and
/// leave each chunk half empty).
pub const READ_PIECE: u64 = (1 << 20) - ZERO_GRAIN;
/// Granularity of the all-zero check.
const ZERO_GRAIN: u64 = 4096;

/// A position in a group's disks: disk index, byte offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// Disk index.
    pub disk: usize,
    /// Byte offset on that disk.
    pub offset: u64,
}

/// The blocks a resync copies.
#[derive(Debug)]
pub struct ResyncMaps {
    maps: Vec<DirtyBits>,
    block_size: u64,
    sizes: Vec<u64>,
}

fn usize_of(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl ResyncMaps {
    /// Disk sizes.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Maps of `block_size` blocks over disks of `sizes` bytes.
    pub fn new(maps: Vec<DirtyBits>, block_size: u64, sizes: Vec<u64>) -> Self {
        ResyncMaps {
            maps,
            block_size,
            sizes,
        }
    }

    /// The marked byte ranges at or after `from`, in order: (disk, start, end).
    pub fn runs_from(&self, from: Cursor) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.maps
            .iter()
            .enumerate()
            .skip(from.disk)
            .flat_map(move |(disk, bits)| {
                let size = self.sizes.get(disk).copied().unwrap_or(0);
                let floor = if disk == from.disk { from.offset } else { 0 };
                let first_block = usize_of(floor / self.block_size);
                let block_size = self.block_size;
                let mut ones = bits
                    .iter_ones()
                    .skip_while(move |&block| block < first_block)
                    .peekable();
                std::iter::from_fn(move || {
                    let first = ones.next()?;
                    let mut last = first;
                    while ones.peek() == Some(&(last + 1)) {
                        last += 1;
                        ones.next();
                    }
                    Some((first, last))
                })
                .filter_map(move |(first, last)| {
                    let start = (first as u64 * block_size).max(floor);
                    let end = ((last as u64 + 1) * block_size).min(size);
                    (start < end).then_some((disk, start, end))
                })
            })
    }

    /// Marked bytes at or after `from`.
    pub fn bytes_from(&self, from: Cursor) -> u64 {
        self.runs_from(from)
            .map(|(_, start, end)| end - start)
            .sum()
    }

    /// Whether any block overlapping `start..end` of disk `disk` is marked.
    pub fn any_marked(&self, disk: usize, start: u64, end: u64) -> bool {
        let Some(bits) = self.maps.get(disk) else {
            return false;
        };
        if start >= end {
            return false;
        }
        let first = usize_of(start / self.block_size);
        let last = usize_of((end - 1) / self.block_size).min(bits.len().saturating_sub(1));
        first <= last && bits[first..=last].any()
    }

    /// Block size of the maps.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Unmarks `start..end` of disk `disk`: the blocks wholly inside it, and the last
    /// partial block when `end` is the disk's end.
    pub fn clear(&mut self, disk: usize, start: u64, end: u64) {
        let size = self.sizes.get(disk).copied().unwrap_or(0);
        let Some(bits) = self.maps.get_mut(disk) else {
            return;
        };
        let first = usize_of(start.div_ceil(self.block_size));
        let last = if end >= size {
            bits.len()
        } else {
            usize_of(end / self.block_size).min(bits.len())
        };
        if first < last {
            bits[first..last].fill(false);
        }
    }

    /// The marks at or after `from` (the block holding `from` included): what is left
    /// to copy, to hand back to the tracker when the copy stops.
    pub fn remaining(&self, from: Cursor) -> Vec<DirtyBits> {
        self.maps
            .iter()
            .enumerate()
            .map(|(disk, bits)| {
                let mut bits = bits.clone();
                let below = match disk.cmp(&from.disk) {
                    std::cmp::Ordering::Less => bits.len(),
                    std::cmp::Ordering::Equal => {
                        usize_of(from.offset / self.block_size).min(bits.len())
                    }
                    std::cmp::Ordering::Greater => 0,
                };
                bits[..below].fill(false);
                bits
            })
            .collect()
    }
}

/// Errors reading an image.
#[derive(Debug, thiserror::Error)]
#[error("Cannot read image {path} for the resync")]
pub struct ReadError {
    /// The image.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// Whether every byte is zero. Folds without early exit so it vectorises.
fn all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Reads `start..end` of disk `disk` from `image` and hands it to `visit` as changes
/// in offset order: zero records for holes and all-zero grains, write records of at
/// most [`READ_PIECE`] for data. Stops early when `visit` breaks; returns the offset
/// reached (the end of the last change visited).
pub fn read_range<E: From<ReadError>>(
    image: &File,
    path: &Path,
    disk: usize,
    start: u64,
    end: u64,
    buffer: &mut Vec<u8>,
    visit: &mut impl FnMut(&Change<'_>) -> Result<ControlFlow<()>, E>,
) -> Result<ControlFlow<u64, u64>, E> {
    // What was read is not kept in the page cache (see `DropBehind`).
    let mut behind = DropBehind::new(start);
    let mut at = start;
    while at < end {
        let piece_end = end.min(at + READ_PIECE);
        let data = next_data(image, at).map_or(piece_end, |data| data.min(piece_end));
        if data > at {
            let change = Change {
                disk,
                offset: at,
                length: data - at,
                data: ChangeData::Zero,
            };
            at = data;
            if visit(&change)?.is_break() {
                return Ok(ControlFlow::Break(at));
            }
            continue;
        }
        let data_end = next_hole(image, at, piece_end);
        buffer.resize(usize_of(data_end - at), 0);
        image
            .read_exact_at(buffer, at)
            .map_err(|source| ReadError {
                path: path.to_path_buf(),
                source,
            })?;
        behind.passed(image, data_end);
        // Split into runs of zero and non-zero grains (grains aligned on the disk).
        let mut run_start = at;
        let mut run_zero: Option<bool> = None;
        let mut pos = at;
        while pos < data_end {
            let grain_end = ((pos / ZERO_GRAIN + 1) * ZERO_GRAIN).min(data_end);
            let slice = &buffer[usize_of(pos - at)..usize_of(grain_end - at)];
            let zero = all_zero(slice);
            if run_zero.is_some_and(|previous| previous != zero) {
                let flow = emit_run(disk, run_start, pos, run_zero, buffer, at, visit)?;
                if flow.is_break() {
                    return Ok(ControlFlow::Break(pos));
                }
                run_start = pos;
            }
            run_zero = Some(zero);
            pos = grain_end;
        }
        let flow = emit_run(disk, run_start, data_end, run_zero, buffer, at, visit)?;
        at = data_end;
        if flow.is_break() {
            return Ok(ControlFlow::Break(at));
        }
    }
    behind.finish(image, at);
    Ok(ControlFlow::Continue(at))
}

fn emit_run<E>(
    disk: usize,
    start: u64,
    end: u64,
    zero: Option<bool>,
    buffer: &[u8],
    buffer_start: u64,
    visit: &mut impl FnMut(&Change<'_>) -> Result<ControlFlow<()>, E>,
) -> Result<ControlFlow<()>, E> {
    if start >= end {
        return Ok(ControlFlow::Continue(()));
    }
    let data = if zero == Some(true) {
        ChangeData::Zero
    } else {
        ChangeData::Write(&buffer[usize_of(start - buffer_start)..usize_of(end - buffer_start)])
    };
    visit(&Change {
        disk,
        offset: start,
        length: end - start,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::prelude::*;
    use image_ops::copy::cached_bytes;

    fn maps() -> ResyncMaps {
        // Disk 0: 10 blocks of 4 KiB, blocks 1-3 and 7 marked; disk 1: 2.5 blocks, all.
        let mut a: DirtyBits = bitvec![u64, Lsb0; 0; 10];
        for block in [1, 2, 3, 7] {
            a.set(block, true);
        }
        let b: DirtyBits = bitvec![u64, Lsb0; 1; 3];
        ResyncMaps::new(vec![a, b], 4096, vec![40960, 10240])
    }

    #[test]
    fn runs_are_clipped_to_the_cursor_and_the_disk() {
        let maps = maps();
        let all: Vec<_> = maps.runs_from(Cursor::default()).collect();
        assert_eq!(
            all,
            vec![(0, 4096, 16384), (0, 28672, 32768), (1, 0, 10240)]
        );
        let from = Cursor {
            disk: 0,
            offset: 10000,
        };
        let rest: Vec<_> = maps.runs_from(from).collect();
        assert_eq!(
            rest,
            vec![(0, 10000, 16384), (0, 28672, 32768), (1, 0, 10240)]
        );
        assert_eq!(maps.bytes_from(from), 6384 + 4096 + 10240);
        let remaining = maps.remaining(Cursor {
            disk: 0,
            offset: 28672,
        });
        assert_eq!(remaining[0].iter_ones().collect::<Vec<_>>(), vec![7]);
        assert_eq!(remaining[1].count_ones(), 3);
        let none = maps.remaining(Cursor { disk: 2, offset: 0 });
        assert!(none.iter().all(|bits| bits.not_any()));
    }

    #[test]
    fn any_marked_sees_blocks_a_range_overlaps() {
        let maps = maps();
        // Block 0 and blocks 4-6 of disk 0 are unmarked.
        assert!(!maps.any_marked(0, 0, 4096));
        assert!(maps.any_marked(0, 0, 4097));
        assert!(!maps.any_marked(0, 16384, 28672));
        assert!(maps.any_marked(0, 28671, 28673));
        assert!(!maps.any_marked(0, 100, 100));
        // Past the map and past the disks.
        assert!(!maps.any_marked(0, 40960, 1 << 30));
        assert!(maps.any_marked(1, 10000, 10240));
        assert!(!maps.any_marked(2, 0, 4096));
    }

    /// A resync reads a whole disk once: what it read must not stay in the page cache.
    #[test]
    fn what_a_resync_read_leaves_the_page_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let on_tmpfs = nix::sys::statfs::statfs(dir.path())
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        if on_tmpfs {
            eprintln!("the temporary directory is on tmpfs, which keeps its pages; skipping");
            return;
        }
        let path = dir.path().join("image");
        std::fs::write(&path, vec![3u8; 6 << 20]).expect("write");
        let file = File::open(&path).expect("open");
        file.sync_all().expect("sync");
        assert!(cached_bytes(&file).expect("mincore") > 0);
        let mut buffer = Vec::new();
        let mut data = 0;
        let reached =
            read_range::<ReadError>(&file, &path, 0, 0, 6 << 20, &mut buffer, &mut |change| {
                data += change.length;
                Ok(ControlFlow::Continue(()))
            })
            .expect("read");
        assert_eq!((reached, data), (ControlFlow::Continue(6 << 20), 6 << 20));
        assert_eq!(cached_bytes(&file).expect("mincore"), 0);
    }

    #[test]
    fn holes_and_zero_grains_become_zero_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        let file = File::create(&path).expect("create");
        file.set_len(8 << 20).expect("size");
        // Data at 1 MiB (4 KiB), zeros written at 2 MiB (8 KiB), data at 2 MiB + 8 KiB.
        file.write_all_at(&[7u8; 4096], 1 << 20).expect("write");
        file.write_all_at(&[0u8; 8192], 2 << 20).expect("write");
        file.write_all_at(&[9u8; 100], (2 << 20) + 8192)
            .expect("write");
        file.sync_all().expect("sync");
        let file = File::open(&path).expect("open");
        let mut seen = Vec::new();
        let mut buffer = Vec::new();
        let reached =
            read_range::<ReadError>(&file, &path, 0, 0, 8 << 20, &mut buffer, &mut |change| {
                let kind = match change.data {
                    ChangeData::Write(bytes) => {
                        assert_eq!(bytes.len() as u64, change.length);
                        "write"
                    }
                    ChangeData::Zero => "zero",
                    ChangeData::Trim => "trim",
                };
                seen.push((change.offset, change.length, kind));
                Ok(ControlFlow::Continue(()))
            })
            .expect("read");
        assert_eq!(reached, ControlFlow::Continue(8 << 20));
        // Contiguous, in order, covering everything.
        let mut expected_next = 0;
        for (offset, length, _) in &seen {
            assert_eq!(*offset, expected_next);
            expected_next = offset + length;
        }
        assert_eq!(expected_next, 8 << 20);
        let written: u64 = seen
            .iter()
            .filter(|(_, _, kind)| *kind == "write")
            .map(|(_, length, _)| length)
            .sum();
        // Only the two data grains are sent as data (the filesystem may allocate
        // whole blocks around them; grains of zeros are never data).
        assert_eq!(written, 8192, "{seen:?}");
        assert!(seen.contains(&(1 << 20, 4096, "write")), "{seen:?}");
    }

    #[test]
    fn stops_where_the_visitor_breaks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("image");
        std::fs::write(&path, vec![1u8; 3 << 20]).expect("write");
        let file = File::open(&path).expect("open");
        let mut buffer = Vec::new();
        let mut visits = 0;
        let reached =
            read_range::<ReadError>(&file, &path, 0, 0, 3 << 20, &mut buffer, &mut |_| {
                visits += 1;
                Ok(if visits == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            })
            .expect("read");
        assert_eq!(reached, ControlFlow::Break(2 * READ_PIECE));
    }
}
