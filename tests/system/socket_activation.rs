//! Socket activation: `blkrep primary` serves the NBD socket the service manager
//! passes (`LISTEN_FDS`, here from `systemd-socket-activate`, the tool systemd ships
//! for this), and leaves its file in place when it stops, since the socket is the
//! service manager's (with `blkrep-primary.socket`, systemd keeps it listening
//! across a restart, and clients connecting meanwhile wait in its backlog).

use std::fs;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::nbd::Conn;
use testkit::*;

#[test]
fn the_primary_serves_the_socket_systemd_passes_and_leaves_it_in_place() {
    let activate = require_tool("systemd-socket-activate");
    let p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 4 * MIB)],
    )]));
    let log_path = p.layout.root.join("activated.log");
    let log = fs::File::create(&log_path).expect("log");
    let mut child = Command::new(activate)
        .arg("--listen")
        .arg(p.nbd_sock())
        .args(["--setenv=RUST_LOG=info", "--setenv=NO_COLOR=1"])
        .arg(bin())
        .args(["primary", "--config"])
        .arg(p.config())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start systemd-socket-activate");
    let deadline = Instant::now() + LONG;
    while !p.nbd_sock().exists() {
        assert!(
            Instant::now() < deadline,
            "the activation socket never appeared"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // This connection starts the daemon and waits in the socket's backlog meanwhile.
    let mut conn =
        Conn::connect_unix(&p.nbd_sock(), "disk0").expect("NBD through the passed socket");
    conn.write(4096, &[0x5a; 4096], true).expect("write");
    assert_eq!(conn.read(4096, 4096).expect("read"), vec![0x5a; 4096]);
    conn.disconnect();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        text.contains("Serving the NBD socket the service manager passed"),
        "the daemon bound a socket of its own\n{text}"
    );
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "the daemon did not stop cleanly: {status}\n{}",
        fs::read_to_string(&log_path).unwrap_or_default()
    );
    assert!(
        p.nbd_sock().exists(),
        "the daemon removed the socket file the service manager owns"
    );
}
