//! Stock NBD clients against a real `blkrep primary`: qemu-img, qemu-io, nbdinfo,
//! nbdcopy and fio's nbd engine, over the unix socket and TCP. After each client
//! has done its work the group's cycle is closed and the local copy must equal the
//! image, so every client's writes are also checked to have been tracked.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::process::Command;

use serde_json::Value;
use testkit::{
    assert_files_equal, evict_from_page_cache, pseudo_random, read_file, read_range, require_tool,
    run, run_ok, DiskSpec, GroupSpec, Init, Primary, Spec, KIB, LONG, MIB, SHORT,
};

/// Closes vm1's cycle and checks the local copy of every vm1 disk equals its image.
fn close_and_compare(p: &Primary) {
    p.cycles_close("vm1");
    let g = p.spec.groups.iter().find(|g| g.name == "vm1").unwrap();
    for d in &g.disks {
        assert_files_equal(
            &p.copy_image("vm1", &d.name),
            &p.image(&d.name),
            "local copy after cycles close",
        );
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> testkit::Output {
    require_tool("qemu-io");
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri);
    run(&mut c, LONG)
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) {
    let o = qemu_io(uri, cmds);
    assert!(
        o.success() && !o.all().contains("failed") && !o.all().contains("error"),
        "qemu-io reported a failure\n{}",
        o.report()
    );
}

/// A 32 MiB source file: random data with zero runs (some sparse) so converters
/// exercise both data and zero writes.
fn source_file(p: &Primary, seed: u64) -> std::path::PathBuf {
    let mut data = pseudo_random(seed, (32 * MIB) as usize);
    for z in [
        MIB..3 * MIB,
        10 * MIB..10 * MIB + 4 * KIB,
        20 * MIB..24 * MIB,
    ] {
        data[z.start as usize..z.end as usize].fill(0);
    }
    let src = p.layout.root.join(format!("src-{seed}.raw"));
    std::fs::write(&src, &data).unwrap();
    src
}

#[test]
fn qemu_img_convert_round_trip() {
    require_tool("qemu-img");
    // The target starts with other content so zero runs must really be written.
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB).init(Init::Random(99))],
    )]));
    let src = source_file(&p, 1);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(p.uri("disk0")),
        LONG,
    );
    let out = p.layout.root.join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(p.uri("disk0"))
            .arg(&out),
        LONG,
    );
    assert_files_equal(&src, &out, "qemu-img convert in and back out");
    assert_files_equal(&src, &p.image("disk0"), "image after qemu-img convert");
    let o = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(p.uri("disk0")),
        LONG,
    );
    assert!(
        o.stdout.contains("identical"),
        "qemu-img compare: {}",
        o.report()
    );
    close_and_compare(&p);
}

