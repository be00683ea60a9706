//! The soak run (`scripts/soak.sh --minutes N`): the whole system for N minutes under
//! faults, then checked.
//!
//! A primary daemon with four groups of two disks replicates every second through the
//! fault proxy to replica daemon B. Ordered writers write to vm1 and vm2 (each across
//! both disks of its group), verifying writers to vm3 and vm4. At seeded random
//! moments the driver SIGKILLs and restarts either daemon, cuts, stalls or refuses the
//! link, and runs a test failover of a recovery point (which must be a prefix of
//! the ordered writes). Once an hour, and at least once in any run, vm4 goes through a
//! planned failover to B and a failback to the original site (served by replica
//! daemon A from then on, replicating back to B).
//!
//! At the end the writers stop, replication catches up, and the run fails unless every
//! replica disk equals its primary byte for byte, every recovery point of vm1 and vm2
//! holds a prefix of the ordered writes, and every disk holds every acknowledged write
//! of the verifying writers.
//!
//! Settings come from the environment (the script sets them): BLKREP_SOAK_MINUTES
//! (default 2), BLKREP_SOAK_SEED (default: from the clock), BLKREP_SOAK_REPORT (a
//! markdown report is written there), BLKREP_SOAK_LOGS (both daemons' logs are copied
//! there at the end, passed or failed), BLKREP_SOAK_COMMIT (named in the report).
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use testkit::fault_proxy::FaultProxy;
use testkit::nbd::Conn;
use testkit::ordered::{ordered_prefix, OrderedWrite, ORDERED_REGION};
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::soak::{machine_description, ReconnectingOrderedWriter, Samples, StatusSampler};
use testkit::writer::{self, pattern, RoundLog, ThreadCfg, Writers};
use testkit::*;

const TRUST_GROUP: &str = "dc1";
/// Groups written by ordered writers; their recovery points are prefix-checked.
const ORDERED_GROUPS: [&str; 2] = ["vm1", "vm2"];
/// Groups written by verifying writers.
const VERIFYING_GROUPS: [&str; 2] = ["vm3", "vm4"];
/// The group that goes through planned failover and failback.
const FAILOVER_GROUP: &str = "vm4";
const DISK_SIZE: u64 = ORDERED_REGION;
/// Ordered writes per second, per ordered group.
const ORDERED_RATE: f64 = 150.0;
/// Bytes per second of each verifying connection (two per disk).
const VERIFYING_RATE: u64 = 256 * KIB;
/// Additional recovery points kept for the ordered groups.
const POINTS: &str = "4";
/// At least this far apart, so the points kept span the last half minute.
const POINT_SPACING: &str = "6s";
/// The first planned failover comes at half the run, at most this far in; the next
/// ones an hour apart.
const FIRST_PLANNED: Duration = Duration::from_secs(30 * 60);
const PLANNED_EVERY: Duration = Duration::from_secs(60 * 60);
/// How long writers run on the replica site between the failover and the failback.
const WRITES_AWAY: Duration = Duration::from_secs(3);

fn disk_names(group: &str) -> [String; 2] {
    [format!("{group}-d0"), format!("{group}-d1")]
}

/// Where a group's disks are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Primary,
    /// Replica daemon A: the original site's replica server (failback target).
    A,
    /// Replica daemon B: the replica the primary replicates to.
    B,
}

#[derive(Debug)]
struct Settings {
    minutes: f64,
    seed: u64,
    report: Option<PathBuf>,
    logs: Option<PathBuf>,
    commit: String,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let minutes = var("BLKREP_SOAK_MINUTES").map_or(2.0, |m| {
            m.parse::<f64>()
                .ok()
                .filter(|m| *m > 0.0)
                .unwrap_or_else(|| panic!("BLKREP_SOAK_MINUTES={m:?} is not a positive number"))
        });
        let seed = var("BLKREP_SOAK_SEED").map_or_else(
            || {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64
                    % 1_000_000_000
            },
            |s| {
                s.parse()
                    .unwrap_or_else(|_| panic!("BLKREP_SOAK_SEED={s:?} is not a number"))
            },
        );
        Settings {
            minutes,
            seed,
            report: var("BLKREP_SOAK_REPORT").map(PathBuf::from),
            logs: var("BLKREP_SOAK_LOGS").map(PathBuf::from),
            commit: var("BLKREP_SOAK_COMMIT").unwrap_or_else(|| "unknown".into()),
        }
    }
}

/// A group written by verifying writers, in rounds that end whenever its daemon is
/// killed or its disks move; the rounds' records add up to one log.
#[derive(Debug)]
struct VerifyingGroup {
    name: &'static str,
    /// Its first disk's index in the writers' disk numbering (the second follows).
    first_disk: usize,
    site: Site,
    writers: Option<Writers>,
    log: RoundLog,
    /// The logical clock value the next round starts at: rounds follow each other, so
    /// shifting each round's clock keeps the oracle's order across rounds.
    clock_base: u64,
    bytes: u64,
}

