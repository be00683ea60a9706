//! What keeping recovery points costs the replica's apply: one received transfer of
//! 4 KiB writes scattered over a disk full of data, applied with no point kept, and
//! with a point taken just before (the worst case: every block is overwritten for the
//! first time since the point, so each is captured as undo data first).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use image_ops::ReplicaDisk;
use rand::{Rng, SeedableRng};
use replica::history::History;
use replica::store::apply_transfer;
use tracker::{Change, ChangeData};
use wire::chunk::{ChunkEncoder, RawChunk};

const DISK: u64 = 512 << 20;
const WRITE: usize = 4096;
const WRITES: usize = 8192;
const TRANSFER_ID: u64 = 7;

/// A disk full of data.
fn disk(path: &Path) {
    let file = File::create(path).expect("create disk");
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    for at in (0..DISK).step_by(chunk.len()) {
        file.write_all_at(&chunk, at).expect("fill disk");
    }
    file.sync_all().expect("sync disk");
}

/// A transfer file of `WRITES` scattered 4 KiB writes, as the replica stores it.
fn transfer(path: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let data = vec![0xa5u8; WRITE];
    let mut file = File::create(path).expect("create transfer");
    let mut encoder = ChunkEncoder::new(TRANSFER_ID);
    let mut emit = |raw: RawChunk<'_>| -> Result<(), std::io::Error> {
        let mut frame = Vec::new();
        raw.frame_into(None, &mut frame);
        file.write_all(&frame)
    };
    for _ in 0..WRITES {
        let block = rng.gen_range(0..DISK / WRITE as u64);
        let change = Change {
            disk: 0,
            offset: block * WRITE as u64,
            length: WRITE as u64,
            data: ChangeData::Write(&data),
        };
        encoder.push(&change, &mut emit).expect("encode");
    }
    encoder.finish(&mut emit).expect("encode");
}

fn apply(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let (disk_path, transfer_path) = (dir.path().join("disk0.img"), dir.path().join("t.xfer"));
    disk(&disk_path);
    transfer(&transfer_path);
    let disks = vec![ReplicaDisk::open(&disk_path, DISK).expect("open disk")];

    let mut group = c.benchmark_group("replica apply, 8192 scattered 4 KiB writes");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((WRITES * WRITE) as u64));
    let (none, _) = History::open(&dir.path().join("none"), vec![DISK], &[]).expect("history");
    group.bench_function("no recovery point kept", |b| {
        b.iter(|| apply_transfer(&transfer_path, TRANSFER_ID, None, &disks, &none).expect("apply"))
    });
    let (kept, _) = History::open(&dir.path().join("kept"), vec![DISK], &[]).expect("history");
    let mut point = 0u64;
    group.bench_function("a point taken just before", |b| {
        b.iter_batched(
            || {
                // A fresh point each time: every block is captured.
                if point > 0 {
                    kept.forget(point).expect("forget");
                }
                point += 1;
                kept.add_point(point).expect("point");
            },
            |()| apply_transfer(&transfer_path, TRANSFER_ID, None, &disks, &kept).expect("apply"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
