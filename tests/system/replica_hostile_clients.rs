//! The replica daemon under hostile connections, with small `[limits]` so each test
//! runs in seconds: idle connections from one address neither starve a real primary
//! (on another address) nor outlive the handshake timeout; stalled chunk uploads are
//! cut by the body timeout; uploads beyond a primary's limit are answered Busy without
//! their body being read; a certificate naming its primary only in its common name is
//! refused; and everything the daemons create is private (0600 files, 0700 dirs).

use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::hostile::{
    closed_by_server, idle_connection, with_open_files_limit, ClientCert, TlsClient,
};
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

const PER_ADDRESS: usize = 16;
const HANDSHAKE: Duration = Duration::from_secs(2);
const BODY: Duration = Duration::from_secs(3);
const UPLOADS: usize = 2;

/// The tests of this file run one at a time: one lowers the process's limit of open
/// files while it starts its daemon, and opens hundreds of connections.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A replica daemon with small limits.
fn replica(certs: &LabCerts) -> Replica {
    let extra = format!(
        "reserve = \"0\"\n[limits]\nmax_connections = 64\nmax_connections_per_address = {PER_ADDRESS}\nmax_uploads_per_primary = {UPLOADS}\nhandshake_timeout = \"{}s\"\nbody_timeout = \"{}s\"\n",
        HANDSHAKE.as_secs(),
        BODY.as_secs()
    );
    with_open_files_limit(256, || Replica::start(certs, REPLICA_HOST, &dc1(), &extra))
}

/// This test's turn, and a lab CA with a replica daemon of small limits.
fn lab() -> (
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    LabCerts,
    Replica,
) {
    let serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica = replica(&certs);
    (serial, dir, certs, replica)
}

/// A primary replicating group vm1 to `replica`, its first cycle applied.
fn replicating_primary(certs: &LabCerts, replica: &Replica) -> Primary {
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 8 * MIB).init(Init::Random(5))],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))]));
    close_and_compare(&p, replica);
    p
}

fn close_and_compare(p: &Primary, replica: &Replica) {
    let cycle = p.cycles_close("vm1");
    replica.wait_applied("vm1", cycle, LONG);
    assert_files_equal(
        &p.image("disk0"),
        &replica.disk("dc1", "vm1", "disk0"),
        "disk0",
    );
}

fn primary_cert(certs: &LabCerts) -> (std::path::PathBuf, std::path::PathBuf) {
    (certs.cert(PRIMARY_HOST), certs.key(PRIMARY_HOST))
}