impl VerifyingGroup {
    fn export(&self, disk: &str) -> String {
        match self.site {
            Site::Primary => disk.to_string(),
            Site::A | Site::B => format!("{}/{disk}", self.name),
        }
    }

    fn end_round(&mut self) {
        let Some(writers) = self.writers.take() else {
            return;
        };
        self.bytes += writers.bytes_written();
        let round = writers.finish();
        let mut next_base = self.clock_base;
        for mut w in round.writes {
            w.issue += self.clock_base;
            w.ack = w.ack.map(|a| a + self.clock_base);
            next_base = next_base.max(w.ack.unwrap_or(w.issue) + 1).max(w.issue + 1);
            self.log.writes.push(w);
        }
        self.clock_base = next_base;
    }
}

/// Counts for the report.
#[derive(Debug, Default)]
struct Counts {
    primary_kills: u64,
    replica_kills: u64,
    link_resets: u64,
    link_stalls: u64,
    link_refusals: u64,
    link_cuts: u64,
    test_failovers: u64,
    planned_failovers: u64,
    /// Planned failover attempts a link fault interrupted (tried again unless the
    /// replica had taken over).
    planned_failovers_interrupted: u64,
    failbacks: u64,
}

impl Counts {
    fn link_faults(&self) -> u64 {
        self.link_resets + self.link_stalls + self.link_refusals + self.link_cuts
    }
}

