//! The resync copy: the blocks a resync marked are read from the images and sent in
//! batches of about [`RESYNC_BATCH`] data bytes, one transfer each (most resyncs first
//! compare block hashes with the consumer, so only differing blocks are sent). Where
//! the copy stands survives a daemon crash; blocks not committed go back to the
//! tracker when the shipper stops. A media export writes the same batches to files.

use std::ops::ControlFlow;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use tracing::{debug, info};
use tracker::{ChangeData, ResyncReason};
use wire::api::{InitialMethod, TransferKind};
use wire::chunk::{max_record_bytes, ChunkEncoder};

use crate::compare;
use crate::media::MediaExport;
use crate::remote::CopyProgress;
use crate::resync::{read_range, Cursor, ResyncMaps, READ_PIECE};

use super::not_now;
use super::relationship::disk_infos;
use super::{new_chain, resync_id, ComparisonReport, ResyncReport, ShipperError, Worker};

/// Data bytes of one resync batch (one transfer), before compression.
pub const RESYNC_BATCH: u64 = 256 << 20;
/// A resync sends a chunk at least this often, even a small one.
const FRAME_AT_LEAST_EVERY: Duration = Duration::from_secs(5);

/// A resync being copied.
#[derive(Debug)]
pub(super) struct ResyncProgress {
    pub(super) reason: ResyncReason,
    epoch: u32,
    maps: ResyncMaps,
    pub(super) total_bytes: u64,
    /// Marked bytes from `batch_start` on (counted once per batch: a scan of the maps).
    remaining_bytes: u64,
    next_batch: u32,
    /// Where the batch being sent starts (everything before is committed).
    batch_start: Cursor,
    /// Whether that batch is the last, once decided: every offer of a batch says the
    /// same.
    batch_last: Option<bool>,
    /// Every batch is committed: the next delivered cycle finishes the resync.
    pub(super) copied: bool,
}

impl ResyncProgress {
    fn advance(&mut self, end: Cursor, last: bool) {
        self.batch_start = end;
        self.remaining_bytes = self.maps.bytes_from(end);
        self.next_batch += 1;
        self.batch_last = None;
        self.copied = last;
    }

    pub(super) fn report(&self) -> ResyncReport {
        ResyncReport {
            reason: self.reason.to_string(),
            epoch: self.epoch,
            batch: self.next_batch,
            total_bytes: self.total_bytes,
            done_bytes: self.total_bytes.saturating_sub(self.remaining_bytes),
        }
    }
}

impl Worker {
    pub(super) fn start_resync(&mut self) -> Result<(), ShipperError> {
        let reason = self
            .group
            .status()
            .resync
            .unwrap_or(ResyncReason::Requested);
        if let Some(resumed) = self.resume_interrupted_copy(reason)? {
            self.resync = Some(resumed);
            self.publish_resync();
            return Ok(());
        }
        // The new chain is durable before any of its transfers exists.
        let chain = new_chain();
        match &mut self.relationship {
            Some(relationship) => {
                relationship.state.chain = chain;
                relationship.state.copy = None;
                relationship.save()?;
            }
            None => self.local_chain = chain,
        }
        let maps = self.group.begin_resync()?;
        let mut maps = ResyncMaps::new(maps, self.block_size, self.group.disk_sizes());
        if self.compares(reason) {
            self.narrow_by_comparison(reason, &mut maps)?;
        }
        let total_bytes = maps.bytes_from(Cursor::default());
        info!(target: "blkrep_event", event = "resync_started", group = %self.group.name(), %reason, bytes = total_bytes, chain, "Resync copy starts");
        self.resync = Some(ResyncProgress {
            reason,
            epoch: chain,
            maps,
            total_bytes,
            remaining_bytes: total_bytes,
            next_batch: 0,
            batch_start: Cursor::default(),
            batch_last: None,
            copied: false,
        });
        self.publish_resync();
        Ok(())
    }

    /// Shows the resync in the status at once: an observer must never see a cycle
    /// delivered after the ring overflowed while the status shows no resync at all.
    fn publish_resync(&self) {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .resync = self.resync.as_ref().map(ResyncProgress::report);
    }

    /// Whether the initial copy goes by external media and was not exported yet.
    pub(super) fn awaits_export(&self) -> bool {
        self.relationship.as_ref().is_some_and(|r| {
            r.setup.initial == InitialMethod::Media && r.state.media_exported.is_none()
        })
    }

