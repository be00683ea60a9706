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

/// Records a failover-related event of replica `name` (see `crate::events`).
fn event(event: &str, name: &str, reason: &str) {
    tracing::info!(target: "blkrep_event", event, group = name, reason, "Replica {name}: {}", event.replace('_', " "));
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
        } => {
            let started = start_test(control, &name, trust_group.as_deref(), point)?;
            event(
                "test_failover_started",
                &name,
                "an administrator's test failover",
            );
            to_json(started)
        }
        ReplicaRequest::Failover {
            name,
            trust_group,
            point,
        } => {
            let done = fail_over(control, &name, trust_group.as_deref(), point)?;
            event("failover", &name, "an administrator's failover");
            to_json(done)
        }
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
        ReplicaRequest::Measure { group, since_secs } => {
            to_json(control.measure_live(&group, Duration::from_secs(since_secs))?)
        }
        ReplicaRequest::PlannedFailover {
            name,
            trust_group,
            force,
        } => {
            let done = control.planned_failover(&name, trust_group.as_deref(), force)?;
            event(
                "planned_failover",
                &name,
                "an administrator's planned failover (failback)",
            );
            to_json(done)
        }
        ReplicaRequest::CompleteFailover { name, trust_group } => {
            let done = server.complete_failover(&name, trust_group.as_deref())?;
            event(
                "failover_completed",
                &name,
                "an administrator completed the failover",
            );
            to_json(done)
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
        } => {
            let stopped = stop_test(control, &name, trust_group.as_deref(), force)?;
            event(
                "test_failover_stopped",
                &name,
                "an administrator stopped the test failover",
            );
            to_json(stopped)
        }
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
