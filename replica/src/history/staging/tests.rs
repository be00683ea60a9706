#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;

use super::super::segment::{Segment, RECORD_HEADER_LEN};
use super::super::{History, MAX_RECORD, UNDO_BLOCK};
use super::{BLOCK, STAGING};
use image_ops::apply::ReplicaDisk;
use tracker::ChangeData;

/// One record appended: disk, offset, length, and its bytes (`None`: a zero run).
type Record = (usize, u64, u64, Option<Vec<u8>>);

const DISKS: usize = 2;

/// Bytes `seed`, `seed + 1`... never all zero.
fn pattern(length: u64, seed: u64) -> Vec<u8> {
    (0..length).map(|i| (i + seed) as u8 | 1).collect()
}

/// Appends `record` to `segment` the way a capture does: read into the staged room.
fn append(segment: &mut Segment, record: &Record) {
    let (disk, offset, length, data) = record;
    match data {
        Some(bytes) => {
            segment.stage(*length).unwrap().copy_from_slice(bytes);
            segment.commit(*disk, *offset, *length, false);
        }
        None => segment.append_zero(*disk, *offset, *length).unwrap(),
    }
}

/// Checks that `segment` holds exactly `records` and reads each back.
fn assert_holds(segment: &Segment, records: &[Record]) {
    let held: usize = segment.held.iter().map(|runs| runs.len()).sum();
    assert_eq!(held, records.len(), "runs held");
    for (disk, offset, length, data) in records {
        let (start, run) = segment.holding(*disk, *offset).unwrap();
        assert_eq!(
            (start, run.length, run.zero),
            (*offset, *length, data.is_none())
        );
        if let Some(bytes) = data {
            let mut back = vec![0u8; bytes.len()];
            segment.read(&mut back, run.data_at).unwrap();
            assert!(
                back == *bytes,
                "record at {offset} of disk {disk} reads back"
            );
        }
    }
}

/// Where each record ends in the file, in order.
fn ends(records: &[Record]) -> Vec<u64> {
    let mut at = 32;
    records
        .iter()
        .map(|(_, _, length, data)| {
            at += RECORD_HEADER_LEN as u64 + data.as_ref().map_or(0, |_| *length);
            at
        })
        .collect()
}

/// Where the records end in the file.
fn records_end(records: &[Record]) -> u64 {
    ends(records).last().copied().unwrap_or(32)
}

/// The records that end at or before `end`.
fn records_before(records: &[Record], end: u64) -> Vec<Record> {
    records
        .iter()
        .zip(ends(records))
        .filter(|(_, record_end)| *record_end <= end)
        .map(|(record, _)| record.clone())
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// A record of this length (a zero run if `zero`).
    Append { length: u64, zero: bool },
    /// An `fdatasync` point: everything staged written out and synced.
    Sync,
    /// Closed (without a sync: what was staged is lost) and opened again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..20_000, prop::bool::weighted(0.2)).prop_map(|(length, zero)| Op::Append { length, zero }),
        1 => (MAX_RECORD / 2..=MAX_RECORD).prop_map(|length| Op::Append { length, zero: false }),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the mix of record sizes, syncs and reopenings, a segment holds and
    /// reads back every record, written out or still staged, and after a reopening
    /// the records written out before it (at least those synced), up to the end of
    /// the file: a full staging buffer is written out without a sync.
    #[test]
    fn segments_keep_every_record_written_out(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.undo");
        let mut segment = Segment::create(&path, 1, DISKS).unwrap();
        let (mut records, mut synced) = (Vec::new(), 0);
        for (index, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append { length, zero } => {
                    let offset = index as u64 * MAX_RECORD;
                    let data = (!zero).then(|| pattern(length, index as u64));
                    let record = (index % DISKS, offset, length, data);
                    append(&mut segment, &record);
                    records.push(record);
                }
                Op::Sync => {
                    segment.sync().unwrap();
                    synced = records.len();
                }
                Op::Reopen => {
                    drop(segment);
                    let written = fs::metadata(&path).unwrap().len();
                    records = records_before(&records, written);
                    prop_assert!(records.len() >= synced);
                    synced = records.len();
                    segment = Segment::open(&path, 1, DISKS).unwrap();
                    prop_assert_eq!(fs::metadata(&path).unwrap().len(), records_end(&records));
                }
            }
            prop_assert_eq!(segment.len, records_end(&records));
            assert_holds(&segment, &records);
        }
    }
}

