//! Running under systemd: both daemons' service notifications, over a notify socket
//! the test owns (READY=1 once serving, WATCHDOG=1 while the control socket answers
//! and not when it stops answering, STOPPING=1 at SIGTERM), and the units of
//! `contrib/systemd` checked by `systemd-analyze verify`. The Debian package is
//! tested by `scripts/test-package.sh` (a step of `scripts/test-all.sh`), since it
//! needs a release build that cannot run inside `cargo test`.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::replica::LabCerts;
use testkit::{bin, require_tool, run, Primary, Spec, MIB, SHORT};

/// The watchdog period the daemons are given: a ping every 500 ms.
const WATCHDOG_USEC: u64 = 1_000_000;

/// A unix datagram socket standing in for systemd's notify socket.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("blkrep-notify")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The states (one per line) of the datagrams that arrive within `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut states = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return states;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => states.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return states,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return states,
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }

    /// The states up to and including `wanted`; panics with the daemon's log if it
    /// does not come within `timeout`.
    fn wait_for(&self, wanted: &str, timeout: Duration, log: &Path) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut states = Vec::new();
        let mut buf = [0u8; 4096];
        while !states.iter().any(|state| state == wanted) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {wanted} within {timeout:?}; got {states:?}\ndaemon log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => states.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                ),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
        states
    }
}

fn pings(states: &[String]) -> usize {
    states.iter().filter(|state| *state == "WATCHDOG=1").count()
}

/// Sends SIGTERM to the daemon.
fn terminate(child: &Child) {
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
}

/// Waits (30 s at most) for the daemon to exit after SIGTERM; kills it and panics
/// with its log past that.
fn exit_after_sigterm(child: &mut Child, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the daemon did not exit within 30 s of SIGTERM\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `daemon` (logging to `log`) as systemd would, with a watchdog, and checks
/// every notification: READY=1 first, pings while its `control_socket` answers, none
/// once it is gone, and STOPPING=1 then a clean exit on SIGTERM.
fn check_notifications(mut daemon: Command, control_socket: &Path, log: &Path) {
    let notify = NotifySocket::bind();
    let out = fs::File::create(log).unwrap();
    let mut child: Child = daemon
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
        .env_remove("WATCHDOG_PID")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let daemon_log = || fs::read_to_string(log).unwrap_or_default();

    let first = notify.wait_for("READY=1", Duration::from_secs(30), log);
    assert_eq!(first, ["READY=1"], "READY=1 must come first");
    assert!(
        daemon_log().contains(" ready"),
        "READY=1 before the daemon said it was ready:\n{}",
        daemon_log()
    );

    // Pings every half period while the control socket answers.
    let serving = notify.collect(Duration::from_secs(3));
    assert!(
        pings(&serving) >= 3,
        "expected a WATCHDOG=1 about every 500 ms for 3 s, got {serving:?}\n{}",
        daemon_log()
    );

    // Not a blind timer: once the control socket no longer answers, no more pings.
    fs::remove_file(control_socket).unwrap();
    let _in_flight = notify.collect(Duration::from_millis(800));
    let unanswered = notify.collect(Duration::from_secs(2));
    assert_eq!(
        pings(&unanswered),
        0,
        "pinged the watchdog while the control socket was gone: {unanswered:?}"
    );
    assert!(
        daemon_log().contains("Not pinging systemd's watchdog"),
        "the daemon did not say why it stopped pinging:\n{}",
        daemon_log()
    );

    terminate(&child);
    notify.wait_for("STOPPING=1", Duration::from_secs(30), log);
    let status = exit_after_sigterm(&mut child, log);
    assert!(
        status.success(),
        "exit {status} after SIGTERM\n{}",
        daemon_log()
    );
}

#[test]
fn the_primary_notifies_systemd() {
    let primary = Primary::prepare(Spec::single(4 * MIB));
    let mut daemon = Command::new(bin());
    daemon.arg("primary").arg("--config").arg(primary.config());
    check_notifications(
        daemon,
        &primary.layout.ctl(),
        &primary.layout.root.join("notify-daemon.log"),
    );
}

#[test]
fn the_replica_daemon_notifies_systemd() {
    let dir = tempfile::Builder::new()
        .prefix("blkrep-r")
        .tempdir_in("/tmp")
        .unwrap();
    let root = dir.path();
    let certs = LabCerts::create(&root.join("pki"), &[&["localhost", "127.0.0.1"]]);
    let control = root.join("replica.ctl");
    let config = root.join("replica.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ncontrol_socket = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\
             [nbd]\nunix_socket = {:?}\n[[authorization]]\nprimary = \"*.dc1.test\"\nstorage = {:?}\ntrust_group = \"dc1\"\n",
            control.display().to_string(),
            certs.cert("localhost").display().to_string(),
            certs.key("localhost").display().to_string(),
            certs.ca().display().to_string(),
            root.join("replica-nbd.sock").display().to_string(),
            root.join("storage").display().to_string(),
        ),
    )
    .unwrap();
    let mut daemon = Command::new(bin());
    daemon.args(["replica", "run", "--config"]).arg(&config);
    check_notifications(daemon, &control, &root.join("replica.log"));
}

