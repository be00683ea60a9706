#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;

use proptest::prelude::*;
use tracker::ChangeData;

use super::segment::{parse_record, RECORD_HEADER_LEN, RECORD_MAGIC};
use super::*;

/// Disk sizes: the second is not a multiple of the undo block.
const SIZES: [u64; 2] = [256 * 1024, 100 * 1024 + 512];

struct Lab {
    dir: tempfile::TempDir,
    history_dir: PathBuf,
    sizes: Vec<u64>,
    paths: Vec<PathBuf>,
    disks: Vec<ReplicaDisk>,
    history: History,
    /// The model: each point's disk contents.
    snapshots: BTreeMap<u64, Vec<Vec<u8>>>,
    current: Vec<Vec<u8>>,
    next_point: u64,
}

impl Lab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        let mut current = Vec::new();
        for (index, size) in SIZES.iter().enumerate() {
            let path = dir.path().join(format!("d{index}.img"));
            let file = File::create(&path).unwrap();
            file.set_len(*size).unwrap();
            // Some data, some holes.
            let data: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8 + 1).collect();
            file.write_all_at(&data, 8192).unwrap();
            let mut model = vec![0u8; *size as usize];
            model[8192..8192 + data.len()].copy_from_slice(&data);
            current.push(model);
            paths.push(path);
        }
        let history_dir = dir.path().join("history");
        let disks = Self::open_disks(&paths, &SIZES);
        let (history, lost) = History::open(&history_dir, SIZES.to_vec(), &[]).unwrap();
        assert!(lost.is_empty());
        Lab {
            dir,
            history_dir,
            sizes: SIZES.to_vec(),
            paths,
            disks,
            history,
            snapshots: BTreeMap::new(),
            current,
            next_point: 1,
        }
    }

    fn open_disks(paths: &[PathBuf], sizes: &[u64]) -> Vec<ReplicaDisk> {
        paths
            .iter()
            .zip(sizes)
            .map(|(p, s)| ReplicaDisk::open(p, *s).unwrap())
            .collect()
    }

    /// A disk of `size` bytes added after the others, all zeroes, as the replica adds
    /// one: every point so far has it as zeroes.
    fn add_disk(&mut self, size: u64) {
        let path = self.dir.path().join(format!("d{}.img", self.paths.len()));
        File::create(&path).unwrap().set_len(size).unwrap();
        {
            let _guard = self.history.apply_guard();
            self.history.add_disks(&[size]);
        }
        self.sizes.push(size);
        self.paths.push(path);
        self.disks = Self::open_disks(&self.paths, &self.sizes);
        self.current.push(vec![0u8; size as usize]);
        for snapshot in self.snapshots.values_mut() {
            snapshot.push(vec![0u8; size as usize]);
        }
    }

    /// An apply: capture, sync, write.
    fn write(&mut self, disk: usize, offset: u64, data: Option<&[u8]>, length: u64) {
        let _guard = self.history.apply_guard();
        self.history
            .capture(&self.disks, disk, offset, length)
            .unwrap();
        self.history.sync().unwrap();
        let change = data.map_or(ChangeData::Zero, ChangeData::Write);
        self.disks[disk].apply(offset, length, change).unwrap();
        let model = &mut self.current[disk][offset as usize..(offset + length) as usize];
        match data {
            Some(bytes) => model.copy_from_slice(bytes),
            None => model.fill(0),
        }
    }

    fn add_point(&mut self) -> u64 {
        let point = self.next_point;
        self.next_point += 1;
        let _guard = self.history.apply_guard();
        self.history.add_point(point).unwrap();
        self.snapshots.insert(point, self.current.clone());
        point
    }

    fn remove_point(&mut self, point: u64) {
        let _guard = self.history.apply_guard();
        self.history.remove_point(point).unwrap();
        self.snapshots.remove(&point);
    }

    fn check(&self) {
        assert_eq!(
            self.history.points(),
            self.snapshots.keys().copied().collect::<Vec<_>>()
        );
        for (index, path) in self.paths.iter().enumerate() {
            assert!(
                fs::read(path).unwrap() == self.current[index],
                "disk {index} differs from the model"
            );
        }
        for (point, snapshot) in &self.snapshots {
            for (disk, expected) in snapshot.iter().enumerate() {
                let file = File::open(&self.paths[disk]).unwrap();
                let mut got = vec![0xaau8; expected.len()];
                self.history
                    .read()
                    .read_at(*point, disk, (&file, &self.paths[disk]), &mut got, 0)
                    .unwrap();
                assert!(got == *expected, "point {point} disk {disk} differs");
                // An unaligned read in the middle too.
                let (from, len) = (1000usize, 9000usize);
                let mut part = vec![0u8; len];
                self.history
                    .read()
                    .read_at(
                        *point,
                        disk,
                        (&file, &self.paths[disk]),
                        &mut part,
                        from as u64,
                    )
                    .unwrap();
                assert_eq!(part, expected[from..from + len]);
            }
        }
    }

    fn reopen(&mut self) {
        let points: Vec<u64> = self.snapshots.keys().copied().collect();
        let (history, lost) =
            History::open(&self.history_dir, self.sizes.clone(), &points).unwrap();
        assert!(lost.is_empty());
        self.history = history;
        self.disks = Self::open_disks(&self.paths, &self.sizes);
    }

    fn roll_back(&mut self, point: u64) {
        let latest = self.add_point();
        let _guard = self.history.apply_guard();
        self.history.roll_back(&self.disks, point).unwrap();
        self.current = self.snapshots[&point].clone();
        assert!(self.snapshots.contains_key(&latest));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: usize,
        offset: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
    AddPoint,
    RemovePoint(usize),
    Reopen,
    RollBack(usize),
    /// A disk of this size added after the others.
    AddDisk(u64),
}

