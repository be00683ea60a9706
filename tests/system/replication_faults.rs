//! Faults on the replication link, with real daemons: a `blkrep primary` and a
//! `blkrep replica` as separate processes on loopback with mutual TLS (certificates
//! from `blkrep cert`), and the fault-injecting TCP proxy (`testkit::fault_proxy`)
//! between them: the primary's consumer url points at the proxy, the proxy at the
//! replica.
//!
//! The link stalls mid-chunk (the request times out and is retried), the replica is
//! SIGKILLed while receiving and while applying, the primary is SIGKILLed in the middle
//! of a delta and in the middle of the initial replication. Each time replication must
//! converge to byte equality with the primary's images (random, incompressible data,
//! written with qemu-io), and the bytes that crossed the proxy towards the replica may
//! exceed what the cycle needs by at most one chunk (2 MiB plus framing) per
//! interruption: transfers resume at the first chunk the replica lacks.
#![allow(clippy::cast_possible_truncation)]

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::fault_proxy::FaultProxy;
use testkit::replica::{
    dc1, lab_certs, LabCerts, Replica, StoredChunks, PRIMARY_HOST, REPLICA_HOST,
};
use testkit::*;

const GROUP: &str = "vm1";
const TRUST_GROUP: &str = "dc1";

/// What one chunk may cost on the wire: a frame of at most 2 MiB of records and its
/// 32-byte header (the replica accepts frames up to 2 MiB + 64 KiB), in TLS records.
const CHUNK_ON_WIRE: u64 = 2 * MIB + 64 * KIB;

/// What one interruption may cost on the wire: the frames in flight when it hit. The
/// shipping pipeline streams a transfer without waiting for each chunk, so that is
/// the upload's queue, the frame being written and the one being framed, plus what
/// the primary's socket buffer holds (4 MiB at most by Linux's default `tcp_wmem`).
/// Chunks the replica stored are never sent again.
const INTERRUPTION_ON_WIRE: u64 =
    (shipper::pipeline::upload::QUEUE_FRAMES as u64 + 2) * CHUNK_ON_WIRE + 4 * MIB;

/// Bytes the protocol adds to `frames` bytes of chunk frames: TLS records (about 22
/// bytes per 16 KiB), an HTTP request per chunk, and the short control connections
/// (offer, commit, enable), each a TLS handshake with a client certificate.
fn protocol_overhead(frames: u64) -> u64 {
    frames / 256 + 256 * KIB
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let m = bytes as f64 / MIB as f64;
    format!("{m:.2} MiB")
}

