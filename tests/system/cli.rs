//! The command line: help texts, config validation messages, `status --json`,
//! clean shutdown on SIGTERM/SIGINT, and the offline/online split of `cycles`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::nbd::Conn;
use testkit::writer::{self, ThreadCfg, Writers};
use testkit::{
    assert_files_equal, assert_group_shape, bin, read_file, run, run_ok, run_with_timeout,
    Consumer, DiskSpec, GroupSpec, Primary, Spec, KIB, MIB, SHORT,
};

fn blkrep(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args);
    c
}

#[test]
fn help_for_every_subcommand() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--help"], &["primary", "status", "cycles"]),
        (&["primary", "--help"], &["--config"]),
        (&["status", "--help"], &["--config", "--json", "--socket"]),
        (&["cycles", "--help"], &["close", "apply"]),
        (&["cycles", "close", "--help"], &["--config", "--group"]),
        (
            &["cycles", "apply", "--help"],
            &["--config", "--group", "--to"],
        ),
    ];
    for (args, needles) in cases {
        let o = run_ok(&mut blkrep(args), SHORT);
        assert!(
            !o.stdout.trim().is_empty(),
            "blkrep {args:?} printed no help\n{}",
            o.report()
        );
        for n in *needles {
            assert!(
                o.stdout.contains(n),
                "blkrep {args:?} help does not mention {n}\n{}",
                o.report()
            );
        }
    }
    let o = run(&mut blkrep(&["no-such-subcommand"]), SHORT);
    assert!(
        !o.success(),
        "an unknown subcommand succeeded\n{}",
        o.report()
    );
    let o = run(&mut blkrep(&["primary"]), SHORT);
    assert!(
        !o.success(),
        "`blkrep primary` without --config succeeded\n{}",
        o.report()
    );
}

/// The valid base config of the config-error cases.
fn base_spec() -> Spec {
    Spec::new(vec![
        GroupSpec::new("vm1", vec![DiskSpec::new("disk0", 4 * MIB)]).ring_size("8MiB"),
        GroupSpec::new("vm2", vec![DiskSpec::new("disk1", 4 * MIB)])
            .ring_size("8MiB")
            .consumer(Consumer::Discard),
    ])
}

#[test]
fn config_errors_are_reported() {
    // The base config must be accepted, or the error cases below prove nothing.
    let mut p = Primary::start(base_spec());
    p.terminate();
    let good = fs::read_to_string(p.config()).unwrap();
    let root = p.layout.root.clone();
    let missing_img = root.join("does-not-exist.img");
    let missing_img_s = missing_img.to_string_lossy().to_string();
    let disk0_img = p.image("disk0").to_string_lossy().to_string();

    let sub = |from: &str, to: &str| -> String {
        assert!(good.contains(from), "base config lacks {from:?}:\n{good}");
        good.replacen(from, to, 1)
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "bad size",
            sub("ring_size = \"8MiB\"", "ring_size = \"8QiB\""),
            vec!["8QiB", "ring_size"],
        ),
        (
            "bad block size",
            sub("block_size = \"4KiB\"", "block_size = \"four\""),
            vec!["four", "block_size"],
        ),
        (
            "duplicate export name",
            sub("name = \"disk1\"", "name = \"disk0\""),
            vec!["disk0"],
        ),
        (
            "interval 0s",
            sub("interval = \"1h\"", "interval = \"0s\""),
            vec!["interval"],
        ),
        (
            "interval below 1s",
            sub("interval = \"1h\"", "interval = \"500ms\""),
            vec!["interval"],
        ),
        (
            "missing image",
            sub(
                &format!("image = \"{disk0_img}\""),
                &format!("image = \"{missing_img_s}\""),
            ),
            vec!["does-not-exist.img"],
        ),
        ("TOML syntax error", format!("{good}\n[[group]\n"), vec![]),
    ];
    for (what, text, needles) in cases {
        let cfg = root.join(format!("bad-{}.toml", what.replace(' ', "-")));
        fs::write(&cfg, &text).unwrap();
        let r = run_with_timeout(
            Command::new(bin()).arg("primary").arg("--config").arg(&cfg),
            Duration::from_secs(15),
        );
        let o = match r {
            Ok(o) => o,
            Err(o) => panic!(
                "{what}: blkrep primary kept running with an invalid config\nconfig:\n{text}\n{}",
                o.report()
            ),
        };
        assert!(
            !o.success(),
            "{what}: blkrep primary exited 0 with an invalid config\nconfig:\n{text}\n{}",
            o.report()
        );
        let msg = o.all();
        assert!(
            !o.stderr.trim().is_empty(),
            "{what}: no error message on stderr\n{}",
            o.report()
        );
        // At least one of the needles names the problem (all-lowercase compare).
        if !needles.is_empty() {
            let low = msg.to_lowercase();
            assert!(
                needles.iter().any(|n| low.contains(&n.to_lowercase())),
                "{what}: the error message does not name the problem (expected one of {needles:?})\n{}",
                o.report()
            );
        }
        if what == "duplicate export name" {
            let low = msg.to_lowercase();
            assert!(
                ["duplicate", "unique", "already", "twice", "more than once"]
                    .iter()
                    .any(|w| low.contains(w)),
                "{what}: message does not say the name is duplicated\n{}",
                o.report()
            );
        }
        println!("{what}: {}", msg.trim().lines().last().unwrap_or(""));
    }
    let missing_cfg = root.join("no-such-config.toml");
    let o = run(
        Command::new(bin())
            .arg("primary")
            .arg("--config")
            .arg(&missing_cfg),
        Duration::from_secs(15),
    );
    assert!(
        !o.success() && o.all().contains("no-such-config.toml"),
        "missing config file\n{}",
        o.report()
    );
}

