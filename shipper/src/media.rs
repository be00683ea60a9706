//! Writes a group's initial copy to a directory (external media) instead of the
//! network: the resync batches become transfer files in the format of
//! [`wire::media`], which `blkrep replica import` feeds to the replica.
//!
//! Durability: a transfer's file is written under a temporary name, synced, renamed,
//! and only then listed in the manifest (rewritten atomically), so an export cut
//! short resumes after its last listed transfer.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use tracker::Change;
use wire::api::{DiskInfo, Position, TransferKind};
use wire::chunk::{ChunkEncoder, Codec, RawChunk};
use wire::media::{read_manifest, transfer_file, Manifest, MediaTransfer, FORMAT, MANIFEST_FILE};

use crate::resync::Cursor;
use crate::sink::{ChunkFraming, CycleSink, Emit, Resume, SinkError};

/// The transfer being written.
#[derive(Debug)]
struct Writing {
    id: u64,
    kind: TransferKind,
    encoder: ChunkEncoder,
    file: File,
    path: PathBuf,
    bytes: u64,
    end: Option<Position>,
}

/// A consumer that writes transfers into an export directory.
#[derive(Debug)]
pub struct MediaExport {
    dir: PathBuf,
    manifest: Manifest,
    compression: Option<Codec>,
    writing: Option<Writing>,
    frame: Vec<u8>,
}

fn failed(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Copy {
        path: path.to_path_buf(),
        source,
    }
}

impl MediaExport {
    /// Opens (or creates) the export of group `name` in `dir`: an export of the same
    /// relationship continues after its last complete transfer; anything else there
    /// is refused rather than overwritten.
    pub fn open(
        dir: &Path,
        name: &str,
        relationship: u64,
        primary_host: &str,
        disks: Vec<DiskInfo>,
        compression: Option<Codec>,
    ) -> Result<Self, SinkError> {
        fs::create_dir_all(dir).map_err(failed(dir))?;
        let path = dir.join(MANIFEST_FILE);
        let manifest = match read_manifest(dir)? {
            Some(existing) if existing.relationship == relationship && existing.name == name => {
                existing
            }
            Some(other) => {
                return Err(SinkError::Copy {
                    path,
                    source: std::io::Error::other(format!(
                    "{} holds the export of {} for another relationship; choose an empty directory",
                    dir.display(),
                    other.name
                )),
                })
            }
            None => Manifest {
                format: FORMAT.into(),
                name: name.into(),
                relationship,
                primary_host: primary_host.into(),
                disks,
                transfers: Vec::new(),
                complete: false,
            },
        };
        Ok(MediaExport {
            dir: dir.to_path_buf(),
            manifest,
            compression,
            writing: None,
            frame: Vec::new(),
        })
    }

    /// Bytes of the complete transfers' files.
    pub fn bytes(&self) -> u64 {
        self.manifest.transfers.iter().map(|t| t.bytes).sum()
    }

    fn save(&self) -> Result<(), SinkError> {
        let path = self.dir.join(MANIFEST_FILE);
        let temporary = self.dir.join(format!("{MANIFEST_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| failed(&path)(std::io::Error::other(e)))?;
        let mut file = File::create(&temporary).map_err(failed(&temporary))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(failed(&temporary))?;
        fs::rename(&temporary, &path).map_err(failed(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(failed(&self.dir))
    }

    fn write_chunk(
        frame: &mut Vec<u8>,
        compression: Option<Codec>,
        writing: &mut Writing,
        chunk: &RawChunk<'_>,
    ) -> Result<(), SinkError> {
        frame.clear();
        chunk.frame_into(compression, frame);
        writing
            .file
            .write_all(frame)
            .map_err(failed(&writing.path))?;
        writing.bytes += frame.len() as u64;
        Ok(())
    }
}

impl ChunkFraming for MediaExport {
    fn encoder(&self) -> Option<&ChunkEncoder> {
        self.writing.as_ref().map(|writing| &writing.encoder)
    }

    fn with_encoder(
        &mut self,
        step: impl FnOnce(&mut ChunkEncoder, &mut Emit<'_>) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let Some(mut writing) = self.writing.take() else {
            return Err(failed(&self.dir)(std::io::Error::other(
                "changes arrived before a transfer began",
            )));
        };
        let (frame, compression) = (&mut self.frame, self.compression);
        let mut encoder = std::mem::replace(&mut writing.encoder, ChunkEncoder::new(0));
        let result = step(&mut encoder, &mut |chunk: RawChunk<'_>| {
            Self::write_chunk(frame, compression, &mut writing, &chunk)
        });
        writing.encoder = encoder;
        self.writing = Some(writing);
        result
    }
}

impl CycleSink for MediaExport {
    fn describe(&self) -> String {
        format!("export to {}", self.dir.display())
    }

    fn begin(&mut self, id: u64, kind: TransferKind, _bytes: u64) -> Result<Resume, SinkError> {
        if let Some(done) = self.manifest.transfers.iter().find(|t| t.id == id) {
            return Ok(Resume {
                have_chunks: 0,
                committed: true,
                resume_from: done.end.map(|end| Cursor {
                    disk: usize::try_from(end.disk).unwrap_or(usize::MAX),
                    offset: end.offset,
                }),
            });
        }
        let path = self.dir.join(format!("{}.partial", transfer_file(id)));
        let file = File::create(&path).map_err(failed(&path))?;
        self.writing = Some(Writing {
            id,
            kind,
            encoder: ChunkEncoder::new(id),
            file,
            path,
            bytes: 0,
            end: None,
        });
        Ok(Resume::default())
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        if let Some(writing) = &mut self.writing {
            writing.end = Some(Position {
                disk: u32::try_from(change.disk).unwrap_or(u32::MAX),
                offset: change.offset + change.length,
            });
        }
        self.push_change(change)
    }

    fn room(&self) -> usize {
        self.room_left()
    }

    fn cut(&mut self) -> Result<bool, SinkError> {
        self.cut_chunk()
    }

    fn commit(&mut self) -> Result<(), SinkError> {
        self.with_encoder(|encoder, emit| encoder.cut(&mut &mut *emit))?;
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        writing.file.sync_all().map_err(failed(&writing.path))?;
        let target = self.dir.join(transfer_file(writing.id));
        fs::rename(&writing.path, &target).map_err(failed(&target))?;
        if let TransferKind::Resync { last: true, .. } = writing.kind {
            self.manifest.complete = true;
        }
        self.manifest.transfers.push(MediaTransfer {
            id: writing.id,
            kind: writing.kind,
            chunks: writing.encoder.chunks(),
            bytes: writing.bytes,
            end: writing.end,
        });
        self.save()
    }
}
