//! Application-consistent points: the freeze and thaw commands run around the close
//! of a cycle, and when the next point is due.
//!
//! A command is an argv run directly (no shell) in its own process group, with stdin
//! empty and the tail of its stderr kept for the log. One that outlives its timeout is
//! killed with its whole group (SIGKILL) and counts as failed.
//!
//! A point is due at the first cycle closed once `every` has passed since the last
//! attempt, less half an interval (so points land on the cycle nearest the mark rather
//! than drift an interval later each time). The last attempt's time is kept in a small
//! file beside the ring, so a restarted daemon does not freeze its guests again at once.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

/// Bytes of a command's stderr kept (its end) for the log.
pub const STDERR_TAIL: usize = 4096;
/// Longest pause between two looks at a running command: how late its end may be
/// noticed. A freeze is held that much longer at worst.
const MAX_POLL: Duration = Duration::from_millis(5);
/// How long a killed command may take to die before it is left behind.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long the stderr of a finished command may take to reach its end (a process the
/// command left running may hold it open).
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// Errors of the freeze and thaw commands, and of the schedule's state file.
#[derive(Debug, Error)]
pub enum FreezeError {
    /// The configured command has no program.
    #[error("The command is empty")]
    Empty,
    /// The program cannot be started (missing, not executable).
    #[error("Cannot start `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command ended unsuccessfully.
    #[error("`{command}` failed ({status}){}", stderr_note(.stderr))]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// The tail of its stderr.
        stderr: String,
    },
    /// The command did not finish in time and was killed.
    #[error("`{command}` did not finish within {}s and was killed{}", .timeout.as_secs_f64(), stderr_note(.stderr))]
    TimedOut {
        /// The command line.
        command: String,
        /// The timeout.
        timeout: Duration,
        /// The tail of its stderr.
        stderr: String,
    },
    /// Waiting for the command failed; it was killed.
    #[error("Cannot wait for `{command}`; it was killed")]
    Wait {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The schedule's state file cannot be written.
    #[error("Cannot write {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl FreezeError {
    /// Whether the command ran at all: after a freeze that ran (even one that failed
    /// or was killed) the thaw must run.
    pub fn started(&self) -> bool {
        !matches!(self, FreezeError::Empty | FreezeError::Spawn { .. })
    }
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; stderr: {stderr}")
    }
}

/// A command line for people: the argv joined by spaces, odd arguments quoted.
pub fn display_command(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '"') {
                format!("{arg:?}")
            } else {
                arg.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `argv` with `env` added to the daemon's environment, in its own process
/// group, and waits at most `timeout` for it; then its group is killed.
pub fn run_command(
    argv: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), FreezeError> {
    let (program, args) = argv.split_first().ok_or(FreezeError::Empty)?;
    if program.is_empty() {
        return Err(FreezeError::Empty);
    }
    let command = display_command(argv);
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own group: a timeout kills whatever it started too.
        .process_group(0)
        .spawn()
        .map_err(|source| FreezeError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stderr = StderrTail::start(&mut child);
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(500);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(FreezeError::Failed {
                    command,
                    status,
                    stderr: stderr.collect(),
                })
            }
            Ok(None) => {
                let now = Instant::now();
                if now >= deadline {
                    kill_group(&mut child);
                    return Err(FreezeError::TimedOut {
                        command,
                        timeout,
                        stderr: stderr.collect(),
                    });
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(MAX_POLL);
            }
            Err(source) => {
                kill_group(&mut child);
                return Err(FreezeError::Wait { command, source });
            }
        }
    }
}

/// SIGKILLs the child's process group and reaps the child (waiting [`KILL_GRACE`] at
/// most: a process stuck in the kernel dies only when its I/O ends).
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // The child is not reaped yet, so its pid (the group id) is still ours.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => std::thread::sleep(MAX_POLL),
            Ok(Some(_)) | Err(_) => return,
        }
    }
    warn!(
        pid = child.id(),
        "A killed command did not exit; it is left behind"
    );
}

/// The end of a child's stderr, read by a thread so a chatty command never blocks on a
/// full pipe.
struct StderrTail(Option<crossbeam_channel::Receiver<Vec<u8>>>);

