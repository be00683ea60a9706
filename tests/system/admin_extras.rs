//! What admins also ask for (issue 18): bandwidth by time of day, `blkrep
//! replication measure`, and the event log.
//!
//! - `a_bandwidth_window_slows_shipping_while_it_is_open`: a real primary replicates
//!   over mutual TLS to a real replica with a group limit of 8 MiB/s and a daemon-wide
//!   `[[replication.bandwidth_schedule]]` window of 1 MiB/s that opens about 25
//!   seconds after the test starts (computed from the host's local time, read with
//!   `date`) and lasts ten seconds. One large cycle ships across the window; the
//!   shipper's bytes sent, sampled all along, rise at about 8 MiB/s before the window,
//!   about 1 MiB/s inside it, and about 8 MiB/s again after it, with no restart.
//! - `measure_sums_up_the_cycles_delivered`: a primary ships five cycles to a real
//!   replica, then one attempt fails while the replica is down; `blkrep replication
//!   measure --json` counts exactly the cycles the shipper's status says it delivered,
//!   the failure and the missed interval, bytes that add up, p50 <= p99 <= the worst
//!   RPO, and a window after the last delivery counts no delivery; the text form
//!   names the same figures.
//! - `refusals_and_resyncs_reach_the_event_logs`: both daemons have an `event_log`.
//!   A primary the replica does not authorise is refused: the replica's file holds a
//!   `primary_refused` event, the primary's a `replication_suspended` and a
//!   `health_changed` to Critical for its group. An authorised primary's initial
//!   replication and an administrator's resync each leave `resync_started` and
//!   `resync_finished`; a test failover started and stopped on the replica server
//!   leaves `test_failover_started` and `test_failover_stopped`. Every line of both files is a JSON object with `time`,
//!   `event`, `group` and `reason`.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::fs;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use testkit::replica::{dc1, lab_certs, Replica, PRIMARY_HOST, REPLICA_HOST, ROGUE_HOST};
use testkit::*;

const OUTSIDE: u64 = 8 * MIB;
const INSIDE: u64 = MIB;
/// From the test's start to the window's.
const LEAD: u64 = 25;
const WINDOW: u64 = 10;
/// When the cycle closes, before the window opens.
const CLOSE_BEFORE: u64 = 5;
const WRITTEN: u64 = 80 * MIB;

/// The local time now as (weekday, seconds since midnight) and the Unix time it
/// belongs to, from `date` (so the test does not read the clock the way the daemon
/// does).
fn local_now() -> (String, u64, u64) {
    let output = run_ok(
        Command::new("date")
            .env("LC_ALL", "C")
            .arg("+%a %H %M %S %s"),
        SHORT,
    );
    let text = output.stdout.trim();
    let fields: Vec<&str> = text.split_whitespace().collect();
    let number = |index: usize| -> u64 {
        fields[index]
            .parse()
            .unwrap_or_else(|_| panic!("date printed {text:?}"))
    };
    (
        fields[0].to_ascii_lowercase(),
        number(1) * 3600 + number(2) * 60 + number(3),
        number(4),
    )
}

fn hms(secs: u64) -> String {
    let secs = secs % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The average rate in bytes per second between two Unix times, from samples of
/// (Unix time, bytes sent).
fn rate_between(samples: &[(f64, u64)], from: f64, to: f64) -> f64 {
    let at = |time: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.0 - time).abs().total_cmp(&(b.0 - time).abs()))
            .copied()
            .expect("samples")
    };
    let (start, end) = (at(from), at(to));
    assert!(
        end.0 - start.0 > 1.0,
        "too few samples between {from} and {to}"
    );
    (end.1 - start.1) as f64 / (end.0 - start.0)
}