/// Most disks a lab grows to by [`Op::AddDisk`].
const MAX_LAB_DISKS: usize = 4;

fn op() -> impl Strategy<Value = Op> {
    let range = (0usize..MAX_LAB_DISKS, 0u64..110_000, 1u64..20_000);
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((disk, offset, len), seed)| Op::Write { disk, offset, len, seed }),
        1 => range.prop_map(|(disk, offset, len)| Op::Zero { disk, offset, len }),
        2 => Just(Op::AddPoint),
        1 => (0usize..8).prop_map(Op::RemovePoint),
        1 => Just(Op::Reopen),
        1 => (0usize..8).prop_map(Op::RollBack),
        1 => (10_000u64..150_000).prop_map(Op::AddDisk),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every point reads as the disks were when it was taken, through writes, zeroes,
    /// merges of removed points, reopening, roll-backs and disks added (zeroes at the
    /// points before).
    #[test]
    fn points_keep_their_state(ops in proptest::collection::vec(op(), 1..40)) {
        let mut lab = Lab::new();
        for op in ops {
            match op {
                Op::Write { disk, offset, len, seed } => {
                    let disk = disk % lab.sizes.len();
                    let size = lab.sizes[disk];
                    let offset = offset.min(size - 1);
                    let len = len.min(size - offset);
                    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8) | 1).collect();
                    lab.write(disk, offset, Some(&data), len);
                }
                Op::Zero { disk, offset, len } => {
                    let disk = disk % lab.sizes.len();
                    let size = lab.sizes[disk];
                    let offset = offset.min(size - 1);
                    let len = len.min(size - offset);
                    lab.write(disk, offset, None, len);
                }
                Op::AddPoint => {
                    lab.add_point();
                }
                Op::RemovePoint(which) => {
                    let points: Vec<u64> = lab.snapshots.keys().copied().collect();
                    if !points.is_empty() {
                        lab.remove_point(points[which % points.len()]);
                    }
                }
                Op::Reopen => lab.reopen(),
                Op::RollBack(which) => {
                    let points: Vec<u64> = lab.snapshots.keys().copied().collect();
                    if !points.is_empty() {
                        lab.roll_back(points[which % points.len()]);
                    }
                }
                Op::AddDisk(size) => {
                    if lab.sizes.len() < MAX_LAB_DISKS {
                        lab.add_disk(size);
                    }
                }
            }
            lab.check();
        }
    }
}

