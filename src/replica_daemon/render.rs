//! The replica daemon's answers as text: status, recovery points, live groups, and
//! its Prometheus metrics.

use std::time::Duration;

use wire::api::{Consistency, ReplicaInfo};

use std::time::UNIX_EPOCH;

use std::fmt::Write as _;

use super::live::LiveGroupReport;
use crate::metrics::MetricsText;

/// A time in milliseconds since the epoch, as RFC 3339 (UTC, seconds).
pub(super) fn format_ms(unix_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

pub(super) fn point_kind(app_consistent: bool) -> &'static str {
    if app_consistent {
        "application-consistent"
    } else {
        "crash-consistent"
    }
}

/// A replica's recovery points as text: one line each, oldest first.
pub fn render_points(info: &ReplicaInfo, now_unix: u64) -> String {
    let mut out = format!(
        "{}: {} additional point(s) kept, at least {} apart
",
        info.name,
        info.recovery.points,
        humantime::format_duration(Duration::from_secs(info.recovery.spacing_secs))
    );
    if info.recovery_points.is_empty() {
        out.push_str(
            "  no recovery point yet: the initial replication has not finished
",
        );
    }
    for point in &info.recovery_points {
        let age = Duration::from_secs(now_unix.saturating_sub(point.time_unix_ms / 1000));
        let id = if point.latest {
            "latest".to_string()
        } else {
            point.id.to_string()
        };
        out.push_str(&format!(
            "  {id:>6}  {}  ({} ago)  cycle {}  {}  {}
",
            format_ms(point.time_unix_ms),
            humantime::format_duration(age),
            point.cycle,
            point_kind(point.app_consistent),
            if point.latest {
                "the replica disks".to_string()
            } else {
                format!("{} bytes of undo data", point.size)
            }
        ));
    }
    out
}

pub(super) fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// "consistent ..." of a status line: an apply does not make it flicker to "no".
fn consistency_text(consistency: Consistency) -> String {
    match consistency {
        Consistency::Consistent => "yes".into(),
        Consistency::Applying { cycle } => format!("at cycle {cycle} (applying)"),
        Consistency::NotConsistent => "no".into(),
    }
}

/// The status as text: one line per replica.
pub fn render_status(replicas: &[ReplicaInfo], now_unix: u64) -> String {
    if replicas.is_empty() {
        return "No replicas\n".into();
    }
    let mut sorted: Vec<&ReplicaInfo> = replicas.iter().collect();
    sorted.sort_by(|a, b| (&a.trust_group, &a.name).cmp(&(&b.trust_group, &b.name)));
    let mut out = String::new();
    for info in sorted {
        let applied = match (info.last_applied_cycle, info.last_applied_unix) {
            (Some(cycle), Some(at)) => {
                let age = Duration::from_secs(now_unix.saturating_sub(at));
                format!("cycle {cycle} ({} ago)", humantime::format_duration(age))
            }
            (Some(cycle), None) => format!("cycle {cycle}"),
            (None, _) => "none".into(),
        };
        let role = match info.role {
            wire::api::Role::Replica => "replica",
            wire::api::Role::Primary => "primary",
        };
        out.push_str(&format!(
            "{}: {role} at epoch {}, trust group {}, consistent {}, last applied {applied}, pending transfers {}, applied and not yet synced {}, paused {}\n",
            info.name,
            info.epoch,
            info.trust_group,
            consistency_text(info.consistency()),
            info.pending_transfers,
            info.unsynced_transfers,
            yes_no(info.paused),
        ));
        if info.unclaimed {
            out.push_str("  an existing copy no primary has claimed: replicating this group with initial_replication = \"existing\" (or `blkrep replica reverse` from a failed-over site) claims it and sends only differing blocks\n");
        }
        if info.awaiting_import {
            out.push_str("  waiting for its initial copy: run `blkrep replica import DIR` with the exported directory\n");
        }
        if let Some(failover) = &info.failover {
            let age = Duration::from_secs(now_unix.saturating_sub(failover.at_unix));
            out.push_str(&format!(
                "  FAILED OVER {} ago to cycle {} ({}); live disks served as {}/<disk>; former primary fenced off{}\n",
                humantime::format_duration(age),
                failover.cycle,
                point_kind(failover.app_consistent),
                info.name,
                if failover.completed {
                    String::new()
                } else {
                    format!("; complete with `blkrep replica complete-failover --name {}`", info.name)
                }
            ));
        }
        let kept = info.recovery_points.iter().filter(|p| !p.latest).count();
        if info.recovery.points > 0 || kept > 0 {
            out.push_str(&format!(
                "  recovery points: {kept} of {} additional kept (`blkrep replica points --name {}`)\n",
                info.recovery.points, info.name
            ));
        }
        if let Some(test) = &info.test_failover {
            let age = Duration::from_secs(now_unix.saturating_sub(test.started_unix));
            out.push_str(&format!(
                "  TEST FAILOVER in progress for {} at cycle {}: exports {}\n",
                humantime::format_duration(age),
                test.cycle,
                test.exports.join(", ")
            ));
        } else if let Some(at) = info.last_test_unix {
            let age = Duration::from_secs(now_unix.saturating_sub(at));
            out.push_str(&format!(
                "  last test failover: {} ago\n",
                humantime::format_duration(age)
            ));
        }
    }
    out
}

