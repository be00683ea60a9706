//! Unplanned failover end to end: a real primary and replica daemon, an ordered
//! writer on the primary while cycles close every second, the primary SIGKILLed
//! mid-workload, then a failover on the replica to the latest point and to earlier
//! ones: every time, the disks hold exactly the effect of a prefix of the writes
//! acknowledged by the primary (one instant across both disks). The returning old
//! primary is fenced off and cannot overwrite the new live disks.
//!
//! Planned failover and failback: site A's primary hands the group to site B, B
//! replicates back to A's old disks (only new writes cross), then a planned failover
//! of B's live disks hands it back to A, whose replication to B's old disks again
//! sends only new writes.
#![allow(clippy::cast_possible_truncation)]

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::ordered::{
    ordered_prefix, ordered_writer, OrderedShared, OrderedWrite, ORDERED_REGION,
};
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

fn replica_disks(replica: &Replica) -> Vec<Vec<u8>> {
    ["disk0", "disk1"]
        .iter()
        .map(|disk| read_file(&replica.disk("dc1", "vm1", disk)))
        .collect()
}

#[test]
fn unplanned_failover_to_latest_and_earlier_points_gives_states_the_primary_had() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let hook_log = dir.path().join("hook.log");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "echo \"$BLKREP_FAILOVER $BLKREP_GROUP $BLKREP_POINT_CYCLE $BLKREP_POINT_KIND $BLKREP_NBD_URIS\" >> {}\n",
            hook_log.display()
        ),
    )
    .expect("write hook");
    let replica_events = dir.path().join("replica-events.jsonl");
    let extra = format!(
        "reserve = \"0\"\nevent_log = {:?}\n[failover]\nhook = [\"sh\", {:?}]",
        replica_events.display().to_string(),
        hook.display().to_string()
    );
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), &extra);
    let mut p = vm1_replicating_to(&certs, &replica, two_ordered_disks(), Some("1s"));
    replica
        .cli(&[
            "recovery",
            "--name",
            "vm1",
            "--points",
            "6",
            "--spacing",
            "1s",
        ])
        .assert_ok();

    let writes = write_until_points_then_kill(&mut p, &replica);
    let latest = fail_over_to_the_latest_point(&replica, &writes, &hook_log);
    let earlier_id = fail_over_to_earlier_points(&replica, &writes, latest);
    let after_write = write_to_the_live_disks(&replica, &earlier_id);
    // The primary comes back with an event log.
    let primary_events = dir.path().join("primary-events.jsonl");
    let config = std::fs::read_to_string(p.config()).expect("config");
    std::fs::write(
        p.config(),
        format!(
            "event_log = {:?}\n{config}",
            primary_events.display().to_string()
        ),
    )
    .expect("config");
    the_returning_primary_is_fenced_off(&mut p, &replica, &after_write);
    // Both logs hold what happened, one JSON object per line.
    let events = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("an event is one JSON object"))
            .collect()
    };
    let has = |events: &[Value], name: &str| {
        events
            .iter()
            .any(|e| e["event"] == name && e["group"] == "vm1")
    };
    let on_replica = events(&replica_events);
    assert!(
        has(&on_replica, "failover"),
        "no failover event: {on_replica:#?}"
    );
    let on_primary = events(&primary_events);
    assert!(
        has(&on_primary, "superseded"),
        "no superseded event: {on_primary:#?}"
    );
}