impl StderrTail {
    fn start(child: &mut Child) -> Self {
        let Some(mut pipe) = child.stderr.take() else {
            return StderrTail(None);
        };
        let (sender, receiver) = bounded(1);
        let reader = std::thread::Builder::new()
            .name("command-stderr".into())
            .spawn(move || {
                let mut tail = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    match pipe.read(&mut buffer) {
                        Ok(0) => break,
                        Ok(n) => {
                            tail.extend_from_slice(&buffer[..n]);
                            if tail.len() > STDERR_TAIL {
                                tail.drain(..tail.len() - STDERR_TAIL);
                            }
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = sender.send(tail);
            });
        StderrTail(reader.ok().map(|_| receiver))
    }

    /// The tail, as text, once the pipe ended (or [`STDERR_GRACE`] passed).
    fn collect(&self) -> String {
        let Some(receiver) = &self.0 else {
            return String::new();
        };
        match receiver.recv_timeout(STDERR_GRACE) {
            Ok(tail) => String::from_utf8_lossy(&tail).trim().to_string(),
            Err(_) => String::new(),
        }
    }
}

/// What a group's application-consistent points are made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConsistentOptions {
    /// Time between points.
    pub every: Duration,
    /// Run before the cycle closes (argv, no shell).
    pub freeze_command: Vec<String>,
    /// Run right after it closed, whenever the freeze command ran.
    pub thaw_command: Vec<String>,
    /// How long each command may take.
    pub timeout: Duration,
    /// Where the last attempt's time is kept (`None`: in memory only).
    pub state_path: Option<PathBuf>,
}

/// The state file of the group whose ring is `ring`.
pub fn state_path_for_ring(ring: &Path) -> PathBuf {
    let mut name = ring.as_os_str().to_os_string();
    name.push(".app-consistent.json");
    PathBuf::from(name)
}

/// What the state file holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct SavedState {
    /// When the last point was attempted (milliseconds since the epoch).
    last_attempt_unix_ms: u64,
}

/// Which phase a command runs in (`BLKREP_PHASE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the close.
    Freeze,
    /// After it.
    Thaw,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Freeze => "freeze",
            Phase::Thaw => "thaw",
        }
    }
}

/// The point being made, as the commands see it in their environment.
#[derive(Debug, Clone, Copy)]
pub struct PointEnv<'a> {
    /// `BLKREP_GROUP`.
    pub group: &'a str,
    /// `BLKREP_CYCLE`: the cycle the point closes.
    pub cycle: u64,
    /// `BLKREP_DISKS`: the group's disks, comma-separated.
    pub disks: &'a str,
}

/// The schedule and commands of a group's application-consistent points.
#[derive(Debug)]
pub struct AppConsistent {
    options: AppConsistentOptions,
    /// A point is due this long before `every` has passed.
    slack: Duration,
    last_attempt_ms: Option<u64>,
}

impl AppConsistent {
    /// The points of a group closing cycles every `interval`; the last attempt is read
    /// from the state file (an unreadable one means none: the next cycle is a point).
    pub fn new(options: AppConsistentOptions, interval: Duration) -> Self {
        let last_attempt_ms = options.state_path.as_deref().and_then(load_state);
        AppConsistent {
            slack: (interval / 2).min(options.every),
            options,
            last_attempt_ms,
        }
    }

    /// The options.
    pub fn options(&self) -> &AppConsistentOptions {
        &self.options
    }

    /// When the last point was attempted (milliseconds since the epoch).
    pub fn last_attempt_ms(&self) -> Option<u64> {
        self.last_attempt_ms
    }

    /// From when the next point is due (milliseconds since the epoch); `None`: at the
    /// next cycle.
    pub fn due_at_ms(&self) -> Option<u64> {
        let span = self.options.every.saturating_sub(self.slack);
        let span = u64::try_from(span.as_millis()).unwrap_or(u64::MAX);
        self.last_attempt_ms.map(|last| last.saturating_add(span))
    }

    /// Whether the cycle closing at `now_ms` should be a point.
    pub fn is_due(&self, now_ms: u64) -> bool {
        match (self.last_attempt_ms, self.due_at_ms()) {
            // A last attempt in the future: the clock went back; trust now.
            (Some(last), _) if last > now_ms => true,
            (_, Some(due)) => now_ms >= due,
            (_, None) => true,
        }
    }

