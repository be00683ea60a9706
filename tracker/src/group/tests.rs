use super::ring::WHOLE_PAYLOAD_MAX;
use super::ring_full::{
    throttle_pause, usable_ring, MAX_THROTTLE_PAUSE, THROTTLE_HIGH_WATER_PERCENT,
};
use super::*;
use crate::activity;
use crate::cycle::{ChangeData, ClosedCycle};
use crate::record::{record_len, COMMIT_CRC_AT, HEADER_LEN};
use crate::superblock::{DATA_START, SUPERBLOCK_LEN};
use crate::TrackerError;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const DISK: u64 = 1 << 20;

fn config(dir: &Path, ring_size: u64, disks: usize) -> TrackerConfig {
    TrackerConfig {
        name: "test".into(),
        ring_path: dir.join("test.ring"),
        ring_size,
        block_size: 4096,
        disks: (0..disks)
            .map(|i| DiskSpec {
                name: format!("disk{i}"),
                size: DISK,
            })
            .collect(),
    }
}

/// Applies a cycle's changes to in-memory disks.
fn apply(cycle: &ClosedCycle, disks: &mut [Vec<u8>]) {
    for change in cycle.changes() {
        let disk = &mut disks[change.disk];
        let range = usize_of(change.offset)..usize_of(change.offset + change.length);
        match change.data {
            ChangeData::Write(bytes) => disk[range].copy_from_slice(bytes),
            ChangeData::Zero | ChangeData::Trim => disk[range].fill(0),
        }
    }
}

fn write(tracker: &DiskTracker, image: &mut [u8], offset: u64, data: &[u8]) {
    let guard = tracker.log_write(offset, data).unwrap();
    image[usize_of(offset)..usize_of(offset) + data.len()].copy_from_slice(data);
    drop(guard);
}

#[test]
fn closed_cycle_coalesces_last_writer_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (group, report) = Group::open(&config(dir.path(), MIN_RING_SIZE, 2)).unwrap();
    assert_eq!(report.previous, PreviousShutdown::Created);
    let (d0, d1) = (group.disk(0).unwrap(), group.disk(1).unwrap());
    let mut images = vec![vec![0u8; usize_of(DISK)]; 2];
    write(&d0, &mut images[0], 0, &[1; 8192]);
    write(&d0, &mut images[0], 4096, &[2; 100]);
    write(&d1, &mut images[1], 10, &[3; 10]);
    drop(d1.log_zero(0, 5, false).unwrap());
    images[1][0..5].fill(0);
    assert_eq!(group.status().disks[0].dirty_bytes, 8192);
    assert_eq!(
        d0.dirty_extents(0, 16384),
        vec![(8192, true), (8192, false)]
    );
    let id = group.close_cycle().unwrap();
    assert_eq!(id, 1);
    assert_eq!(group.status().disks[0].dirty_bytes, 0);
    let cycle = group.take_closed().unwrap().unwrap();
    assert_eq!(cycle.stats().records, 4);
    assert_eq!(cycle.stats().data_bytes, 8192 + 10);
    assert_eq!(cycle.stats().zeroed_bytes, 5);
    let mut copies = vec![vec![0u8; usize_of(DISK)]; 2];
    apply(&cycle, &mut copies);
    assert_eq!(copies, images);
    assert!(matches!(
        group.take_closed(),
        Err(TrackerError::ConsumerBusy)
    ));
    cycle.acknowledge().unwrap();
    assert!(group.take_closed().unwrap().is_none());
    let status = group.status();
    assert_eq!(
        (status.last_acked, status.ring_used, status.open_cycle),
        (1, 0, 2)
    );
}

/// `try_log_write` refuses to wait for an overlapping write in flight, gives back
/// everything it took (the range logs normally once the other write is done), and
/// logs a write that overlaps nothing at once.
#[test]
fn try_log_write_refuses_to_wait_for_an_overlapping_write() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 2)).unwrap();
    let (d0, d1) = (group.disk(0).unwrap(), group.disk(1).unwrap());
    let mut images = vec![vec![0u8; usize_of(DISK)]; 2];
    let held = d0.log_write(8192, &[1; 8192]).unwrap();
    images[0][8192..16384].fill(1);
    assert!(matches!(
        d0.try_log_write(12288, &[2; 8192]),
        Err(TrackerError::WouldWait)
    ));
    // Beside it, and on another disk at the same offsets: no wait.
    let beside = d0.try_log_write(16384, &[3; 4096]).unwrap();
    images[0][16384..20480].fill(3);
    let other = d1.try_log_write(8192, &[4; 8192]).unwrap();
    images[1][8192..16384].fill(4);
    drop((beside, other));
    drop(held);
    let now = d0.try_log_write(12288, &[2; 8192]).unwrap();
    images[0][12288..20480].fill(2);
    drop(now);
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    assert_eq!(
        cycle.stats().records,
        4,
        "the refused attempt left no record"
    );
    let mut copies = vec![vec![0u8; usize_of(DISK)]; 2];
    apply(&cycle, &mut copies);
    assert_eq!(copies, images);
    cycle.acknowledge().unwrap();
    assert_eq!(group.status().disks[0].dirty_bytes, 0);
}

#[test]
fn ring_wraps_over_many_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut image = vec![0u8; usize_of(DISK)];
    let mut copy = vec![0u8; usize_of(DISK)];
    // About 12 MiB logged through a 4 MiB ring.
    for _ in 0..40 {
        for _ in 0..20 {
            let len = rng.gen_range(1..16384u64);
            let offset = rng.gen_range(0..DISK - len);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            write(&disk, &mut image, offset, &data);
        }
        group.close_cycle().unwrap();
        let cycle = group.take_closed().unwrap().unwrap();
        apply(&cycle, std::slice::from_mut(&mut copy));
        cycle.acknowledge().unwrap();
        assert!(copy == image);
    }
    assert_eq!(group.status().mode, TrackingMode::Logging);
}

