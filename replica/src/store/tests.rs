#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tracker::{Change, ChangeData};
use wire::api::{DiskInfo, RecoveryPolicy, TransferKind, TransferOffer};
use wire::chunk::{CheckedFrame, ChunkEncoder, Codec, RawChunk};

use super::*;

const MIB: u64 = 1 << 20;
/// What tests offer when the size is not the point: more than any of them sends.
const OFFERED: u64 = 64 * MIB;
/// The relationship the tests' replicas belong to, at the first epoch.
const OWNER: Claim = Claim {
    relationship: 42,
    epoch: FIRST_EPOCH,
};

fn state() -> ReplicaState {
    ReplicaState::new(
        "vm1".into(),
        "dc1".into(),
        OWNER,
        "primary".into(),
        "primary.example.com".into(),
        vec![
            DiskInfo {
                name: "a".into(),
                size: 8 * MIB,
            },
            DiskInfo {
                name: "b".into(),
                size: 4 * MIB,
            },
        ],
    )
}

fn frames(id: u64, changes: &[Change<'_>]) -> Vec<Vec<u8>> {
    let mut encoder = ChunkEncoder::new(id);
    let mut out = Vec::new();
    let mut emit = |raw: RawChunk<'_>| -> Result<(), ()> {
        let mut frame = Vec::new();
        raw.frame_into(Some(Codec::Deflate { level: 1 }), &mut frame);
        out.push(frame);
        Ok(())
    };
    for change in changes {
        encoder.push(change, &mut emit).unwrap();
    }
    encoder.finish(&mut emit).unwrap();
    out
}

fn write(disk: usize, offset: u64, data: &[u8]) -> Change<'_> {
    Change {
        disk,
        offset,
        length: data.len() as u64,
        data: ChangeData::Write(data),
    }
}

/// Offers, sends and commits a transfer.
fn send(replica: &mut Replica, id: u64, kind: TransferKind, changes: &[Change<'_>]) {
    let bytes = frames(id, changes)
        .iter()
        .map(|frame| u64::from(CheckedFrame::check(frame).unwrap().header.raw_len))
        .sum();
    let answer = replica
        .offer(OWNER, &TransferOffer { id, kind, bytes })
        .unwrap();
    assert!(!answer.committed);
    let frames = frames(id, changes);
    for (i, frame) in frames.iter().enumerate().skip(answer.have_chunks as usize) {
        replica.put_chunk(OWNER, id, i as u32, frame).unwrap();
    }
    replica.commit(OWNER, id, frames.len() as u32).unwrap();
}

fn resync(epoch: u64, batch: u32, last: bool) -> TransferKind {
    TransferKind::Resync { epoch, batch, last }
}

fn apply_all(replica: &mut Replica) {
    let disks = replica.open_disks().unwrap();
    while replica.apply_next(&disks).unwrap().is_some() {}
}

fn disk(replica: &Replica, name: &str) -> Vec<u8> {
    fs::read(replica.disk_path(name)).unwrap()
}

#[test]
fn initial_copy_then_deltas_make_the_replica_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = Replica::create(&path, state(), 0).unwrap();
    assert_eq!(disk(&replica, "a").len() as u64, 8 * MIB);

    // Delta before the initial copy: the chain has no start.
    let early = replica.offer(
        OWNER,
        &TransferOffer {
            id: 1,
            kind: TransferKind::delta(1),
            bytes: 0,
        },
    );
    assert!(matches!(early, Err(StoreError::ChainBroken(_))));

    let big = vec![7u8; 3 * MIB as usize];
    send(&mut replica, 100, resync(9, 0, false), &[write(0, 0, &big)]);
    send(
        &mut replica,
        101,
        resync(9, 1, true),
        &[write(1, MIB, b"second batch")],
    );
    apply_all(&mut replica);
    assert!(!replica.state().consistent, "fuzzy until the next delta");

    send(
        &mut replica,
        5,
        TransferKind::delta(5),
        &[write(0, 10, b"delta")],
    );
    apply_all(&mut replica);
    assert!(replica.state().consistent);
    assert_eq!(replica.state().last_applied_cycle, Some(5));
    let a = disk(&replica, "a");
    assert_eq!(&a[10..15], b"delta");
    assert!(a[15..3 * MIB as usize].iter().all(|&b| b == 7));
    assert_eq!(
        &disk(&replica, "b")[MIB as usize..MIB as usize + 12],
        b"second batch"
    );

    // The chain: 6 is next; 5 again is a retry; 8 breaks it.
    let retry = replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 5,
                kind: TransferKind::delta(5),
                bytes: 0,
            },
        )
        .unwrap();
    assert!(retry.committed);
    let gap = replica.offer(
        OWNER,
        &TransferOffer {
            id: 8,
            kind: TransferKind::delta(8),
            bytes: 0,
        },
    );
    assert!(matches!(gap, Err(StoreError::ChainBroken(_))));
    send(&mut replica, 6, TransferKind::delta(6), &[]);
    // A stranger's relationship is refused.
    let offer = TransferOffer {
        id: 7,
        kind: TransferKind::delta(7),
        bytes: 0,
    };
    let other = replica.offer(
        Claim {
            relationship: 7,
            ..OWNER
        },
        &offer,
    );
    assert!(matches!(other, Err(StoreError::OtherRelationship(_))));
    // The owner from a later epoch than the replica's: not the copy it left.
    let newer = replica.offer(Claim { epoch: 2, ..OWNER }, &offer);
    assert!(
        matches!(&newer, Err(StoreError::OtherRelationship(m)) if m.contains("epoch 1, older than its primary's 2")),
        "{newer:?}"
    );
}