/// The failed-over groups served as live disks: the disks' exports, then the same
/// lines `blkrep status` shows for a primary's group (tracking, ring, replication
/// back).
pub(super) fn render_live(live: &[LiveGroupReport]) -> String {
    let mut out = String::new();
    for live in live {
        let _ = write!(
            out,
            "\nlive group {}: disks {}",
            live.group.name,
            live.exports.join(", ")
        );
        match &live.group.consumer {
            None => out.push_str("; not replicated back (`blkrep replica reverse`)\n"),
            Some(replication) => {
                let _ = writeln!(
                    out,
                    "; replicating back: {}, health {}{}",
                    crate::status::state_name(replication.state),
                    replication
                        .health
                        .map_or_else(|| "?".to_string(), |health| format!("{health:?}")),
                    replication
                        .last_error
                        .as_ref()
                        .map(|error| format!(", last error: {error}"))
                        .unwrap_or_default()
                );
            }
        }
        live.group.render_into(&mut out);
    }
    out
}

/// Appends the Prometheus samples of `replicas` to `text`.
pub fn replica_metrics(text: &mut MetricsText, replicas: &[ReplicaInfo]) {
    let flag = |value: bool| if value { 1.0 } else { 0.0 };
    for info in replicas {
        let labels = [
            ("replica", info.name.as_str()),
            ("trust_group", info.trust_group.as_str()),
        ];
        text.gauge(
            "blkrep_replica_consistent",
            "Whether the replica's disks hold a state the primary had (1) or not (0).",
            &labels,
            flag(info.consistent),
        );
        text.gauge(
            "blkrep_replica_recoverable",
            "Whether a consistent latest state is kept to fail over to (1), also while transfers apply, or not (0): the initial replication or a resync is unfinished.",
            &labels,
            flag(info.consistency().is_recoverable()),
        );
        if let Some(cycle) = info.last_applied_cycle {
            text.gauge(
                "blkrep_replica_last_applied_cycle",
                "Newest cycle applied to the replica's disks.",
                &labels,
                cycle as f64,
            );
        }
        if let Some(at) = info.last_applied_unix {
            text.gauge(
                "blkrep_replica_last_applied_timestamp_seconds",
                "When the newest cycle was applied, in seconds since the epoch.",
                &labels,
                at as f64,
            );
        }
        text.gauge(
            "blkrep_replica_pending_transfers",
            "Transfers received and not yet applied.",
            &labels,
            f64::from(info.pending_transfers),
        );
        text.gauge(
            "blkrep_replica_unsynced_transfers",
            "Transfers applied whose writes the replica disks have not synced yet (kept as a redo log).",
            &labels,
            f64::from(info.unsynced_transfers),
        );
        text.gauge(
            "blkrep_replica_paused",
            "Whether replication is paused on the replica side (1) or not (0).",
            &labels,
            flag(info.paused),
        );
        text.counter(
            "blkrep_replica_applied_transfers_total",
            "Transfers applied to the replica's disks.",
            &labels,
            info.applied_transfers as f64,
        );
        text.counter(
            "blkrep_replica_applied_bytes_total",
            "Data bytes written to the replica's disks by applied transfers.",
            &labels,
            info.applied_bytes as f64,
        );
        text.counter(
            "blkrep_replica_apply_seconds_total",
            "Time spent applying transfers (the apply rate is applied bytes over this).",
            &labels,
            info.apply_micros as f64 / 1e6,
        );
        if let Some(micros) = info.last_apply_micros {
            text.gauge(
                "blkrep_replica_last_apply_seconds",
                "Time the latest transfer took to apply.",
                &labels,
                micros as f64 / 1e6,
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use wire::api::DiskInfo;

    fn info(name: &str, group: &str) -> ReplicaInfo {
        ReplicaInfo {
            name: name.into(),
            trust_group: group.into(),
            disks: vec![DiskInfo {
                name: "disk0".into(),
                size: 1 << 20,
            }],
            consistent: true,
            last_received_cycle: Some(8),
            last_applied_cycle: Some(7),
            last_applied_unix: Some(1_000),
            pending_transfers: 1,
            unsynced_transfers: 2,
            resync_epoch: None,
            paused: false,
            awaiting_import: false,
            applied_transfers: 3,
            applied_bytes: 3 << 20,
            apply_micros: 1_500_000,
            last_apply_micros: Some(250_000),
            recovery: wire::api::RecoveryPolicy::default(),
            recovery_points: Vec::new(),
            test_failover: None,
            last_test_unix: None,
            failover: None,
            role: wire::api::Role::Replica,
            epoch: wire::api::FIRST_EPOCH,
            unclaimed: false,
        }
    }

    #[test]
    fn status_lines() {
        let mut applying = info("vm3", "dc1");
        applying.consistent = false;
        applying.recovery_points = vec![wire::api::RecoveryPointInfo {
            id: 0,
            cycle: 7,
            time_unix_ms: 900_000,
            app_consistent: false,
            latest: true,
            size: 0,
        }];
        let mut fresh = info("vm2", "dc1");
        fresh.consistent = false;
        fresh.last_applied_cycle = None;
        fresh.last_applied_unix = None;
        fresh.paused = true;
        fresh.role = wire::api::Role::Primary;
        fresh.epoch = 2;
        let text = render_status(&[fresh, applying, info("vm1", "dc1")], 1_000 + 3_725);
        assert_eq!(
            text,
            "vm1: replica at epoch 1, trust group dc1, consistent yes, last applied cycle 7 (1h 2m 5s ago), pending transfers 1, applied and not yet synced 2, paused no\n\
             vm2: primary at epoch 2, trust group dc1, consistent no, last applied none, pending transfers 1, applied and not yet synced 2, paused yes\n\
             vm3: replica at epoch 1, trust group dc1, consistent at cycle 7 (applying), last applied cycle 7 (1h 2m 5s ago), pending transfers 1, applied and not yet synced 2, paused no\n"
        );
        assert_eq!(render_status(&[], 0), "No replicas\n");
    }

    #[test]
    fn metrics_per_replica() {
        let mut other = info("vm\"1", "dc2");
        other.last_applied_cycle = None;
        other.last_applied_unix = None;
        let mut text = MetricsText::new();
        replica_metrics(&mut text, &[info("vm1", "dc1"), other]);
        let text = text.finish();
        for line in [
            "# TYPE blkrep_replica_consistent gauge",
            "blkrep_replica_consistent{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_consistent{replica=\"vm\\\"1\",trust_group=\"dc2\"} 1",
            "blkrep_replica_recoverable{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_last_applied_cycle{replica=\"vm1\",trust_group=\"dc1\"} 7",
            "blkrep_replica_last_applied_timestamp_seconds{replica=\"vm1\",trust_group=\"dc1\"} 1000",
            "blkrep_replica_pending_transfers{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_unsynced_transfers{replica=\"vm1\",trust_group=\"dc1\"} 2",
            "blkrep_replica_paused{replica=\"vm1\",trust_group=\"dc1\"} 0",
            "blkrep_replica_applied_bytes_total{replica=\"vm1\",trust_group=\"dc1\"} 3145728",
            "blkrep_replica_apply_seconds_total{replica=\"vm1\",trust_group=\"dc1\"} 1.5",
            "blkrep_replica_last_apply_seconds{replica=\"vm1\",trust_group=\"dc1\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("last_applied_cycle{replica=\"vm\\\"1\""),
            "{text}"
        );
        assert_eq!(text.matches("# HELP blkrep_replica_paused ").count(), 1);
    }
}