#[test]
fn without_notify_socket_nothing_is_sent() {
    // Even with WATCHDOG_USEC set: no NOTIFY_SOCKET, no notifications and no watchdog.
    let primary = Primary::prepare(Spec::single(MIB));
    let log = primary.layout.root.join("notify-daemon.log");
    let out = fs::File::create(&log).unwrap();
    let mut child = Command::new(bin())
        .arg("primary")
        .arg("--config")
        .arg(primary.config())
        .env_remove("NOTIFY_SOCKET")
        .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let daemon_log = || fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon_log().contains("Primary ready") {
        assert!(
            Instant::now() < deadline,
            "not ready in 30 s\n{}",
            daemon_log()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    terminate(&child);
    let status = exit_after_sigterm(&mut child, &log);
    assert!(status.success(), "exit {status}\n{}", daemon_log());
    for unwanted in ["Watchdog on", "watchdog", "Cannot notify systemd"] {
        assert!(
            !daemon_log().contains(unwanted),
            "{unwanted}:\n{}",
            daemon_log()
        );
    }
}

/// `contrib/systemd`, where the units are kept.
fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd")
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let analyze = require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();

    // First, that this systemd-analyze can verify here at all and reports what it
    // finds: a unit with an unknown key must be reported.
    let bad = dir.path().join("blkrep-bad.service");
    fs::write(
        &bad,
        "[Service]\nExecStart=/bin/true\nNoSuchKey=yes\nProtectSystem=bogus\n",
    )
    .unwrap();
    let o = run(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&bad),
        SHORT,
    );
    if !o.all().contains("NoSuchKey") {
        println!(
            "SKIP: systemd-analyze verify cannot run here (it did not report an unknown key):\n{}",
            o.report()
        );
        return;
    }

    // The units as shipped, with /usr/bin/blkrep (installed only by the package)
    // standing for the binary under test, so verify can check every command.
    let mut units = Vec::new();
    for name in ["blkrep-primary.service", "blkrep-replica.service"] {
        let text = fs::read_to_string(units_dir().join(name)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/blkrep "), "{name}");
        for needed in [
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=",
            "RuntimeDirectory=blkrep",
            "StateDirectory=blkrep",
            "ConfigurationDirectory=blkrep",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "ProtectSystem=full",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
        ] {
            assert!(text.contains(needed), "{name} lacks {needed}");
        }
        let path = dir.path().join(name);
        fs::write(
            &path,
            text.replace("/usr/bin/blkrep", &bin().display().to_string()),
        )
        .unwrap();
        units.push(path);
    }
    // The optional socket unit hands the service the socket the primary serves.
    let socket_unit = "blkrep-primary.socket";
    let text = fs::read_to_string(units_dir().join(socket_unit)).unwrap();
    for needed in [
        "ListenStream=/run/blkrep/nbd.sock",
        "Service=blkrep-primary.service",
    ] {
        assert!(text.contains(needed), "{socket_unit} lacks {needed}");
    }
    let path = dir.path().join(socket_unit);
    fs::write(&path, text).unwrap();
    units.push(path);
    let o = run(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .args(&units),
        SHORT,
    );
    assert!(
        o.success() && o.all().trim().is_empty(),
        "systemd-analyze verify found problems in the units:\n{}",
        o.report()
    );
}
