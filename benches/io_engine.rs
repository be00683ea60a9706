//! Micro-benchmarks of nbd-shim's I/O engine: the cost of submitting an operation and
//! reaping its completion (one at a time, and a batch of 32 like a QD32 client), against
//! a plain `pread` of the same bytes. The file is in the page cache, so what is measured
//! is the engine's own path, not the disk. Whole-server comparisons with qemu-nbd are
//! scripts/bench-fio.sh.

use std::hint::black_box;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_shim::engine::{IoBuf, IoEngine};

const FILE_SIZE: usize = 64 << 20;
const BLOCK: usize = 4096;

fn cached_file() -> std::fs::File {
    let mut file = tempfile::tempfile().expect("temp file");
    file.write_all(&vec![0x5a; FILE_SIZE]).expect("fill");
    file
}

/// The offset of block `i` (a stride that visits the file in a scattered order).
fn offset_of(i: u64) -> u64 {
    (i.wrapping_mul(7919) % (FILE_SIZE / BLOCK) as u64) * BLOCK as u64
}

/// Which operation a benchmark runs.
#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

/// Benchmarks one 4 KiB operation submitted to the engine and waited for, again and
/// again, at scattered offsets (`i` counts on from the caller's loop).
fn engine_one_at_a_time(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    file: &std::fs::File,
    op: Op,
    i: &mut u64,
) {
    let mut engine = IoEngine::new(32).expect("io_uring");
    let mut spare = Some(IoBuf::new(BLOCK).expect("buffer"));
    group.bench_function("engine submit + complete", |b| {
        b.iter(|| {
            *i += 1;
            let buf = spare.take().expect("buffer back");
            let queued = match op {
                Op::Read => engine.read(file.as_fd(), offset_of(*i), buf, ()),
                Op::Write => engine.write(file.as_fd(), offset_of(*i), buf, ()),
            };
            queued.expect("room");
            engine
                .complete(1, |done| {
                    done.result.expect("engine I/O");
                    spare = Some(done.buf);
                })
                .expect("complete");
        })
    });
}

fn single_reads(c: &mut Criterion) {
    let file = cached_file();
    let mut group = c.benchmark_group("4 KiB cached read, one at a time");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let mut buf = vec![0u8; BLOCK];
    let mut i = 0u64;
    group.bench_function("pread", |b| {
        b.iter(|| {
            i += 1;
            file.read_exact_at(&mut buf, offset_of(i)).expect("pread");
            black_box(&buf);
        })
    });
    engine_one_at_a_time(&mut group, &file, Op::Read, &mut i);
    group.finish();
}

fn batched_reads(c: &mut Criterion) {
    const DEPTH: usize = 32;
    const DEPTH_U32: u32 = 32;
    let file = cached_file();
    let mut group = c.benchmark_group("4 KiB cached reads, batches of 32");
    group.throughput(Throughput::Bytes((BLOCK * DEPTH) as u64));
    let mut engine = IoEngine::new(DEPTH_U32).expect("io_uring");
    let mut spare: Vec<IoBuf> = (0..DEPTH)
        .map(|_| IoBuf::new(BLOCK).expect("buffer"))
        .collect();
    let mut i = 0u64;
    group.bench_function("engine submit + complete", |b| {
        b.iter(|| {
            for buf in spare.drain(..) {
                i += 1;
                engine
                    .read(file.as_fd(), offset_of(i), buf, ())
                    .expect("room");
            }
            engine
                .complete(DEPTH, |done| {
                    done.result.expect("read");
                    spare.push(done.buf);
                })
                .expect("complete");
        })
    });
    group.finish();
}

fn single_writes(c: &mut Criterion) {
    let file = cached_file();
    let mut group = c.benchmark_group("4 KiB buffered write, one at a time");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let data = vec![0xa5u8; BLOCK];
    let mut i = 0u64;
    group.bench_function("pwrite", |b| {
        b.iter(|| {
            i += 1;
            file.write_all_at(&data, offset_of(i)).expect("pwrite");
        })
    });
    engine_one_at_a_time(&mut group, &file, Op::Write, &mut i);
    group.finish();
}

criterion_group!(benches, single_reads, batched_reads, single_writes);
criterion_main!(benches);
