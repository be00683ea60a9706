//! The status report: what `blkrep status` shows, per group and disk.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use shipper::pipeline::compress::{CompressionMode, CompressionStatus};
use shipper::{AppConsistentReport, ReplicationState, ShipperStatus};
use wire::chunk::BodyCodec;

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
    /// Whether the group refuses writes (handed over by a planned failover).
    #[serde(default)]
    pub writes_refused: bool,
    /// Replication interval in seconds.
    pub interval_secs: f64,
    /// Cycle numbers.
    pub cycle: CycleReport,
    /// Ring use.
    pub ring: RingReport,
    /// The consumer's status (shipper), if one is configured.
    pub consumer: Option<ShipperStatus>,
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
    /// What the group does when the ring is full: `bitmap` or `throttle`.
    #[serde(default)]
    pub on_full: String,
    /// Writes slowed to keep the log (with `on_full = "throttle"`).
    #[serde(default)]
    pub throttle: Option<ThrottleReport>,
}

/// Writes slowed to keep a group's log, since the daemon started.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ThrottleReport {
    /// The most a write may be delayed, in milliseconds.
    pub bound_ms: u64,
    /// Writes that were delayed.
    pub writes: u64,
    /// Delay added to them all, in milliseconds.
    pub total_delay_ms: u64,
    /// The longest delay added to one write, in milliseconds.
    pub max_delay_ms: u64,
    /// Times the bound passed with the ring still full, so the group fell back to
    /// dirty maps.
    pub expired: u64,
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
            group.render_into(&mut out);
        }
        out
    }
}

impl GroupReport {
    /// The group's lines of the status text (after its `group NAME` line): the same
    /// on the primary and for a replica daemon's live groups.
    pub fn render_into(&self, out: &mut String) {
        let state = match (&self.resync_reason, self.tracking.as_str()) {
            (Some(reason), _) => format!("{} - RESYNC REQUIRED: {reason}", self.tracking),
            (None, tracking) => tracking.to_string(),
        };
        let _ = writeln!(out, "  tracking:  {state}");
        if self.writes_refused {
            let _ = writeln!(
                out,
                "  writes:    REFUSED (handed over by a planned failover; clients get EPERM)"
            );
        }
        let _ = writeln!(out, "  interval:  {}s", self.interval_secs);
        let _ = writeln!(
            out,
            "  cycles:    open {}, last closed {}, last acknowledged {}",
            self.cycle.open, self.cycle.last_closed, self.cycle.last_acked
        );
        if self.tracking != "off" {
            let percent = if self.ring.size == 0 {
                0.0
            } else {
                self.ring.used as f64 * 100.0 / self.ring.size as f64
            };
            let _ = writeln!(
                out,
                "  ring:      {} of {} used ({percent:.1}%), {}",
                human_bytes(self.ring.used),
                human_bytes(self.ring.size),
                self.ring.path
            );
            render_ring_full(out, &self.ring);
        }
        match &self.consumer {
            Some(consumer) => render_consumer(out, consumer, self.ring.used),
            None => {
                let _ = writeln!(out, "  consumer:  none");
            }
        }
        for disk in &self.disks {
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
}

/// What the group does when its ring is full, and what throttling cost its writers.
fn render_ring_full(out: &mut String, ring: &RingReport) {
    match &ring.throttle {
        Some(throttle) => {
            let _ = writeln!(
                out,
                "  when full: throttle writers, at most {} ms a write; {} delayed, {} ms in all, longest {} ms; bound passed {} time(s)",
                throttle.bound_ms,
                throttle.writes,
                throttle.total_delay_ms,
                throttle.max_delay_ms,
                throttle.expired
            );
        }
        None if !ring.on_full.is_empty() => {
            let _ = writeln!(
                out,
                "  when full: {} (dirty maps, then a resync)",
                ring.on_full
            );
        }
        None => {}
    }
}

/// Seconds as `1h02m`, `5m03s` or `42s`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// A lag for people: tenths of a second below a minute, where short intervals live.
pub fn human_lag(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{}s", ms / 1000, ms % 1000 / 100)
    } else {
        human_duration(ms / 1000)
    }
}

/// How a consumer compresses: the mode and, in `auto`, what it decided and why.
fn compression_line(compression: &CompressionStatus) -> String {
    let mode = compression.mode;
    // Older daemons name no codec: theirs was DEFLATE.
    let codec = match compression.codec.unwrap_or(BodyCodec::Deflate) {
        BodyCodec::Zstd => "zstd",
        BodyCodec::Deflate | BodyCodec::Stored => "DEFLATE",
    };
    let level = compression
        .level
        .map(|level| format!(", {codec} level {level}"));
    let mut line = format!("{mode}{}", level.unwrap_or_default());
    if compression.zstd_not_decoded {
        line.push_str(" (the replica does not decode zstd)");
    }
    if mode == CompressionMode::Auto {
        let decision = &compression.decision;
        let doing = if decision.compressing {
            "compressing"
        } else {
            "sending raw"
        };
        let mut figures = Vec::new();
        if let Some(link) = decision.link_bytes_per_sec {
            figures.push(format!("link {}/s", human_bytes(link)));
        }
        if let Some(rate) = decision.codec_bytes_per_sec {
            figures.push(format!("{codec} {}/s per worker", human_bytes(rate)));
        }
        if let Some(ratio) = decision.ratio_per_mille {
            figures.push(format!("ratio {}.{:03}", ratio / 1000, ratio % 1000));
        }
        let _ = write!(line, ": {doing}");
        if !figures.is_empty() {
            let _ = write!(line, " ({})", figures.join(", "));
        }
    }
    line
}

/// A 30-character progress bar with the percentage.
pub fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
    format!(
        "[{}{}] {percent:>3}%",
        "#".repeat(usize::try_from(filled).unwrap_or(0)),
        "-".repeat(usize::try_from(WIDTH - filled).unwrap_or(0))
    )
}