#[test]
fn idle_connections_from_one_address_neither_starve_a_primary_nor_outlive_the_handshake_timeout() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    // Started with a soft limit of 256 open files, as a daemon started from a login
    // shell starts with 1024.
    let replica = with_open_files_limit(256, || replica(&certs));
    let attacker = Ipv4Addr::new(127, 0, 0, 2);

    // More idle connections than the daemon's 256 descriptors.
    let opened = Instant::now();
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| idle_connection(attacker, replica.port))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let open = idle.iter().filter(|s| !closed_by_server(s)).count();
    assert!(
        opened.elapsed() < HANDSHAKE,
        "too slow to count before the timeout"
    );
    assert_eq!(
        open, PER_ADDRESS,
        "connections over the per-address limit are closed at once, the others wait for their handshake"
    );

    // The real primary on 127.0.0.1 enables and replicates meanwhile, with the
    // attacker reopening what is closed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (stop, port) = (std::sync::Arc::clone(&stop), replica.port);
        std::thread::spawn(move || {
            let mut held = idle;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                held.retain(|s| !closed_by_server(s));
                while held.len() < 300 {
                    held.push(idle_connection(attacker, port));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let _p = replicating_primary(&certs, &replica);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().expect("flood thread");

    // Held idle connections end at the handshake timeout. They come from another
    // address: the flood's last connections, closed as its thread ended, may still
    // count against the attacker's per-address limit until the daemon sees them
    // close (slower on a loaded machine), and new ones would then be refused at once.
    let fresh = Ipv4Addr::new(127, 0, 0, 3);
    let held: Vec<TcpStream> = (0..PER_ADDRESS)
        .map(|_| idle_connection(fresh, replica.port))
        .collect();
    let started = Instant::now();
    while held.iter().any(|s| !closed_by_server(s)) {
        assert!(
            started.elapsed() < HANDSHAKE + Duration::from_secs(3),
            "idle connections still open after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() >= HANDSHAKE - Duration::from_millis(300),
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
    let log = replica.log();
    assert!(
        log.contains("Closing new connections over a connection limit"),
        "{log}"
    );
    assert!(log.contains("Process limits set"), "{log}");
}

/// The start of a chunk frame that declares `body` bytes of stored records: a header
/// a replica accepts before it reads the body (the CRC, over the whole frame, is
/// checked once the body is there).
fn frame_start(body: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(wire::chunk::CHUNK_HEADER_LEN);
    header.extend_from_slice(&wire::chunk::CHUNK_MAGIC);
    header.extend_from_slice(&[wire::chunk::CHUNK_VERSION, 0, 0, 0]);
    header.extend_from_slice(&1u64.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&body.to_le_bytes());
    header.extend_from_slice(&body.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header
}

/// A chunk upload's head declaring `length` bytes of body.
fn upload_head(length: usize) -> Vec<u8> {
    format!(
        "PUT /v1/replicas/vm1/transfers/1/chunks/0 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\nx-blkrep-relationship: 1\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn stalled_uploads_are_cut_and_uploads_beyond_a_primarys_limit_are_busy_unread() {
    let (_serial, _dir, certs, replica) = lab();
    let p = replicating_primary(&certs, &replica);
    let (cert, key) = primary_cert(&certs);
    let ca = certs.ca();
    let client = ClientCert {
        cert: &cert,
        key: &key,
        ca: &ca,
    };
    let length = 1 << 20;

    // Bytes that are not a chunk frame are refused as soon as a header's worth came:
    // the body is cut into frames as it arrives.
    let mut garbage = TlsClient::connect(replica.port, client);
    let mut request = upload_head(length);
    request.extend_from_slice(&[0x55; 1000]);
    garbage.send(&request);
    let answer = garbage
        .answer_within(Duration::from_secs(2))
        .expect("garbage in an upload's body was not refused at once");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("magic"), "{answer}");

    // As many uploads as the primary may have, each stalled inside its first frame
    // (a valid header declaring 1 MiB, then 1000 bytes of it).
    let started = Instant::now();
    let mut stalled: Vec<TlsClient> = (0..UPLOADS)
        .map(|_| TlsClient::connect(replica.port, client))
        .collect();
    for upload in &mut stalled {
        let mut request = upload_head(length);
        request.extend_from_slice(&frame_start(1 << 20));
        request.extend_from_slice(&[0x55; 1000]);
        upload.send(&request);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(stalled.iter().all(|u| u.answer().is_none()));

    // One more: answered Busy at once, though not one byte of its body was sent.
    let mut over = TlsClient::connect(replica.port, client);
    over.send(&upload_head(length));
    let answer = over
        .answer_within(Duration::from_secs(2))
        .expect("no answer to the upload over the limit: its body is being waited for");
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("\"code\":\"busy\""), "{answer}");
    assert!(
        started.elapsed() < BODY,
        "answered only after {:?}",
        started.elapsed()
    );

    // The stalled ones are cut at the body timeout, their connections closed.
    for upload in &stalled {
        let answer = upload
            .answer_within(BODY + Duration::from_secs(5))
            .expect("a stalled upload was never cut");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("stalled"), "{answer}");
    }
    let cut = started.elapsed();
    assert!(cut >= BODY, "cut after {cut:?}, before the body timeout");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stalled.iter().all(TlsClient::closed) {
        assert!(
            Instant::now() < deadline,
            "a cut upload's connection stays open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Their places are free again: a whole body is read (and refused as no chunk).
    let mut next = TlsClient::connect(replica.port, client);
    let mut request = upload_head(4096);
    request.extend_from_slice(&[0x55; 4096]);
    next.send(&request);
    let answer = next
        .answer_within(Duration::from_secs(10))
        .expect("no answer");
    assert!(!answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");

    // And the primary still replicates.
    let qemu_io = require_tool("qemu-io");
    run_ok(
        Command::new(qemu_io).args(["-f", "raw", "-c", "write -P 7 65536 1M", &p.uri("disk0")]),
        LONG,
    );
    close_and_compare(&p, &replica);
    let status = p.group_status("vm1")["consumer"].clone();
    assert_eq!(status["health"], "Normal", "{status:#}");
}

/// `openssl req`/`x509`: a certificate signed by the lab CA with common name `cn` and
/// `san` as its only subject alternative name.
fn issue_with_openssl(
    certs: &LabCerts,
    cn: &str,
    san: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let openssl = require_tool("openssl");
    let key = certs.dir.join("cn-only.key");
    let csr = certs.dir.join("cn-only.csr");
    let cert = certs.dir.join("cn-only.pem");
    run_ok(
        Command::new(&openssl)
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", &format!("/CN={cn}")]),
        SHORT,
    );
    let ext = certs.dir.join("cn-only.ext");
    std::fs::write(
        &ext,
        format!("subjectAltName={san}\nextendedKeyUsage=clientAuth,serverAuth\nkeyUsage=digitalSignature\n"),
    )
    .expect("write extensions");
    run_ok(
        Command::new(&openssl)
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(certs.ca())
            .arg("-CAkey")
            .arg(certs.dir.join("ca.key"))
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert),
        SHORT,
    );
    (cert, key)
}

fn echo(port: u16, cert: ClientCert<'_>) -> String {
    let mut client = TlsClient::connect(port, cert);
    client.send(b"GET /v1/echo HTTP/1.1\r\nHost: localhost\r\n\r\n");
    client
        .answer_within(Duration::from_secs(10))
        .expect("no answer to echo")
}

#[test]
fn a_certificate_naming_its_primary_only_in_the_common_name_is_refused() {
    let (_serial, _dir, certs, replica) = lab();
    let ca = certs.ca();
    // The CN matches *.dc1.test, the only SAN is an IP address.
    let (cert, key) = issue_with_openssl(&certs, "cn-only.dc1.test", "IP:127.0.0.1");
    let refused = echo(
        replica.port,
        ClientCert {
            cert: &cert,
            key: &key,
            ca: &ca,
        },
    );
    assert!(refused.starts_with("HTTP/1.1 403 "), "{refused}");
    assert!(refused.contains("\"code\":\"forbidden\""), "{refused}");
    let log = replica.log();
    assert!(
        log.contains("without a DNS name among its subject alternative names"),
        "{log}"
    );

    let (cert, key) = primary_cert(&certs);
    let admitted = echo(
        replica.port,
        ClientCert {
            cert: &cert,
            key: &key,
            ca: &ca,
        },
    );
    assert!(admitted.starts_with("HTTP/1.1 200 "), "{admitted}");
}

/// Every file under `root` (and `root` itself, when a directory) has mode 0600, every
/// directory 0700; returns how many were checked.
fn assert_private_tree(root: &Path) -> usize {
    let mode = std::fs::symlink_metadata(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .permissions()
        .mode()
        & 0o777;
    let mut checked = 1;
    if root.is_dir() {
        assert_eq!(mode, 0o700, "{} is {mode:04o}", root.display());
        for entry in std::fs::read_dir(root).expect("read_dir") {
            checked += assert_private_tree(&entry.expect("entry").path());
        }
    } else {
        assert_eq!(mode, 0o600, "{} is {mode:04o}", root.display());
    }
    checked
}

#[test]
fn everything_the_daemons_create_is_private() {
    let (_serial, _dir, certs, replica) = lab();
    let p = replicating_primary(&certs, &replica);

    let checked = assert_private_tree(&replica.storage("dc1"));
    assert!(
        checked > 5,
        "only {checked} entries in the replica's storage"
    );
    assert_private_tree(&replica.root.join("replica.ctl"));
    let ring = p.layout.ring("vm1");
    assert_private_tree(&ring);
    let mut state = ring.into_os_string();
    state.push(".replication.json");
    assert_private_tree(Path::new(&state));
    assert_private_tree(&p.layout.ctl());
}