/// A primary replicating group vm1 through a fault proxy to a replica server.
/// Fields drop in order: the primary first, then the proxy, then the replica.
struct Rig {
    p: Primary,
    proxy: FaultProxy,
    replica: Replica,
    /// What the replica stored of the transfer it receives, read as it grows.
    stored: StoredChunks,
    _certs: LabCerts,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Certificates, a replica server, a proxy in front of it, and a primary whose
    /// group vm1 (`disks`) replicates through the proxy with `consumer_extra` lines
    /// in its `[group.consumer]` table. No cycle is closed yet.
    fn start(disks: Vec<DiskSpec>, consumer_extra: &str) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = lab_certs(dir.path());
        let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], replica.port)));
        let url = format!("https://{REPLICA_HOST}:{}", proxy.addr().port());
        let p = Primary::start(Spec::new(vec![GroupSpec::new(GROUP, disks)
            .consumer(Consumer::Raw(certs.consumer(
                &url,
                PRIMARY_HOST,
                consumer_extra,
            )))
            .ring_size("256MiB")]));
        Rig {
            p,
            proxy,
            replica,
            stored: StoredChunks::default(),
            _certs: certs,
            _dir: dir,
        }
    }

    /// The tails of both daemons' logs and the proxy's counters, for failure messages.
    fn logs(&self) -> String {
        let primary = self.p.log();
        let primary: Vec<&str> = primary
            .lines()
            .filter(|l| !l.contains("client connected") && !l.contains("client disconnected"))
            .collect();
        format!(
            "\n---- primary log (tail) ----\n{}\n---- replica log (tail) ----\n{}\n---- {:?}",
            tail(&primary.join("\n"), 40),
            tail(&self.replica.log(), 40),
            self.proxy
        )
    }

    fn disk_names(&self) -> Vec<String> {
        self.p.spec.disks().map(|d| d.name.clone()).collect()
    }

    /// The primary's images, in group order.
    fn images(&self) -> Vec<Vec<u8>> {
        self.disk_names()
            .iter()
            .map(|d| read_file(&self.p.image(d)))
            .collect()
    }

    /// The replica's disks, in group order.
    fn replica_disks(&self) -> Vec<Vec<u8>> {
        self.disk_names()
            .iter()
            .map(|d| read_file(&self.replica.disk(TRUST_GROUP, GROUP, d)))
            .collect()
    }

    fn assert_replica_equals(&self, expected: &[Vec<u8>], what: &str) {
        let actual = self.replica_disks();
        for ((name, want), have) in self.disk_names().iter().zip(expected).zip(&actual) {
            if want != have {
                assert_bytes_equal(
                    want,
                    have,
                    &format!(
                        "{what}: replica disk {name} (left: expected){}",
                        self.logs()
                    ),
                );
            }
        }
    }

    fn consumer(&self) -> Value {
        self.p.group_status(GROUP)["consumer"].clone()
    }

    /// Waits until `check` holds for the consumer status; returns it.
    fn wait_consumer(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.consumer();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen in {timeout:?}: {status:#}{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `probe` every `every` until it answers.
    fn poll<T>(
        &self,
        what: &str,
        timeout: Duration,
        every: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe() {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen in {timeout:?}{}",
                self.logs()
            );
            thread::sleep(every);
        }
    }

    /// The newest cycle the primary closed.
    fn last_closed(&self) -> u64 {
        let g = self.p.group_status(GROUP);
        g["cycle"]["last_closed"]
            .as_u64()
            .unwrap_or_else(|| panic!("no cycle.last_closed in {g:#}"))
    }

    fn replica_dir(&self) -> PathBuf {
        self.replica.storage(TRUST_GROUP).join(GROUP)
    }

    /// The replica's state file as it is on disk (`replica.json`, replaced atomically).
    fn replica_state(&self) -> Option<Value> {
        let path = self.replica_dir().join("replica.json");
        for _ in 0..100 {
            let Ok(bytes) = fs::read(&path) else {
                return None;
            };
            if let Ok(value) = serde_json::from_slice(&bytes) {
                return Some(value);
            }
            thread::sleep(Duration::from_millis(1));
        }
        panic!("{} stays unreadable{}", path.display(), self.logs());
    }

    /// Bytes of chunk frames the replica stored of the transfer it is receiving (not
    /// the file's length: a recycled `.part` file is longer).
    fn part_bytes(&self) -> u64 {
        self.stored
            .read(&self.replica_dir())
            .iter()
            .map(|(_, stored)| stored)
            .sum()
    }

    /// Writes `len` bytes of pseudo-random (incompressible) data at `offset` of
    /// `disk` through NBD with qemu-io, 4 MiB per request.
    fn write_random(&self, disk: &str, seed: u64, offset: u64, len: u64) {
        const PIECE: u64 = 4 * MIB;
        let mut cmd = std::process::Command::new(require_tool("qemu-io"));
        cmd.args(["-f", "raw"]);
        let mut files = Vec::new();
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            let path = self
                .p
                .layout
                .root
                .join(format!("pattern-{seed}-{done}.bin"));
            fs::write(
                &path,
                pseudo_random(seed.wrapping_mul(7919).wrapping_add(done), n as usize),
            )
            .expect("write pattern file");
            cmd.arg("-c").arg(format!(
                "write -q -s {} {} {n}",
                path.display(),
                offset + done
            ));
            files.push(path);
            done += n;
        }
        cmd.arg(self.p.uri(disk));
        run_ok(&mut cmd, LONG);
        for path in files {
            let _ = fs::remove_file(path);
        }
    }

    /// `blkrep cycles close` on a thread of its own.
    fn close_in_background(&self) -> JoinHandle<Output> {
        let mut cmd = self.p.cycles_close_cmd(GROUP);
        thread::spawn(move || run(&mut cmd, LONG))
    }

    fn join_close(&self, close: JoinHandle<Output>) -> Output {
        close
            .join()
            .unwrap_or_else(|_| panic!("`blkrep cycles close` hung{}", self.logs()))
    }

    /// Waits (polling the in-process proxy's counter closely) until at least
    /// `at_least` bytes went upstream; returns the count.
    fn wait_upstream(&self, at_least: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let up = self.proxy.upstream_bytes();
            if up >= at_least {
                return up;
            }
            assert!(
                Instant::now() < deadline,
                "only {up} of {at_least} bytes went upstream in {timeout:?}{}",
                self.logs()
            );
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// Waits until the replica stored at least `bytes` of the transfer it receives.
    fn wait_part(&self, bytes: u64, timeout: Duration) {
        self.poll(
            &format!("the replica storing {} of the transfer", mib(bytes)),
            timeout,
            Duration::from_micros(500),
            || (self.part_bytes() >= bytes).then_some(()),
        );
    }

    /// The replica's stored bytes of the transfer it receives, once they stopped
    /// changing (a chunk the killed primary's socket still flushed may land late).
    fn settled_part_bytes(&self) -> u64 {
        let mut last = (self.part_bytes(), Instant::now());
        self.poll(
            "the replica's incoming transfer to settle",
            SHORT,
            Duration::from_millis(20),
            || {
                let now = self.part_bytes();
                if now != last.0 {
                    last = (now, Instant::now());
                }
                (last.1.elapsed() >= Duration::from_millis(300)).then_some(now)
            },
        )
    }

    /// Waits until the primary delivered a cycle after `closed_before` and has no
    /// error, then until the replica applied it; returns the replica's info.
    fn wait_converged(&self, closed_before: u64, what: &str) -> Value {
        let status = self.wait_consumer(what, LONG, |s| {
            s["last_error"].is_null() && s["last_delivered"].as_u64() > Some(closed_before)
        });
        let cycle = status["last_delivered"].as_u64().expect("last_delivered");
        let info = self.replica.wait_applied(GROUP, cycle, LONG);
        assert_eq!(
            info["consistent"],
            true,
            "{what}: the replica applied cycle {cycle} but is not consistent: {info:#}{}",
            self.logs()
        );
        info
    }
}

