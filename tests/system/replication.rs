//! Replication end to end: a real `blkrep primary` and a real `blkrep replica` as
//! separate processes on loopback, mutual TLS with certificates from `blkrep cert`,
//! real NBD clients writing; the replica's disks are compared with the primary's
//! images after every applied cycle.
#![allow(clippy::cast_possible_truncation)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::daemon_log::METRICS;
use testkit::fault_proxy::FaultProxy;
use testkit::replica::{
    dc1, lab_certs as certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST, ROGUE_HOST,
};
use testkit::*;

/// A primary with group vm1 of the given disks, replicating with `consumer` lines.
fn primary(disks: Vec<DiskSpec>, consumer: String) -> Primary {
    Primary::start(Spec::new(vec![GroupSpec::new("vm1", disks)
        .consumer(Consumer::Raw(consumer))
        .ring_size("64MiB")]))
}

fn qemu_io_write(p: &Primary, disk: &str, pattern: u8, offset: u64, len: u64) {
    let qemu_io = require_tool("qemu-io");
    run_ok(
        Command::new(qemu_io).args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
            &p.uri(disk),
        ]),
        LONG,
    );
}

/// A lab CA and a replica server authorising dc1, with no reserve.
pub(crate) fn lab() -> (tempfile::TempDir, LabCerts, Replica) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    (dir, certs, replica)
}

/// Closes a cycle, waits until the replica applied it, and compares `disks`.
fn close_and_compare(p: &Primary, replica: &Replica, disks: &[&str]) -> Value {
    let cycle = p.cycles_close("vm1");
    let info = replica.wait_applied("vm1", cycle, LONG);
    for disk in disks {
        assert_files_equal(&p.image(disk), &replica.disk("dc1", "vm1", disk), disk);
    }
    info
}

fn consumer_status(p: &Primary) -> Value {
    p.group_status("vm1")["consumer"].clone()
}

