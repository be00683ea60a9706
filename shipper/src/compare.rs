//! Narrows a resync to the blocks that differ: the images and the consumer's copy
//! are compared by BLAKE3 hashes, hierarchically, so an equal region costs one hash
//! pair whatever its size and only differing regions are hashed again, finer.
//!
//! Regions start at [`TOP_REGION`] bytes and shrink by [`FANOUT`] per level down to
//! the dirty-map block; a level hashes only the pieces of the regions that differed
//! that hold a mark. Equal regions are unmarked; the blocks left marked differ (or
//! were never compared because the consumer cannot hash) and are copied as usual.
//!
//! Where nearly everything differs, going finer does not pay: once regions are at
//! most [`DENSE_REGION`] bytes, a level that found less than 1/[`FANOUT`] of its
//! bytes equal is the last: every marked block of its differing regions is copied. A ring that
//! overflowed under heavy random writes marks blocks the replica has never seen:
//! descending to the 4 KiB block hashed the whole disk five times over and took
//! 332,048 hashes for 1 GiB (8 s under load, while the ring filled again), against
//! 4,368 hashes for three levels. Coarse levels always descend: one changed byte
//! makes a 64 MiB region differ, so their share of equal regions says little.
//!
//! Ordering: the comparison runs after logging restarted for the resync, so a write
//! that lands in a region after it was hashed is in the log and ships in the cycle
//! that ends the resync, as for any copied block.

use std::fs::File;
use std::path::PathBuf;

use image_ops::hash::{hash_ranges, HashError};
use thiserror::Error;
use wire::api::{ByteRange, MAX_HASH_BYTES, MAX_HASH_RANGES};

use crate::resync::{Cursor, ResyncMaps};
use crate::sink::{CycleSink, SinkError};

/// Size of the first, coarsest regions.
pub const TOP_REGION: u64 = 64 << 20;
/// How many regions a differing region is split into at the next level.
pub const FANOUT: u64 = 16;
/// Region size from which a level that found almost nothing equal ends the descent.
pub const DENSE_REGION: u64 = 256 << 10;

/// Errors of a comparison.
#[derive(Debug, Error)]
pub enum CompareError {
    /// The consumer failed to hash its copy.
    #[error("Consumer")]
    Sink(#[from] SinkError),
    /// Hashing an image failed.
    #[error("Cannot hash image {path}")]
    Image {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: HashError,
    },
}

/// What a comparison found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareStats {
    /// Marked bytes before the comparison.
    pub marked_bytes: u64,
    /// Marked bytes after it: those that differ.
    pub differing_bytes: u64,
    /// Hashes compared.
    pub hashes: u64,
    /// Requests to the consumer.
    pub requests: u64,
}

/// Compares every marked region of `images` with the consumer's copy and unmarks
/// the equal ones. `None` when the consumer cannot compare (the maps are unchanged).
pub fn narrow(
    maps: &mut ResyncMaps,
    images: &[(PathBuf, File)],
    sink: &mut dyn CycleSink,
) -> Result<Option<CompareStats>, CompareError> {
    let mut stats = CompareStats {
        marked_bytes: maps.bytes_from(Cursor::default()),
        ..CompareStats::default()
    };
    let block = maps.block_size();
    for (disk, (path, image)) in images.iter().enumerate() {
        let size = maps.sizes().get(disk).copied().unwrap_or(0);
        let mut region = TOP_REGION.max(block);
        let mut level = top_regions(maps, disk, region);
        while !level.is_empty() {
            let mut differing = Vec::new();
            let (mut level_bytes, mut equal_bytes) = (0u64, 0u64);
            for batch in batches(&level) {
                // Both sides hash at once: ours on a helper thread while the consumer
                // answers.
                let (theirs, ours) = std::thread::scope(|scope| {
                    let ours = scope.spawn(|| hash_ranges(image, size, batch));
                    let theirs = sink.hashes(disk, batch);
                    (theirs, ours.join())
                });
                let Some(theirs) = theirs? else {
                    return Ok(None);
                };
                let ours = ours
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    .map_err(|source| CompareError::Image {
                        path: path.clone(),
                        source,
                    })?;
                stats.requests += 1;
                stats.hashes += batch.len() as u64;
                for ((range, mine), other) in batch.iter().zip(&ours).zip(&theirs) {
                    let end = range.offset + range.length;
                    level_bytes += range.length;
                    if mine == other {
                        maps.clear(disk, range.offset, end);
                        equal_bytes += range.length;
                    } else {
                        differing.push(*range);
                    }
                }
            }
            let dense = region <= DENSE_REGION && equal_bytes < level_bytes / FANOUT;
            if region <= block || dense {
                break;
            }
            region = (region / FANOUT).max(block);
            level = split(&differing, region);
            level.retain(|piece| maps.any_marked(disk, piece.offset, piece.offset + piece.length));
        }
    }
    stats.differing_bytes = maps.bytes_from(Cursor::default());
    Ok(Some(stats))
}

