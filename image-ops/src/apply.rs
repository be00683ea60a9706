//! Applying changes to replica disks.
//!
//! Contract: [`ReplicaDisk::apply`] makes the range hold what the change says (bytes,
//! or zeroes for zero and trim ranges); [`ReplicaDisk::sync`] makes every applied change
//! durable. A consumer acknowledges a cycle only after `sync` returned for every disk.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracker::{Change, ChangeData, ClosedCycle};

use crate::writeback::WritebackPacer;

/// Errors applying changes.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// A file operation failed.
    #[error("Cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The replica disk.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The replica disk's size differs from the source's.
    #[error("Replica disk {path} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The replica disk.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The protected disk's size.
        expected: u64,
    },
    /// A change beyond the disk's end, or for a disk that does not exist.
    #[error("Change for disk {disk} at {offset}+{length} is outside the replica")]
    OutOfRange {
        /// Disk index.
        disk: usize,
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
    },
}

/// Counts from applying changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Changes applied.
    pub changes: u64,
    /// Bytes written.
    pub written: u64,
    /// Bytes zeroed or discarded.
    pub zeroed: u64,
}

/// A replica disk: a raw image file (or block device) that changes are applied to.
#[derive(Debug)]
pub struct ReplicaDisk {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    /// Starts the device writing while changes are still being applied.
    writeback: WritebackPacer,
}

const ZERO_CHUNK: usize = 1 << 20;
/// Writes at least this large start writeback as they are applied
/// ([`crate::writeback`]).
const EARLY_WRITEBACK_MIN: u64 = 64 << 10;

impl ReplicaDisk {
    /// Opens an existing replica disk and checks its size.
    pub fn open(path: &Path, expected_size: u64) -> Result<Self, ApplyError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| ApplyError::Io { what, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open"))?;
        let metadata = file.metadata().map_err(io("stat"))?;
        let block_device = std::os::unix::fs::FileTypeExt::is_block_device(&metadata.file_type());
        let size = if block_device {
            block_device_size(&file).map_err(io("size"))?
        } else {
            metadata.len()
        };
        if size != expected_size {
            return Err(ApplyError::SizeMismatch {
                path: path.to_path_buf(),
                actual: size,
                expected: expected_size,
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            block_device,
            writeback: WritebackPacer::default(),
        })
    }

    /// Path of the disk.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn io_error(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ApplyError + '_ {
        move |source| ApplyError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }

    /// Makes `offset..offset + length` hold what `data` says.
    pub fn apply(&self, offset: u64, length: u64, data: ChangeData<'_>) -> Result<(), ApplyError> {
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(ApplyError::OutOfRange {
                disk: 0,
                offset,
                length,
            });
        }
        match data {
            ChangeData::Write(bytes) => {
                self.file
                    .write_all_at(bytes, offset)
                    .map_err(self.io_error("write"))?;
                // Small scattered writes are left to the final sync, which sends
                // them to the device sorted and in one batch; started early, they
                // would go as many small random batches.
                if length >= EARLY_WRITEBACK_MIN {
                    self.writeback.wrote(&self.file, length);
                }
                Ok(())
            }
            ChangeData::Zero => self.zero(offset, length, false),
            ChangeData::Trim => self.zero(offset, length, true),
        }
    }

    /// Zeroes a range. In a file, zeroes and trims alike become a hole: a copy is
    /// never served, so nothing relies on zeroed blocks staying allocated, and a thin
    /// image's holes (sent as zero records) stay holes instead of filling the
    /// replica's storage.
    fn zero(&self, offset: u64, length: u64, discard: bool) -> Result<(), ApplyError> {
        use nix::fcntl::FallocateFlags as Mode;
        if !self.block_device {
            let keep = Mode::FALLOC_FL_KEEP_SIZE;
            let modes = [
                Some(Mode::FALLOC_FL_PUNCH_HOLE | keep),
                (!discard).then_some(Mode::FALLOC_FL_ZERO_RANGE | keep),
            ];
            if let (Ok(start), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) {
                for mode in modes.into_iter().flatten() {
                    if nix::fcntl::fallocate(self.file.as_raw_fd(), mode, start, len).is_ok() {
                        return Ok(());
                    }
                }
            }
        }
        // Block devices, and filesystems without fallocate modes: write zeroes, which
        // is what makes the range read as zeroes everywhere.
        let zeroes = vec![0u8; ZERO_CHUNK.min(usize::try_from(length).unwrap_or(ZERO_CHUNK))];
        let mut done = 0u64;
        while done < length {
            let step = (length - done).min(zeroes.len() as u64);
            let step_len = usize::try_from(step).unwrap_or(zeroes.len());
            self.file
                .write_all_at(&zeroes[..step_len], offset + done)
                .map_err(self.io_error("zero"))?;
            done += step;
        }
        Ok(())
    }

    /// Makes every applied change durable.
    pub fn sync(&self) -> Result<(), ApplyError> {
        self.file.sync_data().map_err(self.io_error("sync"))
    }

    /// The underlying file, e.g. for reads during a resync.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the open file is still the one at its path (same device and inode): a
    /// disk deleted or replaced since it was opened must not receive changes meant for
    /// whatever is at the path now.
    pub fn is_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which points at `size`.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(std::io::Error::from)?;
    Ok(size)
}

