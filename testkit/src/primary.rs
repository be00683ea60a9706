//! The primary daemon fixture: a `blkrep primary` started from a [`Spec`] in its own
//! temp dir, ready once its control API answers and every export completes an NBD
//! handshake, with the `blkrep` commands tests run against it and its log printed
//! when a test fails.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::command::{pid, run, tail, Output};
use crate::daemon_log::{reported_address, wait_reported_address, Reported, NBD_TCP, START_MARKER};
use crate::spec::{Layout, Spec};
use crate::{bin, nbd, LONG, SHORT};

/// The NBD `tcp` line of a new primary's configuration (a spec with TCP): a port the
/// kernel picks. The first start replaces it with the port the daemon reports.
const TCP_ANY_PORT: &str = "tcp = \"127.0.0.1:0\"";

/// A running (or stopped) `blkrep primary` in its own temp dir.
#[derive(Debug)]
pub struct Primary {
    dir: Option<tempfile::TempDir>,
    /// Where its files are.
    pub layout: Layout,
    /// What it was made from.
    pub spec: Spec,
    /// The port of its NBD TCP listener, if the spec has one, once known: the first
    /// start picks it, every later start keeps it.
    pub tcp_port: Option<u16>,
    child: Option<Child>,
    starts: u32,
}

impl Primary {
    /// Creates the images and config of `spec` and starts the daemon; returns once
    /// the control API answers and every export completes an NBD handshake.
    pub fn start(spec: Spec) -> Primary {
        let mut p = Primary::prepare(spec);
        p.spawn_and_wait();
        p
    }

    /// Creates the temp dir, images and config but does not start the daemon.
    pub fn prepare(spec: Spec) -> Primary {
        let dir = tempfile::Builder::new()
            .prefix("blkrep-t")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        layout.write_images(&spec);
        fs::write(
            layout.config(),
            layout.config_text(&spec, spec.tcp.then_some(0)),
        )
        .expect("write config");
        Primary {
            dir: Some(dir),
            layout,
            spec,
            tcp_port: None,
            child: None,
            starts: 0,
        }
    }

