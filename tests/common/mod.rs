//! Harness shared by the whole-system tests: a `Primary` fixture that runs a real
//! `blkrep primary` daemon in a temp dir, helpers to run external clients with a
//! timeout, and a minimal NBD client (`nbd`) for writers whose every acknowledgement
//! the tests must observe.
//!
//! Every external command runs with a timeout; a hung client or daemon fails the
//! test with its output instead of hanging CI. On a panic the daemon's log is
//! printed (set `BLKREP_TEST_KEEP=1` to also keep the temp dir).
#![allow(dead_code)]

pub mod fault_proxy;
pub mod hostile;
pub mod nbd;
pub mod ordered;
pub mod power_loss;
pub mod replica;
pub mod soak;
pub mod writer;

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_blkrep");

/// /usr/bin/python3 is the interpreter that can import Debian's libnbd bindings.
pub const PYTHON: &str = "/usr/bin/python3";

/// Default timeout for short CLI calls (status, --help, ...).
pub const SHORT: Duration = Duration::from_secs(20);
/// Timeout for calls that move data (cycles close/apply, qemu-img convert, fio...).
pub const LONG: Duration = Duration::from_secs(120);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------

/// Panics with an actionable message if `tool` is not on PATH.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required NBD client `{tool}` is not installed (not found in PATH); \
         install with scripts/install-test-deps.sh"
    );
}

/// Panics unless /usr/bin/python3 can `import nbd` (python3-libnbd).
pub fn require_python_libnbd() {
    let out = Command::new(PYTHON)
        .args(["-c", "import nbd; print(nbd.NBD().get_version())"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{PYTHON} cannot import the libnbd bindings (python3-libnbd): {}; \
             install with scripts/install-test-deps.sh",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => {
            panic!("{PYTHON} is not runnable ({e}); install with scripts/install-test-deps.sh")
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands with a timeout
// ---------------------------------------------------------------------------

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    pub desc: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// stdout and stderr together, for message checks.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.status,
            tail(&self.stdout, 200),
            tail(&self.stderr, 200)
        )
    }
    pub fn assert_ok(self) -> Self {
        assert!(self.success(), "command failed\n{}", self.report());
        self
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.report()))
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.contains('?') || a.is_empty() {
            let _ = write!(s, "'{a}'");
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion with stdin closed, capturing its output. If it does not
/// finish within `timeout` its whole process group is killed and the test panics
/// with what it printed so far.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    match run_with_timeout(cmd, timeout) {
        Ok(o) => o,
        Err(o) => panic!(
            "command timed out after {timeout:?} and was killed\n{}",
            o.report()
        ),
    }
}

/// Like `run`, but a timeout is returned as `Err` (with the output so far) after
/// the process group was killed.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, Output> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
    let mut so = child.stdout.take().expect("stdout piped");
    let mut se = child.stderr.take().expect("stderr piped");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        let pgid = pid(child.id());
        let _ = killpg(pgid, Signal::SIGKILL);
        let st = child.wait().expect("wait after kill");
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        return Err(Output {
            desc,
            status: st,
            stdout,
            stderr,
        });
    };
    // A grandchild keeping the pipes open must not hang us: give the readers a
    // moment, then kill the group.
    let stdout = join_with_deadline(t_out, child.id());
    let stderr = join_with_deadline(t_err, child.id());
    Ok(Output {
        desc,
        status,
        stdout,
        stderr,
    })
}

fn pid(id: u32) -> Pid {
    Pid::from_raw(i32::try_from(id).expect("pid fits i32"))
}

fn join_with_deadline(t: thread::JoinHandle<Vec<u8>>, pgid: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    if !t.is_finished() {
        let _ = killpg(pid(pgid), Signal::SIGKILL);
    }
    String::from_utf8_lossy(&t.join().unwrap_or_default()).into_owned()
}

/// `run` + assert exit 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    run(cmd, timeout).assert_ok()
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    if v.len() <= lines {
        s.to_string()
    } else {
        format!(
            "[... {} lines cut ...]\n{}",
            v.len() - lines,
            v[v.len() - lines..].join("\n")
        )
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), cheap enough for 64 MiB.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn read_file(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

pub fn read_range(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut v = vec![0u8; len];
    f.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("read {} @{off}+{len}: {e}", p.display()));
    v
}

/// Asserts two files are byte-identical, naming the first difference.
pub fn assert_files_equal(a: &Path, b: &Path, what: &str) {
    let da = read_file(a);
    let db = read_file(b);
    assert_bytes_equal(
        &da,
        &db,
        &format!("{what}: {} vs {}", a.display(), b.display()),
    );
}

