//! Recovery points and test failover end to end: a real primary and replica daemon,
//! qemu-io writing on the primary, recovery points kept on the replica, and a point
//! served as writable NBD exports by the replica daemon while replication goes on.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::replica::{dc1, lab_certs, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

fn qemu_io(uri: &str, command: &str) -> Output {
    let qemu_io = require_tool("qemu-io");
    run_ok(
        Command::new(qemu_io).args(["-f", "raw", "-c", command, uri]),
        LONG,
    )
}

/// Reads a whole NBD export with nbdcopy into `to`.
fn copy_export(uri: &str, to: &Path) {
    let nbdcopy = require_tool("nbdcopy");
    run_ok(
        Command::new(nbdcopy).args([uri, &to.display().to_string()]),
        LONG,
    );
}

fn test_uri(replica: &Replica, disk: &str) -> String {
    format!(
        "nbd+unix:///test/vm1/{disk}?socket={}",
        replica.nbd_socket().display()
    )
}

#[test]
fn a_point_serves_as_writable_disks_while_replication_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", 16 * MIB).init(Init::Random(3)),
            DiskSpec::new("disk1", 8 * MIB),
        ],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))
    .ring_size("64MiB")]));
    let first = p.cycles_close("vm1");
    replica.wait_applied("vm1", first, LONG);

    // Every cycle becomes a point (spacing 1 s, cycles 1.1 s apart).
    let set = replica
        .cli(&[
            "recovery",
            "--name",
            "vm1",
            "--points",
            "3",
            "--spacing",
            "1s",
        ])
        .assert_ok();
    assert!(
        set.stdout.contains("3 additional point(s) kept"),
        "{}",
        set.all()
    );
    let states = five_cycles_each_a_point(&p, &replica);
    let listed = check_the_points_listed(&replica, &states);
    let work = dir.path().join("read");
    std::fs::create_dir_all(&work).expect("mkdir");
    let test0 = test_the_oldest_point(&p, &replica, &listed[0], &states, &work);
    a_connected_client_holds_the_test(&replica, &test0);
    test_the_latest_point(&p, &replica, &work);
}

/// The disks of the replica after each cycle.
type States = BTreeMap<u64, (Vec<u8>, Vec<u8>)>;

/// Five cycles 1.1 s apart with writes on both disks; returns the replica's disks
/// after each.
fn five_cycles_each_a_point(p: &Primary, replica: &Replica) -> States {
    let mut states: States = BTreeMap::new();
    for round in 0..5u64 {
        std::thread::sleep(Duration::from_millis(1100));
        let uri0 = p.uri("disk0");
        qemu_io(
            &uri0,
            &format!("write -P {} {} 512k", 0x30 + round, round * 2 * MIB),
        );
        qemu_io(&p.uri("disk1"), &format!("write -P {} 0 64k", 0x60 + round));
        let cycle = p.cycles_close("vm1");
        replica.wait_applied("vm1", cycle, LONG);
        states.insert(
            cycle,
            (
                read_file(&replica.disk("dc1", "vm1", "disk0")),
                read_file(&replica.disk("dc1", "vm1", "disk1")),
            ),
        );
    }
    states
}

/// Three additional points and the latest are kept, and listed; returns the list.
fn check_the_points_listed(replica: &Replica, states: &States) -> Vec<Value> {
    let listed = replica.points("vm1");
    let cycles: Vec<u64> = listed.iter().filter_map(|p| p["cycle"].as_u64()).collect();
    let latest_cycle = *states.keys().last().expect("cycles");
    assert_eq!(
        listed.len(),
        4,
        "three additional points and the latest: {listed:#?}"
    );
    assert_eq!(cycles.last(), Some(&latest_cycle));
    assert_eq!(
        listed.last().map(|p| p["latest"].clone()),
        Some(Value::Bool(true))
    );
    let text = replica.cli(&["points", "--name", "vm1"]).assert_ok();
    assert!(text.stdout.contains("latest"), "{}", text.all());
    assert!(text.stdout.contains("crash-consistent"), "{}", text.all());
    listed
}

