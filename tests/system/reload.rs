//! Live groups on the primary: SIGHUP and `blkrep reload` read the configuration
//! again and add, remove and change groups, and add disks to groups, while another
//! group's client writes throughout without one error, and that group's log still
//! rebuilds its image.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use testkit::nbd::Conn;
use testkit::replica::{PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

const MIB: u64 = 1 << 20;

fn group(name: &str, disk: &str) -> GroupSpec {
    GroupSpec::new(name, vec![DiskSpec::new(disk, 8 * MIB)])
}

/// Writes `groups`' configuration over the primary's file.
fn configure(p: &Primary, groups: &[&GroupSpec]) {
    let spec = Spec::new(groups.iter().map(|g| (*g).clone()).collect());
    fs::write(p.config(), p.layout.config_text(&spec, None)).expect("write config");
}

/// `blkrep reload --json` (through the control socket: the file may be invalid), with
/// its report.
fn reload(p: &Primary, extra: &[&str]) -> (Output, Value) {
    let o = run(
        p.cmd()
            .args(["reload", "--json", "--socket"])
            .arg(p.layout.ctl())
            .args(extra),
        LONG,
    );
    let report = serde_json::from_str(o.stdout.trim()).unwrap_or(Value::Null);
    (o, report)
}

fn names(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn running_groups(p: &Primary) -> Vec<String> {
    let o = run_ok(
        p.cmd()
            .args(["status", "--json", "--socket"])
            .arg(p.layout.ctl()),
        LONG,
    );
    o.json()["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["name"].as_str().map(str::to_string))
        .collect()
}

/// A client writing random 4–32 KiB blocks to `disk` (with a flush every 16) until
/// stopped; returns how many writes were acknowledged, or the first error.
fn writer(
    p: &Primary,
    disk: &str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<u64, String>> {
    let socket = p.nbd_sock();
    let disk = disk.to_string();
    thread::spawn(move || {
        let mut conn = Conn::connect_unix(&socket, &disk).map_err(|e| e.to_string())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut acked = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let blocks = rng.gen_range(1..=8u64);
            let offset = rng.gen_range(0..(8 * MIB / 4096 - blocks)) * 4096;
            let data: Vec<u8> = (0..blocks * 4096).map(|_| rng.gen()).collect();
            conn.write(offset, &data, false)
                .map_err(|e| format!("write {acked} at {offset}: {e}"))?;
            acked += 1;
            if acked % 16 == 0 {
                conn.flush()
                    .map_err(|e| format!("flush after {acked}: {e}"))?;
            }
            // A steady guest, not a flood: the ring keeps every write of the test.
            thread::sleep(Duration::from_millis(1));
        }
        conn.disconnect();
        Ok(acked)
    })
}

#[test]
fn groups_come_and_go_while_another_group_keeps_writing() {
    let vm1 = group("vm1", "a0").ring_size("256MiB");
    let (vm2, vm3) = (group("vm2", "b0"), group("vm3", "c0"));
    let p = Primary::start(Spec::new(vec![vm1.clone(), vm2.clone()]));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&p, "a0", Arc::clone(&stop));
    let mut idle = Conn::connect_unix(&p.nbd_sock(), "b0").expect("connect b0");

    // Add vm3 with SIGHUP.
    p.layout.write_images(&Spec::new(vec![vm3.clone()]));
    configure(&p, &[&vm1, &vm2, &vm3]);
    kill(p.pid(), Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + LONG;
    let mut c0 = loop {
        match Conn::connect_unix(&p.nbd_sock(), "c0") {
            Ok(conn) => break conn,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("vm3's export never appeared after SIGHUP: {e}\n{}", p.log()),
        }
    };
    c0.write(4096, &[0xc3; 4096], true).expect("write c0");
    assert_eq!(running_groups(&p), ["vm1", "vm2", "vm3"]);

    // Remove vm2 with `blkrep reload`: its client is closed, its ring kept.
    configure(&p, &[&vm1, &vm3]);
    let (o, report) = reload(&p, &[]);
    assert!(o.success(), "reload failed\n{}", o.report());
    assert_eq!(names(&report["removed"]), ["vm2"], "{report}");
    assert_eq!(names(&report["unchanged"]), ["vm1", "vm3"], "{report}");
    assert!(
        idle.read(0, 4096).is_err(),
        "vm2's connection still serves after its group was removed"
    );
    assert!(
        Conn::connect_unix(&p.nbd_sock(), "b0").is_err(),
        "a new connection to a removed group's export succeeded"
    );
    assert!(
        p.layout.ring("vm2").exists(),
        "the ring of a removed group is kept"
    );
    assert_eq!(running_groups(&p), ["vm1", "vm3"]);

    // Change vm3 (its interval): it reopens; what was written to it stays.
    let vm3_changed = vm3.clone().interval("2h");
    configure(&p, &[&vm1, &vm3_changed]);
    let (o, report) = reload(&p, &[]);
    assert!(o.success(), "reload failed\n{}", o.report());
    assert_eq!(names(&report["changed"]), ["vm3"], "{report}");
    let mut c0 = Conn::connect_unix(&p.nbd_sock(), "c0").expect("vm3 reopened");
    assert_eq!(c0.read(4096, 4096).expect("read c0"), vec![0xc3; 4096]);
    c0.disconnect();

    // A file that does not validate changes nothing, and says why.
    fs::write(p.config(), "this is not toml [").expect("write config");
    let (o, _) = reload(&p, &[]);
    assert!(
        !o.success(),
        "an invalid configuration was reloaded\n{}",
        o.report()
    );
    assert!(o.stderr.contains("not reloaded"), "{}", o.report());
    assert_eq!(running_groups(&p), ["vm1", "vm3"]);

    // vm2 comes back from its kept ring, then goes with its ring deleted.
    configure(&p, &[&vm1, &vm2, &vm3_changed]);
    let (o, report) = reload(&p, &[]);
    assert!(o.success(), "reload failed\n{}", o.report());
    assert_eq!(names(&report["added"]), ["vm2"], "{report}");
    assert!(
        p.log().contains("previous=Clean"),
        "vm2's ring was not reopened as cleanly closed\n{}",
        p.log()
    );
    configure(&p, &[&vm1, &vm3_changed]);
    let (o, report) = reload(&p, &["--delete-removed-rings"]);
    assert!(o.success(), "reload failed\n{}", o.report());
    assert_eq!(names(&report["removed"]), ["vm2"], "{report}");
    assert!(
        !p.layout.ring("vm2").exists(),
        "the removed ring was not deleted"
    );

    // vm1 wrote throughout without one error, and its log still rebuilds its image.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let acked = writing.join().expect("writer thread");
    let acked = acked.unwrap_or_else(|e| panic!("vm1's writer failed: {e}\n{}", p.log()));
    assert!(acked > 0, "vm1's writer wrote nothing");
    p.cycles_close("vm1");
    assert_files_equal(
        &p.copy_image("vm1", "a0"),
        &p.image("a0"),
        "vm1's local copy",
    );
    assert!(!p.log().contains("panicked"), "{}", p.log());
    assert!(
        !p.log().contains("resync is required"),
        "vm1 fell back to a resync\n{}",
        p.log()
    );
}

/// Disks added to groups by a reload: one replicating to a replica server, one to a
/// local copy. The replica server adds the disk, a resync copies it whole and resends
/// nothing of the other disk, and the replica and the copy equal the images; a disk
/// removed or reordered is refused and the group runs on; another group writes
/// throughout without one error.
#[test]
fn disks_added_to_groups_are_copied_while_another_group_keeps_writing() {
    let (_dir, certs, replica) = crate::replication::lab();
    let a0 = DiskSpec::new("a0", 8 * MIB).init(Init::Random(1));
    let a1 = DiskSpec::new("a1", 8 * MIB).init(Init::Random(2));
    let vm1 = GroupSpec::new("vm1", vec![a0.clone()])
        .consumer(Consumer::Raw(certs.consumer(
            &replica.url(REPLICA_HOST),
            PRIMARY_HOST,
            "",
        )))
        .ring_size("64MiB");
    let vm2 = group("vm2", "b0").ring_size("256MiB");
    let c0 = DiskSpec::new("c0", 4 * MIB).init(Init::Random(3));
    let c1 = DiskSpec::new("c1", 4 * MIB).init(Init::Random(4));
    let vm3 = GroupSpec::new("vm3", vec![c0.clone()]);
    let p = Primary::start(Spec::new(vec![vm1.clone(), vm2.clone(), vm3.clone()]));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&p, "b0", Arc::clone(&stop));

    // The initial replication of vm1's one disk.
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    let mut conn = Conn::connect_unix(&p.nbd_sock(), "a0").expect("connect a0");
    conn.write(MIB, &[0xa0; 65536], false).expect("write a0");
    conn.disconnect();

    // Add a1 to vm1 and c1 to vm3.
    let vm1_two = GroupSpec {
        disks: vec![a0.clone(), a1.clone()],
        ..vm1.clone()
    };
    let vm3_two = GroupSpec {
        disks: vec![c0.clone(), c1.clone()],
        ..vm3.clone()
    };
    p.layout.write_images(&Spec::new(vec![GroupSpec::new(
        "new",
        vec![a1.clone(), c1.clone()],
    )]));
    configure(&p, &[&vm1_two, &vm2, &vm3_two]);
    let (o, report) = reload(&p, &[]);
    assert!(o.success(), "reload failed\n{}", o.report());
    assert_eq!(names(&report["changed"]), ["vm1", "vm3"], "{report}");
    assert_eq!(names(&report["unchanged"]), ["vm2"], "{report}");
    let resync = p.group_status("vm1")["resync_reason"].clone();
    assert!(
        resync
            .as_str()
            .is_some_and(|r| r.contains("disk was added")),
        "vm1 does not say it needs a resync for its added disk: {resync}"
    );

    // Both disks written after the add; the next cycle brings the replica up.
    for (disk, byte) in [("a0", 0xa1u8), ("a1", 0xa2)] {
        let mut conn = Conn::connect_unix(&p.nbd_sock(), disk).expect("connect");
        conn.write(2 * MIB, &[byte; 65536], false).expect("write");
        conn.disconnect();
    }
    let cycle = p.cycles_close("vm1");
    let info = replica.wait_applied("vm1", cycle, LONG);
    assert_eq!(info["consistent"], true, "{info}");
    assert_eq!(
        info["disks"].as_array().map(Vec::len),
        Some(2),
        "the replica does not list the added disk: {info}"
    );
    for disk in ["a0", "a1"] {
        assert_files_equal(
            &p.image(disk),
            &replica.disk("dc1", "vm1", disk),
            &format!("replica of {disk} after the disk was added"),
        );
    }
    // a1 (8 MiB of random data but for 64 KiB of 0xa2, which compress) went whole;
    // a0 only its unshipped writes, which compress too; resending a0 would be 8 MiB
    // more. (The reopened group's shipper counts from the reload.)
    let sent = p.group_status("vm1")["consumer"]["network_bytes"]
        .as_u64()
        .expect("network_bytes");
    assert!(
        sent > 7 * MIB && sent < 12 * MIB,
        "{sent} bytes sent for an added 8 MiB disk and two 64 KiB writes"
    );
    assert!(
        p.group_status("vm1")["resync_reason"].is_null(),
        "{}",
        p.group_status("vm1")
    );

    // vm3's local copy of c1 is made and filled.
    p.cycles_close("vm3");
    for disk in ["c0", "c1"] {
        assert_files_equal(
            &p.copy_image("vm3", disk),
            &p.image(disk),
            &format!("local copy of {disk}"),
        );
    }

    // A disk cannot be removed or reordered: the group runs on with both.
    let reordered = GroupSpec {
        disks: vec![a1.clone(), a0.clone()],
        ..vm1.clone()
    };
    for refused in [&vm1, &reordered] {
        configure(&p, &[refused, &vm2, &vm3_two]);
        let (o, report) = reload(&p, &[]);
        assert!(
            !o.success(),
            "a refused disk change reloaded\n{}",
            o.report()
        );
        let failed = report["failed"].to_string();
        assert!(failed.contains("only be added"), "{report}");
        assert!(failed.contains("previous settings"), "{report}");
    }
    let mut conn = Conn::connect_unix(&p.nbd_sock(), "a1").expect("a1 still served");
    assert_eq!(conn.read(2 * MIB, 4096).expect("read a1"), vec![0xa2; 4096]);
    conn.disconnect();

    stop.store(true, Ordering::Relaxed);
    let acked = writing.join().expect("writer thread");
    let acked = acked.unwrap_or_else(|e| panic!("vm2's writer failed: {e}\n{}", p.log()));
    assert!(acked > 0, "vm2's writer wrote nothing");
    p.cycles_close("vm2");
    assert_files_equal(&p.copy_image("vm2", "b0"), &p.image("b0"), "vm2's copy");
    assert!(!p.log().contains("panicked"), "{}", p.log());
}

/// The replica daemon's authorisation entries reload on SIGHUP: a primary it refused
/// replicates once an entry allows it, and is refused again, on the connection it
/// already has, once the entry is gone. An invalid file changes nothing.
#[test]
fn the_replica_reloads_its_authorisation_entries_on_sighup() {
    use testkit::replica::{dc1, lab_certs, Replica, REPLICA_HOST, ROGUE_HOST};
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let consumer = certs.consumer(
        &replica.url(REPLICA_HOST),
        ROGUE_HOST,
        "retry_scale = 0.001",
    );
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 4 * MIB)],
    )
    .consumer(Consumer::Raw(consumer))]));
    let refused = |what: &str| {
        let status = p.close_refused("vm1", what);
        assert_eq!(
            status["failure_class"], "authentication",
            "{what}: {status:#}"
        );
    };
    refused("before the reload");

    let original = fs::read_to_string(replica.config()).expect("replica config");
    let rogue_entry = format!(
        "\n[[authorization]]\nprimary = {ROGUE_HOST:?}\nstorage = {:?}\ntrust_group = \"dc2\"\n",
        replica.root.join("storage-dc2").display().to_string()
    );
    let hup = |text: &str, marker: &str| {
        let before = replica.log().matches(marker).count();
        fs::write(replica.config(), text).expect("write replica config");
        kill(replica.pid(), Signal::SIGHUP).expect("SIGHUP");
        let deadline = Instant::now() + LONG;
        while replica.log().matches(marker).count() == before {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} after SIGHUP\n{}",
                replica.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };

    // An invalid file: refused, and the daemon runs on.
    hup("listen = [", "Reload refused");
    hup(
        &format!("{original}{rogue_entry}"),
        "Reloaded: authorisation entries in force",
    );
    let o = p.replication(&["resume", "--group", "vm1"]);
    assert!(o.success(), "resume failed\n{}", o.report());
    let close = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        close.success(),
        "the authorised primary could not ship\n{}\n{}",
        close.report(),
        replica.log()
    );
    assert!(
        replica.storage("dc2").join("vm1").exists(),
        "no replica in dc2's storage"
    );

    hup(&original, "Reloaded: authorisation entries in force");
    refused("after the entry was removed");
    assert!(
        replica.log().contains("Refusing") || p.log().contains("authentication"),
        "the refusal was not logged\n{}",
        replica.log()
    );
}