/// Applies one change to the disk it names.
pub fn apply_change(disks: &[ReplicaDisk], change: &Change<'_>) -> Result<(), ApplyError> {
    let disk = disks.get(change.disk).ok_or(ApplyError::OutOfRange {
        disk: change.disk,
        offset: change.offset,
        length: change.length,
    })?;
    disk.apply(change.offset, change.length, change.data)
        .map_err(|error| match error {
            ApplyError::OutOfRange { offset, length, .. } => ApplyError::OutOfRange {
                disk: change.disk,
                offset,
                length,
            },
            other => other,
        })
}

/// Applies a whole closed cycle and makes it durable; afterwards the cycle may be
/// acknowledged.
pub fn apply_cycle(disks: &[ReplicaDisk], cycle: &ClosedCycle) -> Result<ApplyStats, ApplyError> {
    let mut stats = ApplyStats::default();
    for change in cycle.changes() {
        apply_change(disks, &change)?;
        stats.changes += 1;
        match change.data {
            ChangeData::Write(_) => stats.written += change.length,
            ChangeData::Zero | ChangeData::Trim => stats.zeroed += change.length,
        }
    }
    for disk in disks {
        disk.sync()?;
    }
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn applies_writes_zeroes_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        std::fs::write(&path, vec![0xffu8; 1 << 20]).unwrap();
        let disk = ReplicaDisk::open(&path, 1 << 20).unwrap();
        disk.apply(10, 3, ChangeData::Write(b"abc")).unwrap();
        disk.apply(4096, 8192, ChangeData::Zero).unwrap();
        disk.apply(65536, 65536, ChangeData::Trim).unwrap();
        disk.sync().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[10..13], b"abc");
        assert!(bytes[4096..12288].iter().all(|b| *b == 0));
        assert!(bytes[65536..131072].iter().all(|b| *b == 0));
        assert_eq!(bytes[131072], 0xff);
        assert!(matches!(
            disk.apply((1 << 20) - 1, 2, ChangeData::Zero),
            Err(ApplyError::OutOfRange { .. })
        ));
        assert!(matches!(
            ReplicaDisk::open(&path, 5),
            Err(ApplyError::SizeMismatch { .. })
        ));
    }

    /// A thin image's holes arrive as zero records: they must stay holes.
    #[test]
    fn zero_records_leave_holes_in_a_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        std::fs::write(&path, vec![0xffu8; 4 << 20]).unwrap();
        let disk = ReplicaDisk::open(&path, 4 << 20).unwrap();
        let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(allocated(&path) >= 4 << 20);
        disk.apply(0, 4 << 20, ChangeData::Zero).unwrap();
        disk.sync().unwrap();
        assert!(
            allocated(&path) < 1 << 20,
            "{} bytes allocated",
            allocated(&path)
        );
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
    }
}
