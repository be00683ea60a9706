//! A failed-over group on the replica daemon is a group like a primary's: after an
//! unplanned failover and reverse replication, the replica daemon answers the same
//! group status fields, exports the same metrics, and takes the same group commands
//! (`blkrep cycles close`, `blkrep replication pause|resume|status`) on its control
//! socket as the primary did for the group before the failover.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::replica::{dc1, lab_certs, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

/// One request on a daemon's control socket, as the CLI sends it; the answer's
/// `result`.
fn control(socket: &Path, request: &Value) -> Value {
    let mut stream = UnixStream::connect(socket).expect("control socket");
    writeln!(stream, "{request}").expect("request");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("answer");
    let answer: Value = serde_json::from_str(&line).expect("JSON answer");
    assert_eq!(answer["ok"], true, "{request} refused: {answer}");
    answer["result"].clone()
}

/// The keys of a JSON object, and those of the objects (or first array items) it
/// holds as `outer.inner`: two levels, since deeper objects may be null on one side
/// (a comparison not run yet) and an object on the other.
fn shape(value: &Value, prefix: &str, into: &mut BTreeSet<String>) {
    let Some(object) = value.as_object() else {
        return;
    };
    for (key, inner) in object {
        let path = format!("{prefix}{key}");
        into.insert(path.clone());
        if !prefix.is_empty() {
            continue;
        }
        if let Some(first) = inner.as_array().and_then(|items| items.first()) {
            shape(first, &format!("{path}[]."), into);
        } else {
            shape(inner, &format!("{path}."), into);
        }
    }
}

fn shape_of(value: &Value) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    shape(value, "", &mut keys);
    keys
}

