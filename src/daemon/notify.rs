//! systemd's service notifications (`sd_notify(3)`) for both daemons, through the
//! `sd-notify` crate: `READY=1` once the daemon serves, `STOPPING=1` when it begins
//! to shut down, and `WATCHDOG=1` while it is alive.
//!
//! Contract:
//! - Nothing is sent and no thread starts unless the service manager (or a test) set
//!   `NOTIFY_SOCKET`. A notification that cannot be sent is logged, never fatal: the
//!   daemon serves either way.
//! - The watchdog runs only when `WATCHDOG_USEC` is set (and `WATCHDOG_PID`, if set,
//!   names this process). It is not a blind timer: every half period it sends a
//!   request to the daemon's own control socket and pings only if an answer comes
//!   within a quarter period. A daemon whose control loop no longer accepts or answers
//!   (stuck, out of descriptors or threads, frozen) stops pinging, and systemd
//!   restarts it.
//! - The probe is a request the control loop answers as a bad request, without
//!   touching groups or replicas: a status may wait on a lock that a long apply or
//!   resync holds, and that must not get the daemon, and with it every VM's disks,
//!   restarted. Group health is what `blkrep status` reports.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use thiserror::Error;
use tracing::{info, warn};

use crate::control::Response;

/// What the watchdog sends the control socket: an operation neither daemon has, so
/// the control loop answers it (as a bad request) without touching any group.
const PROBE_REQUEST: &[u8] = b"{\"op\":\"watchdog_probe\"}\n";

/// The shortest wait for the control socket's answer, whatever the period.
const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(10);

/// Why the control socket did not answer the watchdog's probe.
#[derive(Debug, Error)]
enum ProbeError {
    /// Nobody accepts on the socket.
    #[error("Cannot connect to the control socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The exchange broke or timed out.
    #[error("The control socket did not answer in time")]
    Io(#[from] std::io::Error),
    /// The answer is not a control response.
    #[error("Unreadable answer on the control socket")]
    Decode(#[from] serde_json::Error),
}

/// A daemon that told systemd it is ready; [`Notifier::stopping`] ends its watchdog.
#[derive(Debug)]
#[must_use = "call stopping() when the daemon begins to shut down"]
pub struct Notifier {
    /// Dropping it ends the watchdog thread.
    watchdog: Option<Sender<()>>,
}

/// Tells systemd the daemon serves (`READY=1`) and, when systemd asks for a
/// watchdog, starts pinging it while `control_socket` answers.
pub fn ready(control_socket: &Path) -> Notifier {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Notifier { watchdog: None };
    }
    send(&NotifyState::Ready);
    let watchdog = sd_notify::watchdog_enabled()
        .filter(|period| !period.is_zero())
        .and_then(|period| start_watchdog(period, control_socket.to_path_buf()));
    Notifier { watchdog }
}

impl Notifier {
    /// Tells systemd the daemon is shutting down (`STOPPING=1`) and stops pinging
    /// its watchdog (systemd does not watch a stopping service).
    pub fn stopping(self) {
        drop(self.watchdog);
        send(&NotifyState::Stopping);
    }
}

/// Sends one state; a failure is logged.
fn send(state: &NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(std::slice::from_ref(state)) {
        warn!(%error, %state, "Cannot notify systemd");
    }
}

/// Starts the thread that pings the watchdog every half `period` while the control
/// socket answers; returns the sender whose drop ends it.
fn start_watchdog(period: Duration, control_socket: PathBuf) -> Option<Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    let interval = period / 2;
    // A ping lands within a quarter period of its turn, so two pings are at most
    // three quarters of a period apart.
    let probe_timeout = (period / 4).max(MIN_PROBE_TIMEOUT);
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            let started = Instant::now();
            match probe(&control_socket, probe_timeout) {
                Ok(()) => send(&NotifyState::Watchdog),
                Err(error) => warn!(
                    error = %shipper::error_chain(&error),
                    "Not pinging systemd's watchdog: the control socket did not answer"
                ),
            }
            match stopped.recv_timeout(interval.saturating_sub(started.elapsed())) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        });
    match spawned {
        Ok(_) => {
            info!(period = ?period, "Watchdog on: pinging systemd while the control socket answers");
            Some(stop)
        }
        Err(error) => {
            warn!(%error, "Cannot start the watchdog thread; systemd will restart the daemon");
            None
        }
    }
}

/// Sends the probe request and waits (`timeout` per read or write) for an answer
/// in the control protocol's envelope, whatever it says.
fn probe(control_socket: &Path, timeout: Duration) -> Result<(), ProbeError> {
    let mut stream = UnixStream::connect(control_socket).map_err(|source| ProbeError::Connect {
        path: control_socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(PROBE_REQUEST)?;
    let mut line = String::new();
    BufReader::new(stream.take(crate::control::MAX_REQUEST)).read_line(&mut line)?;
    let _answer: Response = serde_json::from_str(&line)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_probe_passes_when_the_control_loop_answers_even_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            crate::control::answer(&stream, |request: crate::control::ControlRequest| {
                panic!("the probe parsed as a real request: {request:?}")
            })
            .unwrap();
        });
        probe(&path, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn the_probe_fails_when_nobody_answers_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        assert!(matches!(
            probe(&path, Duration::from_secs(1)),
            Err(ProbeError::Connect { .. })
        ));
        // Accepted by the kernel's backlog, never answered: a stuck control loop.
        let _listener = UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        assert!(matches!(
            probe(&path, Duration::from_millis(200)),
            Err(ProbeError::Io(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_probe_fails_on_an_answer_outside_the_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"HTTP/1.1 400 Bad Request\n").unwrap();
        });
        assert!(matches!(
            probe(&path, Duration::from_secs(5)),
            Err(ProbeError::Decode(_))
        ));
        server.join().unwrap();
    }
}
