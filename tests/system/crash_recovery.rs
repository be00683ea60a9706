//! Crash recovery: SIGKILL the daemon at random moments under a concurrent
//! verifying write load, recover the ring offline with `blkrep cycles apply`, and
//! check that
//!   (a) the images are readable,
//!   (b) every acknowledged write is there (allowing, per sector, any write that
//!       was in flight at the kill; see testkit/src/writer.rs for the oracle),
//!   (c) the local copy equals the image byte for byte,
//! then restart on the same ring and go on. Some rounds close a cycle while writing
//! (so there are acknowledged cycles), some kill the daemon while a close is being
//! applied.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use testkit::nbd::Conn;
use testkit::writer::{self, ThreadCfg, Writers};
use testkit::{assert_bytes_equal, read_file, DiskSpec, GroupSpec, Primary, Spec, MIB};

const ROUNDS: usize = 10;

fn seed() -> u64 {
    std::env::var("BLKREP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// The two disks of the first test: names and sizes.
const DISKS: [(&str, u64); 2] = [("disk0", 32 * MIB), ("disk1", 16 * MIB)];

#[test]
fn sigkill_under_load_then_offline_apply() {
    let seed = seed();
    println!("seed {seed} (rerun with BLKREP_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let disks = DISKS;
    let mut p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        disks.iter().map(|(n, s)| DiskSpec::new(n, *s)).collect(),
    )]));
    let sizes: Vec<u64> = disks.iter().map(|d| d.1).collect();
    let seqs = Arc::new(AtomicU64::new(1));
    let mut initial: Vec<Vec<u8>> = disks.iter().map(|(n, _)| read_file(&p.image(n))).collect();
    let mut last_cycle = 0u64;
    let mut total_writes = 0usize;
    let mut total_unacked = 0usize;
    let mut spurious_in_use: Vec<String> = Vec::new();

    for round in 0..ROUNDS {
        // Three connections: two collide on disk0's first MiB, one on disk1.
        // ~18 MiB/s in all, far below the 64 MiB ring per round.
        let cfg = |disk: usize| ThreadCfg {
            disk,
            hot_region: MIB,
            rate: 6 * MIB,
            max_blocks: 16,
            budget: 40 * MIB,
        };
        let conns: Vec<(Conn, ThreadCfg)> = [0usize, 0, 1]
            .iter()
            .map(|&d| {
                (
                    Conn::connect_unix(&p.nbd_sock(), disks[d].0).unwrap(),
                    cfg(d),
                )
            })
            .collect();
        let w = Writers::start(conns, &sizes, seqs.clone(), seed ^ round as u64);
        let t0 = Instant::now();
        let pending_close = write_then_maybe_close(&p, &w, round, &mut rng, &mut last_cycle);

        w.expect_loss();
        p.kill();
        let log = w.finish();
        total_writes += log.writes.len();
        total_unacked += log.unacked();
        println!(
            "round {round}: killed after {:?}: {} writes, {} acked, {} in flight",
            t0.elapsed(),
            log.writes.len(),
            log.acked(),
            log.unacked()
        );
        if let Some(child) = pending_close {
            await_close_after_kill(child, round, &mut last_cycle);
        }

        apply_offline(&p, round, &mut spurious_in_use);
        check_images_and_copies(&p, round, seed, &log, &mut initial);
        if round == 0 {
            check_second_apply_changes_nothing(&p, &initial);
        }
        restart_and_check_logging(&mut p, round, last_cycle);
    }
    println!("{ROUNDS} rounds, {total_writes} writes, {total_unacked} in flight at a kill");
    assert!(
        total_writes > 200 * ROUNDS / 10,
        "too few writes ({total_writes}) for the test to mean anything"
    );
    check_served_and_final_close(&mut p, &initial);
    assert!(spurious_in_use.is_empty(), "{}", spurious_in_use.join("\n"));
}

/// Lets the writers run for a random while; in some rounds closes a cycle half-way
/// (it must succeed), in others starts a close half-way that the kill will meet
/// (returned, still running).
fn write_then_maybe_close(
    p: &Primary,
    w: &Writers,
    round: usize,
    rng: &mut rand::rngs::StdRng,
    last_cycle: &mut u64,
) -> Option<std::process::Child> {
    let run_for = Duration::from_millis(rng.gen_range(150..1200));
    let t0 = Instant::now();
    let mode = round % 4;
    let mut pending_close = None;
    if mode == 1 {
        // close a cycle in the middle of the writing; must succeed
        thread::sleep(run_for / 2);
        let before = w.acked_so_far();
        let c = p.cycles_close("vm1");
        assert!(
            c > *last_cycle,
            "cycles close returned {c} after {last_cycle}"
        );
        *last_cycle = c;
        println!("round {round}: closed cycle {c} ({before} writes acked before the close)");
    } else if mode == 3 {
        // kill while a close is (probably) being applied
        thread::sleep(run_for / 2);
        let child = p
            .cycles_close_cmd("vm1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cycles close");
        pending_close = Some(child);
        thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
    }
    let el = t0.elapsed();
    if el < run_for {
        thread::sleep(run_for - el);
    }
    pending_close
}