fn qemu_io_suite(p: &Primary, uri: &str) {
    // pattern write/read
    qemu_io_ok(uri, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
    // a wrong pattern must be noticed (guards against a check that cannot fail)
    let o = qemu_io(uri, &["read -P 0x5b 0 64k"]);
    assert!(
        o.all().contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern\n{}",
        o.report()
    );
    // write zeroes (plain, may-unmap)
    qemu_io_ok(
        uri,
        &[
            "write -P 0x11 64k 64k",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "write -P 0x12 128k 64k",
            "write -z -u 128k 64k",
            "read -P 0 128k 64k",
            "read -P 0x5a 0 64k",
        ],
    );
    // fast zero (-n): the server may refuse with ENOTSUP; if it succeeds it must zero.
    qemu_io_ok(uri, &["write -P 0x13 192k 64k"]);
    let o = qemu_io(uri, &["write -z -n 192k 64k"]);
    if o.success() && !o.all().contains("failed") {
        qemu_io_ok(uri, &["read -P 0 192k 64k"]);
    } else {
        assert!(
            o.all().contains("Operation not supported"),
            "fast write zeroes failed other than with ENOTSUP\n{}",
            o.report()
        );
        println!("note: fast zero (write -z -n) refused with ENOTSUP");
    }
    // discard: blkrep's BlockDevice contract says trimmed ranges read as zeroes
    qemu_io_ok(
        uri,
        &[
            "write -P 0x33 256k 64k",
            "discard 256k 64k",
            "read -P 0 256k 64k",
        ],
    );
    // FUA write
    qemu_io_ok(uri, &["write -f -P 0x44 320k 64k", "read -P 0x44 320k 64k"]);
    // unaligned, sub-sector I/O
    qemu_io_ok(
        uri,
        &[
            "write -P 0x55 400k 8k",
            "write -P 0x66 401000 3000",
            "read -P 0x66 401000 3000",
            "read -P 0x55 400k 1000",
        ],
    );
    // flush
    qemu_io_ok(uri, &["write -P 0x77 1M 1M", "flush", "read -P 0x77 1M 1M"]);

    // The image file holds what qemu-io saw.
    let img = p.image("disk0");
    let chk = |off: u64, len: usize, b: u8| {
        let v = read_range(&img, off, len);
        assert!(
            v.iter().all(|&x| x == b),
            "image at {off}+{len} is not {b:#x} after qemu-io"
        );
    };
    chk(0, 65536, 0x5a);
    chk(64 * 1024, 128 * 1024, 0);
    chk(256 * 1024, 65536, 0);
    chk(320 * 1024, 65536, 0x44);
    chk(401_000, 3000, 0x66);
    chk(MIB, MIB as usize, 0x77);
}

#[test]
fn qemu_io_commands_unix() {
    let p = Primary::start(Spec::single(32 * MIB));
    qemu_io_suite(&p, &p.uri("disk0"));
    close_and_compare(&p);
}

#[test]
fn qemu_io_commands_tcp() {
    let p = Primary::start(Spec::single(32 * MIB).with_tcp());
    qemu_io_suite(&p, &p.tcp_uri("disk0"));
    close_and_compare(&p);
}

fn nbdinfo_map(uri: &str, ctx: Option<&str>) -> Vec<(u64, u64, u64)> {
    let mut c = Command::new("nbdinfo");
    c.arg("--json");
    match ctx {
        Some(ctx) => c.arg(format!("--map={ctx}")),
        None => c.arg("--map"),
    };
    c.arg(uri);
    let o = run_ok(&mut c, SHORT);
    let v = o.json();
    let arr = v
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json not an array\n{}", o.report()));
    let mut pos = 0;
    let mut out = Vec::new();
    for e in arr {
        let (off, len, ty) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        assert_eq!(off, pos, "map not contiguous at {pos}: {}", o.stdout);
        assert!(len > 0, "zero-length extent: {}", o.stdout);
        pos += len;
        out.push((off, len, ty));
    }
    out
}

fn type_at(map: &[(u64, u64, u64)], off: u64) -> u64 {
    map.iter()
        .find(|(o, l, _)| *o <= off && off < o + l)
        .unwrap_or_else(|| panic!("{off} not in map {map:?}"))
        .2
}

/// Every 4 KiB block's dirty bit must equal membership in `dirty`.
fn assert_dirty_exactly(map: &[(u64, u64, u64)], size: u64, dirty: &[(u64, u64)], what: &str) {
    assert_eq!(
        map.last().map(|(o, l, _)| o + l),
        Some(size),
        "{what}: map does not cover the export: {map:?}"
    );
    for b in (0..size).step_by(4096) {
        let want = dirty.iter().any(|(o, l)| *o <= b && b < o + l);
        let got = type_at(map, b) & 1 != 0;
        assert_eq!(
            got, want,
            "{what}: block at {b} dirty={got}, expected {want}; map {map:?}"
        );
    }
}

#[test]
fn nbdinfo_list_and_maps() {
    require_tool("nbdinfo");
    let p = Primary::start(Spec::new(vec![
        GroupSpec::new(
            "vm1",
            vec![
                DiskSpec::new("disk0", 16 * MIB),
                DiskSpec::new("disk1", 16 * MIB),
            ],
        ),
        GroupSpec::new(
            "vm2",
            vec![DiskSpec::new("disk2", 16 * MIB)
                .init(Init::Random(3))
                .read_only()],
        ),
    ]));
    let sock = p.nbd_sock();
    let o = run_ok(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(format!("nbd+unix:///?socket={}", sock.display())),
        SHORT,
    );
    let v = o.json();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk0", "disk1", "disk2"],
        "nbdinfo --list\n{}",
        o.report()
    );
    for e in v["exports"].as_array().unwrap() {
        let name = e["export-name"].as_str().unwrap();
        assert_eq!(e["export-size"].as_u64(), Some(16 * MIB), "{name} size");
        assert_eq!(
            e["is_read_only"].as_bool(),
            Some(name == "disk2"),
            "{name} read-only flag"
        );
        assert_eq!(
            e["can_multi_conn"].as_bool(),
            Some(true),
            "{name} does not advertise multi-conn"
        );
        let ctxs: Vec<&str> = e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(
            ctxs.contains(&"base:allocation"),
            "{name} contexts {ctxs:?}"
        );
        assert!(ctxs.contains(&"x-blkrep:dirty"), "{name} contexts {ctxs:?}");
    }

    let uri = p.uri("disk0");
    let size = 16 * MIB;
    // Fresh sparse image, nothing written: all hole for base:allocation, all clean.
    let m = nbdinfo_map(&uri, None);
    assert!(
        m.iter().all(|e| e.2 & 1 != 0),
        "fresh sparse image has non-hole extents: {m:?}"
    );
    assert_dirty_exactly(
        &nbdinfo_map(&uri, Some("x-blkrep:dirty")),
        size,
        &[],
        "fresh export",
    );

    qemu_io_ok(
        &uri,
        &[
            "write -P 0x5a 1M 64k",
            "write -P 1 5124k 8k",
            "write -z 8M 4k",
            "discard 12M 64k",
        ],
    );
    let m = nbdinfo_map(&uri, None);
    for off in [MIB, MIB + 60 * KIB, 5124 * KIB, 5128 * KIB] {
        assert_eq!(
            type_at(&m, off) & 3,
            0,
            "written data at {off} not reported as data: {m:?}"
        );
    }
    assert!(
        type_at(&m, 14 * MIB) & 1 != 0,
        "never-written range not a hole: {m:?}"
    );
    let dirty = [
        (MIB, 64 * KIB),
        (5124 * KIB, 8 * KIB),
        (8 * MIB, 4 * KIB),
        (12 * MIB, 64 * KIB),
    ];
    assert_dirty_exactly(
        &nbdinfo_map(&uri, Some("x-blkrep:dirty")),
        size,
        &dirty,
        "after writes",
    );
    assert_dirty_exactly(
        &nbdinfo_map(&uri, Some("qemu:dirty-bitmap:blkrep")),
        size,
        &dirty,
        "alias after writes",
    );
    // disk1 untouched: clean.
    assert_dirty_exactly(
        &nbdinfo_map(&p.uri("disk1"), Some("x-blkrep:dirty")),
        size,
        &[],
        "untouched disk1",
    );

    // Closing the cycle ships the dirty blocks; the new open cycle is clean.
    close_and_compare(&p);
    assert_dirty_exactly(
        &nbdinfo_map(&uri, Some("x-blkrep:dirty")),
        size,
        &[],
        "after cycles close",
    );
    qemu_io_ok(&uri, &["write -P 2 2M 4k"]);
    assert_dirty_exactly(
        &nbdinfo_map(&uri, Some("x-blkrep:dirty")),
        size,
        &[(2 * MIB, 4 * KIB)],
        "next cycle",
    );
    // Unaligned write dirties the whole 4 KiB block(s) it touches.
    qemu_io_ok(&uri, &["write -P 3 3147000 5000"]);
    assert_dirty_exactly(
        &nbdinfo_map(&uri, Some("x-blkrep:dirty")),
        size,
        &[(2 * MIB, 4 * KIB), (3_145_728, 8 * KIB)],
        "unaligned write",
    );
    close_and_compare(&p);
}

