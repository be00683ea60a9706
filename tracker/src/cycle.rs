//! Closed cycles, read back as coalesced changes.
//!
//! A [`ClosedCycle`] is a read-only view of the ring between the head (the oldest
//! unacknowledged record) and the point where the cycle closed. Within it, the last
//! write to each byte wins: overlapping records are split so every byte is named once,
//! by the newest record that covers it; zero and trim ranges stay ranges.
//!
//! Ownership: the payload slices handed out borrow the ring's mapping. The ring never
//! reuses that space before the cycle is acknowledged, and acknowledging consumes the
//! `ClosedCycle`, so no slice can outlive its bytes. Only one `ClosedCycle` per group
//! exists at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::group::Shared;

/// Where an extent's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Payload bytes in the mapping, starting at this offset of the ring file.
    Data { file_offset: u64 },
    /// Reads as zeroes.
    Zero,
    /// Discarded; reads as zeroes.
    Trim,
}

impl Source {
    fn advanced(self, by: u64) -> Self {
        match self {
            Self::Data { file_offset } => Self::Data {
                file_offset: file_offset + by,
            },
            other => other,
        }
    }
}

/// Non-overlapping extents of one disk, by offset, each byte from the newest write
/// that covers it.
#[derive(Debug, Default, Clone)]
pub(crate) struct ExtentMap {
    extents: Vec<(u64, u64, Source)>,
}

impl ExtentMap {
    /// Resolves `writes`, ranges `start..end` in the order they were written, into
    /// extents. Ranges that never overlap (most cycles: fio's random map, a guest's
    /// scattered 4 KiB writes, sequential streams) only need a sort; any overlap
    /// takes the general path, which replays them in order.
    pub(crate) fn from_writes(mut writes: Vec<(u64, u64, Source)>) -> Self {
        writes.retain(|(start, end, _)| start < end);
        let in_order = writes.clone();
        // Stable: equal starts keep their write order (they overlap, and fall back).
        writes.sort_by_key(|(start, _, _)| *start);
        let mut extents: Vec<(u64, u64, Source)> = Vec::with_capacity(writes.len());
        for (start, end, source) in writes {
            match extents.last_mut() {
                Some((_, last_end, _)) if *last_end > start => {
                    return Self::from_overlapping(in_order);
                }
                Some((last_start, last_end, last_source))
                    if *last_end == start
                        && last_source.advanced(start - *last_start) == source =>
                {
                    *last_end = end;
                }
                _ => extents.push((start, end, source)),
            }
        }
        ExtentMap { extents }
    }

    /// The general path of [`ExtentMap::from_writes`]: each range inserted in write
    /// order into a tree, splitting and replacing what it covers.
    fn from_overlapping(writes: Vec<(u64, u64, Source)>) -> Self {
        let mut tree: BTreeMap<u64, (u64, Source)> = BTreeMap::new();
        for (start, end, source) in writes {
            insert(&mut tree, start, end, source);
        }
        ExtentMap {
            extents: tree
                .into_iter()
                .map(|(start, (end, source))| (start, end, source))
                .collect(),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, Source)> + '_ {
        self.extents.iter().copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.extents.len()
    }
}

/// Records in `tree` (extent start to end and source) that `start..end` now comes
/// from `source`.
fn insert(tree: &mut BTreeMap<u64, (u64, Source)>, start: u64, end: u64, source: Source) {
    if let Some((&key, &(key_end, key_source))) = tree.range(..start).next_back() {
        if key_end > start {
            tree.insert(key, (start, key_source));
            if key_end > end {
                tree.insert(end, (key_end, key_source.advanced(end - key)));
            }
        }
    }
    let covered: Vec<u64> = tree.range(start..end).map(|(key, _)| *key).collect();
    for key in covered {
        if let Some((key_end, key_source)) = tree.remove(&key) {
            if key_end > end {
                tree.insert(end, (key_end, key_source.advanced(end - key)));
            }
        }
    }
    // Merge with the previous extent when it continues it exactly.
    if let Some((&key, &(key_end, key_source))) = tree.range(..start).next_back() {
        if key_end == start && key_source.advanced(start - key) == source {
            tree.insert(key, (end, key_source));
            return;
        }
    }
    tree.insert(start, (end, source));
}

