//! A group's status report: the same fields whichever daemon runs the group
//! (`blkrep status` on the primary, the live groups of `blkrep replica status`).

use std::time::Duration;

use nbd_shim::Server;
use tracker::{Group, TrackingMode};

use super::RunningGroup;
use crate::status::{CycleReport, DiskReport, GroupReport, RingReport, ThrottleReport};

/// The report of `group`, whose disks `server` exports.
pub fn group_report(group: &RunningGroup, server: &Server) -> GroupReport {
    let tracker_status = group.tracker.as_ref().map(Group::status);
    let disks = group
        .disks
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let stats = server.export_stats(&disk.export);
            let tracked = tracker_status.as_ref().and_then(|s| s.disks.get(index));
            DiskReport {
                name: disk.name.clone(),
                image: disk.image.display().to_string(),
                size: disk.size,
                read_only: disk.read_only,
                dirty_bytes: tracked.map_or(0, |d| d.dirty_bytes),
                resync_bytes: tracked.map_or(0, |d| d.resync_bytes),
                connections: stats.as_ref().map_or(0, |s| s.connections),
                total_connections: stats.as_ref().map_or(0, |s| s.connections_total),
                bytes_read: stats.as_ref().map_or(0, |s| s.bytes_read),
                bytes_written: stats.as_ref().map_or(0, |s| s.bytes_written),
            }
        })
        .collect();
    let (tracking, cycle, ring) = match &tracker_status {
        None => (
            "off".to_string(),
            CycleReport::default(),
            RingReport::default(),
        ),
        Some(s) => (
            match s.mode {
                TrackingMode::Logging => "logging".to_string(),
                TrackingMode::DirtyMap => "bitmap".to_string(),
            },
            CycleReport {
                open: s.open_cycle,
                last_closed: s.last_closed,
                last_acked: s.last_acked,
            },
            RingReport {
                path: group.config.ring.display().to_string(),
                size: s.ring_size,
                used: s.ring_used,
                records_logged: s.records_logged,
                on_full: if s.on_ring_full.max_delay().is_some() {
                    "throttle".into()
                } else {
                    "bitmap".into()
                },
                throttle: throttle_report(s),
            },
        ),
    };
    let resync = tracker_status.as_ref().and_then(|s| s.resync);
    GroupReport {
        name: group.config.name.clone(),
        tracking,
        resync_required: resync.is_some(),
        resync_reason: resync.map(|reason| reason.to_string()),
        writes_refused: tracker_status.as_ref().is_some_and(|s| s.writes_refused),
        interval_secs: group.config.interval.0.as_secs_f64(),
        cycle,
        ring,
        consumer: group.shipper.as_ref().map(shipper::Shipper::status),
        disks,
    }
}

/// The throttle figures of a group whose policy is [`tracker::OnRingFull::Throttle`].
fn throttle_report(status: &tracker::GroupStatus) -> Option<ThrottleReport> {
    let max_delay = status.on_ring_full.max_delay()?;
    let ms = |delay: Duration| u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    Some(ThrottleReport {
        bound_ms: ms(max_delay),
        writes: status.throttle.writes,
        total_delay_ms: ms(status.throttle.total_delay),
        max_delay_ms: ms(status.throttle.max_delay),
        expired: status.throttle.expired,
    })
}