/// A u64 field of a status object (0 when absent).
fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// 1. A stalled link: the chunk upload times out, is retried, and resumes
// ---------------------------------------------------------------------------

#[test]
fn stall_mid_chunk_times_out_and_resumes() {
    let rig = Rig::start(
        vec![DiskSpec::new("disk0", 64 * MIB)],
        // Retries 1.2 s, then 2.4 s after a failure. The limit keeps the retry's
        // stream slow enough that the second stall is armed near its start.
        "request_timeout = \"2s\"\nretry_scale = 0.02\nbandwidth_limit = \"12MiB\"",
    );
    let first = rig.p.cycles_close(GROUP);
    rig.replica.wait_applied(GROUP, first, LONG);

    // A delta of 48 MiB of random data: 24 chunks, enough that both stalls land
    // mid-transfer however much the peers' socket buffers hold.
    let data = 48 * MIB;
    rig.write_random("disk0", 1, 4 * MIB, data);
    let expected = rig.images();
    let before = rig.consumer();
    let closed_before = rig.last_closed();
    let base_up = rig.proxy.upstream_bytes();
    let started = Instant::now();

    // Two stalls, each placed by the proxy at an exact upstream byte, about 1 MiB
    // into a chunk: the first 7 MiB into the transfer, the second 5 MiB into the
    // retry's stream. After the first the link comes back as it was, so the bytes it
    // held (the rest of the chunk the primary gave up on) still reach the replica;
    // after the second the connections die with the link, so the replica never gets
    // that chunk whole and the primary sends it again.
    rig.proxy.stall_after_upstream_bytes(7 * MIB);
    let close = rig.close_in_background();
    let mut report = Vec::new();
    let mut connections_after_first = 0;
    for cut in [false, true] {
        if cut {
            rig.poll(
                "the primary's retry to connect",
                LONG,
                Duration::from_micros(200),
                || (rig.proxy.connections() > connections_after_first).then_some(()),
            );
            rig.proxy.stall_after_upstream_bytes(5 * MIB);
        }
        rig.poll(
            "the proxy's armed stall to fire",
            LONG,
            Duration::from_micros(100),
            || rig.proxy.is_stalled().then_some(()),
        );
        let at = rig.proxy.upstream_bytes();
        let stalled = Instant::now();
        let part_at_stall = rig.part_bytes();
        let failures = num(&rig.consumer(), "failures");
        let status = rig.wait_consumer(
            "the stalled chunk upload timing out",
            Duration::from_secs(30),
            |s| num(s, "failures") > failures,
        );
        let noticed = stalled.elapsed();
        if cut {
            rig.proxy.reset_all();
        }
        rig.proxy.stall(false);
        connections_after_first = rig.proxy.connections();
        let error = status["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains("did not answer within 2 s"),
            "the stall did not end in the 2 s request timeout: {status:#}{}",
            rig.logs()
        );
        assert_eq!(status["failure_class"], "network", "{status:#}");
        assert!(
            noticed > Duration::from_millis(900) && noticed < Duration::from_secs(12),
            "the stalled request failed {noticed:?} after the stall (request_timeout is 2 s){}",
            rig.logs()
        );
        report.push(format!(
            "stalled at {} of the transfer upstream, {} stored, failed after {noticed:.2?}{}",
            mib(at - base_up),
            mib(part_at_stall),
            if cut { ", connections cut" } else { "" }
        ));
        assert!(
            at - base_up > part_at_stall + 64 * KIB,
            "the stall did not land inside a chunk: {} upstream, {} stored",
            mib(at - base_up),
            mib(part_at_stall)
        );
    }
    let first_close = rig.join_close(close);
    assert!(
        !first_close.success(),
        "the close whose transfer stalled succeeded\n{}",
        first_close.report()
    );

    // The retries resume and deliver.
    let info = rig.wait_converged(closed_before, "replication after the stalls");
    let elapsed = started.elapsed();
    rig.assert_replica_equals(&expected, "after two stalls");

    // Deflate gives way to raw bytes for incompressible chunks, so the cycle's
    // compressed size is its data plus record and chunk headers (24 and 32 bytes,
    // a few per chunk).
    let frames = data + 16 * KIB;
    let after = rig.consumer();
    let counted = num(&after, "network_bytes") - num(&before, "network_bytes");
    // The primary counts the frames it handed to the network, those lost in the
    // stalls included.
    let interruptions = 2;
    assert!(
        counted >= data && counted <= frames + interruptions * INTERRUPTION_ON_WIRE,
        "{} of random data went out as {counted} bytes of frames (incompressible: {frames} and what two stalls cut off)",
        mib(data)
    );
    let up = rig.proxy.upstream_bytes() - base_up;
    let allowed = frames + interruptions * INTERRUPTION_ON_WIRE + protocol_overhead(frames);
    println!(
        "stall: {}; cycle of {} frames ({} counted as sent by the primary), {} upstream ({} more; allowed {} more), {} failures, converged in {elapsed:.2?} (cycle {})",
        report.join("; "),
        mib(frames),
        mib(counted),
        mib(up),
        mib(up.saturating_sub(frames)),
        mib(allowed - frames),
        num(&after, "failures") - num(&before, "failures"),
        info["last_applied_cycle"]
    );
    assert!(
        up < allowed,
        "{up} bytes went upstream for {frames} bytes of frames and {interruptions} interruptions (at most {allowed}){}",
        rig.logs()
    );
}