    /// Records an attempt at `now_ms`, in the state file too. On error the attempt is
    /// still remembered in memory.
    pub fn record_attempt(&mut self, now_ms: u64) -> Result<(), FreezeError> {
        self.last_attempt_ms = Some(now_ms);
        match &self.options.state_path {
            Some(path) => save_state(
                path,
                SavedState {
                    last_attempt_unix_ms: now_ms,
                },
            ),
            None => Ok(()),
        }
    }

    /// Runs the command of `phase` for `point`.
    pub fn run(&self, phase: Phase, point: &PointEnv<'_>) -> Result<(), FreezeError> {
        let argv = match phase {
            Phase::Freeze => &self.options.freeze_command,
            Phase::Thaw => &self.options.thaw_command,
        };
        let cycle = point.cycle.to_string();
        let env = [
            ("BLKREP_GROUP", point.group),
            ("BLKREP_CYCLE", cycle.as_str()),
            ("BLKREP_PHASE", phase.as_str()),
            ("BLKREP_DISKS", point.disks),
        ];
        run_command(argv, &env, self.options.timeout)
    }
}

fn load_state(path: &Path) -> Option<u64> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            warn!(path = %path.display(), %error, "Cannot read when the last application-consistent point was made; the next cycle makes one");
            return None;
        }
    };
    match serde_json::from_slice::<SavedState>(&bytes) {
        Ok(state) => Some(state.last_attempt_unix_ms),
        Err(error) => {
            warn!(path = %path.display(), %error, "The application-consistent point state is unreadable; the next cycle makes a point");
            None
        }
    }
}