    /// Writes the initial copy into `dir`/<group>: the resync's batches go to files
    /// instead of the network; cycles then wait until the replica imported them.
    pub(super) fn export_initial_copy(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<String, ShipperError> {
        let name = self.group.name().to_string();
        if !self.awaits_export() {
            return Err(not_now(format!(
                "Group {name} has no initial copy to export: it needs initial_replication = \"media\" and an initial replication not yet exported"
            )));
        }
        self.ensure_enabled()?;
        if self.resync.is_none() {
            self.start_resync()?;
        }
        let Some(relationship) = &self.relationship else {
            return Ok(String::new());
        };
        let disks = disk_infos(&relationship.setup, &self.group);
        let target = dir.join(&name);
        let export = MediaExport::open(
            &target,
            &name,
            relationship.state.id,
            &relationship.setup.primary_host,
            disks,
            relationship.setup.compression,
        )?;
        info!(group = %name, dir = %target.display(), "Exporting the initial copy");
        let network = std::mem::replace(&mut self.sink, Box::new(export));
        let copied = self.copy_batches();
        let export = std::mem::replace(&mut self.sink, network);
        copied?;
        let chain = self.chain();
        if let Some(relationship) = &mut self.relationship {
            relationship.state.media_exported = Some(chain);
            relationship.save()?;
        }
        let (total, batches) = self
            .resync
            .as_ref()
            .map_or((0, 0), |r| (r.total_bytes, r.next_batch));
        info!(group = %name, dir = %target.display(), bytes = total, batches, "Initial copy exported");
        drop(export);
        Ok(format!(
            "Group {name}: {} MiB of data in {batches} transfer(s) exported to {}; carry it to the replica server and run `blkrep replica import --config FILE {}` there",
            total.div_ceil(1 << 20),
            target.display(),
            target.display()
        ))
    }

    /// Whether a resync for `reason` compares block hashes before copying, so only
    /// differing blocks are copied (equal regions cost one hash): every resync but a
    /// first copy into an empty replica, where nothing can be equal.
    fn compares(&self, reason: ResyncReason) -> bool {
        match reason {
            ResyncReason::InitialReplication => self
                .relationship
                .as_ref()
                .is_some_and(|r| r.setup.initial == InitialMethod::Existing),
            // The added disks are new to the consumer; the old disks' marks are the
            // unshipped log only, too little to be worth a comparison.
            ResyncReason::DiskAdded => false,
            ResyncReason::Requested
            | ResyncReason::RingOverflow
            | ResyncReason::UncleanHostShutdown
            | ResyncReason::ImageWriteError
            | ResyncReason::RingWriteError
            | ResyncReason::DirtyMapLost => true,
        }
    }

    /// Unmarks the blocks the consumer holds already. On failure the marks go back to
    /// the tracker, so the next attempt compares again.
    fn narrow_by_comparison(
        &mut self,
        reason: ResyncReason,
        maps: &mut ResyncMaps,
    ) -> Result<(), ShipperError> {
        let started = Instant::now();
        info!(group = %self.group.name(), %reason, bytes = maps.bytes_from(Cursor::default()), "Comparing block hashes with the consumer's copy");
        match compare::narrow(maps, &self.images, self.sink.as_mut()) {
            Ok(Some(stats)) => {
                info!(group = %self.group.name(), marked = stats.marked_bytes, differing = stats.differing_bytes, hashes = stats.hashes, requests = stats.requests, seconds = started.elapsed().as_secs(), "Block comparison done; only differing blocks are copied");
                self.status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .last_comparison = Some(ComparisonReport {
                    marked_bytes: stats.marked_bytes,
                    differing_bytes: stats.differing_bytes,
                    hashes: stats.hashes,
                });
                Ok(())
            }
            Ok(None) => {
                info!(group = %self.group.name(), consumer = %self.sink.describe(), "The consumer cannot compare blocks; every marked block is copied");
                Ok(())
            }
            Err(error) => {
                self.group
                    .abort_resync(&maps.remaining(Cursor::default()), reason);
                Err(error.into())
            }
        }
    }

    /// After a daemon crash mid-copy: the copy of the current chain continues with the
    /// batch the relationship record names, from where the tracker says it started
    /// (the log holds every write since the copy began). `None` when there is no such
    /// copy; then a new resync copies every marked block.
    fn resume_interrupted_copy(
        &mut self,
        reason: ResyncReason,
    ) -> Result<Option<ResyncProgress>, ShipperError> {
        let Some((disk, offset)) = self.group.resumable_copy() else {
            return Ok(None);
        };
        let Some((chain, copy)) = self.relationship.as_ref().and_then(|relationship| {
            let state = &relationship.state;
            state
                .copy
                .filter(|copy| copy.chain == state.chain)
                .map(|copy| (state.chain, copy))
        }) else {
            return Ok(None);
        };
        let maps = self.group.resume_copy()?;
        let mut maps = ResyncMaps::new(maps, self.block_size, self.group.disk_sizes());
        if self.compares(reason) {
            // The tracker marked everything from the position on: compare it again
            // rather than send what the replica has.
            self.narrow_by_comparison(reason, &mut maps)?;
        }
        let start = Cursor { disk, offset };
        let remaining_bytes = maps.bytes_from(start);
        info!(group = %self.group.name(), %reason, chain, batch = copy.batch, remaining = remaining_bytes, "Resync copy resumes after the daemon stopped uncleanly");
        Ok(Some(ResyncProgress {
            reason,
            epoch: chain,
            maps,
            total_bytes: copy.total_bytes.max(remaining_bytes),
            remaining_bytes,
            next_batch: copy.batch,
            batch_start: start,
            batch_last: Some(copy.last),
            copied: false,
        }))
    }

    /// Makes where the copy stands survive a daemon crash: the tracker records where
    /// the batch starts, the relationship record which batch it is.
    fn record_copy_position(&mut self, batch: u32, last: bool) -> Result<(), ShipperError> {
        let Some(resync) = &self.resync else {
            return Ok(());
        };
        let (start, epoch, total_bytes) = (resync.batch_start, resync.epoch, resync.total_bytes);
        self.group.note_copy_position(start.disk, start.offset)?;
        if let Some(relationship) = &mut self.relationship {
            let copy = CopyProgress {
                chain: epoch,
                batch,
                last,
                total_bytes,
            };
            if relationship.state.copy != Some(copy) {
                relationship.state.copy = Some(copy);
                relationship.save()?;
            }
        }
        Ok(())
    }

    /// Gives the blocks a resync has not committed back to the tracker: when the
    /// shipper stops (a clean shutdown saves them), or to start the resync again.
    pub(super) fn hand_back_resync(&mut self) {
        if let Some(resync) = self.resync.take() {
            let remaining = resync.maps.remaining(resync.batch_start);
            self.group.abort_resync(&remaining, resync.reason);
        }
    }

    /// Sends the resync's batches that are not committed yet.
    pub(super) fn copy_batches(&mut self) -> Result<(), ShipperError> {
        loop {
            let Some(resync) = &mut self.resync else {
                return Ok(());
            };
            if resync.copied {
                return Ok(());
            }
            let remaining = resync.remaining_bytes;
            let last = *resync.batch_last.get_or_insert(remaining <= RESYNC_BATCH);
            let (batch, start) = (resync.next_batch, resync.batch_start);
            let id = resync_id(resync.epoch, batch);
            let kind = TransferKind::Resync {
                epoch: u64::from(resync.epoch),
                batch,
                last,
            };
            let bound = if last {
                remaining
            } else {
                remaining.min(RESYNC_BATCH + READ_PIECE)
            };
            // At worst one record per 4 KiB grain.
            let bytes = max_record_bytes(bound / 4096 + 2, bound);
            self.record_copy_position(batch, last)?;
            let answer = self.sink.begin(id, kind, bytes)?;
            let have = answer.have_chunks;
            let end_of_disks = Cursor {
                disk: self.images.len(),
                offset: 0,
            };
            let end = if answer.committed {
                match (answer.resume_from, last) {
                    (Some(end), _) => end,
                    // An empty last batch: nothing was left to copy.
                    (None, true) => end_of_disks,
                    (None, false) => return Err(ShipperError::ResyncLost { batch, have }),
                }
            } else {
                let end = if have == 0 {
                    self.stream_batch(start, 0, last)?
                } else {
                    // The replica says where the data it holds ends: the chunks from
                    // `have` on continue from there.
                    let from = answer
                        .resume_from
                        .filter(|from| *from >= start && from.disk < self.images.len())
                        .ok_or(ShipperError::ResyncLost { batch, have })?;
                    self.sink.resume_at(have);
                    debug!(group = %self.group.name(), batch, have, ?from, "Resuming a resync batch");
                    // Bytes of the batch the replica holds, as the batch size counts them.
                    let sent = self.resync.as_ref().map_or(0, |resync| {
                        resync.maps.bytes_from(start) - resync.maps.bytes_from(from)
                    });
                    self.stream_batch(from, sent, last)?
                };
                self.sink.commit()?;
                end
            };
            if let Some(resync) = &mut self.resync {
                resync.advance(end, last);
            }
        }
    }

    /// Streams one batch from `from`, `sent` data bytes of it being on the replica
    /// already. A batch that is not the last ends once it holds [`RESYNC_BATCH`] data
    /// bytes. Returns where it ended.
    fn stream_batch(
        &mut self,
        from: Cursor,
        sent: u64,
        last: bool,
    ) -> Result<Cursor, ShipperError> {
        let Worker {
            resync,
            sink,
            images,
            buffer,
            ..
        } = self;
        let Some(resync) = resync else {
            return Ok(Cursor::default());
        };
        let mut sent = sent;
        let mut framed_at = Instant::now();
        for (disk, run_start, run_end) in resync.maps.runs_from(from) {
            let Some((path, image)) = images.get(disk) else {
                continue;
            };
            let flow = read_range::<ShipperError>(
                image,
                path,
                disk,
                run_start,
                run_end,
                buffer,
                &mut |change| {
                    // A chunk also ends when it has been filling for a while (long
                    // runs of zeroes take many reads for few bytes), so the upload
                    // never idles long enough for the replica to cut it.
                    if sink.room() < ChunkEncoder::encoded_len(change)
                        || framed_at.elapsed() >= FRAME_AT_LEAST_EVERY
                    {
                        sink.cut()?;
                        framed_at = Instant::now();
                    }
                    sink.apply(change)?;
                    if let ChangeData::Write(bytes) = change.data {
                        sent += bytes.len() as u64;
                    }
                    Ok(if !last && sent >= RESYNC_BATCH {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                },
            )?;
            if let ControlFlow::Break(offset) = flow {
                sink.cut()?;
                return Ok(Cursor { disk, offset });
            }
        }
        sink.cut()?;
        Ok(Cursor {
            disk: images.len(),
            offset: 0,
        })
    }
}