/// A test failover of the oldest point kept: its disks read as they were at that
/// point while replication goes on, and the test's writes stay in the test. Returns
/// the URI of the test's disk0.
fn test_the_oldest_point(
    p: &Primary,
    replica: &Replica,
    oldest: &Value,
    states: &States,
    work: &Path,
) -> String {
    // A test failover of the oldest point kept.
    let (point_id, point_cycle) = (
        oldest["id"].as_u64().expect("id"),
        oldest["cycle"].as_u64().expect("cycle"),
    );
    let started = replica
        .cli(&[
            "test-failover",
            "start",
            "--name",
            "vm1",
            "--point",
            &point_id.to_string(),
        ])
        .assert_ok();
    assert!(
        started.stdout.contains(&test_uri(replica, "disk0")),
        "{}",
        started.all()
    );
    let check_point = |what: &str| {
        for (index, disk) in ["disk0", "disk1"].iter().enumerate() {
            let copy = work.join(format!("{disk}.img"));
            copy_export(&test_uri(replica, disk), &copy);
            let expected = &states[&point_cycle];
            let expected = if index == 0 { &expected.0 } else { &expected.1 };
            assert_bytes_equal(&read_file(&copy), expected, &format!("{disk} {what}"));
        }
    };
    check_point("at the point");

    // Replication goes on during the test: new writes reach the replica disks, the
    // test's view of its point does not move.
    qemu_io(&p.uri("disk0"), "write -P 0x77 1M 1M");
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    for disk in ["disk0", "disk1"] {
        assert_files_equal(&p.image(disk), &replica.disk("dc1", "vm1", disk), disk);
    }
    check_point("after another cycle applied");

    // The test's writes stay in the test.
    let test0 = test_uri(replica, "disk0");
    qemu_io(&test0, "write -P 0xee 0 3M");
    let read = qemu_io(&test0, "read -P 0xee 0 3M");
    assert!(
        !read.all().contains("Pattern verification failed"),
        "{}",
        read.all()
    );
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    for disk in ["disk0", "disk1"] {
        assert_files_equal(&p.image(disk), &replica.disk("dc1", "vm1", disk), disk);
    }
    let status = replica.cli(&["status"]).assert_ok();
    assert!(
        status.stdout.contains("TEST FAILOVER in progress"),
        "{}",
        status.all()
    );
    let info = replica.info("vm1").expect("vm1");
    assert_eq!(info["test_failover"]["cycle"], point_cycle, "{info:#}");
    test0
}

/// A connected client holds the test: stopping is refused unless forced; once the
/// client is gone the test stops and leaves nothing behind.
fn a_connected_client_holds_the_test(replica: &Replica, test0: &str) {
    // A connected client holds the test: stopping is refused unless forced.
    let python = require_tool(PYTHON);
    require_python_libnbd();
    let mut holder = Command::new(python)
        .args([
            "-c",
            "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint('connected', flush=True)\ntime.sleep(60)",
            test0,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python");
    wait_for_line(&mut holder, "connected");
    let refused = replica.cli(&["test-failover", "stop", "--name", "vm1"]);
    assert!(!refused.success(), "{}", refused.all());
    assert!(refused.all().contains("--force"), "{}", refused.all());
    let _ = holder.kill();
    let _ = holder.wait();
    wait_until("the client's connection to close", SHORT, || {
        replica
            .cli(&["test-failover", "stop", "--name", "vm1"])
            .success()
    });
    let gone = run(
        Command::new(require_tool("qemu-io")).args(["-f", "raw", "-c", "read 0 4k", test0]),
        LONG,
    );
    assert!(!gone.success(), "the export is gone: {}", gone.all());
    let info = replica.info("vm1").expect("vm1");
    assert!(info["test_failover"].is_null(), "{info:#}");
    assert!(info["last_test_unix"].as_u64().is_some(), "{info:#}");
    assert!(
        !replica.storage("dc1").join("vm1/test").exists(),
        "the overlays are deleted"
    );
    let status = replica.cli(&["status"]).assert_ok();
    assert!(
        status.stdout.contains("last test failover"),
        "{}",
        status.all()
    );
}

/// A test of the latest point: replication applies underneath it; once stopped, the
/// temporary point is gone and the kept points remain.
fn test_the_latest_point(p: &Primary, replica: &Replica, work: &Path) {
    // A test of the latest point: replication applies underneath it.
    let latest_state = (
        read_file(&replica.disk("dc1", "vm1", "disk0")),
        read_file(&replica.disk("dc1", "vm1", "disk1")),
    );
    replica
        .cli(&["test-failover", "start", "--name", "vm1"])
        .assert_ok();
    qemu_io(&p.uri("disk0"), "write -P 0x99 0 4M");
    qemu_io(&p.uri("disk1"), "write -z 0 8M");
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    for disk in ["disk0", "disk1"] {
        assert_files_equal(&p.image(disk), &replica.disk("dc1", "vm1", disk), disk);
    }
    let copy = work.join("latest0.img");
    copy_export(&test_uri(replica, "disk0"), &copy);
    assert_bytes_equal(
        &read_file(&copy),
        &latest_state.0,
        "disk0 at the latest point",
    );
    let copy = work.join("latest1.img");
    copy_export(&test_uri(replica, "disk1"), &copy);
    assert_bytes_equal(
        &read_file(&copy),
        &latest_state.1,
        "disk1 at the latest point",
    );
    replica
        .cli(&["test-failover", "stop", "--name", "vm1"])
        .assert_ok();
    // The temporary point is gone; the kept points still read as they were.
    let after = replica.points("vm1");
    assert_eq!(after.len(), 4, "{after:#?}");
    assert!(replica
        .cli(&["test-failover", "stop", "--name", "vm1"])
        .all()
        .contains("No test failover"));
}

/// Waits until `child` prints `line` on stdout.
fn wait_for_line(child: &mut std::process::Child, line: &str) {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = std::io::BufReader::new(stdout);
    let mut got = String::new();
    reader.read_line(&mut got).expect("read");
    assert_eq!(got.trim(), line, "child said {got:?}");
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
