//! Dirty maps: one bit per block, set by writers, read and cleared when a cycle closes.
//!
//! Bits are set with atomic `fetch_or` and taken with atomic `swap(0)`, so readers
//! (block-status queries) never block writers. The group sets and takes the open
//! cycle's bits under its lock, which is what makes a taken map match the cycle exactly.

use std::sync::atomic::{AtomicU64, Ordering};

use bitvec::prelude::{BitVec, Lsb0};

/// A fixed-size bitmap over a disk, one bit per `1 << block_shift` bytes.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    block_shift: u32,
    blocks: u64,
    disk_size: u64,
}

/// A taken (frozen) copy of a bitmap.
pub type DirtyBits = BitVec<u64, Lsb0>;

impl AtomicBitmap {
    /// A clear bitmap for a disk of `disk_size` bytes with blocks of `1 << block_shift`.
    pub fn new(disk_size: u64, block_shift: u32) -> Self {
        let blocks = disk_size.div_ceil(1u64 << block_shift);
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            block_shift,
            blocks,
            disk_size,
        }
    }

    /// Bytes per bit.
    pub fn block_size(&self) -> u64 {
        1u64 << self.block_shift
    }

    /// Number of blocks (bits).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn block_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        Some((offset >> self.block_shift, (end - 1) >> self.block_shift))
    }

    /// Marks every block touching `offset..offset + len`.
    pub fn set_range(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.block_range(offset, len) else {
            return;
        };
        let mut block = first;
        while block <= last {
            let bit = block % 64;
            let count = (64 - bit).min(last - block + 1);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            self.word(block).fetch_or(mask, Ordering::Release);
            block += count;
        }
    }

    /// Marks every block.
    pub fn set_all(&self) {
        self.set_range(0, self.disk_size);
    }

    fn word(&self, block: u64) -> &AtomicU64 {
        // Blocks index within `blocks`, whose words exist by construction.
        let index = usize::try_from(block / 64).unwrap_or(usize::MAX);
        &self.words[index]
    }

    /// Whether the block holding byte `offset` is marked.
    pub fn is_set(&self, offset: u64) -> bool {
        if offset >= self.disk_size {
            return false;
        }
        let block = offset >> self.block_shift;
        self.word(block).load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Takes the bitmap, leaving it clear.
    pub fn take(&self) -> DirtyBits {
        let mut bits: DirtyBits = self
            .words
            .iter()
            .map(|word| word.swap(0, Ordering::AcqRel))
            .collect();
        bits.truncate(usize::try_from(self.blocks).unwrap_or(usize::MAX));
        bits
    }

    /// Sets every bit that is set in `bits` (e.g. to give back a map that was taken).
    pub fn merge(&self, bits: &DirtyBits) {
        for (index, word) in bits.as_raw_slice().iter().enumerate() {
            if *word != 0 {
                if let Some(target) = self.words.get(index) {
                    target.fetch_or(*word, Ordering::Release);
                }
            }
        }
    }

    /// A copy of the bitmap, leaving it as it is.
    pub fn snapshot(&self) -> DirtyBits {
        let mut bits: DirtyBits = self
            .words
            .iter()
            .map(|word| word.load(Ordering::Acquire))
            .collect();
        bits.truncate(usize::try_from(self.blocks).unwrap_or(usize::MAX));
        bits
    }

    /// Bytes covered by set bits (the last block counted up to the disk's end).
    pub fn dirty_bytes(&self) -> u64 {
        let set: u64 = self
            .words
            .iter()
            .map(|word| u64::from(word.load(Ordering::Relaxed).count_ones()))
            .sum();
        let mut bytes = set << self.block_shift;
        let tail = self.disk_size % self.block_size();
        if tail != 0 && self.blocks > 0 && self.is_set(self.disk_size - 1) {
            bytes -= self.block_size() - tail;
        }
        bytes
    }

    /// Runs of equal state covering at least the first byte of `offset..offset + len`,
    /// as `(length, dirty)`, contiguous and clipped to the request and the disk.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.disk_size);
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut position = offset;
        while position < end {
            let dirty = self.is_set(position);
            let block_end = ((position >> self.block_shift) + 1) << self.block_shift;
            let step = block_end.min(end) - position;
            match runs.last_mut() {
                Some((run, state)) if *state == dirty => *run += step,
                _ => runs.push((step, dirty)),
            }
            position += step;
        }
        runs
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_and_take() {
        let map = AtomicBitmap::new(1 << 20, 12);
        map.set_range(4096, 1);
        map.set_range(8191, 2);
        assert!(map.is_set(4096) && map.is_set(8192) && !map.is_set(0));
        assert_eq!(map.dirty_bytes(), 2 * 4096);
        let taken = map.take();
        assert_eq!(taken.count_ones(), 2);
        assert_eq!(map.dirty_bytes(), 0);
        map.merge(&taken);
        assert_eq!(map.dirty_bytes(), 2 * 4096);
    }

    #[test]
    fn extents_are_runs() {
        let map = AtomicBitmap::new(64 * 4096, 12);
        map.set_range(3 * 4096, 2 * 4096);
        assert_eq!(
            map.extents(0, 64 * 4096),
            vec![(3 * 4096, false), (2 * 4096, true), (59 * 4096, false)]
        );
        assert_eq!(map.extents(3 * 4096 + 100, 10), vec![(10, true)]);
    }

    #[test]
    fn partial_last_block() {
        let map = AtomicBitmap::new(4096 + 100, 12);
        map.set_all();
        assert_eq!(map.dirty_bytes(), 4196);
    }

    proptest! {
        #[test]
        fn set_range_marks_exactly(size in 1u64..(1 << 22), offset in 0u64..(1 << 22), len in 0u64..(1 << 20)) {
            let map = AtomicBitmap::new(size, 12);
            map.set_range(offset, len);
            for block in 0..map.blocks() {
                let start = block << 12;
                let end = ((block + 1) << 12).min(size);
                let touched = len > 0 && start < offset.saturating_add(len) && offset < end;
                prop_assert_eq!(map.is_set(start), touched);
            }
        }
    }
}
