//! Replication while the disks are in use: a real `blkrep primary` and a real `blkrep
//! replica` on loopback with mutual TLS, cycles closing by themselves every second.
//!
//! - `writers_during_one_second_cycles_every_applied_cycle_is_a_primary_state`: an
//!   ordered writer (write k is sent only after write k-1 was acknowledged, each block
//!   it writes tagged with k) spreads its writes over both disks of the group while fio
//!   and qemu-io write other regions. After every cycle the replica applies, its disks
//!   are read (a snapshot is kept only if the replica reported the same applied cycle
//!   and `consistent` before and after the read) and must hold exactly the effect of
//!   writes 1..m for some m, with m between the writes acknowledged before that cycle
//!   closed and the writes issued by then (both observed through the primary's control
//!   socket, polled all along). At the end, byte equality with the primary's images.
//! - `replica_disk_full_on_tmpfs_refuses_cycles_and_resumes` (root only): the
//!   replica's storage is a 48 MiB tmpfs. A filler file leaves less free space than a
//!   delta needs, so the replica refuses the cycle at its offer; later a filler takes
//!   the space while a (bandwidth-limited) transfer is half stored, so a chunk hits
//!   ENOSPC. Each time the primary retries every interval (never suspends), the replica
//!   keeps its last applied cycle intact, and once the filler is deleted replication
//!   resumes and converges to byte equality. Last, a trimmed range (a hole on the
//!   replica) is written again with room for the transfer but not for applying it:
//!   whatever the replica does, every state it reports as a consistent applied cycle
//!   must be a state the primary had, and it catches up once space is freed.
//! - `the_ordered_prefix_check_refuses_states_no_prefix_leaves`: the prefix check on
//!   made-up states (gaps across disks, stale, torn and misplaced blocks).
#![allow(clippy::cast_possible_truncation)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use testkit::nbd::Conn;
use testkit::ordered::*;
use testkit::replica::{
    dc1, lab_certs as certs, stored_chunks, Replica, PRIMARY_HOST, REPLICA_HOST,
};
use testkit::writer::{pattern, BLOCK};
use testkit::*;

/// The last lines of both daemons' logs, for assertion messages.
fn logs(p: &Primary, replica: &Replica) -> String {
    format!(
        "---- primary log (tail) ----\n{}\n---- replica log (tail) ----\n{}",
        tail(&p.log(), 25),
        tail(&replica.log(), 25)
    )
}

// ---------------------------------------------------------------------------
// Control sockets, spoken directly (cheap enough to poll every few milliseconds)
// ---------------------------------------------------------------------------

/// One `{"op":"status"}` exchange on a daemon's control socket; the result.
fn control_status(socket: &Path) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(SHORT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"{\"op\":\"status\"}\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream.take(64 << 20))
        .read_line(&mut line)
        .map_err(|e| format!("receive: {e}"))?;
    let response: Value =
        serde_json::from_str(&line).map_err(|e| format!("answer {line:?}: {e}"))?;
    if response["ok"] == true {
        Ok(response["result"].clone())
    } else {
        Err(format!("refused: {response}"))
    }
}

/// The primary's open cycle of group vm1 (every cycle before it is closed).
fn open_cycle(ctl: &Path) -> Result<u64, String> {
    let status = control_status(ctl)?;
    status["groups"]
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["name"] == "vm1"))
        .and_then(|g| g["cycle"]["open"].as_u64())
        .ok_or_else(|| format!("no cycle.open for vm1 in {status}"))
}

/// The consumer status of group vm1.
fn consumer(p: &Primary) -> Value {
    p.group_status("vm1")["consumer"].clone()
}

/// The replica's info of vm1, if it exists.
fn replica_info(replica: &Replica) -> Option<Value> {
    let status = control_status(&replica.root.join("replica.ctl"))
        .unwrap_or_else(|e| panic!("replica status: {e}\n{}", tail(&replica.log(), 40)));
    let list = status
        .as_array()
        .cloned()
        .or_else(|| status["replicas"].as_array().cloned())
        .unwrap_or_else(|| panic!("replica status is not a list: {status}"));
    list.into_iter().find(|r| r["name"] == "vm1")
}

/// The cycle the replica's disks hold, if they hold a whole one.
fn consistent_cycle(info: Option<&Value>) -> Option<u64> {
    let info = info?;
    if info["consistent"] != true {
        return None;
    }
    info["last_applied_cycle"].as_u64()
}

