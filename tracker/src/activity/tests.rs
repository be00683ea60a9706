use proptest::prelude::*;

use super::*;

const EXTENT: u64 = 1 << EXTENT_SHIFT;

fn empty() -> ActivityRecord {
    ActivityRecord {
        valid: true,
        extent_shift: EXTENT_SHIFT,
        whole_disks: 0,
        extents: Vec::new(),
    }
}

fn listed(record: &ActivityRecord, disk: usize, offset: u64) -> bool {
    crash_ranges(record, disk, u64::MAX).is_none_or(|ranges| {
        ranges
            .iter()
            .any(|(start, len)| (*start..start + len).contains(&offset))
    })
}

#[test]
fn extents_are_added_once_and_persisted() {
    let mut log = ActivityLog::new(2, &empty());
    assert_eq!(log.admit(0, 0, 4096), Admission::Added);
    assert_eq!(log.admit(0, 8192, 12288), Admission::Active);
    // A write across an extent boundary takes both.
    assert_eq!(log.admit(1, EXTENT - 512, EXTENT + 512), Admission::Added);
    let record = log.record();
    assert_eq!(record.extents.len(), 3);
    assert_eq!(
        crash_ranges(&record, 1, 10 * EXTENT).unwrap(),
        vec![(0, EXTENT), (EXTENT, EXTENT)]
    );
    // The last extent is clipped to the disk.
    assert_eq!(
        crash_ranges(&record, 1, EXTENT + 4096).unwrap(),
        vec![(0, EXTENT), (EXTENT, 4096)]
    );
    assert_eq!(log.admit(0, 0, MAX_SPAN * EXTENT + 1), Admission::TooWide);
}

#[test]
fn a_full_table_evicts_only_synced_extents() {
    let mut log = ActivityLog::new(2, &empty());
    for extent in 0..u64::try_from(SLOTS).unwrap() {
        let start = extent * EXTENT;
        assert_eq!(log.admit(0, start, start + 4096), Admission::Added);
        log.release(0, start, start + 4096);
    }
    let beyond = u64::try_from(SLOTS).unwrap() * EXTENT;
    // Nothing was synced: the table asks for disk 0 to be.
    assert_eq!(log.admit(0, beyond, beyond + 4096), Admission::SyncDisk(0));
    // A sync of another disk does not help.
    let started = log.begin_sync();
    log.synced(1, started);
    assert_eq!(log.admit(0, beyond, beyond + 4096), Admission::SyncDisk(0));
    let started = log.begin_sync();
    log.synced(0, started);
    assert_eq!(log.admit(0, beyond, beyond + 4096), Admission::Added);
    // The least recently used extent (0) left.
    assert!(!log.record().extents.contains(&key(0, 0)));
}

/// The first byte of each of the first [`SLOTS`] extents of disk 0.
fn every_slot() -> impl Iterator<Item = (u64, u64)> {
    (0..u64::try_from(SLOTS).unwrap()).map(|extent| (extent * EXTENT, extent * EXTENT + 1))
}

/// Admits a write into each of [`every_slot`]; returns the admissions.
fn admit_every_slot(log: &mut ActivityLog) -> Vec<Admission> {
    every_slot()
        .map(|(start, end)| log.admit(0, start, end))
        .collect()
}

fn release_every_slot(log: &mut ActivityLog) {
    for (start, end) in every_slot() {
        log.release(0, start, end);
    }
}

#[test]
fn a_write_finishing_during_a_sync_is_not_durable_by_it() {
    let mut log = ActivityLog::new(1, &empty());
    let slots = u64::try_from(SLOTS).unwrap();
    for admission in admit_every_slot(&mut log) {
        assert_eq!(admission, Admission::Added);
    }
    let started = log.begin_sync();
    release_every_slot(&mut log);
    log.synced(0, started);
    let beyond = slots * EXTENT;
    assert_eq!(log.admit(0, beyond, beyond + 1), Admission::SyncDisk(0));
}

#[test]
fn writes_in_flight_everywhere_make_the_writer_wait() {
    let mut log = ActivityLog::new(1, &empty());
    let slots = u64::try_from(SLOTS).unwrap();
    admit_every_slot(&mut log);
    assert_eq!(
        log.admit(0, slots * EXTENT, slots * EXTENT + 1),
        Admission::Wait
    );
}

#[test]
fn uncovered_writes_mark_their_disk_whole_until_synced() {
    let mut log = ActivityLog::new(2, &empty());
    assert_eq!(log.admit(1, 0, MAX_SPAN * EXTENT + 1), Admission::TooWide);
    assert!(log.admit_uncovered(1));
    assert!(!log.admit_uncovered(1));
    assert!(crash_ranges(&log.record(), 1, EXTENT).is_none());
    assert_eq!(crash_ranges(&log.record(), 0, EXTENT), Some(vec![]));
    // Finishing during a sync is not enough; nor is a sync of another disk.
    let started = log.begin_sync();
    log.release_uncovered(1);
    log.release_uncovered(1);
    assert!(!log.synced(1, started));
    let started = log.begin_sync();
    assert!(!log.synced(0, started));
    assert!(log.synced(1, started));
    assert_eq!(crash_ranges(&log.record(), 1, EXTENT), Some(vec![]));
}