pub fn assert_bytes_equal(a: &[u8], b: &[u8], what: &str) {
    if a == b {
        return;
    }
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: sizes differ ({} vs {})",
        a.len(),
        b.len()
    );
    let first = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .expect("some byte differs");
    let differing_4k: usize = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    let s = first.saturating_sub(first % 16);
    let e = (s + 32).min(a.len());
    panic!(
        "{what}: contents differ; first difference at byte {first} (4 KiB block {}), \
         {differing_4k} differing 4 KiB blocks in all\n  left  [{s}..{e}]: {:02x?}\n  right [{s}..{e}]: {:02x?}",
        first / 4096,
        &a[s..e],
        &b[s..e]
    );
}

/// A free TCP port on 127.0.0.1 (bound then released; the daemon binds it next).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------
// Config description
// ---------------------------------------------------------------------------

/// Initial content of an image.
#[derive(Debug, Clone)]
pub enum Init {
    /// A hole of the given size (set_len).
    Sparse,
    /// Pseudo-random bytes from this seed.
    Random(u64),
    /// These bytes (padded with zeroes to the disk size).
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
    pub init: Init,
    pub read_only: bool,
    pub direct: bool,
}

impl DiskSpec {
    pub fn new(name: &str, size: u64) -> Self {
        DiskSpec {
            name: name.into(),
            size,
            init: Init::Sparse,
            read_only: false,
            direct: false,
        }
    }
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumer {
    None,
    LocalCopy,
    Discard,
    /// These lines go under `[group.consumer]` as they are.
    Raw(String),
}

#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub name: String,
    pub ring_size: String,
    pub block_size: Option<String>,
    pub interval: String,
    pub tracking: Option<bool>,
    pub consumer: Consumer,
    pub disks: Vec<DiskSpec>,
}