/// An ordered writer on the primary until several cycles are applied with writes in
/// each and points kept; then the primary is SIGKILLed. Returns the writes.
fn write_until_points_then_kill(p: &mut Primary, replica: &Replica) -> Vec<OrderedWrite> {
    let shared = Arc::new(OrderedShared::default());
    shared.may_fail.store(true, Ordering::SeqCst);
    let writer = ordered_writer(p.nbd_sock(), Arc::clone(&shared), 17);
    // Several cycles applied with writes in each, and points kept.
    let deadline = Instant::now() + LONG;
    loop {
        let info = replica.info("vm1").expect("vm1");
        let points = info["recovery_points"].as_array().map_or(0, Vec::len);
        if points >= 4 && shared.acked.load(Ordering::SeqCst) > 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "no points: {info:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    p.kill();
    let written = writer.join().expect("writer");
    let writes = shared.writes.lock().expect("writes").clone();
    let acked = shared.acked.load(Ordering::SeqCst);
    assert!(written >= acked.saturating_sub(1), "{written} {acked}");
    writes
}

/// The primary is gone: fail over to the latest point, a prefix of the writes; the
/// hook ran. Returns the prefix's length.
fn fail_over_to_the_latest_point(
    replica: &Replica,
    writes: &[OrderedWrite],
    hook_log: &std::path::Path,
) -> u64 {
    let out = replica.cli(&["failover", "--name", "vm1"]).assert_ok();
    assert!(
        out.stdout.contains("nbd+unix:///vm1/disk0"),
        "{}",
        out.all()
    );
    let latest = ordered_prefix(&replica_disks(replica), writes)
        .unwrap_or_else(|e| panic!("the latest point is no state the primary had: {e}"));
    assert!(latest > 0 && latest <= writes.len() as u64, "{latest}");
    let hooked = std::fs::read_to_string(hook_log).expect("hook ran");
    assert!(
        hooked.starts_with("unplanned vm1 ") && hooked.contains("crash-consistent"),
        "{hooked}"
    );
    latest
}

/// An earlier point gives a shorter prefix, on both disks at once; the latest state
/// before the failover, kept as a point, gives the same prefix as before. Returns the
/// earlier point's id.
fn fail_over_to_earlier_points(replica: &Replica, writes: &[OrderedWrite], latest: u64) -> String {
    // An earlier point: a shorter prefix, on both disks at once.
    let points: Vec<Value> = replica.points("vm1");
    let earlier = points
        .iter()
        .find(|p| p["latest"] == false)
        .expect("an earlier point");
    let earlier_id = earlier["id"].as_u64().expect("id").to_string();
    replica
        .cli(&["failover", "--name", "vm1", "--point", &earlier_id])
        .assert_ok();
    let older = ordered_prefix(&replica_disks(replica), writes)
        .unwrap_or_else(|e| panic!("the earlier point is no state the primary had: {e}"));
    assert!(older < latest, "earlier point {older}, latest {latest}");
    let status = replica.cli(&["status"]).assert_ok();
    assert!(status.stdout.contains("FAILED OVER"), "{}", status.all());

    // Back to the latest state before the failover (kept as a point): the same
    // prefix as before.
    let points: Vec<Value> = replica.points("vm1");
    let newest = points
        .iter()
        .filter(|p| p["latest"] == false)
        .max_by_key(|p| p["cycle"].as_u64())
        .expect("points");
    let newest_id = newest["id"].as_u64().expect("id").to_string();
    replica
        .cli(&["failover", "--name", "vm1", "--point", &newest_id])
        .assert_ok();
    assert_eq!(ordered_prefix(&replica_disks(replica), writes), Ok(latest));
    earlier_id
}

/// The new live disks take writes through the replica daemon; once written, they
/// keep their point and the failover can only be completed. Returns the disks.
fn write_to_the_live_disks(replica: &Replica, earlier_id: &str) -> Vec<Vec<u8>> {
    // The new live disks take writes through the replica daemon.
    let live = format!(
        "nbd+unix:///vm1/disk1?socket={}",
        replica.nbd_socket().display()
    );
    run_ok(
        Command::new(require_tool("qemu-io")).args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 8M 64k",
            &live,
        ]),
        LONG,
    );
    let after_write = replica_disks(replica);
    assert!(after_write[1][8 << 20..(8 << 20) + 65536]
        .iter()
        .all(|b| *b == 0x5a));
    // Once written, the live disks keep their point: the failover can only be
    // completed.
    let refused = replica.cli(&["failover", "--name", "vm1", "--point", earlier_id]);
    assert!(
        !refused.success() && refused.all().contains("complete-failover"),
        "{}",
        refused.all()
    );
    assert!(replica_disks(replica) == after_write);
    replica
        .cli(&["complete-failover", "--name", "vm1"])
        .assert_ok();
    let refused = replica.cli(&["failover", "--name", "vm1", "--point", earlier_id]);
    assert!(!refused.success(), "{}", refused.all());
    after_write
}