#[test]
fn replicates_over_mutual_tls_and_every_applied_cycle_matches_the_primary() {
    let (_dir, certs, replica) = lab();
    let p = primary(
        vec![
            DiskSpec::new("disk0", 16 * MIB).init(Init::Random(7)),
            DiskSpec::new("disk1", 8 * MIB),
        ],
        certs.consumer(&replica.url(REPLICA_HOST), PRIMARY_HOST, ""),
    );
    // The first cycle enables the replica and runs the initial replication.
    let cycle = p.cycles_close("vm1");
    let info = replica.wait_applied("vm1", cycle, LONG);
    assert_eq!(info["consistent"], true, "{info}");
    assert_eq!(info["trust_group"], "dc1");
    for disk in ["disk0", "disk1"] {
        assert_files_equal(&p.image(disk), &replica.disk("dc1", "vm1", disk), disk);
    }
    let status = consumer_status(&p);
    assert_eq!(status["state"], "replicating", "{status:#}");
    assert_eq!(status["health"], "Normal", "{status:#}");

    // Deltas: writes on both disks, then a cycle; the replica equals the images.
    for round in 0..3u8 {
        let offset = u64::from(round) * 3 * MIB + 4096;
        qemu_io_write(&p, "disk0", 0x40 + round, offset, 300 * KIB);
        qemu_io_write(&p, "disk1", 0x50 + round, offset / 2, 64 * KIB);
        let cycle = p.cycles_close("vm1");
        replica.wait_applied("vm1", cycle, LONG);
        for disk in ["disk0", "disk1"] {
            assert_files_equal(
                &p.image(disk),
                &replica.disk("dc1", "vm1", disk),
                &format!("{disk} after cycle {cycle}"),
            );
        }
    }
    let status = consumer_status(&p);
    assert!(
        status["network_bytes"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
    assert!(status["lag_secs"].as_u64().is_some(), "{status:#}");
    // Lag and close time in milliseconds; each delivery after the first records the
    // recovery point achieved just before it.
    let lag_ms = status["lag_ms"].as_u64().expect("lag_ms");
    let closed_ms = status["last_delivered_close_unix_ms"]
        .as_u64()
        .expect("close time in ms");
    assert!(
        lag_ms < 60_000 && closed_ms > 1_600_000_000_000,
        "{status:#}"
    );
    let peaks = status["rpo"]["count"].as_u64().unwrap_or(0);
    assert!(peaks >= 2, "{status:#}");
    assert!(
        status["rpo"]["max_ms"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
    // Compression is automatic unless configured otherwise, with zstd, which the
    // replica announced it decodes.
    assert_eq!(status["compression"]["mode"], "auto", "{status:#}");
    assert_eq!(status["compression"]["codec"], "zstd", "{status:#}");
    // The text status names state, health, lag and compression.
    let text = run_ok(
        Command::new(bin())
            .args(["status", "--config"])
            .arg(p.config()),
        SHORT,
    );
    for expected in [
        "replication: replicating",
        "health:    Normal",
        "behind",
        "compression: auto, zstd level",
    ] {
        assert!(
            text.stdout.contains(expected),
            "{expected}:\n{}",
            text.stdout
        );
    }
}

#[test]
fn a_thin_image_sends_only_its_data_in_the_initial_replication() {
    let (_dir, certs, replica) = lab();
    // 1 GiB thin disk holding 4 MiB of incompressible data; compression off so the
    // byte count measures what was read and sent.
    let p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 1024 * MIB)],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "compression = false",
    )))]));
    let data = pseudo_random(11, usize::try_from(4 * MIB).expect("fits"));
    {
        use std::os::unix::fs::FileExt;
        let image = std::fs::OpenOptions::new()
            .write(true)
            .open(p.image("disk0"))
            .expect("open image");
        image
            .write_all_at(&data[..2 << 20], 100 * MIB)
            .expect("write");
        image
            .write_all_at(&data[2 << 20..], 900 * MIB)
            .expect("write");
    }
    let mut p = p;
    p.restart();
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    let sent = consumer_status(&p)["network_bytes"].as_u64().unwrap_or(0);
    assert!(
        (4 * MIB..5 * MIB).contains(&sent),
        "a 1 GiB thin image with 4 MiB of data sent {sent} bytes"
    );
    assert_files_equal(
        &p.image("disk0"),
        &replica.disk("dc1", "vm1", "disk0"),
        "disk0",
    );
}

/// An existing copy on the replica server (an old backup with a few blocks changed
/// since) is compared by hashes; only the differing blocks cross the network.
#[test]
fn an_existing_copy_sends_only_the_blocks_that_differ() {
    use std::os::unix::fs::FileExt;
    let (dir, certs, replica) = lab();
    let p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![
            DiskSpec::new("disk0", 96 * MIB).init(Init::Random(21)),
            DiskSpec::new("disk1", 16 * MIB).init(Init::Random(22)),
        ],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "compression = false\ninitial_replication = \"existing\"",
    )))
    .ring_size("64MiB")]));
    // The backup: today's images, then the primary moves on by 3 small writes.
    let backups = dir.path().join("backup");
    std::fs::create_dir(&backups).expect("mkdir");
    let mut seed = p.cmd();
    seed.args(["replica", "seed", "--config"])
        .arg(replica.config())
        .args(["--trust-group", "dc1", "--name", "vm1"]);
    for disk in ["disk0", "disk1"] {
        let backup = backups.join(format!("{disk}.img"));
        std::fs::copy(p.image(disk), &backup).expect("copy");
        seed.arg("--disk")
            .arg(format!("{disk}={}", backup.display()));
    }
    let changes: [(&str, u64, usize); 3] = [
        ("disk0", 3 * MIB + 100, 4096),
        ("disk0", 70 * MIB - 10, 20),
        ("disk1", 16 * MIB - 8192, 8192),
    ];
    for (index, (disk, offset, len)) in changes.iter().enumerate() {
        let image = std::fs::OpenOptions::new()
            .write(true)
            .open(p.image(disk))
            .expect("open image");
        let bytes = pseudo_random(100 + index as u64, *len);
        image.write_all_at(&bytes, *offset).expect("write");
    }
    let seeded = run_ok(&mut seed, LONG);
    assert!(
        seeded.stdout.contains("Existing copy of vm1 placed"),
        "{}",
        seeded.all()
    );

    let mut p = p;
    p.restart();
    let info = close_and_compare(&p, &replica, &["disk0", "disk1"]);
    assert_eq!(info["consistent"], true, "{info}");
    // Six 4 KiB blocks differ (each write straddles two); 112 MiB did not.
    let status = consumer_status(&p);
    let sent = status["network_bytes"].as_u64().unwrap_or(0);
    assert!(
        (24 * KIB..128 * KIB).contains(&sent),
        "an existing copy with 6 differing blocks sent {sent} bytes: {status:#}"
    );
    let comparison = &status["last_comparison"];
    assert_eq!(comparison["marked_bytes"], 112 * MIB, "{status:#}");
    assert_eq!(comparison["differing_bytes"], 24 * KIB, "{status:#}");
    // The copy is claimed: a second seed of the same name is refused.
    let again = run(&mut seed, LONG);
    assert!(
        !again.success() && again.all().contains("already holds a replica"),
        "{}",
        again.all()
    );
}