#[test]
fn an_interrupted_transfer_resumes_after_its_last_valid_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = Replica::create(&path, state(), 0).unwrap();
    let data: Vec<u8> = (0..5 * MIB as usize).map(|i| (i % 251) as u8).collect();
    let changes = [write(0, 0, &data)];
    let all = frames(77, &changes);
    assert!(all.len() >= 3);
    let kind = resync(1, 0, true);
    replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 77,
                kind,
                bytes: OFFERED,
            },
        )
        .unwrap();
    replica.put_chunk(OWNER, 77, 0, &all[0]).unwrap();
    replica.put_chunk(OWNER, 77, 1, &all[1]).unwrap();
    // A chunk the primary gave up on that arrives late is already stored.
    assert_eq!(replica.put_chunk(OWNER, 77, 1, &all[1]).unwrap(), 2);
    // Out of order and corrupt chunks are refused and store nothing.
    assert!(matches!(
        replica.put_chunk(OWNER, 77, 3, &all[2]),
        Err(StoreError::Conflict(_))
    ));
    let mut bad = all[2].clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        replica.put_chunk(OWNER, 77, 2, &bad),
        Err(StoreError::Chunk(_))
    ));
    let offer = TransferOffer {
        id: 77,
        kind,
        bytes: OFFERED,
    };
    // A retry learns where the stored data ends: inside the split write.
    let before = replica.offer(OWNER, &offer).unwrap();
    assert_eq!(before.have_chunks, 2);
    let stored = before.resume_from.unwrap();
    assert_eq!(stored.disk, 0);
    assert!(
        stored.offset > 2 * MIB && stored.offset < 4 * MIB,
        "{stored:?}"
    );
    // The same id offered as another kind starts afresh rather than mixing data.
    let other = TransferOffer {
        kind: resync(1, 0, false),
        ..offer
    };
    assert_eq!(replica.offer(OWNER, &other).unwrap().have_chunks, 0);
    replica.offer(OWNER, &offer).unwrap();
    replica.put_chunk(OWNER, 77, 0, &all[0]).unwrap();
    replica.put_chunk(OWNER, 77, 1, &all[1]).unwrap();
    // A crash left half a frame behind.
    let part = path.join("incoming").join(format!("{:016x}.part", 77));
    let mut file = OpenOptions::new().append(true).open(&part).unwrap();
    file.write_all(&all[2][..1000]).unwrap();
    drop(replica);

    let mut replica = Replica::open(&path, 0).unwrap();
    let answer = replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 77,
                kind,
                bytes: OFFERED,
            },
        )
        .unwrap();
    assert_eq!(answer.have_chunks, 2);
    assert_eq!(answer.resume_from, Some(stored));
    for (i, frame) in all.iter().enumerate().skip(2) {
        replica.put_chunk(OWNER, 77, i as u32, frame).unwrap();
    }
    replica.commit(OWNER, 77, all.len() as u32).unwrap();
    // Offered again after the commit: the whole batch is there.
    let again = replica.offer(OWNER, &offer).unwrap();
    assert!(again.committed);
    assert_eq!(
        again.resume_from,
        Some(Position {
            disk: 0,
            offset: data.len() as u64
        })
    );
    apply_all(&mut replica);
    assert_eq!(&disk(&replica, "a")[..data.len()], &data[..]);
}

#[test]
fn an_apply_cut_short_is_redone_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = Replica::create(&path, state(), 0).unwrap();
    send(
        &mut replica,
        1,
        resync(1, 0, true),
        &[write(0, 0, &[1u8; 4096])],
    );
    send(
        &mut replica,
        2,
        TransferKind::delta(1),
        &[
            write(0, 0, &[2u8; 4096]),
            Change {
                disk: 1,
                offset: 0,
                length: MIB,
                data: ChangeData::Zero,
            },
        ],
    );
    apply_all(&mut replica);
    let expected = (disk(&replica, "a"), disk(&replica, "b"));
    send(
        &mut replica,
        3,
        TransferKind::delta(2),
        &[write(0, 4096, &[3u8; 4096])],
    );
    // Apply the writes by hand, as a crashed apply would have, without recording it.
    let disks = replica.open_disks().unwrap();
    disks[0]
        .apply(4096, 4096, ChangeData::Write(&[3u8; 4096]))
        .unwrap();
    drop(replica);
    let mut replica = Replica::open(&path, 0).unwrap();
    assert_eq!(replica.state().last_applied_cycle, Some(1));
    apply_all(&mut replica);
    assert_eq!(replica.state().last_applied_cycle, Some(2));
    let a = disk(&replica, "a");
    assert_eq!(&a[..4096], &expected.0[..4096]);
    assert!(a[4096..8192].iter().all(|&b| b == 3));
    assert!(replica.state().consistent);
}

/// Applies the next transfer as the applier does, and stops before the sync: what a
/// crash right after an apply leaves.
fn apply_without_sync(replica: &mut Replica) {
    let (next, path) = replica.begin_apply().unwrap().unwrap();
    let disks = replica.disks_for_apply().unwrap();
    let history = replica.history();
    let applied = apply_transfer(&path, next.id, next.chunks, &disks, &history).unwrap();
    replica.finish_apply(next, applied.written).unwrap();
}

/// Writes `byte` over `length` bytes at `offset` of disk `name` of the closed replica
/// in `path`, as if the device had not kept what the page cache held.
fn lose_writes(path: &Path, name: &str, offset: u64, length: usize, byte: u8) {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new()
        .write(true)
        .open(path.join("disks").join(format!("{name}.img")))
        .unwrap();
    file.write_all_at(&vec![byte; length], offset).unwrap();
    file.sync_all().unwrap();
}