/// Reads the first `len` bytes of each replica disk while no apply runs: the replica
/// must report the same applied cycle, consistent, before and after the read (an
/// apply marks the replica inconsistent before it writes anything). Returns that
/// cycle and the bytes.
fn stable_read(
    replica: &Replica,
    disks: &[PathBuf],
    len: usize,
    timeout: Duration,
) -> (u64, Vec<Vec<u8>>) {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        if let Some(read) = try_stable_read(replica, disks, len) {
            return read;
        }
        assert!(
            Instant::now() < deadline,
            "no stable read of the replica disks in {timeout:?} ({attempts} attempts): {:?}\n{}",
            replica_info(replica),
            tail(&replica.log(), 40)
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// One attempt of [`stable_read`]: None if the replica is not consistent, or an apply
/// ran during the read.
fn try_stable_read(
    replica: &Replica,
    disks: &[PathBuf],
    len: usize,
) -> Option<(u64, Vec<Vec<u8>>)> {
    let cycle = consistent_cycle(replica_info(replica).as_ref())?;
    let data: Vec<Vec<u8>> = disks.iter().map(|d| read_range(d, 0, len)).collect();
    (consistent_cycle(replica_info(replica).as_ref()) == Some(cycle)).then_some((cycle, data))
}

/// Polls `check` every 50 ms until it returns Some, or panics with `what` and `context`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            context()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sets a stop flag when dropped, so background threads end even when a test panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the control-socket poller saw: writes acknowledged before a status call that
/// showed `open` as the open cycle, and writes issued after it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    acked_before: u64,
    open: u64,
    issued_after: u64,
}

/// Writes acknowledged before cycle `c` closed (at least), and issued before it closed
/// (at most, if known).
fn cycle_bounds(samples: &[Sample], c: u64) -> (u64, Option<u64>) {
    let lower = samples
        .iter()
        .filter(|s| s.open <= c)
        .map(|s| s.acked_before)
        .max()
        .unwrap_or(0);
    let upper = samples
        .iter()
        .filter(|s| s.open > c)
        .map(|s| s.issued_after)
        .min();
    (lower, upper)
}

fn cycle_poller(
    ctl: PathBuf,
    sh: Arc<OrderedShared>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::Builder::new()
        .name("cycle-poller".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let acked_before = sh.acked.load(Ordering::SeqCst);
                let open = open_cycle(&ctl);
                let issued_after = sh.issued.load(Ordering::SeqCst);
                if let Ok(open) = open {
                    samples.lock().expect("samples").push(Sample {
                        acked_before,
                        open,
                        issued_after,
                    });
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
        .expect("spawn poller")
}

/// qemu-io writes 64 KiB patterns at random places of `[from, from + len)` of both
/// disks, one invocation after another, until `stop`. Returns the count.
fn qemu_io_loop(p: &Primary, from: u64, len: u64, stop: Arc<AtomicBool>) -> JoinHandle<u32> {
    let qemu_io = require_tool("qemu-io");
    let uris = [p.uri("disk0"), p.uri("disk1")];
    thread::Builder::new()
        .name("qemu-io".into())
        .spawn(move || {
            let mut rng = StdRng::seed_from_u64(99);
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let uri = &uris[n as usize % 2];
                let off = from + rng.gen_range(0..len / (64 * KIB)) * 64 * KIB;
                let pat = rng.gen_range(1..=255u8);
                let o = run(
                    Command::new(&qemu_io).args([
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P {pat} {off} 64k"),
                        uri,
                    ]),
                    LONG,
                );
                assert!(o.success(), "qemu-io write failed\n{}", o.report());
                n += 1;
                thread::sleep(Duration::from_millis(300));
            }
            n
        })
        .expect("spawn qemu-io")
}

#[test]
fn writers_during_one_second_cycles_every_applied_cycle_is_a_primary_state() {
    require_tool("fio");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let disk_size = 32 * MIB;
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", disk_size),
            DiskSpec::new("disk1", disk_size),
        ],
    )
    .interval("1s")
    .ring_size("256MiB")
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "retry_scale = 0.01",
    )))]));

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let sh = Arc::new(OrderedShared {
        stop: stop.clone(),
        ..OrderedShared::default()
    });
    let samples = Arc::new(Mutex::new(Vec::new()));
    let poller_stop = Arc::new(AtomicBool::new(false));
    let _poller_guard = StopOnDrop(poller_stop.clone());
    let poller = cycle_poller(
        p.layout.ctl(),
        sh.clone(),
        samples.clone(),
        poller_stop.clone(),
    );
    // Everything starts while the initial replication runs.
    let writer = ordered_writer(p.nbd_sock(), sh.clone(), 0x5eed);
    // fio: 16..24 MiB of both disks, random 4 KiB writes, 15 s.
    let fio = start_fio(&p);
    // qemu-io: 24..32 MiB.
    let qemu = qemu_io_loop(&p, 24 * MIB, 8 * MIB, stop.clone());

    let t0 = Instant::now();
    let disks = [
        replica.disk("dc1", "vm1", "disk0"),
        replica.disk("dc1", "vm1", "disk1"),
    ];
    let checked =
        check_applied_cycles_while_writing(&p, &replica, &disks, (&sh, &writer), &samples, t0);
    stop.store(true, Ordering::SeqCst);
    let n = writer
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    let qemu_writes = qemu.join().expect("qemu-io loop panicked");
    let fio = fio.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    let fio_bytes = fio_bytes_written(&fio);
    let writing_time = t0.elapsed();
    println!(
        "ordered writer: {n} writes; fio: {fio_bytes} bytes; qemu-io: {qemu_writes} writes; {} cycles checked in {writing_time:?}",
        checked.len()
    );
    assert!(n >= 1000, "the ordered writer did only {n} writes");
    assert!(fio_bytes >= MIB, "fio wrote only {fio_bytes} bytes");
    assert!(qemu_writes >= 3, "qemu-io wrote only {qemu_writes} times");
    let concurrent = checked.iter().filter(|c| c.1 < n).count();
    assert!(
        concurrent >= 8,
        "only {concurrent} checked cycles were taken while the writer wrote: {checked:?}"
    );
    let distinct = {
        let mut ms: Vec<u64> = checked.iter().map(|c| c.1).collect();
        ms.dedup();
        ms.len()
    };
    assert!(
        distinct >= 6,
        "the checked cycles show only {distinct} different write counts: {checked:?}"
    );

    check_the_final_cycle(&p, &replica, &disks, &sh, (disk_size, n));
    poller_stop.store(true, Ordering::SeqCst);
    poller.join().expect("poller panicked");
}