/// The initial copy goes by external media: exported on the primary, imported on
/// the replica server; the network carries only the cycles written meanwhile.
#[test]
fn an_initial_copy_exported_to_media_and_imported_crosses_no_network() {
    let (dir, certs, replica) = lab();
    let p = primary(
        vec![
            DiskSpec::new("disk0", 24 * MIB).init(Init::Random(31)),
            DiskSpec::new("disk1", 8 * MIB).init(Init::Random(32)),
        ],
        certs.consumer(
            &replica.url(REPLICA_HOST),
            PRIMARY_HOST,
            "compression = false\ninitial_replication = \"media\"",
        ),
    );
    // Nothing ships before the export.
    let refused = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        !refused.success() && refused.all().contains("replication export"),
        "{}",
        refused.all()
    );
    p.wait_consumer("vm1", "waiting for the export", LONG, |s| {
        s["state"] == "awaiting_export"
    });

    let media = dir.path().join("usb");
    let exported = p.replication(&[
        "export",
        "--group",
        "vm1",
        "--to",
        media.to_str().expect("utf-8"),
    ]);
    assert!(
        exported.success(),
        "{}\n{}",
        exported.all(),
        tail(&p.log(), 30)
    );
    let manifest: Value =
        serde_json::from_slice(&read_file(&media.join("vm1/manifest.json"))).expect("manifest");
    assert_eq!(manifest["complete"], true, "{manifest:#}");
    // Written after the export: these cross the network once the copy is imported.
    qemu_io_write(&p, "disk0", 0x61, 5 * MIB, MIB);
    qemu_io_write(&p, "disk1", 0x62, 0, 64 * KIB);
    let waiting = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        !waiting.success() && waiting.all().contains("blkrep replica import"),
        "{}",
        waiting.all()
    );
    let status = p.wait_consumer("vm1", "waiting for the import", LONG, |s| {
        s["state"] == "awaiting_import"
    });
    assert!(
        status["network_bytes"].as_u64().unwrap_or(0) < 64 * KIB,
        "{status:#}"
    );
    // A second export is refused: the copy is on its way.
    let again = p.replication(&[
        "export",
        "--group",
        "vm1",
        "--to",
        media.to_str().expect("utf-8"),
    ]);
    assert!(!again.success(), "{}", again.all());

    let imported = run(
        Command::new(bin())
            .args(["replica", "import", "--config"])
            .arg(replica.config())
            .arg(media.join("vm1")),
        LONG,
    );
    assert!(
        imported.success(),
        "{}\n{}",
        imported.all(),
        tail(&replica.log(), 30)
    );
    let info = close_and_compare(&p, &replica, &["disk0", "disk1"]);
    assert_eq!(info["consistent"], true, "{info}");
    let status = consumer_status(&p);
    assert_eq!(status["state"], "replicating", "{status:#}");
    let sent = status["network_bytes"].as_u64().unwrap_or(0);
    assert!(
        (MIB..2 * MIB).contains(&sent),
        "32 MiB came by media, about 1 MiB of writes by network; the network carried {sent} bytes"
    );
}