fn received_files(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path.join("received"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn transfers_applied_but_not_synced_are_written_again_on_restart_without_new_undo_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 8, 1);
    send(
        &mut replica,
        11,
        stamped(1, 10, false),
        &[write(0, 0, &[0x11; 8192])],
    );
    apply_all(&mut replica);
    assert!(replica.state().unsynced.is_empty(), "synced once idle");
    assert!(received_files(&path).is_empty());
    assert!(
        path.join("spare.part").exists(),
        "the newest file is the spare"
    );

    send(
        &mut replica,
        12,
        stamped(2, 20, false),
        &[write(0, 0, &[0x22; 4096])],
    );
    send(
        &mut replica,
        13,
        stamped(3, 30, false),
        &[write(0, 4096, &[0x33; 4096])],
    );
    apply_without_sync(&mut replica);
    assert!(
        !replica.sync_due(),
        "transfer 13 waits: no sync between the two"
    );
    apply_without_sync(&mut replica);
    assert!(replica.sync_due());
    assert_eq!(replica.unsynced(), vec![12, 13]);
    assert_eq!(received_files(&path).len(), 2, "kept as the redo log");
    let points: Vec<(u64, Vec<u8>)> = replica
        .recovery_points()
        .iter()
        .filter(|p| !p.latest)
        .map(|p| (p.id, point_disk(&replica, p.id, 0)))
        .collect();
    assert!(points.len() >= 2, "{points:?}");
    let expected = disk(&replica, "a");
    assert_eq!(&expected[..8192], [[0x22u8; 4096], [0x33; 4096]].concat());

    // The host crashes: the device holds the disk as it was before both.
    drop(replica);
    lose_writes(&path, "a", 0, 8192, 0x11);
    let replica = Replica::open(&path, 0).unwrap();
    assert_eq!(disk(&replica, "a"), expected, "redone in order");
    assert!(replica.state().unsynced.is_empty());
    assert!(received_files(&path).is_empty());
    assert_eq!(replica.state().last_applied_cycle, Some(3));
    assert!(replica.state().consistent);
    // Undo data was not captured again from the disk as the crash left it.
    for (id, before) in &points {
        assert_eq!(&point_disk(&replica, *id, 0), before, "point {id}");
    }
}

#[test]
fn a_failover_syncs_first_so_no_redo_writes_over_its_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 8, 1);
    apply_cycles(&mut replica, 2, |_| 0);
    let at_two = disk(&replica, "a");
    send(
        &mut replica,
        13,
        stamped(3, 30, false),
        &[write(0, 0, &[3u8; 4096])],
    );
    apply_without_sync(&mut replica);
    let point_two = replica
        .recovery_points()
        .iter()
        .find(|p| p.cycle == 2 && !p.latest)
        .unwrap()
        .id;
    assert_eq!(replica.unsynced(), vec![13]);
    replica.fail_over(Some(point_two), false).unwrap();
    assert!(replica.state().unsynced.is_empty());
    assert_eq!(disk(&replica, "a"), at_two);
    drop(replica);
    let replica = Replica::open(&path, 0).unwrap();
    assert_eq!(disk(&replica, "a"), at_two, "the roll-back stays");
}

#[test]
fn changes_outside_the_disks_are_refused_on_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("vm1"), state(), 0).unwrap();
    replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 1,
                kind: resync(1, 0, true),
                bytes: OFFERED,
            },
        )
        .unwrap();
    let beyond = frames(1, &[write(1, 4 * MIB - 2, b"abc")]);
    assert!(matches!(
        replica.put_chunk(OWNER, 1, 0, &beyond[0]),
        Err(StoreError::Apply(_))
    ));
    let no_disk = frames(1, &[write(2, 0, b"abc")]);
    assert!(matches!(
        replica.put_chunk(OWNER, 1, 0, &no_disk[0]),
        Err(StoreError::Apply(_))
    ));
    assert_eq!(replica.part_chunks, 0);
}

#[test]
fn a_full_replica_refuses_transfers_it_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::create(&dir.path().join("vm1"), state(), u64::MAX / 2).unwrap();
    let offer = TransferOffer {
        id: 1,
        kind: resync(1, 0, true),
        bytes: OFFERED,
    };
    let refused = replica.offer(OWNER, &offer).unwrap_err();
    assert!(refused.is_no_space(), "{refused}");
    replica.set_paused(true).unwrap();
    assert!(matches!(
        replica.offer(OWNER, &offer),
        Err(StoreError::Paused(_))
    ));
}

fn stamped(cycle: u64, secs: u64, app_consistent: bool) -> TransferKind {
    TransferKind::Delta {
        cycle,
        closed_unix_ms: 1_700_000_000_000 + secs * 1000,
        app_consistent,
    }
}

/// A replica keeping `points` points `spacing_secs` apart, its initial copy received.
fn keeping_points(path: &Path, points: u32, spacing_secs: u64) -> Replica {
    let mut replica = Replica::create(path, state(), 0).unwrap();
    replica
        .set_recovery(RecoveryPolicy {
            points,
            spacing_secs,
        })
        .unwrap();
    send(
        &mut replica,
        1,
        resync(1, 0, true),
        &[write(0, 0, &[1u8; 8192])],
    );
    replica
}