/// The ring on a filesystem whose power is then cut: every later ring write fails
/// with EIO. Writes must go on (tracked by dirty map), and the group must ask for a
/// resync covering them.
#[test]
fn a_failed_ring_write_falls_back_to_dirty_map_and_asks_for_resync() {
    if let Some(reason) = powerloss_fs::unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let backing = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let mounted = powerloss_fs::Mounted::mount(backing.path(), mountpoint.path()).unwrap();
    let (group, _) = Group::open(&config(mountpoint.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    let mut image = vec![0u8; usize_of(DISK)];
    write(&disk, &mut image, 0, &[1; 4096]);
    assert_eq!(group.status().mode, TrackingMode::Logging);
    mounted.power_cut();
    // A small write (written whole under the lock) and a large one (committed later).
    let small = disk.log_write(8192, &[2; 4096]).unwrap();
    assert!(!small.is_logged());
    drop(small);
    write(&disk, &mut image, 65536, &vec![3u8; 128 << 10]);
    let status = group.status();
    assert_eq!(status.mode, TrackingMode::DirtyMap);
    assert_eq!(status.resync, Some(ResyncReason::RingWriteError));
    assert!(matches!(
        group.close_cycle(),
        Err(TrackerError::ResyncRequired(ResyncReason::RingWriteError))
    ));
    // The writes after the failure are in the resync map (the ring's own records join
    // it when the resync begins, which needs a working ring).
    assert_eq!(status.disks[0].resync_bytes, 4096 + (128 << 10));
    drop(group);
}

#[test]
fn overflow_falls_back_to_dirty_map_and_resync_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    let mut image = vec![0u8; usize_of(DISK)];
    let chunk = vec![9u8; 65536];
    // 8 MiB of writes into a 4 MiB ring with no consumer: writes never fail.
    for i in 0..128u64 {
        write(&disk, &mut image, (i * 65536) % (DISK - 65536), &chunk);
    }
    let status = group.status();
    assert_eq!(status.mode, TrackingMode::DirtyMap);
    assert_eq!(status.resync, Some(ResyncReason::RingOverflow));
    assert!(matches!(
        group.close_cycle(),
        Err(TrackerError::ResyncRequired(ResyncReason::RingOverflow))
    ));
    // The resync map covers every written byte.
    let maps = group.begin_resync().unwrap();
    let mut copy = vec![0u8; usize_of(DISK)];
    for block in maps[0].iter_ones() {
        let range = block * 4096..(block + 1) * 4096;
        copy[range.clone()].copy_from_slice(&image[range]);
    }
    write(&disk, &mut image, 5, b"after");
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    apply(&cycle, std::slice::from_mut(&mut copy));
    cycle.acknowledge().unwrap();
    group.finish_resync().unwrap();
    assert!(copy == image);
    assert_eq!(group.status().resync, None);
}

#[test]
fn crash_recovery_skips_uncommitted_and_keeps_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    let mut image = vec![0u8; usize_of(DISK)];
    {
        let (group, _) = Group::open(&cfg).unwrap();
        let disk = group.disk(0).unwrap();
        write(&disk, &mut image, 0, &[1; 4096]);
        group.close_cycle().unwrap();
        write(&disk, &mut image, 4096, &[2; 4096]);
        write(&disk, &mut image, 8192, &[3; 4096]);
        assert!(matches!(Group::open(&cfg), Err(TrackerError::RingInUse(_))));
        // Dropped without shutdown_clean: a daemon crash.
    }
    // Un-commit the write of 2s (third record: write, close, write): as if the daemon
    // died while copying its payload.
    let second_write = DATA_START + record_len(4096) + record_len(0);
    let mut bytes = std::fs::read(&cfg.ring_path).unwrap();
    let at = usize_of(second_write) + COMMIT_CRC_AT;
    bytes[at..at + 4].fill(0);
    std::fs::write(&cfg.ring_path, &bytes).unwrap();
    image[4096..8192].fill(0);

    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.previous, PreviousShutdown::DaemonCrash);
    assert_eq!((report.records, report.uncommitted), (2, 1));
    assert!(report.needs_replay());
    let view = group.recovery_view().unwrap();
    let mut replayed = vec![0u8; usize_of(DISK)];
    apply(&view, std::slice::from_mut(&mut replayed));
    assert!(replayed == image);
    assert!(matches!(
        view.acknowledge(),
        Err(TrackerError::RecoveryViewAck)
    ));
    let status = group.status();
    assert_eq!((status.last_closed, status.open_cycle), (1, 2));
    // Cycle 1 is still closed and ships as before.
    let cycle = group.take_closed().unwrap().unwrap();
    assert_eq!((cycle.id(), cycle.stats().records), (1, 1));
    cycle.acknowledge().unwrap();
    group.shutdown_clean(&[]).unwrap();
    drop(group);
    let (_, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.previous, PreviousShutdown::Clean);
}

/// Opens the group of `cfg`, writes `writes` (offset, data) to its disk 0, and drops
/// it without a clean shutdown: a daemon crash. Returns the image the writes make.
fn log_then_crash(cfg: &TrackerConfig, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut image = vec![0u8; usize_of(DISK)];
    let (group, _) = Group::open(cfg).unwrap();
    let disk = group.disk(0).unwrap();
    for (offset, data) in writes {
        write(&disk, &mut image, *offset, data);
    }
    image
}

/// A record whose `pwritev` a crash cut short keeps its (nonzero) commit CRC over a
/// partial payload. Recovery must withdraw it, or the first live close after a replay
/// ships a write the image never received.
#[test]
fn a_record_cut_short_is_withdrawn_and_never_ships() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    let mut image = log_then_crash(&cfg, &[(0, vec![1; 4096]), (4096, vec![2; 4096])]);
    // The second record's payload only half arrived; its CRC did.
    let second = usize_of(DATA_START + record_len(4096));
    let mut bytes = std::fs::read(&cfg.ring_path).unwrap();
    let crc_at = second + COMMIT_CRC_AT;
    assert_ne!(bytes[crc_at..crc_at + 4], [0; 4]);
    bytes[second + HEADER_LEN + 2048..second + HEADER_LEN + 4096].fill(0);
    std::fs::write(&cfg.ring_path, &bytes).unwrap();
    image[4096..8192].fill(0);

    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!((report.records, report.uncommitted), (1, 1));
    let bytes = std::fs::read(&cfg.ring_path).unwrap();
    assert_eq!(
        bytes[crc_at..crc_at + 4],
        [0; 4],
        "commit CRC not withdrawn"
    );
    let mut replayed = vec![0u8; usize_of(DISK)];
    apply(
        &group.recovery_view().unwrap(),
        std::slice::from_mut(&mut replayed),
    );
    assert!(replayed == image);
    // The live path (as the shipper after the replay) sees the same.
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    assert_eq!(cycle.stats().records, 1);
    let mut shipped = vec![0u8; usize_of(DISK)];
    apply(&cycle, std::slice::from_mut(&mut shipped));
    assert!(shipped == image);
}