#[test]
fn captures_only_what_it_does_not_hold_and_holes_cost_nothing() {
    let mut lab = Lab::new();
    assert_eq!(
        lab.history.capture(&lab.disks, 0, 8192, 4096).unwrap(),
        0,
        "no point: nothing captured"
    );
    lab.add_point();
    let data = vec![7u8; 8192];
    lab.write(0, 8192, Some(&data), 8192);
    let after_first = lab.history.sizes()[0].1;
    lab.write(0, 8192, Some(&data), 8192);
    assert_eq!(
        lab.history.sizes()[0].1,
        after_first,
        "held blocks are not captured again"
    );
    // A hole is recorded without data.
    lab.write(0, 128 * 1024, Some(&data), 8192);
    assert_eq!(
        lab.history.sizes()[0].1,
        after_first + RECORD_HEADER_LEN as u64
    );
    lab.check();
}

#[test]
fn a_torn_record_is_cut_and_a_missing_segment_loses_older_points() {
    let mut lab = Lab::new();
    let first = lab.add_point();
    lab.write(0, 8192, Some(&[1u8; 4096]), 4096);
    let second = lab.add_point();
    lab.write(0, 8192, Some(&[2u8; 4096]), 4096);
    let third = lab.add_point();
    lab.write(1, 0, Some(&[3u8; 4096]), 4096);
    // Half a record at the end of the newest segment (a crash mid-append).
    let newest = History::segment_path(&lab.history_dir, third);
    let len = fs::metadata(&newest).unwrap().len();
    let file = OpenOptions::new().write(true).open(&newest).unwrap();
    file.write_all_at(&[0x55u8; 40], len).unwrap();
    lab.reopen();
    assert_eq!(fs::metadata(&newest).unwrap().len(), len);
    lab.check();

    // The second point's segment is gone: it and the first are lost.
    fs::remove_file(History::segment_path(&lab.history_dir, second)).unwrap();
    let (history, lost) =
        History::open(&lab.history_dir, SIZES.to_vec(), &[first, second, third]).unwrap();
    assert_eq!(lost, vec![first, second]);
    assert_eq!(history.points(), vec![third]);
    assert!(!History::segment_path(&lab.history_dir, first).exists());
}

/// A point taken before a disk was added reads it as zeroes whatever is written to it
/// later, and its segment keeps nothing of that disk; a point taken after reads it as
/// it was. Both hold through a reopening, a merge and a roll-back.
#[test]
fn a_disk_added_after_a_point_reads_as_zeroes_there() {
    let mut lab = Lab::new();
    let before = lab.add_point();
    lab.write(0, 8192, Some(&[1u8; 4096]), 4096);
    let kept = lab.history.sizes()[0].1;
    lab.add_disk(40_000);
    lab.write(2, 0, Some(&[2u8; 12_288]), 12_288);
    assert_eq!(
        lab.history.sizes()[0].1,
        kept,
        "nothing of the added disk is captured for a point that did not have it"
    );
    let after = lab.add_point();
    lab.write(2, 4096, Some(&[3u8; 4096]), 4096);
    lab.write(0, 8192, Some(&[4u8; 4096]), 4096);
    lab.check();
    lab.reopen();
    lab.check();
    lab.roll_back(before);
    lab.check();
    assert!(fs::read(&lab.paths[2]).unwrap().iter().all(|&b| b == 0));
    lab.remove_point(after);
    lab.check();

    // A segment counting more disks than the history has is not this replica's.
    let newest = *lab.snapshots.keys().last().unwrap();
    let (history, lost) =
        History::open(&lab.history_dir, SIZES.to_vec(), &[before, newest]).unwrap();
    assert_eq!(lost, vec![before, newest]);
    assert!(history.points().is_empty());
}

#[test]
fn record_headers_are_checked() {
    let mut record = [0u8; RECORD_HEADER_LEN];
    record[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    record[8..16].copy_from_slice(&4096u64.to_le_bytes());
    record[16..24].copy_from_slice(&4096u64.to_le_bytes());
    assert!(parse_record(&record).is_some());
    let mut unaligned = record;
    unaligned[8..16].copy_from_slice(&100u64.to_le_bytes());
    assert!(parse_record(&unaligned).is_none());
    let mut huge = record;
    huge[16..24].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes());
    assert!(parse_record(&huge).is_none());
    let mut flags = record;
    flags[24] = 2;
    assert!(parse_record(&flags).is_none());
    let mut wrapping = record;
    wrapping[8..16].copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
    assert!(parse_record(&wrapping).is_none());
}