#[test]
fn status_json_fields() {
    let p = Primary::start(Spec::new(vec![
        GroupSpec::new(
            "vm1",
            vec![
                DiskSpec::new("disk0", 16 * MIB),
                DiskSpec::new("disk1", 8 * MIB),
            ],
        ),
        GroupSpec::new("vm2", vec![DiskSpec::new("disk2", 4 * MIB)])
            .tracking(false)
            .consumer(Consumer::None),
    ]));
    let st = p.status();
    let groups = st["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups array: {st}"));
    let names: Vec<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["vm1", "vm2"], "{st}");
    for g in groups {
        assert_group_shape(g);
    }
    // Same answer through --socket.
    let o = run_ok(
        Command::new(bin())
            .args(["status", "--json", "--socket"])
            .arg(p.layout.ctl()),
        SHORT,
    );
    let st2 = o.json();
    assert_eq!(
        st2["groups"].as_array().map(Vec::len),
        Some(2),
        "status --socket: {st2}"
    );
    // Human-readable form exists.
    let o = run_ok(
        Command::new(bin())
            .args(["status", "--config"])
            .arg(p.config()),
        SHORT,
    );
    assert!(
        o.stdout.contains("vm1") && o.stdout.contains("disk0"),
        "plain status\n{}",
        o.report()
    );

    let g = p.group_status("vm1");
    assert_eq!(g["tracking"], "logging", "{g}");
    assert_eq!(g["resync_required"], false, "{g}");
    assert!(g["resync_reason"].is_null(), "{g}");
    let ring_size = g["ring"]["size"].as_u64().unwrap();
    assert!(
        ring_size > 0 && ring_size <= 64 * MIB,
        "ring.size {ring_size}: {g}"
    );
    let used0 = g["ring"]["used"].as_u64().unwrap();
    assert!(used0 <= ring_size, "{g}");
    let (open, closed, acked) = (
        g["cycle"]["open"].as_u64().unwrap(),
        g["cycle"]["last_closed"].as_u64().unwrap(),
        g["cycle"]["last_acked"].as_u64().unwrap(),
    );
    assert!(
        acked <= closed && closed < open,
        "cycle numbers out of order: {g}"
    );
    for (d, size) in [("disk0", 16 * MIB), ("disk1", 8 * MIB)] {
        let ds = p.disk_status("vm1", d);
        assert_eq!(ds["size"].as_u64(), Some(size), "{ds}");
        assert_eq!(
            ds["dirty_bytes"].as_u64(),
            Some(0),
            "fresh disk dirty: {ds}"
        );
        assert_eq!(ds["connections"].as_u64(), Some(0), "{ds}");
    }
    assert_eq!(
        p.group_status("vm2")["tracking"],
        "off",
        "tracking = false group"
    );

    // One connection writes 64 KiB + a 100-byte unaligned write.
    let mut c = Conn::connect_unix(&p.nbd_sock(), "disk0").unwrap();
    c.write(MIB, &[1; 65536], false).unwrap();
    c.write(3 * MIB + 10, &[2; 100], false).unwrap();
    let ds = p.disk_status("vm1", "disk0");
    assert_eq!(ds["connections"].as_u64(), Some(1), "{ds}");
    assert_eq!(
        ds["dirty_bytes"].as_u64(),
        Some(64 * KIB + 4 * KIB),
        "dirty_bytes after 64 KiB + 100 B: {ds}"
    );
    assert_eq!(
        p.disk_status("vm1", "disk1")["dirty_bytes"].as_u64(),
        Some(0)
    );
    let g = p.group_status("vm1");
    assert!(
        g["ring"]["used"].as_u64().unwrap() > used0,
        "ring.used did not grow after writes: {g}"
    );

    let n = p.cycles_close("vm1");
    let g = p.group_status("vm1");
    assert!(g["cycle"]["last_closed"].as_u64().unwrap() >= n, "{g}");
    assert!(g["cycle"]["last_acked"].as_u64().unwrap() >= n, "{g}");
    assert!(g["cycle"]["open"].as_u64().unwrap() > n, "{g}");
    assert_eq!(
        p.disk_status("vm1", "disk0")["dirty_bytes"].as_u64(),
        Some(0),
        "dirty after close"
    );
    assert_files_equal(
        &p.copy_image("vm1", "disk0"),
        &p.image("disk0"),
        "copy after close",
    );

    c.disconnect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = p.disk_status("vm1", "disk0")["connections"].as_u64();
        if n == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections still {n:?} 5 s after disconnect"
        );
        thread::sleep(Duration::from_millis(100));
    }

    let o = run(&mut p.cycles_close_cmd("no-such-group"), SHORT);
    assert!(
        !o.success() && o.all().contains("no-such-group"),
        "cycles close of an unknown group\n{}",
        o.report()
    );
}