/// Sends and applies cycles `1..=cycles` (transfers 11, 12...), each writing 4 KiB of
/// its own number to disk 0 at `offset(cycle)`.
fn apply_cycles(replica: &mut Replica, cycles: u64, offset: impl Fn(u64) -> u64) {
    for cycle in 1..=cycles {
        send(
            replica,
            10 + cycle,
            stamped(cycle, cycle * 10, false),
            &[write(0, offset(cycle), &[cycle as u8; 4096])],
        );
        apply_all(replica);
    }
}

/// Disk `disk` as recovery point `id` has it.
fn point_disk(replica: &Replica, id: u64, disk: usize) -> Vec<u8> {
    let name = &replica.state().disks[disk].name;
    let path = replica.disk_path(name);
    let file = File::open(&path).unwrap();
    let mut out = vec![0u8; replica.state().disks[disk].size as usize];
    replica
        .history()
        .read()
        .read_at(id, disk, (&file, &path), &mut out, 0)
        .unwrap();
    out
}

#[test]
fn points_are_spaced_aged_out_and_keep_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 2, 60);
    apply_all(&mut replica);
    // (cycle, seconds, app-consistent): points at 0, 61, 62 (app), 130, 200.
    let deltas = [
        (1, 0, false),
        (2, 30, false),
        (3, 61, false),
        (4, 62, true),
        (5, 130, false),
        (6, 200, false),
    ];
    let mut states = BTreeMap::new();
    for (cycle, secs, app) in deltas {
        let byte = 10 + cycle as u8;
        send(
            &mut replica,
            100 + cycle,
            stamped(cycle, secs, app),
            &[
                write(0, cycle * 4096, &[byte; 4096]),
                write(0, 0, &[byte; 100]),
                write(1, MIB + cycle * 512, &[byte; 512]),
            ],
        );
        apply_all(&mut replica);
        states.insert(cycle, (disk(&replica, "a"), disk(&replica, "b")));
    }
    let kept: Vec<u64> = replica
        .state()
        .points
        .iter()
        .map(|p| p.stamp.cycle)
        .collect();
    assert_eq!(kept, vec![4, 5, 6], "two points besides the latest");
    for point in replica.state().points.clone() {
        let (a, b) = &states[&point.stamp.cycle];
        assert!(point_disk(&replica, point.id, 0) == *a, "point {point:?}");
        assert!(point_disk(&replica, point.id, 1) == *b, "point {point:?}");
    }
    // The newest point is the latest: listed once.
    let listed = replica.recovery_points();
    assert_eq!(
        listed
            .iter()
            .map(|p| (p.cycle, p.latest))
            .collect::<Vec<_>>(),
        vec![(4, false), (5, false), (6, true)]
    );
    assert!(listed[0].size > 0);

    // More points kept from now on; reopening keeps them readable.
    replica
        .set_recovery(RecoveryPolicy {
            points: 24,
            spacing_secs: 60,
        })
        .unwrap();
    send(
        &mut replica,
        107,
        stamped(7, 210, true),
        &[write(0, 0, &[77u8; 4096])],
    );
    apply_all(&mut replica);
    states.insert(7, (disk(&replica, "a"), disk(&replica, "b")));
    drop(replica);
    let mut replica = Replica::open(&path, 0).unwrap();
    let kept: Vec<u64> = replica
        .state()
        .points
        .iter()
        .map(|p| p.stamp.cycle)
        .collect();
    assert_eq!(
        kept,
        vec![4, 5, 6, 7],
        "an application-consistent cycle is always a point"
    );
    for point in replica.state().points.clone() {
        assert!(point_disk(&replica, point.id, 0) == states[&point.stamp.cycle].0);
    }
    assert!(replica.recovery_points().last().unwrap().app_consistent);

    // Fewer points: the oldest go at once, and their undo files with them.
    replica
        .set_recovery(RecoveryPolicy {
            points: 1,
            spacing_secs: 60,
        })
        .unwrap();
    assert_eq!(replica.state().points.len(), 2, "one besides the latest's");
    assert_eq!(fs::read_dir(path.join("history")).unwrap().count(), 2);
    assert!(replica
        .set_recovery(RecoveryPolicy {
            points: 25,
            spacing_secs: 60
        })
        .is_err());
}

#[test]
fn a_resync_keeps_the_last_consistent_state_as_a_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 4, 3600);
    send(
        &mut replica,
        2,
        stamped(1, 0, false),
        &[write(0, 0, &[2u8; 100])],
    );
    send(
        &mut replica,
        3,
        stamped(2, 10, false),
        &[write(0, 4096, &[3u8; 100])],
    );
    apply_all(&mut replica);
    let before = disk(&replica, "a");
    // A resync (after an overflow, say) rewrites blocks: the state of cycle 2 stays a
    // point, although spacing would not have taken one.
    send(
        &mut replica,
        4,
        resync(2, 0, true),
        &[write(0, 0, &[9u8; 16384])],
    );
    apply_all(&mut replica);
    assert!(
        replica.recovery_points().iter().all(|p| !p.latest),
        "no latest while fuzzy"
    );
    let point = *replica.state().points.last().unwrap();
    assert_eq!(point.stamp.cycle, 2);
    assert!(point_disk(&replica, point.id, 0) == before);
    send(&mut replica, 5, stamped(3, 20, false), &[]);
    apply_all(&mut replica);
    assert_eq!(replica.recovery_points().last().unwrap().cycle, 3);
}