    /// Its configuration file.
    pub fn config(&self) -> PathBuf {
        self.layout.config()
    }
    /// The image of `disk`.
    pub fn image(&self, disk: &str) -> PathBuf {
        self.layout.image(disk)
    }
    /// The local copy of `disk` of `group`.
    pub fn copy_image(&self, group: &str, disk: &str) -> PathBuf {
        self.layout.copy_image(group, disk)
    }
    /// The local-copy directory of `group`.
    pub fn copy_dir(&self, group: &str) -> PathBuf {
        self.layout.copy_dir(group)
    }
    /// The NBD unix socket.
    pub fn nbd_sock(&self) -> PathBuf {
        self.layout.nbd_sock()
    }
    /// `nbd+unix:///DISK?socket=SOCK`
    pub fn uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.nbd_sock().display())
    }
    /// `nbd://127.0.0.1:PORT/DISK`
    pub fn tcp_uri(&self, disk: &str) -> String {
        let port = self.tcp_port.expect("spec has tcp enabled");
        format!("nbd://127.0.0.1:{port}/{disk}")
    }
    /// The size of `disk`, from the spec.
    pub fn disk_size(&self, disk: &str) -> u64 {
        self.spec
            .disks()
            .find(|d| d.name == disk)
            .expect("disk in spec")
            .size
    }

    /// Whether the daemon was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Pid {
        pid(self.child.as_ref().expect("daemon running").id())
    }

    /// The daemon's stderr over all its runs.
    pub fn log(&self) -> String {
        fs::read_to_string(self.layout.log()).unwrap_or_default()
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.layout.log())
            .expect("open daemon log");
        let _ = writeln!(log, "{START_MARKER}{} ========", self.starts);
        let child = Command::new(bin())
            .arg("primary")
            .arg("--config")
            .arg(self.config())
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin().display()));
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_err = String::from("control socket not created yet");
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                self.child = None;
                panic!(
                    "blkrep primary exited during startup with {st}\nconfig:\n{}",
                    fs::read_to_string(self.config()).unwrap_or_default(),
                );
            }
            if Instant::now() >= deadline {
                panic!("blkrep primary not ready after {timeout:?}: {last_err}");
            }
            if self.spec.tcp && self.tcp_port.is_none() {
                self.keep_reported_tcp_port();
            }
            match self.probe_ready() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ready = `status` answers and every export completes an NBD handshake.
    fn probe_ready(&self) -> Result<(), String> {
        if !self.layout.ctl().exists() {
            return Err(format!(
                "control socket {} does not exist",
                self.layout.ctl().display()
            ));
        }
        let o = run(
            Command::new(bin())
                .args(["status", "--json", "--config"])
                .arg(self.config()),
            SHORT,
        );
        if !o.success() {
            return Err(format!("`blkrep status` failed:\n{}", o.report()));
        }
        if self.spec.tcp && self.tcp_port.is_none() {
            return Err("the NBD TCP listener's address is not logged yet".into());
        }
        for d in self.spec.disks() {
            if self.spec.unix {
                nbd::Conn::connect_unix(&self.nbd_sock(), &d.name)
                    .map_err(|e| format!("NBD handshake on unix socket, export {}: {e}", d.name))?
                    .disconnect();
            }
            if let Some(port) = self.tcp_port {
                nbd::Conn::connect_tcp(&format!("127.0.0.1:{port}"), &d.name)
                    .map_err(|e| {
                        format!("NBD handshake on tcp port {port}, export {}: {e}", d.name)
                    })?
                    .disconnect();
            }
        }
        Ok(())
    }

    /// Once the first start logged the NBD TCP listener's address, learns its port and
    /// names it in the configuration, so every later start listens on it again.
    fn keep_reported_tcp_port(&mut self) {
        let Some(address) = reported_address(&self.log(), NBD_TCP) else {
            return;
        };
        let text = fs::read_to_string(self.config()).expect("read config");
        assert!(
            text.contains(TCP_ANY_PORT),
            "config has no `{TCP_ANY_PORT}`:\n{text}"
        );
        let pinned = format!("tcp = \"127.0.0.1:{}\"", address.port());
        fs::write(self.config(), text.replacen(TCP_ANY_PORT, &pinned, 1)).expect("write config");
        self.tcp_port = Some(address.port());
    }

    /// The address the running daemon reports for `what` (it binds port 0 where a
    /// test's configuration says so); waits for the report.
    pub fn reported_address(&self, what: Reported) -> SocketAddr {
        wait_reported_address("blkrep primary", what, || self.log())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let mut c = self.child.take().expect("daemon running");
        let _ = kill(pid(c.id()), Signal::SIGKILL);
        c.wait().expect("wait after SIGKILL");
        let _ = self.append_log("harness: SIGKILL sent");
    }

    /// Sends `sig` and waits (30 s at most) for exit; returns the exit status.
    pub fn stop_with(&mut self, sig: Signal) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        kill(pid(c.id()), sig).expect("send signal");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                let _ = self.append_log(&format!("harness: exited after {sig} with {st}"));
                return st;
            }
            if Instant::now() >= deadline {
                let _ = kill(pid(c.id()), Signal::SIGKILL);
                let _ = c.wait();
                panic!("blkrep primary did not exit within 30 s of {sig}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait, assert exit 0.
    pub fn terminate(&mut self) {
        let st = self.stop_with(Signal::SIGTERM);
        assert!(
            st.success(),
            "blkrep primary exited with {st} after SIGTERM (expected 0)"
        );
    }

    /// Starts the daemon again with the same config, images and rings.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs a stopped daemon");
        self.spawn_and_wait();
    }

    fn append_log(&self, line: &str) -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.layout.log())?;
        writeln!(f, "======== {line} ========")
    }

    /// A `blkrep` command (not yet run).
    pub fn cmd(&self) -> Command {
        Command::new(bin())
    }

    /// `blkrep status --config FILE --json`, parsed.
    pub fn status(&self) -> Value {
        let o = run(
            Command::new(bin())
                .args(["status", "--json", "--config"])
                .arg(self.config()),
            SHORT,
        );
        assert!(o.success(), "blkrep status failed\n{}", o.report());
        o.json()
    }

    /// The status object of group `g`.
    pub fn group_status(&self, g: &str) -> Value {
        let st = self.status();
        st["groups"]
            .as_array()
            .unwrap_or_else(|| panic!("status has no groups array: {st}"))
            .iter()
            .find(|x| x["name"] == g)
            .unwrap_or_else(|| panic!("status has no group {g}: {st}"))
            .clone()
    }

    /// Waits until `check` holds for group `g`'s consumer status; returns it.
    pub fn wait_consumer(
        &self,
        g: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.group_status(g)["consumer"].clone();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen in {timeout:?}: {status:#}\n{}",
                tail(&self.log(), 40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The status object of disk `d` in group `g`.
    pub fn disk_status(&self, g: &str, d: &str) -> Value {
        let gs = self.group_status(g);
        gs["disks"]
            .as_array()
            .unwrap_or_else(|| panic!("group {g} has no disks array: {gs}"))
            .iter()
            .find(|x| x["name"] == d)
            .unwrap_or_else(|| panic!("group {g} has no disk {d}: {gs}"))
            .clone()
    }

    /// Runs `blkrep replication --config FILE ARGS` (unchecked).
    pub fn replication(&self, args: &[&str]) -> Output {
        run(
            Command::new(bin())
                .args(["replication", "--config"])
                .arg(self.config())
                .args(args),
            LONG,
        )
    }

    /// `blkrep cycles close --config FILE --group G` (unchecked).
    pub fn cycles_close_cmd(&self, g: &str) -> Command {
        let mut c = Command::new(bin());
        c.args(["cycles", "close", "--config"])
            .arg(self.config())
            .args(["--group", g]);
        c
    }

    /// Closes the cycle and waits for the consumer; returns the closed cycle number.
    pub fn cycles_close(&self, g: &str) -> u64 {
        let o = run(&mut self.cycles_close_cmd(g), LONG);
        assert!(o.success(), "blkrep cycles close failed\n{}", o.report());
        let v = o.json();
        v["cycle"]
            .as_u64()
            .unwrap_or_else(|| panic!("cycles close printed no {{\"cycle\":N}}: {}", o.report()))
    }

    /// `blkrep cycles apply --config FILE --group G --to DIR` (unchecked).
    pub fn cycles_apply(&self, g: &str, to: &Path) -> Output {
        run(
            Command::new(bin())
                .args(["cycles", "apply", "--config"])
                .arg(self.config())
                .args(["--group", g, "--to"])
                .arg(to),
            LONG,
        )
    }

    /// Keeps the temp dir after the test (for debugging).
    pub fn keep(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            return d.keep();
        }
        self.layout.root.clone()
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(pid(c.id()), Signal::SIGKILL);
            let _ = c.wait();
        }
        if thread::panicking() {
            // Connection open/close lines (many from readiness probes) are left out.
            let log = self.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("client connected") && !l.contains("client disconnected"))
                .collect();
            eprintln!(
                "\n======== blkrep primary log ({}; connect/disconnect lines omitted) ========\n{}\n======== end of daemon log ========",
                self.layout.log().display(),
                tail(&lines.join("\n"), 300)
            );
            if std::env::var_os("BLKREP_TEST_KEEP").is_some() {
                let p = self.keep();
                eprintln!("test files kept in {}", p.display());
            }
        }
    }
}