#[test]
fn torn_tail_stops_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    let mut image = vec![0u8; usize_of(DISK)];
    {
        let (group, _) = Group::open(&cfg).unwrap();
        let disk = group.disk(0).unwrap();
        for i in 0..3 {
            write(&disk, &mut image, i * 4096, &[7; 4096]);
        }
    }
    let mut bytes = std::fs::read(&cfg.ring_path).unwrap();
    let third = usize_of(DATA_START + 2 * record_len(4096));
    bytes[third + 20] ^= 0xff;
    std::fs::write(&cfg.ring_path, &bytes).unwrap();
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!((report.records, report.uncommitted), (2, 0));
    assert_eq!(group.status().ring_used, 2 * record_len(4096));
}

#[test]
fn changed_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    drop(Group::open(&cfg).unwrap());
    let mut other = cfg.clone();
    other.disks[0].size *= 2;
    let error = Group::open(&other).unwrap_err().to_string();
    assert!(error.contains("does not match"), "{error}");
    other = cfg.clone();
    other.ring_size *= 2;
    assert!(matches!(
        Group::open(&other),
        Err(TrackerError::RingMismatch { .. })
    ));
}

/// Threads write random overlapping ranges; the image is updated while the guard is
/// held. Applying the log to a blank copy must give the image exactly.
#[test]
fn concurrent_overlapping_writers_keep_log_and_image_in_agreement() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), 64 << 20, 1)).unwrap();
    let image = Arc::new(Mutex::new(vec![0u8; 65536]));
    let threads: Vec<_> = (0..4u8)
        .map(|thread| {
            let disk = group.disk(0).unwrap();
            let image = Arc::clone(&image);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(thread));
                for round in 0..2000u32 {
                    let len = rng.gen_range(1..4096u64);
                    let offset = rng.gen_range(0..65536 - len);
                    let byte = thread
                        .wrapping_mul(64)
                        .wrapping_add(u8::try_from(round % 64).unwrap());
                    let data = vec![byte; usize_of(len)];
                    let guard = disk.log_write(offset, &data).unwrap();
                    // Yield inside the window to invite interleaving.
                    std::thread::yield_now();
                    image.lock().unwrap()[usize_of(offset)..usize_of(offset + len)]
                        .copy_from_slice(&data);
                    drop(guard);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let mut copy = vec![vec![0u8; usize_of(DISK)]];
    apply(&cycle, &mut copy);
    assert!(copy[0][..65536] == image.lock().unwrap()[..]);
}

/// An ordered writer alternates between two disks, write k only after k-1 completed;
/// cycles close concurrently. Every closed cycle, applied, must show a prefix of the
/// write order across both disks.
#[test]
fn cycles_close_at_one_instant_across_disks() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), 64 << 20, 2)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (d0, d1) = (group.disk(0).unwrap(), group.disk(1).unwrap());
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) && k < 200 {
                k += 1;
                let disk = if k % 2 == 0 { &d0 } else { &d1 };
                drop(disk.log_write(k * 4096, &k.to_le_bytes()).unwrap());
            }
            k
        })
    };
    let mut copies = vec![vec![0u8; usize_of(DISK)]; 2];
    let check = |copies: &[Vec<u8>]| -> u64 {
        let stamp = |k: u64| {
            let disk = &copies[usize::from(k % 2 == 1)];
            let at = usize_of(k * 4096);
            u64::from_le_bytes(disk[at..at + 8].try_into().unwrap())
        };
        let present: Vec<bool> = (1..=200).map(|k| stamp(k) == k).collect();
        let count = present.iter().take_while(|p| **p).count();
        assert!(
            present[count..].iter().all(|p| !p),
            "gap in the write order: {present:?}"
        );
        count as u64
    };
    for _ in 0..50 {
        group.close_cycle().unwrap();
        let cycle = group.take_closed().unwrap().unwrap();
        apply(&cycle, &mut copies);
        cycle.acknowledge().unwrap();
        check(&copies);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    apply(&cycle, &mut copies);
    cycle.acknowledge().unwrap();
    assert_eq!(check(&copies), written);
}

#[test]
fn image_failure_reads_back_or_marks_resync() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    // The image took half the write: the record is rewritten to what the image holds.
    disk.log_write(0, &[5; 100]).unwrap().image_failed(|buf| {
        buf[..50].fill(5);
        buf[50..].fill(0);
        Ok(())
    });
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let mut copy = vec![vec![0u8; usize_of(DISK)]];
    apply(&cycle, &mut copy);
    assert_eq!(&copy[0][..100], &[[5u8; 50], [0u8; 50]].concat()[..]);
    cycle.acknowledge().unwrap();
    // A failed trim can't be read back: resync.
    disk.log_zero(0, 4096, true)
        .unwrap()
        .image_failed(|_| Ok(()));
    assert_eq!(group.status().resync, Some(ResyncReason::ImageWriteError));
}

#[test]
fn cancelled_records_do_not_ship() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    disk.log_zero(0, 4096, false).unwrap().cancel();
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    assert_eq!((cycle.stats().records, cycle.stats().skipped), (0, 1));
    assert_eq!(cycle.changes().count(), 0);
}

/// A group of one disk of `size` bytes with a ring of `ring_size`, and the disk's
/// image in memory.
fn one_disk_group(
    dir: &Path,
    ring_size: u64,
    size: u64,
) -> (TrackerConfig, Group, DiskTracker, Vec<u8>) {
    let mut cfg = config(dir, ring_size, 1);
    cfg.disks[0].size = size;
    let (group, _) = Group::open(&cfg).unwrap();
    let disk = group.disk(0).unwrap();
    (cfg, group, disk, vec![0u8; usize_of(size)])
}

#[test]
fn large_writes_are_split_and_logged_whole() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    let (_, group, disk, mut image) = one_disk_group(dir.path(), 16 << 20, size);
    // 5 MiB and a bit, in a 16 MiB ring: six records, one write.
    let data: Vec<u8> = (0..(5 << 20) + 100)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    write(&disk, &mut image, 1000, &data);
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    assert_eq!(cycle.stats().records, 6);
    let mut copy = vec![vec![0u8; usize_of(size)]];
    apply(&cycle, &mut copy);
    cycle.acknowledge().unwrap();
    assert!(copy[0] == image);
    assert_eq!(group.status().mode, TrackingMode::Logging);

    // More than the ring holds: tracked by dirty map instead, never an error.
    let huge = vec![7u8; 20 << 20];
    let guard = disk.log_write(0, &huge).unwrap();
    assert!(!guard.is_logged());
    drop(guard);
    assert_eq!(group.status().resync, Some(ResyncReason::RingOverflow));
    assert_eq!(group.status().disks[0].resync_bytes, 20 << 20);
}