/// What a change does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeData<'a> {
    /// These bytes, exactly `length` of them.
    Write(&'a [u8]),
    /// The range reads as zeroes.
    Zero,
    /// The range was discarded and reads as zeroes.
    Trim,
}

/// One coalesced change to one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change<'a> {
    /// Disk index within the group.
    pub disk: usize,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes covered.
    pub length: u64,
    /// What the range holds now.
    pub data: ChangeData<'a>,
}

/// Counts describing a closed cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleStats {
    /// Records read from the ring (writes, zeroes, trims).
    pub records: u64,
    /// Records skipped because they were never committed (cancelled writes).
    pub skipped: u64,
    /// Bytes of write payload in the ring.
    pub logged_bytes: u64,
    /// Bytes of write payload after coalescing (what ships).
    pub data_bytes: u64,
    /// Bytes covered by zero and trim ranges after coalescing.
    pub zeroed_bytes: u64,
}

/// A closed, fully committed cycle (or, after a crash, everything the ring holds).
pub struct ClosedCycle {
    pub(crate) shared: Arc<Shared>,
    /// The newest cycle included; acknowledging it frees everything up to it.
    pub(crate) cycle: u64,
    /// Ring position and sequence number just past the cycle's close marker.
    pub(crate) end_pos: u64,
    pub(crate) end_seq: u64,
    pub(crate) disks: Vec<ExtentMap>,
    pub(crate) stats: CycleStats,
    /// True for a recovery view, which must not be acknowledged.
    pub(crate) recovery: bool,
}

impl std::fmt::Debug for ClosedCycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClosedCycle")
            .field("cycle", &self.cycle)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl ClosedCycle {
    /// The cycle number (the newest cycle this view includes).
    pub fn id(&self) -> u64 {
        self.cycle
    }

    /// Counts for status and logs.
    pub fn stats(&self) -> CycleStats {
        self.stats
    }

    /// Number of disks in the group.
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    /// Number of coalesced changes for `disk`.
    pub fn change_count(&self, disk: usize) -> usize {
        self.disks.get(disk).map_or(0, ExtentMap::len)
    }

    /// The coalesced changes of every disk, by disk then offset.
    pub fn changes(&self) -> impl Iterator<Item = Change<'_>> + '_ {
        self.disks.iter().enumerate().flat_map(move |(disk, map)| {
            map.iter().map(move |(start, end, source)| Change {
                disk,
                offset: start,
                length: end - start,
                data: match source {
                    Source::Data { file_offset } => {
                        ChangeData::Write(self.shared.ring_bytes(file_offset, end - start))
                    }
                    Source::Zero => ChangeData::Zero,
                    Source::Trim => ChangeData::Trim,
                },
            })
        })
    }

    /// Frees the cycle's ring space: its changes are safely applied elsewhere.
    pub fn acknowledge(self) -> Result<(), crate::TrackerError> {
        if self.recovery {
            return Err(crate::TrackerError::RecoveryViewAck);
        }
        self.shared
            .acknowledge(self.cycle, self.end_pos, self.end_seq)
    }
}

