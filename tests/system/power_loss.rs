//! Power loss, not just SIGKILL: the daemon's files live on powerloss-fs
//! (tools/powerloss-fs, a LazyFS-style FUSE filesystem of our own), which keeps
//! everything not yet fsynced in memory and drops it when the test cuts the power.
//! Each crash: cut the power (the filesystem first), SIGKILL the daemon, rewrite the
//! ring's boot id (a power loss is a new boot), remount, restart, check.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::ordered::{ordered_prefix, ordered_writer, OrderedShared, ORDERED_REGION};
use testkit::power_loss::{
    check_after_power_loss, fuse_available, place_primary_on, place_replica_storage_on,
    pretend_host_crash, read_prefix, seed, FlushingWriter, PowerLossDir,
};
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::{assert_bytes_equal, tail, Consumer, DiskSpec, GroupSpec, Primary, Spec, LONG, MIB};

/// The activity log's extent (tracker/src/activity.rs).
const EXTENT: u64 = 64 * MIB;
/// Where the writer writes: inside the first extent of a two-extent disk, so a
/// resync bounded by the activity log covers at most half the disk.
const REGION: u64 = 8 * MIB;
const DISK: u64 = 2 * EXTENT;
const FLUSH_EVERY: usize = 8;
const PRIMARY_CRASHES: u32 = 20;

/// The seeded RNG and a lab CA, or None (after saying why) without FUSE.
fn lab() -> Option<(StdRng, tempfile::TempDir, LabCerts)> {
    if !fuse_available() {
        return None;
    }
    let rng = StdRng::seed_from_u64(seed());
    let lab = tempfile::tempdir().unwrap();
    let certs = lab_certs(lab.path());
    Some((rng, lab, certs))
}

#[test]
fn primary_power_loss_keeps_flushed_writes_and_resyncs_only_the_active_extents() {
    let Some((mut rng, _lab, certs)) = lab() else {
        return;
    };
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let mut p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", DISK)],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))
    .ring_size("32MiB")
    .interval("2s")]));
    let mut dir = PowerLossDir::mount_in(&p.layout.root);
    place_primary_on(&p, &dir);
    p.restart();
    let first = p.cycles_close("vm1");
    replica.wait_applied("vm1", first, LONG);
    let image = p.image("disk0");
    let replica_disk = replica.disk("dc1", "vm1", "disk0");

    let seqs = Arc::new(AtomicU64::new(1));
    let (mut acked, mut issued, mut durable, mut flushes) = (0, 0, 0, 0);
    let mut resync_marked = Vec::new();
    let mut resync_differing = Vec::new();
    let mut before = read_prefix(&image, REGION);
    let started = Instant::now();
    for crash in 1..=PRIMARY_CRASHES {
        let writer = FlushingWriter::start(
            &p.nbd_sock(),
            "disk0",
            REGION,
            FLUSH_EVERY,
            8 * MIB,
            seqs.clone(),
            rng.gen(),
        );
        thread::sleep(Duration::from_millis(rng.gen_range(50..1500)));
        let dropped = dir.cut();
        p.kill();
        let log = writer.finish();
        pretend_host_crash(&dir.backing.join("vm1.ring"));
        dir.remount();

        // What survived on "disk" before the daemon touches it again.
        let now = read_prefix(&image, REGION);
        let errors = check_after_power_loss(&now, &before, &log, 10);
        assert!(
            errors.is_empty(),
            "crash {crash}: the image lost writes acknowledged before the last FLUSH \
             ({} of {} writes were durable, fs dropped {dropped:?}):\n  {}",
            log.durable,
            log.writes.len(),
            errors.join("\n  ")
        );
        acked += log.acked();
        issued += log.writes.len();
        durable += log.durable;
        flushes += log.flushes;

        // The ring recovers, and knows the host crashed: a resync is due.
        p.restart();
        let since_start = p
            .log()
            .rsplit("harness: start #")
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(
            since_start.contains("The host stopped uncleanly"),
            "crash {crash}: the restarted daemon did not see a host crash\n{}",
            tail(&since_start, 30)
        );
        let group = p.group_status("vm1");
        testkit::assert_group_shape(&group);
        assert_eq!(group["resync_required"], true, "crash {crash}: {group:#}");
        assert!(
            group["resync_reason"]
                .as_str()
                .is_some_and(|r| r.contains("host shut down uncleanly")),
            "crash {crash}: {group:#}"
        );
        // Bounded by the activity log: the one extent the writer used, not the disk.
        let marked_now = group["disks"][0]["resync_bytes"].as_u64().unwrap();
        assert!(
            marked_now <= EXTENT,
            "crash {crash}: {marked_now} bytes marked for resync, more than the active extent: {group:#}"
        );
        resync_marked.push(marked_now);

        // After the resync the replica equals the primary; the resync compared at
        // most the extent the writer used.
        let cycle = p.cycles_close("vm1");
        let info = replica.wait_applied("vm1", cycle, LONG);
        assert_eq!(info["consistent"], true, "crash {crash}: {info:#}");
        let comparison = p.group_status("vm1")["consumer"]["last_comparison"].clone();
        let compared = comparison["marked_bytes"].as_u64().unwrap_or_else(|| {
            panic!("crash {crash}: no comparison after a host crash: {comparison:#}")
        });
        assert!(
            compared <= EXTENT,
            "crash {crash}: the resync compared {compared} bytes, more than the active extent"
        );
        resync_differing.push(comparison["differing_bytes"].as_u64().unwrap_or(0));
        before = read_prefix(&image, REGION);
        assert_bytes_equal(
            &before,
            &read_prefix(&replica_disk, REGION),
            &format!("crash {crash}: replica vs primary, written region"),
        );
    }
    assert!(
        dir.dropped.bytes > 0,
        "no cut dropped anything: the test did not exercise a power loss"
    );
    assert_bytes_equal(
        &testkit::read_file(&image),
        &testkit::read_file(&replica_disk),
        "replica vs primary, whole disk",
    );
    println!(
        "primary power loss: {} crashes in {:.0?}; {issued} writes issued, {acked} acknowledged, \
         {durable} made durable by {flushes} FLUSHes, {} acknowledged after the last FLUSH \
         (allowed to be lost); powerloss-fs dropped {} bytes in {} files; resync marked \
         {:?} bytes, of which {:?} differed",
        dir.cuts,
        started.elapsed(),
        acked - durable,
        dir.dropped.bytes,
        dir.dropped.files,
        resync_marked,
        resync_differing
    );
}