// ---------------------------------------------------------------------------
// 2. The replica SIGKILLed while receiving and while applying
// ---------------------------------------------------------------------------

/// Where a round kills the replica.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// While it receives the cycle: once this many bytes of it crossed the proxy.
    Receiving(u64),
    /// While it applies the cycle: this long after it marked itself inconsistent (the
    /// first step of applying, before any disk is written).
    Applying(Duration),
}

/// The primary's images by cycle: `(n, images)` holds for every cycle above `n`
/// (up to the next entry's `n`): the test writes only between closes.
struct History {
    states: Vec<(u64, Vec<Vec<u8>>)>,
}

impl History {
    fn at(&self, cycle: u64) -> &[Vec<u8>] {
        self.states
            .iter()
            .rev()
            .find(|(above, _)| cycle > *above)
            .unwrap_or(&self.states[0])
            .1
            .as_slice()
    }
}

/// If the replica says it is consistent at cycle N, its disks must be the primary's
/// images at cycle N. The claim is read before and after the disks; an apply that
/// starts in between first marks the replica inconsistent, so a claim that holds on
/// both sides covers the disks read. Returns the cycle checked.
fn check_consistency_claim(rig: &Rig, history: &History) -> Option<u64> {
    let before = rig.replica.info(GROUP)?;
    if before["consistent"] != true {
        return None;
    }
    let cycle = before["last_applied_cycle"].as_u64()?;
    let disks = rig.replica_disks();
    let after = rig.replica.info(GROUP)?;
    if after["consistent"] != true || after["last_applied_cycle"] != before["last_applied_cycle"] {
        return None;
    }
    for ((name, want), have) in rig.disk_names().iter().zip(history.at(cycle)).zip(&disks) {
        if want != have {
            assert_bytes_equal(
                want,
                have,
                &format!(
                    "the replica reports consistent at cycle {cycle} but disk {name} is not the primary's image at that cycle (left: expected): {after:#}{}",
                    rig.logs()
                ),
            );
        }
    }
    Some(cycle)
}

