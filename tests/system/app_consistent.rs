//! Application-consistent points end to end: a real `blkrep primary` closing a cycle
//! every second and replicating to a real `blkrep replica` over mutual TLS, with a
//! freeze and a thaw command (a shell script recording what it ran for) around the
//! cycles that are points. The primary's status says which cycles were points; the
//! replica's disks are compared with the primary's images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use testkit::nbd::Conn;
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

/// Writes the hook script into `dir`: it appends `PHASE CYCLE GROUP DISKS` to the
/// returned log, and with `fail_freeze` fails the freeze (exit 1, a line on stderr).
fn hook_script(dir: &Path, fail_freeze: bool) -> (PathBuf, PathBuf) {
    let script = dir.join("hook.sh");
    let log = dir.join("hook.log");
    let fail = if fail_freeze {
        "if [ \"$BLKREP_PHASE\" = freeze ]; then echo 'guest agent is not responding' >&2; exit 1; fi\n"
    } else {
        ""
    };
    std::fs::write(
        &script,
        format!(
            "echo \"$BLKREP_PHASE $BLKREP_CYCLE $BLKREP_GROUP $BLKREP_DISKS\" >> '{}'\n{fail}exit 0\n",
            log.display()
        ),
    )
    .expect("write hook script");
    (script, log)
}

/// A primary with group vm1 (two disks, a cycle every second) replicating to
/// `replica`, with points every `every` made by `script`.
fn primary(certs: &LabCerts, replica: &Replica, script: &Path, every: &str) -> Primary {
    let script = script.display().to_string();
    let consumer = format!(
        "{}\n[group.app_consistent]\nevery = {every:?}\nfreeze_command = [\"sh\", {script:?}]\nthaw_command = [\"sh\", {script:?}]\ntimeout = \"20s\"\n",
        certs.consumer(
            &replica.url(REPLICA_HOST),
            PRIMARY_HOST,
            "recovery_points = 4\nrecovery_point_spacing = \"1h\""
        )
    );
    Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", 8 * MIB).init(Init::Random(21)),
            DiskSpec::new("disk1", 4 * MIB),
        ],
    )
    .consumer(Consumer::Raw(consumer))
    .interval("1s")]))
}

fn nbd_write(p: &Primary, disk: &str, offset: u64, byte: u8) {
    let mut conn = Conn::connect_unix(&p.nbd_sock(), disk).expect("NBD connect");
    conn.write(offset, &[byte; 64 * 1024], false)
        .expect("NBD write");
    conn.disconnect();
}

/// Writes on both disks, closes a cycle, waits until the replica applied it and
/// compares the disks.
fn write_close_and_compare(p: &Primary, replica: &Replica, round: u8) {
    nbd_write(p, "disk0", u64::from(round) * MIB, 0x30 + round);
    nbd_write(p, "disk1", u64::from(round) * 512 * KIB, 0x60 + round);
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    for disk in ["disk0", "disk1"] {
        assert_files_equal(
            &p.image(disk),
            &replica.disk("dc1", "vm1", disk),
            &format!("{disk} after cycle {cycle}"),
        );
    }
}

/// The hook log (read after the primary stopped) as (cycle) pairs: every freeze is
/// followed at once by the thaw of the same cycle, for group vm1 and both disks.
/// Returns the cycles, oldest first.
fn frozen_cycles(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert!(lines.len() % 2 == 0, "a freeze without its thaw:\n{text}");
    let mut cycles = Vec::new();
    for pair in lines.chunks(2) {
        let (freeze, thaw) = (&pair[0], &pair[1]);
        assert_eq!(freeze.first(), Some(&"freeze"), "{text}");
        assert_eq!(thaw.first(), Some(&"thaw"), "{text}");
        assert_eq!(freeze.get(1), thaw.get(1), "thaw of another cycle:\n{text}");
        for line in [freeze, thaw] {
            assert_eq!(line.get(2..), Some(&["vm1", "disk0,disk1"][..]), "{text}");
        }
        let cycle: u64 = freeze[1].parse().expect("a cycle number");
        assert!(
            cycles.last().is_none_or(|last| *last < cycle),
            "cycles out of order:\n{text}"
        );
        cycles.push(cycle);
    }
    cycles
}