/// Pausing on the replica side: the primary's cycles are refused as paused and
/// retried every interval, nothing is suspended, and resuming there catches up.
#[test]
fn a_replica_paused_on_its_side_refuses_cycles_until_resumed() {
    let (_dir, certs, replica) = lab();
    let p = primary(
        vec![DiskSpec::new("disk0", 8 * MIB).init(Init::Random(41))],
        certs.consumer(&replica.url(REPLICA_HOST), PRIMARY_HOST, ""),
    );
    replica.wait_applied("vm1", p.cycles_close("vm1"), LONG);
    let replica_cmd = |verb: &str| {
        run(
            Command::new(bin())
                .args(["replica", verb, "--config"])
                .arg(replica.config())
                .args(["--name", "vm1"]),
            LONG,
        )
    };
    let paused = replica_cmd("pause");
    assert!(paused.success(), "{}", paused.all());
    let status = run_ok(
        Command::new(bin())
            .args(["replica", "status", "--config"])
            .arg(replica.config()),
        LONG,
    );
    assert!(status.stdout.contains("paused yes"), "{}", status.stdout);
    qemu_io_write(&p, "disk0", 0x71, MIB, 256 * KIB);
    let refused = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        !refused.success() && refused.all().contains("paused"),
        "{}",
        refused.all()
    );
    let status = consumer_status(&p);
    assert_eq!(status["failure_class"], "next_interval", "{status:#}");
    assert_eq!(status["state"], "replicating", "{status:#}");
    let resumed = replica_cmd("resume");
    assert!(resumed.success(), "{}", resumed.all());
    close_and_compare(&p, &replica, &["disk0"]);
}