#[test]
fn failover_fences_the_primary_and_rolls_back_to_the_point_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 8, 1);
    let mut states = BTreeMap::new();
    for cycle in 1..=4u64 {
        let byte = cycle as u8 * 16;
        send(
            &mut replica,
            10 + cycle,
            stamped(cycle, cycle * 10, false),
            &[
                write(0, cycle * 8192, &[byte; 8192]),
                write(1, 0, &[byte; 3000]),
            ],
        );
        apply_all(&mut replica);
        states.insert(cycle, (disk(&replica, "a"), disk(&replica, "b")));
    }
    let point_of = |replica: &Replica, cycle: u64| {
        replica
            .recovery_points()
            .iter()
            .find(|p| p.cycle == cycle && !p.latest)
            .unwrap()
            .id
    };
    // A transfer committed but not applied belongs to the latest point: wait for it.
    send(
        &mut replica,
        15,
        stamped(5, 50, false),
        &[write(0, 0, &[5u8; 512])],
    );
    assert!(matches!(
        replica.fail_over(None, false),
        Err(StoreError::Busy(_))
    ));
    apply_all(&mut replica);
    states.insert(5, (disk(&replica, "a"), disk(&replica, "b")));

    let to_two = point_of(&replica, 2);
    assert_eq!(
        (replica.info().epoch, replica.info().role),
        (1, Role::Replica)
    );
    let failover = replica.fail_over(Some(to_two), false).unwrap();
    assert_eq!(failover.stamp.cycle, 2);
    assert_eq!(
        (replica.info().epoch, replica.info().role),
        (2, Role::Primary)
    );
    assert!(disk(&replica, "a") == states[&2].0 && disk(&replica, "b") == states[&2].1);
    // The former primary is refused, and told why.
    let refused = replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 99,
                kind: stamped(6, 60, false),
                bytes: OFFERED,
            },
        )
        .unwrap_err();
    assert!(matches!(refused, StoreError::Superseded(_)), "{refused}");
    assert!(refused.to_string().contains("superseded"), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("live copy at epoch 2: this primary (epoch 1)"),
        "{refused}"
    );

    // Until completed another point may be chosen, later or earlier.
    let to_four = point_of(&replica, 4);
    replica.fail_over(Some(to_four), false).unwrap();
    assert!(disk(&replica, "a") == states[&4].0 && disk(&replica, "b") == states[&4].1);
    let to_one = point_of(&replica, 1);
    replica.fail_over(Some(to_one), false).unwrap();
    assert!(disk(&replica, "a") == states[&1].0);
    // Changing the point is the same failover: one epoch.
    assert_eq!(replica.info().epoch, 2);
    let latest_before = replica
        .recovery_points()
        .iter()
        .find(|p| p.cycle == 5)
        .unwrap()
        .id;
    replica.fail_over(Some(latest_before), false).unwrap();
    assert!(disk(&replica, "a") == states[&5].0 && disk(&replica, "b") == states[&5].1);

    let done = replica.complete_failover().unwrap();
    assert!(done.completed);
    assert!(replica.state().points.is_empty());
    assert_eq!(fs::read_dir(path.join("history")).unwrap().count(), 0);
    assert!(matches!(
        replica.fail_over(None, false),
        Err(StoreError::Conflict(_))
    ));
    // Fencing survives a restart.
    drop(replica);
    let mut replica = Replica::open(&path, 0).unwrap();
    assert!(matches!(
        replica.offer(
            OWNER,
            &TransferOffer {
                id: 98,
                kind: stamped(6, 60, false),
                bytes: OFFERED
            }
        ),
        Err(StoreError::Superseded(_))
    ));
}

#[test]
fn handing_back_makes_the_live_disks_a_copy_only_a_newer_epoch_can_claim() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 8, 1);
    apply_cycles(&mut replica, 3, |cycle| cycle * 4096);
    assert!(matches!(replica.hand_back(), Err(StoreError::Conflict(_))));
    replica.fail_over(None, true).unwrap();
    assert!(!replica.state().points.is_empty());
    let disks = (disk(&replica, "a"), disk(&replica, "b"));

    replica.hand_back().unwrap();
    let info = replica.info();
    assert_eq!((info.role, info.epoch), (Role::Replica, 3));
    assert!(replica.is_unclaimed() && !info.consistent && info.failover.is_none());
    assert!(
        info.recovery_points.is_empty(),
        "{:?}",
        info.recovery_points
    );
    assert_eq!(info.recovery.points, 8, "the policy stays");
    assert_eq!(fs::read_dir(path.join("history")).unwrap().count(), 0);
    assert!((disk(&replica, "a"), disk(&replica, "b")) == disks);
    // Never below the epoch after this side's own failover.
    drop(replica);
    let mut replica = Replica::open(&path, 0).unwrap();
    assert_eq!(replica.info().epoch, 3);

    // The live group this side had (epoch 2) cannot claim it; the new primary can.
    let old = replica.claim(
        Claim {
            relationship: 7,
            epoch: 2,
        },
        "b",
        "b",
    );
    assert!(
        matches!(&old, Err(StoreError::Superseded(m)) if m.contains("epoch 3")),
        "{old:?}"
    );
    replica
        .claim(
            Claim {
                relationship: 8,
                epoch: 3,
            },
            "a",
            "a",
        )
        .unwrap();
    replica
        .check_relationship(Claim {
            relationship: 8,
            epoch: 3,
        })
        .unwrap();
}