#[test]
fn replica_killed_mid_apply_restarts_and_converges() {
    let names = ["disk0", "disk1"];
    let mut rig = Rig::start(
        names.iter().map(|d| DiskSpec::new(d, 32 * MIB)).collect(),
        "retry_scale = 0.005\nrequest_timeout = \"10s\"",
    );
    let mut history = History {
        states: vec![(rig.last_closed(), rig.images())],
    };
    let first = rig.p.cycles_close(GROUP);
    rig.replica.wait_applied(GROUP, first, LONG);
    assert_eq!(check_consistency_claim(&rig, &history), Some(first));

    let rounds = [
        KillAt::Receiving(21 * MIB),
        KillAt::Applying(Duration::ZERO),
        KillAt::Receiving(44 * MIB),
        KillAt::Applying(Duration::from_millis(40)),
        KillAt::Applying(Duration::from_millis(150)),
    ];
    let (mut mid_receive, mut mid_apply) = (0, 0);
    let mut report = Vec::new();
    for (round, kill_at) in rounds.into_iter().enumerate() {
        let round_no = round as u64;
        // 48 MiB of random data over the two disks, then the cycle.
        let closed_before = rig.last_closed();
        for (i, disk) in names.iter().enumerate() {
            let seed = 100 + round_no * 10 + i as u64;
            rig.write_random(disk, seed, (round_no % 4) * 2 * MIB, 24 * MIB);
        }
        let previous = history.at(closed_before).to_vec();
        history.states.push((closed_before, rig.images()));
        let base = Base {
            up: rig.proxy.upstream_bytes(),
            frames: num(&rig.consumer(), "network_bytes"),
        };
        let killed = match kill_at {
            KillAt::Receiving(after) => {
                let killed = kill_mid_receive(&mut rig, &base, after);
                mid_receive += usize::from(killed.landed);
                killed
            }
            KillAt::Applying(delay) => {
                let killed = kill_mid_apply(&mut rig, &history, &previous, delay);
                mid_apply += usize::from(killed.landed);
                killed
            }
        };
        let (cycle, claims) = converge_checking_claims(&rig, &history, closed_before, round);
        check_round_traffic(&rig, round, &base, &killed, (claims, cycle), &mut report);
        // Only the newest state can still be reported.
        history.states.drain(..history.states.len() - 1);
    }
    println!("replica kills:\n  {}", report.join("\n  "));
    assert!(
        mid_receive >= 1,
        "no kill landed while the replica was receiving:\n{}",
        report.join("\n")
    );
    assert!(
        mid_apply >= 1,
        "no kill landed while the replica was applying:\n{}",
        report.join("\n")
    );
}

/// The counters of traffic at a round's start.
struct Base {
    /// Bytes that had crossed the proxy towards the replica.
    up: u64,
    /// Bytes of frames the primary counted as sent.
    frames: u64,
}

/// What a round's kill did.
struct Killed {
    /// For the report.
    what: String,
    /// The kill landed while the replica was receiving (or applying) the cycle.
    landed: bool,
    /// For a kill mid-receive: what the primary had sent and the replica stored when
    /// it died. The rest is what a resume may send again.
    resume_from: Option<(u64, u64)>,
}

