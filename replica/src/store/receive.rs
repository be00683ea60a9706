//! Receiving transfers: offers checked against the chain of cycles, chunks checked and
//! stored in the `.part` file, the commit that makes a transfer durable and queues it,
//! the `.part` file cut after its last valid chunk on restart, and imports from
//! external media through the same steps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use wire::api::{Position, TransferAnswer, TransferKind, TransferOffer};
use wire::chunk::{CheckedFrame, ChunkError, ChunkHeader, CHUNK_HEADER_LEN};
use wire::media::{transfer_file, Manifest};

use super::transfer_file::PartWriter;
use super::{free_space, sync_dir, Claim, Queued, Replica, StoreError};
use image_ops::apply::ApplyError;

/// Transfer ids remembered after commit, to answer retries.
const RECENT_COMMITS: usize = 64;

/// The answer to an offer of a transfer committed before.
const ALREADY_COMMITTED: TransferAnswer = TransferAnswer {
    have_chunks: 0,
    committed: true,
    resume_from: None,
    codecs: Vec::new(),
};

impl Replica {
    /// Checks a new transfer against the chain and the replica's state; for a retry of
    /// the transfer being received, says how many chunks are stored.
    pub fn offer(
        &mut self,
        claim: Claim,
        offer: &TransferOffer,
    ) -> Result<TransferAnswer, StoreError> {
        self.check_relationship(claim)?;
        if self.is_committed(offer.id) {
            return Ok(match offer.kind {
                TransferKind::Resync { .. } => TransferAnswer {
                    resume_from: self.state.resync_position,
                    ..ALREADY_COMMITTED
                },
                TransferKind::Delta { .. } => ALREADY_COMMITTED,
            });
        }
        if self.state.paused {
            return Err(StoreError::Paused(self.state.name.clone()));
        }
        match offer.kind {
            TransferKind::Delta { cycle, .. } => {
                if self.state.resync_epoch.is_some() {
                    return Err(StoreError::ChainBroken(format!(
                        "cycle {cycle} offered while a resync is unfinished"
                    )));
                }
                match self.state.last_received_cycle {
                    Some(last) if cycle <= last && !self.state.accept_any_cycle => {
                        return Ok(ALREADY_COMMITTED);
                    }
                    Some(last) if cycle == last + 1 => {}
                    _ if self.state.accept_any_cycle => {}
                    last => {
                        return Err(StoreError::ChainBroken(format!(
                            "cycle {cycle} does not follow the last received cycle ({})",
                            last.map_or(
                                "none; the initial replication has not finished".into(),
                                |l| l.to_string()
                            )
                        )));
                    }
                }
            }
            TransferKind::Resync { epoch, batch, .. } => {
                let expected = if self.state.resync_epoch == Some(epoch) {
                    self.state.resync_next_batch
                } else {
                    0
                };
                if batch != expected {
                    return Err(StoreError::ChainBroken(format!(
                        "resync {epoch:#x} batch {batch} offered where batch {expected} was expected"
                    )));
                }
            }
        }
        let retry = Queued {
            id: offer.id,
            kind: offer.kind,
            chunks: None,
        };
        if self
            .state
            .receiving
            .is_some_and(|r| r.id == retry.id && same_transfer(r.kind, retry.kind))
        {
            return Ok(TransferAnswer {
                have_chunks: self.part_chunks,
                committed: false,
                resume_from: self.part_end,
                codecs: Vec::new(),
            });
        }
        // The transfer's file, and as much again at worst for the blocks its apply
        // allocates in the replica disks (writes into holes): a committed transfer must
        // be appliable, or the replica would sit half-applied until space is freed.
        // The spare goes first when space is short.
        let need = offer.bytes.saturating_mul(2);
        if let Err(short) = self.ensure_free(need) {
            if !self.drop_spare() {
                return Err(short);
            }
            self.ensure_free(need)?;
        }
        // A new transfer abandons an unfinished one.
        if let Some(old) = self.state.receiving.take() {
            let _ = fs::remove_file(self.part_path(old.id));
        }
        let path = self.part_path(offer.id);
        self.create_part(&path, offer.id)?;
        self.state.receiving = Some(Queued {
            id: offer.id,
            kind: offer.kind,
            chunks: None,
        });
        self.state.receiving_bytes = Some(offer.bytes);
        self.forget_part();
        self.save()?;
        Ok(TransferAnswer {
            have_chunks: 0,
            committed: false,
            resume_from: None,
            codecs: Vec::new(),
        })
    }

