//! A group's Prometheus samples: the same metrics whichever daemon runs the group.

use nbd_shim::Server;

use super::RunningGroup;
use crate::metrics::MetricsText;

/// Appends the samples of `group` (its ring, replication and per-disk NBD traffic
/// on `server`) to `text`.
pub fn group_metrics(text: &mut MetricsText, group: &RunningGroup, server: &Server) {
    let as_f64 = crate::metrics::count_f64;
    let name = group.config.name.as_str();
    let labels = [("group", name)];
    if let Some(tracker) = &group.tracker {
        ring_metrics(text, &labels, &tracker.status());
    }
    if let Some(shipper) = &group.shipper {
        replication_metrics(text, &labels, &shipper.status());
    }
    for disk in &group.disks {
        let Some(stats) = server.export_stats(&disk.export) else {
            continue;
        };
        let labels = [("group", name), ("disk", disk.name.as_str())];
        text.counter(
            "blkrep_disk_written_bytes_total",
            "Bytes written by NBD clients",
            &labels,
            as_f64(stats.bytes_written),
        );
        text.counter(
            "blkrep_disk_read_bytes_total",
            "Bytes read by NBD clients",
            &labels,
            as_f64(stats.bytes_read),
        );
        text.gauge(
            "blkrep_disk_connections",
            "Open NBD connections",
            &labels,
            as_f64(stats.connections),
        );
    }
}

/// The ring's samples: fill, capacity, records and what happens when it is full.
fn ring_metrics(text: &mut MetricsText, labels: &[(&str, &str)], status: &tracker::GroupStatus) {
    let as_f64 = crate::metrics::count_f64;
    text.gauge(
        "blkrep_ring_used_bytes",
        "Ring bytes holding unacknowledged changes",
        labels,
        as_f64(status.ring_used),
    );
    text.gauge(
        "blkrep_ring_size_bytes",
        "Ring capacity",
        labels,
        as_f64(status.ring_size),
    );
    text.gauge(
        "blkrep_resync_required",
        "1 while the group needs a resync",
        labels,
        f64::from(u8::from(status.resync.is_some())),
    );
    text.counter(
        "blkrep_records_logged_total",
        "Records logged since start",
        labels,
        as_f64(status.records_logged),
    );
    crate::metrics::ring_full_samples(text, labels, status);
}

/// The replication's samples: health, lag, RPO, deliveries, and the running copy.
fn replication_metrics(
    text: &mut MetricsText,
    labels: &[(&str, &str)],
    status: &shipper::ShipperStatus,
) {
    let as_f64 = crate::metrics::count_f64;
    let health = match status.health {
        Some(shipper::Health::Normal) => 0.0,
        Some(shipper::Health::Warning) => 1.0,
        Some(shipper::Health::Critical) => 2.0,
        None => -1.0,
    };
    text.gauge(
        "blkrep_replication_health",
        "0 Normal, 1 Warning, 2 Critical, -1 not replicating",
        labels,
        health,
    );
    if let Some(lag_ms) = status.lag_ms {
        text.gauge(
            "blkrep_replication_lag_seconds",
            "Age of the primary state the replica holds",
            labels,
            as_f64(lag_ms) / 1000.0,
        );
    }
    let rpo = status.rpo.cumulative();
    let buckets: Vec<(f64, u64)> = rpo
        .iter()
        .map(|(bound_ms, count)| (as_f64(*bound_ms) / 1000.0, *count))
        .collect();
    text.histogram(
        "blkrep_replication_rpo_seconds",
        "Achieved recovery point just before each delivery: its time minus the close of the cycle delivered before",
        labels,
        &buckets,
        status.rpo.count,
        as_f64(status.rpo.sum_ms) / 1000.0,
    );
    if let Some(at) = status.last_success_unix {
        text.gauge(
            "blkrep_replication_last_success_timestamp_seconds",
            "When the newest cycle was acknowledged",
            labels,
            as_f64(at),
        );
    }
    text.counter(
        "blkrep_replication_cycles_delivered_total",
        "Cycles delivered since start",
        labels,
        as_f64(status.cycles_delivered),
    );
    text.counter(
        "blkrep_replication_failures_total",
        "Failed attempts since start",
        labels,
        as_f64(status.failures),
    );
    text.counter(
        "blkrep_replication_bytes_delivered_total",
        "Change bytes delivered since start",
        labels,
        as_f64(status.bytes_delivered),
    );
    text.counter(
        "blkrep_replication_network_bytes_total",
        "Bytes sent to the replica since start",
        labels,
        as_f64(status.network_bytes),
    );
    text.gauge(
        "blkrep_replication_missed_cycles_last_hour",
        "Intervals of the last hour that missed their cycle",
        labels,
        as_f64(status.missed_last_hour),
    );
    if let Some(app) = &status.app_consistent {
        text.counter(
            "blkrep_app_consistent_points_total",
            "Application-consistent points made since start",
            labels,
            as_f64(app.points),
        );
        text.counter(
            "blkrep_freeze_failures_total",
            "Freeze commands that failed since start (their cycles are crash-consistent)",
            labels,
            as_f64(app.freeze_failures),
        );
        text.counter(
            "blkrep_thaw_failures_total",
            "Thaw commands that failed since start (a guest may have stayed frozen)",
            labels,
            as_f64(app.thaw_failures),
        );
        if let Some(at) = app.last_unix {
            text.gauge(
                "blkrep_app_consistent_last_point_timestamp_seconds",
                "When the newest application-consistent cycle closed",
                labels,
                as_f64(at),
            );
        }
    }
    if let Some(resync) = &status.resync {
        text.gauge(
            "blkrep_replication_copy_done_bytes",
            "Bytes of the running initial replication or resync committed",
            labels,
            as_f64(resync.done_bytes),
        );
        text.gauge(
            "blkrep_replication_copy_total_bytes",
            "Bytes the running initial replication or resync copies",
            labels,
            as_f64(resync.total_bytes),
        );
    }
}