/// Closes the cycle in the background, SIGKILLs the replica once `after` bytes of it
/// crossed the proxy, and starts it again.
fn kill_mid_receive(rig: &mut Rig, base: &Base, after: u64) -> Killed {
    let close = rig.close_in_background();
    let at = rig.wait_upstream(base.up + after, LONG);
    rig.replica.kill();
    let state = rig.replica_state().expect("replica state");
    let receiving = !state["receiving"].is_null();
    let out = rig.join_close(close);
    // The close failed with the transfer, so nothing more is in flight.
    let sent = num(&rig.consumer(), "network_bytes") - base.frames;
    let stored = rig.part_bytes();
    rig.replica.spawn();
    Killed {
        what: format!(
            "killed after {} upstream ({} sent, {} stored, receiving: {receiving}); the close {}",
            mib(at - base.up),
            mib(sent),
            mib(stored),
            if out.success() { "succeeded" } else { "failed" }
        ),
        landed: receiving,
        resume_from: Some((sent, stored)),
    }
}

/// Closes the cycle (the replica holds it durably), SIGKILLs the replica `delay`
/// after it began applying, and starts it again.
fn kill_mid_apply(
    rig: &mut Rig,
    history: &History,
    previous: &[Vec<u8>],
    delay: Duration,
) -> Killed {
    // Returns once the replica holds the cycle durably; it applies next.
    let cycle = rig.p.cycles_close(GROUP);
    let began = rig.poll(
        "the replica starting to apply",
        LONG,
        Duration::from_micros(300),
        || {
            let state = rig.replica_state()?;
            let queued = state["queue"].as_array().is_some_and(|q| !q.is_empty());
            if !queued {
                Some(false)
            } else if state["consistent"] == false {
                Some(true)
            } else {
                None
            }
        },
    );
    thread::sleep(delay);
    rig.replica.kill();
    let state = rig.replica_state().expect("replica state");
    let queued = state["queue"].as_array().is_some_and(|q| !q.is_empty());
    let during = queued && state["consistent"] == false;
    let disks = rig.replica_disks();
    let new = history.at(cycle);
    let shape = if disks == new {
        "all new"
    } else if disks == previous {
        "all old"
    } else {
        "half applied"
    };
    rig.replica.spawn();
    Killed {
        what: format!(
            "cycle {cycle}: killed {delay:?} after the apply began (seen: {began}); mid-apply: {during}; disks {shape}"
        ),
        landed: during,
        resume_from: None,
    }
}

/// After the restart, until convergence: every consistent claim is true; then the
/// replica is consistent and equals the images. Returns the cycle converged to and
/// how many claims were checked.
fn converge_checking_claims(
    rig: &Rig,
    history: &History,
    closed_before: u64,
    round: usize,
) -> (u64, usize) {
    let mut claims = 0;
    let converged = rig.poll(
        "convergence after the replica's restart",
        LONG,
        Duration::from_millis(100),
        || {
            if check_consistency_claim(rig, history).is_some() {
                claims += 1;
            }
            let s = rig.consumer();
            let delivered = s["last_delivered"].as_u64()?;
            if !s["last_error"].is_null() || delivered <= closed_before {
                return None;
            }
            let info = rig.replica.info(GROUP)?;
            (info["last_applied_cycle"].as_u64() >= Some(delivered)
                && info["pending_transfers"] == 0)
                .then_some(info)
        },
    );
    let cycle = converged["last_applied_cycle"].as_u64().expect("cycle");
    assert_eq!(
        converged["consistent"],
        true,
        "round {round}: converged but not consistent: {converged:#}{}",
        rig.logs()
    );
    assert_eq!(
        check_consistency_claim(rig, history),
        Some(cycle),
        "round {round}"
    );
    rig.assert_replica_equals(&rig.images(), &format!("round {round}: after convergence"));
    (cycle, claims)
}

