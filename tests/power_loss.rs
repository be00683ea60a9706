//! Power loss, not just SIGKILL: the daemon's files live on powerloss-fs
//! (tools/powerloss-fs, a LazyFS-style FUSE filesystem of our own), which keeps
//! everything not yet fsynced in memory and drops it when the test cuts the power.
//! Each crash: cut the power (the filesystem first), SIGKILL the daemon, rewrite the
//! ring's boot id (a power loss is a new boot), remount, restart, check.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::power_loss::{
    check_after_power_loss, fuse_available, place_primary_on, pretend_host_crash, read_prefix,
    seed, FlushingWriter, PowerLossDir,
};
use common::replica::{dc1, lab_certs, Replica, PRIMARY_HOST, REPLICA_HOST};
use common::{assert_bytes_equal, tail, Consumer, DiskSpec, GroupSpec, Primary, Spec, LONG, MIB};
use rand::{Rng, SeedableRng};

/// The activity log's extent (tracker/src/activity.rs).
const EXTENT: u64 = 64 * MIB;
/// Where the writer writes: inside the first extent of a two-extent disk, so a
/// resync bounded by the activity log covers at most half the disk.
const REGION: u64 = 8 * MIB;
const DISK: u64 = 2 * EXTENT;
const FLUSH_EVERY: usize = 8;
const PRIMARY_CRASHES: u32 = 20;

#[test]
fn primary_power_loss_keeps_flushed_writes_and_resyncs_only_the_active_extents() {
    if !fuse_available() {
        return;
    }
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lab = tempfile::tempdir().unwrap();
    let certs = lab_certs(lab.path());
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
        common::assert_group_shape(&group);
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
        &common::read_file(&image),
        &common::read_file(&replica_disk),
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