#[test]
fn epochs_never_wrap_and_a_claim_is_at_most_one_failover_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 0, 1);
    send(&mut replica, 2, stamped(1, 10, false), &[write(0, 0, b"x")]);
    apply_all(&mut replica);
    replica.fail_over(None, true).unwrap();
    replica.hand_back().unwrap();
    assert_eq!(replica.info().epoch, 3);
    let claim = |epoch| Claim {
        relationship: 9,
        epoch,
    };
    for too_far in [5, MAX_EPOCH + 1, u64::MAX] {
        let refused = replica.claim(claim(too_far), "a", "a");
        assert!(
            matches!(&refused, Err(StoreError::OtherRelationship(m)) if m.contains("cannot claim")),
            "{too_far}: {refused:?}"
        );
    }
    replica.claim(claim(4), "a", "a").unwrap();
    assert_eq!(replica.info().epoch, 4);

    // A replica at the last epoch cannot fail over again rather than wrap to 0.
    let last = dir.path().join("last");
    let mut state = state();
    state.epoch = MAX_EPOCH;
    let mut replica = Replica::create(&last, state, 0).unwrap();
    let at_last = Claim {
        relationship: OWNER.relationship,
        epoch: MAX_EPOCH,
    };
    replica
        .offer(
            at_last,
            &TransferOffer {
                id: 1,
                kind: resync(1, 0, true),
                bytes: OFFERED,
            },
        )
        .unwrap();
    let frames = frames(1, &[write(0, 0, b"x")]);
    replica.put_chunk(at_last, 1, 0, &frames[0]).unwrap();
    replica.commit(at_last, 1, 1).unwrap();
    let delta = TransferOffer {
        id: 2,
        kind: stamped(1, 10, false),
        bytes: OFFERED,
    };
    replica.offer(at_last, &delta).unwrap();
    let frames = self::frames(2, &[write(0, 0, b"y")]);
    replica.put_chunk(at_last, 2, 0, &frames[0]).unwrap();
    replica.commit(at_last, 2, 1).unwrap();
    apply_all(&mut replica);
    let refused = replica.fail_over(None, false);
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("is the last one")),
        "{refused:?}"
    );
    assert_eq!(replica.info().epoch, MAX_EPOCH);
}

/// Bytes that do not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// The `.part` file of the transfer being received.
fn part_file(path: &Path, id: u64) -> PathBuf {
    path.join("incoming").join(format!("{id:016x}.part"))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

#[test]
fn an_applied_transfers_file_is_recycled_and_its_stale_frames_never_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = Replica::create(&path, state(), 0).unwrap();
    let old = noise(1, 6 * MIB as usize);
    send(&mut replica, 100, resync(1, 0, true), &[write(0, 0, &old)]);
    apply_all(&mut replica);
    let spare = path.join("spare.part");
    let spare_len = file_len(&spare);
    assert!(
        spare_len > 6 * MIB,
        "the applied transfer's file is the spare"
    );

    // The next transfer is received into it: 5 MiB in three chunks, of which the
    // first two arrive before a crash.
    let new = noise(2, 5 * MIB as usize);
    let changes = [write(0, MIB, &new)];
    let all = frames(7, &changes);
    assert!(all.len() >= 3);
    let offer = TransferOffer {
        id: 7,
        kind: TransferKind::delta(7),
        bytes: OFFERED,
    };
    replica.offer(OWNER, &offer).unwrap();
    let part = part_file(&path, 7);
    assert!(!spare.exists(), "the offer took the spare");
    assert_eq!(file_len(&part), spare_len, "recycled, not created");
    replica.put_chunk(OWNER, 7, 0, &all[0]).unwrap();
    replica.put_chunk(OWNER, 7, 1, &all[1]).unwrap();
    drop(replica);

    // After the crash only the two new frames count; the old transfer's are cut.
    let mut replica = Replica::open(&path, 0).unwrap();
    let answer = replica.offer(OWNER, &offer).unwrap();
    assert_eq!(answer.have_chunks, 2);
    let stored = (all[0].len() + all[1].len()) as u64;
    assert_eq!(file_len(&part), stored);
    for (i, frame) in all.iter().enumerate().skip(2) {
        replica.put_chunk(OWNER, 7, i as u32, frame).unwrap();
    }
    replica.commit(OWNER, 7, all.len() as u32).unwrap();
    assert_eq!(
        replica.state().queue.back().and_then(|q| q.chunks),
        Some(all.len() as u32),
        "the queue knows where the transfer ends"
    );
    apply_all(&mut replica);
    let a = disk(&replica, "a");
    assert_eq!(&a[..MIB as usize], &old[..MIB as usize]);
    assert_eq!(&a[MIB as usize..6 * MIB as usize], &new[..]);

    // A smaller transfer in the larger spare: committed, its file keeps the older
    // frames after its own (the pages and blocks stay for the next transfer), and
    // the apply stops at its last chunk.
    let spare_len = file_len(&spare);
    let small = frames(8, &[write(1, 0, b"small")]);
    assert!(spare_len > 2 * small[0].len() as u64);
    send(
        &mut replica,
        8,
        TransferKind::delta(8),
        &[write(1, 0, b"small")],
    );
    let received = path.join("received").join(format!("{:016x}.xfer", 8));
    assert_eq!(file_len(&received), spare_len);
    apply_all(&mut replica);
    assert_eq!(&disk(&replica, "b")[..5], b"small");
    assert_eq!(
        &disk(&replica, "a")[MIB as usize..6 * MIB as usize],
        &new[..]
    );
    assert_eq!(file_len(&spare), spare_len, "kept whole for the next one");

    // A committed file that lost its end is an error, not a shorter transfer.
    let three = &new[..3 * MIB as usize];
    let first = frames(9, &[write(1, 0, three)])[0].len() as u64;
    send(
        &mut replica,
        9,
        TransferKind::delta(9),
        &[write(1, 0, three)],
    );
    let received = path.join("received").join(format!("{:016x}.xfer", 9));
    OpenOptions::new()
        .write(true)
        .open(&received)
        .unwrap()
        .set_len(first)
        .unwrap();
    let disks = replica.open_disks().unwrap();
    let cut = replica.apply_next(&disks).unwrap_err();
    assert!(
        matches!(
            cut,
            StoreError::ShortTransfer {
                have: 1,
                chunks: 2,
                ..
            }
        ),
        "{cut}"
    );
}

