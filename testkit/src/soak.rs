//! Helpers of the soak run (`tests/system/soak.rs`): an ordered writer that survives its
//! daemon being killed, a sampler of the primary's `blkrep status --json`, and the
//! description of the machine a run is reported for.
//!
//! The reconnecting ordered writer keeps the contract of `ordered::ordered_writer`
//! (write k is sent only after write k-1 was acknowledged, each block tagged with k)
//! across daemon restarts: a write that fails is sent again, identical, over new
//! connections until acknowledged, so whichever way the failed attempt went, the disks
//! still hold a prefix of the write order and `ordered::ordered_prefix` applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use crate::nbd::Conn;
use crate::ordered::{draw_ordered_write, OrderedWrite};
use crate::writer::{pattern, BLOCK};
use crate::{bin, run_with_timeout, SHORT};

/// How long a reconnecting writer keeps retrying one write before it reports the
/// daemon as gone for good (a restart takes a few seconds; a failover stops writers).
pub const RETRY_FOR: Duration = Duration::from_secs(90);

/// A running ordered writer over two disks of one group that reconnects and resends
/// after failures.
#[derive(Debug)]
pub struct ReconnectingOrderedWriter {
    /// Write k at index k-1, recorded before it is first sent.
    writes: Arc<Mutex<Vec<OrderedWrite>>>,
    acked: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<(), String>>,
}

impl ReconnectingOrderedWriter {
    /// Starts writing to exports `disks` behind unix socket `sock`, at most `rate`
    /// writes per second, in the order `seed` draws.
    pub fn start(sock: PathBuf, disks: [String; 2], seed: u64, rate: f64) -> Self {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(AtomicU64::new(0));
        let retries = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (writes, acked, retries, stop) = (
                Arc::clone(&writes),
                Arc::clone(&acked),
                Arc::clone(&retries),
                Arc::clone(&stop),
            );
            thread::Builder::new()
                .name(format!("ordered-{}", disks[0]))
                .spawn(move || {
                    let mut session = Session {
                        sock,
                        disks,
                        conns: None,
                    };
                    let mut rng = StdRng::seed_from_u64(seed);
                    let start = Instant::now();
                    let mut k = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        k += 1;
                        let write = draw_ordered_write(&mut rng);
                        writes.lock().expect("writes").push(write);
                        session.write_until_acked(k, write, &stop, &retries)?;
                        acked.store(k, Ordering::SeqCst);
                        let due = Duration::from_secs_f64(k as f64 / rate);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            thread::sleep(wait);
                        }
                    }
                    session.disconnect();
                    Ok(())
                })
                .expect("spawn ordered writer")
        };
        ReconnectingOrderedWriter {
            writes,
            acked,
            retries,
            stop,
            handle,
        }
    }

    /// The newest acknowledged write.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Bytes of the acknowledged writes.
    pub fn bytes_acked(&self) -> u64 {
        let acked = usize::try_from(self.acked()).expect("count fits usize");
        self.writes.lock().expect("writes")[..acked]
            .iter()
            .map(|w| w.blocks * BLOCK)
            .sum()
    }

    /// Writes sent again after a failure.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::SeqCst)
    }

    /// A copy of the writes so far (the last may not be acknowledged yet).
    pub fn writes(&self) -> Vec<OrderedWrite> {
        self.writes.lock().expect("writes").clone()
    }

    /// True once the writer gave up (its error is returned by `finish`).
    pub fn has_failed(&self) -> bool {
        self.handle.is_finished() && !self.stop.load(Ordering::SeqCst)
    }

    /// Stops after the write in progress is acknowledged; returns every write, all
    /// acknowledged, or why the writer gave up.
    pub fn finish(self) -> Result<Vec<OrderedWrite>, String> {
        let ReconnectingOrderedWriter {
            writes,
            acked,
            stop,
            handle,
            ..
        } = self;
        stop.store(true, Ordering::SeqCst);
        handle.join().expect("ordered writer panicked")?;
        let mut writes = writes.lock().expect("writes").clone();
        writes.truncate(usize::try_from(acked.load(Ordering::SeqCst)).expect("count fits usize"));
        Ok(writes)
    }
}

/// The writer's connections, opened again after each failure.
struct Session {
    sock: PathBuf,
    disks: [String; 2],
    conns: Option<[Conn; 2]>,
}