/// The initial replication waits for its scheduled time, and replication leaves from
/// the configured source address (a dedicated replication network).
#[test]
fn a_scheduled_start_from_a_dedicated_source_address() {
    let (_dir, certs, replica) = lab();
    // Whole seconds, as the configuration says it: the instant compared below.
    let start_at =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(4))
            .to_string();
    let start = humantime::parse_rfc3339(&start_at).expect("time");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 4 * MIB).init(Init::Random(51))],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        &format!("start_at = {start_at:?}\nsource_address = \"127.0.0.2\""),
    )))
    .interval("1s")
    .ring_size("64MiB")]));
    let early = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        !early.success() && early.all().contains("scheduled"),
        "{}",
        early.all()
    );
    let status = consumer_status(&p);
    assert_eq!(status["state"], "waiting_to_start", "{status:#}");
    assert!(
        replica.info("vm1").is_none(),
        "the replica exists before the scheduled start"
    );
    // Cycles every second: the initial replication starts by itself once it is time.
    let deadline = Instant::now() + LONG;
    while replica
        .info("vm1")
        .is_none_or(|info| info["consistent"] != true)
    {
        assert!(
            Instant::now() < deadline,
            "no initial replication\n{}",
            tail(&p.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        std::time::SystemTime::now() >= start,
        "the initial replication ran before {start_at}"
    );
    assert_files_equal(
        &p.image("disk0"),
        &replica.disk("dc1", "vm1", "disk0"),
        "disk0",
    );
    let log = replica.log();
    let connected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Primary connected"))
        .collect();
    assert!(
        !connected.is_empty() && connected.iter().all(|l| l.contains("127.0.0.2:")),
        "connections not from 127.0.0.2:\n{}",
        connected.join("\n")
    );
}

#[test]
fn refused_identities_are_critical_with_no_retry_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    let other_ca = LabCerts::create(&dir.path().join("other"), &[&[PRIMARY_HOST]]);
    let replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let url = replica.url(REPLICA_HOST);
    let cases = [
        // An identity the replica does not authorise.
        ("unlisted identity", certs.consumer(&url, ROGUE_HOST, "")),
        // A client certificate from another CA (trusting the right replica CA).
        (
            "certificate from another CA",
            format!(
                "type = \"replica\"\nurl = {url:?}\nca = {:?}\ncert = {:?}\nkey = {:?}",
                certs.ca().display().to_string(),
                other_ca.cert(PRIMARY_HOST).display().to_string(),
                other_ca.key(PRIMARY_HOST).display().to_string()
            ),
        ),
        // A replica certificate this primary does not trust.
        (
            "replica from another CA",
            format!(
                "type = \"replica\"\nurl = {url:?}\nca = {:?}\ncert = {:?}\nkey = {:?}",
                other_ca.ca().display().to_string(),
                certs.cert(PRIMARY_HOST).display().to_string(),
                certs.key(PRIMARY_HOST).display().to_string()
            ),
        ),
    ];
    for (what, consumer) in cases {
        let p = primary(
            vec![DiskSpec::new("disk0", 4 * MIB)],
            format!("{consumer}\nretry_scale = 0.001"),
        );
        let status = p.close_refused("vm1", what);
        assert_eq!(status["health"], "Critical", "{what}: {status:#}");
        assert_eq!(
            status["failure_class"], "authentication",
            "{what}: {status:#}"
        );
        let failures = status["failures"].as_u64();
        // No retry: the failure count stays put over several retry periods.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(consumer_status(&p)["failures"].as_u64(), failures, "{what}");
        assert!(
            p.log().contains("Replication suspended"),
            "{what}: no suspension logged\n{}",
            tail(&p.log(), 20)
        );
        assert!(
            replica.info("vm1").is_none(),
            "{what}: a replica was created"
        );
        assert!(
            std::fs::read_dir(replica.storage("dc1"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0,
            "{what}: the storage changed"
        );
    }
}

#[test]
fn connection_resets_mid_transfer_resume_without_resending_chunks() {
    let (_dir, certs, replica) = lab();
    let upstream = format!("127.0.0.1:{}", replica.port)
        .parse()
        .expect("address");
    let proxy = FaultProxy::start(upstream);
    let url = format!("https://{REPLICA_HOST}:{}", proxy.addr().port());
    let p = primary(
        vec![DiskSpec::new("disk0", 32 * MIB).init(Init::Random(3))],
        certs.consumer(
            &url,
            PRIMARY_HOST,
            "compression = false\nretry_scale = 0.002",
        ),
    );
    // The initial copy (32 MiB, 16 chunks) is cut twice mid-chunk.
    proxy.reset_after_upstream_bytes(5 * MIB + 12345);
    let first = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        !first.success(),
        "the cut transfer succeeded\n{}",
        first.report()
    );
    proxy.reset_after_upstream_bytes(9 * MIB + 777);
    let status = p.wait_consumer("vm1", "two failures", LONG, |s| {
        s["failures"].as_u64() >= Some(2)
    });
    assert_eq!(status["failure_class"], "network", "{status:#}");
    let cycle = p.wait_consumer("vm1", "recovery", LONG, |s| {
        s["last_delivered"].as_u64().is_some() && s["last_error"].is_null()
    })["last_delivered"]
        .as_u64()
        .expect("cycle");
    replica.wait_applied("vm1", cycle, LONG);
    assert_files_equal(
        &p.image("disk0"),
        &replica.disk("dc1", "vm1", "disk0"),
        "disk0",
    );
    // Resent per interruption: at most the chunk in flight (2 MiB + framing).
    let sent = consumer_status(&p)["network_bytes"].as_u64().unwrap_or(0);
    let upstream_total = proxy.upstream_bytes();
    assert!(
        upstream_total < 32 * MIB + 2 * (2 * MIB + 64 * KIB) + 2 * MIB,
        "{upstream_total} bytes went upstream for 32 MiB"
    );
    assert!(sent >= 32 * MIB, "{sent}");
}

#[test]
fn a_full_replica_refuses_cycles_cleanly_and_replication_resumes_after_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = certs(dir.path());
    // The replica keeps more free space in reserve than the filesystem has: every
    // transfer is refused as if the disk were full.
    let mut replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"1000TiB\"");
    let p = primary(
        vec![DiskSpec::new("disk0", 4 * MIB).init(Init::Random(5))],
        certs.consumer(&replica.url(REPLICA_HOST), PRIMARY_HOST, ""),
    );
    let close = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(!close.success(), "{}", close.report());
    let status = consumer_status(&p);
    assert_eq!(status["failure_class"], "next_interval", "{status:#}");
    assert_ne!(status["state"], "suspended", "{status:#}");
    // Space is freed (the reserve lowered), the replica restarted; the next attempt
    // replicates.
    replica.terminate();
    let config = std::fs::read_to_string(replica.config()).expect("config");
    std::fs::write(
        replica.config(),
        config.replace("reserve = \"1000TiB\"", "reserve = \"0\""),
    )
    .expect("config");
    replica.spawn();
    close_and_compare(&p, &replica, &["disk0"]);
}

