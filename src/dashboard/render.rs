//! The page as HTML: per group its health, tracking, ring, copy progress and charts
//! of the last hour; on the replica daemon per replica its state, lag, applies,
//! recovery points, test failovers and failovers. Every string from configuration
//! or peers goes through [`escape`].

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use shipper::{Health, ShipperStatus};
use wire::api::{Consistency, ReplicaInfo, Role};

use super::history::{History, Series, WINDOW};
use super::svg::{self, Frame, Mark};
use super::{escape, group_key, replica_key, DaemonKind, Figures, REFRESH_SECS, SAMPLE_INTERVAL};
use crate::status::{human_bytes, human_duration, human_lag, state_name, GroupReport};

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#1f2328;max-width:60em}\
h1{font-size:1.5em}h2{font-size:1.25em;border-top:1px solid #d0d7de;padding-top:.8em}\
h3{font-size:1.05em}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}\
dt{color:#59636e}dd{margin:0}.health{padding:.1em .5em;border-radius:.8em;font-weight:bold}\
.health-normal{background:#dafbe1}.health-warning{background:#fff8c5}\
.health-critical{background:#ffebe9}.health-none{background:#eaeef2}\
.no-data{color:#59636e;font-style:italic}.error{color:#cf222e}\
table{border-collapse:collapse}td,th{padding:.2em .6em;text-align:left;border-bottom:1px solid #eaeef2}\
svg.chart{display:block;margin:.3em 0 1em}";

/// The whole page at `now_ms`.
pub fn page(kind: DaemonKind, now_ms: u64, figures: &Figures, history: &History) -> String {
    let daemon = match kind {
        DaemonKind::Primary => "primary",
        DaemonKind::Replica => "replica server",
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>blkrep {daemon}</title><style>{STYLE}</style></head><body>\
         <h1>blkrep {daemon}</h1><p class=\"generated\">{} UTC; this page reloads every \
         {REFRESH_SECS} s; charts show samples taken every {} s over the last hour.</p>",
        format_time(now_ms),
        SAMPLE_INTERVAL.as_secs()
    );
    match kind {
        DaemonKind::Primary => {
            out.push_str("<h2>Groups</h2>");
            if figures.groups.is_empty() {
                out.push_str("<p class=\"no-data\">No groups.</p>");
            }
        }
        DaemonKind::Replica => {
            out.push_str("<h2>Replicas</h2>");
            if figures.replicas.is_empty() {
                out.push_str("<p class=\"no-data\">No replicas.</p>");
            }
            let mut replicas: Vec<&ReplicaInfo> = figures.replicas.iter().collect();
            replicas.sort_by(|a, b| (&a.trust_group, &a.name).cmp(&(&b.trust_group, &b.name)));
            for info in replicas {
                let series = history.series(&replica_key(&info.trust_group, &info.name));
                replica_section(&mut out, now_ms, info, series);
            }
            if !figures.groups.is_empty() {
                out.push_str(
                    "<h2>Live groups</h2><p>Replicas failed over to, served as the group's disks.</p>",
                );
            }
        }
    }
    for group in &figures.groups {
        group_section(
            &mut out,
            now_ms,
            group,
            history.series(&group_key(&group.name)),
        );
    }
    out.push_str("</body></html>\n");
    out
}

/// Milliseconds since the epoch as RFC 3339, seconds, UTC.
fn format_time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// A count of bytes drawn as a value, back to bytes for a label.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn bytes_label(value: f64) -> String {
    human_bytes(value.max(0.0) as u64)
}

fn seconds_label(value: f64) -> String {
    if value >= 60.0 {
        human_duration(Duration::from_secs_f64(value.max(0.0)).as_secs())
    } else {
        format!("{value:.1} s")
    }
}

fn milliseconds_label(value: f64) -> String {
    format!("{value:.0} ms")
}

fn as_f64(value: u64) -> f64 {
    crate::metrics::count_f64(value)
}

/// The left edge of the last hour.
fn hour_ago(now_ms: u64) -> u64 {
    now_ms.saturating_sub(u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX))
}

fn no_data(out: &mut String, what: &str) {
    let _ = write!(
        out,
        "<p class=\"no-data\">{}: no data yet.</p>",
        escape(what)
    );
}

/// The lag chart of `series`, or "no data yet".
fn lag_chart(out: &mut String, now_ms: u64, series: Option<&Series>) {
    let title = "Lag over the last hour";
    let points: Vec<(u64, Option<f64>)> = series
        .map(|s| {
            s.samples()
                .map(|sample| (sample.at_ms, sample.lag_ms.map(|ms| as_f64(ms) / 1000.0)))
                .collect()
        })
        .unwrap_or_default();
    if points.iter().all(|(_, lag)| lag.is_none()) {
        return no_data(out, title);
    }
    let _ = write!(out, "<h4>{title}</h4>");
    out.push_str(&svg::line_chart(
        &Frame {
            title,
            class: "lag",
            start_ms: hour_ago(now_ms),
            end_ms: now_ms,
            format: &seconds_label,
        },
        &points,
    ));
}

/// Bars of the average cycle size between samples, and of the newest delivery's
/// duration at each sample.
fn delivery_charts(out: &mut String, now_ms: u64, series: Option<&Series>, verb: &str) {
    let sizes: Vec<(u64, f64)> = series
        .map(|s| {
            s.average_cycles()
                .into_iter()
                .map(|(at, bytes)| (at, as_f64(bytes)))
                .collect()
        })
        .unwrap_or_default();
    let times: Vec<(u64, f64)> = series
        .map(|s| {
            s.deliveries()
                .filter_map(|d| Some((d.at_ms, as_f64(d.duration_ms?))))
                .collect()
        })
        .unwrap_or_default();
    let size_title = format!("Average size of the cycles {verb} between samples");
    let time_title = format!("Time the newest cycle took to be {verb}, at each sample");
    bars(
        out,
        now_ms,
        &size_title,
        "cycle-sizes",
        &sizes,
        &bytes_label,
    );
    bars(
        out,
        now_ms,
        &time_title,
        "transfer-times",
        &times,
        &milliseconds_label,
    );
}

/// A bar chart of the last hour, or "no data yet".
fn bars(
    out: &mut String,
    now_ms: u64,
    title: &str,
    class: &'static str,
    bars: &[(u64, f64)],
    format: &dyn Fn(f64) -> String,
) {
    if bars.is_empty() {
        return no_data(out, title);
    }
    let _ = write!(out, "<h4>{}</h4>", escape(title));
    out.push_str(&svg::bar_chart(
        &Frame {
            title,
            class,
            start_ms: hour_ago(now_ms),
            end_ms: now_ms,
            format,
        },
        bars,
    ));
}

fn health_badge(health: Option<Health>, replicating: bool) -> &'static str {
    match (health, replicating) {
        (Some(Health::Normal), _) => "<span class=\"health health-normal\">Normal</span>",
        (Some(Health::Warning), _) => "<span class=\"health health-warning\">Warning</span>",
        (Some(Health::Critical), _) => "<span class=\"health health-critical\">Critical</span>",
        (None, true) => "<span class=\"health health-none\">Not assessed</span>",
        (None, false) => "<span class=\"health health-none\">Not replicated</span>",
    }
}

fn group_section(out: &mut String, now_ms: u64, group: &GroupReport, series: Option<&Series>) {
    let consumer = group.consumer.as_ref();
    let _ = write!(
        out,
        "<section class=\"group\" data-group=\"{name}\"><h2>Group <span class=\"name\">{name}</span> {}</h2><dl>",
        health_badge(consumer.and_then(|c| c.health), consumer.is_some()),
        name = escape(&group.name),
    );
    if let Some(reason) = consumer.and_then(|c| c.health_reason.as_deref()) {
        let _ = write!(
            out,
            "<dt>Health reason</dt><dd class=\"reason\">{}</dd>",
            escape(reason)
        );
    }
    let tracking = match &group.resync_reason {
        Some(reason) => format!(
            "{} — resync required: {}",
            escape(&group.tracking),
            escape(reason)
        ),
        None => escape(&group.tracking),
    };
    let _ = write!(
        out,
        "<dt>Tracking</dt><dd class=\"tracking\">{tracking}</dd>"
    );
    if group.tracking != "off" {
        let percent = if group.ring.size == 0 {
            0.0
        } else {
            as_f64(group.ring.used) * 100.0 / as_f64(group.ring.size)
        };
        let _ = write!(
            out,
            "<dt>Ring</dt><dd><progress value=\"{}\" max=\"{}\"></progress> {} of {} used ({percent:.1}%)</dd>",
            group.ring.used,
            group.ring.size.max(1),
            human_bytes(group.ring.used),
            human_bytes(group.ring.size),
        );
    }
    let _ = write!(
        out,
        "<dt>Cycles</dt><dd>open {}, last closed {}, last acknowledged {}; every {} s</dd>",
        group.cycle.open, group.cycle.last_closed, group.cycle.last_acked, group.interval_secs
    );
    match consumer {
        None => out.push_str("<dt>Replication</dt><dd>none configured</dd></dl>"),
        Some(consumer) => consumer_details(out, consumer),
    }
    lag_chart(out, now_ms, series);
    if consumer.is_some() {
        delivery_charts(out, now_ms, series, "delivered");
        delivered_timeline(out, now_ms, series);
    }
    out.push_str("</section>");
}

/// The consumer's lines (closing the list) and its copy's progress.
fn consumer_details(out: &mut String, consumer: &ShipperStatus) {
    let _ = write!(
        out,
        "<dt>Replication</dt><dd class=\"state\">{} to {}</dd>",
        escape(&state_name(consumer.state)),
        escape(&consumer.consumer)
    );
    let lag = consumer
        .lag_ms
        .map_or_else(|| "no state delivered yet".into(), human_lag);
    let _ = write!(out, "<dt>Lag now</dt><dd>{lag}</dd>");
    let _ = write!(
        out,
        "<dt>Delivered</dt><dd>{} cycle(s), {} of changes, {} sent; newest {} in {}; largest {}, average {}</dd>",
        consumer.cycles_delivered,
        human_bytes(consumer.bytes_delivered),
        human_bytes(consumer.network_bytes),
        human_bytes(consumer.last_cycle_bytes),
        consumer
            .last_duration_ms
            .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
        human_bytes(consumer.max_cycle_bytes),
        human_bytes(consumer.avg_cycle_bytes),
    );
    let _ = write!(
        out,
        "<dt>Last hour</dt><dd>{} interval(s), {} missed; {} failure(s) since start</dd>",
        consumer.cycles_last_hour, consumer.missed_last_hour, consumer.failures
    );
    if let Some(error) = &consumer.last_error {
        let _ = write!(
            out,
            "<dt>Last error</dt><dd class=\"error\">{}</dd>",
            escape(error)
        );
    }
    out.push_str("</dl>");
    if let Some(copy) = &consumer.resync {
        let what = if consumer.state == shipper::ReplicationState::InitialReplication {
            "Initial replication"
        } else {
            "Resync"
        };
        let percent = if copy.total_bytes == 0 {
            0.0
        } else {
            as_f64(copy.done_bytes) * 100.0 / as_f64(copy.total_bytes)
        };
        let _ = write!(
            out,
            "<p class=\"copy\">{what} ({}): <progress value=\"{}\" max=\"{}\"></progress> {} of {} ({percent:.1}%)</p>",
            escape(&copy.reason),
            copy.done_bytes,
            copy.total_bytes.max(1),
            human_bytes(copy.done_bytes),
            human_bytes(copy.total_bytes),
        );
    }
}

/// The states the replica received in the last hour (deliveries the sampler saw):
/// the replica's recovery points are among them; its own page lists those.
fn delivered_timeline(out: &mut String, now_ms: u64, series: Option<&Series>) {
    let title = "States delivered to the replica (its recovery points are among them)";
    let marks: Vec<Mark> = series
        .map(|s| {
            s.deliveries()
                .map(|d| {
                    let at_ms = d.closed_ms.unwrap_or(d.at_ms);
                    Mark {
                        at_ms,
                        label: format!("cycle {} closed at {}", d.cycle, format_time(at_ms)),
                        strong: false,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if marks.is_empty() {
        return no_data(out, title);
    }
    let _ = write!(out, "<h4>{title}</h4>");
    out.push_str(&svg::timeline(
        &Frame {
            title,
            class: "points",
            start_ms: hour_ago(now_ms),
            end_ms: now_ms,
            format: &seconds_label,
        },
        &marks,
    ));
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    human_duration(now_ms.saturating_sub(at_ms) / 1000)
}

fn replica_section(out: &mut String, now_ms: u64, info: &ReplicaInfo, series: Option<&Series>) {
    let role = match info.role {
        Role::Replica => "replica",
        Role::Primary => "primary (failed over to)",
    };
    // An apply is the normal state of a busy replica, not a warning: the latest point
    // stays the state a failover reaches.
    let consistent = match info.consistency() {
        Consistency::Consistent => "<span class=\"health health-normal\">Consistent</span>".into(),
        Consistency::Applying { cycle } => format!(
            "<span class=\"health health-normal\">Consistent at cycle {cycle}, applying</span>"
        ),
        Consistency::NotConsistent => {
            "<span class=\"health health-warning\">Not consistent</span>".into()
        }
    };
    let _ = write!(
        out,
        "<section class=\"replica\" data-replica=\"{name}\"><h3><span class=\"name\">{name}</span> \
         (trust group {}) {consistent}</h3><dl><dt>Role</dt><dd>{role} at epoch {}</dd>",
        escape(&info.trust_group),
        info.epoch,
        name = escape(&info.name),
    );
    let applied = match (info.last_applied_cycle, info.last_applied_unix) {
        (Some(cycle), Some(at)) => format!(
            "cycle {cycle}, {} ago",
            ago(now_ms, at.saturating_mul(1000))
        ),
        (Some(cycle), None) => format!("cycle {cycle}"),
        (None, _) => "none yet".into(),
    };
    let _ = write!(
        out,
        "<dt>Last applied</dt><dd>{applied}</dd><dt>Pending transfers</dt><dd>{}</dd>\
         <dt>Applied</dt><dd>{} transfer(s), {}</dd><dt>Paused</dt><dd>{}</dd>",
        info.pending_transfers,
        info.applied_transfers,
        human_bytes(info.applied_bytes),
        yes_no(info.paused),
    );
    if let Some(epoch) = info.resync_epoch {
        let _ = write!(
            out,
            "<dt>Copy</dt><dd>initial replication or resync running (epoch {epoch})</dd>"
        );
    }
    if info.awaiting_import {
        out.push_str("<dt>Copy</dt><dd>waiting for its initial copy to be imported</dd>");
    }
    if info.unclaimed {
        out.push_str("<dt>Claim</dt><dd>an existing copy no primary has claimed</dd>");
    }
    drills(out, now_ms, info);
    out.push_str("</dl>");
    lag_chart(out, now_ms, series);
    delivery_charts(out, now_ms, series, "applied");
    recovery_points(out, now_ms, info);
    out.push_str("</section>");
}

/// Test failovers and the failover, as list lines.
fn drills(out: &mut String, now_ms: u64, info: &ReplicaInfo) {
    if let Some(test) = &info.test_failover {
        let exports: Vec<String> = test.exports.iter().map(|e| escape(e)).collect();
        let _ = write!(
            out,
            "<dt>Test failover</dt><dd class=\"test-failover\">in progress for {}, at cycle {} ({}); exports {}</dd>",
            ago(now_ms, test.started_unix.saturating_mul(1000)),
            test.cycle,
            format_time(test.time_unix_ms),
            exports.join(", ")
        );
    } else if let Some(at) = info.last_test_unix {
        let _ = write!(
            out,
            "<dt>Test failover</dt><dd class=\"test-failover\">last one {} ago</dd>",
            ago(now_ms, at.saturating_mul(1000))
        );
    } else {
        out.push_str("<dt>Test failover</dt><dd class=\"test-failover\">none since the replica was made</dd>");
    }
    if let Some(failover) = &info.failover {
        let _ = write!(
            out,
            "<dt>Failover</dt><dd class=\"failover\">{} {} ago to cycle {} ({}){}</dd>",
            if failover.planned {
                "planned"
            } else {
                "unplanned"
            },
            ago(now_ms, failover.at_unix.saturating_mul(1000)),
            failover.cycle,
            format_time(failover.time_unix_ms),
            if failover.completed {
                ", completed"
            } else {
                ", not completed yet"
            }
        );
    }
}

/// The replica's recovery points on a timeline from the oldest (or an hour ago) to
/// now, and listed.
fn recovery_points(out: &mut String, now_ms: u64, info: &ReplicaInfo) {
    let title = "Recovery points";
    if info.recovery_points.is_empty() {
        return no_data(out, title);
    }
    let oldest = info
        .recovery_points
        .iter()
        .map(|point| point.time_unix_ms)
        .min()
        .unwrap_or(now_ms);
    let marks: Vec<Mark> = info
        .recovery_points
        .iter()
        .map(|point| Mark {
            at_ms: point.time_unix_ms,
            label: point_label(point),
            strong: point.app_consistent,
        })
        .collect();
    let _ = write!(out, "<h4>{title}</h4>");
    out.push_str(&svg::timeline(
        &Frame {
            title,
            class: "points",
            start_ms: oldest.min(hour_ago(now_ms)),
            end_ms: now_ms,
            format: &seconds_label,
        },
        &marks,
    ));
    out.push_str("<table class=\"points\"><tr><th>Point</th><th>Cycle</th><th>Time</th><th>Kind</th><th>Undo data</th></tr>");
    for point in &info.recovery_points {
        let id = if point.latest {
            "latest".to_string()
        } else {
            point.id.to_string()
        };
        let _ = write!(
            out,
            "<tr><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            point.cycle,
            format_time(point.time_unix_ms),
            point_kind(point.app_consistent),
            if point.latest {
                "-".to_string()
            } else {
                human_bytes(point.size)
            },
        );
    }
    out.push_str("</table>");
}

fn point_kind(app_consistent: bool) -> &'static str {
    if app_consistent {
        "application-consistent"
    } else {
        "crash-consistent"
    }
}

fn point_label(point: &wire::api::RecoveryPointInfo) -> String {
    let id = if point.latest {
        "latest".to_string()
    } else {
        format!("point {}", point.id)
    };
    format!(
        "{id}: cycle {} at {}, {}",
        point.cycle,
        format_time(point.time_unix_ms),
        point_kind(point.app_consistent)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::history::{Delivery, Observation, Sample, Totals};
    use super::*;
    use crate::status::{CycleReport, RingReport};

    const NOW: u64 = 1_800_000_000_000;

    fn group(name: &str) -> GroupReport {
        GroupReport {
            name: name.into(),
            tracking: "logging".into(),
            resync_required: false,
            resync_reason: None,
            writes_refused: false,
            interval_secs: 5.0,
            cycle: CycleReport {
                open: 9,
                last_closed: 8,
                last_acked: 8,
            },
            ring: RingReport {
                path: "/var/lib/blkrep/vm1.ring".into(),
                size: 64 << 20,
                used: 16 << 20,
                ..RingReport::default()
            },
            consumer: Some(ShipperStatus {
                consumer: "replica https://dr.example:8443".into(),
                health: Some(Health::Warning),
                health_reason: Some("Lag <b>above</b> the \"warning\" threshold".into()),
                lag_ms: Some(12_000),
                ..ShipperStatus::default()
            }),
            disks: Vec::new(),
        }
    }

    fn primary_page(figures: &Figures, history: &History) -> String {
        page(DaemonKind::Primary, NOW, figures, history)
    }

    #[test]
    fn an_empty_history_says_no_data_yet() {
        let figures = Figures {
            groups: vec![group("vm1")],
            replicas: Vec::new(),
        };
        let html = primary_page(&figures, &History::new(720));
        assert!(
            html.contains("Lag over the last hour: no data yet."),
            "{html}"
        );
        assert!(!html.contains("<svg"), "{html}");
        assert!(html.contains("<span class=\"name\">vm1</span>"), "{html}");
        assert!(html.contains("health-warning\">Warning</span>"), "{html}");
        assert!(html.contains("16.0 MiB of 64.0 MiB used (25.0%)"), "{html}");
        assert!(html.contains("<meta http-equiv=\"refresh\""), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(primary_page(&Figures::default(), &History::new(1)).contains("No groups."));
    }

    #[test]
    fn a_replica_mid_apply_shows_its_latest_point_not_a_warning() {
        let mut applying = replica_info("vm1");
        applying.consistent = false;
        let mut resyncing = replica_info("vm2");
        resyncing.consistent = false;
        resyncing.recovery_points.retain(|point| !point.latest);
        let figures = Figures {
            groups: Vec::new(),
            replicas: vec![applying, resyncing, replica_info("vm3")],
        };
        let html = page(DaemonKind::Replica, NOW, &figures, &History::new(720));
        for expected in [
            "health-normal\">Consistent at cycle 8, applying</span>",
            "health-warning\">Not consistent</span>",
            "health-normal\">Consistent</span>",
        ] {
            assert_eq!(html.matches(expected).count(), 1, "{expected}:\n{html}");
        }
    }

    #[test]
    fn names_and_reasons_from_peers_and_configuration_are_escaped() {
        let mut hostile = group("vm\"><script>alert(1)</script>");
        hostile.resync_reason = Some("<img src=x onerror=alert(2)>".into());
        let mut info = replica_info("<iframe>");
        info.trust_group = "dc'1".into();
        let figures = Figures {
            groups: vec![hostile],
            replicas: vec![info],
        };
        let html = page(DaemonKind::Replica, NOW, &figures, &History::new(720));
        for injected in ["<script", "<img", "<iframe", "<b>above", "dc'1"] {
            assert!(
                !html.contains(injected),
                "{injected} reached the page:\n{html}"
            );
        }
        assert!(
            html.contains("data-group=\"vm&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""),
            "{html}"
        );
        assert!(html.contains("Lag &lt;b&gt;above&lt;/b&gt; the &quot;warning&quot; threshold"));
        assert!(html.contains("resync required: &lt;img src=x onerror=alert(2)&gt;"));
        assert!(html.contains("&lt;iframe&gt;"), "{html}");
        assert!(html.contains("trust group dc&#39;1"), "{html}");
    }

    fn replica_info(name: &str) -> ReplicaInfo {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "trust_group": "dc1",
            "disks": [],
            "consistent": true,
            "last_received_cycle": 8,
            "last_applied_cycle": 8,
            "last_applied_unix": NOW / 1000 - 3,
            "pending_transfers": 0,
            "resync_epoch": null,
            "paused": false,
            "recovery_points": [
                {"id": 3, "cycle": 4, "time_unix_ms": NOW - 1_800_000, "app_consistent": true, "latest": false, "size": 4096},
                {"id": 0, "cycle": 8, "time_unix_ms": NOW - 5_000, "app_consistent": false, "latest": true, "size": 0}
            ],
            "test_failover": {"cycle": 4, "time_unix_ms": NOW - 1_800_000, "app_consistent": true, "started_unix": NOW / 1000 - 60, "exports": ["vm1-test-disk0"]},
        }))
        .unwrap()
    }

    #[test]
    fn charts_draw_the_history_and_the_replica_shows_points_and_drills() {
        let mut history = History::new(720);
        let figures = Figures {
            groups: vec![group("vm1")],
            replicas: vec![replica_info("vm1")],
        };
        for (i, lag) in [(0u64, 2_000u64), (1, 4_000), (2, 3_000)] {
            let at_ms = NOW - 10_000 + i * 5_000;
            let mut observations = super::super::observe(&figures, at_ms);
            observations[0].sample = Sample {
                at_ms,
                lag_ms: Some(lag),
                totals: Some(Totals {
                    cycles: 6 + i,
                    bytes: (6 + i) << 20,
                }),
            };
            observations[0].delivery = Some(Delivery {
                cycle: 6 + i,
                at_ms,
                closed_ms: Some(at_ms - 1_000),
                duration_ms: Some(300),
            });
            history.record(at_ms, observations);
        }
        let html = page(DaemonKind::Replica, NOW, &figures, &history);
        let lag_chart = html.split("<svg class=\"chart lag\"").nth(2).unwrap();
        let points = lag_chart
            .split("points=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        // The last hour spans x 64..628: 10 s before now is 1.6 units left of it;
        // the scale tops at 5 s, so 2 s is at y 128 - 0.4 * 116.
        assert_eq!(points, "626.4,81.6 627.2,35.2 628.0,58.4");
        // Two averages between three samples, three durations.
        assert_eq!(html.matches("class=\"bar\"").count(), 5, "{html}");
        assert!(html.contains("<title>1.0 MiB</title>"), "{html}");
        assert!(html.contains("<svg class=\"chart points\""), "{html}");
        assert!(html.contains("point 3: cycle 4 at"), "{html}");
        assert!(html.contains("in progress for 1m00s, at cycle 4"), "{html}");
        assert!(html.contains("vm1-test-disk0"), "{html}");
        assert!(html.contains("<h2>Live groups</h2>"), "{html}");
    }

    #[test]
    fn copy_progress_shows_done_of_total() {
        let mut copying = group("vm1");
        let consumer = copying.consumer.as_mut().unwrap();
        consumer.state = shipper::ReplicationState::InitialReplication;
        consumer.resync = Some(shipper::thread::ResyncReport {
            reason: "initial replication".into(),
            total_bytes: 4 << 20,
            done_bytes: 1 << 20,
            ..shipper::thread::ResyncReport::default()
        });
        let html = primary_page(
            &Figures {
                groups: vec![copying],
                replicas: Vec::new(),
            },
            &History::new(720),
        );
        assert!(
            html.contains("Initial replication (initial replication): <progress value=\"1048576\" max=\"4194304\"></progress> 1.0 MiB of 4.0 MiB (25.0%)"),
            "{html}"
        );
    }

    #[test]
    fn observations_key_groups_and_replicas_apart() {
        let figures = Figures {
            groups: vec![group("vm1")],
            replicas: vec![replica_info("vm1")],
        };
        let observed: Vec<Observation> = super::super::observe(&figures, NOW);
        assert_eq!(observed[0].key, "group/vm1");
        assert_eq!(observed[0].sample.lag_ms, Some(12_000));
        assert_eq!(observed[1].key, "replica/dc1/vm1");
        assert_eq!(observed[1].sample.lag_ms, Some(5_000));
        assert_eq!(observed[1].delivery.unwrap().closed_ms, Some(NOW - 5_000));
    }
}