#[test]
fn a_bandwidth_window_slows_shipping_while_it_is_open() {
    require_tool("qemu-io");
    let (day, secs, unix) = local_now();
    // The window belongs to the day it starts on, which may be tomorrow.
    let (window_day, window_from) = if secs + LEAD >= 86_400 {
        let tomorrow = run_ok(
            Command::new("date")
                .env("LC_ALL", "C")
                .args(["-d", "tomorrow", "+%a"]),
            SHORT,
        );
        (
            tomorrow.stdout.trim().to_ascii_lowercase(),
            secs + LEAD - 86_400,
        )
    } else {
        (day, secs + LEAD)
    };
    let opens = (unix + LEAD) as f64;
    let closes = opens + WINDOW as f64;

    let certs_dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(certs_dir.path());
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "");
    let mut primary = Primary::prepare(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 128 * MIB)],
    )
    .ring_size("256MiB")
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        &format!("compression = false\nbandwidth_limit = {OUTSIDE}"),
    )))]));
    let schedule = format!(
        "\n[replication]\n[[replication.bandwidth_schedule]]\ndays = [\"{window_day}\"]\nfrom = \"{}\"\nto = \"{}\"\nlimit = {INSIDE}\n",
        hms(window_from),
        hms(window_from + WINDOW),
    );
    let mut config = fs::read_to_string(primary.config()).expect("read config");
    config.push_str(&schedule);
    fs::write(primary.config(), config).expect("write config");
    let check = run(
        primary
            .cmd()
            .args(["primary", "--check", "--config"])
            .arg(primary.config()),
        SHORT,
    );
    assert!(check.success(), "{schedule}\n{}", check.report());
    primary.restart();
    let cycle = primary.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);

    // A backlog that outlasts the window at these rates.
    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x5a 0 {WRITTEN}"),
            &primary.uri("disk0"),
        ]),
        LONG,
    );
    let close_at = opens - CLOSE_BEFORE as f64;
    let now = unix_now();
    assert!(
        now < close_at,
        "setting up took past the planned close ({:.1}s late); the window opens at {} local",
        now - close_at,
        hms(window_from)
    );
    thread::sleep(Duration::from_secs_f64(close_at - now));
    // `cycles close` returns once the cycle is delivered; sample while it waits.
    let mut close = primary.cycles_close_cmd("vm1");
    let closing = thread::spawn(move || run(&mut close, LONG));
    let mut samples = Vec::new();
    let started = Instant::now();
    while !closing.is_finished() {
        let status = primary.group_status("vm1")["consumer"].clone();
        let sent = status["network_bytes"].as_u64().expect("network_bytes");
        samples.push((unix_now(), sent));
        assert!(
            started.elapsed() < LONG,
            "no delivery in {LONG:?}: {status:#}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let closed = closing.join().expect("cycles close");
    assert!(closed.success(), "{}", closed.report());
    let cycle = closed.json()["cycle"].as_u64().expect("cycle");
    let status = primary.group_status("vm1")["consumer"].clone();
    samples.push((
        unix_now(),
        status["network_bytes"].as_u64().expect("network_bytes"),
    ));
    let finished = samples.last().expect("samples").0;
    assert!(
        finished > closes + 2.0,
        "the cycle was delivered before the window closed (at {finished}, window until {closes}): {status:#}"
    );
    // Margins of a second and a chunk's time at the edges.
    let before = rate_between(&samples, close_at + 1.0, opens - 0.5);
    let inside = rate_between(&samples, opens + 2.5, closes - 0.5);
    let after = rate_between(&samples, closes + 0.5, finished.min(closes + 4.0));
    let mib = |rate: f64| rate / MIB as f64;
    eprintln!(
        "bytes sent per second: before {:.2} MiB/s, inside {:.2} MiB/s, after {:.2} MiB/s",
        mib(before),
        mib(inside),
        mib(after)
    );
    assert!(
        (4.0..=10.0).contains(&mib(before)),
        "before the window: {:.2} MiB/s, the plain limit is 8",
        mib(before)
    );
    assert!(
        (0.4..=2.0).contains(&mib(inside)),
        "inside the window: {:.2} MiB/s, its limit is 1",
        mib(inside)
    );
    assert!(
        (4.0..=10.0).contains(&mib(after)),
        "after the window: {:.2} MiB/s, the plain limit is 8",
        mib(after)
    );
    assert!(
        primary.log().contains("Bandwidth limit changed"),
        "{}",
        tail(&primary.log(), 40)
    );
    replica.wait_applied("vm1", cycle, LONG);
    assert_files_equal(
        &primary.image("disk0"),
        &replica.disk("dc1", "vm1", "disk0"),
        "disk0",
    );
}

fn measure(primary: &Primary, since: &str, json: bool) -> Output {
    let mut args = vec!["measure", "--group", "vm1", "--since", since];
    if json {
        args.push("--json");
    }
    let output = primary.replication(&args);
    assert!(output.success(), "{}", output.report());
    output
}

#[test]
fn measure_sums_up_the_cycles_delivered() {
    require_tool("qemu-io");
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(certs_dir.path());
    let mut replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "");
    let primary = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 16 * MIB)],
    )
    .ring_size("64MiB")
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "retry_scale = 0.01\nrequest_timeout = \"2s\"",
    )))]));
    let first = primary.cycles_close("vm1");
    replica.wait_applied("vm1", first, LONG);
    for round in 0..4u64 {
        run_ok(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {} {} {}", 0x30 + round, round * MIB, 256 * KIB),
                &primary.uri("disk0"),
            ]),
            LONG,
        );
        primary.cycles_close("vm1");
    }
    let delivered = primary.group_status("vm1")["consumer"]["cycles_delivered"]
        .as_u64()
        .expect("cycles_delivered");
    assert_eq!(delivered, 5);

    // One attempt that fails: the replica is gone.
    replica.kill();
    let failed = run(&mut primary.cycles_close_cmd("vm1"), LONG);
    assert!(!failed.success(), "a close with the replica down succeeded");

    let figures = measure(&primary, "1h", true).json();
    let number = |name: &str| {
        figures[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {figures:#}"))
    };
    assert_eq!(number("successes"), delivered, "{figures:#}");
    assert!(number("failures") >= 1, "{figures:#}");
    assert!(
        number("missed_intervals") >= number("failures"),
        "{figures:#}"
    );
    let data = number("data_bytes");
    assert!(data >= 4 * 256 * KIB, "{figures:#}");
    assert!(number("network_bytes") > 0, "{figures:#}");
    assert!(
        number("max_transfer_bytes") >= number("avg_transfer_bytes"),
        "{figures:#}"
    );
    assert!(number("max_transfer_bytes") >= 256 * KIB, "{figures:#}");
    assert_eq!(
        number("avg_transfer_bytes"),
        data / delivered,
        "{figures:#}"
    );
    let (p50, p99, worst) = (
        number("rpo_p50_ms"),
        number("rpo_p99_ms"),
        number("rpo_max_ms"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= worst, "{figures:#}");
    assert!(
        figures["compression_ratio"]
            .as_f64()
            .is_some_and(|ratio| ratio > 0.0),
        "{figures:#}"
    );
    assert!(figures["avg_transfer_ms"].is_u64(), "{figures:#}");

    let text = measure(&primary, "1h", false).stdout;
    for expected in [
        format!("Successful cycles       {delivered}"),
        format!("Failed attempts         {}", number("failures")),
        "Achieved RPO p50 / p99".to_string(),
        "Compression ratio".to_string(),
    ] {
        assert!(text.contains(&expected), "{expected:?} in\n{text}");
    }

    // A window that starts after the last delivery holds none (the shipper keeps
    // retrying, so failures may land in it).
    thread::sleep(Duration::from_millis(2500));
    let recent = measure(&primary, "1s", true).json();
    assert_eq!(recent["successes"], 0, "{recent:#}");
    assert_eq!(recent["data_bytes"], 0, "{recent:#}");
    assert!(recent["rpo_p50_ms"].is_null(), "{recent:#}");
}

/// The events of a JSON-lines file; every line must be a JSON object with the
/// common fields.
fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", path.display()));
            for field in ["time", "event", "group", "reason"] {
                assert!(event.get(field).is_some(), "no {field} in {line}");
            }
            assert!(
                humantime::parse_rfc3339(event["time"].as_str().unwrap_or("")).is_ok(),
                "time of {line}"
            );
            event
        })
        .collect()
}