/// Checks the JSON status object of a group has the documented shape.
pub fn assert_group_shape(g: &Value) {
    let ctx = || format!("group status: {g}");
    assert!(g["name"].is_string(), "name not a string; {}", ctx());
    let tracking = g["tracking"]
        .as_str()
        .unwrap_or_else(|| panic!("tracking not a string; {}", ctx()));
    assert!(
        ["logging", "bitmap", "off"].contains(&tracking),
        "tracking {tracking:?} not one of logging|bitmap|off; {}",
        ctx()
    );
    assert!(
        g["resync_required"].is_boolean(),
        "resync_required not a bool; {}",
        ctx()
    );
    assert!(
        g["resync_reason"].is_null() || g["resync_reason"].is_string(),
        "resync_reason not string|null; {}",
        ctx()
    );
    for k in ["open", "last_closed", "last_acked"] {
        assert!(
            g["cycle"][k].is_u64(),
            "cycle.{k} not an unsigned integer; {}",
            ctx()
        );
    }
    for k in ["size", "used"] {
        assert!(
            g["ring"][k].is_u64(),
            "ring.{k} not an unsigned integer; {}",
            ctx()
        );
    }
    let disks = g["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("disks not an array; {}", ctx()));
    for d in disks {
        assert!(d["name"].is_string(), "disk name not a string; {}", ctx());
        for k in ["size", "dirty_bytes", "connections"] {
            assert!(d[k].is_u64(), "disk.{k} not an unsigned integer; {}", ctx());
        }
    }
}

impl Primary {
    /// Turns the metrics endpoint on, on a port the daemon picks (it logs the address;
    /// see [`Primary::reported_address`]). For a primary not started yet.
    pub fn enable_metrics(&self) {
        let text = fs::read_to_string(self.config()).expect("read config");
        fs::write(self.config(), format!("metrics = \"127.0.0.1:0\"\n{text}"))
            .expect("write config");
    }

    /// Closes a cycle of group `g` expecting the replica to refuse it: the close
    /// fails and the consumer is suspended. Returns the consumer's status.
    pub fn close_refused(&self, g: &str, what: &str) -> Value {
        let close = run(&mut self.cycles_close_cmd(g), LONG);
        assert!(
            !close.success(),
            "{what}: the cycle shipped\n{}",
            close.report()
        );
        self.wait_consumer(g, what, SHORT, |s| s["state"] == "suspended")
    }

    /// Adds `lines` to the `[nbd]` section of the configuration (for settings the
    /// fixture's readiness probe need not know, such as TLS on the TCP listener).
    pub fn add_nbd_settings(&self, lines: &str) {
        let text = fs::read_to_string(self.config()).expect("read config");
        let text = text.replacen("\n[nbd]\n", &format!("\n[nbd]\n{lines}\n"), 1);
        fs::write(self.config(), text).expect("write config");
    }
}