/// What the round's cycle cost on the wire: a resume after a kill mid-receive sends
/// no whole chunk the replica had stored again.
fn check_round_traffic(
    rig: &Rig,
    round: usize,
    base: &Base,
    killed: &Killed,
    (claims, cycle): (usize, u64),
    report: &mut Vec<String>,
) {
    // The cycle's frames: 48 MiB of incompressible data (sent raw) and a few
    // headers per chunk. The primary counts the frames it handed to the network,
    // those in flight when the replica died included. How much was in flight
    // depends on the socket buffers of the primary, the proxy and the replica;
    // what matters is that the whole chunks the replica stored before its death
    // are not sent again: the resume sends at most the rest, plus the chunk it
    // was cut inside.
    let frames = 48 * MIB + 32 * KIB;
    let counted = num(&rig.consumer(), "network_bytes") - base.frames;
    let up = rig.proxy.upstream_bytes() - base.up;
    report.push(format!(
        "round {round}: {}; {claims} consistent claims checked; cycle {cycle}; {} counted as sent, {} upstream",
        killed.what,
        mib(counted),
        mib(up)
    ));
    assert!(
        counted >= 48 * MIB,
        "round {round}: the primary counts {counted} bytes of frames sent for 48 MiB of random data"
    );
    let allowed = match killed.resume_from {
        Some((sent, stored)) => {
            let resent = counted - sent;
            assert!(
                resent <= frames.saturating_sub(stored) + CHUNK_ON_WIRE,
                "round {round}: the resume sent {resent} bytes of frames; the replica had stored {stored} of {frames}{}",
                rig.logs()
            );
            counted
        }
        None => {
            assert!(
                counted <= frames,
                "round {round}: the primary counts {counted} bytes of frames for {frames} with no interruption"
            );
            frames
        }
    };
    assert!(
        up < allowed + protocol_overhead(frames),
        "round {round}: {up} bytes went upstream for {counted} bytes of frames sent (at most {allowed} and the protocol's overhead){}",
        rig.logs()
    );
}

// ---------------------------------------------------------------------------
// 3. The primary SIGKILLed in the middle of a delta
// ---------------------------------------------------------------------------

#[test]
fn primary_killed_mid_delta_transfer_resumes() {
    let mut rig = Rig::start(
        vec![DiskSpec::new("disk0", 32 * MIB)],
        "bandwidth_limit = \"4MiB\"\nretry_scale = 0.005\nrequest_timeout = \"10s\"",
    );
    let first = rig.p.cycles_close(GROUP);
    rig.replica.wait_applied(GROUP, first, LONG);

    // 24 MiB of random data: 12 chunks, about 6 s at 4 MiB/s.
    let data = 24 * MIB;
    rig.write_random("disk0", 3, 6 * MIB, data);
    let expected = rig.images();
    let closed_before = rig.last_closed();
    let base_up = rig.proxy.upstream_bytes();
    let close = rig.close_in_background();
    // Kill 1 MiB into the chunk after the 4th stored.
    rig.wait_part(8 * MIB, LONG);
    let from = rig.proxy.upstream_bytes();
    let at = rig.wait_upstream(from + MIB, LONG);
    rig.p.kill();
    let killed = rig.join_close(close);
    assert!(
        !killed.success(),
        "the close survived its daemon\n{}",
        killed.report()
    );
    rig.p.restart();
    let stored = rig.settled_part_bytes();
    assert!(
        stored >= 8 * MIB && stored < data,
        "the replica holds {stored} bytes of the interrupted transfer{}",
        rig.logs()
    );
    let g = rig.p.group_status(GROUP);
    assert_eq!(
        g["resync_required"], false,
        "the restart after SIGKILL requires a resync: {g:#}"
    );

    // The recovered cycle goes first, from the first chunk the replica lacks.
    let cycle = rig.p.cycles_close(GROUP);
    assert!(cycle > closed_before);
    let info = rig.replica.wait_applied(GROUP, cycle, LONG);
    assert_eq!(info["consistent"], true, "{info:#}");
    rig.assert_replica_equals(&expected, "after the primary's restart");

    let status = rig.consumer();
    let resent = num(&status, "network_bytes");
    let cycle_bytes = num(&status, "max_cycle_bytes");
    assert_eq!(
        cycle_bytes, data,
        "the recovered cycle holds {cycle_bytes} bytes, not the {data} written: {status:#}"
    );
    // Frames are re-encoded identically: what the replica held plus what was sent
    // after the restart is the cycle, once.
    let frames = stored + resent;
    assert!(
        (data..data + 64 * KIB).contains(&frames),
        "the replica held {stored} bytes and the restarted primary sent {resent}: not the cycle once ({data} bytes of data){}",
        rig.logs()
    );
    let up = rig.proxy.upstream_bytes() - base_up;
    let allowed = frames + CHUNK_ON_WIRE + protocol_overhead(frames);
    println!(
        "primary kill mid-delta: killed at {} upstream with {} stored; after the restart {} sent; {} upstream for {} of frames (allowed {})",
        mib(at - base_up),
        mib(stored),
        mib(resent),
        mib(up),
        mib(frames),
        mib(allowed)
    );
    assert!(
        up < allowed,
        "{up} bytes went upstream for a {frames}-byte cycle and one interruption (at most {allowed}){}",
        rig.logs()
    );
}