#[test]
fn split_write_failure_reads_back_every_piece() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 16 << 20, 1);
    cfg.disks[0].size = 8 << 20;
    let (group, _) = Group::open(&cfg).unwrap();
    let disk = group.disk(0).unwrap();
    let data = vec![3u8; (2 << 20) + 5];
    disk.log_write(7, &data).unwrap().image_failed(|buf| {
        buf.fill(4);
        Ok(())
    });
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let mut copy = vec![vec![0u8; 8 << 20]];
    apply(&cycle, &mut copy);
    assert!(copy[0][7..7 + data.len()].iter().all(|b| *b == 4));
    assert_eq!(copy[0][6], 0);
}

#[test]
fn restart_rebuilds_the_open_cycles_dirty_map() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    let mut image = vec![0u8; usize_of(DISK)];
    {
        let (group, _) = Group::open(&cfg).unwrap();
        let disk = group.disk(0).unwrap();
        write(&disk, &mut image, 0, &[1; 4096]);
        group.close_cycle().unwrap();
        write(&disk, &mut image, 65536, &[2; 8192]);
        group.shutdown_clean(&[]).unwrap();
    }
    let (group, _) = Group::open(&cfg).unwrap();
    // Cycle 1 is closed (it ships from the ring); the open cycle holds the 8 KiB.
    assert_eq!(group.status().disks[0].dirty_bytes, 8192);
    assert_eq!(
        group.disk(0).unwrap().dirty_extents(65536, 8192),
        vec![(8192, true)]
    );
}

/// A write tracked by dirty map only (ring full) is newer than the log's record of
/// the same block: after a crash the log must not be replayed over it.
#[test]
fn no_replay_over_writes_tracked_by_map_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    {
        let (group, _) = Group::open(&cfg).unwrap();
        let disk = group.disk(0).unwrap();
        drop(disk.log_write(0, &[1; 4096]).unwrap());
        // Fill the ring: the next writes are tracked by map only.
        for i in 1..100u64 {
            drop(disk.log_write((i % 200) * 4096, &[9; 65536]).unwrap());
        }
        assert_eq!(group.status().mode, TrackingMode::DirtyMap);
        let guard = disk.log_write(0, &[2; 4096]).unwrap();
        assert!(!guard.is_logged());
        // Crash without shutdown_clean.
    }
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.previous, PreviousShutdown::DaemonCrash);
    assert!(report.resync_pending && !report.needs_replay());
    assert_eq!(group.status().resync, Some(ResyncReason::RingOverflow));
}

#[test]
fn a_ring_left_blank_by_a_crash_during_creation_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    std::fs::write(
        &cfg.ring_path,
        vec![0u8; usize_of(DATA_START + MIN_RING_SIZE)],
    )
    .unwrap();
    let (_, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.records, 0);
}

/// Writes in flight while the group tracks by map hold their range: a resync waits
/// for them before it hands out the maps.
#[test]
fn resync_waits_for_writes_tracked_by_map_only() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    drop(
        disk.log_write(0, &vec![1; 5 << 20][..usize_of(DISK)])
            .unwrap(),
    );
    for _ in 0..8 {
        drop(disk.log_write(0, &vec![1; usize_of(DISK)]).unwrap());
    }
    assert_eq!(group.status().mode, TrackingMode::DirtyMap);
    let pending = disk.log_write(4096, &[3; 4096]).unwrap();
    assert!(!pending.is_logged());
    let resync = {
        let group = group.clone();
        std::thread::spawn(move || group.begin_resync().unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !resync.is_finished(),
        "begin_resync handed out maps while a write was in flight"
    );
    drop(pending);
    let maps = resync.join().unwrap();
    assert!(maps[0][1]);
}

#[test]
fn a_copy_interrupted_by_a_daemon_crash_resumes_at_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 2);
    let mut images = vec![vec![0u8; usize_of(DISK)]; 2];
    {
        let (group, _) = Group::open(&cfg).unwrap();
        group
            .request_full_resync(ResyncReason::InitialReplication)
            .unwrap();
        let maps = group.begin_resync().unwrap();
        assert!(maps.iter().all(|bits| bits.all()));
        // The consumer holds disk 0 and the first half of disk 1; writes meanwhile
        // are logged, below the position and above it.
        group.note_copy_position(1, DISK / 2).unwrap();
        let (d0, d1) = (group.disk(0).unwrap(), group.disk(1).unwrap());
        write(&d0, &mut images[0], 8192, &[5; 4096]);
        write(&d1, &mut images[1], DISK - 4096, &[6; 4096]);
        // Dropped without shutdown_clean: a daemon crash.
    }
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.previous, PreviousShutdown::DaemonCrash);
    assert!(!report.resync_pending && report.needs_replay());
    assert_eq!(group.resumable_copy(), Some((1, DISK / 2)));
    assert_eq!(
        group.resync_reason(),
        Some(ResyncReason::InitialReplication)
    );
    let maps = group.resume_copy().unwrap();
    assert_eq!(maps[0].count_ones(), 0);
    let blocks = usize_of(DISK / 4096);
    assert_eq!(maps[1].first_one(), Some(blocks / 2));
    assert_eq!(maps[1].count_ones(), blocks / 2);
    // The log kept both writes: they ship as the cycle that ends the resync.
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let mut shipped = vec![vec![0u8; usize_of(DISK)]; 2];
    apply(&cycle, &mut shipped);
    assert!(shipped == images);
    cycle.acknowledge().unwrap();
    group.finish_resync().unwrap();
    assert_eq!(group.resync_reason(), None);
    assert_eq!(group.resumable_copy(), None);
}