#[test]
fn a_spare_holding_frames_of_the_offered_transfer_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = Replica::create(&path, state(), 0).unwrap();
    // Frames of transfer 9, as a spare would hold them had 9 been applied long ago.
    let data = vec![3u8; 5 * MIB as usize];
    let stale: Vec<u8> = frames(9, &[write(0, 0, &data)]).concat();
    fs::write(path.join("spare.part"), &stale).unwrap();
    let offer = TransferOffer {
        id: 9,
        kind: resync(1, 0, true),
        bytes: OFFERED,
    };
    replica.offer(OWNER, &offer).unwrap();
    assert_eq!(file_len(&part_file(&path, 9)), 0, "a new, empty file");
    assert!(!path.join("spare.part").exists());
    drop(replica);
    // A crash before any chunk: nothing of the stale frames counts.
    let mut replica = Replica::open(&path, 0).unwrap();
    assert_eq!(replica.offer(OWNER, &offer).unwrap().have_chunks, 0);
}

#[test]
fn a_spare_is_cut_to_its_limit_and_kept_only_with_room_to_spare() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let long = |name: &str| {
        let file = path.join(name);
        File::create(&file)
            .unwrap()
            .set_len(spare::SPARE_MAX + MIB)
            .unwrap();
        file
    };
    // A reserve larger than the storage: no room for a spare.
    let replica = Replica::create(&path, state(), u64::MAX / 2).unwrap();
    let file = long("applied.xfer");
    replica.keep_as_spare(&file);
    assert!(!file.exists() && !path.join("spare.part").exists());
    drop(replica);

    let replica = Replica::open(&path, 0).unwrap();
    let file = long("applied.xfer");
    let roomy = free_space(&path).unwrap() >= spare::SPARE_MAX;
    replica.keep_as_spare(&file);
    assert!(!file.exists());
    if roomy {
        assert_eq!(file_len(&path.join("spare.part")), spare::SPARE_MAX);
    } else {
        assert!(!path.join("spare.part").exists());
    }
}

fn disk_info(name: &str, size: u64) -> DiskInfo {
    DiskInfo {
        name: name.into(),
        size,
    }
}

/// A disk added to the group is a zero-filled file after the others, in the state
/// from then on (a reopening too); transfers may write it, and the applier's disks
/// include it.
#[test]
fn a_disk_added_after_the_others_takes_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = Replica::create(&path, state(), 0).unwrap();
    send(
        &mut replica,
        1,
        resync(1, 0, true),
        &[write(0, 0, &[1u8; 8192])],
    );
    send(
        &mut replica,
        2,
        stamped(1, 10, false),
        &[write(1, 0, b"b1")],
    );
    let disks = replica.disks_for_apply().unwrap();
    while replica.apply_next(&disks).unwrap().is_some() {}
    assert_eq!(disks.len(), 2);
    // Not a disk yet: a change to it is refused on receipt.
    replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 3,
                kind: stamped(2, 20, false),
                bytes: OFFERED,
            },
        )
        .unwrap();
    let early = replica.put_chunk(OWNER, 3, 0, &frames(3, &[write(2, 0, b"c")])[0]);
    assert!(
        matches!(
            early,
            Err(StoreError::Apply(ApplyError::OutOfRange { disk: 2, .. }))
        ),
        "{early:?}"
    );

    replica.add_disks(&[disk_info("c", 2 * MIB)]).unwrap();
    let names: Vec<&str> = replica
        .state()
        .disks
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(replica.info().disks.len(), 3);
    let c = disk(&replica, "c");
    assert_eq!(c.len() as u64, 2 * MIB);
    assert!(c.iter().all(|&b| b == 0));
    assert!(
        fs::metadata(replica.disk_path("c")).unwrap().blocks() == 0,
        "the added disk is sparse"
    );
    assert!(
        replica.state().consistent,
        "the disks before hold a state still"
    );
    // The transfer offered before the add goes on, now writing the added disk too;
    // the disks kept for applying are opened again, the added one with them.
    send(
        &mut replica,
        3,
        stamped(2, 20, false),
        &[write(2, MIB, b"third disk"), write(0, 0, b"first")],
    );
    let disks = replica.disks_for_apply().unwrap();
    assert_eq!(disks.len(), 3);
    while replica.apply_next(&disks).unwrap().is_some() {}
    assert_eq!(
        &disk(&replica, "c")[MIB as usize..MIB as usize + 10],
        b"third disk"
    );
    assert_eq!(&disk(&replica, "a")[..5], b"first");
    // Out of the added disk's range: refused.
    replica
        .offer(
            OWNER,
            &TransferOffer {
                id: 4,
                kind: stamped(3, 30, false),
                bytes: OFFERED,
            },
        )
        .unwrap();
    let beyond = replica.put_chunk(OWNER, 4, 0, &frames(4, &[write(2, 2 * MIB - 1, b"xy")])[0]);
    assert!(matches!(beyond, Err(StoreError::Apply(_))), "{beyond:?}");

    // A name in use, twice in one request, or not a name: refused, nothing changed.
    for bad in [
        vec![disk_info("b", MIB)],
        vec![disk_info("d", MIB), disk_info("d", MIB)],
        vec![disk_info("../d", MIB)],
    ] {
        let refused = replica.add_disks(&bad);
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
    }
    assert_eq!(replica.state().disks.len(), 3);
    assert!(!replica.disk_path("d").exists());
    drop(replica);
    let replica = Replica::open(&path, 0).unwrap();
    assert_eq!(replica.state().disks.len(), 3);
    assert_eq!(replica.open_disks().unwrap().len(), 3);
}

