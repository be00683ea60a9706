//! When writes outrun the link: a real `blkrep primary` with a 4 MiB ring replicates
//! every second to a real `blkrep replica` over mutual TLS, through a link limited to
//! 1 MiB/s (the consumer's `bandwidth_limit`), while qemu-io writes 10 MiB of
//! incompressible data as fast as the primary acknowledges it.
//!
//! - `throttle_keeps_the_log_and_the_recovery_point`: with `on_ring_full =
//!   "throttle"` the writer is slowed to about the link's rate, the group never leaves
//!   logging mode (status sampled all along), no resync runs, every write reaches the
//!   replica through cycles, the replica converges to the image byte for byte, the lag
//!   stays bounded, and no write was delayed beyond the configured bound.
//! - `bitmap_overflows_into_a_resync`: with the default `on_ring_full = "bitmap"` the
//!   writer is never slowed, the ring overflows, a resync runs, and the replica still
//!   converges (today's behaviour).
#![allow(clippy::cast_possible_truncation)]

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

const DISK_SIZE: u64 = 16 * MIB;
const RING: &str = "4MiB";
const RING_BYTES: u64 = 4 * MIB;
/// The link, in bytes per second.
const BANDWIDTH: u64 = MIB;
const WRITE: u64 = 64 * KIB;
const WRITTEN: u64 = 10 * MIB;
const THROTTLE_BOUND: Duration = Duration::from_secs(5);

/// A replica, and a primary replicating group vm1 (disk0) to it every second with
/// `policy` lines in the group's section; initial replication done.
struct Pair {
    _certs_dir: tempfile::TempDir,
    replica: Replica,
    primary: Primary,
}

impl Pair {
    fn start(policy: &str) -> Pair {
        require_tool("qemu-io");
        let certs_dir = tempfile::tempdir().expect("tempdir");
        let certs: LabCerts = lab_certs(certs_dir.path());
        let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "");
        let mut primary = Primary::prepare(Spec::new(vec![GroupSpec::new(
            "vm1",
            vec![DiskSpec::new("disk0", DISK_SIZE)],
        )
        .ring_size(RING)
        .interval("1s")
        .consumer(Consumer::Raw(certs.consumer(
            &replica.url(REPLICA_HOST),
            PRIMARY_HOST,
            &format!("bandwidth_limit = {BANDWIDTH}\nretry_scale = 0.01"),
        )))]));
        let config = fs::read_to_string(primary.config()).expect("read config");
        let config = config.replacen(
            "interval = \"1s\"\n",
            &format!("interval = \"1s\"\n{policy}\n"),
            1,
        );
        fs::write(primary.config(), config).expect("write config");
        primary.restart();
        primary.wait_consumer("vm1", "initial replication", LONG, |c| {
            c["state"] == "replicating" && c["last_delivered"].is_u64()
        });
        Pair {
            _certs_dir: certs_dir,
            replica,
            primary,
        }
    }

    /// Writes `WRITTEN` bytes of incompressible data in `WRITE`-byte writes, one at a
    /// time, as fast as they are acknowledged, sampling the group's status meanwhile.
    /// Returns how long the writes took and the samples.
    fn write_faster_than_the_link(&self) -> (Duration, Vec<Value>) {
        let sources = self.primary.layout.root.join("sources");
        fs::create_dir_all(&sources).expect("mkdir sources");
        let mut writer = Command::new("qemu-io");
        writer.args(["-f", "raw"]);
        for index in 0..WRITTEN / WRITE {
            let source: PathBuf = sources.join(format!("{index}.bin"));
            fs::write(&source, pseudo_random(1000 + index, WRITE as usize)).expect("source");
            writer.args([
                "-c",
                &format!("write -s {} {} {WRITE}", source.display(), index * WRITE),
            ]);
        }
        writer
            .arg(self.primary.uri("disk0"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = writer.spawn().expect("spawn qemu-io");
        let mut samples = Vec::new();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for qemu-io") {
                break status;
            }
            assert!(
                started.elapsed() < LONG,
                "the writer did not finish in {LONG:?}"
            );
            samples.push(self.primary.group_status("vm1"));
            thread::sleep(Duration::from_millis(100));
        };
        let elapsed = started.elapsed();
        let output = child.wait_with_output().expect("qemu-io output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            status.success() && !text.contains("failed"),
            "writes failed: {status}\n{}",
            tail(&text, 20)
        );
        samples.push(self.primary.group_status("vm1"));
        (elapsed, samples)
    }

    /// Waits until the replica applied every cycle closed after the writes, then
    /// compares it with the image. Returns the consumer's final status.
    fn converge(&self) -> Value {
        let last_write_cycle = self.primary.group_status("vm1")["cycle"]["open"]
            .as_u64()
            .expect("open cycle");
        let consumer = self
            .primary
            .wait_consumer("vm1", "delivery of the writes", LONG, |c| {
                c["last_delivered"]
                    .as_u64()
                    .is_some_and(|cycle| cycle >= last_write_cycle)
                    && c["resync"].is_null()
            });
        self.replica.wait_applied("vm1", last_write_cycle, LONG);
        assert_files_equal(
            &self.replica.disk("dc1", "vm1", "disk0"),
            &self.primary.image("disk0"),
            "replica after the writes",
        );
        consumer
    }
}

