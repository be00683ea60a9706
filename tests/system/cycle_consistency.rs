//! Cycle consistency across the disks of a group: one client writes to disk0 and
//! disk1 alternately, write k only after write k-1 was acknowledged, each stamping
//! k into its own 4 KiB slot. While it writes, cycles are closed again and again;
//! after each close the local copies of BOTH disks must hold exactly the stamps
//! {1..m} for some m (a prefix of the write order, no gaps, nothing torn), with m at
//! least the number of writes acknowledged before the close was asked for and at
//! most the number issued before it returned. At the end (writer stopped) a final
//! close must give m = N and copies equal to the images.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use testkit::nbd::Conn;
use testkit::{assert_files_equal, read_file, DiskSpec, GroupSpec, Primary, Spec, MIB};

const SLOT: u64 = 4096;
const DISK_SIZE: u64 = 64 * MIB;
const CLOSES: usize = 20;

/// Write k goes to disk (k-1) % 2 ...
fn disk_of(k: u64) -> usize {
    ((k - 1) % 2) as usize
}

/// ... at byte offset slot_off(k) of that disk (slot 0 stays unused).
fn slot_off(k: u64) -> u64 {
    k.div_ceil(2) * SLOT
}

fn stamp(k: u64) -> Vec<u8> {
    k.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(SLOT as usize)
        .collect()
}

/// Reads both copies and returns m such that exactly {1..m} are present, or panics
/// describing the violation.
fn prefix_of(copies: [&[u8]; 2], max_k: u64, what: &str) -> u64 {
    let mut present = Vec::new();
    for k in 1..=max_k {
        let d = copies[disk_of(k)];
        let s = &d[slot_off(k) as usize..(slot_off(k) + SLOT) as usize];
        // (slices compared with a shifted copy of themselves: one memcmp each, which
        // matters in an unoptimized test build scanning thousands of slots)
        if s[0] == 0 && s[1..] == s[..s.len() - 1] {
            continue;
        }
        assert!(
            s[..8] == k.to_le_bytes() && s[8..] == s[..s.len() - 8],
            "{what}: slot {k} on disk{} holds neither nothing nor stamp {k}: first bytes {:02x?}",
            disk_of(k),
            &s[..16]
        );
        present.push(k);
    }
    let m = present.len() as u64;
    if let Some((i, &k)) = present
        .iter()
        .enumerate()
        .find(|(i, &k)| k != *i as u64 + 1)
    {
        panic!(
            "{what}: the copies are not a prefix of the write order: stamp {k} is present but stamp {} is missing \
             ({m} stamps present, highest {})",
            i + 1,
            present.last().unwrap()
        );
    }
    // Nothing but slots may differ from zero.
    for (di, d) in copies.iter().enumerate() {
        assert!(
            d[..SLOT as usize].iter().all(|&b| b == 0),
            "{what}: disk{di} slot 0 written"
        );
    }
    m
}

fn read_copies(p: &Primary) -> [Vec<u8>; 2] {
    [
        read_file(&p.copy_image("vm1", "disk0")),
        read_file(&p.copy_image("vm1", "disk1")),
    ]
}

#[test]
fn closed_cycles_are_prefixes_of_the_write_order() {
    let mut p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", DISK_SIZE),
            DiskSpec::new("disk1", DISK_SIZE),
        ],
    )]));
    let max_k = 2 * (DISK_SIZE / SLOT - 1);
    let issued = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let writer = {
        let (issued, acked, stop) = (issued.clone(), acked.clone(), stop.clone());
        let sock = p.nbd_sock();
        thread::spawn(move || {
            let mut conns = [
                Conn::connect_unix(&sock, "disk0").unwrap(),
                Conn::connect_unix(&sock, "disk1").unwrap(),
            ];
            let mut k = 1;
            while k <= max_k && !stop.load(Ordering::SeqCst) {
                issued.store(k, Ordering::SeqCst);
                conns[disk_of(k)]
                    .write(slot_off(k), &stamp(k), k % 16 == 0)
                    .unwrap_or_else(|e| panic!("write {k} failed: {e}"));
                acked.store(k, Ordering::SeqCst);
                k += 1;
                thread::sleep(Duration::from_micros(300));
            }
            for c in conns {
                c.disconnect();
            }
            k - 1
        })
    };

    let mut last_m = 0;
    let mut last_cycle = 0;
    let mut ms = Vec::new();
    let t0 = Instant::now();
    for i in 0..CLOSES {
        thread::sleep(Duration::from_millis(20 + (i as u64 * 37) % 150));
        let acked_before = acked.load(Ordering::SeqCst);
        let tc = Instant::now();
        let cycle = p.cycles_close("vm1");
        let close_took = tc.elapsed();
        let issued_after = issued.load(Ordering::SeqCst);
        assert!(
            cycle > last_cycle,
            "close {i}: cycle {cycle} not after {last_cycle}"
        );
        let copies = read_copies(&p);
        let what = format!("after close {i} (cycle {cycle})");
        let m = prefix_of([&copies[0], &copies[1]], max_k, &what);
        assert!(
            m >= acked_before,
            "{what}: only {m} writes shipped, but {acked_before} were acknowledged before the close was asked for"
        );
        assert!(
            m <= issued_after,
            "{what}: {m} writes shipped but only {issued_after} were issued"
        );
        assert!(
            m >= last_m,
            "{what}: the copy went back from {last_m} to {m} writes"
        );
        let g = p.group_status("vm1");
        assert!(
            g["cycle"]["last_acked"].as_u64().unwrap() >= cycle
                && g["cycle"]["last_closed"].as_u64().unwrap() >= cycle,
            "{what}: status does not show cycle {cycle} closed and acknowledged: {g}"
        );
        println!(
            "close {i}: cycle {cycle} took {close_took:?}, m = {m} (acked before {acked_before}, issued after {issued_after})"
        );
        last_m = m;
        last_cycle = cycle;
        ms.push(m);
    }
    stop.store(true, Ordering::SeqCst);
    let n = writer.join().unwrap();
    println!("writer did {n} writes in {:?}", t0.elapsed());
    assert!(
        n > 200,
        "the writer did only {n} writes; the test would mean little"
    );
    let concurrent = ms.iter().filter(|&&m| m < n).count();
    assert!(
        concurrent >= CLOSES / 2,
        "only {concurrent} of {CLOSES} closes happened while the writer was writing ({ms:?}, n = {n})"
    );

    let cycle = p.cycles_close("vm1");
    assert!(cycle > last_cycle);
    let copies = read_copies(&p);
    let m = prefix_of([&copies[0], &copies[1]], max_k, "after the final close");
    assert_eq!(m, n, "final close: {m} of {n} writes in the copies");
    for d in ["disk0", "disk1"] {
        assert_files_equal(
            &p.copy_image("vm1", d),
            &p.image(d),
            "copy after the final close",
        );
    }
    let img: [Vec<u8>; 2] = [read_file(&p.image("disk0")), read_file(&p.image("disk1"))];
    assert_eq!(prefix_of([&img[0], &img[1]], max_k, "images"), n);
    p.terminate();
}
