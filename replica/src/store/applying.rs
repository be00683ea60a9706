//! Applying received transfers, oldest first: the replica is marked inconsistent, the
//! transfer's changes are written to the disks (what they overwrite captured first
//! when recovery points are kept), then the transfer is recorded as applied.
//!
//! Durability: the disks are not synced after every transfer. A committed transfer's
//! file is already durable, so it serves as a redo log: once applied, its file stays
//! in `received/` and the state lists it as [`Unsynced`] until the disks are synced,
//! which happens when nothing is left to apply or after [`SYNC_AFTER_BYTES`] or
//! [`SYNC_AFTER_TRANSFERS`] (then the newest file becomes the spare and the others
//! are deleted). Opening the replica after a crash writes the unsynced transfers
//! again, oldest first, before anything else reads or writes the disks; changes say
//! what a range holds, so writing them twice gives the same disks. Undo data is never
//! captured again for them: it was synced before their first write, and the disks
//! may hold older bytes until the redo. Anything that writes the disks other than an
//! apply (a failover's roll-back, the disks handed over as live ones) syncs them
//! first ([`Replica::sync_disks`]), so no redo ever writes over it.
//!
//! So an applied transfer counts at once, and the device writes its scattered blocks
//! in the background and in one sync for a run of transfers, instead of one sync per
//! transfer on the path from a cycle's close to its recovery point.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracker::ChangeData;
use wire::api::TransferKind;
use wire::chunk::CheckedFrame;

use super::state::Unsynced;
use super::transfer_file::FrameSource;
use super::{now_unix, PointStamp, Queued, Replica, StoreError};
use crate::history::History;
use image_ops::apply::{apply_change, ReplicaDisk};

/// The disks are synced once this many data bytes were applied since the last sync,
/// even with more transfers waiting: it bounds the redo log's space and a restart's
/// redo.
pub const SYNC_AFTER_BYTES: u64 = 1 << 30;
/// ... or this many transfers.
pub const SYNC_AFTER_TRANSFERS: usize = 64;