/// The `region`-aligned regions of `disk` holding a mark.
fn top_regions(maps: &ResyncMaps, disk: usize, region: u64) -> Vec<ByteRange> {
    let size = maps.sizes().get(disk).copied().unwrap_or(0);
    let mut regions: Vec<ByteRange> = Vec::new();
    let from = Cursor { disk, offset: 0 };
    for (_, start, end) in maps.runs_from(from).take_while(|(d, _, _)| *d == disk) {
        let mut at = start / region * region;
        while at < end {
            let next = (at + region).min(size);
            if regions.last().is_none_or(|last| last.offset < at) {
                regions.push(ByteRange {
                    offset: at,
                    length: next - at,
                });
            }
            at = next;
        }
    }
    regions
}

/// Splits each range into `region`-sized pieces (the last may be shorter).
fn split(ranges: &[ByteRange], region: u64) -> Vec<ByteRange> {
    let mut pieces = Vec::new();
    for range in ranges {
        let end = range.offset + range.length;
        let mut at = range.offset;
        while at < end {
            let next = (at + region).min(end);
            pieces.push(ByteRange {
                offset: at,
                length: next - at,
            });
            at = next;
        }
    }
    pieces
}

/// Consecutive slices of `ranges` within one request's limits.
fn batches(ranges: &[ByteRange]) -> impl Iterator<Item = &[ByteRange]> {
    let mut rest = ranges;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0u64;
        let mut count = 0;
        for range in rest.iter().take(MAX_HASH_RANGES) {
            if count > 0 && bytes + range.length > MAX_HASH_BYTES {
                break;
            }
            bytes += range.length;
            count += 1;
        }
        let (batch, tail) = rest.split_at(count);
        rest = tail;
        Some(batch)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::LocalCopySink;
    use bitvec::prelude::*;
    use std::os::unix::fs::FileExt;

    const BLOCK: u64 = 64 << 10;

    fn setup(size: u64) -> (tempfile::TempDir, PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let image_path = dir.path().join("image");
        let pattern: Vec<u8> = (0..253u8).collect();
        let data: Vec<u8> = pattern
            .iter()
            .copied()
            .cycle()
            .take(size as usize)
            .collect();
        std::fs::write(&image_path, &data).unwrap();
        std::fs::create_dir(dir.path().join("copy")).unwrap();
        std::fs::write(dir.path().join("copy/disk0.img"), &data).unwrap();
        let image = File::open(&image_path).unwrap();
        (dir, image_path, image)
    }

    fn full_maps(size: u64) -> ResyncMaps {
        let blocks = size.div_ceil(BLOCK) as usize;
        ResyncMaps::new(vec![bitvec![u64, Lsb0; 1; blocks]], BLOCK, vec![size])
    }

    #[test]
    fn only_differing_blocks_stay_marked() {
        // Not a multiple of the block: the last block is partial.
        let size = (72 << 20) + 12345;
        // Three differences: inside one block, across a block boundary, in the tail.
        let differences: Vec<(u64, Vec<u8>)> = [5 << 20, (66 << 20) - 10, size - 3]
            .into_iter()
            .map(|at| (at, vec![0xEE; (size - at).min(20) as usize]))
            .collect();
        let (stats, maps) = narrow_against_copy(size, &differences, full_maps(size));
        assert_eq!(stats.marked_bytes, size);
        // One block, two blocks, the partial tail block.
        assert_eq!(stats.differing_bytes, 3 * BLOCK + size % BLOCK);
        let runs: Vec<_> = maps.runs_from(Cursor::default()).collect();
        assert_eq!(
            runs,
            vec![
                (0, 5 << 20, (5 << 20) + BLOCK),
                (0, (66 << 20) - BLOCK, (66 << 20) + BLOCK),
                (0, size - size % BLOCK, size),
            ]
        );
        // Equal regions cost one hash each: far fewer hashes than blocks.
        assert!(stats.hashes < 150, "{stats:?}");
    }

    /// Compares an image of `size` bytes over `maps` with a copy that differs from it
    /// at `differences` (offset, bytes); what the comparison found, and the marks left.
    fn narrow_against_copy(
        size: u64,
        differences: &[(u64, Vec<u8>)],
        mut maps: ResyncMaps,
    ) -> (CompareStats, ResyncMaps) {
        let (dir, image_path, image) = setup(size);
        let copy = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("copy/disk0.img"))
            .unwrap();
        for (at, bytes) in differences {
            copy.write_all_at(bytes, *at).unwrap();
        }
        let mut sink =
            LocalCopySink::open(&dir.path().join("copy"), &[("disk0".into(), size)]).unwrap();
        let stats = narrow(&mut maps, &[(image_path, image)], &mut sink)
            .unwrap()
            .unwrap();
        (stats, maps)
    }

    #[test]
    fn where_everything_differs_the_descent_stops_at_the_dense_region_size() {
        let size = 8 << 20;
        // Every 64 KiB block of the copy differs from the image.
        let differences: Vec<(u64, Vec<u8>)> = (0..size / BLOCK)
            .map(|block| (block * BLOCK + 7, vec![0xEE]))
            .collect();
        let (stats, _) = narrow_against_copy(size, &differences, full_maps(size));
        assert_eq!(stats.differing_bytes, size);
        // 8 MiB, then 2 x 4 MiB, then 32 x 256 KiB, where it stops: not 128 x 64 KiB.
        assert_eq!(stats.hashes, 1 + 2 + 32, "{stats:?}");
    }

    #[test]
    fn only_pieces_that_hold_a_mark_are_hashed() {
        let size = 8 << 20;
        // Two marked blocks, both differing, in the same 4 MiB region.
        let differences = [(7, vec![0xEE]), ((1 << 20) + 7, vec![0xEE])];
        let mut bits = bitvec![u64, Lsb0; 0; (size / BLOCK) as usize];
        bits.set(0, true);
        bits.set(16, true);
        let maps = ResyncMaps::new(vec![bits], BLOCK, vec![size]);
        let (stats, _) = narrow_against_copy(size, &differences, maps);
        assert_eq!(stats.differing_bytes, 2 * BLOCK);
        // The 8 MiB region, the one 4 MiB region with marks, and the two 256 KiB
        // pieces with a mark (of 16); both differ, so the descent ends there.
        assert_eq!(stats.hashes, 1 + 1 + 2, "{stats:?}");
    }

    #[test]
    fn an_equal_copy_leaves_nothing_and_a_sink_that_cannot_hash_leaves_everything() {
        let size = 8 << 20;
        let (dir, image_path, image) = setup(size);
        let mut sink =
            LocalCopySink::open(&dir.path().join("copy"), &[("disk0".into(), size)]).unwrap();
        let images = [(image_path, image)];
        let mut maps = full_maps(size);
        let stats = narrow(&mut maps, &images, &mut sink).unwrap().unwrap();
        assert_eq!((stats.differing_bytes, stats.hashes), (0, 1));
        let mut maps = full_maps(size);
        assert!(
            narrow(&mut maps, &images, &mut crate::DiscardSink::default())
                .unwrap()
                .is_none()
        );
        assert_eq!(maps.bytes_from(Cursor::default()), size);
    }

    #[test]
    fn batches_respect_the_request_limits() {
        let ranges = vec![
            ByteRange {
                offset: 0,
                length: 1 << 30
            };
            9
        ];
        let sizes: Vec<usize> = batches(&ranges).map(<[ByteRange]>::len).collect();
        assert_eq!(sizes, vec![4, 4, 1]);
        let small = vec![
            ByteRange {
                offset: 0,
                length: 1
            };
            MAX_HASH_RANGES + 1
        ];
        let sizes: Vec<usize> = batches(&small).map(<[ByteRange]>::len).collect();
        assert_eq!(sizes, vec![MAX_HASH_RANGES, 1]);
    }
}