#[test]
fn a_copy_that_overflowed_copies_everything_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    {
        let (group, _) = Group::open(&cfg).unwrap();
        group.request_full_resync(ResyncReason::Requested).unwrap();
        group.begin_resync().unwrap();
        group.note_copy_position(0, DISK / 2).unwrap();
        let disk = group.disk(0).unwrap();
        // Overflow: the writes from here are not logged, so the position is void.
        for i in 0..100u64 {
            drop(disk.log_write((i % 8) * 65536, &[9; 65536]).unwrap());
        }
        assert_eq!(group.status().mode, TrackingMode::DirtyMap);
    }
    let (group, report) = Group::open(&cfg).unwrap();
    assert!(report.resync_pending);
    assert_eq!(group.resumable_copy(), None);
    let maps = group.resume_copy().unwrap();
    assert!(maps[0].all());
}

/// Writes refused after `refuse_writes` leave no trace; those admitted before are in
/// the next cycle closed, even while still in flight when the refusal came.
#[test]
fn refused_writes_leave_no_trace_and_admitted_ones_are_in_the_next_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let (group, _) = Group::open(&config(dir.path(), MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    let in_flight = disk.log_write(0, &[7; 4096]).unwrap();
    group.refuse_writes(true);
    assert!(matches!(
        disk.log_write(8192, &[8; 4096]),
        Err(TrackerError::WritesRefused)
    ));
    assert!(matches!(
        disk.log_zero(16384, 4096, true),
        Err(TrackerError::WritesRefused)
    ));
    drop(in_flight);
    assert_eq!(group.status().disks[0].dirty_bytes, 4096);
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let changes: Vec<(u64, u64)> = cycle.changes().map(|c| (c.offset, c.length)).collect();
    assert_eq!(changes, vec![(0, 4096)]);
    group.refuse_writes(false);
    drop(disk.log_write(8192, &[8; 4096]).unwrap());
}

/// Rewrites the ring's boot id, so the next open sees a host crash.
fn fake_host_crash(ring: &Path) {
    let mut bytes = std::fs::read(ring).unwrap();
    for slot in 0..2 {
        let at = slot * SUPERBLOCK_LEN;
        if let Ok(mut superblock) = Superblock::decode(&bytes[at..at + SUPERBLOCK_LEN]) {
            superblock.boot_id = [0xa5; 16];
            bytes[at..at + SUPERBLOCK_LEN].copy_from_slice(&superblock.encode().unwrap());
        }
    }
    std::fs::write(ring, &bytes).unwrap();
}

/// Two disks of `size` bytes, with images attached (sparse files) if `attach`.
fn open_disks(dir: &Path, size: u64, attach: bool) -> (TrackerConfig, Group) {
    let mut cfg = config(dir, MIN_RING_SIZE, 2);
    for disk in &mut cfg.disks {
        disk.size = size;
    }
    let (group, _) = Group::open(&cfg).unwrap();
    for index in (0..2).filter(|_| attach) {
        let image = dir.join(format!("disk{index}.img"));
        let file = File::create(&image).unwrap();
        file.set_len(size).unwrap();
        group.disk(index).unwrap().attach_image(file);
    }
    (cfg, group)
}

fn resync_bytes(group: &Group) -> Vec<u64> {
    group
        .status()
        .disks
        .iter()
        .map(|disk| disk.resync_bytes)
        .collect()
}

const EXTENT: u64 = 1 << activity::EXTENT_SHIFT;

/// Closes, takes and acknowledges the open cycle, as a consumer shipping it would.
fn ship_open_cycle(group: &Group) -> u64 {
    let cycle = group.close_cycle().unwrap();
    group.take_closed().unwrap().unwrap().acknowledge().unwrap();
    cycle
}

/// After a host crash only the extents written since their disk's last sync (and
/// whatever the log kept) are resynchronised, not the whole disks.
#[test]
fn a_host_crash_resyncs_only_the_active_extents() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, group) = open_disks(dir.path(), 1 << 30, true);
    let (d0, d1) = (group.disk(0).unwrap(), group.disk(1).unwrap());
    drop(d0.log_write(0, &[1; 4096]).unwrap());
    // Across an extent boundary: both extents.
    drop(d0.log_write(8 * EXTENT - 512, &[2; 1024]).unwrap());
    drop(d1.log_write(15 * EXTENT + 4096, &[3; 4096]).unwrap());
    d0.sync().unwrap();
    // Shipped: only the activity log marks these extents now.
    assert_eq!(ship_open_cycle(&group), 1);
    drop((group, d0, d1));
    fake_host_crash(&cfg.ring_path);

    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.previous, PreviousShutdown::HostCrash);
    assert!(report.resync_pending && !report.needs_replay());
    assert_eq!(
        group.resync_reason(),
        Some(ResyncReason::UncleanHostShutdown)
    );
    // Synced extents stay listed until they must make room.
    assert_eq!(resync_bytes(&group), vec![3 * EXTENT, EXTENT]);
    let maps = group.begin_resync().unwrap();
    let marked: Vec<usize> = maps[0].iter_ones().map(|block| block >> 14).collect();
    assert_eq!(marked.first(), Some(&0));
    assert!(marked.iter().all(|extent| [0, 7, 8].contains(extent)));
}

/// A write the activity log cannot list (a trim of a whole disk) marks its disk for
/// a whole resync, until it is durable.
#[test]
fn a_wide_trim_marks_its_disk_whole_until_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, group) = open_disks(dir.path(), 1 << 30, true);
    let (d0, d1) = (group.disk(0).unwrap(), group.disk(1).unwrap());
    drop(d0.log_write(0, &[1; 4096]).unwrap());
    drop(d1.log_zero(0, 1 << 30, true).unwrap());
    // Shipped: the log no longer marks the trim's range.
    ship_open_cycle(&group);
    drop((group, d0, d1));
    let crashed = dir.path().join("crashed.ring");
    std::fs::copy(&cfg.ring_path, &crashed).unwrap();
    fake_host_crash(&crashed);
    let crashed_cfg = TrackerConfig {
        ring_path: crashed,
        ..cfg.clone()
    };
    let (crashed_group, _) = Group::open(&crashed_cfg).unwrap();
    assert_eq!(resync_bytes(&crashed_group), vec![EXTENT, 1 << 30]);

    // Reopened after a daemon crash, the mark stays until disk 1 is synced.
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.previous, PreviousShutdown::DaemonCrash);
    let d1 = group.disk(1).unwrap();
    d1.attach_image(File::open(dir.path().join("disk1.img")).unwrap());
    d1.sync().unwrap();
    drop((group, d1));
    fake_host_crash(&cfg.ring_path);
    let (group, _) = Group::open(&cfg).unwrap();
    assert_eq!(resync_bytes(&group), vec![EXTENT, 0]);
}

