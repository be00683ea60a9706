//! The replica side of whole-system tests: lab certificates made with `blkrep cert`,
//! and a `Replica` fixture that runs a real `blkrep replica run` daemon in its own
//! temp dir, with the helpers to wait for applied cycles and read replica disks.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use serde_json::Value;

use crate::command::{pid, run, tail, Output};
use crate::daemon_log::{wait_reported_address, Reported, REPLICA_API, START_MARKER};
use crate::{bin, LONG, SHORT};

/// The `listen` line of a new replica's configuration: a port the kernel picks. The
/// first start replaces it with the port the daemon reports.
const LISTEN_ANY_PORT: &str = "listen = \"127.0.0.1:0\"";

/// A lab CA and host certificates, made by `blkrep cert`.
#[derive(Debug)]
pub struct LabCerts {
    /// The directory holding the CA and every certificate and key.
    pub dir: PathBuf,
}

impl LabCerts {
    /// A CA in `dir` and certificates for `hosts` (first name names the files).
    pub fn create(dir: &Path, hosts: &[&[&str]]) -> LabCerts {
        fs::create_dir_all(dir).expect("mkdir certs");
        let o = run(
            Command::new(bin()).args(["cert", "ca", "--dir"]).arg(dir),
            SHORT,
        );
        assert!(o.success(), "blkrep cert ca failed\n{}", o.report());
        for names in hosts {
            let mut cmd = Command::new(bin());
            cmd.args(["cert", "issue", "--dir"]).arg(dir);
            for name in *names {
                cmd.args(["--name", name]);
            }
            let o = run(&mut cmd, SHORT);
            assert!(o.success(), "blkrep cert issue failed\n{}", o.report());
        }
        LabCerts {
            dir: dir.to_path_buf(),
        }
    }
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The certificate of `host` (its first name).
    pub fn cert(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.pem"))
    }
    /// The private key of `host` (its first name).
    pub fn key(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.key"))
    }

    /// The `[group.consumer]` lines of a primary replicating to `url` as `host`.
    pub fn consumer(&self, url: &str, host: &str, extra: &str) -> String {
        format!(
            "type = \"replica\"\nurl = {url:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n{extra}",
            self.ca().display().to_string(),
            self.cert(host).display().to_string(),
            self.key(host).display().to_string(),
        )
    }
}

/// One `[[authorization]]` entry.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The `primary` pattern, if any.
    pub primary: Option<String>,
    /// The trust group (its storage is the temp dir's `storage-GROUP`).
    pub trust_group: String,
}

/// The lab primary's identity, which [`dc1`] authorises.
pub const PRIMARY_HOST: &str = "primary.dc1.test";
/// The replica's name in its certificate.
pub const REPLICA_HOST: &str = "localhost";
/// An identity no entry of [`dc1`] allows.
pub const ROGUE_HOST: &str = "rogue.dc2.test";

/// The authorisation of the lab: `*.dc1.test` primaries in trust group dc1.
pub fn dc1() -> Vec<Auth> {
    vec![Auth {
        primary: Some("*.dc1.test".into()),
        trust_group: "dc1".into(),
    }]
}

/// A lab CA in `dir` with certificates for the replica, the primary and a rogue.
pub fn lab_certs(dir: &Path) -> LabCerts {
    LabCerts::create(
        dir,
        &[&[REPLICA_HOST, "127.0.0.1"], &[PRIMARY_HOST], &[ROGUE_HOST]],
    )
}

