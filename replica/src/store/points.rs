//! Recovery points: taken as deltas are applied (as the policy spaces them), aged out
//! beyond the policy by merging their undo data into the next older point, and listed
//! with the latest state last. A point keeps every disk the replica has, including
//! disks added after it was taken: those read as zeroes at the point (their content
//! before any write reached them), for a failover and a test failover alike.

use std::sync::Arc;

use wire::api::{RecoveryPointInfo, RecoveryPolicy};

use super::{PointStamp, RecoveryPoint, Replica, StoreError};
use crate::history::History;

impl Replica {
    /// The undo data of the recovery points, shared with the applier and readers.
    pub fn history(&self) -> Arc<History> {
        Arc::clone(&self.history)
    }

    /// Makes the disks' current state (`stamp`) an additional point if the policy
    /// keeps points and one is due (`force`: whenever the policy keeps points). The
    /// caller saves the state, then ages points out.
    pub(super) fn take_point(&mut self, stamp: PointStamp, force: bool) -> Result<(), StoreError> {
        let policy = self.state.recovery;
        if policy.points == 0 {
            return Ok(());
        }
        let newest = self.state.points.iter().rev().find(|p| !p.temporary);
        if newest.is_some_and(|p| p.stamp.cycle == stamp.cycle) {
            return Ok(());
        }
        let spacing_ms = policy.spacing_secs.saturating_mul(1000);
        let due = force
            || stamp.app_consistent
            || newest.is_none_or(|p| {
                stamp.closed_unix_ms.saturating_sub(p.stamp.closed_unix_ms) >= spacing_ms
            });
        if due {
            self.add_point(stamp, false)?;
        }
        Ok(())
    }

    /// Adds a point of the disks' current state; the caller saves the state.
    pub(super) fn add_point(
        &mut self,
        stamp: PointStamp,
        temporary: bool,
    ) -> Result<u64, StoreError> {
        let id = self.state.next_point.max(1);
        {
            let _guard = self.history.apply_guard();
            self.history.add_point(id)?;
        }
        self.state.next_point = id + 1;
        self.state.points.push(RecoveryPoint {
            id,
            stamp,
            temporary,
        });
        Ok(id)
    }

    /// Removes additional points beyond the policy, oldest first (a point a test
    /// failover serves stays until the test ends).
    pub(super) fn age_out(&mut self) -> Result<(), StoreError> {
        // A point of the latest state does not count: it is the latest until the
        // next cycle, and the policy names points besides the latest.
        let latest = self.state.latest.map(|l| l.cycle);
        loop {
            let kept = self
                .state
                .points
                .iter()
                .filter(|p| !p.temporary && Some(p.stamp.cycle) != latest)
                .count();
            if kept <= self.state.recovery.points as usize {
                return Ok(());
            }
            let test = self.state.test.as_ref().map(|t| t.point);
            let Some(oldest) = self
                .state
                .points
                .iter()
                .find(|p| !p.temporary && Some(p.id) != test)
                .map(|p| p.id)
            else {
                return Ok(());
            };
            self.remove_point(oldest)?;
        }
    }

    /// Removes point `id`, keeping every other point's state (see
    /// [`History::merge_into_older`]): merged, recorded, then deleted.
    pub(super) fn remove_point(&mut self, id: u64) -> Result<(), StoreError> {
        let history = Arc::clone(&self.history);
        let _guard = history.apply_guard();
        history.merge_into_older(id)?;
        self.state.points.retain(|p| p.id != id);
        self.save()?;
        self.history.forget(id)?;
        Ok(())
    }

    /// The additional point `id` (as [`Replica::recovery_points`] lists it).
    pub(super) fn kept_point(&self, id: u64) -> Result<RecoveryPoint, StoreError> {
        let name = &self.state.name;
        self.state
            .points
            .iter()
            .find(|p| p.id == id && !p.temporary)
            .copied()
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "Replica {name} has no recovery point {id}; list them with `blkrep replica points --name {name}`"
                ))
            })
    }

    /// Sets the recovery history to keep; points beyond it age out at once.
    pub fn set_recovery(&mut self, policy: RecoveryPolicy) -> Result<(), StoreError> {
        if let Some(problem) = policy.problem() {
            return Err(StoreError::Conflict(problem));
        }
        self.state.recovery = policy;
        self.save()?;
        self.age_out()
    }

    /// The recovery points, oldest first, the latest last.
    pub fn recovery_points(&self) -> Vec<RecoveryPointInfo> {
        let sizes = self.history.sizes();
        let latest = self.state.latest;
        let mut points: Vec<RecoveryPointInfo> = self
            .state
            .points
            .iter()
            .filter(|p| !p.temporary && latest.is_none_or(|l| l.cycle != p.stamp.cycle))
            .map(|p| RecoveryPointInfo {
                id: p.id,
                cycle: p.stamp.cycle,
                time_unix_ms: p.stamp.closed_unix_ms,
                app_consistent: p.stamp.app_consistent,
                latest: false,
                size: sizes
                    .iter()
                    .find(|(id, _)| *id == p.id)
                    .map_or(0, |(_, size)| *size),
            })
            .collect();
        if let Some(latest) = latest {
            points.push(RecoveryPointInfo {
                id: 0,
                cycle: latest.cycle,
                time_unix_ms: latest.closed_unix_ms,
                app_consistent: latest.app_consistent,
                latest: true,
                size: 0,
            });
        }
        points
    }
}
