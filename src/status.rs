//! The status report: what `blkrep status` shows, per group and disk.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The whole daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Report format version.
    pub version: u32,
    /// Daemon process id.
    pub pid: u32,
    /// When the daemon started (seconds since the epoch).
    pub started_unix: u64,
    /// Per group.
    pub groups: Vec<GroupReport>,
}

/// One group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// Group name.
    pub name: String,
    /// `logging`, `bitmap` (dirty map only) or `off`.
    pub tracking: String,
    /// Whether a resync is required before cycles ship again.
    pub resync_required: bool,
    /// Why.
    pub resync_reason: Option<String>,
    /// Replication interval in seconds.
    pub interval_secs: f64,
    /// Cycle numbers.
    pub cycle: CycleReport,
    /// Ring use.
    pub ring: RingReport,
    /// The consumer's status (shipper), if one is configured.
    pub consumer: Option<serde_json::Value>,
    /// Per disk.
    pub disks: Vec<DiskReport>,
}

/// Cycle numbers of a group.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CycleReport {
    /// The open cycle.
    pub open: u64,
    /// The newest closed cycle.
    pub last_closed: u64,
    /// The newest acknowledged cycle.
    pub last_acked: u64,
}

/// The log ring of a group.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RingReport {
    /// The ring file.
    pub path: String,
    /// Capacity in bytes.
    pub size: u64,
    /// Bytes holding unacknowledged records.
    pub used: u64,
    /// Records logged since start.
    pub records_logged: u64,
}

/// One disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskReport {
    /// Export name.
    pub name: String,
    /// The image.
    pub image: String,
    /// Size in bytes.
    pub size: u64,
    /// Read-only export.
    pub read_only: bool,
    /// Bytes written in the open cycle.
    pub dirty_bytes: u64,
    /// Bytes awaiting resync.
    pub resync_bytes: u64,
    /// NBD connections now.
    pub connections: u64,
    /// NBD connections since start.
    pub total_connections: u64,
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
}

/// Bytes in binary units, for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl StatusReport {
    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "blkrep primary (pid {})", self.pid);
        for group in &self.groups {
            let _ = writeln!(out, "\ngroup {}", group.name);
            let state = match (&group.resync_reason, group.tracking.as_str()) {
                (Some(reason), _) => format!("{} - RESYNC REQUIRED: {reason}", group.tracking),
                (None, tracking) => tracking.to_string(),
            };
            let _ = writeln!(out, "  tracking:  {state}");
            let _ = writeln!(out, "  interval:  {}s", group.interval_secs);
            let _ = writeln!(
                out,
                "  cycles:    open {}, last closed {}, last acknowledged {}",
                group.cycle.open, group.cycle.last_closed, group.cycle.last_acked
            );
            if group.tracking != "off" {
                let percent = if group.ring.size == 0 {
                    0.0
                } else {
                    group.ring.used as f64 * 100.0 / group.ring.size as f64
                };
                let _ = writeln!(
                    out,
                    "  ring:      {} of {} used ({percent:.1}%), {}",
                    human_bytes(group.ring.used),
                    human_bytes(group.ring.size),
                    group.ring.path
                );
            }
            match &group.consumer {
                Some(consumer) => {
                    let text =
                        |key: &str| consumer.get(key).map(|v| v.to_string()).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  consumer:  {}; {} cycles delivered, last {}; failures {}",
                        consumer
                            .get("consumer")
                            .and_then(|v| v.as_str())
                            .unwrap_or("?"),
                        text("cycles_delivered"),
                        text("last_delivered"),
                        text("failures")
                    );
                    if let Some(error) = consumer.get("last_error").and_then(|v| v.as_str()) {
                        let _ = writeln!(out, "  last error: {error}");
                    }
                }
                None => {
                    let _ = writeln!(out, "  consumer:  none");
                }
            }
            for disk in &group.disks {
                let _ = writeln!(
                    out,
                    "  disk {:<12} {:>10}  dirty {:>10}  connections {}{}  {}",
                    disk.name,
                    human_bytes(disk.size),
                    human_bytes(disk.dirty_bytes),
                    disk.connections,
                    if disk.read_only { "  read-only" } else { "" },
                    disk.image
                );
                if disk.resync_bytes > 0 {
                    let _ = writeln!(
                        out,
                        "       awaiting resync: {}",
                        human_bytes(disk.resync_bytes)
                    );
                }
            }
        }
        out
    }
}