#[test]
fn nbdcopy_round_trip() {
    require_tool("nbdcopy");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB).init(Init::Random(5))],
    )]));
    let src = source_file(&p, 2);
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(p.uri("disk0")),
        LONG,
    );
    assert_files_equal(&src, &p.image("disk0"), "image after nbdcopy in");
    let out = p.layout.root.join("out.raw");
    run_ok(Command::new("nbdcopy").arg(p.uri("disk0")).arg(&out), LONG);
    assert_files_equal(&src, &out, "nbdcopy in and back out");
    // Single connection, synchronous, too.
    let out2 = p.layout.root.join("out2.raw");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=1", "--requests=1"])
            .arg(p.uri("disk0"))
            .arg(&out2),
        LONG,
    );
    assert_files_equal(&src, &out2, "nbdcopy out (1 connection)");
    close_and_compare(&p);
}

fn fio_verify(p: &Primary, uri: &str) {
    fio_verify_with(p, uri, &[]);
}

/// fio random writes with crc32c verification, plus `extra` fio options.
fn fio_verify_with(p: &Primary, uri: &str, extra: &[&str]) {
    require_tool("fio");
    let o = run(
        Command::new("fio")
            .args(extra)
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=16M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
                // no verify state file in the working directory (the repo)
                "--verify_state_save=0",
            ])
            .current_dir(&p.layout.root),
        LONG,
    );
    assert!(o.success(), "fio failed\n{}", o.report());
    let js = &o.stdout[o
        .stdout
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio\n{}", o.report()))..];
    let v: Value =
        serde_json::from_str(js).unwrap_or_else(|e| panic!("fio JSON: {e}\n{}", o.report()));
    let job = &v["jobs"][0];
    assert_eq!(
        job["error"].as_u64(),
        Some(0),
        "fio job error\n{}",
        o.report()
    );
    assert_eq!(
        job["write"]["io_bytes"].as_u64(),
        Some(16 * MIB),
        "fio wrote {}",
        job["write"]["io_bytes"]
    );
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(16 * MIB),
        "fio verified {}",
        job["read"]["io_bytes"]
    );
    close_and_compare(p);
    // fio's data really is in the image (not all zero).
    let img = read_file(&p.image("disk0"));
    assert!(
        img[..(16 * MIB) as usize].iter().any(|&b| b != 0),
        "image still zero after fio"
    );
}

