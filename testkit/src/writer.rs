//! A verifying writer: threads that each drive one NBD connection with random 4 KiB
//! aligned writes (4–64 KiB) and occasional WRITE_ZEROES, recording every request
//! before it is sent and its acknowledgement once the reply arrived, and a checker
//! that decides whether an image is a state the disk may legitimately be in.
//!
//! Content of a data write: every 16-byte unit at absolute offset `p` holds
//! `[seq as u64 LE, p as u64 LE]`, so each 512-byte sector names the write and the
//! place it belongs to; WRITE_ZEROES produce zeroes.
//!
//! Oracle (per 512-byte sector, per disk): with a logical clock ticked before each
//! send (`issue`) and after each reply (`ack`), a write W can be the final content
//! of a sector unless some *acknowledged* write W' covering it was issued after W
//! was acknowledged (then W' certainly landed later). Unacknowledged writes (in
//! flight when the daemon died, or refused at shutdown) may or may not have landed,
//! so they are always candidates. The content from before the round is a candidate
//! only if no acknowledged write covers the sector. A sector may be torn between
//! candidates of the same block, so each sector is judged on its own.
// Offsets, blocks and sequence numbers of test disks (a few hundred MiB) fit usize.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nbd::Conn;

/// Writes are aligned to 4 KiB blocks.
pub const BLOCK: u64 = 4096;
/// Images are judged per 512-byte sector.
pub const SECTOR: usize = 512;

/// One request of a writer thread, recorded before it is sent.
#[derive(Debug, Clone)]
pub struct WriteRec {
    /// Its sequence number (the pattern's tag).
    pub seq: u64,
    /// The disk (index into the test's disks).
    pub disk: usize,
    /// The writer thread (connection) that sent it.
    pub conn: usize,
    /// Its offset in bytes.
    pub off: u64,
    /// Its length in bytes.
    pub len: u64,
    /// A WRITE_ZEROES rather than a data write.
    pub zero: bool,
    /// Sent with FUA.
    pub fua: bool,
    /// The logical clock when it was sent.
    pub issue: u64,
    /// The logical clock when its reply arrived, if it did.
    pub ack: Option<u64>,
}

impl WriteRec {
    fn covers_block(&self, b: u64) -> bool {
        let s = b * BLOCK;
        self.off < s + BLOCK && s < self.off + self.len
    }
}

/// The bytes a data write of `seq` puts at `off..off+len`.
pub fn pattern(seq: u64, off: u64, len: usize) -> Vec<u8> {
    assert!(off % 16 == 0 && len % 16 == 0);
    let mut v = Vec::with_capacity(len);
    let mut p = off;
    while v.len() < len {
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&p.to_le_bytes());
        p += 16;
    }
    v
}

/// The expected bytes of write `w` at sector `sector_off` (absolute), or None if `w`
/// does not cover that sector.
fn expected_sector(w: &WriteRec, sector_off: u64) -> Option<Vec<u8>> {
    if sector_off < w.off || sector_off + SECTOR as u64 > w.off + w.len {
        return None;
    }
    Some(if w.zero {
        vec![0; SECTOR]
    } else {
        pattern(w.seq, sector_off, SECTOR)
    })
}

/// Settings of one writer thread.
#[derive(Debug, Clone)]
pub struct ThreadCfg {
    /// Index of the disk this connection writes to (into the `disk_sizes` given to `start`).
    pub disk: usize,
    /// Writes go to `[0, hot_region)` with probability 1/2 (so connections collide).
    pub hot_region: u64,
    /// Bytes per second this thread writes at most.
    pub rate: u64,
    /// Largest write in 4 KiB blocks (1..=max_blocks).
    pub max_blocks: u64,
    /// Stop after this many bytes (budget, e.g. to stay below the ring size).
    pub budget: u64,
}

#[derive(Debug, Default)]
struct Shared {
    clock: AtomicU64,
    stop: AtomicBool,
    /// Set just before the test kills or stops the daemon: from then on connection
    /// errors (and ESHUTDOWN-style refusals) are expected.
    expect_loss: AtomicBool,
    recs: Mutex<Vec<WriteRec>>,
    errors: Mutex<Vec<String>>,
    bytes: AtomicU64,
}

