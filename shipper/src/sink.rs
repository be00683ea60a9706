//! Consumers of closed cycles.

use std::path::{Path, PathBuf};

use image_ops::hash::{Hash, HashError};
use image_ops::{ApplyError, ReplicaDisk};
use thiserror::Error;
use tracker::{Change, ChangeData};
use wire::api::{ByteRange, EnableRequest, TransferKind};
use wire::chunk::{ChunkEncoder, RawChunk};

use crate::pipeline::compress::CompressionStatus;
use crate::pipeline::upload::LinkMeter;
use crate::remote::{ClientError, FailureClass};
use crate::resync::Cursor;

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
    /// Hashing the local copy failed.
    #[error("Cannot hash the local copy")]
    Hash(#[from] HashError),
    /// An export's manifest cannot be read.
    #[error("Export")]
    Media(#[from] wire::media::MediaError),
    /// The consumer cannot take the group over (a local copy).
    #[error("{0} cannot be failed over to")]
    NoFailover(String),
    /// The replica server failed or refused.
    #[error("Replica server {url}")]
    Remote {
        /// The server.
        url: String,
        /// The cause.
        #[source]
        source: ClientError,
    },
}

impl SinkError {
    /// How the shipper reacts to this failure.
    pub fn class(&self) -> FailureClass {
        match self {
            SinkError::Remote { source, .. } => source.class(),
            // A local failure (a full disk, typically): try again next interval.
            SinkError::Apply(_)
            | SinkError::Copy { .. }
            | SinkError::Hash(_)
            | SinkError::Media(_)
            | SinkError::NoFailover(_) => FailureClass::NextInterval,
        }
    }
}

/// Where a transfer resumes, as the consumer answered its offer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    /// Chunks of the transfer the consumer holds already.
    pub have_chunks: u32,
    /// The consumer has the whole transfer (its commit answer was lost): nothing to send.
    pub committed: bool,
    /// For a resync batch: where the data the consumer holds of it ends, so a shipper
    /// that restarted continues there.
    pub resume_from: Option<Cursor>,
}

/// Where closed cycles go. For every transfer (a delta cycle, or a batch of a resync)
/// the shipper calls [`CycleSink::begin`], then [`CycleSink::apply`] for each change,
/// then [`CycleSink::commit`]; it acknowledges a cycle (freeing its ring space) only
/// when `commit` returned `Ok`, which must mean the changes are durable.
///
/// Consumers that send chunks (the replica) resume an interrupted transfer: `begin`
/// says how many chunks they hold, and the changes of those chunks are encoded again
/// but not sent. A resync resumes mid-batch with [`CycleSink::resume_at`] instead, at
/// a chunk boundary it marked with [`CycleSink::cut`].
pub trait CycleSink: Send {
    /// A short description for status and logs.
    fn describe(&self) -> String;
    /// Creates the consumer's side of the relationship (idempotent). Local consumers
    /// have nothing to create.
    fn enable(&mut self, _request: &EnableRequest) -> Result<(), SinkError> {
        Ok(())
    }
    /// The relationship every later request belongs to, and its failover epoch
    /// (replica consumers).
    fn set_relationship(&mut self, _id: u64, _epoch: u64) {}
    /// Announces a transfer of at most `bytes` record bytes.
    fn begin(&mut self, _id: u64, _kind: TransferKind, _bytes: u64) -> Result<Resume, SinkError> {
        Ok(Resume::default())
    }
    /// Continues the transfer begun last at chunk `index` (resyncs only).
    fn resume_at(&mut self, _index: u32) {}
    /// Applies one change.
    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError>;
    /// Record bytes the current chunk can still take without splitting a change.
    fn room(&self) -> usize {
        usize::MAX
    }
    /// Ends the current chunk, so the next change starts a new one. Returns whether a
    /// chunk ended (`false` when the current one was empty, or chunks are not a thing
    /// for this consumer).
    fn cut(&mut self) -> Result<bool, SinkError> {
        Ok(false)
    }
    /// Makes every applied change durable.
    fn commit(&mut self) -> Result<(), SinkError>;
    /// Called while idle, at least every few seconds: keep connections alive.
    fn idle(&mut self) {}
    /// Deletes the consumer's side of the relationship.
    fn remove(&mut self, _name: &str) -> Result<(), SinkError> {
        Ok(())
    }
    /// Planned failover: the consumer, which applied every cycle up to `cycle`
    /// (the last), becomes the group's live copy.
    fn fail_over(&mut self, _cycle: u64) -> Result<(), SinkError> {
        Err(SinkError::NoFailover(self.describe()))
    }
    /// Bytes sent over the network so far (after compression), frames lost to an
    /// interruption and sent again included.
    fn bytes_sent(&self) -> u64 {
        0
    }
    /// A live view of [`CycleSink::bytes_sent`] that status reads mid-delivery, while
    /// the shipper thread is busy (network consumers).
    fn sent_meter(&self) -> Option<std::sync::Arc<LinkMeter>> {
        None
    }
    /// How the consumer compresses, for status (network consumers).
    fn compression(&self) -> Option<CompressionStatus> {
        None
    }
    /// BLAKE3 hashes of `ranges` of the consumer's copy of disk `disk` (see
    /// [`image_ops::hash`]), once everything committed is applied there; `None` when
    /// the consumer cannot compare, and every block is sent.
    fn hashes(
        &mut self,
        _disk: usize,
        _ranges: &[ByteRange],
    ) -> Result<Option<Vec<Hash>>, SinkError> {
        Ok(None)
    }
}

