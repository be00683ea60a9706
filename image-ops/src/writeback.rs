//! Writeback started early.
//!
//! The replica writes a transfer twice: into its staging file as chunks arrive, and
//! into the disks when it is applied; each ends with a sync. Left alone, the kernel
//! writes the dirty pages back late, so each sync has the whole transfer to write
//! while everything else waits. [`start_writeback`] queues a range for the device at
//! once (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), without waiting for it: the device
//! writes while the network delivers the next chunks or the applier copies the next
//! records, and the sync that follows finds little left to do.
//!
//! This is a hint for speed, never for durability: only `fdatasync` makes data
//! durable, and failures here are ignored (the sync reports them).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes written to one file after which writeback is started.
pub const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writeback of `offset..offset + len` of `file`; does not wait for it.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is
    // open for the duration of the call because `file` is borrowed.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// Counts bytes written to one file (by any number of threads) and starts writeback
/// every [`WRITEBACK_EVERY`] bytes of them.
#[derive(Debug, Default)]
pub struct WritebackPacer {
    pending: AtomicU64,
}

impl WritebackPacer {
    /// Notes `len` bytes written to `file`; past [`WRITEBACK_EVERY`], starts writeback
    /// of the whole file's dirty pages (the kernel finds them by their dirty tags, so
    /// the file's size does not matter).
    pub fn wrote(&self, file: &File, len: u64) {
        let before = self.pending.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) >= WRITEBACK_EVERY {
            self.pending.store(0, Ordering::Relaxed);
            // Length 0: to the end of the file.
            start_writeback(file, 0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn writeback_of_written_data_leaves_it_intact() {
        let mut file = tempfile::tempfile().expect("file");
        let pacer = WritebackPacer::default();
        for round in 0..4u8 {
            file.write_all(&vec![round; 3 << 20]).expect("write");
            pacer.wrote(&file, 3 << 20);
        }
        // Out-of-range and huge arguments are ignored, not errors.
        start_writeback(&file, u64::MAX, u64::MAX);
        file.sync_data().expect("sync");
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.read_to_end(&mut back).expect("read");
        assert_eq!(back.len(), 12 << 20);
        for (round, piece) in back.chunks(3 << 20).enumerate() {
            assert!(
                piece.iter().all(|b| usize::from(*b) == round),
                "piece {round}"
            );
        }
    }
}