/// An add cut short by a crash (the file created, the state not saved) leaves the
/// replica as it was; the add tried again replaces the file with zeroes of the size.
#[test]
fn an_add_cut_short_leaves_the_old_disks_and_a_retry_replaces_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let replica = Replica::create(&path, state(), 0).unwrap();
    let leftover = replica.disk_path("c");
    drop(replica);
    fs::write(&leftover, vec![0x5au8; 12345]).unwrap();
    let mut replica = Replica::open(&path, 0).unwrap();
    assert_eq!(replica.state().disks.len(), 2);
    assert_eq!(replica.open_disks().unwrap().len(), 2);

    replica.add_disks(&[disk_info("c", 3 * MIB)]).unwrap();
    let c = disk(&replica, "c");
    assert_eq!(c.len() as u64, 3 * MIB);
    assert!(c.iter().all(|&b| b == 0), "the leftover's bytes are gone");
    drop(replica);
    let replica = Replica::open(&path, 0).unwrap();
    assert_eq!(replica.state().disks[2], disk_info("c", 3 * MIB));
}

/// A point taken before a disk was added has it as zeroes: read through the history,
/// in a test failover's view, and on the disks after a failover to it.
#[test]
fn a_point_before_an_added_disk_has_it_as_zeroes() {
    use nbd_shim::backend::OverlayBase;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 8, 1);
    send(
        &mut replica,
        2,
        stamped(1, 10, false),
        &[write(0, 4096, &[2u8; 4096])],
    );
    apply_all(&mut replica);
    let old_a = disk(&replica, "a");
    let before = replica.state().points.last().unwrap().id;

    replica.add_disks(&[disk_info("c", MIB)]).unwrap();
    send(
        &mut replica,
        3,
        stamped(2, 20, false),
        &[write(2, 0, &[3u8; 8192]), write(0, 4096, &[4u8; 4096])],
    );
    apply_all(&mut replica);
    let after = replica.state().points.last().unwrap().id;
    assert_ne!(before, after);
    assert!(point_disk(&replica, before, 0) == old_a);
    assert!(point_disk(&replica, before, 2).iter().all(|&b| b == 0));
    assert!(point_disk(&replica, after, 2)[..8192]
        .iter()
        .all(|&b| b == 3));
    // Reopened: the same.
    drop(replica);
    let mut replica = Replica::open(&path, 0).unwrap();
    assert!(point_disk(&replica, before, 2).iter().all(|&b| b == 0));
    assert!(point_disk(&replica, before, 0) == old_a);

    // A test failover of the earlier point serves the added disk as zeroes.
    let test = replica.begin_test(Some(before)).unwrap();
    let view = crate::failover_drill::PointView::open(
        replica.history(),
        test.point,
        2,
        &replica.disk_path("c"),
        MIB,
    )
    .unwrap();
    let mut read = vec![0xffu8; 16384];
    view.read_at(&mut read, 0).unwrap();
    assert!(read.iter().all(|&b| b == 0));
    replica.end_test().unwrap();

    // Failing over to it zeroes the added disk and puts the others back.
    replica.fail_over(Some(before), false).unwrap();
    assert!(disk(&replica, "c").iter().all(|&b| b == 0));
    assert!(disk(&replica, "a") == old_a);
    // The state the disks left is a point still, the added disk's data with it.
    let left = replica
        .recovery_points()
        .iter()
        .find(|p| p.cycle == 2)
        .unwrap()
        .id;
    replica.fail_over(Some(left), false).unwrap();
    assert!(disk(&replica, "c")[..8192].iter().all(|&b| b == 3));
}

/// Disks are added only to a replica a primary claimed and replicates into, not under
/// a test failover or before an import from external media, and each refusal says
/// what to do.
#[test]
fn disks_are_not_added_under_a_test_before_an_import_nor_to_an_unclaimed_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1");
    let mut replica = keeping_points(&path, 2, 1);
    send(&mut replica, 2, stamped(1, 10, false), &[write(0, 0, b"x")]);
    apply_all(&mut replica);
    let new = [disk_info("c", MIB)];
    replica.begin_test(None).unwrap();
    let refused = replica.add_disks(&new);
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("test-failover stop")),
        "{refused:?}"
    );
    assert!(!replica.disk_path("c").exists());
    replica.end_test().unwrap();
    replica.add_disks(&new).unwrap();

    let mut awaiting = state();
    awaiting.awaiting_import = true;
    let mut replica = Replica::create(&dir.path().join("vm2"), awaiting, 0).unwrap();
    let refused = replica.add_disks(&new);
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("blkrep replica import")),
        "{refused:?}"
    );

    let image = dir.path().join("a.img");
    fs::write(&image, vec![1u8; 4096]).unwrap();
    let mut copy = Replica::seed(
        &dir.path().join("vm3"),
        "vm3",
        "dc1",
        &[("a".into(), image)],
        false,
    )
    .unwrap();
    let refused = copy.add_disks(&new);
    assert!(
        matches!(&refused, Err(StoreError::Conflict(m)) if m.contains("blkrep replica seed")),
        "{refused:?}"
    );
    assert_eq!(copy.state().disks.len(), 1);
}