/// The address after `metrics=` in the daemon's ready line.
fn metrics_address(log: &str) -> String {
    log.lines()
        .rev()
        .filter(|line| line.contains(" ready "))
        .filter_map(|line| line.split("metrics=").nth(1))
        .find_map(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the ready line:\n{log}"))
        .to_string()
}

/// The metric names (without labels) of samples labelled with group `vm1`.
fn vm1_metrics(address: &str) -> BTreeSet<String> {
    let mut stream = std::net::TcpStream::connect(address).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("answer");
    body.lines()
        .filter(|line| line.contains("group=\"vm1\""))
        .filter_map(|line| line.split('{').next())
        .map(str::to_string)
        .collect()
}

/// `blkrep <command> ARGS` against the daemon at `socket`: `cycles close --socket S
/// ARGS`, `replication --socket S ARGS`.
fn cli(args: &[&str], socket: &Path) -> Output {
    let mut command = Command::new(bin());
    match args {
        ["cycles", rest @ ..] => command
            .args(["cycles"])
            .args(rest)
            .arg("--socket")
            .arg(socket),
        ["replication", rest @ ..] => command
            .args(["replication", "--socket"])
            .arg(socket)
            .args(rest),
        _ => panic!("no such command: {args:?}"),
    };
    run(&mut command, LONG)
}

fn replica_control_socket(replica: &Replica) -> PathBuf {
    replica.config().with_file_name("replica.ctl")
}

#[test]
fn a_failed_over_group_has_the_status_metrics_and_commands_of_a_primary_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica_b = Replica::start(
        &certs,
        REPLICA_HOST,
        &dc1(),
        "reserve = \"0\"\nmetrics = \"127.0.0.1:0\"\n[failover]\nlive_ring_size = \"24MiB\"",
    );
    let group = GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", 16 * MIB).init(Init::Random(1)),
            DiskSpec::new("disk1", 8 * MIB).init(Init::Random(2)),
        ],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica_b.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))
    .ring_size("64MiB");
    let p = Primary::prepare(Spec::new(vec![group]));
    p.enable_metrics();
    let mut p = p;
    p.restart();
    let initial = p.cycles_close("vm1");
    replica_b.wait_applied("vm1", initial, LONG);
    run_ok(
        Command::new(require_tool("qemu-io")).args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 256k",
            &p.uri("disk0"),
        ]),
        LONG,
    );
    let cycle = p.cycles_close("vm1");
    replica_b.wait_applied("vm1", cycle, LONG);

    // The primary's view of its group while it replicates.
    let primary_report = control(
        &p.layout.ctl(),
        &json!({"op": "group_status", "group": "vm1"}),
    );
    assert_eq!(shape_of(&primary_report), shape_of(&p.group_status("vm1")));
    let primary_metrics = vm1_metrics(&metrics_address(&p.log()));
    p.kill();

    // Site A is lost; site B fails over, and replicates back to A's old disks.
    replica_b.cli(&["failover", "--name", "vm1"]).assert_ok();
    replica_b
        .cli(&["complete-failover", "--name", "vm1"])
        .assert_ok();
    let replica_a = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    run_ok(
        crate::failover::seed_from(&replica_a, &p).arg("--force"),
        LONG,
    );
    replica_b
        .start_reverse(&certs, "vm1", &replica_a, "1s")
        .assert_ok();
    let socket = replica_control_socket(&replica_b);
    let deadline = Instant::now() + LONG;
    let live_report = loop {
        let report = control(&socket, &json!({"op": "group_status", "group": "vm1"}));
        if report["consumer"]["state"] == "replicating"
            && report["consumer"]["cycles_delivered"].as_u64() >= Some(1)
        {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "replication back never ran: {report:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // The same status fields, down to the consumer's and the disks'.
    let (primary_shape, live_shape) = (shape_of(&primary_report), shape_of(&live_report));
    assert_eq!(
        primary_shape
            .symmetric_difference(&live_shape)
            .collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "primary:\n{primary_report:#}\nlive:\n{live_report:#}"
    );
    assert_eq!(live_report["tracking"], "logging", "{live_report:#}");
    assert_eq!(live_report["ring"]["size"], 24 * MIB, "{live_report:#}");
    // `blkrep replica status` lists the live group with the primary's status lines.
    let status = replica_b.cli(&["status"]).assert_ok();
    for line in [
        "live group vm1",
        "replicating back",
        "  tracking:  logging",
        "  ring:      ",
        "  disk disk0",
    ] {
        assert!(
            status.stdout.contains(line),
            "{line:?} missing:\n{}",
            status.all()
        );
    }

    // The same metrics.
    let live_metrics = vm1_metrics(&metrics_address(&replica_b.log()));
    let missing: Vec<&String> = primary_metrics.difference(&live_metrics).collect();
    assert!(
        missing.is_empty(),
        "the live group lacks metrics the primary's group had: {missing:?}\nlive: {live_metrics:?}"
    );

    // The same group commands, on the replica daemon's control socket.
    let closed = cli(&["cycles", "close", "--group", "vm1"], &socket).assert_ok();
    let closed = closed.json()["cycle"].as_u64().expect("cycle");
    let deadline = Instant::now() + LONG;
    while replica_a.info("vm1").expect("vm1 at site A")["last_applied_cycle"].as_u64()
        < Some(closed)
    {
        assert!(
            Instant::now() < deadline,
            "cycle {closed} never applied at site A"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let paused = cli(&["replication", "pause", "--group", "vm1"], &socket).assert_ok();
    assert!(!paused.stdout.trim().is_empty(), "{}", paused.all());
    let report = control(&socket, &json!({"op": "group_status", "group": "vm1"}));
    assert_eq!(report["consumer"]["state"], "paused", "{report:#}");
    let refused = cli(&["cycles", "close", "--group", "vm1"], &socket);
    assert!(
        !refused.success() && refused.all().contains("paused"),
        "{}",
        refused.all()
    );
    let shown = cli(&["replication", "status", "--group", "vm1"], &socket).assert_ok();
    assert!(shown.stdout.contains("vm1: paused"), "{}", shown.all());
    let measured = cli(
        &["replication", "measure", "--group", "vm1", "--json"],
        &socket,
    )
    .assert_ok()
    .json();
    assert!(
        measured["successes"].as_u64() >= Some(1),
        "the replication back delivered cycles: {measured:#}"
    );
    cli(&["replication", "resume", "--group", "vm1"], &socket).assert_ok();
    let after = cli(&["cycles", "close", "--group", "vm1"], &socket).assert_ok();
    assert!(
        after.json()["cycle"].as_u64() > Some(closed),
        "{}",
        after.all()
    );
    // A group the daemon does not run is named in the refusal.
    let unknown = cli(&["cycles", "close", "--group", "vm9"], &socket);
    assert!(
        !unknown.success() && unknown.all().contains("vm9"),
        "{}",
        unknown.all()
    );
}