impl Drop for ClosedCycle {
    fn drop(&mut self) {
        self.shared.release_consumer();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A byte-level model: for every byte, which insert (index) wrote it last.
    fn model(inserts: &[(u64, u64)], size: u64) -> Vec<Option<usize>> {
        let mut bytes = vec![None; usize::try_from(size).unwrap()];
        for (index, (start, end)) in inserts.iter().enumerate() {
            for byte in *start..*end {
                bytes[usize::try_from(byte).unwrap()] = Some(index);
            }
        }
        bytes
    }

    #[test]
    fn split_and_overwrite() {
        let map = ExtentMap::from_writes(vec![
            (0, 100, Source::Data { file_offset: 1000 }),
            (40, 60, Source::Zero),
        ]);
        let got: Vec<_> = map.iter().collect();
        assert_eq!(
            got,
            vec![
                (0, 40, Source::Data { file_offset: 1000 }),
                (40, 60, Source::Zero),
                (60, 100, Source::Data { file_offset: 1060 })
            ]
        );
    }

    #[test]
    fn contiguous_payloads_merge() {
        let map = ExtentMap::from_writes(vec![
            (10, 20, Source::Data { file_offset: 510 }),
            (0, 10, Source::Data { file_offset: 500 }),
            (30, 40, Source::Data { file_offset: 520 }),
            (20, 30, Source::Zero),
        ]);
        assert_eq!(
            map.iter().collect::<Vec<_>>(),
            vec![
                (0, 20, Source::Data { file_offset: 500 }),
                (20, 30, Source::Zero),
                (30, 40, Source::Data { file_offset: 520 }),
            ]
        );
    }

    /// Checks that `map` names every byte of `0..size` by the last of `inserts`
    /// covering it, whose payload is at `index << 20 | byte`.
    fn check_last_writer(
        map: &ExtentMap,
        inserts: &[(u64, u64)],
        size: u64,
    ) -> Result<(), TestCaseError> {
        let expected = model(inserts, size);
        let mut seen = vec![None; usize::try_from(size).unwrap()];
        let mut last_end = 0;
        for (start, end, source) in map.iter() {
            prop_assert!(start >= last_end && start < end);
            last_end = end;
            let Source::Data { file_offset } = source else {
                unreachable!()
            };
            for byte in start..end {
                let at = file_offset + (byte - start);
                prop_assert_eq!(at & 0xfffff, byte);
                seen[usize::try_from(byte).unwrap()] = Some(usize::try_from(at >> 20).unwrap());
            }
        }
        prop_assert_eq!(seen, expected);
        Ok(())
    }

    fn writes(inserts: &[(u64, u64)]) -> Vec<(u64, u64, Source)> {
        inserts
            .iter()
            .enumerate()
            // Each insert's payload lives at its own 1 MiB window of the file.
            .map(|(index, (start, end))| {
                (
                    *start,
                    *end,
                    Source::Data {
                        file_offset: (index as u64) << 20 | *start,
                    },
                )
            })
            .collect()
    }

    proptest! {
        /// Encode each insert's identity in its file offset and check every byte
        /// resolves to the last insert covering it.
        #[test]
        fn last_writer_wins(inserts in proptest::collection::vec((0u64..200, 1u64..50), 1..30)) {
            let size = 256u64;
            let inserts: Vec<(u64, u64)> = inserts.into_iter().map(|(s, l)| (s, (s + l).min(size))).collect();
            check_last_writer(&ExtentMap::from_writes(writes(&inserts)), &inserts, size)?;
        }

        /// Ranges that never overlap, in any order (the sort-only path), some of
        /// them adjacent.
        #[test]
        fn disjoint_writes_in_any_order(lengths in proptest::collection::vec((0u64..3, 1u64..9), 1..40), seed in any::<u64>()) {
            let mut inserts = Vec::new();
            let mut at = 0;
            for (gap, length) in lengths {
                inserts.push((at + gap, at + gap + length));
                at += gap + length;
            }
            // A deterministic shuffle.
            let mut state = seed | 1;
            for i in (1..inserts.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                inserts.swap(i, usize::try_from(state % (i as u64 + 1)).unwrap());
            }
            check_last_writer(&ExtentMap::from_writes(writes(&inserts)), &inserts, at.max(1))?;
        }
    }
}