/// When every slot holds an extent written since its disk's last sync, a write to a
/// new extent syncs that disk to make room; without an image to sync, it goes on
/// and the disk is marked whole.
#[test]
fn a_full_activity_log_syncs_to_make_room() {
    let slots = u64::try_from(activity::SLOTS).unwrap();
    let size = (slots + 8) * EXTENT;
    for attach in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, group) = open_disks(dir.path(), size, attach);
        let d0 = group.disk(0).unwrap();
        for extent in 0..=slots {
            drop(d0.log_write(extent * EXTENT, &[7; 4096]).unwrap());
        }
        drop((group, d0));
        fake_host_crash(&cfg.ring_path);
        let (group, _) = Group::open(&cfg).unwrap();
        let expected = if attach {
            // The first extent made room after a sync; the log's record marks one
            // 4 KiB block in it.
            slots * EXTENT + 4096
        } else {
            size
        };
        assert_eq!(
            resync_bytes(&group),
            vec![expected, 0],
            "attached: {attach}"
        );
    }
}

#[test]
fn throttle_pause_starts_at_the_high_water_mark_and_grows_to_its_ceiling() {
    let ring = 64 << 20;
    let usable = usable_ring(ring);
    let high_water = usable / 100 * THROTTLE_HIGH_WATER_PERCENT;
    // A bound whose quarter is below the ceiling, so the quarter applies.
    let bound = Duration::from_millis(200);
    assert_eq!(throttle_pause(0, ring, bound), Duration::ZERO);
    assert_eq!(throttle_pause(high_water, ring, bound), Duration::ZERO);
    assert!(throttle_pause(high_water + 4096, ring, bound) > Duration::ZERO);
    // Halfway from the mark to full: a quarter of the bound times (1/2)^2.
    let halfway = high_water + (usable - high_water) / 2;
    let pause = throttle_pause(halfway, ring, bound);
    assert!(
        pause.abs_diff(bound / 16) < Duration::from_micros(100),
        "{pause:?}"
    );
    assert_eq!(throttle_pause(usable, ring, bound), bound / 4);
    // Past full (the write will wait for room too): never more than the quarter.
    assert_eq!(throttle_pause(ring * 2, ring, bound), bound / 4);
    // A long bound leaves the pause at its ceiling: the rest is for waiting.
    let long = Duration::from_secs(30);
    assert_eq!(throttle_pause(usable, ring, long), MAX_THROTTLE_PAUSE);
    let pause = throttle_pause(halfway, ring, long);
    assert!(
        pause.abs_diff(MAX_THROTTLE_PAUSE / 4) < Duration::from_micros(100),
        "{pause:?}"
    );
    let mut previous = Duration::ZERO;
    for used in (high_water..=usable).step_by(64 << 10) {
        let pause = throttle_pause(used, ring, bound);
        assert!(pause >= previous, "not monotonic at {used}");
        previous = pause;
    }
}

/// A group of one disk with the smallest ring, its tracker, and the disk's image.
fn smallest_group(dir: &Path) -> (Group, DiskTracker, Vec<u8>) {
    let (group, _) = Group::open(&config(dir, MIN_RING_SIZE, 1)).unwrap();
    let disk = group.disk(0).unwrap();
    (group, disk, vec![0u8; usize_of(DISK)])
}

/// 64 KiB writes into a ring of `MIN_RING_SIZE` with no consumer, under the default
/// policy, while the next one still fits; returns how many were written.
fn fill_ring(group: &Group, disk: &DiskTracker, image: &mut [u8]) -> u64 {
    let chunk = vec![5u8; 65536];
    let mut count = 0u64;
    while group.status().ring_used + record_len(65536) <= usable_ring(MIN_RING_SIZE) {
        write(disk, image, (count * 65536) % (DISK - 65536), &chunk);
        count += 1;
    }
    assert_eq!(group.status().mode, TrackingMode::Logging);
    count
}

#[test]
fn a_throttled_write_waits_for_the_acknowledgement_that_frees_room() {
    let dir = tempfile::tempdir().unwrap();
    let (group, disk, mut image) = smallest_group(dir.path());
    fill_ring(&group, &disk, &mut image);
    // The writers left room to close the cycle that frees them.
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let bound = Duration::from_secs(20);
    group.set_on_ring_full(OnRingFull::Throttle { max_delay: bound });
    let (done, finished) = std::sync::mpsc::channel();
    let writer = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let guard = disk.log_write(DISK - 65536, &[6u8; 65536]).unwrap();
            let logged = guard.is_logged();
            drop(guard);
            done.send(started.elapsed()).unwrap();
            logged
        })
    };
    let held = Duration::from_millis(300);
    assert!(
        finished.recv_timeout(held).is_err(),
        "the write did not wait for room"
    );
    // A read of the dirty map and a sync are not held up by the waiting writer.
    assert!(!disk.dirty_extents(0, 65536).is_empty());
    disk.sync().unwrap();
    let acknowledged = Instant::now();
    cycle.acknowledge().unwrap();
    let delay = finished
        .recv_timeout(bound)
        .expect("the acknowledgement woke no writer");
    // Woken by the acknowledgement, not by the bound.
    assert!(acknowledged.elapsed() < Duration::from_secs(2));
    assert!(writer.join().unwrap(), "the throttled write was not logged");
    assert!(delay >= held && delay < bound, "{delay:?}");
    let status = group.status();
    assert_eq!(status.mode, TrackingMode::Logging);
    assert_eq!(status.resync, None);
    assert_eq!(status.throttle.writes, 1);
    assert_eq!(status.throttle.expired, 0);
    assert!(status.throttle.max_delay >= held && status.throttle.max_delay <= delay);
    assert_eq!(status.throttle.total_delay, status.throttle.max_delay);
}