const REPLICA_CRASHES: u32 = 20;

/// Reads the replica's two disks when no transfer is applied meanwhile (nothing
/// pending and the same applied cycle before and after the read).
fn quiescent_replica_disks(replica: &Replica) -> (u64, Vec<Vec<u8>>) {
    let deadline = Instant::now() + LONG;
    loop {
        let before = replica.info("vm1").expect("vm1");
        let data: Vec<Vec<u8>> = ["disk0", "disk1"]
            .iter()
            .map(|d| read_prefix(&replica.disk("dc1", "vm1", d), ORDERED_REGION))
            .collect();
        let after = replica.info("vm1").expect("vm1");
        let applied = before["last_applied_cycle"].as_u64();
        if before["pending_transfers"] == 0
            && after["pending_transfers"] == 0
            && applied == after["last_applied_cycle"].as_u64()
        {
            return (applied.unwrap_or(0), data);
        }
        assert!(
            Instant::now() < deadline,
            "the replica never settled: {after:#}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replica_power_loss_loses_no_acknowledged_transfer_and_every_point_is_a_prefix() {
    let Some((mut rng, _lab, certs)) = lab() else {
        return;
    };
    let mut replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let mut dir = PowerLossDir::mount_in(&replica.root);
    place_replica_storage_on(&mut replica, "dc1", &dir);
    // Cycles every second; retries after 0.6 s instead of a minute; points kept.
    let consumer = certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "retry_scale = 0.01\nrecovery_points = 4\nrecovery_point_spacing = \"2s\"\n",
    );
    let mut p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", ORDERED_REGION),
            DiskSpec::new("disk1", ORDERED_REGION),
        ],
    )
    .consumer(Consumer::Raw(consumer))
    .interval("1s")]));
    let first = p.cycles_close("vm1");
    replica.wait_applied("vm1", first, LONG);

    let shared = Arc::new(OrderedShared::default());
    let writer = ordered_writer(p.nbd_sock(), shared.clone(), rng.gen());
    let mut prefix = 0;
    let mut cut_while_applying = 0;
    let started = Instant::now();
    let applying = |replica: &Replica| {
        replica
            .info("vm1")
            .is_some_and(|i| i["pending_transfers"] != 0)
    };
    // Applied, but the disks not yet synced: the cut loses those writes from the
    // disks, and the restart must write them again from the kept transfer files.
    let unsynced = |replica: &Replica| {
        replica
            .info("vm1")
            .is_some_and(|i| i["unsynced_transfers"] != 0)
    };
    for crash in 1..=REPLICA_CRASHES {
        thread::sleep(Duration::from_millis(rng.gen_range(100..1500)));
        // Acknowledged to the primary before the cut: made durable by the replica.
        let acked = p.group_status("vm1")["cycle"]["last_acked"]
            .as_u64()
            .unwrap();
        // Every other cut waits (a while) for a committed transfer being applied,
        // while the replica disks hold unsynced writes, and falls right after; every
        // fourth waits for applied transfers the disks have not synced yet.
        let deadline = Instant::now() + Duration::from_secs(if crash % 2 == 0 { 3 } else { 0 });
        let wanted = |replica: &Replica| {
            if crash % 4 == 0 {
                unsynced(replica)
            } else {
                applying(replica)
            }
        };
        let mut seen = wanted(&replica);
        while !seen && Instant::now() < deadline {
            seen = wanted(&replica);
        }
        if seen {
            cut_while_applying += 1;
        }
        dir.cut();
        replica.kill();
        dir.remount();
        replica.spawn();
        let info = replica.info("vm1").expect("vm1 after the restart");
        let received = info["last_received_cycle"].as_u64().unwrap_or(0);
        assert!(
            received >= acked,
            "crash {crash}: the primary saw cycle {acked} acknowledged, the replica kept only \
             {received}: {info:#}"
        );
        replica.wait_applied("vm1", acked + 1, LONG);
        let (applied, data) = quiescent_replica_disks(&replica);
        let writes = shared.writes.lock().unwrap().clone();
        let m = ordered_prefix(&data, &writes).unwrap_or_else(|e| {
            panic!(
                "crash {crash}: the replica after cycle {applied} is no state the primary had: {e}"
            )
        });
        assert!(
            m >= prefix,
            "crash {crash}: the replica went back from write {prefix} to {m}"
        );
        prefix = m;
    }
    shared.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().unwrap();
    let consumer = p.group_status("vm1")["consumer"].clone();
    assert_ne!(consumer["health"], "Critical", "{consumer:#}");
    let last = p.cycles_close("vm1");
    replica.wait_applied("vm1", last, LONG);
    for disk in ["disk0", "disk1"] {
        assert_bytes_equal(
            &testkit::read_file(&p.image(disk)),
            &testkit::read_file(&replica.disk("dc1", "vm1", disk)),
            &format!("{disk}: replica vs primary after {REPLICA_CRASHES} replica power cuts"),
        );
    }
    let writes = shared.writes.lock().unwrap().clone();

    // The latest point (the disks as they are) holds every write; every earlier
    // point is a prefix of the write order, older points shorter ones.
    p.kill();
    let latest: Vec<Vec<u8>> = ["disk0", "disk1"]
        .iter()
        .map(|d| read_prefix(&replica.disk("dc1", "vm1", d), ORDERED_REGION))
        .collect();
    assert_eq!(ordered_prefix(&latest, &writes), Ok(written));
    let earlier: Vec<_> = replica
        .points("vm1")
        .into_iter()
        .filter(|point| point["latest"] == false)
        .collect();
    assert!(!earlier.is_empty(), "no earlier recovery point kept");
    let mut by_cycle: Vec<(u64, u64)> = Vec::new();
    for point in &earlier {
        let id = point["id"].as_u64().expect("point id").to_string();
        replica
            .cli(&["failover", "--name", "vm1", "--point", &id])
            .assert_ok();
        let data: Vec<Vec<u8>> = ["disk0", "disk1"]
            .iter()
            .map(|d| read_prefix(&replica.disk("dc1", "vm1", d), ORDERED_REGION))
            .collect();
        let m = ordered_prefix(&data, &writes)
            .unwrap_or_else(|e| panic!("recovery point {point} is no state the primary had: {e}"));
        by_cycle.push((point["cycle"].as_u64().unwrap_or(0), m));
    }
    by_cycle.sort_unstable();
    by_cycle.push((last, written));
    assert!(
        by_cycle.windows(2).all(|w| w[0].1 <= w[1].1),
        "older points must hold shorter prefixes: {by_cycle:?}"
    );
    // Restarts that found applied transfers the disks had not synced, and wrote them
    // again (the redo of `replica/src/store/applying.rs`).
    let redone = replica
        .log()
        .matches("Transfers applied before a restart written again")
        .count();
    println!(
        "replica power loss: {} crashes in {:.0?} ({cut_while_applying} with committed transfers \
         being applied or not yet synced, the rest receiving or idle; {redone} restarts redid unsynced applies); \
         {written} ordered writes; powerloss-fs dropped {} bytes in {} files; points (cycle, \
         prefix): {by_cycle:?}",
        dir.cuts,
        started.elapsed(),
        dir.dropped.bytes,
        dir.dropped.files
    );
}