/// A set of running writer threads.
#[derive(Debug)]
pub struct Writers {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

/// What a round of writing did.
#[derive(Debug, Default)]
pub struct RoundLog {
    /// Every request, in the order sent.
    pub writes: Vec<WriteRec>,
}

impl RoundLog {
    /// Requests acknowledged.
    pub fn acked(&self) -> usize {
        self.writes.iter().filter(|w| w.ack.is_some()).count()
    }
    /// Requests sent and never acknowledged.
    pub fn unacked(&self) -> usize {
        self.writes.len() - self.acked()
    }
}

impl Writers {
    /// Starts one thread per connection. `next_seq` is the first sequence number
    /// (keep it unique across rounds); `seed` makes the run reproducible.
    pub fn start(
        conns: Vec<(Conn, ThreadCfg)>,
        disk_sizes: &[u64],
        next_seq: Arc<AtomicU64>,
        seed: u64,
    ) -> Writers {
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::new();
        for (i, (conn, cfg)) in conns.into_iter().enumerate() {
            let sh = shared.clone();
            let size = disk_sizes[cfg.disk];
            let seqs = next_seq.clone();
            let rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64 * 7919));
            handles.push(
                thread::Builder::new()
                    .name(format!("writer{i}"))
                    .spawn(move || writer_thread(i, conn, cfg, size, &sh, &seqs, rng))
                    .expect("spawn writer"),
            );
        }
        Writers { shared, handles }
    }

    /// From now on a dropped connection is expected (the test is about to kill or
    /// stop the daemon).
    pub fn expect_loss(&self) {
        self.shared.expect_loss.store(true, Ordering::SeqCst);
    }

    /// Bytes acknowledged so far.
    pub fn bytes_written(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Requests acknowledged so far.
    pub fn acked_so_far(&self) -> usize {
        self.shared
            .recs
            .lock()
            .expect("recs")
            .iter()
            .filter(|w| w.ack.is_some())
            .count()
    }

    /// Stops the threads, joins them and returns the log. Panics on any unexpected
    /// error (a server error reply, or a lost connection before `expect_loss`).
    pub fn finish(self) -> RoundLog {
        self.shared.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        let errors = self.shared.errors.lock().expect("errors").clone();
        assert!(
            errors.is_empty(),
            "writer errors:\n  {}",
            errors.join("\n  ")
        );
        let writes = std::mem::take(&mut *self.shared.recs.lock().expect("recs"));
        RoundLog { writes }
    }
}

fn writer_thread(
    idx: usize,
    mut conn: Conn,
    cfg: ThreadCfg,
    size: u64,
    sh: &Shared,
    seqs: &AtomicU64,
    mut rng: StdRng,
) {
    let start = Instant::now();
    let mut written: u64 = 0;
    while !sh.stop.load(Ordering::SeqCst) && written < cfg.budget {
        let blocks = rng.gen_range(1..=cfg.max_blocks);
        let len = blocks * BLOCK;
        let region = if rng.gen_bool(0.5) {
            cfg.hot_region.min(size)
        } else {
            size
        };
        let region = region.max(len);
        let off = rng.gen_range(0..=(region - len) / BLOCK) * BLOCK;
        let zero = rng.gen_bool(0.05);
        let fua = rng.gen_bool(0.1);
        let seq = seqs.fetch_add(1, Ordering::SeqCst);
        let data = if zero {
            Vec::new()
        } else {
            pattern(seq, off, usize::try_from(len).expect("len"))
        };
        let rec_idx = {
            let mut recs = sh.recs.lock().expect("recs");
            let issue = sh.clock.fetch_add(1, Ordering::SeqCst);
            recs.push(WriteRec {
                seq,
                disk: cfg.disk,
                conn: idx,
                off,
                len,
                zero,
                fua,
                issue,
                ack: None,
            });
            recs.len() - 1
        };
        let r = if zero {
            conn.write_zeroes(
                off,
                u32::try_from(len).expect("len"),
                rng.gen_bool(0.5),
                fua,
            )
        } else {
            conn.write(off, &data, fua)
        };
        match r {
            Ok(()) => {
                let ack = sh.clock.fetch_add(1, Ordering::SeqCst);
                sh.recs.lock().expect("recs")[rec_idx].ack = Some(ack);
            }
            Err(e) => {
                if !sh.expect_loss.load(Ordering::SeqCst) {
                    sh.errors.lock().expect("errors").push(format!(
                        "connection {idx} ({}): {} of {len} bytes at {off} (seq {seq}) failed while the daemon should be up: {e}",
                        conn.export,
                        if zero { "WRITE_ZEROES" } else { "WRITE" }
                    ));
                }
                return;
            }
        }
        written += len;
        sh.bytes.fetch_add(len, Ordering::Relaxed);
        if rng.gen_bool(0.02) {
            if let Err(e) = conn.flush() {
                if !sh.expect_loss.load(Ordering::SeqCst) {
                    sh.errors
                        .lock()
                        .expect("errors")
                        .push(format!("connection {idx}: FLUSH failed: {e}"));
                }
                return;
            }
        }
        // Rate limit.
        let due = Duration::from_secs_f64(written as f64 / cfg.rate as f64);
        let el = start.elapsed();
        if due > el {
            thread::sleep(due - el);
        }
    }
    // Budget spent or told to stop: idle until stop so the round's timing is the
    // test's, then leave the connection (a disconnect might race the kill).
    while !sh.stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(5));
    }
    if !sh.expect_loss.load(Ordering::SeqCst) {
        conn.disconnect();
    }
}