impl Session {
    /// Sends write `k` until it is acknowledged (and, every 200 writes, flushed).
    /// A stop request does not interrupt a write whose fate is unknown: only its
    /// acknowledgement keeps the disks a prefix of the acknowledged writes.
    fn write_until_acked(
        &mut self,
        k: u64,
        write: OrderedWrite,
        stop: &AtomicBool,
        retries: &AtomicU64,
    ) -> Result<(), String> {
        let off = write.block * BLOCK;
        let data = pattern(
            k,
            off,
            usize::try_from(write.blocks * BLOCK).expect("length fits usize"),
        );
        let failing_since = Instant::now();
        let mut attempt = 0u32;
        loop {
            let outcome = self.connected().and_then(|conns| {
                let conn = &mut conns[write.disk];
                conn.write(off, &data, k % 32 == 0)
                    .map_err(|e| format!("write {k}: {e}"))?;
                if k % 200 == 0 {
                    conn.flush()
                        .map_err(|e| format!("flush after write {k}: {e}"))?;
                }
                Ok(())
            });
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.conns = None;
                    if failing_since.elapsed() > RETRY_FOR {
                        return Err(format!(
                            "ordered writer on {} and {}: still failing after {RETRY_FOR:?} \
                             (stop requested: {}): {e}",
                            self.disks[0],
                            self.disks[1],
                            stop.load(Ordering::SeqCst)
                        ));
                    }
                    if attempt == 0 {
                        retries.fetch_add(1, Ordering::SeqCst);
                    }
                    attempt += 1;
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn connected(&mut self) -> Result<&mut [Conn; 2], String> {
        if self.conns.is_none() {
            let open = |disk: &str| {
                Conn::connect_unix(&self.sock, disk).map_err(|e| format!("connect {disk}: {e}"))
            };
            self.conns = Some([open(&self.disks[0])?, open(&self.disks[1])?]);
        }
        Ok(self.conns.as_mut().expect("just connected"))
    }

    fn disconnect(self) {
        for conn in self.conns.into_iter().flatten() {
            conn.disconnect();
        }
    }
}

/// Replication counters of one group, summed over the daemon's restarts (each
/// restart starts its counters at zero).
#[derive(Debug, Clone, Default)]
pub struct GroupCounters {
    /// Cycles delivered to the replica.
    pub cycles_delivered: u64,
    /// Bytes of those cycles.
    pub bytes_delivered: u64,
    /// Bytes sent on the network for them.
    pub network_bytes: u64,
    last: [u64; 3],
}

impl GroupCounters {
    fn add(&mut self, now: [u64; 3]) {
        let totals = [
            &mut self.cycles_delivered,
            &mut self.bytes_delivered,
            &mut self.network_bytes,
        ];
        for ((total, last), now) in totals.into_iter().zip(&mut self.last).zip(now) {
            // A smaller value than last time: the daemon restarted and counts anew.
            *total += if now >= *last { now - *last } else { now };
            *last = now;
        }
    }
}

/// What the sampler saw.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Samples taken.
    pub taken: u64,
    /// Samples that found the daemon down (killed, restarting).
    pub missed: u64,
    /// The highest lag (recovery point objective) any group showed, which group, and
    /// how far into the run.
    pub max_lag: Option<(u64, String, Duration)>,
    /// Each group's counters.
    pub groups: BTreeMap<String, GroupCounters>,
}

/// Samples `blkrep status --json` of a primary every second, in a thread.
#[derive(Debug)]
pub struct StatusSampler {
    samples: Arc<Mutex<Samples>>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl StatusSampler {
    /// Starts sampling the primary of the configuration file `config`.
    pub fn start(config: &Path) -> Self {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (samples, stop, config) = (
                Arc::clone(&samples),
                Arc::clone(&stop),
                config.to_path_buf(),
            );
            thread::Builder::new()
                .name("status-sampler".into())
                .spawn(move || {
                    let start = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        let status = sample_status(&config);
                        let mut samples = samples.lock().expect("samples");
                        samples.taken += 1;
                        match status {
                            Some(status) => samples.record(&status, start.elapsed()),
                            None => samples.missed += 1,
                        }
                        drop(samples);
                        thread::sleep(Duration::from_secs(1));
                    }
                })
                .expect("spawn sampler")
        };
        StatusSampler {
            samples,
            stop,
            handle,
        }
    }

    /// What was seen so far.
    pub fn samples(&self) -> Samples {
        self.samples.lock().expect("samples").clone()
    }

    /// Stops sampling and returns what was seen.
    pub fn finish(self) -> Samples {
        let StatusSampler {
            samples,
            stop,
            handle,
        } = self;
        stop.store(true, Ordering::SeqCst);
        handle.join().expect("sampler panicked");
        let samples = samples.lock().expect("samples").clone();
        samples
    }
}

fn sample_status(config: &Path) -> Option<Value> {
    let out = run_with_timeout(
        Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(config),
        SHORT,
    )
    .ok()?;
    if !out.success() {
        return None;
    }
    serde_json::from_str(out.stdout.trim()).ok()
}

impl Samples {
    fn record(&mut self, status: &Value, at: Duration) {
        for group in status["groups"].as_array().into_iter().flatten() {
            let name = group["name"].as_str().unwrap_or_default().to_string();
            let consumer = &group["consumer"];
            let number = |key: &str| consumer[key].as_u64().unwrap_or(0);
            self.groups.entry(name.clone()).or_default().add([
                number("cycles_delivered"),
                number("bytes_delivered"),
                number("network_bytes"),
            ]);
            // A superseded group (handed over) no longer replicates: its lag grows
            // without meaning anything.
            if consumer["state"] == "superseded" {
                continue;
            }
            if let Some(lag) = consumer["lag_secs"].as_u64() {
                if self.max_lag.as_ref().is_none_or(|(max, _, _)| lag > *max) {
                    self.max_lag = Some((lag, name, at));
                }
            }
        }
    }

    /// Sum of one counter over the groups.
    pub fn total(&self, counter: impl Fn(&GroupCounters) -> u64) -> u64 {
        self.groups.values().map(counter).sum()
    }
}

/// "2 CPUs, 23.4 GiB memory, Linux 6.1.0-28-amd64".
pub fn machine_description() -> String {
    let cpus = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    #[allow(clippy::cast_precision_loss)]
    let gib = mem_kib as f64 / (1024.0 * 1024.0);
    format!("{cpus} CPUs, {gib:.1} GiB memory, Linux {}", kernel.trim())
}
