//! Applying received transfers, oldest first: the replica is marked inconsistent, the
//! transfer's changes are written to the disks (what they overwrite captured first
//! when recovery points are kept) and synced, then the transfer is recorded as applied
//! and its file kept as the spare for the next transfer (see `spare`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracker::ChangeData;
use wire::api::TransferKind;
use wire::chunk::CheckedFrame;

use super::receive::read_frame;
use super::{now_unix, PointStamp, Queued, Replica, StoreError};
use crate::history::History;
use image_ops::apply::{apply_change, ReplicaDisk};

impl Replica {
    /// Applies the oldest received transfer, if any. Returns what it was.
    pub fn apply_next(&mut self, disks: &[ReplicaDisk]) -> Result<Option<Queued>, StoreError> {
        let Some((next, path)) = self.begin_apply()? else {
            return Ok(None);
        };
        let started = Instant::now();
        let applied = apply_transfer(&path, next.id, next.chunks, disks, &self.history)?;
        self.note_apply(applied.written, started.elapsed());
        self.finish_apply(next)?;
        Ok(Some(next))
    }

    /// First step of applying: the oldest received transfer and its file; the replica
    /// is marked inconsistent until [`Replica::finish_apply`]. The file is applied with
    /// [`apply_transfer`] without holding the replica (receiving goes on meanwhile).
    pub fn begin_apply(&mut self) -> Result<Option<(Queued, PathBuf)>, StoreError> {
        self.check_present()?;
        let Some(next) = self.state.queue.front().copied() else {
            return Ok(None);
        };
        if let (TransferKind::Resync { .. }, Some(latest)) = (next.kind, self.state.latest) {
            // The resync's blocks make the disks fuzzy until the delta after it: the
            // last consistent state survives only as a point.
            if self.state.recovery.points > 0 {
                self.take_point(latest, true)?;
            } else {
                tracing::warn!(replica = %self.state.name, cycle = latest.cycle, "A resync overwrites the replica's only consistent state: no failover is possible until it ends (keep recovery points to keep one)");
            }
            self.state.latest = None;
            self.save()?;
        }
        if self.state.consistent {
            // From here until the apply ends the disks are mid-change.
            self.state.consistent = false;
            self.save()?;
        }
        Ok(Some((next, self.received_path(next.id))))
    }

    /// Last step of applying `applied` (the transfer [`Replica::begin_apply`] returned,
    /// applied and synced): records it and keeps its file as the spare.
    pub fn finish_apply(&mut self, applied: Queued) -> Result<(), StoreError> {
        // Points are taken below: no history file may be made at a removed path.
        self.check_present()?;
        if self.state.queue.front() != Some(&applied) {
            return Err(StoreError::Conflict(format!(
                "transfer {:#x} is not the next to apply",
                applied.id
            )));
        }
        let state = &mut self.state;
        state.queue.pop_front();
        if let TransferKind::Delta {
            cycle,
            closed_unix_ms,
            app_consistent,
        } = applied.kind
        {
            state.last_applied_cycle = Some(cycle);
            state.last_applied_unix = Some(now_unix());
            // A delta is offered only after every batch of a resync was committed, and
            // applies after them: whatever came before, the disks now hold the
            // primary's state at this cycle.
            state.consistent = true;
            let stamp = PointStamp {
                cycle,
                closed_unix_ms,
                app_consistent,
            };
            state.latest = Some(stamp);
            self.take_point(stamp, false)?;
        }
        self.save()?;
        self.keep_as_spare(&self.received_path(applied.id));
        self.age_out()
    }

    /// Counts an applied transfer of `bytes` data bytes that took `took` (saved with
    /// the next [`Replica::finish_apply`]).
    pub fn note_apply(&mut self, bytes: u64, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let applied = &mut self.state.applied;
        applied.transfers += 1;
        applied.bytes = applied.bytes.saturating_add(bytes);
        applied.micros = applied.micros.saturating_add(micros);
        applied.last_micros = micros;
    }
}

/// What applying one transfer took, phase by phase (the log line of each apply shows
/// it, so an admin can tell a slow disk from a slow history).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppliedTransfer {
    /// Data bytes written to the disks.
    pub written: u64,
    /// Reading what the changes overwrite into the recovery history.
    pub capture: Duration,
    /// Making that undo data durable.
    pub history_sync: Duration,
    /// Writing the changes to the disks.
    pub write: Duration,
    /// Making the disks durable.
    pub disk_sync: Duration,
}

/// Applies every change of the received transfer file `path` (transfer `id`, of
/// `chunks` chunks, or as many as the file holds when `None`) to `disks` and syncs
/// them. With recovery points kept, what the changes overwrite is first captured in
/// `history` and synced.
pub fn apply_transfer(
    path: &Path,
    id: u64,
    chunks: Option<u32>,
    disks: &[ReplicaDisk],
    history: &History,
) -> Result<AppliedTransfer, StoreError> {
    let _guard = history.apply_guard();
    let mut applied = AppliedTransfer::default();
    let mut phase = Instant::now();
    let mut lap = |took: &mut Duration| {
        *took = phase.elapsed();
        phase = Instant::now();
    };
    if history.is_active() {
        for_each_change(path, id, chunks, |change| {
            history.capture(disks, change.disk, change.offset, change.length)?;
            Ok(())
        })?;
        lap(&mut applied.capture);
        history.sync()?;
        lap(&mut applied.history_sync);
    }
    for_each_change(path, id, chunks, |change| {
        apply_change(disks, change)?;
        if let ChangeData::Write(bytes) = change.data {
            applied.written += bytes.len() as u64;
        }
        Ok(())
    })?;
    lap(&mut applied.write);
    for disk in disks {
        disk.sync()?;
    }
    lap(&mut applied.disk_sync);
    Ok(applied)
}

/// Calls `each` with every change of the transfer file `path` (transfer `id`, of
/// `chunks` chunks, or as many as the file holds), in order.
fn for_each_change(
    path: &Path,
    id: u64,
    chunks: Option<u32>,
    mut each: impl FnMut(&tracker::Change<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut file = File::open(path).map_err(StoreError::io("open", path))?;
    let (mut frame, mut scratch) = (Vec::new(), Vec::new());
    let mut index = 0u32;
    while chunks.is_none_or(|chunks| index < chunks) {
        if !read_frame(&mut file, &mut frame).map_err(StoreError::io("read", path))? {
            if let Some(chunks) = chunks {
                return Err(StoreError::ShortTransfer {
                    path: path.to_path_buf(),
                    have: index,
                    chunks,
                });
            }
            break;
        }
        let checked = CheckedFrame::check(&frame)?;
        checked.header.expect(id, index)?;
        for change in checked.records(&mut scratch)? {
            each(&change?)?;
        }
        index += 1;
    }
    Ok(())
}