/// Checks `image` (disk `disk`) against the writes of one round that started from
/// `initial`. Returns a description of every violation (at most `max_report`).
pub fn check_disk(
    disk: usize,
    image: &[u8],
    initial: &[u8],
    log: &RoundLog,
    max_report: usize,
) -> Vec<String> {
    assert_eq!(image.len(), initial.len(), "image size changed");
    let nblocks = image.len() as u64 / BLOCK;
    let mut per_block: Vec<Vec<usize>> =
        vec![Vec::new(); usize::try_from(nblocks).expect("nblocks")];
    for (i, w) in log.writes.iter().enumerate() {
        if w.disk != disk {
            continue;
        }
        for b in w.off / BLOCK..(w.off + w.len).div_ceil(BLOCK) {
            per_block[b as usize].push(i);
        }
    }
    let mut errs = Vec::new();
    for b in 0..nblocks {
        let bs = (b * BLOCK) as usize;
        let be = bs + BLOCK as usize;
        let ws: Vec<&WriteRec> = per_block[b as usize]
            .iter()
            .map(|&i| &log.writes[i])
            .collect();
        if ws.is_empty() {
            if image[bs..be] != initial[bs..be] {
                errs.push(format!(
                    "disk {disk} block {b} (offset {bs}) changed although no write covered it: {}",
                    describe_sector(&image[bs..bs + SECTOR])
                ));
            }
            continue;
        }
        debug_assert!(ws.iter().all(|w| w.covers_block(b)));
        let max_acked_issue = ws.iter().filter(|w| w.ack.is_some()).map(|w| w.issue).max();
        let cands: Vec<&WriteRec> = ws
            .iter()
            .copied()
            .filter(|w| match (w.ack, max_acked_issue) {
                (None, _) => true,
                (Some(a), Some(m)) => a > m,
                (Some(_), None) => unreachable!(),
            })
            .collect();
        let initial_ok = max_acked_issue.is_none();
        for s in (bs..be).step_by(SECTOR) {
            let got = &image[s..s + SECTOR];
            let ok = (initial_ok && got == &initial[s..s + SECTOR])
                || cands
                    .iter()
                    .any(|w| expected_sector(w, s as u64).is_some_and(|e| e == got));
            if !ok {
                let hist: Vec<String> = ws
                    .iter()
                    .map(|w| {
                        format!(
                            "seq {} conn {} {}{} {}+{} issue {} ack {}",
                            w.seq,
                            w.conn,
                            if w.zero { "ZERO" } else { "WRITE" },
                            if w.fua { "(fua)" } else { "" },
                            w.off,
                            w.len,
                            w.issue,
                            w.ack
                                .map_or("NONE (in flight)".to_string(), |a| a.to_string())
                        )
                    })
                    .collect();
                errs.push(format!(
                    "disk {disk} sector at offset {s} (block {b}) holds {}; allowed: {}{}; writes covering the block:\n      {}",
                    describe_sector(got),
                    if initial_ok { "the previous content, " } else { "" },
                    cands.iter().map(|w| format!("seq {}", w.seq)).collect::<Vec<_>>().join(", "),
                    hist.join("\n      ")
                ));
                break;
            }
        }
        if errs.len() >= max_report {
            break;
        }
    }
    errs
}

/// A short human description of a sector's content.
pub fn describe_sector(s: &[u8]) -> String {
    if s.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    let seq = u64::from_le_bytes(s[0..8].try_into().expect("8"));
    let p = u64::from_le_bytes(s[8..16].try_into().expect("8"));
    format!(
        "data tagged seq {seq} offset {p} (first bytes {:02x?})",
        &s[..16]
    )
}

/// Reads a whole export through `conn` (for checking what the daemon serves).
pub fn read_export(conn: &mut Conn) -> Vec<u8> {
    conn.read_all()
        .unwrap_or_else(|e| panic!("reading export {}: {e}", conn.export))
}
