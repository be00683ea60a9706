//! Consumers of closed cycles.

use std::path::{Path, PathBuf};

use replica::{ApplyError, ReplicaDisk};
use thiserror::Error;
use tracker::{Change, ChangeData};

/// Errors of a consumer.
#[derive(Debug, Error)]
pub enum SinkError {
    /// Applying to a local copy failed.
    #[error("Cannot apply to the local copy")]
    Apply(#[from] ApplyError),
    /// Preparing a local copy failed.
    #[error("Cannot create local copy {path}")]
    Copy {
        /// The copy.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where closed cycles go. The shipper calls [`CycleSink::apply`] for every change of a
/// cycle, then [`CycleSink::commit`]; it acknowledges the cycle (freeing its ring
/// space) only when `commit` returned `Ok`, which must mean the changes are durable.
pub trait CycleSink: Send {
    /// A short description for status and logs.
    fn describe(&self) -> String;
    /// Applies one change.
    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError>;
    /// Makes every applied change durable.
    fn commit(&mut self) -> Result<(), SinkError>;
}

/// Applies cycles to local copies of the disks (`DIR/<disk>.img`): the local proof
/// that copy + cycles == image, and the replica's apply path.
#[derive(Debug)]
pub struct LocalCopySink {
    dir: PathBuf,
    disks: Vec<ReplicaDisk>,
}

impl LocalCopySink {
    /// The copy of disk `name` in `dir`.
    pub fn copy_path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.img"))
    }

    /// Makes the copies of a group whose tracking starts now: each image is copied
    /// sparsely to `DIR/<name>.img` unless the copy exists already.
    pub fn seed(dir: &Path, disks: &[(String, PathBuf)]) -> Result<(), SinkError> {
        std::fs::create_dir_all(dir).map_err(|source| SinkError::Copy {
            path: dir.to_path_buf(),
            source,
        })?;
        for (name, image) in disks {
            let target = Self::copy_path(dir, name);
            if !target.exists() {
                replica::copy::sparse_copy(image, &target).map_err(|source| SinkError::Copy {
                    path: target,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Opens the copies of `disks` (name, size) in `dir`.
    pub fn open(dir: &Path, disks: &[(String, u64)]) -> Result<Self, SinkError> {
        let disks = disks
            .iter()
            .map(|(name, size)| ReplicaDisk::open(&Self::copy_path(dir, name), *size))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            disks,
        })
    }
}

impl CycleSink for LocalCopySink {
    fn describe(&self) -> String {
        format!("local copy in {}", self.dir.display())
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        replica::apply::apply_change(&self.disks, change)?;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), SinkError> {
        for disk in &self.disks {
            disk.sync()?;
        }
        Ok(())
    }
}

/// Reads every change fully (checksumming it, as a transport would) and drops it.
/// For benchmarks of the write path with cycles being consumed.
#[derive(Debug, Default)]
pub struct DiscardSink {
    checksum: u32,
}

impl CycleSink for DiscardSink {
    fn describe(&self) -> String {
        "discard".into()
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        if let ChangeData::Write(bytes) = change.data {
            self.checksum = crc32c::crc32c_append(self.checksum, bytes);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