/// A running (or stopped) `blkrep replica run`.
#[derive(Debug)]
pub struct Replica {
    _dir: tempfile::TempDir,
    /// Its temp dir: configuration, log, sockets and storages.
    pub root: PathBuf,
    /// The port of its replica API on 127.0.0.1 (picked at its first start, kept for
    /// every later one).
    pub port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Replica {
    /// Starts a replica daemon serving TLS with `host`'s certificate from `certs`,
    /// authorising `auth` (storage under its temp dir, one directory per entry), with
    /// `extra` lines at the top of its configuration.
    pub fn start(certs: &LabCerts, host: &str, auth: &[Auth], extra: &str) -> Replica {
        let dir = tempfile::Builder::new()
            .prefix("blkrep-r")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut text = String::new();
        let _ = writeln!(text, "{LISTEN_ANY_PORT}");
        let _ = writeln!(
            text,
            "control_socket = {:?}",
            root.join("replica.ctl").display().to_string()
        );
        let _ = writeln!(text, "{extra}");
        let _ = writeln!(
            text,
            "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}",
            certs.cert(host).display().to_string(),
            certs.key(host).display().to_string(),
            certs.ca().display().to_string()
        );
        let _ = writeln!(
            text,
            "[nbd]\nunix_socket = {:?}",
            root.join("replica-nbd.sock").display().to_string()
        );
        for entry in auth {
            let _ = writeln!(text, "\n[[authorization]]");
            if let Some(primary) = &entry.primary {
                let _ = writeln!(text, "primary = {primary:?}");
            }
            let storage = root.join(format!("storage-{}", entry.trust_group));
            let _ = writeln!(text, "storage = {:?}", storage.display().to_string());
            let _ = writeln!(text, "trust_group = {:?}", entry.trust_group);
        }
        fs::write(root.join("replica.toml"), text).expect("write replica config");
        let mut replica = Replica {
            _dir: dir,
            root,
            port: 0,
            child: None,
            starts: 0,
        };
        replica.spawn();
        replica
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> nix::unistd::Pid {
        pid(self.child.as_ref().expect("replica running").id())
    }

    /// `https://HOST:PORT`, its API as a primary names it.
    pub fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.port)
    }
    /// Runs `blkrep replica ARGS --config <this replica's>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(
            Command::new(bin())
                .arg("replica")
                .args(args)
                .arg("--config")
                .arg(self.config()),
            LONG,
        )
    }

    /// The recovery points of replica `name`, oldest first, the latest last.
    pub fn points(&self, name: &str) -> Vec<Value> {
        self.cli(&["points", "--name", name, "--json"])
            .assert_ok()
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The unix socket serving test failover disks.
    pub fn nbd_socket(&self) -> PathBuf {
        self.root.join("replica-nbd.sock")
    }
    /// Its configuration file.
    pub fn config(&self) -> PathBuf {
        self.root.join("replica.toml")
    }
    /// The daemon's log over all its runs.
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("replica.log")).unwrap_or_default()
    }
    /// The replica disk `disk` of replica `name` of trust group `group`.
    pub fn disk(&self, trust_group: &str, name: &str, disk: &str) -> PathBuf {
        self.root
            .join(format!("storage-{trust_group}"))
            .join(name)
            .join("disks")
            .join(format!("{disk}.img"))
    }
    /// The storage directory of `trust_group`.
    pub fn storage(&self, trust_group: &str) -> PathBuf {
        self.root.join(format!("storage-{trust_group}"))
    }

    /// Starts the daemon (again) with its configuration; returns once its control
    /// API answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "replica already running");
        self.starts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("replica.log"))
            .expect("open replica log");
        let _ = std::io::Write::write_fmt(
            &mut log,
            format_args!("{START_MARKER}{} ========\n", self.starts),
        );
        let child = Command::new(bin())
            .args(["replica", "run", "--config"])
            .arg(self.config())
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                self.child = None;
                panic!(
                    "blkrep replica exited at start with {status}\n{}",
                    self.log()
                );
            }
            if self.try_status().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica not ready in 20 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.port == 0 {
            self.keep_reported_port();
        }
    }

    /// Learns the port the first start picked and names it in the configuration, so
    /// every later start (after a kill, or with new settings) listens on it again:
    /// primaries' configurations name it.
    fn keep_reported_port(&mut self) {
        self.port = self.reported_address(REPLICA_API).port();
        let text = fs::read_to_string(self.config()).expect("read replica config");
        assert!(
            text.contains(LISTEN_ANY_PORT),
            "replica config has no `{LISTEN_ANY_PORT}`:\n{text}"
        );
        let pinned = format!("listen = \"127.0.0.1:{}\"", self.port);
        fs::write(self.config(), text.replacen(LISTEN_ANY_PORT, &pinned, 1))
            .expect("write replica config");
    }

    /// The address the running daemon reports for `what` (it binds port 0 where a
    /// test's configuration says so); waits for the report.
    pub fn reported_address(&self, what: Reported) -> SocketAddr {
        wait_reported_address("blkrep replica", what, || self.log())
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(pid(child.id()), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(pid(child.id()), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    fn try_status(&self) -> Option<Value> {
        let o = run(
            Command::new(bin())
                .args(["replica", "status", "--json", "--config"])
                .arg(self.config()),
            SHORT,
        );
        o.success().then(|| o.json())
    }

    /// Every replica's info.
    pub fn replicas(&self) -> Vec<Value> {
        let v = self
            .try_status()
            .unwrap_or_else(|| panic!("replica status failed\n{}", self.log()));
        v.as_array()
            .cloned()
            .or_else(|| v["replicas"].as_array().cloned())
            .unwrap_or_else(|| panic!("replica status is not a list: {v}"))
    }

    /// The info of replica `name`, if it exists.
    pub fn info(&self, name: &str) -> Option<Value> {
        self.replicas().into_iter().find(|r| r["name"] == name)
    }

    /// Waits until replica `name` applied cycle `cycle` (or later) and has nothing
    /// pending; returns its info.
    pub fn wait_applied(&self, name: &str, cycle: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info(name);
            if let Some(info) = &info {
                let applied = info["last_applied_cycle"].as_u64();
                if applied.is_some_and(|a| a >= cycle)
                    && info["pending_transfers"].as_u64() == Some(0)
                {
                    return info.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "replica {name} did not apply cycle {cycle} in {timeout:?}: {info:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- replica log ----\n{}", tail(&self.log(), 60));
        }
        self.terminate();
    }
}

impl Replica {
    /// Stops the daemon, adds `lines` to its `[nbd]` section and starts it again.
    pub fn restart_with_nbd_settings(&mut self, lines: &str) {
        self.terminate();
        let text = fs::read_to_string(self.config()).expect("read replica config");
        let text = text.replacen("[nbd]\n", &format!("[nbd]\n{lines}\n"), 1);
        fs::write(self.config(), text).expect("write replica config");
        self.spawn();
    }
}

impl Replica {
    /// `blkrep replica reverse` of failed-over group `name`: replicates its live disks
    /// back to `to` every `interval`, as the lab primary (`certs`) (unchecked).
    pub fn start_reverse(
        &self,
        certs: &LabCerts,
        name: &str,
        to: &Replica,
        interval: &str,
    ) -> Output {
        let (ca, cert, key) = (
            certs.ca().display().to_string(),
            certs.cert(PRIMARY_HOST).display().to_string(),
            certs.key(PRIMARY_HOST).display().to_string(),
        );
        let url = to.url(REPLICA_HOST);
        self.cli(&[
            "reverse",
            "--name",
            name,
            "--url",
            &url,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--interval",
            interval,
        ])
    }
}

/// The `.part` files in `incoming/` of the replica directory `replica_dir`, each with
/// the bytes of chunk frames it holds for its own transfer, counted as the replica's
/// recovery counts them: from the first frame, in order, each checked whole, up to the
/// first that is not the next chunk of the file's transfer. The file's length can be
/// more: a recycled file (`spare.part`) keeps an earlier transfer's frames past them.
pub fn stored_chunks(replica_dir: &Path) -> Vec<(String, u64)> {
    StoredChunks::default().read(replica_dir)
}

/// [`stored_chunks`] for polling: each frame is read and checked once, later calls
/// go on from where the last one stopped.
#[derive(Debug, Default)]
pub struct StoredChunks {
    /// Per `.part` file: bytes of checked frames, and the next chunk's index.
    checked: std::sync::Mutex<std::collections::HashMap<String, (u64, u32)>>,
}

impl StoredChunks {
    /// Each `.part` file's name and stored bytes (see [`stored_chunks`]).
    pub fn read(&self, replica_dir: &Path) -> Vec<(String, u64)> {
        let Ok(dir) = fs::read_dir(replica_dir.join("incoming")) else {
            return Vec::new();
        };
        let mut checked = self
            .checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        dir.flatten()
            .map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let transfer = name
                    .strip_suffix(".part")
                    .and_then(|id| u64::from_str_radix(id, 16).ok());
                let (Some(transfer), Ok(file)) = (transfer, fs::File::open(entry.path())) else {
                    return (name, 0);
                };
                let len = file.metadata().map_or(0, |m| m.len());
                // A file cut shorter (recovery) is read again from its start.
                let from = checked
                    .get(&name)
                    .copied()
                    .filter(|(at, _)| *at <= len)
                    .unwrap_or_default();
                let to = next_unchecked_frame(&file, transfer, from);
                checked.insert(name.clone(), to);
                (name, to.0)
            })
            .collect()
    }
}

/// From `(at, index)`, the end of the whole, checked frames of chunks `index`,
/// `index + 1`, ... of `transfer` in `file`, and the index after them.
fn next_unchecked_frame(
    file: &fs::File,
    transfer: u64,
    (mut at, mut index): (u64, u32),
) -> (u64, u32) {
    use std::os::unix::fs::FileExt;
    use wire::chunk::{CheckedFrame, ChunkHeader, CHUNK_HEADER_LEN};
    let mut frame = vec![0u8; CHUNK_HEADER_LEN];
    loop {
        frame.resize(CHUNK_HEADER_LEN, 0);
        let Ok(header) = file
            .read_exact_at(&mut frame, at)
            .ok()
            .and_then(|()| ChunkHeader::parse(&frame).ok())
            .ok_or(())
        else {
            return (at, index);
        };
        frame.resize(header.frame_len(), 0);
        let whole = file
            .read_exact_at(&mut frame[CHUNK_HEADER_LEN..], at + CHUNK_HEADER_LEN as u64)
            .is_ok()
            && CheckedFrame::check(&frame).is_ok_and(|f| f.header.expect(transfer, index).is_ok());
        if !whole {
            return (at, index);
        }
        at += frame.len() as u64;
        index += 1;
    }
}