#[test]
fn the_bound_expiring_falls_back_to_dirty_maps() {
    let dir = tempfile::tempdir().unwrap();
    let (group, disk, mut image) = smallest_group(dir.path());
    let written = fill_ring(&group, &disk, &mut image);
    let bound = Duration::from_millis(400);
    group.set_on_ring_full(OnRingFull::Throttle { max_delay: bound });
    // No consumer: nothing will ever free room.
    let started = Instant::now();
    let guard = disk.log_write(DISK - 65536, &[6u8; 65536]).unwrap();
    let delay = started.elapsed();
    assert!(!guard.is_logged(), "a write beyond a full ring was logged");
    image[usize_of(DISK - 65536)..].fill(6);
    drop(guard);
    assert!(
        delay >= bound && delay < bound * 5,
        "delayed {delay:?} with a bound of {bound:?}"
    );
    let status = group.status();
    assert_eq!(status.mode, TrackingMode::DirtyMap);
    assert_eq!(status.resync, Some(ResyncReason::RingOverflow));
    assert_eq!((status.throttle.writes, status.throttle.expired), (1, 1));
    // Further writes go by dirty map at once.
    let started = Instant::now();
    write(&disk, &mut image, 0, &[7u8; 4096]);
    assert!(
        started.elapsed() < bound,
        "a write was delayed after the fallback"
    );
    assert_eq!(group.status().throttle.writes, 1);
    // The resync map covers every write, logged or not.
    assert!(written > 0);
    let maps = group.begin_resync().unwrap();
    for (block, data) in image.chunks(4096).enumerate() {
        if data.iter().any(|byte| *byte != 0) {
            assert!(
                maps[0][block],
                "written block {block} not marked for resync"
            );
        }
    }
}

#[test]
fn writers_past_the_high_water_mark_are_paused_and_still_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (group, disk, mut image) = smallest_group(dir.path());
    let bound = Duration::from_secs(2);
    group.set_on_ring_full(OnRingFull::Throttle { max_delay: bound });
    let chunk = vec![8u8; 65536];
    let high_water = usable_ring(MIN_RING_SIZE) / 100 * THROTTLE_HIGH_WATER_PERCENT;
    let mut offset = 0;
    // Below the mark: no pause.
    while group.status().ring_used + record_len(65536) <= high_water {
        write(&disk, &mut image, offset, &chunk);
        offset = (offset + 65536) % (DISK - 65536);
    }
    assert_eq!(group.status().throttle.writes, 0);
    let mut expected = Duration::ZERO;
    for _ in 0..3 {
        expected += throttle_pause(
            group.status().ring_used + record_len(65536),
            MIN_RING_SIZE,
            bound,
        );
        write(&disk, &mut image, offset, &chunk);
        offset = (offset + 65536) % (DISK - 65536);
    }
    let status = group.status();
    assert_eq!(status.mode, TrackingMode::Logging);
    assert_eq!(status.throttle.writes, 3);
    assert!(
        status.throttle.total_delay >= expected && expected > Duration::ZERO,
        "{:?} < {expected:?}",
        status.throttle.total_delay
    );
    // Every write, paused or not, is in the cycle.
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let mut copy = vec![0u8; usize_of(DISK)];
    apply(&cycle, std::slice::from_mut(&mut copy));
    assert!(copy == image);
}

/// A disk added after the ring's disks joins the group marked whole for a resync; the
/// old disks keep what the log holds, and after the resync the copy equals the images.
#[test]
fn an_added_disk_is_copied_whole_by_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let one = config(dir.path(), MIN_RING_SIZE, 1);
    let mut images = vec![vec![0u8; usize_of(DISK)], vec![5u8; usize_of(DISK)]];
    let mut copies = vec![vec![0u8; usize_of(DISK)], vec![0u8; usize_of(DISK)]];
    {
        let (group, _) = Group::open(&one).unwrap();
        let disk = group.disk(0).unwrap();
        write(&disk, &mut images[0], 0, &[1; 4096]);
        group.close_cycle().unwrap();
        let cycle = group.take_closed().unwrap().unwrap();
        apply(&cycle, &mut copies[..1]);
        cycle.acknowledge().unwrap();
        // Logged and not shipped before the disk is added.
        write(&disk, &mut images[0], 8192, &[2; 4096]);
        group.shutdown_clean(&[]).unwrap();
    }
    let two = config(dir.path(), MIN_RING_SIZE, 2);
    let (group, report) = Group::open(&two).unwrap();
    assert_eq!(
        (report.previous, report.added_disks),
        (PreviousShutdown::Clean, 1)
    );
    let status = group.status();
    assert_eq!(status.resync, Some(ResyncReason::DiskAdded));
    assert_eq!(status.mode, TrackingMode::DirtyMap);
    assert_eq!(resync_bytes(&group), vec![0, DISK]);
    // Writes go on to both disks while the group waits for its consumer.
    write(&group.disk(0).unwrap(), &mut images[0], 12288, &[3; 4096]);
    write(&group.disk(1).unwrap(), &mut images[1], 4096, &[4; 4096]);
    let maps = group.begin_resync().unwrap();
    assert_eq!(maps[1].count_ones(), usize_of(DISK / 4096));
    for (index, map) in maps.iter().enumerate() {
        for block in map.iter_ones() {
            let range = block * 4096..(block + 1) * 4096;
            copies[index][range.clone()].copy_from_slice(&images[index][range]);
        }
    }
    write(&group.disk(1).unwrap(), &mut images[1], 0, &[6; 4096]);
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    apply(&cycle, &mut copies);
    cycle.acknowledge().unwrap();
    group.finish_resync().unwrap();
    assert!(copies == images);
    group.shutdown_clean(&[]).unwrap();
    drop(group);
    // The ring now tracks both disks: reopening with them adds nothing.
    let (_, report) = Group::open(&two).unwrap();
    assert_eq!(report.added_disks, 0);
}