/// The old primary returns: it is refused as superseded and stops shipping for good,
/// saying so; the live disks (`after_write`) are untouched, whatever it is asked.
fn the_returning_primary_is_fenced_off(
    p: &mut Primary,
    replica: &Replica,
    after_write: &[Vec<u8>],
) {
    // The old primary returns: it is refused as superseded and stops shipping for
    // good, saying so; the live disks are untouched.
    p.restart();
    let consumer = p.wait_consumer("vm1", "superseded", LONG, |s| s["state"] == "superseded");
    assert_eq!(consumer["health"], "Critical", "{consumer:#}");
    assert!(
        consumer["health_reason"]
            .as_str()
            .is_some_and(|r| r.contains("superseded") && r.contains("live copy at epoch 2")),
        "{consumer:#}"
    );
    // Both sides say which role and epoch they hold.
    assert_eq!(consumer["epoch"], 1, "{consumer:#}");
    let info = replica.info("vm1").expect("vm1");
    assert_eq!(
        (&info["role"], &info["epoch"]),
        (&json!("primary"), &json!(2)),
        "{info:#}"
    );
    let status = replica.cli(&["status"]).assert_ok();
    assert!(
        status.stdout.contains("vm1: primary at epoch 2"),
        "{}",
        status.all()
    );
    assert!(
        replica_disks(replica) == after_write,
        "the live disks changed"
    );
    // Resuming is refused, naming what the administrator can do.
    let resumed = p.replication(&["resume", "--group", "vm1"]);
    assert!(!resumed.success(), "{}", resumed.all());
    assert!(
        resumed
            .all()
            .contains("blkrep replication remove --group vm1"),
        "{}",
        resumed.all()
    );
    // Neither deleting the replica nor a new relationship over it touches the live
    // disks.
    let removed = p.replication(&["remove", "--group", "vm1", "--delete-replica", "--yes"]);
    assert!(!removed.success(), "{}", removed.all());
    assert!(removed.all().contains("live copy"), "{}", removed.all());
    p.replication(&["remove", "--group", "vm1"]).assert_ok();
    p.replication(&["enable", "--group", "vm1"]).assert_ok();
    let consumer = p.wait_consumer("vm1", "the new relationship refused", LONG, |s| {
        s["state"] == "suspended" || s["state"] == "superseded"
    });
    let said = consumer["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
        + consumer["health_reason"].as_str().unwrap_or_default();
    assert!(said.contains("live copy"), "{consumer:#}");
    assert!(replica.storage("dc1").join("vm1/replica.json").exists());
    assert!(
        replica_disks(replica) == after_write,
        "the live disks changed"
    );
}

/// Bytes of 4 KiB blocks that differ between two images of the same size.
fn differing_bytes(a: &[u8], b: &[u8]) -> u64 {
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.len() as u64)
        .sum()
}