/// A directory where syncs are cheap, for tests that sync thousands of times.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// A crash can leave a segment file cut at any byte, inside a record or inside zeroes
/// or garbage past the last record (a file extended before its data reached the
/// device): opening it keeps exactly the whole records before the cut, and appending
/// after that rewrites the partial block without harming them.
#[test]
fn a_tail_cut_anywhere_keeps_the_whole_records_before_it() {
    let dir = scratch_dir();
    let original = dir.path().join("original.undo");
    let mut segment = Segment::create(&original, 7, DISKS).unwrap();
    let records: Vec<Record> = vec![
        (0, 0, 8192, None),
        (1, 4096, 100, Some(pattern(100, 3))),
        (0, 65536, 4096, Some(pattern(4096, 5))),
        (1, 8192, 700, Some(pattern(700, 9))),
    ];
    for record in &records {
        append(&mut segment, record);
    }
    segment.sync().unwrap();
    drop(segment);
    let mut bytes = fs::read(&original).unwrap();
    assert_eq!(
        bytes.len() as u64,
        records_end(&records),
        "the file ends with its records"
    );
    bytes.extend_from_slice(&[0u8; BLOCK]);
    bytes.extend_from_slice(&[0x55u8; 40]);

    let later: Record = (0, 1 << 20, 3000, Some(pattern(3000, 11)));
    let path = dir.path().join("cut.undo");
    for cut in 0..=bytes.len() {
        fs::write(&path, &bytes[..cut]).unwrap();
        let Ok(mut segment) = Segment::open(&path, 7, DISKS) else {
            assert!(cut < 32, "a whole header opens (cut at {cut})");
            continue;
        };
        let kept = records_before(&records, cut as u64);
        assert_eq!(segment.len, records_end(&kept), "cut at {cut}");
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            segment.len,
            "cut at {cut}"
        );
        assert_holds(&segment, &kept);
        // Every 61st cut, and every cut from inside the last record on: append, sync,
        // reopen.
        if cut % 61 == 0 || cut + BLOCK + 1000 > bytes.len() {
            append(&mut segment, &later);
            segment.sync().unwrap();
            drop(segment);
            let segment = Segment::open(&path, 7, DISKS).unwrap();
            let mut expected = kept.clone();
            expected.push(later.clone());
            assert_holds(&segment, &expected);
        }
    }
}

/// A file of `size` bytes of data, as a replica disk.
fn disk_file(path: &Path, size: u64) -> ReplicaDisk {
    fs::write(path, pattern(size, 0)).unwrap();
    ReplicaDisk::open(path, size).unwrap()
}

/// A crash after a capture and before its sync loses what was staged, and perhaps
/// part of what was written out before it (a power cut keeps any prefix of it). The
/// transfer's writes had not started, so the re-apply captures the same bytes again.
#[test]
fn a_crash_between_capture_and_sync_is_captured_again() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * STAGING as u64 / 2 + 5 * UNDO_BLOCK;
    let disk_path = dir.path().join("d.img");
    let disks = vec![disk_file(&disk_path, size)];
    let before = fs::read(&disk_path).unwrap();
    let history_dir = dir.path().join("history");
    let segment_path = History::segment_path(&history_dir, 1);
    // Whole blocks of the file kept by the cut: all that was written, or less.
    for kept_blocks in [None, Some(0), Some(1), Some(1000)] {
        let (history, _) = History::open(&history_dir, vec![size], &[]).unwrap();
        history.add_point(1).unwrap();
        let guard = history.apply_guard();
        // More than the staging buffer: part of it is written out during the capture.
        assert_eq!(history.capture(&disks, 0, 0, size).unwrap(), size);
        drop(guard);
        drop(history);
        let written = fs::metadata(&segment_path).unwrap().len();
        assert!(written > 32, "a full staging buffer was written out");
        if let Some(blocks) = kept_blocks {
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&segment_path)
                .unwrap();
            file.set_len(written.min(blocks * BLOCK as u64 + 32))
                .unwrap();
        }

        let (history, lost) = History::open(&history_dir, vec![size], &[1]).unwrap();
        assert!(lost.is_empty());
        let guard = history.apply_guard();
        history.capture(&disks, 0, 0, size).unwrap();
        history.sync().unwrap();
        disks[0]
            .apply(0, size, ChangeData::Write(&pattern(size, 77)))
            .unwrap();
        drop(guard);
        drop(history);

        let (history, point) = reopen_and_read_point(&history_dir, &disk_path, size);
        assert!(
            point == before,
            "point 1 after a cut to {kept_blocks:?} blocks"
        );
        // Back to the state of the point, for the next round.
        disks[0].apply(0, size, ChangeData::Write(&before)).unwrap();
        history.clear().unwrap();
    }
}

