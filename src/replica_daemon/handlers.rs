//! How the replica daemon answers each control request.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use super::failover::{fail_over, start_test, stop_test};
use super::protocol::Imported;
use super::protocol::ReplicaRequest;
use super::Daemon;
use crate::control;

/// A typed answer as the JSON the control socket sends.
fn to_json<T: serde::Serialize>(answer: T) -> Result<Value, String> {
    serde_json::to_value(answer).map_err(|error| error.to_string())
}

/// Answers one request on the replica daemon's control socket.
pub(super) fn serve_control(stream: &UnixStream, control: &Daemon) -> std::io::Result<()> {
    let server = &control.server;
    control::answer(stream, |request: ReplicaRequest| match request {
        ReplicaRequest::StartTest {
            name,
            trust_group,
            point,
        } => start_test(control, &name, trust_group.as_deref(), point).and_then(to_json),
        ReplicaRequest::Failover {
            name,
            trust_group,
            point,
        } => fail_over(control, &name, trust_group.as_deref(), point).and_then(to_json),
        ReplicaRequest::Reverse {
            name,
            trust_group,
            target,
        } => {
            let (dir, info) = server
                .replica(&name, trust_group.as_deref())
                .map_err(|error| wire::error_chain(&error))?;
            match &info.failover {
                Some(failover) if failover.completed => {}
                Some(_) => return Err(format!("Complete the failover of {name} first (`blkrep replica complete-failover --name {name}`): replicating back fixes its point")),
                None => return Err(format!("Replica {name} was not failed over: it is a replica, not a live copy to replicate")),
            }
            control.reverse(&dir, &info, &target)?;
            Ok(Value::Null)
        }
        ReplicaRequest::Live => {
            serde_json::to_value(control.live_status()).map_err(|e| e.to_string())
        }
        ReplicaRequest::GroupStatus { group } => {
            serde_json::to_value(control.live_group_report(&group)?)
                .map_err(|error| error.to_string())
        }
        ReplicaRequest::CloseCycle {
            group,
            timeout_secs,
        } => serde_json::to_value(
            control.close_live_cycle(&group, Duration::from_secs(timeout_secs))?,
        )
        .map_err(|error| error.to_string()),
        ReplicaRequest::Replication { group, action } => {
            serde_json::to_value(control.live_replication(&group, &action)?)
                .map_err(|error| error.to_string())
        }
        ReplicaRequest::PlannedFailover {
            name,
            trust_group,
            force,
        } => control
            .planned_failover(&name, trust_group.as_deref(), force)
            .and_then(to_json),
        ReplicaRequest::CompleteFailover { name, trust_group } => {
            let info = server
                .complete_failover(&name, trust_group.as_deref())
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        ReplicaRequest::SetRecovery {
            name,
            trust_group,
            policy,
        } => {
            let info = server
                .set_recovery(&name, trust_group.as_deref(), policy)
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        ReplicaRequest::StopTest {
            name,
            trust_group,
            force,
        } => stop_test(control, &name, trust_group.as_deref(), force),
        ReplicaRequest::Status => {
            serde_json::to_value(server.replicas()).map_err(|error| error.to_string())
        }
        ReplicaRequest::SetPaused {
            name,
            trust_group,
            paused,
        } => {
            let info = server
                .set_paused(&name, trust_group.as_deref(), paused)
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        ReplicaRequest::Import { dir } => {
            let (info, imported) = server
                .import(&dir)
                .map_err(|error| wire::error_chain(&error))?;
            to_json(Imported {
                replica: info,
                imported,
            })
        }
    })
}