// ---------------------------------------------------------------------------
// 4. The primary SIGKILLed in the middle of the initial replication
// ---------------------------------------------------------------------------

#[test]
fn primary_killed_mid_initial_copy_resumes_without_recopying() {
    // 320 MiB of random data: a full 256 MiB resync batch and a second one of 64 MiB.
    let size = 320 * MIB;
    let mut rig = Rig::start(
        vec![DiskSpec::new("disk0", size).init(Init::Random(44))],
        "compression = false\nbandwidth_limit = \"64MiB\"\nretry_scale = 0.005\nrequest_timeout = \"20s\"",
    );
    let expected = rig.images();
    let mut report = Vec::new();

    // Kill 1: 100 MiB into batch 0.
    let close = rig.close_in_background();
    let at = rig.wait_upstream(100 * MIB, LONG);
    rig.p.kill();
    drop(rig.join_close(close));
    report.push(format!(
        "kill 1 at {} upstream ({} stored)",
        mib(at),
        mib(rig.settled_part_bytes())
    ));
    rig.p.restart();

    // Kill 2: 24 MiB into batch 1, once batch 0 is committed on the replica.
    let mut close = Some(rig.close_in_background());
    let batch1_from = rig.poll(
        "the replica committing resync batch 0",
        LONG,
        Duration::from_millis(2),
        || {
            let state = rig.replica_state()?;
            let finished = state["resync_epoch"].is_null() && state["last_received_cycle"].is_u64();
            if num(&state, "resync_next_batch") >= 1 || finished {
                return Some(rig.proxy.upstream_bytes());
            }
            if close.as_ref().is_some_and(JoinHandle::is_finished) {
                // The attempt ended (a failure): the administrator closes again.
                let out = rig.join_close(close.take().expect("close"));
                report.push(format!("a close ended before batch 1: {}", out.status));
                thread::sleep(Duration::from_millis(200));
                close = Some(rig.close_in_background());
            }
            None
        },
    );
    let batch0 = rig.replica_state().expect("replica state");
    let at = rig.wait_upstream(batch1_from + 24 * MIB, LONG);
    rig.p.kill();
    if let Some(close) = close.take() {
        drop(rig.join_close(close));
    }
    report.push(format!(
        "batch 0 committed at {} upstream, ending at byte {} of the disk; kill 2 at {} upstream ({} stored of batch {})",
        mib(batch1_from),
        batch0["resync_position"]["offset"],
        mib(at),
        mib(rig.settled_part_bytes()),
        batch0["resync_next_batch"]
    ));
    rig.p.restart();

    let cycle = rig.p.cycles_close(GROUP);
    let info = rig.replica.wait_applied(GROUP, cycle, LONG);
    assert_eq!(info["consistent"], true, "{info:#}");
    rig.assert_replica_equals(&expected, "after the initial replication");
    let up = rig.proxy.upstream_bytes();
    let interruptions = 2;
    let allowed = size + interruptions * CHUNK_ON_WIRE + protocol_overhead(size);
    println!(
        "primary kills mid initial copy: {}; {} upstream for {} of data (allowed {})",
        report.join("; "),
        mib(up),
        mib(size),
        mib(allowed)
    );
    assert!(
        up < allowed,
        "{} went upstream for an initial copy of {} with {interruptions} interruptions (at most {}): the copy did not resume where it stopped\n{}{}",
        mib(up),
        mib(size),
        mib(allowed),
        report.join("\n"),
        rig.logs()
    );
}
