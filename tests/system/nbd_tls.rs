//! NBD over TLS (NBD_OPT_STARTTLS) on the primary's (and the replica daemon's) TCP
//! listener, driven by QEMU's and
//! libnbd's own TLS clients with `blkrep cert` certificates, and the unix socket's
//! configured mode and group.
//!
//! QEMU (`tls-creds-x509,dir=`) and libnbd (`tls-certificates=`) read the same file
//! names from a directory: ca-cert.pem, client-cert.pem, client-key.pem. The server's
//! certificate carries the IP address 127.0.0.1, which both check against the host
//! they dialled.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::daemon_log::NBD_TCP;
use testkit::nbd::{IHAVEOPT, NBD_MAGIC};
use testkit::replica::{dc1, lab_certs, LabCerts, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::{
    require_python_libnbd, require_tool, run, Output, Primary, Spec, MIB, PYTHON, SHORT,
};

const NBD_OPT_EXPORT_NAME: u32 = 1;
const NBD_OPT_LIST: u32 = 3;
const NBD_OPT_GO: u32 = 7;
const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// A primary with disk0 (16 MiB) whose TCP listener has `tls`, certificates for it
/// (127.0.0.1) and for a client, signed by one lab CA; `client_ca` requires client
/// certificates.
struct Setup {
    primary: Primary,
    port: u16,
    certs: LabCerts,
}

fn start(tls: &str, client_ca: bool) -> Setup {
    let mut primary = Primary::prepare(Spec::single(16 * MIB));
    let certs = LabCerts::create(
        &primary.layout.root.join("certs"),
        &[&["127.0.0.1"], &["client.example.com"]],
    );
    let mut nbd = format!(
        "tcp = \"127.0.0.1:0\"\ntls = {tls:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
        certs.cert("127.0.0.1"),
        certs.key("127.0.0.1"),
    );
    if client_ca {
        nbd.push_str(&format!("tls_ca = {:?}\n", certs.ca()));
    }
    primary.add_nbd_settings(&nbd);
    primary.restart();
    let port = primary.reported_address(NBD_TCP).port();
    Setup {
        primary,
        port,
        certs,
    }
}

impl Setup {
    /// A credentials directory as QEMU and libnbd want it: the CA, and the client's
    /// certificate from `client` (a host of `certs`), if any.
    fn client_dir(&self, name: &str, certs: &LabCerts, client: Option<&str>) -> PathBuf {
        let dir = self.primary.layout.root.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(self.certs.ca(), dir.join("ca-cert.pem")).unwrap();
        if let Some(host) = client {
            fs::copy(certs.cert(host), dir.join("client-cert.pem")).unwrap();
            fs::copy(certs.key(host), dir.join("client-key.pem")).unwrap();
        }
        dir
    }

    fn good_client_dir(&self) -> PathBuf {
        self.client_dir("client-good", &self.certs, Some("client.example.com"))
    }

    fn qemu_opts(&self, dir: &Path) -> [String; 4] {
        [
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                dir.display()
            ),
            "--image-opts".into(),
            format!(
                "driver=nbd,host=127.0.0.1,port={},export=disk0,tls-creds=tls0",
                self.port
            ),
        ]
    }

    fn qemu_io(&self, dir: &Path, command: &str) -> Output {
        let [object, creds, image_opts, image] = self.qemu_opts(dir);
        run(
            Command::new(require_tool("qemu-io"))
                .args([object, creds, image_opts, image])
                .args(["-c", command]),
            SHORT,
        )
    }

    fn nbdinfo_list(&self, uri: &str) -> Output {
        run(
            Command::new(require_tool("nbdinfo")).args(["--list", uri]),
            SHORT,
        )
    }

    fn tls_uri(&self, dir: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/disk0?tls-certificates={}",
            self.port,
            dir.display()
        )
    }
}

#[test]
fn qemu_writes_and_reads_back_over_tls() {
    let setup = start("require", true);
    let dir = setup.good_client_dir();
    let written = setup.qemu_io(&dir, "write -P 0xab 1M 2M");
    assert!(written.success(), "{}", written.report());
    let read = setup.qemu_io(&dir, "read -P 0xab 1M 2M");
    assert!(read.success(), "{}", read.report());
    assert!(
        !read.all().contains("Pattern verification failed"),
        "{}",
        read.report()
    );
    // The bytes reached the image through the daemon.
    let image = testkit::read_range(&setup.primary.image("disk0"), MIB, 2 * MIB as usize);
    assert!(image.iter().all(|&b| b == 0xab));

    // qemu-img copies the whole export out over TLS.
    let copy = setup.primary.layout.root.join("copy.raw");
    let [object, creds, image_opts, image_spec] = setup.qemu_opts(&dir);
    let converted = run(
        Command::new(require_tool("qemu-img"))
            .args([
                "convert",
                &object,
                &creds,
                &image_opts,
                &image_spec,
                "-O",
                "raw",
            ])
            .arg(&copy),
        SHORT,
    );
    assert!(converted.success(), "{}", converted.report());
    testkit::assert_files_equal(
        &copy,
        &setup.primary.image("disk0"),
        "qemu-img copy over TLS",
    );
    assert!(setup.primary.log().contains("TLS established"));
}