/// The history in `dir` with point 1, opened afresh, and disk 0 (at `disk_path`, of
/// `size` bytes) as it was at that point.
fn reopen_and_read_point(dir: &Path, disk_path: &Path, size: u64) -> (History, Vec<u8>) {
    let (history, lost) = History::open(dir, vec![size], &[1]).unwrap();
    assert!(lost.is_empty());
    let image = fs::File::open(disk_path).unwrap();
    let mut point = vec![0u8; size as usize];
    history
        .read()
        .read_at(1, 0, (&image, disk_path), &mut point, 0)
        .unwrap();
    (history, point)
}

/// A history on `dir`, written in and read back through every kind of append, with
/// the direct handle's verdict.
fn write_and_read_back(dir: &Path) -> Option<bool> {
    let size = 1 << 20;
    let disk_path = dir.join("d.img");
    let disks = vec![disk_file(&disk_path, size)];
    let before = fs::read(&disk_path).unwrap();
    let history_dir = dir.join("history");
    let (history, _) = History::open(&history_dir, vec![size], &[]).unwrap();
    history.add_point(1).unwrap();
    {
        let _guard = history.apply_guard();
        history.capture(&disks, 0, 4096, 300_000).unwrap();
        history.capture(&disks, 0, 700_000, 5000).unwrap();
        history.sync().unwrap();
        disks[0]
            .apply(0, size, ChangeData::Write(&pattern(size, 5)))
            .unwrap();
    }
    let direct = history.read().segments[0].is_direct();
    drop(history);
    let (_, point) = reopen_and_read_point(&history_dir, &disk_path, size);
    let now = pattern(size, 5);
    // Captures cover whole blocks.
    let block = UNDO_BLOCK as usize;
    let (first, second) = (
        4096..307_200,
        700_000 / block * block..705_000usize.next_multiple_of(block),
    );
    for (at, byte) in point.iter().enumerate() {
        let captured = first.contains(&at) || second.contains(&at);
        let expected = if captured { before[at] } else { now[at] };
        assert_eq!(*byte, expected, "byte {at}");
    }
    direct
}

/// The type of the filesystem holding `path`, as `stat -f` names it.
fn filesystem(path: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// On the filesystems replicas live on, undo data bypasses the page cache.
#[test]
fn segments_on_ext4_xfs_or_btrfs_write_directly() {
    let dir = tempfile::tempdir().unwrap();
    let direct = write_and_read_back(dir.path());
    if ["ext2/ext3", "xfs", "btrfs"].contains(&filesystem(dir.path()).as_str()) {
        assert_eq!(direct, Some(true));
    }
}

/// Environment variable naming the ramfs directory the inner test below runs in.
const RAMFS_DIR: &str = "BLKREP_TEST_RAMFS_DIR";

/// ramfs refuses `O_DIRECT` (EINVAL): the segment writes through the page cache and
/// keeps every record. Runs as root only: it mounts a ramfs in a private mount
/// namespace (`unshare`), in which it runs the test below.
#[test]
fn a_filesystem_refusing_direct_io_gets_the_same_records() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a ramfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount_point: PathBuf = dir.path().join("ramfs");
    fs::create_dir(&mount_point).unwrap();
    let test_binary = std::env::current_exe().unwrap();
    let script = r#"mount -t ramfs ramfs "$BLKREP_TEST_RAMFS_DIR" && exec "$0" --exact --ignored --nocapture history::staging::tests::inside_a_ramfs"#;
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(&test_binary)
        .env(RAMFS_DIR, &mount_point)
        .status()
        .unwrap();
    assert!(status.success(), "the test inside the ramfs: {status}");
}

#[test]
#[ignore = "run by a_filesystem_refusing_direct_io_gets_the_same_records"]
fn inside_a_ramfs() {
    let dir = PathBuf::from(std::env::var_os(RAMFS_DIR).unwrap());
    assert_eq!(filesystem(&dir), "ramfs");
    assert_eq!(write_and_read_back(&dir), Some(false));
}