/// Replaces the file atomically. Not fsynced beyond the file itself: a lost update
/// only makes the next point come early.
fn save_state(path: &Path, state: SavedState) -> Result<(), FreezeError> {
    let error = |source| FreezeError::State {
        path: path.to_path_buf(),
        source,
    };
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let text = serde_json::to_vec(&state).map_err(|e| error(std::io::Error::other(e)))?;
    let mut file = File::create(&temporary).map_err(error)?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(error)?;
    std::fs::rename(&temporary, path).map_err(error)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_string()).collect()
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn a_succeeding_command_is_ok_and_a_failing_one_reports_its_status() {
        run_command(&argv(&["true"]), &[], TIMEOUT).unwrap();
        let error = run_command(&argv(&["false"]), &[], TIMEOUT).unwrap_err();
        assert!(
            matches!(&error, FreezeError::Failed { status, .. } if status.code() == Some(1)),
            "{error:?}"
        );
        assert!(error.started());
        assert_eq!(error.to_string(), "`false` failed (exit status: 1)");
    }

    #[test]
    fn a_command_that_outlives_its_timeout_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("background.pid");
        // The background sleep holds stderr open and belongs to the group.
        let script = format!(
            "sleep 30 & echo $! > {}; echo going to sleep >&2; sleep 5",
            pid_file.display()
        );
        let started = Instant::now();
        let error = run_command(
            &argv(&["sh", "-c", &script]),
            &[],
            Duration::from_millis(200),
        )
        .unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        match &error {
            FreezeError::TimedOut { stderr, .. } => assert_eq!(stderr, "going to sleep"),
            other => panic!("{other:?}"),
        }
        assert!(error.started());
        assert!(
            error.to_string().contains("within 0.2s and was killed"),
            "{error}"
        );
        let background: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Orphaned by the kill, it is reaped by init once dead.
        let deadline = Instant::now() + Duration::from_secs(5);
        while nix::sys::signal::kill(Pid::from_raw(background), None).is_ok() {
            assert!(Instant::now() < deadline, "the background sleep survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn stderr_is_kept_up_to_its_last_4_kib() {
        let script = "i=0; while [ $i -lt 200 ]; do echo 'noise noise noise noise noise noise' >&2; i=$((i+1)); done; echo 'guest agent not responding' >&2; exit 3";
        let error = run_command(&argv(&["sh", "-c", script]), &[], TIMEOUT).unwrap_err();
        let FreezeError::Failed { status, stderr, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(status.code(), Some(3));
        assert!(stderr.len() <= STDERR_TAIL, "{}", stderr.len());
        assert!(stderr.len() > STDERR_TAIL - 100, "{}", stderr.len());
        assert!(stderr.ends_with("guest agent not responding"), "{stderr}");
        let message = error.to_string();
        assert!(
            message.contains("failed (exit status: 3); stderr: "),
            "{message}"
        );
        assert!(message.ends_with("guest agent not responding"), "{message}");
    }

    #[test]
    fn commands_get_the_point_in_their_environment_and_no_stdin() {
        let options = AppConsistentOptions {
            every: Duration::from_secs(60),
            freeze_command: argv(&[
                "sh",
                "-c",
                r#"test "$BLKREP_PHASE/$BLKREP_GROUP/$BLKREP_CYCLE/$BLKREP_DISKS" = "freeze/vm1/42/d0,d1" && ! read line"#,
            ]),
            thaw_command: argv(&["sh", "-c", r#"test "$BLKREP_PHASE" = thaw"#]),
            timeout: TIMEOUT,
            state_path: None,
        };
        let points = AppConsistent::new(options, Duration::from_secs(1));
        let point = PointEnv {
            group: "vm1",
            cycle: 42,
            disks: "d0,d1",
        };
        points.run(Phase::Freeze, &point).unwrap();
        points.run(Phase::Thaw, &point).unwrap();
    }

    #[test]
    fn a_missing_program_or_empty_command_never_started() {
        let error = run_command(&argv(&["/nonexistent/freeze"]), &[], TIMEOUT).unwrap_err();
        assert!(matches!(error, FreezeError::Spawn { .. }), "{error:?}");
        assert!(!error.started());
        assert!(!run_command(&[], &[], TIMEOUT).unwrap_err().started());
        assert!(!run_command(&argv(&[""]), &[], TIMEOUT)
            .unwrap_err()
            .started());
    }

    #[test]
    fn command_lines_read_well() {
        assert_eq!(
            display_command(&argv(&["virsh", "domfsfreeze", "my vm", ""])),
            r#"virsh domfsfreeze "my vm" """#
        );
    }

    fn schedule(every: u64, interval: u64, state_path: Option<PathBuf>) -> AppConsistent {
        AppConsistent::new(
            AppConsistentOptions {
                every: Duration::from_secs(every),
                freeze_command: argv(&["true"]),
                thaw_command: argv(&["true"]),
                timeout: TIMEOUT,
                state_path,
            },
            Duration::from_secs(interval),
        )
    }

    #[test]
    fn a_point_is_due_first_then_every_interval_nearest_the_mark() {
        // Every 4 h with 5-minute cycles: due from 3h57m30s after an attempt.
        let mut points = schedule(4 * 3600, 300, None);
        let start = 1_000_000_000_000;
        assert!(points.is_due(start));
        assert_eq!(points.due_at_ms(), None);
        points.record_attempt(start).unwrap();
        assert!(!points.is_due(start + 300_000));
        let due = start + (4 * 3600 - 150) * 1000;
        assert_eq!(points.due_at_ms(), Some(due));
        assert!(!points.is_due(due - 1));
        assert!(points.is_due(due));
        // The clock went back past the attempt: the record cannot be trusted.
        assert!(points.is_due(start - 1));
        // Every cycle when every equals the interval.
        let mut each = schedule(60, 60, None);
        each.record_attempt(start).unwrap();
        assert!(each.is_due(start + 30_000));
        assert!(!each.is_due(start + 29_999));
    }

    #[test]
    fn the_last_attempt_survives_a_restart_and_a_bad_file_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path_for_ring(&dir.path().join("vm1.ring"));
        assert!(path.ends_with("vm1.ring.app-consistent.json"));
        let mut points = schedule(3600, 60, Some(path.clone()));
        assert_eq!(points.last_attempt_ms(), None);
        points.record_attempt(5_000_000).unwrap();
        let again = schedule(3600, 60, Some(path.clone()));
        assert_eq!(again.last_attempt_ms(), Some(5_000_000));
        assert!(!again.is_due(5_060_000));
        std::fs::write(&path, b"{ nope").unwrap();
        assert_eq!(schedule(3600, 60, Some(path)).last_attempt_ms(), None);
    }
}