#[test]
fn fio_nbd_engine_unix() {
    let p = Primary::start(Spec::single(32 * MIB));
    fio_verify(&p, &p.uri("disk0"));
}

#[test]
fn fio_nbd_engine_tcp() {
    let p = Primary::start(Spec::single(32 * MIB).with_tcp());
    fio_verify(&p, &p.tcp_uri("disk0"));
}

/// O_DIRECT image with a flush every 8 writes: reads, writes and flushes run on the
/// connection's workers and are answered out of order, which fio's nbd engine (libnbd)
/// must accept while every block still verifies and every write is tracked.
#[test]
fn fio_nbd_engine_direct_with_flushes() {
    let spec = Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB).direct()],
    )]);
    let p = Primary::start(spec);
    fio_verify_with(&p, &p.uri("disk0"), &["--fsync=8"]);
}

/// Reads of an image that is not in the page cache run on the connection's I/O engine,
/// many at once and answered out of order; reads of cached data are answered at once,
/// and reads only partly cached go to the engine. Every byte read must be the image's,
/// and the image must really have been out of the cache.
#[test]
fn cold_and_partly_cached_reads_at_depth_return_the_image() {
    require_tool("nbdcopy");
    require_tool("qemu-img");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 64 * MIB).init(Init::Random(7))],
    )]));
    let image = p.image("disk0");
    let expected = read_file(&image);
    let cold = |what: &str| {
        let resident = evict_from_page_cache(&image);
        assert!(
            resident < MIB,
            "{what}: {resident} bytes of the image are still cached after eviction"
        );
    };

    // nbdcopy: 4 connections, 64 requests in flight on each, 256 KiB reads.
    cold("nbdcopy");
    let out = p.layout.root.join("cold.raw");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=64"])
            .arg(p.uri("disk0"))
            .arg(&out),
        LONG,
    );
    testkit::assert_bytes_equal(&read_file(&out), &expected, "nbdcopy of a cold image");

    // Stripes of 1.5 MiB cached and 1.5 MiB not, so reads straddle both.
    cold("qemu-img");
    for stripe in (0..64 * MIB).step_by((3 * MIB) as usize) {
        let len = (MIB + MIB / 2).min(64 * MIB - stripe);
        read_range(&image, stripe, len as usize);
    }
    let out = p.layout.root.join("striped.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", "-m", "16"])
            .arg(p.uri("disk0"))
            .arg(&out),
        LONG,
    );
    testkit::assert_bytes_equal(
        &read_file(&out),
        &expected,
        "qemu-img of a partly cached image",
    );
}