/// Everything a run holds. Dropped in field order after `Drop::drop` copied the logs:
/// the primary first, then the proxy, then the replicas.
struct Soak {
    settings: Settings,
    rng: StdRng,
    /// When the daemons were started, and when the faults began.
    begun: Instant,
    started: Instant,
    p: Primary,
    proxy: FaultProxy,
    replica_b: Replica,
    replica_a: Replica,
    certs: LabCerts,
    ordered: Vec<(&'static str, Option<ReconnectingOrderedWriter>)>,
    verifying: Vec<VerifyingGroup>,
    seqs: Arc<AtomicU64>,
    rounds: u64,
    sampler: Option<StatusSampler>,
    counts: Counts,
    faults_lasted: Duration,
    /// Bytes of the ordered writers that finished.
    ordered_bytes: u64,
    checks: Vec<String>,
    report_written: bool,
    _dir: tempfile::TempDir,
}

impl Soak {
    fn start(settings: Settings) -> Soak {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = lab_certs(dir.path());
        let replica_b = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
        let replica_a = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], replica_b.port)));
        let url = format!("https://{REPLICA_HOST}:{}", proxy.addr().port());
        let groups = ORDERED_GROUPS
            .iter()
            .chain(&VERIFYING_GROUPS)
            .map(|g| {
                GroupSpec::new(
                    g,
                    disk_names(g)
                        .iter()
                        .map(|d| DiskSpec::new(d, DISK_SIZE))
                        .collect(),
                )
                .consumer(Consumer::Raw(certs.consumer(
                    &url,
                    PRIMARY_HOST,
                    "retry_scale = 0.01\nrequest_timeout = \"10s\"",
                )))
                .ring_size("64MiB")
                .interval("1s")
            })
            .collect();
        let p = Primary::start(Spec::new(groups));
        let rng = StdRng::seed_from_u64(settings.seed);
        let verifying = VERIFYING_GROUPS
            .iter()
            .enumerate()
            .map(|(i, name)| VerifyingGroup {
                name,
                first_disk: 2 * i,
                site: Site::Primary,
                writers: None,
                log: RoundLog::default(),
                clock_base: 0,
                bytes: 0,
            })
            .collect();
        let mut soak = Soak {
            settings,
            rng,
            begun: Instant::now(),
            started: Instant::now(),
            p,
            proxy,
            replica_b,
            replica_a,
            certs,
            ordered: ORDERED_GROUPS.iter().map(|g| (*g, None)).collect(),
            verifying,
            seqs: Arc::new(AtomicU64::new(1)),
            rounds: 0,
            sampler: None,
            counts: Counts::default(),
            faults_lasted: Duration::ZERO,
            ordered_bytes: 0,
            checks: Vec::new(),
            report_written: false,
            _dir: dir,
        };
        soak.initial_replication();
        soak
    }

    fn event(&self, what: &str) {
        let at = self.started.elapsed();
        println!(
            "[{:>4}.{:01} s] {what}",
            at.as_secs(),
            at.subsec_millis() / 100
        );
    }

    /// The initial copies (the disks are sparse: nothing to send but metadata), the
    /// ordered groups' recovery points, then the writers and the sampler.
    fn initial_replication(&mut self) {
        for g in ORDERED_GROUPS.iter().chain(&VERIFYING_GROUPS) {
            let cycle = self.p.cycles_close(g);
            self.replica_b.wait_applied(g, cycle, LONG);
        }
        for g in ORDERED_GROUPS {
            self.replica_b
                .cli(&[
                    "recovery",
                    "--name",
                    g,
                    "--points",
                    POINTS,
                    "--spacing",
                    POINT_SPACING,
                ])
                .assert_ok();
        }
        for (i, (g, writer)) in self.ordered.iter_mut().enumerate() {
            *writer = Some(ReconnectingOrderedWriter::start(
                self.p.nbd_sock(),
                disk_names(g),
                self.settings.seed ^ (i as u64 + 1),
                ORDERED_RATE,
            ));
        }
        for i in 0..self.verifying.len() {
            self.start_verifying(i);
        }
        self.sampler = Some(StatusSampler::start(&self.p.config()));
        self.started = Instant::now();
        self.event(&format!(
            "started: seed {}, {} minutes, primary {}, replica B {} (through proxy {}), replica A {}",
            self.settings.seed,
            self.settings.minutes,
            self.p.layout.root.display(),
            self.replica_b.root.display(),
            self.proxy.addr(),
            self.replica_a.root.display()
        ));
    }

    fn replica(&self, site: Site) -> &Replica {
        match site {
            Site::A => &self.replica_a,
            Site::B => &self.replica_b,
            Site::Primary => panic!("the primary is no replica daemon"),
        }
    }

    fn nbd_socket(&self, site: Site) -> PathBuf {
        match site {
            Site::Primary => self.p.nbd_sock(),
            site => self.replica(site).nbd_socket(),
        }
    }

    /// Starts a round of verifying writers on group `i` where its disks are served:
    /// two connections per disk.
    fn start_verifying(&mut self, i: usize) {
        self.rounds += 1;
        let sock = self.nbd_socket(self.verifying[i].site);
        let group = &mut self.verifying[i];
        let conns = disk_names(group.name)
            .iter()
            .enumerate()
            .flat_map(|(d, disk)| [(d, disk.clone()), (d, disk.clone())])
            .map(|(d, disk)| {
                let conn = Conn::connect_unix(&sock, &group.export(&disk)).unwrap_or_else(|e| {
                    panic!("connecting a verifying writer to {disk} at {sock:?}: {e}")
                });
                let cfg = ThreadCfg {
                    disk: group.first_disk + d,
                    hot_region: MIB,
                    rate: VERIFYING_RATE,
                    max_blocks: 16,
                    budget: u64::MAX,
                };
                (conn, cfg)
            })
            .collect();
        let sizes = vec![DISK_SIZE; 2 * VERIFYING_GROUPS.len()];
        group.writers = Some(Writers::start(
            conns,
            &sizes,
            Arc::clone(&self.seqs),
            self.settings.seed ^ (self.rounds << 8),
        ));
    }

    /// Fails the run if an ordered writer gave up (its daemon stayed unreachable).
    fn check_ordered_writers(&mut self) {
        for (g, writer) in &mut self.ordered {
            if writer
                .as_ref()
                .is_some_and(ReconnectingOrderedWriter::has_failed)
            {
                let failed = writer.take().expect("checked").finish();
                panic!("the ordered writer of {g} gave up: {failed:?}");
            }
        }
    }

    // -----------------------------------------------------------------------
    // Faults
    // -----------------------------------------------------------------------

    fn kill_primary(&mut self) {
        for group in &self.verifying {
            if let (Site::Primary, Some(w)) = (group.site, &group.writers) {
                w.expect_loss();
            }
        }
        self.p.kill();
        self.counts.primary_kills += 1;
        let down = Duration::from_millis(self.rng.gen_range(100..2000));
        self.event(&format!(
            "SIGKILL primary (#{}), down for {down:?}",
            self.counts.primary_kills
        ));
        for group in &mut self.verifying {
            if group.site == Site::Primary {
                group.end_round();
            }
        }
        thread::sleep(down);
        self.p.restart();
        for i in 0..self.verifying.len() {
            if self.verifying[i].site == Site::Primary {
                self.start_verifying(i);
            }
        }
        self.event("primary restarted, writers reconnected");
    }

    fn kill_replica(&mut self) {
        self.replica_b.kill();
        self.counts.replica_kills += 1;
        let down = Duration::from_millis(self.rng.gen_range(100..3000));
        self.event(&format!(
            "SIGKILL replica B (#{}), down for {down:?}",
            self.counts.replica_kills
        ));
        thread::sleep(down);
        self.replica_b.spawn();
        self.event("replica B restarted");
    }

    fn link_fault(&mut self) {
        // Each kind once first, then at random.
        let kind = match self.counts.link_faults() {
            n @ 0..4 => (n + self.settings.seed) % 4,
            _ => self.rng.gen_range(0..4),
        };
        match kind {
            0 => {
                self.proxy.reset_all();
                self.counts.link_resets += 1;
                self.event("link: every connection reset");
            }
            1 => {
                let stall = Duration::from_millis(self.rng.gen_range(500..12_000));
                self.event(&format!("link: stalled for {stall:?}"));
                self.proxy.stall(true);
                thread::sleep(stall);
                self.proxy.stall(false);
                self.counts.link_stalls += 1;
            }
            2 => {
                let down = Duration::from_millis(self.rng.gen_range(500..6000));
                self.event(&format!("link: replica unreachable for {down:?}"));
                self.proxy.refuse(true);
                self.proxy.reset_all();
                thread::sleep(down);
                self.proxy.refuse(false);
                self.counts.link_refusals += 1;
            }
            _ => {
                let after = self.rng.gen_range(1..4 * MIB);
                self.proxy.reset_after_upstream_bytes(after);
                self.counts.link_cuts += 1;
                self.event(&format!("link: cut after the next {after} bytes"));
            }
        }
    }

    /// A test failover of a random point of an ordered group: its disks must be a
    /// prefix of the ordered writes, and take writes of their own.
    fn test_failover(&mut self) {
        let g = ORDERED_GROUPS[self.rng.gen_range(0..ORDERED_GROUPS.len())];
        // Replication goes on: the point drawn may be merged away before the test
        // starts; another is drawn then.
        let (point, prefix) = (0..5)
            .find_map(|_| {
                let points = self.replica_b.points(g);
                let point = points
                    .get(self.rng.gen_range(0..points.len().max(1)))?
                    .clone();
                let prefix = self.check_point(g, &point, |s| s.ordered_writes(g), true)?;
                Some((point, prefix))
            })
            .unwrap_or_else(|| panic!("no recovery point of {g} could be tested five times over"));
        self.counts.test_failovers += 1;
        self.event(&format!(
            "test failover #{} of {g} at cycle {}: writes 1..={prefix} of the ordered writer, \
             test writes read back",
            self.counts.test_failovers, point["cycle"]
        ));
    }

    /// Serves `point` of ordered group `g` by test failover, checks its disks hold a
    /// prefix of the ordered writes (`writes`, asked for once the point is read, so
    /// they include every write it may hold; returns the prefix's length), writes
    /// through the test exports if `write`, and stops the test. None if the point
    /// no longer exists.
    fn check_point(
        &self,
        g: &str,
        point: &Value,
        writes: impl FnOnce(&Self) -> Vec<OrderedWrite>,
        write: bool,
    ) -> Option<u64> {
        let mut start = vec!["test-failover", "start", "--name", g];
        let id = point["id"].to_string();
        if point["latest"] != true {
            start.extend(["--point", &id]);
        }
        let started = self.replica_b.cli(&start);
        if !started.success() && started.all().contains("has no recovery point") {
            return None;
        }
        started.assert_ok();
        let sock = self.replica_b.nbd_socket();
        let mut conns: Vec<Conn> = disk_names(g)
            .iter()
            .map(|d| {
                Conn::connect_unix(&sock, &format!("test/{g}/{d}"))
                    .unwrap_or_else(|e| panic!("test failover export test/{g}/{d}: {e}"))
            })
            .collect();
        let disks: Vec<Vec<u8>> = conns.iter_mut().map(writer::read_export).collect();
        let writes = writes(self);
        let prefix = ordered_prefix(&disks, &writes).unwrap_or_else(|e| {
            panic!("recovery point {point} of {g} is no state the primary had: {e}")
        });
        if write {
            let off = self.test_offset(g);
            let data = pattern(u64::MAX, off, 64 * KIB as usize);
            conns[1]
                .write(off, &data, true)
                .expect("test failover write");
            let back = conns[1].read(off, 64 * KIB as u32).expect("read back");
            assert!(
                back == data,
                "a test failover write of {g} did not read back"
            );
        }
        for conn in conns {
            conn.disconnect();
        }
        // The server notices the disconnects asynchronously.
        let deadline = Instant::now() + SHORT;
        loop {
            let stop = self.replica_b.cli(&["test-failover", "stop", "--name", g]);
            if stop.success() {
                break;
            }
            assert!(Instant::now() < deadline, "{}", stop.report());
            thread::sleep(Duration::from_millis(200));
        }
        Some(prefix)
    }

    fn test_offset(&self, g: &str) -> u64 {
        g.len() as u64 * MIB
    }

    fn ordered_writes(&self, g: &str) -> Vec<OrderedWrite> {
        self.ordered
            .iter()
            .find(|(name, _)| *name == g)
            .and_then(|(_, w)| w.as_ref())
            .map(ReconnectingOrderedWriter::writes)
            .unwrap_or_default()
    }

    // -----------------------------------------------------------------------
    // Planned failover and failback
    // -----------------------------------------------------------------------

    /// Hands the failover group from where it runs (the primary, or A after an earlier
    /// round) to B, replicates back to A, writes at B, and fails back to A, which then
    /// replicates to B.
    fn planned_failover_and_failback(&mut self) {
        let i = self
            .verifying
            .iter()
            .position(|g| g.name == FAILOVER_GROUP)
            .expect("failover group");
        let from = self.verifying[i].site;
        self.verifying[i].end_round();
        let g = FAILOVER_GROUP;
        self.event(&format!("planned failover of {g} from {from:?} to B"));
        if from == Site::Primary {
            self.planned_failover_from_primary();
            for d in disk_names(g) {
                assert_files_equal(
                    &self.p.image(&d),
                    &self.replica_b.disk(TRUST_GROUP, g, &d),
                    &format!("{d} after the planned failover"),
                );
            }
            // The original site's replica server takes the old primary's disks as the
            // existing copy replication comes back to (copied: the primary runs on).
            run_ok(
                std::process::Command::new(bin())
                    .args(["replica", "seed", "--config"])
                    .arg(self.replica_a.config())
                    .args(["--trust-group", TRUST_GROUP, "--name", g, "--from-primary"])
                    .arg(self.p.config()),
                LONG,
            );
        } else {
            self.hand_over(Site::A, Site::B);
        }
        self.counts.planned_failovers += 1;
        self.reverse(Site::B, Site::A);
        self.verifying[i].site = Site::B;
        self.start_verifying(i);
        thread::sleep(WRITES_AWAY);
        self.verifying[i].end_round();
        self.event(&format!("failback of {g} from B to A"));
        self.hand_over(Site::B, Site::A);
        self.counts.failbacks += 1;
        self.reverse(Site::A, Site::B);
        self.verifying[i].site = Site::A;
        self.start_verifying(i);
        self.event(&format!(
            "{g} runs at site A, replicating to B; writers reconnected"
        ));
    }

    /// `blkrep replication failover` of the failover group on the primary. A link
    /// fault (a cut armed earlier, say) may break it: before the hand-over it did not
    /// happen and is tried again; if the hand-over's answer was lost, the replica may
    /// have taken over, which it then says, and the primary's disks must refuse writes.
    fn planned_failover_from_primary(&mut self) {
        let g = FAILOVER_GROUP;
        for _ in 0..5 {
            let out = self.p.replication(&["failover", "--group", g]);
            if out.success() {
                return;
            }
            self.counts.planned_failovers_interrupted += 1;
            self.event(&format!(
                "the planned failover was interrupted: {}",
                out.stderr.trim()
            ));
            let taken_over = self
                .replica_b
                .info(g)
                .is_some_and(|info| !info["failover"].is_null());
            if taken_over {
                let disk = &disk_names(g)[0];
                let mut conn = Conn::connect_unix(&self.p.nbd_sock(), disk).expect("connect");
                let refused = conn.write(0, &[0xee; 4096], true).is_err();
                assert!(
                    refused,
                    "the replica took {g} over, yet the primary's {disk} still takes writes"
                );
                self.event("the replica had taken over; the primary's disks refuse writes");
                return;
            }
            assert!(
                out.all().contains("the failover did not happen")
                    || out.all().contains("may have taken the group over"),
                "the planned failover failed without saying whether it happened\n{}",
                out.report()
            );
            thread::sleep(Duration::from_secs(1));
        }
        panic!("the planned failover of {g} failed five times over");
    }

    /// `blkrep replica planned-failover` of the failover group from `from`'s live
    /// disks to `to`, which must then hold them byte for byte.
    fn hand_over(&self, from: Site, to: Site) {
        let g = FAILOVER_GROUP;
        self.replica(from)
            .cli(&["planned-failover", "--name", g])
            .assert_ok();
        for d in disk_names(g) {
            assert_files_equal(
                &self.replica(from).disk(TRUST_GROUP, g, &d),
                &self.replica(to).disk(TRUST_GROUP, g, &d),
                &format!("{d} handed over from {from:?} to {to:?}"),
            );
        }
    }

    /// Completes the failover at `live` and replicates its disks back to `to`, whose
    /// disks wait as the existing copy; returns once `to` is consistent.
    fn reverse(&self, live: Site, to: Site) {
        let g = FAILOVER_GROUP;
        let from = self.replica(live);
        from.cli(&["complete-failover", "--name", g]).assert_ok();
        from.start_reverse(&self.certs, g, self.replica(to), "1s")
            .assert_ok();
        self.wait_reverse_caught_up(live, to, "replication back");
    }

    /// Waits until `to` is consistent with nothing pending and its disks equal
    /// `live`'s (no writer may run).
    fn wait_reverse_caught_up(&self, live: Site, to: Site, what: &str) {
        let g = FAILOVER_GROUP;
        wait_for(&format!("{what} of {g} from {live:?} to {to:?}"), || {
            let info = self.replica(to).info(g);
            let settled = info
                .as_ref()
                .is_some_and(|i| i["consistent"] == true && i["pending_transfers"] == 0);
            let equal = || {
                disk_names(g).iter().all(|d| {
                    read_file(&self.replica(live).disk(TRUST_GROUP, g, d))
                        == read_file(&self.replica(to).disk(TRUST_GROUP, g, d))
                })
            };
            if settled && equal() {
                Ok(())
            } else {
                Err(format!("{info:#?}"))
            }
        });
    }

    // -----------------------------------------------------------------------
    // The run and the final checks
    // -----------------------------------------------------------------------

    fn run(&mut self) {
        let total = Duration::from_secs_f64(self.settings.minutes * 60.0);
        let mut next_planned = (total / 2).min(FIRST_PLANNED);
        // The first events are one of each kind, in a seeded order, so that even a
        // short run has each at least once; then they come at random.
        let mut first_events: Vec<u32> = vec![0, 2, 4, 7];
        first_events.shuffle(&mut self.rng);
        while self.started.elapsed() < total {
            self.check_ordered_writers();
            let now = self.started.elapsed();
            if now >= next_planned {
                self.planned_failover_and_failback();
                next_planned += PLANNED_EVERY;
                continue;
            }
            let pause = Duration::from_millis(self.rng.gen_range(2000..8000))
                .min(next_planned - now)
                .min(total.saturating_sub(now));
            thread::sleep(pause);
            if self.started.elapsed() >= total || self.started.elapsed() >= next_planned {
                continue;
            }
            let event = first_events
                .pop()
                .unwrap_or_else(|| self.rng.gen_range(0..9));
            match event {
                0 | 1 => self.kill_primary(),
                2 | 3 => self.kill_replica(),
                4..=6 => self.link_fault(),
                _ => self.test_failover(),
            }
        }
        self.faults_lasted = self.started.elapsed();
        self.event("time is up: checking the recovery points, then stopping the writers");
    }

    /// Every recovery point of the ordered groups, kept while the writers still write
    /// (replication into each is paused while its points are read, so none is merged
    /// away meanwhile), must hold a prefix of the ordered writes.
    ///
    /// A pause refuses new transfers only: one offered before it still arrives and is
    /// applied, so the points are listed once nothing was applied for a while.
    fn check_points(&mut self) {
        let mut points_checked = 0;
        let mut prefixes = Vec::new();
        for g in ORDERED_GROUPS {
            self.replica_b.cli(&["pause", "--name", g]).assert_ok();
            self.wait_quiet(g);
            for point in self.replica_b.points(g) {
                let prefix = self
                    .check_point(g, &point, |s| s.ordered_writes(g), false)
                    .unwrap_or_else(|| panic!("point {point} of {g} vanished while paused"));
                prefixes.push(format!("{g}@{}: {prefix}", point["cycle"]));
                points_checked += 1;
            }
            self.replica_b.cli(&["resume", "--name", g]).assert_ok();
        }
        self.checks.push(format!(
            "every recovery point passes the ordered-writer prefix check: {points_checked} points \
             (group@cycle: writes 1..=m held: {})",
            prefixes.join(", ")
        ));
        self.event(&format!("{points_checked} recovery points checked"));
    }

    /// Waits until replica `g` applied nothing for three seconds and holds nothing
    /// pending.
    fn wait_quiet(&self, g: &str) {
        let mut last = None;
        let mut since = Instant::now();
        wait_for(&format!("replica {g} to apply its last transfer"), || {
            let info = self.replica_b.info(g).expect("replica info");
            let applied = info["last_applied_cycle"].as_u64();
            if applied != last {
                (last, since) = (applied, Instant::now());
            } else if info["pending_transfers"] == 0 && since.elapsed() >= Duration::from_secs(3) {
                return Ok(());
            }
            Err(format!("{info:#}"))
        });
    }

    /// Stops the writers, lets replication catch up, and checks that every replica
    /// equals its primary and no acknowledged write is lost.
    fn finish_and_check(&mut self) {
        let mut ordered = Vec::new();
        for (g, writer) in &mut self.ordered {
            let writes = writer
                .take()
                .expect("ordered writer")
                .finish()
                .unwrap_or_else(|e| panic!("ordered writer of {g}: {e}"));
            self.ordered_bytes += writes.iter().map(|w| w.blocks * writer::BLOCK).sum::<u64>();
            ordered.push((*g, writes));
        }
        for group in &mut self.verifying {
            group.end_round();
        }
        self.proxy.stall(false);
        self.proxy.refuse(false);
        // Disarms a cut still pending (a budget never spent).
        self.proxy.reset_after_upstream_bytes(u64::MAX);

        // Replication catches up: a cycle closed now holds every write.
        let caught_up = Instant::now();
        for g in ORDERED_GROUPS.iter().chain(&VERIFYING_GROUPS) {
            if self.site_of(g) == Site::Primary {
                let cycle = self.p.cycles_close(g);
                self.replica_b.wait_applied(g, cycle, LONG);
            }
        }
        if self.site_of(FAILOVER_GROUP) == Site::A {
            self.wait_reverse_caught_up(Site::A, Site::B, "the final catch-up");
        }
        self.event(&format!(
            "replication caught up in {:.1} s",
            caught_up.elapsed().as_secs_f64()
        ));

        // Every replica equals its primary.
        let mut equal = 0;
        for g in ORDERED_GROUPS.iter().chain(&VERIFYING_GROUPS) {
            for d in disk_names(g) {
                let replica = self.replica_b.disk(TRUST_GROUP, g, &d);
                let live = self.live_image(g, &d);
                assert_files_equal(&live, &replica, &format!("replica of {d} vs its primary"));
                equal += 1;
            }
        }
        self.checks.push(format!(
            "every replica equals its primary byte for byte: {equal} disks of {} MiB",
            DISK_SIZE / MIB
        ));

        // The ordered groups: the primary holds exactly the acknowledged writes.
        for (g, writes) in &ordered {
            let images: Vec<Vec<u8>> = disk_names(g)
                .iter()
                .map(|d| read_file(&self.p.image(d)))
                .collect();
            assert_eq!(
                ordered_prefix(&images, writes),
                Ok(writes.len() as u64),
                "{g}: the primary's disks do not hold exactly the acknowledged ordered writes"
            );
        }

        // The verifying groups: no acknowledged write lost.
        let mut verified = 0;
        for group in &self.verifying {
            for (d, disk) in disk_names(group.name).iter().enumerate() {
                let image = read_file(&self.live_image(group.name, disk));
                let initial = vec![0u8; image.len()];
                let errors =
                    writer::check_disk(group.first_disk + d, &image, &initial, &group.log, 10);
                assert!(
                    errors.is_empty(),
                    "acknowledged writes of the verifying writers are lost on {disk} (at {:?}):\n  {}",
                    group.site,
                    errors.join("\n  ")
                );
            }
            verified += group.log.acked();
        }
        self.checks.push(format!(
            "no acknowledged write lost: {verified} acknowledged writes of the verifying writers \
             checked on {} disks",
            2 * self.verifying.len()
        ));
        let ordered_total: usize = ordered.iter().map(|(_, w)| w.len()).sum();
        self.checks.push(format!(
            "the primary holds exactly the {ordered_total} acknowledged ordered writes"
        ));
        self.event("all checks passed");
    }

    fn site_of(&self, g: &str) -> Site {
        self.verifying
            .iter()
            .find(|v| v.name == g)
            .map_or(Site::Primary, |v| v.site)
    }

    /// The image a group's live disk is kept in.
    fn live_image(&self, g: &str, disk: &str) -> PathBuf {
        match self.site_of(g) {
            Site::Primary => self.p.image(disk),
            site => self.replica(site).disk(TRUST_GROUP, g, disk),
        }
    }

    fn bytes_written(&self) -> u64 {
        let verifying: u64 = self
            .verifying
            .iter()
            .map(|g| g.bytes + g.writers.as_ref().map_or(0, Writers::bytes_written))
            .sum();
        let ordered: u64 = self
            .ordered
            .iter()
            .filter_map(|(_, w)| w.as_ref())
            .map(ReconnectingOrderedWriter::bytes_acked)
            .sum();
        verifying + ordered + self.ordered_bytes
    }

    fn report(&self, passed: bool, samples: &Samples) -> String {
        let s = &self.settings;
        let c = &self.counts;
        let mut r = String::new();
        let _ = writeln!(r, "# Soak run\n");
        let _ = writeln!(
            r,
            "`scripts/soak.sh --minutes {} --seed {}`\n",
            s.minutes, s.seed
        );
        let _ = writeln!(r, "| | |\n|---|---|");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(r, "| {k} | {v} |");
        };
        row(
            "result",
            if passed {
                "**passed**".into()
            } else {
                "**FAILED** (see the output and the daemons' logs)".into()
            },
        );
        row(
            "duration",
            format!(
                "{:.1} min of writes and faults (asked: {} min), {:.1} min with setup and checks",
                self.faults_lasted.as_secs_f64() / 60.0,
                s.minutes,
                self.begun.elapsed().as_secs_f64() / 60.0
            ),
        );
        row("seed", s.seed.to_string());
        row("commit", format!("`{}`", s.commit));
        row("machine", machine_description());
        row(
            "setup",
            format!(
                "1 primary daemon, 4 groups of 2 disks ({} MiB each), 1 s interval, \
                 replica daemon B through the fault proxy, replica daemon A for failback; \
                 ordered writers on {}, verifying writers on {}",
                DISK_SIZE / MIB,
                ORDERED_GROUPS.join(", "),
                VERIFYING_GROUPS.join(", ")
            ),
        );
        row("primary SIGKILLs", c.primary_kills.to_string());
        row("replica SIGKILLs", c.replica_kills.to_string());
        row(
            "link faults",
            format!(
                "{} ({} resets, {} stalls, {} refusals, {} cuts mid-stream)",
                c.link_faults(),
                c.link_resets,
                c.link_stalls,
                c.link_refusals,
                c.link_cuts
            ),
        );
        row("test failovers", c.test_failovers.to_string());
        row(
            "planned failovers",
            format!(
                "{}, failbacks: {} (attempts a link fault interrupted: {})",
                c.planned_failovers, c.failbacks, c.planned_failovers_interrupted
            ),
        );
        row(
            "bytes written",
            format!("{:.1} MiB", self.bytes_written() as f64 / MIB as f64),
        );
        row(
            "bytes shipped",
            format!(
                "{:.1} MiB of changes, {:.1} MiB on the network (primary's status, sampled)",
                samples.total(|g| g.bytes_delivered) as f64 / MIB as f64,
                samples.total(|g| g.network_bytes) as f64 / MIB as f64
            ),
        );
        row(
            "cycles delivered",
            samples.total(|g| g.cycles_delivered).to_string(),
        );
        row(
            "highest RPO seen",
            samples
                .max_lag
                .as_ref()
                .map_or("none sampled".into(), |(lag, g, at)| {
                    format!("{lag} s ({g}, {:.0} s into the run)", at.as_secs_f64())
                }),
        );
        row(
            "status samples",
            format!(
                "{} ({} while the primary was down)",
                samples.taken, samples.missed
            ),
        );
        let _ = writeln!(r, "\n## Checks\n");
        if self.checks.is_empty() {
            let _ = writeln!(r, "- none completed");
        }
        for check in &self.checks {
            let _ = writeln!(r, "- {check}");
        }
        r
    }

    fn write_report(&mut self, passed: bool) {
        let samples = self
            .sampler
            .take()
            .map_or_else(Samples::default, StatusSampler::finish);
        let report = self.report(passed, &samples);
        println!("\n{report}");
        if let Some(path) = &self.settings.report {
            fs::write(path, &report).unwrap_or_else(|e| {
                eprintln!("cannot write the report to {}: {e}", path.display())
            });
        }
        self.report_written = true;
    }

    fn keep_logs(&self) {
        let Some(dir) = &self.settings.logs else {
            return;
        };
        let _ = fs::create_dir_all(dir);
        let copies: [(&str, PathBuf); 3] = [
            ("primary.log", self.p.layout.log()),
            ("replica-b.log", self.replica_b.root.join("replica.log")),
            ("replica-a.log", self.replica_a.root.join("replica.log")),
        ];
        for (name, from) in copies {
            let _ = fs::copy(&from, dir.join(name));
        }
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        if !self.report_written {
            self.write_report(false);
        }
        self.keep_logs();
    }
}

/// Polls `check` (Err: the state so far) until it is Ok; fails the run naming `what`
/// and the last state after `LONG`.
fn wait_for(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + LONG;
    loop {
        let state = match check() {
            Ok(()) => return,
            Err(state) => state,
        };
        assert!(
            Instant::now() < deadline,
            "waited {LONG:?} in vain for {what}: {state}"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[ignore = "runs for minutes: scripts/soak.sh --minutes N"]
fn soak() {
    let settings = Settings::from_env();
    println!(
        "soak: {} minutes, seed {} (rerun: scripts/soak.sh --minutes {} --seed {})",
        settings.minutes, settings.seed, settings.minutes, settings.seed
    );
    let mut soak = Soak::start(settings);
    soak.run();
    soak.check_points();
    soak.finish_and_check();
    soak.write_report(true);
}