/// A `cycles close` running when the daemon was killed must notice rather than hang;
/// if it succeeded, its cycle counts as closed.
fn await_close_after_kill(mut child: std::process::Child, round: usize, last_cycle: &mut u64) {
    // The client must notice the daemon died rather than hang.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            println!("round {round}: concurrent cycles close ended with {st}");
            if st.success() {
                let mut out = String::new();
                use std::io::Read;
                child
                    .stdout
                    .take()
                    .unwrap()
                    .read_to_string(&mut out)
                    .unwrap();
                let v: serde_json::Value = serde_json::from_str(out.trim())
                    .unwrap_or_else(|e| panic!("cycles close printed {out:?}: {e}"));
                *last_cycle = (*last_cycle).max(v["cycle"].as_u64().unwrap());
            }
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`blkrep cycles close` still running 30 s after the daemon was killed");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Offline recovery into the local copy.
fn apply_offline(p: &Primary, round: usize, spurious_in_use: &mut Vec<String>) {
    // The daemon has been reaped, so nothing holds the ring. If apply still says it
    // is in use, retry (so the rest of the round is still checked) and fail at the
    // end: an operator running apply right after a crash must not be told a
    // primary is running.
    let copy_dir = p.copy_dir("vm1");
    let t_apply = Instant::now();
    let mut o = p.cycles_apply("vm1", &copy_dir);
    let mut refusals = 0;
    while !o.success() && o.stderr.contains("in use") && t_apply.elapsed() < Duration::from_secs(10)
    {
        refusals += 1;
        thread::sleep(Duration::from_millis(20));
        o = p.cycles_apply("vm1", &copy_dir);
    }
    if refusals > 0 {
        spurious_in_use.push(format!(
            "round {round}: `cycles apply` refused {refusals} times over {:?} with \"in use by a running \
             primary\" although the killed daemon had been reaped (succeeded on retry: {})",
            t_apply.elapsed(),
            o.success()
        ));
    }
    assert!(
        o.success(),
        "round {round}: blkrep cycles apply failed\n{}",
        o.report()
    );
}

/// (a) the images are readable, (b) every acknowledged write is there, (c) the copy
/// equals the image; the images become the next round's initial content.
fn check_images_and_copies(
    p: &Primary,
    round: usize,
    seed: u64,
    log: &writer::RoundLog,
    initial: &mut [Vec<u8>],
) {
    for (i, (name, size)) in DISKS.iter().enumerate() {
        // (a) readable
        let img = read_file(&p.image(name));
        assert_eq!(img.len() as u64, *size, "{name} changed size");
        // (b) acknowledged writes present
        let errs = writer::check_disk(i, &img, &initial[i], log, 10);
        assert!(
            errs.is_empty(),
            "round {round}, seed {seed}: {name} lost or corrupted acknowledged writes:\n  {}",
            errs.join("\n  ")
        );
        // (c) the copy equals the image
        let copy = read_file(&p.copy_image("vm1", name));
        assert_bytes_equal(
            &copy,
            &img,
            &format!("round {round}, seed {seed}: copy of {name} after cycles apply"),
        );
        initial[i] = img;
    }
}

/// A second apply has nothing left to do and must leave the copy alone.
fn check_second_apply_changes_nothing(p: &Primary, initial: &[Vec<u8>]) {
    let o = p.cycles_apply("vm1", &p.copy_dir("vm1"));
    assert!(o.success(), "second cycles apply failed\n{}", o.report());
    for (i, (name, _)) in DISKS.iter().enumerate() {
        assert_bytes_equal(
            &read_file(&p.copy_image("vm1", name)),
            &initial[i],
            "copy after a second apply",
        );
    }
}

/// After SIGKILL and an offline apply, the restarted daemon goes on logging with no
/// resync, and has every closed cycle acknowledged.
fn restart_and_check_logging(p: &mut Primary, round: usize, last_cycle: u64) {
    p.restart();
    let g = p.group_status("vm1");
    assert_eq!(
        g["resync_required"].as_bool(),
        Some(false),
        "round {round}: after SIGKILL + cycles apply the restarted daemon requires a resync: {g}"
    );
    assert_eq!(
        g["tracking"].as_str(),
        Some("logging"),
        "round {round}: tracking after restart: {g}"
    );
    let acked = g["cycle"]["last_acked"].as_u64().unwrap();
    assert!(
        acked >= last_cycle,
        "round {round}: last_acked {acked} < last closed cycle {last_cycle}: {g}"
    );
}

/// The restarted daemon serves exactly the images, and a final close keeps the
/// copy equal.
fn check_served_and_final_close(p: &mut Primary, initial: &[Vec<u8>]) {
    for (i, (name, _)) in DISKS.iter().enumerate() {
        let mut c = Conn::connect_unix(&p.nbd_sock(), name).unwrap();
        let served = writer::read_export(&mut c);
        c.disconnect();
        assert_bytes_equal(
            &served,
            &initial[i],
            &format!("{name} served after the last restart"),
        );
    }
    let mut c = Conn::connect_unix(&p.nbd_sock(), "disk0").unwrap();
    c.write(0, &[0xee; 65536], false).unwrap();
    c.disconnect();
    p.cycles_close("vm1");
    for (name, _) in DISKS {
        testkit::assert_files_equal(
            &p.copy_image("vm1", name),
            &p.image(name),
            "copy after the final close",
        );
    }
    p.terminate();
}

/// The daemon restarted straight after a SIGKILL (as a service manager would),
/// with no offline apply: it must recover the ring itself, serve the images with
/// every acknowledged write, and its next close must bring the copy up to date.
#[test]
fn sigkill_then_restart_recovers_without_offline_apply() {
    let seed = seed() ^ 0x5eed;
    println!(
        "seed {seed} (rerun with BLKREP_TEST_SEED={})",
        seed ^ 0x5eed
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let disks = [("disk0", 16 * MIB), ("disk1", 16 * MIB)];
    let mut p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        disks.iter().map(|(n, s)| DiskSpec::new(n, *s)).collect(),
    )]));
    let sizes: Vec<u64> = disks.iter().map(|d| d.1).collect();
    let seqs = Arc::new(AtomicU64::new(1));
    let mut initial: Vec<Vec<u8>> = disks.iter().map(|(n, _)| read_file(&p.image(n))).collect();
    let mut not_dirty = Vec::new();
    for round in 0..5 {
        let cfg = |disk: usize| ThreadCfg {
            disk,
            hot_region: MIB,
            rate: 6 * MIB,
            max_blocks: 16,
            budget: 20 * MIB,
        };
        let conns: Vec<(Conn, ThreadCfg)> = [0usize, 1, 1]
            .iter()
            .map(|&d| {
                (
                    Conn::connect_unix(&p.nbd_sock(), disks[d].0).unwrap(),
                    cfg(d),
                )
            })
            .collect();
        let w = Writers::start(conns, &sizes, seqs.clone(), seed ^ round);
        thread::sleep(Duration::from_millis(rng.gen_range(150..900)));
        w.expect_loss();
        p.kill();
        let log = w.finish();
        println!(
            "round {round}: {} writes, {} in flight at the kill",
            log.writes.len(),
            log.unacked()
        );

        p.restart();
        let g = p.group_status("vm1");
        assert_eq!(
            g["resync_required"], false,
            "round {round}: restart after SIGKILL requires a resync: {g}"
        );
        let dirty: u64 = disks
            .iter()
            .map(|(n, _)| p.disk_status("vm1", n)["dirty_bytes"].as_u64().unwrap())
            .sum();
        for (i, (name, _)) in disks.iter().enumerate() {
            let img = read_file(&p.image(name));
            let errs = writer::check_disk(i, &img, &initial[i], &log, 10);
            assert!(
                errs.is_empty(),
                "round {round}, seed {seed}: {name}:\n  {}",
                errs.join("\n  ")
            );
            let mut c = Conn::connect_unix(&p.nbd_sock(), name).unwrap();
            assert_bytes_equal(
                &writer::read_export(&mut c),
                &img,
                &format!("round {round}: {name} served vs image"),
            );
            c.disconnect();
            initial[i] = img;
        }
        p.cycles_close("vm1");
        for (name, _) in disks {
            testkit::assert_files_equal(
                &p.copy_image("vm1", name),
                &p.image(name),
                &format!("round {round}: copy after restart (no offline apply) and a close"),
            );
        }
        if log.acked() > 0 && dirty == 0 {
            not_dirty.push(format!(
                "round {round}: after the crash and restart, {} acknowledged writes of the open cycle were pending \
                 (the close shipped them) but status showed dirty_bytes = 0",
                log.acked()
            ));
        }
    }
    p.terminate();
    assert!(not_dirty.is_empty(), "{}", not_dirty.join("\n"));
}
