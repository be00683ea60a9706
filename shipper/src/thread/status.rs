//! What the thread reports: the status snapshot ([`ShipperStatus`]) and its counters,
//! which the thread updates after every attempt and request and the handle copies.

use std::sync::PoisonError;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracker::ResyncReason;
use wire::api::ErrorCode;

use crate::pipeline::compress::CompressionStatus;
use crate::remote::FailureClass;
use crate::rpo::RpoHistogram;
use crate::schedule::{assess, Health};

use super::copy::ResyncProgress;
use super::worker::Gate;
use super::{unix_now, unix_now_ms, Worker};

/// Where replication stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    /// Cycles ship every interval.
    #[default]
    Replicating,
    /// The first full copy is being sent.
    InitialReplication,
    /// Initial replication is scheduled for later.
    WaitingToStart,
    /// A resync is required and starts at the next attempt.
    ResyncRequired,
    /// A resync copy is being sent.
    Resynchronising,
    /// Paused by an administrator.
    Paused,
    /// Stopped after a failure that needs an administrator.
    Suspended,
    /// The replica was failed over to: it is the group's live copy and this primary
    /// must not ship to it again.
    Superseded,
    /// The initial copy goes by external media and waits to be exported.
    AwaitingExport,
    /// The initial copy was exported; the replica waits for it to be imported.
    AwaitingImport,
    /// Removed by an administrator: cycles are dropped.
    Removed,
}

/// What a block comparison with the consumer's copy found.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ComparisonReport {
    /// Bytes compared.
    pub marked_bytes: u64,
    /// Bytes that differ, and are copied.
    pub differing_bytes: u64,
    /// Hashes compared.
    pub hashes: u64,
}

/// Progress of a resync or initial replication.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ResyncReport {
    /// Why it runs.
    pub reason: String,
    /// Its epoch (the chain it starts).
    pub epoch: u32,
    /// Batch being sent.
    pub batch: u32,
    /// Bytes to copy in all.
    pub total_bytes: u64,
    /// Bytes copied and committed.
    pub done_bytes: u64,
}

/// What the shipper has done, for status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ShipperStatus {
    /// The consumer.
    pub consumer: String,
    /// Interval between cycles, in seconds.
    pub interval_secs: f64,
    /// Replication state.
    pub state: ReplicationState,
    /// Health.
    pub health: Option<Health>,
    /// Why health is not Normal.
    pub health_reason: Option<String>,
    /// The relationship id (hex), for a replica consumer.
    pub relationship: Option<String>,
    /// The relationship's failover epoch, for a replica consumer: 1, raised by each
    /// failover (a group serving a failed-over replica's disks replicates at its
    /// replica's epoch).
    pub epoch: Option<u64>,
    /// Cycles delivered and acknowledged since start.
    pub cycles_delivered: u64,
    /// The newest acknowledged cycle.
    pub last_delivered: Option<u64>,
    /// When it was acknowledged (seconds since the epoch).
    pub last_success_unix: Option<u64>,
    /// When that cycle closed: the replica holds the primary's state of that instant.
    pub last_delivered_close_unix: Option<u64>,
    /// The same, in milliseconds since the epoch.
    pub last_delivered_close_unix_ms: Option<u64>,
    /// How far the replica is behind, in seconds (the achieved recovery point).
    pub lag_secs: Option<u64>,
    /// The same, in milliseconds.
    pub lag_ms: Option<u64>,
    /// The achieved recovery point just before each delivery since start.
    pub rpo: RpoHistogram,
    /// How long delivering the newest cycle took, in milliseconds.
    pub last_duration_ms: Option<u64>,
    /// Data bytes of the newest delivered cycle (after coalescing).
    pub last_cycle_bytes: u64,
    /// Largest cycle delivered, in data bytes.
    pub max_cycle_bytes: u64,
    /// Average delivered cycle, in data bytes.
    pub avg_cycle_bytes: u64,
    /// Data bytes delivered since start.
    pub bytes_delivered: u64,
    /// Bytes sent over the network since start (after compression), frames lost to
    /// an interruption and sent again included.
    pub network_bytes: u64,
    /// How chunks are compressed (network consumers).
    pub compression: Option<CompressionStatus>,
    /// Failed attempts since start.
    pub failures: u64,
    /// Intervals of the last hour, and how many of them missed their cycle.
    pub cycles_last_hour: u64,
    /// Missed intervals of the last hour.
    pub missed_last_hour: u64,
    /// The newest failure, if the newest attempt failed.
    pub last_error: Option<String>,
    /// How the newest failure is handled.
    pub failure_class: Option<FailureClass>,
    /// When the next retry after a network failure is due (seconds since the epoch).
    pub next_retry_unix: Option<u64>,
    /// Resyncs completed since start.
    pub resyncs: u64,
    /// The resync in progress.
    pub resync: Option<ResyncReport>,
    /// What the latest block comparison found.
    pub last_comparison: Option<ComparisonReport>,
    /// Application-consistent points, if the group makes them.
    pub app_consistent: Option<AppConsistentReport>,
}

