//! Failovers to the replica (planned or not, to the latest or an earlier point, then
//! completed), test failovers of a point, and failback: the live disks handed back as
//! an existing copy.

use std::fs;
use std::sync::Arc;

use wire::api::MAX_EPOCH;

use super::{now_unix, Failover, RecoveryPoint, Replica, ReplicaState, StoreError, TestFailover};

/// The epoch after `epoch`, as a failover raises it.
fn next_epoch(epoch: u64) -> Result<u64, StoreError> {
    epoch
        .checked_add(1)
        .filter(|next| *next <= MAX_EPOCH)
        .ok_or_else(|| StoreError::Conflict(format!("The failover epoch {epoch} is the last one")))
}

impl Replica {
    /// Starts a test failover of point `point` (the latest if `None`; its id in
    /// [`Replica::recovery_points`] otherwise). The latest is kept
    /// as a temporary point until the test ends, so replication goes on underneath.
    /// Fails while the disks are mid-apply ([`StoreError::Busy`]): try again.
    pub fn begin_test(&mut self, point: Option<u64>) -> Result<TestFailover, StoreError> {
        let name = self.state.name.clone();
        if let Some(test) = &self.state.test {
            return Err(StoreError::Conflict(format!(
                "A test failover of {name} (cycle {}) is running; stop it first with `blkrep replica test-failover stop --name {name}`",
                test.stamp.cycle
            )));
        }
        if self.state.failover.is_some() {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was failed over to: its disks are the live copy, not a replica to test"
            )));
        }
        let (point, stamp) = match point.filter(|id| *id != 0) {
            Some(id) => {
                let found = self.kept_point(id)?;
                (found.id, found.stamp)
            }
            None => {
                let Some(latest) = self.state.latest else {
                    return Err(StoreError::Conflict(format!(
                        "Replica {name} holds no consistent state yet (the initial replication or a resync has not finished); pick an earlier point with --point"
                    )));
                };
                if !self.state.consistent {
                    return Err(StoreError::Busy(format!(
                        "Replica {name} is applying a transfer"
                    )));
                }
                (self.add_point(latest, true)?, latest)
            }
        };
        let test = TestFailover {
            point,
            stamp,
            started_unix: now_unix(),
        };
        self.state.test = Some(test.clone());
        self.state.last_test_unix = Some(test.started_unix);
        self.save()?;
        Ok(test)
    }

    /// Ends the test failover, if one runs: its temporary point is merged away.
    pub fn end_test(&mut self) -> Result<Option<TestFailover>, StoreError> {
        let Some(test) = self.state.test.take() else {
            return Ok(None);
        };
        self.save()?;
        if self
            .state
            .points
            .iter()
            .any(|p| p.id == test.point && p.temporary)
        {
            self.remove_point(test.point)?;
        }
        // Points the test kept beyond the policy go now.
        self.age_out()?;
        Ok(Some(test))
    }

    /// Fails the replica over to point `point` (the latest if `None`): fenced against
    /// its primary first, then, for an earlier point, the disks are rolled back to it,
    /// the state they leave kept as a point so another point can still be chosen until
    /// [`Replica::complete_failover`]. Fails while a transfer is received but not yet
    /// applied ([`StoreError::Busy`]): the latest point includes it, so wait.
    pub fn fail_over(&mut self, point: Option<u64>, planned: bool) -> Result<Failover, StoreError> {
        let name = self.state.name.clone();
        if let Some(test) = &self.state.test {
            return Err(StoreError::Conflict(format!(
                "A test failover of {name} (cycle {}) is running; stop it first with `blkrep replica test-failover stop --name {name}`",
                test.stamp.cycle
            )));
        }
        if self.state.failover.is_some_and(|f| f.completed) {
            return Err(StoreError::Conflict(format!(
                "The failover of {name} was completed: its disks are live and no other point is kept"
            )));
        }
        if !self.state.queue.is_empty() {
            return Err(StoreError::Busy(format!(
                "Replica {name} is applying {} received transfer(s)",
                self.state.queue.len()
            )));
        }
        let target = match point.filter(|id| *id != 0) {
            Some(id) => self.kept_point(id)?,
            None => {
                let latest = self.state.latest.ok_or_else(|| {
                    StoreError::Conflict(format!(
                        "Replica {name} holds no consistent latest state (an initial replication or resync is unfinished); fail over to an earlier point with --point"
                    ))
                })?;
                RecoveryPoint {
                    id: 0,
                    stamp: latest,
                    temporary: false,
                }
            }
        };
        // A roll-back and the new primary write the disks: no redo may follow them.
        self.sync_disks()?;
        // Fence first: from here the former primary's requests are refused.
        if let Some(receiving) = self.state.receiving.take() {
            let _ = fs::remove_file(self.part_path(receiving.id));
        }
        let failover = Failover {
            at_unix: now_unix(),
            stamp: target.stamp,
            planned,
            completed: false,
        };
        let current = self.state.latest;
        if self.state.failover.is_none() {
            self.state.epoch = next_epoch(self.state.epoch)?;
        }
        self.state.failover = Some(failover);
        self.save()?;
        if current != Some(target.stamp) {
            // Keep the state the disks leave as a point (temporary when it is not a
            // consistent state), then write the target's state over it.
            let keep = current.map_or((target.stamp, true), |latest| (latest, false));
            let newest = self.state.points.last().map(|p| p.stamp);
            if newest != Some(keep.0) || keep.1 {
                self.add_point(keep.0, keep.1)?;
                self.save()?;
            }
            let disks = self.open_disks()?;
            let history = Arc::clone(&self.history);
            let _guard = history.apply_guard();
            history.roll_back(&disks, target.id)?;
        }
        self.state.latest = Some(target.stamp);
        self.state.consistent = true;
        self.state.resync_epoch = None;
        self.save()?;
        Ok(failover)
    }

    /// Completes a failover: the point chosen stays, every other recovery point is
    /// deleted (their undo data would no longer describe the disks once they are
    /// written as the live copy).
    pub fn complete_failover(&mut self) -> Result<Failover, StoreError> {
        let name = self.state.name.clone();
        let Some(mut failover) = self.state.failover else {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was not failed over; fail over first with `blkrep replica failover --name {name}`"
            )));
        };
        failover.completed = true;
        self.state.failover = Some(failover);
        self.state.points.clear();
        self.save()?;
        self.history.clear()?;
        Ok(failover)
    }

    /// Failback: a planned failover handed this failed-over replica's live disks over
    /// to the replica it replicated to, after every block compared equal. The disks
    /// become an existing copy no relationship has claimed, at the epoch after this
    /// one (the new primary's: its failover raised the epoch this side replicated at
    /// once), so replication the other way claims them and sends only what differs,
    /// and nothing of an older epoch (this side's former live group) can. Recovery
    /// points go: they describe states from before the failover. The recovery policy
    /// and the time of the last test stay.
    pub fn hand_back(&mut self) -> Result<(), StoreError> {
        let name = self.state.name.clone();
        if self.state.failover.is_none() {
            return Err(StoreError::Conflict(format!(
                "Replica {name} was not failed over, so it has no live disks to hand back"
            )));
        }
        self.sync_disks()?;
        let previous = &self.state;
        let mut state = ReplicaState::unclaimed(
            name,
            previous.trust_group.clone(),
            next_epoch(previous.epoch)?,
            "the live disks handed back by a planned failover",
            previous.disks.clone(),
        );
        state.created_unix = previous.created_unix;
        state.recovery = previous.recovery;
        state.last_test_unix = previous.last_test_unix;
        self.state = state;
        self.save()?;
        self.history.clear()?;
        Ok(())
    }
}