fn ms(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
fn throttle_keeps_the_log_and_the_recovery_point() {
    let pair = Pair::start(&format!(
        "on_ring_full = \"throttle\"\nthrottle_max_delay = \"{}s\"",
        THROTTLE_BOUND.as_secs()
    ));
    let before = pair.primary.group_status("vm1");
    assert_eq!(before["ring"]["on_full"], "throttle", "{before:#}");
    let resyncs = ms(&before["consumer"]["resyncs"]);

    let (elapsed, samples) = pair.write_faster_than_the_link();
    let mut max_lag = 0;
    for sample in &samples {
        assert_eq!(
            (
                sample["tracking"].as_str(),
                sample["resync_required"].as_bool()
            ),
            (Some("logging"), Some(false)),
            "the group left logging mode under throttle: {sample:#}\n{}",
            tail(&pair.primary.log(), 30)
        );
        assert!(ms(&sample["ring"]["used"]) <= RING_BYTES, "{sample:#}");
        max_lag = max_lag.max(sample["consumer"]["lag_secs"].as_u64().unwrap_or(0));
    }
    // Unslowed, the writes take well under a second; the ring holds 4 of the 10 MiB,
    // so the rest went at about the link's rate.
    let slowest_allowed_rate = Duration::from_secs((WRITTEN - RING_BYTES) / BANDWIDTH / 2);
    assert!(
        elapsed >= slowest_allowed_rate,
        "10 MiB written in {elapsed:?} through a 1 MiB/s link: the writer was not slowed"
    );
    let throttle = &samples[samples.len() - 1]["ring"]["throttle"];
    assert!(ms(&throttle["writes"]) > 0, "{throttle:#}");
    assert_eq!(ms(&throttle["expired"]), 0, "{throttle:#}");
    assert_eq!(ms(&throttle["bound_ms"]), THROTTLE_BOUND.as_millis() as u64);
    // Measured around the pause and the wait, so scheduling may add a little.
    assert!(
        ms(&throttle["max_delay_ms"]) <= ms(&throttle["bound_ms"]) + 500,
        "a write waited beyond the bound: {throttle:#}"
    );
    // The replica is at most a ring's worth of shipping behind, plus a write's bound
    // and a cycle's close and apply.
    let lag_bound = RING_BYTES / BANDWIDTH + THROTTLE_BOUND.as_secs() + 2;
    assert!(
        max_lag <= lag_bound,
        "lag reached {max_lag}s (bound {lag_bound}s)"
    );

    let text = run_ok(
        pair.primary
            .cmd()
            .args(["status", "--config"])
            .arg(pair.primary.config()),
        SHORT,
    )
    .all();
    assert!(
        text.contains("when full: throttle writers, at most 5000 ms a write;"),
        "{text}"
    );

    let consumer = pair.converge();
    assert_eq!(
        ms(&consumer["resyncs"]),
        resyncs,
        "a resync ran under throttle: {consumer:#}"
    );
    assert!(
        !pair.primary.log().contains("Log ring full"),
        "{}",
        tail(&pair.primary.log(), 30)
    );
    println!(
        "throttle: 10 MiB written in {:.1}s, max lag {max_lag}s, {} writes delayed, {} ms in all, longest {} ms",
        elapsed.as_secs_f64(),
        throttle["writes"],
        throttle["total_delay_ms"],
        throttle["max_delay_ms"]
    );
}

#[test]
fn bitmap_overflows_into_a_resync() {
    let pair = Pair::start("");
    let before = pair.primary.group_status("vm1");
    assert_eq!(before["ring"]["on_full"], "bitmap", "{before:#}");
    assert!(before["ring"]["throttle"].is_null(), "{before:#}");
    let resyncs = ms(&before["consumer"]["resyncs"]);

    let (elapsed, _) = pair.write_faster_than_the_link();
    assert!(
        elapsed < Duration::from_secs((WRITTEN - RING_BYTES) / BANDWIDTH / 2),
        "the writer was slowed under bitmap: {elapsed:?}"
    );
    let consumer = pair.converge();
    assert!(
        ms(&consumer["resyncs"]) > resyncs,
        "the ring overflowed but no resync ran: {consumer:#}"
    );
    assert!(
        pair.primary.log().contains("Log ring full"),
        "{}",
        tail(&pair.primary.log(), 30)
    );
    println!(
        "bitmap: 10 MiB written in {:.1}s, then a resync",
        elapsed.as_secs_f64()
    );
}