/// Application-consistent points since start, for status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AppConsistentReport {
    /// Time between points, in seconds.
    pub every_secs: u64,
    /// Points made: cycles closed after a successful freeze.
    pub points: u64,
    /// Of those, delivered flagged application-consistent.
    pub points_delivered: u64,
    /// Freeze commands that failed (their cycles shipped crash-consistent).
    pub freeze_failures: u64,
    /// Thaw commands that failed (the guest may have stayed frozen).
    pub thaw_failures: u64,
    /// The newest application-consistent cycle.
    pub last_cycle: Option<u64>,
    /// When it closed (seconds since the epoch).
    pub last_unix: Option<u64>,
    /// The newest application-consistent cycle delivered.
    pub last_delivered_cycle: Option<u64>,
    /// When the newest point was attempted (seconds since the epoch).
    pub last_attempt_unix: Option<u64>,
    /// From when the next point is due (seconds since the epoch); none: the next cycle.
    pub next_due_unix: Option<u64>,
    /// How long the newest attempt held the guest, freeze start to thaw end, in
    /// milliseconds.
    pub last_frozen_ms: Option<u64>,
    /// The newest failure of a freeze or thaw command, until a point succeeds.
    pub last_failure: Option<String>,
}

impl Worker {
    pub(super) fn update_status(&mut self) {
        let now = unix_now();
        let (missed, total) = self.history.counts(now);
        let group_resync = self.group.resync_reason();
        let state = match self.gate() {
            Gate::Removed => ReplicationState::Removed,
            Gate::Suspended(_) => ReplicationState::Suspended,
            Gate::Superseded(_) => ReplicationState::Superseded,
            Gate::Paused => ReplicationState::Paused,
            Gate::NotBefore(_) => ReplicationState::WaitingToStart,
            Gate::Open if self.awaits_export() => ReplicationState::AwaitingExport,
            Gate::Open
                if self.last_code == Some(ErrorCode::Busy)
                    && self
                        .relationship
                        .as_ref()
                        .is_some_and(|r| r.state.media_exported.is_some()) =>
            {
                ReplicationState::AwaitingImport
            }
            Gate::Open => match (self.resync.as_ref().map(|r| r.reason), group_resync) {
                (Some(ResyncReason::InitialReplication), _)
                | (None, Some(ResyncReason::InitialReplication)) => {
                    ReplicationState::InitialReplication
                }
                (Some(_), _) => ReplicationState::Resynchronising,
                (None, Some(_)) => ReplicationState::ResyncRequired,
                (None, None) => ReplicationState::Replicating,
            },
        };
        let suspended = match self.gate() {
            Gate::Suspended(reason) => Some(reason),
            Gate::Superseded(reason) => Some(format!("superseded by a failover: {reason}")),
            _ => None,
        };
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let lag_ms = status
            .last_delivered_close_unix_ms
            .or(Some(self.started_unix.saturating_mul(1000)))
            .map(|closed_ms| unix_now_ms().saturating_sub(closed_ms));
        let lag = lag_ms.map(|ms| ms / 1000);
        let (health, reason) = match state {
            ReplicationState::Removed => (None, None),
            ReplicationState::Paused => (
                Some(Health::Warning),
                Some("Replication is paused".to_string()),
            ),
            _ => {
                let (health, reason) = assess(suspended.as_deref(), missed, total, lag);
                (Some(health), reason)
            }
        };
        // Events: every change, but not the Normal a start begins with.
        if status.health != health
            && (status.health.is_some() || health.is_some_and(|now| now != Health::Normal))
        {
            let name = |health: Option<Health>| health.map_or("none".into(), |h| format!("{h:?}"));
            let (group, from, to) = (self.group.name(), name(status.health), name(health));
            let why = reason.as_deref().unwrap_or("replicating as configured");
            if health == Some(Health::Normal) {
                tracing::info!(target: "blkrep_event", event = "health_changed", %group, reason = why, %from, %to, "Replication health changed");
            } else {
                tracing::warn!(target: "blkrep_event", event = "health_changed", %group, reason = why, %from, %to, "Replication health changed");
            }
        }
        status.state = state;
        status.health = health;
        status.health_reason = reason;
        status.lag_secs = lag;
        status.lag_ms = lag_ms;
        status.cycles_last_hour = total;
        status.missed_last_hour = missed;
        status.network_bytes = self.sink.bytes_sent();
        status.compression = self.sink.compression();
        status.relationship = self
            .relationship
            .as_ref()
            .map(|r| format!("{:x}", r.state.id));
        status.epoch = self.relationship.as_ref().map(|r| r.state.epoch);
        status.next_retry_unix = self
            .retry_at
            .map(|at| now + at.saturating_duration_since(Instant::now()).as_secs());
        status.resync = self.resync.as_ref().map(ResyncProgress::report);
    }
}