#[test]
fn nbdinfo_lists_exports_over_tls() {
    let setup = start("require", true);
    let listed = setup.nbdinfo_list(&setup.tls_uri(&setup.good_client_dir()));
    assert!(listed.success(), "{}", listed.report());
    assert!(listed.all().contains("disk0"), "{}", listed.report());
}

/// Sends an option in plaintext and returns the reply type and data.
fn plain_option(socket: &mut TcpStream, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
    socket.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    socket.write_all(&option.to_be_bytes()).unwrap();
    socket
        .write_all(&u32::try_from(data.len()).unwrap().to_be_bytes())
        .unwrap();
    socket.write_all(data).unwrap();
    let mut header = [0u8; 20];
    socket.read_exact(&mut header).unwrap();
    let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
    let mut body = vec![0u8; len as usize];
    socket.read_exact(&mut body).unwrap();
    (reply, body)
}

fn plain_connect(port: u16) -> TcpStream {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    socket.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting[..8], NBD_MAGIC.to_be_bytes());
    socket.write_all(&3u32.to_be_bytes()).unwrap();
    socket
}

#[test]
fn clients_that_skip_tls_are_refused_and_see_no_export() {
    let setup = start("require", true);

    // A raw client: LIST and GO are refused with NBD_REP_ERR_TLS_REQD, and
    // EXPORT_NAME, which cannot be refused, closes the connection.
    let mut socket = plain_connect(setup.port);
    let (reply, body) = plain_option(&mut socket, NBD_OPT_LIST, &[]);
    assert_eq!(reply, NBD_REP_ERR_TLS_REQD);
    assert!(!String::from_utf8_lossy(&body).contains("disk0"));
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk0");
    go.extend_from_slice(&0u16.to_be_bytes());
    let (reply, body) = plain_option(&mut socket, NBD_OPT_GO, &go);
    assert_eq!(reply, NBD_REP_ERR_TLS_REQD);
    assert!(!String::from_utf8_lossy(&body).contains("disk0"));
    socket.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    socket
        .write_all(&NBD_OPT_EXPORT_NAME.to_be_bytes())
        .unwrap();
    socket.write_all(&5u32.to_be_bytes()).unwrap();
    socket.write_all(b"disk0").unwrap();
    let mut rest = Vec::new();
    let closed = socket.read_to_end(&mut rest);
    assert!(
        closed.is_ok() && rest.is_empty(),
        "EXPORT_NAME before TLS got {closed:?} {rest:?}"
    );

    // libnbd with TLS disabled, in option mode so it may try LIST and GO itself.
    require_python_libnbd();
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_DISABLE)
h.set_opt_mode(True)
h.connect_tcp("127.0.0.1", "{port}")
names = []
try:
    h.opt_list(lambda name, description: names.append(name) or 0)
    print("LISTED", names)
except nbd.Error as e:
    print("LIST REFUSED:", e.string)
h.set_export_name("disk0")
try:
    h.opt_go()
    print("GO ACCEPTED")
except nbd.Error as e:
    print("GO REFUSED:", e.string)
"#,
        port = setup.port
    );
    let out = run(Command::new(PYTHON).args(["-c", &script]), SHORT);
    assert!(out.success(), "{}", out.report());
    let text = out.all();
    assert!(text.contains("LIST REFUSED"), "{text}");
    assert!(text.contains("GO REFUSED"), "{text}");
    assert!(!text.contains("disk0"), "{text}");

    // Plain nbdinfo cannot even list.
    let listed = setup.nbdinfo_list(&format!("nbd://127.0.0.1:{}/", setup.port));
    assert!(!listed.success(), "{}", listed.report());
    assert!(!listed.stdout.contains("disk0"), "{}", listed.report());
}

