//! Running external commands (clients, `blkrep` subcommands) with a timeout: a
//! command that does not finish in time has its whole process group killed and the
//! test fails with what it printed, instead of hanging CI.

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// The command line, quoted where needed.
    pub desc: String,
    /// How it exited (killed, after a timeout).
    pub status: ExitStatus,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl Output {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
    /// stdout and stderr together, for message checks.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    /// The command, its status and the tails of its output, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.status,
            tail(&self.stdout, 200),
            tail(&self.stderr, 200)
        )
    }
    /// Panics with the report unless it exited with status 0.
    pub fn assert_ok(self) -> Self {
        assert!(self.success(), "command failed\n{}", self.report());
        self
    }
    /// stdout parsed as JSON (panics with the report if it is not).
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

/// The pid of a child process, as nix wants it.
pub(crate) fn pid(id: u32) -> Pid {
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

/// The last `lines` lines of `s`, saying how many were cut.
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
