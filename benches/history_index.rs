//! What the recovery history's in-memory index costs: the undo runs of one point,
//! captured for scattered 4 KiB writes (the worst case: no two runs adjacent), with
//! the heap measured by a counting allocator. Reports bytes of index per run and per
//! GiB of undo data, and the time each capture took. The disk is a sparse file, so
//! the captures are holes and the run measures the index, not the disk.
//!
//! `cargo bench --bench history_index` (`-- --runs N` to change the count; without
//! `--bench`, as `cargo test` runs it, 1024 captures).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use image_ops::ReplicaDisk;
use rand::{Rng, SeedableRng};
use replica::history::{History, UNDO_BLOCK};

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator with the caller's layout
// and pointer; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A sparse disk of 1 TiB: room for a million scattered blocks.
const DISK: u64 = 1 << 40;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this without `--bench`: a smoke run.
    let full = args.iter().any(|arg| arg == "--bench");
    let runs: u64 = match args.iter().position(|arg| arg == "--runs") {
        Some(at) => args
            .get(at + 1)
            .and_then(|n| n.parse().ok())
            .expect("--runs N"),
        None if full => 1 << 20,
        None => 1 << 10,
    };
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let path = dir.path().join("disk0.img");
    std::fs::File::create(&path)
        .and_then(|file| file.set_len(DISK))
        .expect("sparse disk");
    let disks = vec![ReplicaDisk::open(&path, DISK).expect("open disk")];
    let (history, _) =
        History::open(&dir.path().join("history"), vec![DISK], &[]).expect("history");
    history.add_point(1).expect("point");

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let blocks = DISK / UNDO_BLOCK;
    // Every other block at most, so no two captured runs touch.
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    for _ in 0..runs {
        let block = rng.gen_range(0..blocks / 2) * 2;
        history
            .capture(&disks, 0, block * UNDO_BLOCK, UNDO_BLOCK)
            .expect("capture");
    }
    let took = started.elapsed();
    let index = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    let segment = history.sizes().first().map_or(0, |(_, bytes)| *bytes);
    let per_run = index as f64 / runs as f64;
    let per_gib = per_run * ((1u64 << 30) / UNDO_BLOCK) as f64;
    println!(
        "history index: {runs} scattered 4 KiB captures ({segment} bytes of segment file), {:.1} MiB of heap: {per_run:.1} bytes per run, {:.0} MiB per GiB of scattered undo data, {:.2} µs per capture",
        index as f64 / f64::from(1u32 << 20),
        per_gib / f64::from(1u32 << 20),
        took.as_secs_f64() * 1e6 / runs as f64,
    );
}