#[test]
fn pause_resume_and_automatic_cycles_with_metrics() {
    let (_dir, certs, replica) = lab();
    let mut spec = Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 8 * MIB).init(Init::Random(9))],
    )
    .interval("1s")
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))]);
    spec.unix = true;
    let p = Primary::prepare(spec);
    p.enable_metrics();
    let mut p = p;
    p.restart();
    let metrics = p.reported_address(METRICS);
    // Cycles every second ship by themselves after the initial replication.
    let delivered = p.wait_consumer("vm1", "automatic cycles", LONG, |s| {
        s["cycles_delivered"].as_u64() >= Some(3) && s["state"] == "replicating"
    });
    assert_eq!(delivered["health"], "Normal", "{delivered:#}");

    let paused = p.replication(&["pause", "--group", "vm1"]);
    assert!(paused.success(), "{}", paused.report());
    let status = p.wait_consumer("vm1", "pause", SHORT, |s| s["state"] == "paused");
    assert_eq!(status["health"], "Warning", "{status:#}");
    qemu_io_write(&p, "disk0", 0x61, MIB, 256 * KIB);
    let close = run(&mut p.cycles_close_cmd("vm1"), LONG);
    assert!(
        !close.success() && close.all().contains("paused"),
        "{}",
        close.report()
    );
    let before = replica.info("vm1").expect("replica")["last_applied_cycle"].as_u64();

    let resumed = p.replication(&["resume", "--group", "vm1"]);
    assert!(resumed.success(), "{}", resumed.report());
    let cycle = p.cycles_close("vm1");
    assert!(Some(cycle) > before);
    replica.wait_applied("vm1", cycle, LONG);
    assert_files_equal(
        &p.image("disk0"),
        &replica.disk("dc1", "vm1", "disk0"),
        "disk0",
    );

    // Prometheus text over HTTP.
    let mut stream = std::net::TcpStream::connect(metrics).expect("metrics endpoint");
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let mut body = String::new();
    std::io::Read::read_to_string(&mut stream, &mut body).expect("answer");
    for expected in [
        "blkrep_replication_health{group=\"vm1\"} 0",
        "blkrep_replication_cycles_delivered_total{group=\"vm1\"}",
        "blkrep_replication_lag_seconds{group=\"vm1\"}",
        "# TYPE blkrep_replication_rpo_seconds histogram",
        "blkrep_replication_rpo_seconds_bucket{group=\"vm1\",le=\"+Inf\"}",
        "blkrep_replication_rpo_seconds_count{group=\"vm1\"}",
        "blkrep_disk_written_bytes_total{group=\"vm1\",disk=\"disk0\"}",
    ] {
        assert!(body.contains(expected), "{expected}:\n{body}");
    }

    // Removing with the replica's deletion needs confirmation.
    let refused = p.replication(&["remove", "--group", "vm1", "--delete-replica"]);
    assert!(
        !refused.success() && refused.all().contains("--yes"),
        "{}",
        refused.report()
    );
    let removed = p.replication(&["remove", "--group", "vm1", "--delete-replica", "--yes"]);
    assert!(removed.success(), "{}", removed.report());
    assert!(replica.info("vm1").is_none(), "the replica was not deleted");
    p.wait_consumer("vm1", "removal", SHORT, |s| s["state"] == "removed");
}

