//! An administrator's requests (pause, resume, remove, enable, resync, planned
//! failover, media export), carried out by the thread between attempts. A change of
//! the relationship record is saved before the answer goes out.

use std::path::PathBuf;
use std::time::Instant;

use tracing::info;
use tracker::ResyncReason;

use crate::remote::Relationship;

use super::{not_now, Refusal};
use super::{ShipperError, Worker};

/// What an administrator can ask of a replicating group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Stop shipping; changes keep being tracked.
    Pause,
    /// Ship again (after a pause, or once the cause of a suspension is fixed).
    Resume,
    /// Stop replicating; optionally delete the replica on the replica server.
    Remove {
        /// Also delete the replica (its disks are lost).
        delete_replica: bool,
    },
    /// Enable replication again after `Remove`, optionally not before a time.
    Enable {
        /// Start the initial replication at this time (seconds since the epoch).
        start_after_unix: Option<u64>,
    },
    /// Copy every block again.
    Resync,
    /// Planned failover, once the group's writes are fenced off: ship every change,
    /// compare both sides' blocks, and hand the group over to the replica.
    PlannedFailover,
    /// Write the initial copy to `dir`/<group> for external media (a group with
    /// `initial_replication = "media"`).
    Export {
        /// The export directory (on the media).
        dir: PathBuf,
    },
}

impl Worker {
    pub(super) fn admin(&mut self, action: AdminAction) -> Result<String, ShipperError> {
        let name = self.group.name().to_string();
        let message = match action {
            AdminAction::Export { dir } => self.export_initial_copy(&dir)?,
            AdminAction::PlannedFailover => self.planned_failover()?,
            AdminAction::Resync => {
                self.hand_back_resync();
                self.group.request_full_resync(ResyncReason::Requested)?;
                self.retry_at = Some(Instant::now());
                format!("Group {name}: every block is copied again, starting now")
            }
            action => self.admin_relationship(&name, action)?,
        };
        info!(group = %name, "{message}");
        self.update_status();
        Ok(message)
    }

    /// The actions on the relationship record.
    fn admin_relationship(
        &mut self,
        name: &str,
        action: AdminAction,
    ) -> Result<String, ShipperError> {
        let Some(relationship) = &mut self.relationship else {
            return Err(not_now(format!(
                "Group {name} does not replicate to a replica server"
            )));
        };
        let state = &mut relationship.state;
        let message = match action {
            AdminAction::Pause => {
                if state.removed {
                    return Err(not_now(format!("Replication of group {name} is removed")));
                }
                state.paused = true;
                format!("Replication of group {name} paused; writes are tracked until it resumes")
            }
            AdminAction::Resume => {
                if let Some(reason) = &state.superseded {
                    return Err(ShipperError::Refused(Refusal::Superseded {
                        group: name.to_string(),
                        reason: reason.clone(),
                    }));
                }
                if state.removed {
                    return Err(not_now(format!(
                        "Replication of group {name} is removed; enable it instead"
                    )));
                }
                state.paused = false;
                let repair = state.repair_on_resume.take();
                let was_suspended = state.suspended.take();
                match repair.as_deref().and_then(Repair::parse) {
                    Some(Repair::Reenable) => state.enabled = false,
                    Some(Repair::Resync) => {
                        self.group.request_full_resync(ResyncReason::Requested)?;
                    }
                    None => {}
                }
                self.network_failures = 0;
                self.busy_answers = 0;
                self.retry_at = Some(Instant::now());
                match was_suspended {
                    Some(reason) => {
                        format!("Replication of group {name} resumed (it was suspended: {reason})")
                    }
                    None => format!("Replication of group {name} resumed"),
                }
            }
            AdminAction::Remove { delete_replica } => {
                if delete_replica {
                    self.sink.remove(name)?;
                }
                state.removed = true;
                state.enabled = false;
                state.paused = false;
                state.suspended = None;
                self.resync = None;
                if delete_replica {
                    format!("Replication of group {name} removed and its replica deleted")
                } else {
                    format!(
                        "Replication of group {name} removed; the replica server keeps the replica"
                    )
                }
            }
            AdminAction::Enable { start_after_unix } => {
                if !state.removed {
                    return Err(not_now(format!(
                        "Replication of group {name} is already enabled (relationship {:x}); remove it first to start afresh",
                        state.id
                    )));
                }
                *state = Relationship::new(&relationship.setup.replica_url);
                relationship.state.epoch = relationship.setup.epoch;
                relationship.state.start_after_unix = start_after_unix;
                self.sink
                    .set_relationship(relationship.state.id, relationship.state.epoch);
                self.retry_at = Some(Instant::now());
                match start_after_unix {
                    Some(at) => format!("Replication of group {name} enabled; the initial replication starts at {at} (seconds since the epoch)"),
                    None => format!("Replication of group {name} enabled; the initial replication starts now"),
                }
            }
            AdminAction::Resync | AdminAction::Export { .. } | AdminAction::PlannedFailover => {
                return Err(not_now("A resync is not a relationship change"))
            }
        };
        relationship.save()?;
        Ok(message)
    }
}

/// What `resume` repairs after a suspension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repair {
    /// The replica is gone: create it again, with a full initial replication.
    Reenable,
    /// The chain broke: copy every block again.
    Resync,
}

impl Repair {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Repair::Reenable => "reenable",
            Repair::Resync => "resync",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "reenable" => Some(Repair::Reenable),
            "resync" => Some(Repair::Resync),
            _ => None,
        }
    }
}
