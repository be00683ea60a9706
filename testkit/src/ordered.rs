//! The ordered writer and its prefix check: write k is sent only after write k-1 was
//! acknowledged, each block it writes tagged with k, spread over two disks; a state of
//! the disks is one the primary had if it holds exactly the effect of writes 1..m for
//! some m.
// Offsets, blocks and sequence numbers of test disks (a few hundred MiB) fit usize.
#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nbd::Conn;
use crate::writer::{describe_sector, pattern, BLOCK};
use crate::MIB;

/// Bytes of each disk the ordered writer owns (fio and qemu-io write beyond).
pub const ORDERED_REGION: u64 = 16 * MIB;
/// 4 KiB blocks of each disk the ordered writer owns.
pub const ORDERED_BLOCKS: u64 = ORDERED_REGION / BLOCK;
/// Half the writes land in the first blocks, so writes overwrite each other often.
pub const HOT_BLOCKS: u64 = 256;
/// Ordered writes per second at most.
pub const ORDERED_RATE: f64 = 700.0;

/// Write k (1-based) of the ordered writer.
#[derive(Debug, Clone, Copy)]
pub struct OrderedWrite {
    /// The disk it goes to: 0 or 1.
    pub disk: usize,
    /// Its first 4 KiB block.
    pub block: u64,
    /// How many blocks it writes.
    pub blocks: u64,
}

/// What the ordered writer and the test share: the writes and how far they got.
#[derive(Debug, Default)]
pub struct OrderedShared {
    /// Write k at index k-1, recorded before it is sent.
    pub writes: Mutex<Vec<OrderedWrite>>,
    /// The newest write sent, and the newest acknowledged.
    pub issued: AtomicU64,
    /// The newest write acknowledged.
    pub acked: AtomicU64,
    /// Set to stop the writer after its current write.
    pub stop: Arc<AtomicBool>,
    /// The daemon may die under the writer: a failed write ends it instead of failing
    /// the test.
    pub may_fail: AtomicBool,
}

/// The next write of an ordered writer: 1 to 4 blocks on either
/// disk, in the hot blocks half of the time.
pub fn draw_ordered_write(rng: &mut StdRng) -> OrderedWrite {
    let disk = rng.gen_range(0..2usize);
    let blocks = rng.gen_range(1..=4u64);
    let limit = if rng.gen_bool(0.5) {
        HOT_BLOCKS
    } else {
        ORDERED_BLOCKS
    };
    OrderedWrite {
        disk,
        block: rng.gen_range(0..=limit - blocks),
        blocks,
    }
}

/// Writes k = 1, 2, ... one at a time over one connection per disk; each 16-byte unit
/// of write k holds `[k, offset]` ([`crate::writer::pattern`]). Returns the count.
pub fn ordered_writer(sock: PathBuf, sh: Arc<OrderedShared>, seed: u64) -> JoinHandle<u64> {
    thread::Builder::new()
        .name("ordered-writer".into())
        .spawn(move || {
            let mut conns = [
                Conn::connect_unix(&sock, "disk0").expect("connect disk0"),
                Conn::connect_unix(&sock, "disk1").expect("connect disk1"),
            ];
            let mut rng = StdRng::seed_from_u64(seed);
            let start = Instant::now();
            let mut k = 0u64;
            while !sh.stop.load(Ordering::SeqCst) {
                k += 1;
                let write = draw_ordered_write(&mut rng);
                let OrderedWrite {
                    disk,
                    block,
                    blocks,
                } = write;
                sh.writes.lock().expect("writes").push(write);
                sh.issued.store(k, Ordering::SeqCst);
                let off = block * BLOCK;
                let data = pattern(k, off, (blocks * BLOCK) as usize);
                if let Err(e) = conns[disk].write(off, &data, k % 32 == 0) {
                    assert!(
                        sh.may_fail.load(Ordering::SeqCst),
                        "ordered write {k} (disk{disk} @{off}) failed: {e}"
                    );
                    return k - 1;
                }
                sh.acked.store(k, Ordering::SeqCst);
                if k % 200 == 0 {
                    if let Err(e) = conns[disk].flush() {
                        assert!(
                            sh.may_fail.load(Ordering::SeqCst),
                            "FLUSH after write {k} failed: {e}"
                        );
                        return k;
                    }
                }
                let due = Duration::from_secs_f64(k as f64 / ORDERED_RATE);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    thread::sleep(wait);
                }
            }
            for c in conns {
                c.disconnect();
            }
            k
        })
        .expect("spawn writer")
}

/// True if `s` is all zeroes (one memcmp; the test build is unoptimised).
pub fn is_zero(s: &[u8]) -> bool {
    s[0] == 0 && s[1..] == s[..s.len() - 1]
}

/// Finds m such that the ordered regions of `disks` hold exactly the effect of writes
/// 1..=m of `writes` (every block: the last of those writes covering it, or zeroes).
pub fn ordered_prefix(disks: &[Vec<u8>], writes: &[OrderedWrite]) -> Result<u64, String> {
    let bs = BLOCK as usize;
    let mut found = vec![vec![0u64; ORDERED_BLOCKS as usize]; disks.len()];
    let mut errors = Vec::new();
    for (d, data) in disks.iter().enumerate() {
        for b in 0..ORDERED_BLOCKS as usize {
            let block = &data[b * bs..(b + 1) * bs];
            if is_zero(block) {
                continue;
            }
            let seq = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
            if seq == 0 || seq > writes.len() as u64 {
                errors.push(format!(
                    "disk{d} block {b} holds no write of the ordered writer: first bytes {:02x?}",
                    &block[..16]
                ));
            } else {
                found[d][b] = seq;
            }
        }
    }
    let m = found.iter().flatten().copied().max().unwrap_or(0);
    let mut last = vec![vec![0u64; ORDERED_BLOCKS as usize]; disks.len()];
    for (i, w) in writes.iter().take(m as usize).enumerate() {
        for b in w.block..w.block + w.blocks {
            last[w.disk][b as usize] = i as u64 + 1;
        }
    }
    for (d, data) in disks.iter().enumerate() {
        for b in 0..ORDERED_BLOCKS as usize {
            if errors.len() >= 8 {
                break;
            }
            let (got, want) = (found[d][b], last[d][b]);
            if got != want {
                let describe = |k: u64| {
                    if k == 0 {
                        "nothing (zeroes)".to_string()
                    } else {
                        let w = writes[k as usize - 1];
                        format!(
                            "write {k} (disk{} blocks {}..{})",
                            w.disk,
                            w.block,
                            w.block + w.blocks
                        )
                    }
                };
                errors.push(format!(
                    "disk{d} block {b} holds {} but after writes 1..={m} it must hold {}",
                    describe(got),
                    describe(want)
                ));
                continue;
            }
            if want > 0 {
                let block = &data[b * bs..(b + 1) * bs];
                if block != pattern(want, (b * bs) as u64, bs).as_slice() {
                    errors.push(format!(
                        "disk{d} block {b} is not write {want}'s data (torn or misplaced): {}",
                        describe_sector(
                            &block[block
                                .chunks(512)
                                .zip(pattern(want, (b * bs) as u64, bs).chunks(512))
                                .position(|(x, y)| x != y)
                                .unwrap_or(0)
                                * 512..][..512]
                        )
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(m)
    } else {
        Err(format!(
            "the disks hold no prefix of the write order (highest write present: {m}):\n  {}",
            errors.join("\n  ")
        ))
    }
}