impl Replica {
    /// Applies the oldest received transfer, if any. Returns what it was.
    pub fn apply_next(&mut self, disks: &[ReplicaDisk]) -> Result<Option<Queued>, StoreError> {
        let Some((next, path)) = self.begin_apply()? else {
            return Ok(None);
        };
        let started = Instant::now();
        let applied = apply_transfer(&path, next.id, next.chunks, disks, &self.history)?;
        self.note_apply(applied.written, started.elapsed());
        self.finish_apply(next, applied.written)?;
        if self.sync_due() {
            self.sync_disks()?;
        }
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
    /// which wrote `written` data bytes): records it, and its file as unsynced until
    /// the next [`Replica::sync_disks`].
    pub fn finish_apply(&mut self, applied: Queued, written: u64) -> Result<(), StoreError> {
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
        state.unsynced.push(Unsynced {
            id: applied.id,
            chunks: applied.chunks,
            bytes: written,
        });
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
        self.age_out()
    }

    /// Whether the disks should be synced now: something applied is unsynced, and
    /// nothing is left to apply or the unsynced transfers reached a bound.
    pub fn sync_due(&self) -> bool {
        let unsynced = &self.state.unsynced;
        let bytes: u64 = unsynced.iter().map(|u| u.bytes).sum();
        !unsynced.is_empty()
            && (self.state.queue.is_empty()
                || bytes >= SYNC_AFTER_BYTES
                || unsynced.len() >= SYNC_AFTER_TRANSFERS)
    }

    /// The ids of the transfers applied but not yet synced, for
    /// [`Replica::finish_sync`] once the disks were synced without holding the
    /// replica.
    pub fn unsynced(&self) -> Vec<u64> {
        self.state.unsynced.iter().map(|u| u.id).collect()
    }

    /// Syncs the disks, so every applied transfer is durable in them and no redo is
    /// left to do. Call before writing the disks other than by applying.
    pub fn sync_disks(&mut self) -> Result<(), StoreError> {
        let ids = self.unsynced();
        if ids.is_empty() {
            return Ok(());
        }
        sync_all(&self.disks_for_apply()?)?;
        self.finish_sync(&ids)
    }

    /// Records that the disks were synced after transfers `ids` were applied: their
    /// files are no longer needed for a redo; the newest becomes the spare.
    pub fn finish_sync(&mut self, ids: &[u64]) -> Result<(), StoreError> {
        let before = self.state.unsynced.len();
        let mut synced = Vec::new();
        self.state.unsynced.retain(|u| {
            let done = ids.contains(&u.id);
            if done {
                synced.push(u.id);
            }
            !done
        });
        if self.state.unsynced.len() == before {
            return Ok(());
        }
        self.save()?;
        if let Some((newest, older)) = synced.split_last() {
            for id in older {
                let _ = std::fs::remove_file(self.received_path(*id));
            }
            self.keep_as_spare(&self.received_path(*newest));
        }
        Ok(())
    }

    /// After a restart: writes the transfers applied before it but maybe not synced
    /// again, oldest first, and syncs the disks (see the module doc).
    pub(super) fn redo_unsynced(&mut self) -> Result<(), StoreError> {
        if self.state.unsynced.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let disks = self.open_disks()?;
        for unsynced in self.state.unsynced.clone() {
            let path = self.received_path(unsynced.id);
            for_each_change(&path, unsynced.id, unsynced.chunks, true, |change| {
                apply_change(&disks, change)?;
                Ok(())
            })?;
        }
        sync_all(&disks)?;
        let ids = self.unsynced();
        tracing::info!(replica = %self.state.name, transfers = ids.len(), ms = started.elapsed().as_millis(), "Transfers applied before a restart written again and synced");
        self.finish_sync(&ids)
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
    /// Writing the changes to the disks (their page cache: see the module doc).
    pub write: Duration,
}

/// Makes every write applied to `disks` durable.
pub fn sync_all(disks: &[ReplicaDisk]) -> Result<(), StoreError> {
    for disk in disks {
        disk.sync()?;
    }
    Ok(())
}

/// Applies every change of the received transfer file `path` (transfer `id`, of
/// `chunks` chunks, or as many as the file holds when `None`) to `disks`, without
/// syncing them (see the module doc). With recovery points kept, what the changes
/// overwrite is first captured in `history` and synced.
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
    // With points kept the file is read twice: through the page cache (see
    // `transfer_file`).
    let keeping_points = history.is_active();
    if keeping_points {
        for_each_change(path, id, chunks, false, |change| {
            history.capture(disks, change.disk, change.offset, change.length)?;
            Ok(())
        })?;
        lap(&mut applied.capture);
        history.sync()?;
        lap(&mut applied.history_sync);
    }
    for_each_change(path, id, chunks, !keeping_points, |change| {
        apply_change(disks, change)?;
        if let ChangeData::Write(bytes) = change.data {
            applied.written += bytes.len() as u64;
        }
        Ok(())
    })?;
    lap(&mut applied.write);
    Ok(applied)
}

/// Calls `each` with every change of the transfer file `path` (transfer `id`, of
/// `chunks` chunks, or as many as the file holds), in order. `direct`: read past the
/// page cache (see `transfer_file`); not for a file read twice in a row.
fn for_each_change(
    path: &Path,
    id: u64,
    chunks: Option<u32>,
    direct: bool,
    mut each: impl FnMut(&tracker::Change<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut source = FrameSource::open(path, direct).map_err(StoreError::io("open", path))?;
    let mut scratch = Vec::new();
    let mut index = 0u32;
    while chunks.is_none_or(|chunks| index < chunks) {
        let Some(frame) = source.next_frame().map_err(StoreError::io("read", path))? else {
            if let Some(chunks) = chunks {
                return Err(StoreError::ShortTransfer {
                    path: path.to_path_buf(),
                    have: index,
                    chunks,
                });
            }
            break;
        };
        let checked = CheckedFrame::check(frame)?;
        checked.header.expect(id, index)?;
        for change in checked.records(&mut scratch)? {
            each(&change?)?;
        }
        index += 1;
    }
    Ok(())
}