fn stop_and_check_clean(sig: Signal) {
    let mut p = Primary::start(Spec::single(16 * MIB));
    let seqs = Arc::new(AtomicU64::new(1));
    let initial = read_file(&p.image("disk0"));
    let cfg = ThreadCfg {
        disk: 0,
        hot_region: 16 * MIB,
        rate: 8 * MIB,
        max_blocks: 16,
        budget: 32 * MIB,
    };
    let conns = vec![
        (
            Conn::connect_unix(&p.nbd_sock(), "disk0").unwrap(),
            cfg.clone(),
        ),
        (Conn::connect_unix(&p.nbd_sock(), "disk0").unwrap(), cfg),
    ];
    let w = Writers::start(conns, &[16 * MIB], seqs, 42);
    thread::sleep(Duration::from_millis(400));
    w.expect_loss();
    let st = p.stop_with(sig);
    assert!(
        st.success(),
        "blkrep primary exited with {st} after {sig}\n{}",
        testkit::tail(&p.log(), 100)
    );
    let log = w.finish();
    println!(
        "{sig}: {} writes, {} not acknowledged",
        log.writes.len(),
        log.unacked()
    );
    assert!(log.acked() > 10, "too few writes before {sig}");
    let img = read_file(&p.image("disk0"));
    let errs = writer::check_disk(0, &img, &initial, &log, 10);
    assert!(
        errs.is_empty(),
        "acknowledged writes missing after {sig}:\n  {}",
        errs.join("\n  ")
    );

    // The ring is clean: a restart needs no resync and still holds the open cycle,
    // so the next close brings the copy up to date.
    p.restart();
    let g = p.group_status("vm1");
    assert_eq!(
        g["resync_required"], false,
        "restart after {sig} requires a resync: {g}"
    );
    assert_eq!(g["tracking"], "logging", "{g}");
    let dirty = p.disk_status("vm1", "disk0")["dirty_bytes"]
        .as_u64()
        .unwrap();
    p.cycles_close("vm1");
    assert_files_equal(
        &p.copy_image("vm1", "disk0"),
        &p.image("disk0"),
        &format!("copy after {sig} + restart + close"),
    );
    // What the next cycle ships (the open cycle's writes from before the restart)
    // must show as dirty: status and x-blkrep:dirty are the same map.
    assert!(
        dirty > 0,
        "after {sig} and a restart the open cycle's writes are not counted as dirty: {g}"
    );
    p.terminate();
}

#[test]
fn sigterm_is_a_clean_shutdown() {
    stop_and_check_clean(Signal::SIGTERM);
}

#[test]
fn sigint_is_a_clean_shutdown() {
    stop_and_check_clean(Signal::SIGINT);
}

#[test]
fn offline_apply_refuses_while_daemon_runs() {
    let mut p = Primary::start(Spec::single(8 * MIB));
    let mut c = Conn::connect_unix(&p.nbd_sock(), "disk0").unwrap();
    c.write(0, &[9; 8192], true).unwrap();
    c.disconnect();
    let copy = p.copy_image("vm1", "disk0");
    let before = read_file(&copy);
    let o = p.cycles_apply("vm1", &p.copy_dir("vm1"));
    assert!(
        !o.success(),
        "cycles apply ran while the daemon holds the ring\n{}",
        o.report()
    );
    let low = o.all().to_lowercase();
    assert!(
        ["running", "lock", "in use", "held", "busy", "daemon"]
            .iter()
            .any(|w| low.contains(w)),
        "cycles apply refused without saying why\n{}",
        o.report()
    );
    assert_eq!(
        read_file(&copy),
        before,
        "refused cycles apply changed the copy"
    );
    p.status(); // daemon unaffected

    p.terminate();
    // Daemon down: an online command fails clearly instead of hanging...
    let o = run(&mut p.cycles_close_cmd("vm1"), SHORT);
    assert!(
        !o.success(),
        "cycles close succeeded with no daemon\n{}",
        o.report()
    );
    assert!(
        !o.stderr.trim().is_empty(),
        "cycles close failed silently\n{}",
        o.report()
    );
    let o = run(
        Command::new(bin())
            .args(["status", "--config"])
            .arg(p.config()),
        SHORT,
    );
    assert!(
        !o.success(),
        "status succeeded with no daemon\n{}",
        o.report()
    );
    // ...and the offline apply now works and ships the open cycle.
    let o = p.cycles_apply("vm1", &p.copy_dir("vm1"));
    assert!(o.success(), "offline cycles apply failed\n{}", o.report());
    assert_files_equal(&copy, &p.image("disk0"), "copy after offline apply");
    assert!(read_file(&copy)[..8192].iter().all(|&b| b == 9));
}