/// The name of a replication state as status JSON gives it (`initial_replication`).
pub fn state_name(state: ReplicationState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The name of a replication state as words (`initial replication`).
fn state_words(state: ReplicationState) -> String {
    state_name(state).replace('_', " ")
}

fn render_consumer(out: &mut String, consumer: &ShipperStatus, pending: u64) {
    let _ = writeln!(out, "  consumer:  {}", consumer.consumer);
    if let Some(relationship) = &consumer.relationship {
        let state = state_words(consumer.state);
        let epoch = consumer.epoch.unwrap_or(wire::api::FIRST_EPOCH);
        let _ = writeln!(
            out,
            "  replication: {state} (relationship {relationship}, epoch {epoch})"
        );
    }
    if let Some(health) = consumer.health {
        match &consumer.health_reason {
            Some(reason) => {
                let _ = writeln!(out, "  health:    {health:?} - {reason}");
            }
            None => {
                let _ = writeln!(out, "  health:    {health:?}");
            }
        }
    }
    if let Some(compression) = &consumer.compression {
        let _ = writeln!(out, "  compression: {}", compression_line(compression));
    }
    let lag = consumer.lag_ms.map(human_lag);
    let last = match (consumer.last_delivered, lag) {
        (Some(cycle), Some(lag)) => format!("cycle {cycle}, replica {lag} behind"),
        (None, Some(lag)) => format!("none yet ({lag} since start)"),
        _ => "none yet".into(),
    };
    let _ = writeln!(out, "  last delivered: {last}");
    let _ = writeln!(
        out,
        "  cycles:    {} delivered, {} failures; last hour {} of {} missed; pending {}",
        consumer.cycles_delivered,
        consumer.failures,
        consumer.missed_last_hour,
        consumer.cycles_last_hour,
        human_bytes(pending),
    );
    let _ = writeln!(
        out,
        "  sizes:     last {}, average {}, max {}; transfer {} ms; sent {}",
        human_bytes(consumer.last_cycle_bytes),
        human_bytes(consumer.avg_cycle_bytes),
        human_bytes(consumer.max_cycle_bytes),
        consumer
            .last_duration_ms
            .map_or_else(|| "-".into(), |ms| ms.to_string()),
        human_bytes(consumer.network_bytes),
    );
    if let Some(app) = &consumer.app_consistent {
        render_app_consistent(out, app, base::time::unix_secs());
    }
    if let Some(resync) = &consumer.resync {
        let (done, total) = (resync.done_bytes, resync.total_bytes);
        let reason = if resync.reason.is_empty() {
            "resync"
        } else {
            resync.reason.as_str()
        };
        let _ = writeln!(
            out,
            "  copy:      {} {} of {} ({reason})",
            progress_bar(done, total),
            human_bytes(done),
            human_bytes(total),
        );
    }
    if let Some(comparison) = &consumer.last_comparison {
        let _ = writeln!(
            out,
            "  compared:  {} differed of {} ({} hashes)",
            human_bytes(comparison.differing_bytes),
            human_bytes(comparison.marked_bytes),
            comparison.hashes
        );
    }
    if let Some(error) = &consumer.last_error {
        let _ = writeln!(out, "  last error: {error}");
        if let Some(at) = consumer.next_retry_unix {
            let now = base::time::unix_secs();
            let _ = writeln!(
                out,
                "  next retry in {}",
                human_duration(at.saturating_sub(now))
            );
        }
    }
}

/// The application-consistent points of a shipper's status.
fn render_app_consistent(out: &mut String, app: &AppConsistentReport, now: u64) {
    let last = match (app.last_cycle, app.last_unix) {
        (Some(cycle), Some(at)) => format!(
            "last cycle {cycle} ({} ago)",
            human_duration(now.saturating_sub(at))
        ),
        _ => "none yet".into(),
    };
    let _ = writeln!(
        out,
        "  app-consistent: every {}; {} point(s), {} delivered; {last}",
        human_duration(app.every_secs),
        app.points,
        app.points_delivered,
    );
    let next = match app.next_due_unix {
        Some(at) if at > now => format!("in {}", human_duration(at - now)),
        _ => "at the next cycle".into(),
    };
    let _ = writeln!(
        out,
        "                  next {next}; failures: {} freeze, {} thaw",
        app.freeze_failures, app.thaw_failures,
    );
    if let Some(failure) = &app.last_failure {
        let _ = writeln!(out, "  app-consistent failure: {failure}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status part as the daemon sends it, read back as the CLI does.
    fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("a status part")
    }

    #[test]
    fn compression_says_what_auto_decided_and_why() {
        let auto = serde_json::json!({
            "mode": "auto", "level": 1, "compressing": true,
            "link_bytes_per_sec": 12_582_912, "codec_bytes_per_sec": 251_658_240,
            "ratio_per_mille": 512
        });
        let line = compression_line(&typed(auto));
        assert!(
            line.starts_with("auto, DEFLATE level 1: compressing (link "),
            "{line}"
        );
        assert!(line.contains("per worker, ratio 0.512)"), "{line}");
        let off = serde_json::json!({"mode": "off", "level": null, "compressing": false});
        assert_eq!(compression_line(&typed(off)), "off");
        let zstd = serde_json::json!({
            "mode": "auto", "codec": "zstd", "level": -1, "compressing": true,
            "codec_bytes_per_sec": 524_288_000, "ratio_per_mille": 505
        });
        let line = compression_line(&typed(zstd));
        assert!(
            line.starts_with("auto, zstd level -1: compressing (zstd 500.0 MiB/s per worker"),
            "{line}"
        );
        let fallback = serde_json::json!({
            "mode": "on", "codec": "deflate", "level": 3, "zstd_not_decoded": true
        });
        assert_eq!(
            compression_line(&typed(fallback)),
            "on, DEFLATE level 3 (the replica does not decode zstd)"
        );
    }

    #[test]
    fn durations_and_bars_read_well() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(303), "5m03s");
        assert_eq!(human_duration(3720), "1h02m");
        assert_eq!(human_lag(1_349), "1.3s");
        assert_eq!(human_lag(59_999), "59.9s");
        assert_eq!(human_lag(61_000), "1m01s");
        assert_eq!(
            progress_bar(1, 2),
            format!("[{}{}]  50%", "#".repeat(15), "-".repeat(15))
        );
        assert_eq!(progress_bar(0, 0), format!("[{}] 100%", "#".repeat(30)));
    }

    #[test]
    fn the_ring_full_policy_shows_what_throttling_cost() {
        let mut ring = RingReport {
            on_full: "throttle".into(),
            throttle: Some(ThrottleReport {
                bound_ms: 2000,
                writes: 12,
                total_delay_ms: 3400,
                max_delay_ms: 810,
                expired: 0,
            }),
            ..RingReport::default()
        };
        let mut out = String::new();
        render_ring_full(&mut out, &ring);
        assert_eq!(
            out,
            "  when full: throttle writers, at most 2000 ms a write; 12 delayed, 3400 ms in all, longest 810 ms; bound passed 0 time(s)\n"
        );
        ring.on_full = "bitmap".into();
        ring.throttle = None;
        let mut out = String::new();
        render_ring_full(&mut out, &ring);
        assert_eq!(out, "  when full: bitmap (dirty maps, then a resync)\n");
    }

    #[test]
    fn a_replica_consumer_shows_its_state_comparison_and_error() {
        let consumer = serde_json::json!({
            "consumer": "replica https://replica:8443",
            "relationship": "abc",
            "epoch": 3,
            "state": "awaiting_import",
            "health": "Warning",
            "health_reason": "3 of 10 cycles missed in the last hour",
            "cycles_delivered": 0,
            "last_comparison": { "marked_bytes": 1u64 << 30, "differing_bytes": 3u64 << 20, "hashes": 77 },
            "last_error": "Replica server https://replica:8443: busy",
        });
        let mut out = String::new();
        render_consumer(&mut out, &typed(consumer), 5 << 20);
        for line in [
            "  replication: awaiting import (relationship abc, epoch 3)",
            "  health:    Warning - 3 of 10 cycles missed in the last hour",
            "  last error: Replica server https://replica:8443: busy",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        assert!(
            out.contains("compared:  3.0 MiB differed of 1.0 GiB (77 hashes)"),
            "{out}"
        );
        assert!(out.contains("pending 5.0 MiB"), "{out}");
    }

    #[test]
    fn application_consistent_points_show_counts_failures_and_next() {
        let consumer = serde_json::json!({
            "consumer": "local copy",
            "app_consistent": {
                "every_secs": 14400, "points": 3, "points_delivered": 2,
                "freeze_failures": 1, "thaw_failures": 0,
                "last_cycle": 57, "last_unix": 1000, "next_due_unix": 1000 + 14400 - 150,
                "last_failure": "Freeze of cycle 50: `virsh domfsfreeze vm1` failed (exit status: 1)",
            },
        });
        let mut out = String::new();
        render_app_consistent(
            &mut out,
            &typed(consumer["app_consistent"].clone()),
            1000 + 3720,
        );
        assert_eq!(
            out,
            "  app-consistent: every 4h00m; 3 point(s), 2 delivered; last cycle 57 (1h02m ago)\n                  next in 2h55m; failures: 1 freeze, 0 thaw\n  app-consistent failure: Freeze of cycle 50: `virsh domfsfreeze vm1` failed (exit status: 1)\n"
        );
        let mut out = String::new();
        render_consumer(&mut out, &typed(consumer), 0);
        assert!(out.contains("app-consistent: every 4h00m"), "{out}");
        let mut out = String::new();
        render_app_consistent(
            &mut out,
            &typed(serde_json::json!({ "every_secs": 7200 })),
            5,
        );
        assert!(
            out.contains("none yet") && out.contains("next at the next cycle"),
            "{out}"
        );
    }
}
