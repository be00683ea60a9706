//! Group-level commands, the same on both daemons' control sockets: close a cycle now
//! (`blkrep cycles close`) and change a group's replication (`blkrep replication
//! pause|resume|resync|remove|enable|export|failover`), and measure its deliveries
//! (`blkrep replication measure`).
//!
//! The daemon finds the group; this module runs the command on it and answers with
//! the typed responses of [`crate::control`].

use std::time::Duration;

use nbd_shim::Server;
use shipper::measure::Measurement;
use shipper::{AdminAction, Shipper, ShipperError};
use thiserror::Error;

use super::RunningGroup;
use crate::control::{self, ActionDone, CycleClosed, ReplicationAction};

/// How long an administrative action other than an export or a failover may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(150);

/// Why a group command did not happen. Typed until the control socket, which
/// answers it as text once (with its chain).
#[derive(Debug, Error)]
pub enum CommandError {
    /// The daemon runs no group of that name.
    #[error("No group named {0:?}")]
    NoGroup(String),
    /// The group has no shipper to ask.
    #[error("Group {0:?} has no consumer running; configure [group.consumer]")]
    NoConsumer(String),
    /// The shipper refused or failed.
    #[error(transparent)]
    Shipper(#[from] ShipperError),
    /// The planned failover did not happen (the message says what state the disks
    /// are left in).
    #[error("{0}")]
    Failover(String),
}

impl CommandError {
    /// The error and its causes as one line, for the control socket.
    pub fn to_text(&self) -> String {
        shipper::error_chain(self)
    }
}

/// The group's shipper, or why there is none.
fn shipper_of(group: &RunningGroup) -> Result<&Shipper, CommandError> {
    group
        .shipper()
        .ok_or_else(|| CommandError::NoConsumer(group.name().to_string()))
}

/// Closes the group's cycle now and waits up to `timeout` until its consumer
/// acknowledged it.
pub fn close_cycle(group: &RunningGroup, timeout: Duration) -> Result<CycleClosed, CommandError> {
    let cycle = shipper_of(group)?.close_now(timeout)?;
    Ok(CycleClosed { cycle })
}

/// The figures of the group's deliveries over the last `since`.
pub fn measure(group: &RunningGroup, since: Duration) -> Result<Measurement, CommandError> {
    Ok(shipper_of(group)?.measure(since))
}

/// Runs `action` on `group`, whose disks `server` exports.
pub fn replication(
    group: &RunningGroup,
    server: &Server,
    action: &ReplicationAction,
) -> Result<ActionDone, CommandError> {
    if let ReplicationAction::Failover { force } = action {
        let message = group
            .planned_failover(server, *force)
            .map_err(CommandError::Failover)?;
        return Ok(ActionDone { message });
    }
    let shipper = shipper_of(group)?;
    let action = match action {
        ReplicationAction::Pause => AdminAction::Pause,
        ReplicationAction::Resume => AdminAction::Resume,
        ReplicationAction::Resync => AdminAction::Resync,
        ReplicationAction::Remove { delete_replica } => AdminAction::Remove {
            delete_replica: *delete_replica,
        },
        ReplicationAction::Enable { start_after_unix } => AdminAction::Enable {
            start_after_unix: *start_after_unix,
        },
        ReplicationAction::Export { dir } => AdminAction::Export { dir: dir.clone() },
        ReplicationAction::Failover { .. } => AdminAction::PlannedFailover,
    };
    let timeout = match action {
        AdminAction::Export { .. } => control::EXPORT_TIMEOUT,
        _ => ADMIN_TIMEOUT,
    };
    let message = shipper.admin(action, timeout)?;
    Ok(ActionDone { message })
}