/// An O_DIRECT image served to four connections at once (CAN_MULTI_CONN): nbdcopy
/// writes it and reads it back over four connections with many requests in flight,
/// then four fio jobs write and verify their own quarter at depth 16 each. Every write
/// is tracked.
#[test]
fn direct_image_with_four_connections() {
    require_tool("nbdcopy");
    require_tool("fio");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB).direct()],
    )]));
    let src = source_file(&p, 11);
    let connections = ["--connections=4", "--requests=32"];
    run_ok(
        Command::new("nbdcopy")
            .args(connections)
            .arg("--flush")
            .arg(&src)
            .arg(p.uri("disk0")),
        LONG,
    );
    assert_files_equal(&src, &p.image("disk0"), "direct image after nbdcopy in");
    let out = p.layout.root.join("out.raw");
    run_ok(
        Command::new("nbdcopy")
            .args(connections)
            .arg(p.uri("disk0"))
            .arg(&out),
        LONG,
    );
    assert_files_equal(&src, &out, "direct image read back over 4 connections");

    let o = run(
        Command::new("fio")
            .args([
                "--name=quarters",
                "--ioengine=nbd",
                &format!("--uri={}", p.uri("disk0")),
                "--numjobs=4",
                "--size=8M",
                "--offset_increment=8M",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .current_dir(&p.layout.root),
        LONG,
    );
    assert!(o.success(), "fio with 4 connections failed\n{}", o.report());
    close_and_compare(&p);
}

/// Writes to an O_DIRECT image run on each connection's io_uring, many in flight, and a
/// tracked write holds its range until its completion is reaped. Here four connections
/// hammer the same 256 KiB at depth 32 with flushes between: writes overlap their own
/// connection's writes in flight and the other connections'. Nothing may deadlock (each
/// connection finishes its own writes before it waits for anyone's), and the log must
/// still order overlapping writes as the image does: the local copy rebuilt from the
/// log equals the image.
#[test]
fn overlapping_writes_in_flight_on_a_direct_image() {
    require_tool("fio");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 32 * MIB).direct()],
    )]));
    let o = run(
        Command::new("fio")
            .args([
                "--name=overlap",
                "--ioengine=nbd",
                &format!("--uri={}", p.uri("disk0")),
                "--numjobs=4",
                "--offset=1M",
                "--size=256k",
                "--rw=randwrite",
                "--norandommap",
                "--bsrange=4k-16k",
                "--iodepth=32",
                "--fsync=16",
                "--time_based",
                "--runtime=3",
                "--refill_buffers",
            ])
            .current_dir(&p.layout.root),
        LONG,
    );
    assert!(
        o.success(),
        "fio with overlapping writes failed\n{}",
        o.report()
    );
    close_and_compare(&p);
}