#[test]
fn reverse_replication_after_an_unplanned_failover_sends_only_the_difference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    // Site B's replica server, and site A's primary replicating to it.
    let replica_b = Replica::start(
        &certs,
        REPLICA_HOST,
        &dc1(),
        "reserve = \"0\"\n[failover]\nlive_ring_size = \"24MiB\"",
    );
    let mut p = vm1_replicating_to(
        &certs,
        &replica_b,
        vec![
            DiskSpec::new("disk0", 32 * MIB).init(Init::Random(5)),
            DiskSpec::new("disk1", 16 * MIB).init(Init::Random(6)),
        ],
        None,
    );
    qemu_io(&p.uri("disk0"), "write -P 0x11 4M 1M");
    let cycle = p.cycles_close("vm1");
    replica_b.wait_applied("vm1", cycle, LONG);
    // Writes that never ship: site A is lost right after them.
    qemu_io(&p.uri("disk0"), "write -P 0x22 20M 768k");
    qemu_io(&p.uri("disk1"), "write -P 0x23 0 256k");
    p.kill();

    replica_b.cli(&["failover", "--name", "vm1"]).assert_ok();
    replica_b
        .cli(&["complete-failover", "--name", "vm1"])
        .assert_ok();
    let live = |disk: &str| live_uri(&replica_b, disk);
    // The live disks' ring has the configured size (two 4 KiB superblocks first).
    let ring = replica_b.storage("dc1").join("vm1").join("live.ring");
    let ring_len = std::fs::metadata(&ring).expect("live ring").len();
    assert_eq!(ring_len, 24 * MIB + 8 * KIB, "{}", ring.display());
    // The group runs at site B now.
    qemu_io(&live("disk1"), "write -P 0x33 8M 512k");

    // Site A comes back: its replica server gets the old primary's disks as an
    // existing copy, and site B replicates back to it.
    let replica_a = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let b_disks = replica_disks(&replica_b);
    let a_disks: Vec<Vec<u8>> = ["disk0", "disk1"]
        .iter()
        .map(|disk| read_file(&p.image(disk)))
        .collect();
    let difference: u64 = a_disks
        .iter()
        .zip(&b_disks)
        .map(|(a, b)| differing_bytes(a, b))
        .sum();
    assert!(difference >= 1536 * KIB, "{difference}");
    // The old primary never learned of the failover (it was killed): seeding from it
    // is refused, and the message names the option that proceeds.
    let refused = run(&mut seed_from(&replica_a, &p), LONG);
    assert!(
        !refused.success() && refused.all().contains("--force"),
        "{}",
        refused.all()
    );
    assert!(replica_a.info("vm1").is_none());
    // Copied, not moved: the old primary's images, unshipped writes included, stay.
    let info = reverse_to(&certs, &replica_b, &replica_a, &p, &["--force"]);
    for (disk, before) in ["disk0", "disk1"].iter().zip(&a_disks) {
        assert!(read_file(&p.image(disk)) == *before, "{disk} changed");
    }
    // Only the blocks that differed crossed: not the 48 MiB of the disks.
    let applied = info["applied_bytes"].as_u64().expect("applied_bytes");
    assert!(
        applied <= difference && applied >= difference / 2,
        "{applied} bytes applied at site A for {difference} bytes of difference"
    );
    eprintln!("reverse replication: {applied} bytes applied for {difference} bytes of difference");
    let status = replica_b.cli(&["status"]).assert_ok();
    assert!(
        status.stdout.contains("live group vm1") && status.stdout.contains("replicating back"),
        "{}",
        status.all()
    );
    // Later writes at site B replicate as deltas.
    qemu_io(&live("disk0"), "write -P 0x44 1M 64k");
    let deadline = Instant::now() + LONG;
    while read_file(&replica_a.disk("dc1", "vm1", "disk0"))[MIB as usize] != 0x44 {
        assert!(Instant::now() < deadline, "the delta never reached site A");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn planned_failover_and_failback_lose_no_acknowledged_write_and_reverse_ships_only_new_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica_b = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let mut p = vm1_replicating_to(&certs, &replica_b, two_ordered_disks(), Some("1s"));

    // A verifying writer keeps writing: the failover is refused while it is connected.
    let shared = Arc::new(OrderedShared::default());
    let writer = ordered_writer(p.nbd_sock(), Arc::clone(&shared), 29);
    while shared.acked.load(Ordering::SeqCst) < 500 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = p.replication(&["failover", "--group", "vm1"]);
    assert!(!refused.success(), "{}", refused.all());
    assert!(refused.all().contains("--force"), "{}", refused.all());
    std::thread::sleep(Duration::from_millis(500));
    shared.stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer");
    let writes = shared.writes.lock().expect("writes").clone();
    assert_eq!(shared.acked.load(Ordering::SeqCst), written);
    // The server counts the writer's connection until its thread saw the close.
    let deadline = Instant::now() + SHORT;
    while p.disk_status("vm1", "disk0")["connections"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the writer's connection stays counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    p.replication(&["failover", "--group", "vm1"]).assert_ok();
    // A second planned failover is refused, and leaves the disks refusing writes.
    let again = p.replication(&["failover", "--group", "vm1", "--force"]);
    assert!(
        !again.success() && again.all().contains("handed over to its replica"),
        "{}",
        again.all()
    );
    // The new primary's disks equal the old primary's, byte for byte, and hold every
    // acknowledged write.
    for disk in ["disk0", "disk1"] {
        assert_files_equal(&p.image(disk), &replica_b.disk("dc1", "vm1", disk), disk);
    }
    assert_eq!(
        ordered_prefix(&replica_disks(&replica_b), &writes),
        Ok(written)
    );
    // The old primary refuses writes and ships no more; the replica serves the disks.
    let write_old = run(
        &mut qemu_io_command(&p.uri("disk0"), "write -P 1 0 4k"),
        LONG,
    );
    assert!(!write_old.success(), "{}", write_old.all());
    // And says so.
    assert_eq!(p.group_status("vm1")["writes_refused"], true);
    let text = run_ok(p.cmd().args(["status", "--config"]).arg(p.config()), SHORT).stdout;
    assert!(text.contains("writes:    REFUSED"), "{text}");
    let consumer = p.wait_consumer("vm1", "superseded", LONG, |s| s["state"] == "superseded");
    assert!(
        consumer["health_reason"]
            .as_str()
            .is_some_and(|r| r.contains("planned failover")),
        "{consumer:#}"
    );
    let info = replica_b.info("vm1").expect("vm1");
    assert_eq!(info["failover"]["planned"], true, "{info:#}");
    qemu_io(&live_uri(&replica_b, "disk0"), "write -P 0x66 2M 512k");

    // Replication reversed towards the old site: only the new writes cross. Its
    // images cannot move while the old primary runs.
    let replica_a = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let running = run(seed_from(&replica_a, &p).arg("--move"), LONG);
    assert!(
        !running.success() && running.all().contains("stop it"),
        "{}",
        running.all()
    );
    p.terminate();
    replica_b
        .cli(&["complete-failover", "--name", "vm1"])
        .assert_ok();
    let info = reverse_to(&certs, &replica_b, &replica_a, &p, &["--move"]);
    assert!(!p.image("disk0").exists(), "the images moved");
    assert_eq!(info["applied_bytes"], 512 * KIB, "{info:#}");

    // Failback: a planned failover from site B's live disks back to site A. Refused
    // while a client is connected, and the message names the option that proceeds.
    let live_b = |disk: &str| live_uri(&replica_b, disk);
    qemu_io(&live_b("disk1"), "write -P 0x77 6M 256k");
    let client = nbd::Conn::connect_unix(&replica_b.nbd_socket(), "vm1/disk0")
        .expect("connect to site B's live disk");
    let refused = replica_b.cli(&["planned-failover", "--name", "vm1"]);
    assert!(
        !refused.success() && refused.all().contains("--force"),
        "{}",
        refused.all()
    );
    drop(client);
    // Still the live copy: the refusal changed nothing.
    qemu_io(&live_b("disk0"), "write -P 0x78 9M 128k");
    let out = replica_b
        .cli(&["planned-failover", "--name", "vm1"])
        .assert_ok();
    assert!(out.stdout.contains("epoch 3"), "{}", out.all());
    // Site A holds every write site B acknowledged, byte for byte, and serves them.
    for disk in ["disk0", "disk1"] {
        assert_files_equal(
            &replica_b.disk("dc1", "vm1", disk),
            &replica_a.disk("dc1", "vm1", disk),
            disk,
        );
    }
    let a = replica_a.info("vm1").expect("vm1 at site A");
    assert_eq!(
        (&a["role"], &a["epoch"], &a["failover"]["planned"]),
        (&json!("primary"), &json!(3), &json!(true)),
        "{a:#}"
    );
    // Site B no longer serves the disks: they wait as an existing copy at epoch 3.
    let b = replica_b.info("vm1").expect("vm1 at site B");
    assert_eq!(
        (&b["role"], &b["epoch"], &b["consistent"]),
        (&json!("replica"), &json!(3), &json!(false)),
        "{b:#}"
    );
    let status = replica_b.cli(&["status"]).assert_ok();
    assert!(
        status
            .stdout
            .contains("an existing copy no primary has claimed")
            && !status.stdout.contains("live group vm1"),
        "{}",
        status.all()
    );
    let gone = run(
        Command::new(require_tool("qemu-io")).args([
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            &live_b("disk0"),
        ]),
        LONG,
    );
    assert!(!gone.success(), "{}", gone.all());
    // A second failback finds nothing to hand over.
    let again = replica_b.cli(&["planned-failover", "--name", "vm1"]);
    assert!(
        !again.success() && again.all().contains("was not failed over"),
        "{}",
        again.all()
    );

    // The group runs at site A again; replicating to site B sends only new writes.
    qemu_io(&live_uri(&replica_a, "disk1"), "write -P 0x79 3M 384k");
    replica_a
        .cli(&["complete-failover", "--name", "vm1"])
        .assert_ok();
    let info = reverse(&certs, &replica_a, &replica_b);
    assert_eq!(
        (&info["applied_bytes"], &info["epoch"]),
        (&json!(384 * KIB), &json!(3)),
        "{info:#}"
    );
}

/// The NBD URI of failed-over disk `disk` of vm1 served by `replica`.
fn live_uri(replica: &Replica, disk: &str) -> String {
    format!(
        "nbd+unix:///vm1/{disk}?socket={}",
        replica.nbd_socket().display()
    )
}

fn qemu_io(uri: &str, command: &str) {
    run_ok(&mut qemu_io_command(uri, command), LONG);
}

/// qemu-io running `command` on `uri`.
fn qemu_io_command(uri: &str, command: &str) -> Command {
    let mut qemu_io = Command::new(require_tool("qemu-io"));
    qemu_io.args(["-f", "raw", "-c", command, uri]);
    qemu_io
}

/// Reverse replication from site B's failed-over `replica_b` to site A: the old
/// primary `p`'s images (stopped) become an existing copy on `replica_a` in one step
/// (`seed --from-primary`, with `extra` arguments), site B replicates back to it, and
/// once it is consistent both sides' disks are equal. Returns site A's replica.
fn reverse_to(
    certs: &LabCerts,
    replica_b: &Replica,
    replica_a: &Replica,
    p: &Primary,
    extra: &[&str],
) -> Value {
    run_ok(seed_from(replica_a, p).args(extra), LONG);
    let info = reverse(certs, replica_b, replica_a);
    // Replication back runs at the epoch of the failover that made site B primary.
    assert_eq!(
        (&info["role"], &info["epoch"]),
        (&json!("replica"), &json!(2)),
        "{info:#}"
    );
    info
}

/// `blkrep replica seed` of vm1 on `replica` from primary `p`'s configuration.
pub(crate) fn seed_from(replica: &Replica, p: &Primary) -> Command {
    let mut seed = Command::new(bin());
    seed.args(["replica", "seed", "--config"])
        .arg(replica.config())
        .args(["--trust-group", "dc1", "--name", "vm1", "--from-primary"])
        .arg(p.config());
    seed
}

/// Replication from `from`'s failed-over vm1 to the existing copy on `to`: once `to`
/// is consistent both sides' disks are equal. Returns `to`'s replica.
fn reverse(certs: &LabCerts, from: &Replica, to: &Replica) -> Value {
    from.start_reverse(certs, "vm1", to, "1s").assert_ok();
    // Consistent once a cycle after the comparison's copy is applied.
    let deadline = Instant::now() + LONG;
    let info = loop {
        let info = to.info("vm1").expect("vm1 at the target");
        if info["consistent"] == true && info["pending_transfers"] == 0 {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the target never consistent: {info:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for disk in ["disk0", "disk1"] {
        assert_files_equal(
            &from.disk("dc1", "vm1", disk),
            &to.disk("dc1", "vm1", disk),
            disk,
        );
    }
    info
}

/// Two disks the ordered writer fills.
fn two_ordered_disks() -> Vec<DiskSpec> {
    vec![
        DiskSpec::new("disk0", ORDERED_REGION),
        DiskSpec::new("disk1", ORDERED_REGION),
    ]
}

/// A primary with group vm1 of `disks` (a 64 MiB ring) replicating to `replica`, a
/// cycle every `interval` (by hand only, if none), once its initial replication is
/// applied.
fn vm1_replicating_to(
    certs: &LabCerts,
    replica: &Replica,
    disks: Vec<DiskSpec>,
    interval: Option<&str>,
) -> Primary {
    let mut group = GroupSpec::new("vm1", disks)
        .consumer(Consumer::Raw(certs.consumer(
            &replica.url(REPLICA_HOST),
            PRIMARY_HOST,
            "",
        )))
        .ring_size("64MiB");
    if let Some(interval) = interval {
        group = group.interval(interval);
    }
    let p = Primary::start(Spec::new(vec![group]));
    let initial = p.cycles_close("vm1");
    replica.wait_applied("vm1", initial, LONG);
    p
}

/// A planned failover whose hand-over answer was lost leaves the disks fenced on
/// record but not handed over: after a restart they still refuse writes (the replica
/// may have taken over), and running the failover again finishes it instead of being
/// refused as done.
#[test]
fn a_hand_over_whose_answer_was_lost_keeps_writes_refused_and_can_be_finished() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica_b = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let mut p = vm1_replicating_to(
        &certs,
        &replica_b,
        vec![DiskSpec::new("disk0", 8 * MIB).init(Init::Random(3))],
        Some("1s"),
    );
    qemu_io(&p.uri("disk0"), "write -P 0x5a 1M 64k");
    p.terminate();
    // What the shipper records before the hand-over request goes out.
    let record_path = record_of(&p.layout.ring("vm1"));
    let mut record: Value =
        serde_json::from_slice(&std::fs::read(&record_path).expect("record")).expect("json");
    record["fenced"] = json!(true);
    std::fs::write(&record_path, serde_json::to_vec(&record).expect("json")).expect("write");
    p.restart();
    assert!(
        p.log().contains("interrupted before the replica answered"),
        "{}",
        tail(&p.log(), 20)
    );
    let write = |p: &Primary| {
        run(
            &mut qemu_io_command(&p.uri("disk0"), "write -P 1 0 4k"),
            LONG,
        )
    };
    let refused = write(&p);
    assert!(!refused.success(), "{}", refused.all());
    // The replica never took over: the failover runs again and hands the group over.
    p.replication(&["failover", "--group", "vm1"]).assert_ok();
    assert_files_equal(
        &p.image("disk0"),
        &replica_b.disk("dc1", "vm1", "disk0"),
        "disk0",
    );
    assert_eq!(
        replica_b.info("vm1").expect("vm1")["failover"]["planned"],
        true
    );
    // Handed over for good: after another restart a second failover is refused.
    p.terminate();
    p.restart();
    assert!(!write(&p).success());
    let again = p.replication(&["failover", "--group", "vm1", "--force"]);
    assert!(
        !again.success() && again.all().contains("handed over to its replica"),
        "{}",
        again.all()
    );
}

/// The replication record of the group whose ring is `ring`.
fn record_of(ring: &std::path::Path) -> std::path::PathBuf {
    let mut name = ring.as_os_str().to_os_string();
    name.push(".replication.json");
    name.into()
}
