//! Group-level commands, the same on both daemons' control sockets: close a cycle now
//! (`blkrep cycles close`) and change a group's replication (`blkrep replication
//! pause|resume|resync|remove|enable|export|failover`).
//!
//! The daemon finds the group; this module runs the command on it and answers with
//! the typed responses of [`crate::control`].

use std::time::Duration;

use nbd_shim::Server;
use shipper::{AdminAction, Shipper};

use super::RunningGroup;
use crate::control::{self, ActionDone, CycleClosed, ReplicationAction};

/// How long an administrative action other than an export or a failover may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(150);

/// The group's shipper, or why there is none.
fn shipper_of(group: &RunningGroup) -> Result<&Shipper, String> {
    group.shipper().ok_or_else(|| {
        format!(
            "Group {:?} has no consumer running; configure [group.consumer]",
            group.name()
        )
    })
}

/// Closes the group's cycle now and waits up to `timeout` until its consumer
/// acknowledged it.
pub fn close_cycle(group: &RunningGroup, timeout: Duration) -> Result<CycleClosed, String> {
    let cycle = shipper_of(group)?
        .close_now(timeout)
        .map_err(|error| shipper::error_chain(&error))?;
    Ok(CycleClosed { cycle })
}

/// Runs `action` on `group`, whose disks `server` exports.
pub fn replication(
    group: &RunningGroup,
    server: &Server,
    action: &ReplicationAction,
) -> Result<ActionDone, String> {
    if let ReplicationAction::Failover { force } = action {
        let message = group.planned_failover(server, *force)?;
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
    let message = shipper
        .admin(action, timeout)
        .map_err(|error| shipper::error_chain(&error))?;
    Ok(ActionDone { message })
}