/// fio on both disks (16..24 MiB, random 4 KiB writes, 15 s), in a thread.
fn start_fio(p: &Primary) -> JoinHandle<Output> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=4",
        "--offset=16M",
        "--size=8M",
        "--rate=512k",
        "--time_based",
        "--runtime=15",
        "--output-format=json",
        "--verify_state_save=0",
        "--name=disk0",
        &format!("--uri={}", p.uri("disk0")),
        "--name=disk1",
        &format!("--uri={}", p.uri("disk1")),
    ])
    .current_dir(&p.layout.root);
    thread::spawn(move || run(&mut cmd, LONG))
}

/// The bytes fio's JSON report says its jobs wrote (fio must have succeeded).
fn fio_bytes_written(fio: &Output) -> u64 {
    assert!(fio.success(), "fio failed\n{}", fio.report());
    let json = &fio.stdout[fio
        .stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio\n{}", fio.report()))..];
    let fio_json: Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{}", fio.report()));
    fio_json["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| j["write"]["io_bytes"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Reads the replica's `disks` after every cycle it applies while the writers write
/// (15 s at least, and 8 cycles), each time checking they hold writes 1..m of the
/// ordered writer with m between the writes acknowledged before the cycle closed and
/// those issued by then. Returns `(cycle, m, lower bound, upper bound)` of each.
fn check_applied_cycles_while_writing(
    p: &Primary,
    replica: &Replica,
    disks: &[PathBuf; 2],
    (sh, writer): (&OrderedShared, &JoinHandle<u64>),
    samples: &Mutex<Vec<Sample>>,
    t0: Instant,
) -> Vec<(u64, u64, u64, Option<u64>)> {
    let mut checked: Vec<(u64, u64, u64, Option<u64>)> = Vec::new();
    let mut last_m = 0;
    loop {
        let elapsed = t0.elapsed();
        if elapsed >= Duration::from_secs(15) && checked.len() >= 8 {
            break;
        }
        assert!(
            elapsed < Duration::from_secs(60),
            "only {} applied cycles could be checked in {elapsed:?} ({checked:?}); consumer: {:#}\n{}",
            checked.len(),
            consumer(p),
            logs(p, replica)
        );
        assert!(
            !writer.is_finished(),
            "the ordered writer stopped early\n{}",
            logs(p, replica)
        );
        let newest = consistent_cycle(replica_info(replica).as_ref());
        if newest.is_none_or(|c| checked.last().is_some_and(|l| l.0 >= c)) {
            thread::sleep(Duration::from_millis(30));
            continue;
        }
        let (cycle, data) = stable_read(replica, disks, ORDERED_REGION as usize, LONG);
        if checked.last().is_some_and(|l| l.0 >= cycle) {
            continue;
        }
        let writes = sh.writes.lock().expect("writes").clone();
        let issued_now = sh.issued.load(Ordering::SeqCst);
        let m = ordered_prefix(&data, &writes).unwrap_or_else(|e| {
            panic!(
                "replica after cycle {cycle} ({:?} into the run): {e}\n{}",
                t0.elapsed(),
                logs(p, replica)
            )
        });
        let (lower, upper) = cycle_bounds(&samples.lock().expect("samples"), cycle);
        assert!(
            m >= lower,
            "replica after cycle {cycle}: only writes 1..={m} are there, but {lower} were acknowledged before the cycle closed\n{}",
            logs(p, replica)
        );
        assert!(
            m <= upper.unwrap_or(issued_now),
            "replica after cycle {cycle}: writes 1..={m} are there, but only {upper:?} were issued before it closed\n{}",
            logs(p, replica)
        );
        assert!(
            m >= last_m,
            "replica after cycle {cycle}: went back from {last_m} to {m} writes"
        );
        println!(
            "{:>6.2}s cycle {cycle}: writes 1..={m} (acked before close >= {lower}, issued before close <= {upper:?}, issued now {issued_now})",
            t0.elapsed().as_secs_f64()
        );
        last_m = m;
        checked.push((cycle, m, lower, upper));
    }
    checked
}

/// Writers stopped: one more cycle, and the replica equals the primary, holding all
/// `n` ordered writes; replication is healthy.
fn check_the_final_cycle(
    p: &Primary,
    replica: &Replica,
    disks: &[PathBuf; 2],
    sh: &OrderedShared,
    (disk_size, n): (u64, u64),
) {
    // Writers stopped: one more cycle, and the replica equals the primary.
    let cycle = p.cycles_close("vm1");
    let info = replica.wait_applied("vm1", cycle, LONG);
    assert_eq!(info["consistent"], true, "{info}");
    let (_, data) = stable_read(replica, disks, disk_size as usize, LONG);
    let writes = sh.writes.lock().expect("writes").clone();
    let m = ordered_prefix(&data, &writes).unwrap_or_else(|e| {
        panic!(
            "replica after the final cycle {cycle}: {e}\n{}",
            logs(p, replica)
        )
    });
    assert_eq!(
        m, n,
        "the final cycle {cycle} holds {m} of {n} ordered writes"
    );
    for (disk, replica_disk) in ["disk0", "disk1"].iter().zip(disks) {
        assert_files_equal(
            &p.image(disk),
            replica_disk,
            &format!("{disk} after the final cycle {cycle}"),
        );
    }
    let status = consumer(p);
    assert_eq!(status["state"], "replicating", "{status:#}");
    assert_eq!(status["health"], "Normal", "{status:#}");
}

// ---------------------------------------------------------------------------
// A full replica disk
// ---------------------------------------------------------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs mounted for the test; unmounted (lazily if busy) when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        let o = run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(path),
            SHORT,
        );
        if o.success() {
            Ok(Tmpfs {
                path: path.to_path_buf(),
            })
        } else {
            Err(o.report())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let o = run(Command::new("umount").arg(&self.path), SHORT);
        if !o.success() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.path), SHORT);
        }
    }
}

fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    st.blocks_available() * st.fragment_size()
}

/// Creates `path` with `len` bytes of data (really allocated, as on tmpfs).
fn fill(path: &Path, len: u64) {
    let mut f = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0xa5u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB);
        f.write_all(&chunk[..n as usize])
            .unwrap_or_else(|e| panic!("filler {}: {e}", path.display()));
        left -= n;
    }
}

/// Writes `data` at `off` of disk0 through NBD, 1 MiB per request.
fn nbd_write(p: &Primary, off: u64, data: &[u8]) {
    let mut conn = Conn::connect_unix(&p.nbd_sock(), "disk0").expect("connect disk0");
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        conn.write(off + i as u64 * MIB, piece, false)
            .unwrap_or_else(|e| panic!("NBD write at {}: {e}", off + i as u64 * MIB));
    }
    conn.flush().expect("flush");
    conn.disconnect();
}

/// Transfer files of the replica in `sub` (`received`) and their sizes.
fn transfer_files(replica: &Replica, sub: &str) -> Vec<(String, u64)> {
    let dir = replica.storage("dc1").join("vm1").join(sub);
    std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().map_or(0, |m| m.len()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the primary's consumer reports a new failure of the "retry next
/// interval" class about space, then that it keeps retrying without suspending.
/// Returns the cycle the replica holds meanwhile (checked unchanged over the retries).
fn assert_refused_and_retried(p: &Primary, replica: &Replica, what: &str) -> u64 {
    let failures_before = consumer(p)["failures"].as_u64().unwrap_or(0);
    let status = wait_for(
        &format!("{what}: a refused cycle"),
        LONG,
        || {
            let s = consumer(p);
            (s["failures"].as_u64() > Some(failures_before)).then_some(s)
        },
        || format!("{:#}\n{}", consumer(p), logs(p, replica)),
    );
    assert_eq!(
        status["failure_class"],
        "next_interval",
        "{what}: {status:#}\n{}",
        logs(p, replica)
    );
    let error = status["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("space"),
        "{what}: the error does not say the replica is out of space: {error}\n{}",
        logs(p, replica)
    );
    let held = consistent_cycle(replica_info(replica).as_ref());
    let held = held.unwrap_or_else(|| {
        panic!(
            "{what}: the replica is not consistent while it refuses cycles: {:?}\n{}",
            replica_info(replica),
            logs(p, replica)
        )
    });
    // Retried every interval (1 s), never suspended, and the replica does not move.
    let first = status["failures"].as_u64().unwrap_or(0);
    let status = wait_for(
        &format!("{what}: two more retries"),
        Duration::from_secs(30),
        || {
            let s = consumer(p);
            (s["failures"].as_u64() >= Some(first + 2)).then_some(s)
        },
        || format!("{:#}\n{}", consumer(p), logs(p, replica)),
    );
    assert_ne!(status["state"], "suspended", "{what}: {status:#}");
    assert_ne!(status["health"], "Critical", "{what}: {status:#}");
    assert_eq!(
        status["failure_class"], "next_interval",
        "{what}: {status:#}"
    );
    let info = replica_info(replica);
    assert_eq!(
        consistent_cycle(info.as_ref()),
        Some(held),
        "{what}: the replica changed while refusing cycles: {info:?}\n{}",
        logs(p, replica)
    );
    assert_eq!(
        info.as_ref().and_then(|i| i["pending_transfers"].as_u64()),
        Some(0),
        "{what}: {info:?}"
    );
    held
}

/// Waits until replication delivered a cycle after the failures and the replica
/// applied it; returns the cycle.
fn wait_recovered(p: &Primary, replica: &Replica, after: u64, what: &str) -> u64 {
    let cycle = wait_for(
        &format!("{what}: replication resumes"),
        LONG,
        || {
            let s = consumer(p);
            let delivered = s["last_delivered"].as_u64()?;
            (s["last_error"].is_null() && delivered > after).then_some(delivered)
        },
        || format!("{:#}\n{}", consumer(p), logs(p, replica)),
    );
    replica.wait_applied("vm1", cycle, LONG);
    cycle
}

#[test]
fn replica_disk_full_on_tmpfs_refuses_cycles_and_resumes() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let mut replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    // The replica's storage becomes a 48 MiB tmpfs (mounted while it is stopped).
    replica.terminate();
    let storage = replica.storage("dc1");
    std::fs::create_dir_all(&storage).expect("mkdir storage");
    let tmpfs = match Tmpfs::mount(&storage, "48m") {
        Ok(t) => t,
        Err(report) => {
            eprintln!("SKIPPED: cannot mount a tmpfs:\n{report}");
            return;
        }
    };
    replica.spawn();
    let filler = storage.join("filler.bin");

    // disk0: 8 MiB of data, then 8 MiB of hole; the replica disk is as sparse. Deltas
    // go to the data half, so applying them needs no new space on the replica.
    let disk_size = 16 * MIB;
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", disk_size)
            .init(Init::Bytes(pseudo_random(21, (8 * MIB) as usize)))],
    )
    .interval("1s")
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "bandwidth_limit = \"2MiB\"\nretry_scale = 0.01",
    )))]));
    let replica_disk = replica.disk("dc1", "vm1", "disk0");
    let full = FullReplica {
        p: &p,
        replica: &replica,
        storage: &storage,
        filler: &filler,
        replica_disk: &replica_disk,
        whole: disk_size as usize,
        t0: Instant::now(),
    };
    let (cycle_a, image_a) = full.initial_replication();
    let (cycle_b, image_b) = full.refused_at_the_offer(cycle_a, &image_a);
    full.enospc_mid_transfer(cycle_b, &image_b);
    full.room_to_transfer_but_not_to_apply();
    drop(p);
    replica.terminate();
    drop(tmpfs);
}

