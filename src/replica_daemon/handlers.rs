//! How the replica daemon answers each control request.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use super::failover::{fail_over, start_test, stop_test};
use super::live::ServeError;
use super::protocol::Imported;
use super::protocol::ReplicaRequest;
use super::Daemon;
use crate::control;

/// A typed answer as the JSON the control socket sends.
fn to_json<T: serde::Serialize>(answer: T) -> Result<Value, ServeError> {
    serde_json::to_value(answer)
        .map_err(|error| ServeError::Refused(format!("Cannot encode the answer: {error}")))
}

/// Answers one request on the replica daemon's control socket; errors become text
/// here, once, with their causes.
pub(super) fn serve_control(stream: &UnixStream, control: &Daemon) -> std::io::Result<()> {
    control::answer(stream, |request: ReplicaRequest| {
        answer(control, request).map_err(|error| error.to_text())
    })
}

/// The answer to `request`.
fn answer(control: &Daemon, request: ReplicaRequest) -> Result<Value, ServeError> {
    let server = &control.server;
    match request {
        ReplicaRequest::StartTest {
            name,
            trust_group,
            point,
        } => to_json(start_test(control, &name, trust_group.as_deref(), point)?),
        ReplicaRequest::Failover {
            name,
            trust_group,
            point,
        } => to_json(fail_over(control, &name, trust_group.as_deref(), point)?),
        ReplicaRequest::Reverse {
            name,
            trust_group,
            target,
        } => {
            let (dir, info) = server.replica(&name, trust_group.as_deref())?;
            match &info.failover {
                Some(failover) if failover.completed => {}
                Some(_) => return Err(ServeError::Refused(format!("Complete the failover of {name} first (`blkrep replica complete-failover --name {name}`): replicating back fixes its point"))),
                None => return Err(ServeError::Refused(format!("Replica {name} was not failed over: it is a replica, not a live copy to replicate"))),
            }
            control.reverse(&dir, &info, &target)?;
            Ok(Value::Null)
        }
        ReplicaRequest::Live => to_json(control.live_status()),
        ReplicaRequest::GroupStatus { group } => to_json(control.live_group_report(&group)?),
        ReplicaRequest::CloseCycle {
            group,
            timeout_secs,
        } => to_json(control.close_live_cycle(&group, Duration::from_secs(timeout_secs))?),
        ReplicaRequest::Replication { group, action } => {
            to_json(control.live_replication(&group, &action)?)
        }
        ReplicaRequest::PlannedFailover {
            name,
            trust_group,
            force,
        } => to_json(control.planned_failover(&name, trust_group.as_deref(), force)?),
        ReplicaRequest::CompleteFailover { name, trust_group } => {
            to_json(server.complete_failover(&name, trust_group.as_deref())?)
        }
        ReplicaRequest::SetRecovery {
            name,
            trust_group,
            policy,
        } => to_json(server.set_recovery(&name, trust_group.as_deref(), policy)?),
        ReplicaRequest::StopTest {
            name,
            trust_group,
            force,
        } => to_json(stop_test(control, &name, trust_group.as_deref(), force)?),
        ReplicaRequest::Status => to_json(server.replicas()),
        ReplicaRequest::SetPaused {
            name,
            trust_group,
            paused,
        } => to_json(server.set_paused(&name, trust_group.as_deref(), paused)?),
        ReplicaRequest::Import { dir } => {
            let (info, imported) = server.import(&dir)?;
            to_json(Imported {
                replica: info,
                imported,
            })
        }
    }
}