    /// Fails unless `bytes` more fit on the storage with the reserve left free.
    fn ensure_free(&self, bytes: u64) -> Result<(), StoreError> {
        let needed = bytes.saturating_add(self.reserve);
        let free = free_space(&self.dir)?;
        if free < needed {
            return Err(StoreError::NoSpace {
                name: self.state.name.clone(),
                needed,
                free,
            });
        }
        Ok(())
    }

    /// Whether transfer `id` was committed (and is queued or applied).
    fn is_committed(&self, id: u64) -> bool {
        self.state.recent_commits.contains(&id) || self.state.queue.iter().any(|q| q.id == id)
    }

    /// Stores chunk `index` of transfer `id`, after checking it completely. Not
    /// synced: [`Replica::commit`] makes the transfer durable.
    pub fn put_chunk(
        &mut self,
        claim: Claim,
        id: u64,
        index: u32,
        frame: &[u8],
    ) -> Result<u32, StoreError> {
        self.check_relationship(claim)?;
        let Some(receiving) = self.state.receiving.filter(|r| r.id == id) else {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} was not offered (or was abandoned)"
            )));
        };
        if index < self.part_chunks {
            // An upload the primary gave up on that arrived after all: the chunk is
            // stored already (a retry re-encodes the same bytes).
            return Ok(self.part_chunks);
        }
        if index != self.part_chunks {
            return Err(StoreError::Conflict(format!(
                "chunk {index} of transfer {id:#x} arrived where chunk {} was expected",
                self.part_chunks
            )));
        }
        let checked = CheckedFrame::check(frame)?;
        checked.header.expect(receiving.id, index)?;
        if checked.header.frame_len() != frame.len() {
            return Err(ChunkError::Truncated {
                have: frame.len(),
                need: checked.header.frame_len(),
            }
            .into());
        }
        // The offer's size is what the space check allowed for: a primary may not
        // send more than it announced.
        let raw = self.part_raw + u64::from(checked.header.raw_len);
        if let Some(offered) = self.state.receiving_bytes.filter(|offered| raw > *offered) {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} was offered with {offered} bytes; chunk {index} brings it to {raw}"
            )));
        }
        // Other replicas share the storage: the reserve is checked again for each
        // chunk, not just at the offer.
        self.ensure_free(frame.len() as u64)?;
        let mut scratch = Vec::new();
        let mut end = self.part_end;
        for change in checked.records(&mut scratch)? {
            let change = change?;
            end = record_end(change.disk, change.offset, change.length);
            let fits = self.state.disks.get(change.disk).is_some_and(|d| {
                change
                    .offset
                    .checked_add(change.length)
                    .is_some_and(|end| end <= d.size)
            });
            if !fits {
                return Err(ApplyError::OutOfRange {
                    disk: change.disk,
                    offset: change.offset,
                    length: change.length,
                }
                .into());
            }
        }
        let path = self.part_path(id);
        let writer = match self.part_writer.take() {
            Some(writer) if writer.continues(id, self.part_len) => writer,
            // With points kept the apply reads the file twice: through the page
            // cache, where the writes leave it (see `transfer_file`).
            _ => PartWriter::open(&path, id, self.part_len, !self.history.is_active())
                .map_err(StoreError::io("open", &path))?,
        };
        // A failed append leaves no partial frame behind (a full disk, typically).
        let writer = self.part_writer.insert(writer);
        writer.append(frame).map_err(|source| StoreError::Io {
            what: "store chunk in",
            path,
            source,
        })?;
        self.part_chunks += 1;
        self.part_len += frame.len() as u64;
        self.part_raw = raw;
        self.part_end = end;
        Ok(self.part_chunks)
    }

    /// Ends transfer `id` of `chunks` chunks: it becomes durable and queued for apply.
    pub fn commit(&mut self, claim: Claim, id: u64, chunks: u32) -> Result<(), StoreError> {
        self.check_relationship(claim)?;
        if self.is_committed(id) {
            return Ok(());
        }
        let Some(receiving) = self.state.receiving.filter(|r| r.id == id) else {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} was not offered"
            )));
        };
        if chunks != self.part_chunks {
            return Err(StoreError::Conflict(format!(
                "transfer {id:#x} has {} chunks stored, the primary sent {chunks}",
                self.part_chunks
            )));
        }
        let (part, received) = (self.part_path(id), self.received_path(id));
        // The chunks were written as they came; one sync makes them all durable. A
        // recycled file keeps its older bytes after them: the queue records how many
        // chunks the transfer has (see `spare`).
        File::open(&part)
            .and_then(|file| file.sync_data())
            .map_err(StoreError::io("sync", &part))?;
        fs::rename(&part, &received).map_err(StoreError::io("move", &part))?;
        sync_dir(&self.dir.join("received"))?;
        sync_dir(&self.dir.join("incoming"))?;
        let state = &mut self.state;
        state.receiving = None;
        state.receiving_bytes = None;
        state.queue.push_back(Queued {
            chunks: Some(chunks),
            ..receiving
        });
        state.recent_commits.push_back(id);
        while state.recent_commits.len() > RECENT_COMMITS {
            state.recent_commits.pop_front();
        }
        match receiving.kind {
            TransferKind::Delta { cycle, .. } => {
                state.last_received_cycle = Some(cycle);
                state.accept_any_cycle = false;
            }
            TransferKind::Resync { epoch, batch, last } => {
                state.resync_position = self.part_end;
                if batch == 0 {
                    // A resync restarts the chain: the cycles it replaces are void.
                    state.last_received_cycle = None;
                    state.consistent = false;
                }
                state.resync_epoch = (!last).then_some(epoch);
                state.resync_next_batch = batch + 1;
                state.accept_any_cycle = last;
            }
        }
        self.forget_part();
        self.save()
    }

    /// Forgets the `.part` file's chunks and closes it: a new transfer starts empty.
    fn forget_part(&mut self) {
        self.part_chunks = 0;
        self.part_len = 0;
        self.part_raw = 0;
        self.part_end = None;
        self.part_writer = None;
    }

    /// Cuts the `.part` file after its last valid chunk.
    pub(super) fn recover_part(&mut self) -> Result<(), StoreError> {
        self.part_writer = None;
        let Some(receiving) = self.state.receiving else {
            return Ok(());
        };
        let path = self.part_path(receiving.id);
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_part();
                return Ok(());
            }
            Err(e) => return Err(StoreError::io("open", &path)(e)),
        };
        let (mut chunks, mut len, mut raw, mut end) = (0u32, 0u64, 0u64, None);
        let (mut frame, mut scratch) = (Vec::new(), Vec::new());
        while let Ok(true) = read_frame(&mut file, &mut frame) {
            let Ok(checked) = CheckedFrame::check(&frame) else {
                break;
            };
            if checked.header.expect(receiving.id, chunks).is_err() {
                break;
            }
            // Checked when it was stored; a frame that no longer decodes ends the file.
            let Ok(records) = checked.records(&mut scratch) else {
                break;
            };
            let mut frame_end = end;
            let mut whole = true;
            for change in records {
                match change {
                    Ok(change) => frame_end = record_end(change.disk, change.offset, change.length),
                    Err(_) => whole = false,
                }
            }
            if !whole {
                break;
            }
            end = frame_end;
            chunks += 1;
            len += frame.len() as u64;
            raw += u64::from(checked.header.raw_len);
        }
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io("truncate", &path))?;
        self.part_chunks = chunks;
        self.part_len = len;
        self.part_raw = raw;
        self.part_end = end;
        Ok(())
    }

    /// Deletes files no state refers to (a crash between a rename and the state save).
    pub(super) fn remove_strays(&self) -> Result<(), StoreError> {
        let keep_part = self.state.receiving.map(|r| self.part_path(r.id));
        let keep: Vec<PathBuf> = (self.state.queue.iter().map(|q| q.id))
            .chain(self.state.unsynced.iter().map(|u| u.id))
            .map(|id| self.received_path(id))
            .collect();
        for (sub, wanted) in [
            ("incoming", keep_part.into_iter().collect::<Vec<_>>()),
            ("received", keep),
        ] {
            let dir = self.dir.join(sub);
            let entries = fs::read_dir(&dir).map_err(StoreError::io("list", &dir))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if !wanted.contains(&path) {
                    tracing::info!(path = %path.display(), "Removing a transfer file no state refers to");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// Feeds the transfers of an export (external media) in `dir`, as described by
    /// `manifest`, through the same checks as transfers from the network; the
    /// replica then accepts transfers from the network again. Transfers committed
    /// before (an import run twice, or cut short) are skipped. Returns the transfers
    /// newly committed.
    pub fn import(&mut self, dir: &Path, manifest: &Manifest) -> Result<u32, StoreError> {
        let state = &self.state;
        if manifest.name != state.name || manifest.disks != state.disks {
            return Err(StoreError::Conflict(format!(
                "the export is of {} with other disks than replica {}",
                manifest.name, state.name
            )));
        }
        // The export was made by the primary that owns the replica, at its epoch.
        let claim = Claim {
            relationship: manifest.relationship,
            epoch: self.state.epoch,
        };
        self.check_relationship(claim)?;
        if !manifest.complete {
            return Err(StoreError::Conflict(
                "the export is incomplete: its last transfer is missing (run the export again to finish it)".into(),
            ));
        }
        let mut imported = 0;
        let mut frame = Vec::new();
        for transfer in &manifest.transfers {
            let offer = TransferOffer {
                id: transfer.id,
                kind: transfer.kind,
                bytes: transfer.bytes,
            };
            let answer = self.offer(claim, &offer)?;
            if answer.committed {
                continue;
            }
            let path = dir.join(transfer_file(transfer.id));
            let mut file = File::open(&path).map_err(StoreError::io("open", &path))?;
            let mut index = 0u32;
            while read_frame(&mut file, &mut frame).map_err(StoreError::io("read", &path))? {
                if index >= answer.have_chunks {
                    self.put_chunk(claim, transfer.id, index, &frame)?;
                }
                index += 1;
            }
            self.commit(claim, transfer.id, transfer.chunks)?;
            imported += 1;
        }
        self.state.awaiting_import = false;
        self.save()?;
        Ok(imported)
    }
}

/// Where a record ends, as a [`Position`].
fn record_end(disk: usize, offset: u64, length: u64) -> Option<Position> {
    Some(Position {
        disk: u32::try_from(disk).ok()?,
        offset: offset.checked_add(length)?,
    })
}

/// Whether two offers with the same id are the same transfer. A delta's point
/// metadata may differ between attempts: a primary that restarted dates a cycle closed
/// before anew.
fn same_transfer(a: TransferKind, b: TransferKind) -> bool {
    match (a, b) {
        (TransferKind::Delta { cycle: x, .. }, TransferKind::Delta { cycle: y, .. }) => x == y,
        _ => a == b,
    }
}

/// Reads the next frame of a transfer file into `frame`; `false` at the end of the file.
/// A frame whose header is invalid or whose body is cut short is an error.
pub(super) fn read_frame(file: &mut File, frame: &mut Vec<u8>) -> io::Result<bool> {
    frame.resize(CHUNK_HEADER_LEN, 0);
    let mut got = 0;
    while got < CHUNK_HEADER_LEN {
        match file.read(&mut frame[got..])? {
            0 if got == 0 => return Ok(false),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let header =
        ChunkHeader::parse(frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    frame.resize(header.frame_len(), 0);
    file.read_exact(&mut frame[CHUNK_HEADER_LEN..])?;
    Ok(true)
}
