//! NBD protocol conformance of blkrep's exports, driven by libnbd
//! (tests/python/nbd_conformance.py, run with /usr/bin/python3), over the unix
//! socket and over TCP; plus a few raw-protocol probes no stock client sends.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use testkit::nbd::{self, Conn};
use testkit::{DiskSpec, GroupSpec, Init, Primary, Spec, MIB, PYTHON};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/nbd_conformance.py")
}

/// disk0: fresh sparse 64 MiB (the script needs an untouched upper half);
/// ro0: read-only with content; direct0: O_DIRECT; disk1 in a second group so
/// NBD_OPT_LIST must span groups.
fn spec() -> Spec {
    Spec::new(vec![
        GroupSpec::new(
            "vm1",
            vec![
                DiskSpec::new("disk0", 64 * MIB),
                DiskSpec::new("ro0", 16 * MIB)
                    .init(Init::Random(7))
                    .read_only(),
                DiskSpec::new("direct0", 64 * MIB).direct(),
            ],
        ),
        GroupSpec::new("vm2", vec![DiskSpec::new("disk1", 16 * MIB)]),
    ])
}

fn run_script(uri: &dyn Fn(&str) -> String) {
    testkit::require_python_libnbd();
    let o = testkit::run(
        Command::new(PYTHON)
            .arg(script())
            .args(["--uri", &uri("disk0")])
            .args(["--ro-uri", &uri("ro0")])
            .args(["--direct-uri", &uri("direct0")])
            .args(["--exports", "disk0,ro0,direct0,disk1"])
            .arg("--blkrep"),
        Duration::from_secs(240),
    );
    println!("{}", o.stdout);
    let summary = o
        .stdout
        .lines()
        .rev()
        .find(|l| l.contains(" passed, "))
        .unwrap_or("");
    assert!(
        o.success() && summary.contains(" 0 failed"),
        "libnbd conformance script failed ({summary})\n{}",
        o.report()
    );
    // The script must actually have exercised things.
    let passed: usize = summary
        .split(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!(passed >= 15, "only {passed} checks passed: {summary}");
}

#[test]
fn libnbd_conformance_unix() {
    let p = Primary::start(spec());
    run_script(&|d| p.uri(d));
}

#[test]
fn libnbd_conformance_tcp() {
    let mut s = spec();
    s.unix = false;
    let p = Primary::start(s.with_tcp());
    run_script(&|d| p.tcp_uri(d));
}

/// Probes below libnbd: an unknown command, NBD_OPT_EXPORT_NAME with and without
/// NO_ZEROES, a read-only export's flags, and errors that must leave the
/// connection usable.
#[test]
fn raw_protocol_edges() {
    let p = Primary::start(spec());
    let sock = p.nbd_sock();

    let mut c = Conn::connect_unix(&sock, "disk0").unwrap();
    assert_eq!(c.size, 64 * MIB);
    assert!(
        c.tflags & nbd::TFLAG_CAN_MULTI_CONN != 0,
        "CAN_MULTI_CONN not advertised: {:#x}",
        c.tflags
    );
    for (f, n) in [
        (nbd::TFLAG_SEND_FLUSH, "SEND_FLUSH"),
        (nbd::TFLAG_SEND_FUA, "SEND_FUA"),
        (nbd::TFLAG_SEND_TRIM, "SEND_TRIM"),
        (nbd::TFLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
    ] {
        assert!(c.tflags & f != 0, "{n} not advertised: {:#x}", c.tflags);
    }
    assert!(c.tflags & nbd::TFLAG_READ_ONLY == 0);
    c.write(0, &[0xab; 4096], false).unwrap();
    match c.raw(0, 0x42, 0, 4096, &[]) {
        Err(nbd::Error::Server(e)) => {
            assert_eq!(e, nbd::EINVAL, "unknown command answered with errno {e}")
        }
        other => panic!("unknown command 0x42: expected EINVAL, got {other:?}"),
    }
    assert_eq!(
        c.read(0, 4096).unwrap(),
        vec![0xab; 4096],
        "connection unusable after an unknown command"
    );
    match c.raw(0, nbd::CMD_READ, 64 * MIB, 1, &[]) {
        Err(nbd::Error::Server(e)) => {
            assert_eq!(e, nbd::EINVAL, "read past the end answered with errno {e}")
        }
        other => panic!("read past the end: expected EINVAL, got {other:?}"),
    }
    match c.write(64 * MIB - 512, &[1; 1024], false) {
        Err(nbd::Error::Server(e)) => {
            assert_eq!(e, nbd::ENOSPC, "write past the end answered with errno {e}")
        }
        other => panic!("write past the end: expected ENOSPC, got {other:?}"),
    }
    assert_eq!(
        c.read(64 * MIB - 512, 512).unwrap(),
        vec![0; 512],
        "failed write changed data"
    );
    c.flush().unwrap();
    c.disconnect();

    for nz in [false, true] {
        let mut c = Conn::connect_unix_export_name(&sock, "disk0", nz)
            .unwrap_or_else(|e| panic!("NBD_OPT_EXPORT_NAME (no_zeroes={nz}): {e}"));
        assert_eq!(c.size, 64 * MIB);
        assert_eq!(c.read(0, 4096).unwrap(), vec![0xab; 4096]);
        c.write(4096, &[u8::from(nz) + 1; 512], true).unwrap();
        c.disconnect();
    }

    let mut r = Conn::connect_unix(&sock, "ro0").unwrap();
    assert!(
        r.tflags & nbd::TFLAG_READ_ONLY != 0,
        "ro0 not flagged read-only: {:#x}",
        r.tflags
    );
    let before = r.read(0, 4096).unwrap();
    match r.write(0, &[0; 4096], false) {
        Err(nbd::Error::Server(e)) => assert_eq!(
            e,
            nbd::EPERM,
            "write to read-only export answered with errno {e}"
        ),
        other => panic!("write to read-only export: expected EPERM, got {other:?}"),
    }
    assert_eq!(r.read(0, 4096).unwrap(), before);
    let img = testkit::read_range(&p.image("ro0"), 0, 4096);
    assert_eq!(img, before, "ro0 export does not serve its image");
    r.disconnect();

    assert!(
        Conn::connect_unix(&sock, "no-such-export").is_err(),
        "NBD_OPT_GO of an unknown export succeeded"
    );
}