#[test]
fn inherited_extents_stay_until_their_disk_is_synced() {
    let mut first = ActivityLog::new(1, &empty());
    let slots = u64::try_from(SLOTS).unwrap();
    admit_every_slot(&mut first);
    release_every_slot(&mut first);
    let record = first.record();
    let mut log = ActivityLog::new(1, &record);
    assert_eq!(log.record().extents, record.extents);
    assert_eq!(
        log.admit(0, slots * EXTENT, slots * EXTENT + 1),
        Admission::SyncDisk(0)
    );
    let started = log.begin_sync();
    log.synced(0, started);
    assert_eq!(
        log.admit(0, slots * EXTENT, slots * EXTENT + 1),
        Admission::Added
    );
    // A ring without an activity log, or with another extent size, marks every disk
    // until each is synced.
    let old = ActivityRecord::default();
    let mut log = ActivityLog::new(2, &old);
    assert_eq!(log.record().whole_disks, 0b11);
    let started = log.begin_sync();
    assert!(log.synced(0, started));
    assert_eq!(log.record().whole_disks, 0b10);
}

#[derive(Debug, Clone)]
enum Op {
    Write { disk: usize, extent: u64, span: u64 },
    Finish(usize),
    BeginSync(usize),
    EndSync(usize),
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..12u64, prop_oneof![8 => 1..3u64, 1 => Just(6u64)]).prop_map(|(disk, extent, span)| Op::Write { disk, extent, span }),
        4 => any::<usize>().prop_map(Op::Finish),
        1 => (0..2usize).prop_map(Op::BeginSync),
        1 => any::<usize>().prop_map(Op::EndSync),
        1 => Just(Op::Crash),
    ]
}

struct Write {
    disk: usize,
    start: u64,
    end: u64,
    covered: bool,
    /// The model's sync counter when it finished (`None`: in flight).
    finished: Option<u64>,
}

proptest! {
    /// Whatever the interleaving of writes and syncs, every write that is in flight,
    /// or finished after the last sync of its disk that started before it finished,
    /// lies in the persisted record's extents (or the record says it is incomplete);
    /// the persisted record is the one saved at the last `Added`.
    #[test]
    fn the_record_covers_every_write_not_yet_durable(ops in proptest::collection::vec(op(), 1..400)) {
        // A small table, so eviction is exercised.
        let mut log = ActivityLog::with_slots(2, &empty(), 6);
        let mut persisted = log.record();
        let mut writes: Vec<Write> = Vec::new();
        let mut syncs: Vec<(usize, u64, u64)> = Vec::new();
        // Per disk: how far the model knows writes durable (its own sync counter).
        let mut model_durable = [0u64; 2];
        let mut model_clock = 1u64;
        for op in ops {
            match op {
                Op::Write { disk, extent, span } => {
                    let start = extent * EXTENT + 4096;
                    let end = start + (span - 1) * EXTENT + 4096;
                    let covered = match log.admit(disk, start, end) {
                        Admission::Active => true,
                        Admission::Added => {
                            persisted = log.record();
                            true
                        }
                        Admission::TooWide | Admission::SyncDisk(_) | Admission::Wait => {
                            if log.admit_uncovered(disk) {
                                persisted = log.record();
                            }
                            false
                        }
                    };
                    writes.push(Write { disk, start, end, covered, finished: None });
                }
                Op::Finish(pick) => {
                    let open: Vec<usize> = (0..writes.len()).filter(|i| writes[*i].finished.is_none()).collect();
                    if let Some(&index) = open.get(pick % open.len().max(1)) {
                        let write = &mut writes[index];
                        if write.covered {
                            log.release(write.disk, write.start, write.end);
                        } else {
                            log.release_uncovered(write.disk);
                        }
                        write.finished = Some(model_clock);
                    }
                }
                Op::BeginSync(disk) => {
                    syncs.push((disk, log.begin_sync(), model_clock));
                    model_clock += 1;
                }
                Op::EndSync(pick) => {
                    if !syncs.is_empty() {
                        let (disk, started, clock) = syncs.remove(pick % syncs.len());
                        model_durable[disk] = model_durable[disk].max(clock);
                        if log.synced(disk, started) {
                            persisted = log.record();
                        }
                    }
                }
                Op::Crash => {
                    for write in &writes {
                        let durable = write.finished.is_some_and(|at| at <= model_durable[write.disk]);
                        if !durable {
                            prop_assert!(listed(&persisted, write.disk, write.start));
                            prop_assert!(listed(&persisted, write.disk, write.end - 1));
                        }
                    }
                    // Had only the daemon died, the page cache would keep its
                    // writes: the next run inherits the record and must cover them
                    // until their disk is synced again.
                    log = ActivityLog::with_slots(2, &persisted, 6);
                    for write in &mut writes {
                        write.finished.get_or_insert(model_clock);
                        write.covered = false;
                    }
                    syncs.clear();
                }
            }
        }
    }
}