impl GroupSpec {
    /// A group with a local-copy consumer and no automatic cycles.
    pub fn new(name: &str, disks: Vec<DiskSpec>) -> Self {
        GroupSpec {
            name: name.into(),
            ring_size: "64MiB".into(),
            block_size: Some("4KiB".into()),
            interval: "1h".into(),
            tracking: None,
            consumer: Consumer::LocalCopy,
            disks,
        }
    }
    pub fn consumer(mut self, c: Consumer) -> Self {
        self.consumer = c;
        self
    }
    pub fn tracking(mut self, t: bool) -> Self {
        self.tracking = Some(t);
        self
    }
    pub fn ring_size(mut self, s: &str) -> Self {
        self.ring_size = s.into();
        self
    }
    pub fn interval(mut self, s: &str) -> Self {
        self.interval = s.into();
        self
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub groups: Vec<GroupSpec>,
    pub unix: bool,
    pub tcp: bool,
}

impl Spec {
    pub fn new(groups: Vec<GroupSpec>) -> Self {
        Spec {
            groups,
            unix: true,
            tcp: false,
        }
    }
    /// One group "vm1" (local-copy consumer, interval 1h) with one sparse disk "disk0".
    pub fn single(size: u64) -> Self {
        Spec::new(vec![GroupSpec::new(
            "vm1",
            vec![DiskSpec::new("disk0", size)],
        )])
    }
    pub fn with_tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    pub fn disks(&self) -> impl Iterator<Item = &DiskSpec> {
        self.groups.iter().flat_map(|g| g.disks.iter())
    }
}

fn q(s: &str) -> String {
    // TOML basic string; Debug escaping matches TOML for the ASCII paths we use.
    format!("{s:?}")
}

/// Paths of one test's files, all under its temp dir.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn config(&self) -> PathBuf {
        self.root.join("primary.toml")
    }
    pub fn ctl(&self) -> PathBuf {
        self.root.join("primary.ctl")
    }
    pub fn nbd_sock(&self) -> PathBuf {
        self.root.join("nbd.sock")
    }
    pub fn image(&self, disk: &str) -> PathBuf {
        self.root.join(format!("{disk}.img"))
    }
    pub fn ring(&self, group: &str) -> PathBuf {
        self.root.join(format!("{group}.ring"))
    }
    pub fn copy_dir(&self, group: &str) -> PathBuf {
        self.root.join(format!("copy-{group}"))
    }
    pub fn copy_image(&self, group: &str, disk: &str) -> PathBuf {
        self.copy_dir(group).join(format!("{disk}.img"))
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("primary.log")
    }

    /// The config text for `spec` (TCP port given if `spec.tcp`).
    pub fn config_text(&self, spec: &Spec, tcp_port: Option<u16>) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "control_socket = {}", q(&self.ctl().to_string_lossy()));
        let _ = writeln!(s, "\n[nbd]");
        if spec.unix {
            let _ = writeln!(s, "unix_socket = {}", q(&self.nbd_sock().to_string_lossy()));
        }
        if let Some(port) = tcp_port {
            let _ = writeln!(s, "tcp = {}", q(&format!("127.0.0.1:{port}")));
        }
        for g in &spec.groups {
            let _ = writeln!(s, "\n[[group]]");
            let _ = writeln!(s, "name = {}", q(&g.name));
            let _ = writeln!(s, "ring = {}", q(&self.ring(&g.name).to_string_lossy()));
            let _ = writeln!(s, "ring_size = {}", q(&g.ring_size));
            if let Some(bs) = &g.block_size {
                let _ = writeln!(s, "block_size = {}", q(bs));
            }
            let _ = writeln!(s, "interval = {}", q(&g.interval));
            if let Some(t) = g.tracking {
                let _ = writeln!(s, "tracking = {t}");
            }
            match &g.consumer {
                Consumer::None => {}
                Consumer::LocalCopy => {
                    let _ = writeln!(s, "\n[group.consumer]\ntype = \"local-copy\"");
                    let _ = writeln!(s, "dir = {}", q(&self.copy_dir(&g.name).to_string_lossy()));
                }
                Consumer::Discard => {
                    let _ = writeln!(s, "\n[group.consumer]\ntype = \"discard\"");
                }
                Consumer::Raw(lines) => {
                    let _ = writeln!(s, "\n[group.consumer]\n{lines}");
                }
            }
            for d in &g.disks {
                let _ = writeln!(s, "\n[[group.disk]]");
                let _ = writeln!(s, "name = {}", q(&d.name));
                let _ = writeln!(s, "image = {}", q(&self.image(&d.name).to_string_lossy()));
                if d.read_only {
                    let _ = writeln!(s, "read_only = true");
                }
                if d.direct {
                    let _ = writeln!(s, "direct = true");
                }
            }
        }
        s
    }

    /// Creates every image of `spec` with its initial content.
    pub fn write_images(&self, spec: &Spec) {
        for d in spec.disks() {
            let p = self.image(&d.name);
            let mut f =
                fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
            match &d.init {
                Init::Sparse => {}
                Init::Random(seed) => {
                    let len = usize::try_from(d.size).expect("size fits usize");
                    f.write_all(&pseudo_random(*seed, len))
                        .expect("write image");
                }
                Init::Bytes(b) => f.write_all(b).expect("write image"),
            }
            f.set_len(d.size).expect("set_len");
            f.sync_all().expect("sync image");
        }
        for g in &spec.groups {
            if g.consumer == Consumer::LocalCopy {
                fs::create_dir_all(self.copy_dir(&g.name)).expect("mkdir copy dir");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon fixture
// ---------------------------------------------------------------------------

/// A running (or stopped) `blkrep primary` in its own temp dir.
#[derive(Debug)]
pub struct Primary {
    dir: Option<tempfile::TempDir>,
    pub layout: Layout,
    pub spec: Spec,
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
        let tcp_port = spec.tcp.then(free_port);
        layout.write_images(&spec);
        fs::write(layout.config(), layout.config_text(&spec, tcp_port)).expect("write config");
        Primary {
            dir: Some(dir),
            layout,
            spec,
            tcp_port,
            child: None,
            starts: 0,
        }
    }

    pub fn config(&self) -> PathBuf {
        self.layout.config()
    }
    pub fn image(&self, disk: &str) -> PathBuf {
        self.layout.image(disk)
    }
    pub fn copy_image(&self, group: &str, disk: &str) -> PathBuf {
        self.layout.copy_image(group, disk)
    }
    pub fn copy_dir(&self, group: &str) -> PathBuf {
        self.layout.copy_dir(group)
    }
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
    pub fn disk_size(&self, disk: &str) -> u64 {
        self.spec
            .disks()
            .find(|d| d.name == disk)
            .expect("disk in spec")
            .size
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

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
        let _ = writeln!(log, "======== harness: start #{} ========", self.starts);
        let child = Command::new(BIN)
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
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
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
            Command::new(BIN)
                .args(["status", "--json", "--config"])
                .arg(self.config()),
            SHORT,
        );
        if !o.success() {
            return Err(format!("`blkrep status` failed:\n{}", o.report()));
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
        Command::new(BIN)
    }

    /// `blkrep status --config FILE --json`, parsed.
    pub fn status(&self) -> Value {
        let o = run(
            Command::new(BIN)
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
            Command::new(BIN)
                .args(["replication", "--config"])
                .arg(self.config())
                .args(args),
            LONG,
        )
    }

    /// `blkrep cycles close --config FILE --group G` (unchecked).
    pub fn cycles_close_cmd(&self, g: &str) -> Command {
        let mut c = Command::new(BIN);
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
            Command::new(BIN)
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
    /// Adds `lines` to the `[nbd]` section of the configuration (for settings the
    /// fixture's readiness probe need not know, such as TLS on the TCP listener).
    pub fn add_nbd_settings(&self, lines: &str) {
        let text = fs::read_to_string(self.config()).expect("read config");
        let text = text.replacen("\n[nbd]\n", &format!("\n[nbd]\n{lines}\n"), 1);
        fs::write(self.config(), text).expect("write config");
    }
}