/// What each step of the full-replica test works on.
struct FullReplica<'a> {
    p: &'a Primary,
    replica: &'a Replica,
    /// The replica's storage, a 48 MiB tmpfs.
    storage: &'a Path,
    /// A file in it that takes the free space.
    filler: &'a Path,
    /// The replica disk of disk0.
    replica_disk: &'a PathBuf,
    /// disk0's size.
    whole: usize,
    t0: Instant,
}

impl FullReplica<'_> {
    /// The free space, once the replica's spare transfer file is deleted: it is a
    /// cache the replica drops itself when an offer finds too little space, so a
    /// filler sized to the free space beside it would leave more room than meant.
    fn free_without_spare(&self) -> u64 {
        let _ = std::fs::remove_file(self.storage.join("vm1").join("spare.part"));
        free_bytes(self.storage)
    }

    /// Initial replication, then an idle cycle: the replica equals the image. Returns
    /// the cycle and the image.
    fn initial_replication(&self) -> (u64, Vec<u8>) {
        let (p, replica, replica_disk, whole, t0) =
            (self.p, self.replica, self.replica_disk, self.whole, self.t0);
        let applied = wait_for(
            "initial replication",
            LONG,
            || {
                let s = consumer(p);
                let c = s["last_delivered"].as_u64()?;
                (s["state"] == "replicating").then_some(c)
            },
            || format!("{:#}\n{}", consumer(p), logs(p, replica)),
        );
        replica.wait_applied("vm1", applied, LONG);
        let image_a = read_file(&p.image("disk0"));
        let (cycle_a, data) = stable_read(replica, std::slice::from_ref(replica_disk), whole, LONG);
        assert_bytes_equal(&image_a, &data[0], &format!("replica at cycle {cycle_a}"));
        println!(
            "{:>6.2}s initial replication applied (cycle {cycle_a}), {} bytes free on the replica",
            t0.elapsed().as_secs_f64(),
            free_bytes(self.storage)
        );
        (cycle_a, image_a)
    }

    /// Step 1, less free space than the delta needs: the replica refuses the offer,
    /// holding cycle `cycle_a` (`image_a`); it resumes once the filler is deleted.
    /// Returns the cycle applied then and the image.
    fn refused_at_the_offer(&self, cycle_a: u64, image_a: &[u8]) -> (u64, Vec<u8>) {
        let (p, replica, replica_disk, whole, t0) =
            (self.p, self.replica, self.replica_disk, self.whole, self.t0);
        let free = self.free_without_spare();
        fill(self.filler, free.saturating_sub(4 * MIB));
        nbd_write(p, MIB, &pseudo_random(22, (6 * MIB) as usize));
        let held = assert_refused_and_retried(p, replica, "6 MiB delta, 4 MiB free");
        assert!(held >= cycle_a, "{held} < {cycle_a}");
        let (cycle, data) = stable_read(replica, std::slice::from_ref(replica_disk), whole, LONG);
        assert_eq!(cycle, held);
        assert_bytes_equal(
            image_a,
            &data[0],
            &format!("replica holding cycle {held} while full (primary image before the delta)"),
        );
        let incoming = stored_chunks(&replica.storage("dc1").join("vm1"));
        assert!(
            incoming.iter().all(|(_, len)| *len == 0),
            "a refused offer left transfer data behind: {incoming:?}"
        );
        assert!(
            transfer_files(replica, "received").is_empty(),
            "{:?}",
            transfer_files(replica, "received")
        );
        println!(
            "{:>6.2}s refused at the offer while holding cycle {held}: {}",
            t0.elapsed().as_secs_f64(),
            consumer(p)["last_error"]
        );
        std::fs::remove_file(self.filler).expect("remove filler");
        let cycle_b = wait_recovered(p, replica, held, "after the filler was deleted");
        let image_b = read_file(&p.image("disk0"));
        let (cycle, data) = stable_read(replica, std::slice::from_ref(replica_disk), whole, LONG);
        assert!(cycle >= cycle_b);
        assert_bytes_equal(
            &image_b,
            &data[0],
            &format!("replica at cycle {cycle} after space was freed"),
        );
        println!(
            "{:>6.2}s resumed: cycle {cycle_b} applied, replica equals the image",
            t0.elapsed().as_secs_f64()
        );
        (cycle_b, image_b)
    }

    /// Step 2, the space goes while a transfer is half stored: a chunk hits ENOSPC.
    /// The replica holds cycle `cycle_b` (`image_b`), and resumes once the filler is
    /// deleted.
    fn enospc_mid_transfer(&self, cycle_b: u64, image_b: &[u8]) {
        let (p, replica, replica_disk, whole, t0) =
            (self.p, self.replica, self.replica_disk, self.whole, self.t0);
        // 8 MiB: four chunks, which the 2 MiB/s limit spaces a second apart.
        nbd_write(p, 0, &pseudo_random(23, (8 * MIB) as usize));
        let deadline = Instant::now() + LONG;
        let part = loop {
            let part = stored_chunks(&replica.storage("dc1").join("vm1"))
                .into_iter()
                .find(|(_, len)| *len >= MIB);
            if let Some(part) = part {
                break part;
            }
            assert!(
                Instant::now() < deadline,
                "no transfer stored a chunk in {LONG:?}: {:#}\n{}",
                consumer(p),
                logs(p, replica)
            );
            thread::sleep(Duration::from_millis(5));
        };
        let free = self.free_without_spare();
        fill(self.filler, free.saturating_sub(MIB));
        let now = stored_chunks(&replica.storage("dc1").join("vm1"));
        assert!(
            now.iter().any(|(name, len)| *name == part.0 && *len < 8 * MIB),
            "the 8 MiB transfer was complete before the filler took the space (the test ran too slowly): {now:?}, {:?}",
            replica_info(replica)
        );
        let held = assert_refused_and_retried(p, replica, "chunk stored on a full disk");
        assert!(held >= cycle_b, "{held} < {cycle_b}");
        let (cycle, data) = stable_read(replica, std::slice::from_ref(replica_disk), whole, LONG);
        assert_eq!(cycle, held);
        assert_bytes_equal(
            image_b,
            &data[0],
            &format!(
                "replica holding cycle {held} after a chunk failed (primary image before the delta)"
            ),
        );
        assert!(
            transfer_files(replica, "received").is_empty(),
            "{:?}",
            transfer_files(replica, "received")
        );
        println!(
            "{:>6.2}s ENOSPC mid-transfer ({part:?} stored when the disk filled), holding cycle {held}: {}",
            t0.elapsed().as_secs_f64(),
            consumer(p)["last_error"]
        );
        std::fs::remove_file(self.filler).expect("remove filler");
        let cycle_c = wait_recovered(p, replica, held, "after the second filler was deleted");
        let (cycle, data) = stable_read(replica, std::slice::from_ref(replica_disk), whole, LONG);
        assert!(cycle >= cycle_c);
        assert_bytes_equal(
            &read_file(&p.image("disk0")),
            &data[0],
            &format!("replica at cycle {cycle} after space was freed again"),
        );
        let status = consumer(p);
        assert_eq!(status["state"], "replicating", "{status:#}");
        println!(
            "{:>6.2}s resumed again: cycle {cycle_c} applied, replica equals the image",
            t0.elapsed().as_secs_f64()
        );
    }

    /// Step 3, room for the transfer but not for applying it: a trimmed range (a hole
    /// on the replica again) is written anew. Whether the replica refuses such a cycle
    /// or accepts it and cannot apply it yet, it must never show anything but a whole
    /// cycle as consistent, and it must catch up once space is freed.
    fn room_to_transfer_but_not_to_apply(&self) {
        let (p, replica, replica_disk, whole, t0) =
            (self.p, self.replica, self.replica_disk, self.whole, self.t0);
        {
            let mut conn = Conn::connect_unix(&p.nbd_sock(), "disk0").expect("connect disk0");
            conn.trim(8 * MIB, (8 * MIB) as u32).expect("trim");
            conn.disconnect();
        }
        let trimmed = p.cycles_close("vm1");
        replica.wait_applied("vm1", trimmed, LONG);
        let image_c = read_file(&p.image("disk0"));
        let free = self.free_without_spare();
        fill(self.filler, free.saturating_sub(8 * MIB));
        let written = pseudo_random(24, (6 * MIB) as usize);
        nbd_write(p, 8 * MIB + 256 * KIB, &written);
        let mut image_d = image_c.clone();
        image_d[(8 * MIB + 256 * KIB) as usize..][..written.len()].copy_from_slice(&written);
        let (mut inconsistent, mut checked_states) = (0u32, 0u32);
        let window = Instant::now();
        while window.elapsed() < Duration::from_secs(7) {
            let status = consumer(p);
            assert!(
                status["state"] != "suspended" && status["health"] != "Critical",
                "a full replica suspended replication: {status:#}\n{}",
                logs(p, replica)
            );
            match try_stable_read(replica, std::slice::from_ref(replica_disk), whole) {
                Some((cycle, data)) => {
                    let (expected, which) = if cycle <= trimmed {
                        (&image_c, "before")
                    } else {
                        (&image_d, "after")
                    };
                    assert_bytes_equal(
                        expected,
                        &data[0],
                        &format!("replica reporting cycle {cycle} as applied and consistent while full (primary image {which} the 6 MiB write)"),
                    );
                    checked_states += 1;
                }
                None => inconsistent += 1,
            }
            thread::sleep(Duration::from_millis(100));
        }
        println!(
            "{:>6.2}s 7 s with room for the transfer only: {checked_states} consistent states checked, {inconsistent} samples inconsistent; primary: {}",
            t0.elapsed().as_secs_f64(),
            consumer(p)["last_error"]
        );
        std::fs::remove_file(self.filler).expect("remove filler");
        let cycle_d = p.cycles_close("vm1");
        replica.wait_applied("vm1", cycle_d, LONG);
        let (cycle, data) = stable_read(replica, std::slice::from_ref(replica_disk), whole, LONG);
        assert!(cycle >= cycle_d);
        assert_bytes_equal(
            &image_d,
            &data[0],
            &format!("replica at cycle {cycle} after the third filler was deleted"),
        );
        assert_bytes_equal(&image_d, &read_file(&p.image("disk0")), "primary image");
        println!(
            "{:>6.2}s caught up: cycle {cycle} applied, replica equals the image",
            t0.elapsed().as_secs_f64()
        );
    }
}