/// A ring overflow's resync compares block hashes first: blocks written again with
/// what the replica holds already are not sent.
#[test]
fn an_overflow_resync_sends_only_the_blocks_that_differ() {
    let (_dir, certs, replica) = lab();
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB).init(Init::Random(41))],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))
    .ring_size("8MiB")]));
    close_and_compare(&p, &replica, &["disk0"]);
    p.replication(&["pause", "--group", "vm1"]).assert_ok();
    // 12 MiB written back unchanged (the replica has them) and 2 MiB of new data: more
    // than the ring holds.
    let unchanged = read_range(&p.image("disk0"), 16 * MIB, (12 * MIB) as usize);
    let mut conn = nbd::Conn::connect_unix(&p.nbd_sock(), "disk0").expect("connect");
    for (index, piece) in unchanged.chunks(MIB as usize).enumerate() {
        conn.write(16 * MIB + index as u64 * MIB, piece, false)
            .expect("write");
    }
    conn.write(2 * MIB, &vec![0x5a; (2 * MIB) as usize], true)
        .expect("write");
    conn.disconnect();
    let status = p.group_status("vm1");
    assert_eq!(status["resync_required"], true, "{status:#}");
    p.replication(&["resume", "--group", "vm1"]).assert_ok();
    let info = close_and_compare(&p, &replica, &["disk0"]);
    assert_eq!(info["consistent"], true, "{info:#}");
    let comparison = &p.group_status("vm1")["consumer"]["last_comparison"];
    assert!(
        comparison["marked_bytes"].as_u64() >= Some(14 * MIB),
        "{comparison:#}"
    );
    assert_eq!(comparison["differing_bytes"], 2 * MIB, "{comparison:#}");
}

/// Rewrites the boot id in a ring's superblocks, so the next start takes the stop
/// for a host crash (the page cache of this test's "host" kept everything, which
/// only makes the resync find fewer differences, never more).
fn pretend_host_crash(ring: &std::path::Path) {
    use tracker::superblock::{Superblock, SUPERBLOCK_LEN};
    let mut bytes = std::fs::read(ring).expect("ring");
    for at in [0, SUPERBLOCK_LEN] {
        if let Ok(mut superblock) = Superblock::decode(&bytes[at..at + SUPERBLOCK_LEN]) {
            superblock.boot_id = [0x5a; 16];
            bytes[at..at + SUPERBLOCK_LEN].copy_from_slice(&superblock.encode().expect("encode"));
        }
    }
    std::fs::write(ring, &bytes).expect("ring");
}

/// After an unclean host shutdown the resync covers only the extents written
/// recently (the activity log), not the whole disk, and sends only what differs.
#[test]
fn a_host_crash_resyncs_only_the_recently_written_extents() {
    const EXTENT: u64 = 64 * MIB;
    let (_dir, certs, replica) = lab();
    let mut p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 4 * EXTENT)],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))]));
    close_and_compare(&p, &replica, &["disk0"]);
    let mut conn = nbd::Conn::connect_unix(&p.nbd_sock(), "disk0").expect("connect");
    // Shipped, and flushed: still listed, since nothing needed its slot.
    conn.write(EXTENT + 4096, &[0x11; 8192], true)
        .expect("write");
    let shipped = p.cycles_close("vm1");
    replica.wait_applied("vm1", shipped, LONG);
    // Not shipped when the host goes down.
    conn.write(3 * EXTENT + MIB, &vec![0x22; MIB as usize], false)
        .expect("write");
    p.kill();
    pretend_host_crash(&p.layout.ring("vm1"));
    p.restart();
    assert!(
        p.log()
            .contains("the resync covers the recently written extents"),
        "{}",
        tail(&p.log(), 30)
    );
    let info = close_and_compare(&p, &replica, &["disk0"]);
    assert_eq!(info["consistent"], true, "{info:#}");
    let comparison = &p.group_status("vm1")["consumer"]["last_comparison"];
    assert_eq!(comparison["marked_bytes"], 2 * EXTENT, "{comparison:#}");
    assert_eq!(comparison["differing_bytes"], MIB, "{comparison:#}");
}
