//! The replica daemon's control requests, shared by the daemon and the commands
//! that talk to it. Group-level requests (`close_cycle`, `replication`) have the same
//! shape as the primary's ([`crate::control::ControlRequest`]), so `blkrep cycles close` and
//! `blkrep replication ...` work on a failed-over group's live disks here too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use wire::api::ReplicaInfo;

use super::live::ReverseTarget;
use crate::control::{self, ControlError, ReplicationAction};

/// A request on the replica daemon's control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ReplicaRequest {
    /// Every replica's [`wire::api::ReplicaInfo`].
    Status,
    /// Import an initial copy from external media.
    Import {
        /// The export directory (`DIR/<group>` of `blkrep replication export`).
        dir: PathBuf,
    },
    /// Fail over to a replica.
    Failover {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// The point; the latest if none.
        point: Option<u64>,
    },
    /// Complete a failover.
    CompleteFailover {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
    },
    /// Planned failover of a failed-over group's live disks (failback).
    PlannedFailover {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Even while clients are connected.
        force: bool,
    },
    /// Replicate a failed-over group back.
    Reverse {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Where to.
        target: ReverseTarget,
    },
    /// The failed-over groups served as live disks: a [`super::live::LiveGroupReport`]
    /// each.
    Live,
    /// One live group's [`crate::status::GroupReport`] (as on the primary).
    GroupStatus {
        /// The group (the replica's name).
        group: String,
    },
    /// Close the cycle of a live group now and wait until the replica server it
    /// replicates back to acknowledged it (as on the primary).
    CloseCycle {
        /// The group (the replica's name).
        group: String,
        /// How long to wait for delivery.
        timeout_secs: u64,
    },
    /// The figures of a live group's deliveries back over the last `since_secs` (as on
    /// the primary): a [`shipper::measure::Measurement`].
    Measure {
        /// The group (the replica's name).
        group: String,
        /// The window, in seconds back from now.
        since_secs: u64,
    },
    /// Change a live group's replication back (as on the primary).
    Replication {
        /// The group (the replica's name).
        group: String,
        /// What to do.
        action: ReplicationAction,
    },
    /// Set a replica's recovery history.
    SetRecovery {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// The history to keep.
        policy: wire::api::RecoveryPolicy,
    },
    /// Start a test failover.
    StartTest {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// The point; the latest if none.
        point: Option<u64>,
    },
    /// Stop a test failover.
    StopTest {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Even while clients are connected.
        force: bool,
    },
    /// Pause or resume replication into a replica.
    SetPaused {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Pause (true) or resume (false).
        paused: bool,
    },
}

/// The answer to [`ReplicaRequest::StartTest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestStarted {
    /// The replica, with its test failover (and the test's exports).
    pub replica: ReplicaInfo,
    /// The socket serving the exports.
    pub nbd_socket: PathBuf,
}

/// The answer to [`ReplicaRequest::Failover`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedOverTo {
    /// The replica, failed over to.
    pub replica: ReplicaInfo,
    /// The socket serving its disks as the group's live disks.
    pub nbd_socket: PathBuf,
    /// The exports of the live disks.
    pub exports: Vec<String>,
    /// What the failover hook did, if one is configured.
    pub hook: Option<String>,
}

/// The answer to [`ReplicaRequest::PlannedFailover`] (a failback).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandedBack {
    /// The replica, now an existing copy at the next epoch.
    pub replica: ReplicaInfo,
    /// The replica server that runs the group now.
    pub url: String,
}

/// The answer to [`ReplicaRequest::Import`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Imported {
    /// The replica the media filled.
    pub replica: ReplicaInfo,
    /// Transfers imported.
    pub imported: u32,
}

/// Sends `request` to the replica daemon at `socket` and decodes the answer as `T`,
/// that request's answer type.
pub fn call_typed<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &ReplicaRequest,
    timeout: Duration,
) -> Result<T, ControlError> {
    control::call_typed(socket, control::REPLICA, request, timeout)
}

/// Sends one request to the replica daemon at `socket` and returns the result.
pub fn call(
    socket: &Path,
    request: &ReplicaRequest,
    timeout: Duration,
) -> Result<Value, ControlError> {
    control::call(socket, control::REPLICA, request, timeout)
}
