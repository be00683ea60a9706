//! Micro-benchmarks of the write path's per-request work: record encoding, dirty-map
//! updates, a whole logged write (reserve, copy, commit, release), cycle coalescing,
//! and NBD request parsing. The fio comparison with qemu-nbd is scripts/bench-fio.sh.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tracker::record::{RecordHeader, RecordKind, HEADER_LEN};
use tracker::{AtomicBitmap, DiskSpec, Group, TrackerConfig};

fn record_encoding(c: &mut Criterion) {
    let header = RecordHeader {
        kind: RecordKind::Write,
        disk: 1,
        seq: 123_456,
        cycle: 77,
        offset: 1 << 30,
        length: 4096,
        payload_len: 4096,
    };
    let mut out = [0u8; HEADER_LEN];
    c.bench_function("record header encode", |b| {
        b.iter(|| black_box(&header).encode(black_box(&mut out)))
    });
    header.encode(&mut out);
    c.bench_function("record header decode", |b| {
        b.iter(|| RecordHeader::decode(black_box(&out)))
    });
    let payload = vec![0x5au8; 4096];
    let mut group = c.benchmark_group("commit crc");
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("4 KiB", |b| {
        b.iter(|| tracker::record::commit_crc(7, black_box(&payload)))
    });
    group.finish();
}

fn bitmap_update(c: &mut Criterion) {
    let map = AtomicBitmap::new(64 << 30, 12);
    let mut offset = 0u64;
    c.bench_function("dirty map set 4 KiB", |b| {
        b.iter(|| {
            offset = (offset + 7 * 4096) % (64 << 30);
            map.set_range(black_box(offset), 4096);
        })
    });
    c.bench_function("dirty map set 1 MiB", |b| {
        b.iter(|| map.set_range(black_box(1 << 20), 1 << 20))
    });
}

/// Bytes the activity log lists at most (192 extents of 64 MiB).
const ACTIVE_WINDOW: u64 = 12 << 30;

fn logged_write(c: &mut Criterion) {
    // Within the activity log's window (as bench-fio's 4 GiB disks), and beyond it
    // with no flush ever (the worst case: making room syncs the ring and the image).
    logged_write_over(c, 4 << 30, "4 KiB log_write + release");
    logged_write_over(
        c,
        16 << 30,
        "4 KiB log_write + release, 16 GiB without flushes",
    );
}

fn logged_write_over(c: &mut Criterion, disk_size: u64, name: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (group, _) = Group::open(&TrackerConfig {
        name: "bench".into(),
        ring_path: dir.path().join("bench.ring"),
        ring_size: 256 << 20,
        block_size: 4096,
        disks: vec![DiskSpec {
            name: "disk0".into(),
            size: disk_size,
        }],
    })
    .expect("ring");
    let disk = group.disk(0).expect("disk");
    // An image to sync, as a served disk has: the activity log syncs it when every
    // slot holds an extent written since the last sync.
    let image = std::fs::File::create(dir.path().join("bench.img")).expect("image");
    image.set_len(disk_size).expect("image size");
    disk.attach_image(image);
    assert_eq!(disk_size > ACTIVE_WINDOW, name.contains("without flushes"));
    let payload = vec![0xa5u8; 4096];
    let mut offset = 0u64;
    let mut count = 0u64;
    let mut bench = c.benchmark_group("logged write");
    bench.throughput(Throughput::Bytes(4096));
    bench.bench_function(name, |b| {
        b.iter(|| {
            offset = (offset + 4096 * 13) % disk_size;
            drop(disk.log_write(offset, black_box(&payload)).expect("log"));
            // Keep the ring from filling (which would measure the dirty-map fallback):
            // consume every 16384 writes, about 64 MiB of the 256 MiB ring.
            count += 1;
            if count % 16384 == 0 {
                group.close_cycle().expect("close");
                let cycle = group.take_closed().expect("take").expect("closed");
                cycle.acknowledge().expect("ack");
            }
        })
    });
    bench.finish();
    assert_eq!(
        group.status().mode,
        tracker::TrackingMode::Logging,
        "the benchmark overflowed the ring"
    );
    if disk_size > ACTIVE_WINDOW {
        return;
    }
    c.bench_function("close + coalesce + ack 10k writes", |b| {
        b.iter_batched(
            || {
                for i in 0..10_000u64 {
                    drop(
                        disk.log_write((i * 7919 % 100_000) * 4096, &payload[..512])
                            .expect("log"),
                    );
                }
            },
            |()| {
                group.close_cycle().expect("close");
                let cycle = group.take_closed().expect("take").expect("closed");
                black_box(cycle.changes().count());
                cycle.acknowledge().expect("ack");
            },
            BatchSize::PerIteration,
        )
    });
}

fn request_parsing(c: &mut Criterion) {
    use nbd_shim::backend::BlockSizeLimits;
    use nbd_shim::proto::request::{ExportShape, RequestHeader};
    use nbd_shim::proto::{
        NBD_CMD_WRITE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA,
    };
    let shape = ExportShape {
        size: 64 << 30,
        limits: BlockSizeLimits {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        },
        transmission_flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA,
        structured_replies: true,
        meta_contexts: 0,
    };
    let header = RequestHeader {
        flags: 0,
        command: NBD_CMD_WRITE,
        cookie: 42,
        offset: 1 << 30,
        length: 4096,
    }
    .encode();
    c.bench_function("NBD request parse + validate", |b| {
        b.iter(|| {
            RequestHeader::parse(black_box(&header))
                .and_then(|parsed| parsed.validate(black_box(&shape)))
        })
    });
}

criterion_group!(
    benches,
    record_encoding,
    bitmap_update,
    logged_write,
    request_parsing
);
criterion_main!(benches);