/// The prefix check itself: it accepts exactly the states writes 1..=m leave, and
/// names what is wrong in the others (no daemon involved).
#[test]
fn the_ordered_prefix_check_refuses_states_no_prefix_leaves() {
    let writes = vec![
        OrderedWrite {
            disk: 0,
            block: 3,
            blocks: 2,
        },
        OrderedWrite {
            disk: 1,
            block: 3,
            blocks: 1,
        },
        OrderedWrite {
            disk: 0,
            block: 4,
            blocks: 3,
        },
    ];
    let state = |m: usize| {
        let mut disks = vec![vec![0u8; ORDERED_REGION as usize]; 2];
        for (i, w) in writes.iter().take(m).enumerate() {
            let off = (w.block * BLOCK) as usize;
            let len = (w.blocks * BLOCK) as usize;
            disks[w.disk][off..off + len].copy_from_slice(&pattern(i as u64 + 1, off as u64, len));
        }
        disks
    };
    for m in 0..=3 {
        assert_eq!(ordered_prefix(&state(m), &writes), Ok(m as u64));
    }
    // Write 3 without write 2 (across disks): not a prefix.
    let mut gap = state(3);
    gap[1] = vec![0; ORDERED_REGION as usize];
    let e = ordered_prefix(&gap, &writes).expect_err("gap accepted");
    assert!(e.contains("disk1 block 3"), "{e}");
    // Write 1's block 4 where write 3 overwrote it: an older write resurfaced.
    let mut old = state(3);
    let off = (4 * BLOCK) as usize;
    old[0][off..off + BLOCK as usize].copy_from_slice(&pattern(1, off as u64, BLOCK as usize));
    let e = ordered_prefix(&old, &writes).expect_err("stale block accepted");
    assert!(e.contains("disk0 block 4 holds write 1"), "{e}");
    // A torn block: write 3's block 5 with a sector of write 1's tag.
    let mut torn = state(3);
    let off = (5 * BLOCK) as usize;
    torn[0][off + 512..off + 1024].copy_from_slice(&pattern(1, (off + 512) as u64, 512));
    let e = ordered_prefix(&torn, &writes).expect_err("torn block accepted");
    assert!(e.contains("torn or misplaced"), "{e}");
    // Data at the wrong place (write 2's block copied to disk0).
    let mut moved = state(2);
    let src = (3 * BLOCK) as usize;
    let block: Vec<u8> = moved[1][src..src + BLOCK as usize].to_vec();
    let dst = (9 * BLOCK) as usize;
    moved[0][dst..dst + BLOCK as usize].copy_from_slice(&block);
    let e = ordered_prefix(&moved, &writes).expect_err("misplaced block accepted");
    assert!(e.contains("disk0 block 9"), "{e}");
}