/// Where a chunk frame goes.
pub(crate) type Emit<'a> = dyn FnMut(RawChunk<'_>) -> Result<(), SinkError> + 'a;

/// A consumer that packs changes into chunk frames with a [`ChunkEncoder`] (the
/// replica client, the media export): the chunk-level [`CycleSink`] steps, once.
pub(crate) trait ChunkFraming {
    /// The encoder of the transfer in progress.
    fn encoder(&self) -> Option<&ChunkEncoder>;

    /// Runs `step` on the encoder of the transfer in progress, with where its frames
    /// go.
    fn with_encoder(
        &mut self,
        step: impl FnOnce(&mut ChunkEncoder, &mut Emit<'_>) -> Result<(), SinkError>,
    ) -> Result<(), SinkError>;

    /// [`CycleSink::apply`].
    fn push_change(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        self.with_encoder(|encoder, emit| encoder.push(change, &mut &mut *emit))
    }

    /// [`CycleSink::room`].
    fn room_left(&self) -> usize {
        self.encoder().map_or(usize::MAX, ChunkEncoder::room)
    }

    /// [`CycleSink::cut`].
    fn cut_chunk(&mut self) -> Result<bool, SinkError> {
        let before = self.encoder().map(ChunkEncoder::chunks);
        self.with_encoder(|encoder, emit| encoder.cut(&mut &mut *emit))?;
        Ok(self.encoder().map(ChunkEncoder::chunks) != before)
    }
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
                image_ops::copy::sparse_copy(image, &target).map_err(|source| SinkError::Copy {
                    path: target,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Makes empty copies (sparse, all zeroes) of disks `disks` (name, size) added to
    /// a group whose tracking runs: a resync fills them. A copy there already (an add
    /// cut short) is made again.
    pub fn create_empty(dir: &Path, disks: &[(String, u64)]) -> Result<(), SinkError> {
        for (name, size) in disks {
            let path = Self::copy_path(dir, name);
            let created = std::fs::File::create(&path)
                .and_then(|file| file.set_len(*size).and_then(|()| file.sync_all()));
            created.map_err(|source| SinkError::Copy { path, source })?;
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
        image_ops::apply::apply_change(&self.disks, change)?;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), SinkError> {
        for disk in &self.disks {
            disk.sync()?;
        }
        Ok(())
    }

    fn hashes(
        &mut self,
        disk: usize,
        ranges: &[ByteRange],
    ) -> Result<Option<Vec<Hash>>, SinkError> {
        let Some(copy) = self.disks.get(disk) else {
            return Err(HashError::Invalid(format!("no disk {disk}")).into());
        };
        Ok(Some(image_ops::hash::hash_ranges(
            copy.file(),
            copy.size(),
            ranges,
        )?))
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