#[test]
fn clients_without_a_certificate_from_the_ca_are_refused() {
    let setup = start("require", true);
    let no_cert = setup.client_dir("client-none", &setup.certs, None);
    let refused = setup.nbdinfo_list(&setup.tls_uri(&no_cert));
    assert!(!refused.success(), "{}", refused.report());
    assert!(!refused.stdout.contains("disk0"), "{}", refused.report());

    let rogue = LabCerts::create(
        &setup.primary.layout.root.join("rogue-ca"),
        &[&["client.example.com"]],
    );
    let other_ca = setup.client_dir("client-rogue", &rogue, Some("client.example.com"));
    let refused = setup.nbdinfo_list(&setup.tls_uri(&other_ca));
    assert!(!refused.success(), "{}", refused.report());
    let written = setup.qemu_io(&other_ca, "write -P 0xcd 0 64k");
    assert!(!written.success(), "{}", written.report());
    let image = testkit::read_range(&setup.primary.image("disk0"), 0, 65536);
    assert!(image.iter().all(|&b| b == 0));
    assert!(
        setup.primary.log().contains("TLS handshake failed"),
        "{}",
        testkit::tail(&setup.primary.log(), 30)
    );
}

#[test]
fn optional_tls_serves_plain_and_tls_clients() {
    let setup = start("on", false);
    let plain = setup.nbdinfo_list(&format!("nbd://127.0.0.1:{}/", setup.port));
    assert!(plain.success(), "{}", plain.report());
    assert!(plain.stdout.contains("disk0"), "{}", plain.report());
    // No client certificate asked for: the CA alone is enough.
    let dir = setup.client_dir("client-ca-only", &setup.certs, None);
    let tls = setup.nbdinfo_list(&setup.tls_uri(&dir));
    assert!(tls.success(), "{}", tls.report());
    assert!(tls.stdout.contains("disk0"), "{}", tls.report());
    let written = setup.qemu_io(&dir, "write -P 0x5a 0 1M");
    assert!(written.success(), "{}", written.report());
    let image = testkit::read_range(&setup.primary.image("disk0"), 0, MIB as usize);
    assert!(image.iter().all(|&b| b == 0x5a));
}

#[test]
fn unix_socket_gets_the_configured_mode_and_group() {
    let group = nix::unistd::Group::from_name("disk")
        .unwrap()
        .expect("group disk");
    let mut primary = Primary::prepare(Spec::single(MIB));
    primary.add_nbd_settings("socket_mode = \"0660\"\nsocket_group = \"disk\"");
    primary.restart();
    let meta = fs::metadata(primary.nbd_sock()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), group.gid.as_raw());
    primary.terminate();

    // The default is private to the daemon's user, whatever the umask.
    let primary = Primary::start(Spec::single(MIB));
    let meta = fs::metadata(primary.nbd_sock()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn check_warns_about_plaintext_tcp_off_loopback() {
    let primary = Primary::prepare(Spec::single(MIB));
    // Only checked, never bound.
    primary.add_nbd_settings("tcp = \"0.0.0.0:0\"");
    let out = run(
        primary
            .cmd()
            .args(["primary", "--check", "--config"])
            .arg(primary.config()),
        SHORT,
    );
    assert!(out.success(), "{}", out.report());
    assert!(
        out.stdout.contains("Warning: [nbd] tcp"),
        "{}",
        out.report()
    );
    assert!(
        out.stdout.contains("unencrypted and unauthenticated"),
        "{}",
        out.report()
    );
}

/// The replica daemon serves test-failover and failed-over disks from the same kind of
/// `[nbd]` section: its TCP listener requires TLS and its socket gets its mode too.
#[test]
fn replica_daemon_nbd_listener_requires_tls_and_sets_socket_mode() {
    let dir = tempfile::Builder::new()
        .prefix("blkrep-t")
        .tempdir_in("/tmp")
        .unwrap();
    let certs = lab_certs(&dir.path().join("certs"));
    let mut replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "");
    replica.restart_with_nbd_settings(&format!(
        "tcp = \"127.0.0.1:0\"\ntls = \"require\"\ntls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\nsocket_mode = \"0660\"",
        certs.cert(REPLICA_HOST),
        certs.key(REPLICA_HOST),
        certs.ca()
    ));
    let port = replica.reported_address(NBD_TCP).port();
    let meta = fs::metadata(replica.nbd_socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let mut socket = plain_connect(port);
    let (reply, _) = plain_option(&mut socket, NBD_OPT_LIST, &[]);
    assert_eq!(reply, NBD_REP_ERR_TLS_REQD);

    let client = dir.path().join("client");
    fs::create_dir_all(&client).unwrap();
    fs::copy(certs.ca(), client.join("ca-cert.pem")).unwrap();
    fs::copy(certs.cert(PRIMARY_HOST), client.join("client-cert.pem")).unwrap();
    fs::copy(certs.key(PRIMARY_HOST), client.join("client-key.pem")).unwrap();
    // No disk is failed over yet: the list is empty, but it comes over TLS.
    let listed = run(
        Command::new(require_tool("nbdinfo")).args([
            "--list",
            &format!(
                "nbds://127.0.0.1:{port}/?tls-certificates={}",
                client.display()
            ),
        ]),
        SHORT,
    );
    assert!(listed.success(), "{}\n{}", listed.report(), replica.log());
}