#[test]
fn points_are_frozen_thawed_and_flagged_every_few_cycles() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(&dir.path().join("pki"));
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let (script, log) = hook_script(dir.path(), false);
    let mut p = primary(&certs, &replica, &script, "3s");

    // The first cycle (after the initial replication) is a point, then about every
    // third; each is delivered flagged.
    let status = p.wait_consumer("vm1", "three points delivered", LONG, |s| {
        s["app_consistent"]["points_delivered"].as_u64() >= Some(3)
    });
    let app = &status["app_consistent"];
    assert_eq!(app["every_secs"], 3, "{status:#}");
    assert_eq!(app["freeze_failures"], 0, "{status:#}");
    assert_eq!(app["thaw_failures"], 0, "{status:#}");
    assert!(app["last_failure"].is_null(), "{status:#}");
    assert!(app["next_due_unix"].as_u64().is_some(), "{status:#}");
    assert!(app["last_unix"].as_u64().is_some(), "{status:#}");
    assert!(
        app["points"].as_u64() >= app["points_delivered"].as_u64(),
        "{status:#}"
    );
    // Cycles between points are crash-consistent.
    assert!(
        status["cycles_delivered"].as_u64() > app["points_delivered"].as_u64(),
        "{status:#}"
    );
    assert_eq!(status["state"], "replicating", "{status:#}");
    let last_point = app["last_cycle"].as_u64().expect("last_cycle");
    let last_delivered_point = app["last_delivered_cycle"].as_u64().expect("delivered");

    let text = run_ok(
        Command::new(bin())
            .args(["status", "--config"])
            .arg(p.config()),
        SHORT,
    );
    assert!(
        text.stdout.contains("app-consistent: every 3s;"),
        "{}",
        text.stdout
    );

    for round in 1..3 {
        write_close_and_compare(&p, &replica, round);
    }
    // A clean stop lets a point in progress finish with its thaw.
    p.terminate();
    let cycles = frozen_cycles(&log);
    assert!(cycles.len() >= 3, "{cycles:?}");
    for point in [last_point, last_delivered_point] {
        assert!(cycles.contains(&point), "{point} not frozen: {cycles:?}");
    }
    // The replica keeps the recovery history the primary asks for; with points an
    // hour apart, the application-consistent cycles are the points it keeps.
    let info = replica.info("vm1").expect("vm1");
    assert_eq!(info["recovery"]["points"], 4, "{info:#}");
    let app_points: Vec<u64> = info["recovery_points"]
        .as_array()
        .expect("points")
        .iter()
        .filter(|p| p["app_consistent"] == true)
        .filter_map(|p| p["cycle"].as_u64())
        .collect();
    assert!(app_points.len() >= 2, "{info:#}");
    for point in &app_points {
        assert!(
            cycles.contains(point),
            "{point} is not a frozen cycle: {cycles:?}"
        );
    }
    let log_text = p.log();
    assert!(
        log_text.contains("Application-consistent point made"),
        "{}",
        tail(&log_text, 40)
    );
    eprintln!("points test took {:?}", started.elapsed());
}

#[test]
fn a_failing_freeze_is_counted_still_thaws_and_replication_carries_on() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(&dir.path().join("pki"));
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let (script, log) = hook_script(dir.path(), true);
    let mut p = primary(&certs, &replica, &script, "2s");

    let status = p.wait_consumer("vm1", "two failed freezes", LONG, |s| {
        s["app_consistent"]["freeze_failures"].as_u64() >= Some(2)
    });
    let app = &status["app_consistent"];
    assert_eq!(app["points"], 0, "{status:#}");
    assert_eq!(app["points_delivered"], 0, "{status:#}");
    assert!(app["last_delivered_cycle"].is_null(), "{status:#}");
    assert_eq!(app["thaw_failures"], 0, "{status:#}");
    let failure = app["last_failure"].as_str().unwrap_or_default();
    for expected in ["exit status: 1", "guest agent is not responding"] {
        assert!(failure.contains(expected), "{expected}: {status:#}");
    }
    // The failure is the points', not replication's.
    assert_eq!(status["state"], "replicating", "{status:#}");
    assert_eq!(status["failures"], 0, "{status:#}");
    assert!(status["last_error"].is_null(), "{status:#}");
    assert!(status["cycles_delivered"].as_u64() >= Some(2), "{status:#}");

    let text = run_ok(
        Command::new(bin())
            .args(["status", "--config"])
            .arg(p.config()),
        SHORT,
    );
    assert!(
        text.stdout
            .contains("app-consistent failure: Freeze of cycle"),
        "{}",
        text.stdout
    );

    for round in 1..4 {
        write_close_and_compare(&p, &replica, round);
    }
    p.terminate();
    let info = replica.info("vm1").expect("vm1");
    assert!(
        info["recovery_points"]
            .as_array()
            .is_some_and(|points| points.iter().all(|p| p["app_consistent"] == false)),
        "a failed freeze made an application-consistent point: {info:#}"
    );
    // Every failed freeze was still followed by its thaw.
    let cycles = frozen_cycles(&log);
    assert!(cycles.len() >= 2, "{cycles:?}");
    let log_text = p.log();
    assert!(
        log_text.contains("The freeze command failed; the cycle ships crash-consistent")
            && log_text.contains("guest agent is not responding"),
        "{}",
        tail(&log_text, 40)
    );
    eprintln!("failing-freeze test took {:?}", started.elapsed());
}