/// Disks can only be added after the ring's: removing, renaming or reordering is a
/// configuration the ring refuses, and a refused open changes nothing.
#[test]
fn disks_cannot_be_removed_or_reordered() {
    let dir = tempfile::tempdir().unwrap();
    let two = config(dir.path(), MIN_RING_SIZE, 2);
    Group::open(&two).unwrap().0.shutdown_clean(&[]).unwrap();
    let mut reordered = two.clone();
    reordered.disks.reverse();
    let mut renamed = two.clone();
    renamed.disks[0].name = "other".into();
    for refused in [config(dir.path(), MIN_RING_SIZE, 1), reordered, renamed] {
        let Err(error) = Group::open(&refused) else {
            panic!("a ring opened with disks removed, renamed or reordered");
        };
        assert!(
            matches!(error, TrackerError::RingMismatch { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("only be added"), "{error}");
    }
    let (_, report) = Group::open(&two).unwrap();
    assert_eq!(
        (report.previous, report.added_disks),
        (PreviousShutdown::Clean, 0)
    );
}

/// A resync pending at a clean shutdown keeps its saved map for the old disks when a
/// disk is added (not every block of every disk).
#[test]
fn a_pending_resync_keeps_its_map_when_a_disk_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let one = config(dir.path(), MIN_RING_SIZE, 1);
    {
        let (group, _) = Group::open(&one).unwrap();
        let mut image = vec![0u8; usize_of(DISK)];
        let chunk = vec![9u8; 65536];
        for i in 0..96u64 {
            write(&group.disk(0).unwrap(), &mut image, (i % 4) * 65536, &chunk);
        }
        assert_eq!(group.status().resync, Some(ResyncReason::RingOverflow));
        group.shutdown_clean(&[]).unwrap();
    }
    let (group, report) = Group::open(&config(dir.path(), MIN_RING_SIZE, 2)).unwrap();
    assert_eq!(report.added_disks, 1);
    assert_eq!(group.status().resync, Some(ResyncReason::RingOverflow));
    assert_eq!(resync_bytes(&group), vec![4 * 65536, DISK]);
}

/// A large record commits with its marker (no payload CRC): it is replayed after a
/// daemon crash, and without its marker (a crash between payload and marker) it is
/// withdrawn.
#[test]
fn a_large_record_commits_with_its_marker() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    let large = vec![0x5a; WHOLE_PAYLOAD_MAX * 2];
    let image = log_then_crash(&cfg, &[(0, large.clone()), (1 << 18, large.clone())]);
    let bytes = std::fs::read(&cfg.ring_path).unwrap();
    let first = usize_of(DATA_START) + COMMIT_CRC_AT;
    let stored = u32::from_le_bytes(bytes[first..first + 4].try_into().unwrap());
    assert_eq!(stored, crate::record::commit_marker(1));
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!((report.records, report.uncommitted), (2, 0));
    let mut replayed = vec![0u8; usize_of(DISK)];
    apply(
        &group.recovery_view().unwrap(),
        std::slice::from_mut(&mut replayed),
    );
    assert!(replayed == image);
    drop(group);
    // The second record's marker never written: the write was never acknowledged.
    let mut bytes = std::fs::read(&cfg.ring_path).unwrap();
    let second = usize_of(DATA_START + record_len(u32::try_from(large.len()).unwrap()));
    bytes[second + COMMIT_CRC_AT..second + COMMIT_CRC_AT + 4].fill(0);
    std::fs::write(&cfg.ring_path, &bytes).unwrap();
    let (_, report) = Group::open(&cfg).unwrap();
    assert_eq!((report.records, report.uncommitted), (1, 1));
}

/// Records written into a ring whose pages were evicted fill their last page with
/// zeroes (so no write reads a page from the disk first), and log, shipping and
/// crash recovery stay right.
#[test]
fn records_fill_their_last_page_when_the_ring_is_not_cached() {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), MIN_RING_SIZE, 1);
    let mut image = vec![0u8; usize_of(DISK)];
    let mut copy = image.clone();
    {
        let (group, _) = Group::open(&cfg).unwrap();
        let disk = group.disk(0).unwrap();
        write(&disk, &mut image, 0, &[1; 4096]);
        // Synced, then evicted, as memory pressure would: unmapped from this process
        // (the scan at open mapped what it read), then dropped from the page cache.
        disk.sync().unwrap();
        let map = &group.shared.map;
        // SAFETY: a shared, read-only mapping of the ring file: MADV_DONTNEED only
        // drops this process's page table entries, and the next access faults the
        // page back in from the file. Nothing holds a reference into the mapping.
        let unmapped =
            unsafe { libc::madvise(map.as_mut_ptr().cast(), map.len(), libc::MADV_DONTNEED) };
        assert_eq!(unmapped, 0);
        let ring = File::open(&cfg.ring_path).unwrap();
        nix::fcntl::posix_fadvise(
            ring.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        if group.shared.page_cached(DATA_START + 8192) {
            println!("skipped: this file system keeps the ring's pages cached (tmpfs?)");
            return;
        }
        let before = group.shared.page_fills.load(Relaxed);
        write(&disk, &mut image, 8192, &[2; 4096]);
        write(&disk, &mut image, 65536, &vec![3; 200_000]);
        write(&disk, &mut image, 4096, &[4; 512]);
        assert!(group.shared.page_fills.load(Relaxed) >= before + 2);
        group.close_cycle().unwrap();
        let cycle = group.take_closed().unwrap().unwrap();
        apply(&cycle, std::slice::from_mut(&mut copy));
        assert!(copy == image, "the cycle does not rebuild the image");
        // Unacknowledged, then a crash.
    }
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.uncommitted, 0);
    let mut replayed = vec![0u8; usize_of(DISK)];
    apply(
        &group.recovery_view().unwrap(),
        std::slice::from_mut(&mut replayed),
    );
    assert!(replayed == image, "recovery does not rebuild the image");
}

/// KiB of `path`'s mappings resident in this process's page tables (`Rss` of
/// /proc/self/smaps).
fn mapped_kib(path: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.to_str().unwrap();
    let mut in_mapping = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if !first.ends_with(':') {
            // A mapping's first line: its address range, ..., its file.
            in_mapping = line.ends_with(name);
        } else if in_mapping && first == "Rss:" {
            let value = line.trim_start_matches("Rss:").trim();
            kib += value.trim_end_matches(" kB").parse::<u64>().unwrap();
        }
    }
    kib
}

#[test]
fn acknowledged_records_leave_the_consumers_page_tables() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16u64 << 20;
    let (cfg, group, disk, mut image) = one_disk_group(dir.path(), 16 << 20, size);
    for piece in 0..8u8 {
        write(&disk, &mut image, u64::from(piece) << 20, &[piece; 1 << 20]);
    }
    group.close_cycle().unwrap();
    let cycle = group.take_closed().unwrap().unwrap();
    let mut copy = vec![vec![0u8; usize_of(size)]];
    // Reading the records maps their pages.
    apply(&cycle, &mut copy);
    assert!(copy[0] == image);
    let read = mapped_kib(&cfg.ring_path);
    assert!(read >= 8 << 10, "{read} KiB mapped after reading 8 MiB");
    cycle.acknowledge().unwrap();
    let acknowledged = mapped_kib(&cfg.ring_path);
    assert!(acknowledged < 1 << 10, "{acknowledged} KiB still mapped");
    // The bytes stay in the file: a restart reads the ring as before.
    drop(disk);
    drop(group);
    let (group, report) = Group::open(&cfg).unwrap();
    assert_eq!(report.records, 0);
    drop(group);
}