/// Waits until `path` holds an event `name` (of `group`, if given) that `check`
/// accepts; returns it.
fn wait_event(
    path: &std::path::Path,
    name: &str,
    group: Option<&str>,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LONG;
    loop {
        let all = events(path);
        if let Some(found) = all.iter().find(|event| {
            event["event"] == name
                && group.is_none_or(|group| event["group"] == group)
                && check(event)
        }) {
            return found.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {name} event in {}: {all:#?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A primary of group `group` replicating with `consumer`, logging events to
/// `event_log`.
fn primary_with_events(group: &str, consumer: String, event_log: &std::path::Path) -> Primary {
    let mut primary = Primary::prepare(Spec::new(vec![GroupSpec::new(
        group,
        vec![DiskSpec::new("disk0", 4 * MIB).init(Init::Random(3))],
    )
    .ring_size("16MiB")
    .consumer(Consumer::Raw(consumer))]));
    let config = fs::read_to_string(primary.config()).expect("read config");
    let config = format!(
        "event_log = {:?}\n{config}",
        event_log.display().to_string()
    );
    fs::write(primary.config(), config).expect("write config");
    primary.restart();
    primary
}

#[test]
fn refusals_and_resyncs_reach_the_event_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica_events = dir.path().join("replica/events.jsonl");
    let replica = Replica::start(
        &certs,
        REPLICA_HOST,
        &dc1(),
        &format!("event_log = {:?}", replica_events.display().to_string()),
    );
    let url = replica.url(REPLICA_HOST);

    // Refused: an identity no authorisation entry allows.
    let rogue_events = dir.path().join("rogue/events.jsonl");
    let rogue = primary_with_events(
        "vm1",
        certs.consumer(&url, ROGUE_HOST, "retry_scale = 0.001"),
        &rogue_events,
    );
    let close = run(&mut rogue.cycles_close_cmd("vm1"), LONG);
    assert!(
        !close.success(),
        "the rogue primary shipped\n{}",
        close.report()
    );
    rogue.wait_consumer("vm1", "suspension", SHORT, |s| s["state"] == "suspended");
    let suspended = wait_event(&rogue_events, "replication_suspended", Some("vm1"), |_| {
        true
    });
    assert!(
        suspended["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("not authorised")),
        "{suspended:#}"
    );
    let critical = wait_event(&rogue_events, "health_changed", Some("vm1"), |event| {
        event["to"] == "Critical"
    });
    assert!(
        critical["reason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("Suspended")),
        "{critical:#}"
    );
    let refused = wait_event(&replica_events, "primary_refused", None, |event| {
        event["identity"]
            .as_str()
            .is_some_and(|names| names.contains(ROGUE_HOST))
    });
    assert!(refused["reason"].is_string(), "{refused:#}");

    // Resyncs: the initial replication, then one an administrator asks for.
    let good_events = dir.path().join("good/events.jsonl");
    let good = primary_with_events("vm2", certs.consumer(&url, PRIMARY_HOST, ""), &good_events);
    let cycle = good.cycles_close("vm2");
    replica.wait_applied("vm2", cycle, LONG);
    wait_event(&good_events, "resync_started", Some("vm2"), |event| {
        event["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("initial"))
    });
    wait_event(&good_events, "resync_finished", Some("vm2"), |_| true);
    let asked = good.replication(&["resync", "--group", "vm2"]);
    assert!(asked.success(), "{}", asked.report());
    let cycle = good.cycles_close("vm2");
    replica.wait_applied("vm2", cycle, LONG);
    let started = wait_event(&good_events, "resync_started", Some("vm2"), |event| {
        !event["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("initial"))
    });
    let finished: Vec<_> = events(&good_events)
        .into_iter()
        .filter(|event| event["event"] == "resync_finished")
        .collect();
    assert_eq!(finished.len(), 2, "{finished:#?}");
    assert!(
        finished[1]["time"].as_str() >= started["time"].as_str(),
        "{finished:#?} {started:#}"
    );
    // Nothing of the good primary's is refused; the rogue's file has no resync.
    assert!(events(&good_events)
        .iter()
        .all(|event| event["event"] != "replication_suspended"));
    assert!(events(&rogue_events)
        .iter()
        .all(|event| event["event"] != "resync_finished"));

    // A test failover on the replica server, started and stopped.
    replica
        .cli(&["test-failover", "start", "--name", "vm2"])
        .assert_ok();
    replica
        .cli(&["test-failover", "stop", "--name", "vm2"])
        .assert_ok();
    let started = wait_event(
        &replica_events,
        "test_failover_started",
        Some("vm2"),
        |_| true,
    );
    let stopped = wait_event(
        &replica_events,
        "test_failover_stopped",
        Some("vm2"),
        |_| true,
    );
    assert!(
        started["time"].as_str() <= stopped["time"].as_str(),
        "{started:#} {stopped:#}"
    );
}
