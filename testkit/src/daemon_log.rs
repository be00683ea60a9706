//! The addresses daemons report binding. Tests start daemons on port 0, so the
//! kernel picks a free port and tests running in parallel never race for one; the
//! harness then reads the bound address back from the line the daemon logs once it
//! listens. Neither daemon's status (`blkrep status --json`, `blkrep replica status
//! --json`) names its listeners, so the log is the only report.
//!
//! Logs are in tracing's text format (`... MESSAGE field=value ...`, no colours: the
//! fixtures set `NO_COLOR`), and the fixtures write [`START_MARKER`] before each start,
//! so only the latest run's lines count.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::tail;

/// What the fixtures write to a daemon's log before each start.
pub const START_MARKER: &str = "======== harness: start #";

/// How long a daemon may take to log an address once it answers on its control socket.
const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// Which log line reports an address, and where on it the address is.
#[derive(Debug, Clone, Copy)]
pub struct Reported {
    /// Text every line reporting it holds (its message).
    pub line: &'static str,
    /// What comes right before the address on that line.
    pub field: &'static str,
}

/// The replica daemon's API listener: `Replica ready listen=ADDR ...`.
pub const REPLICA_API: Reported = Reported {
    line: "Replica ready",
    field: " listen=",
};

/// An NBD server's TCP listener (the primary's, or the replica daemon's for failed-over
/// disks): `listening listener=tcp:ADDR`, with ` (TLS ...)` after it if set.
pub const NBD_TCP: Reported = Reported {
    line: "listening",
    field: " listener=tcp:",
};

/// The Prometheus endpoint of either daemon: `Serving metrics at /metrics local_addr=ADDR`.
pub const METRICS: Reported = Reported {
    line: "Serving metrics at /metrics",
    field: " local_addr=",
};

/// The address `what` reports in the latest run logged in `log`, if logged yet.
pub fn reported_address(log: &str, what: Reported) -> Option<SocketAddr> {
    let latest_run = log.rfind(START_MARKER).map_or(log, |at| &log[at..]);
    latest_run
        .lines()
        .rev()
        .filter(|line| line.contains(what.line))
        .find_map(|line| {
            let value = &line[line.find(what.field)? + what.field.len()..];
            let end = value.find(char::is_whitespace).unwrap_or(value.len());
            value[..end].parse().ok()
        })
}

/// Waits until the latest run in the log `read` returns reports `what`; panics after
/// 20 s with the log's tail, naming `daemon`.
pub fn wait_reported_address(
    daemon: &str,
    what: Reported,
    read: impl Fn() -> String,
) -> SocketAddr {
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        let log = read();
        if let Some(address) = reported_address(&log, what) {
            return address;
        }
        assert!(
            Instant::now() < deadline,
            "{daemon} logged no `{}` line with `{}ADDRESS` in {REPORT_TIMEOUT:?} (is BLKREP_LOG hiding info lines?)\n{}",
            what.line,
            what.field.trim_start(),
            tail(&log, 40)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
======== harness: start #1 ========
2026-01-01T00:00:00.000001Z  INFO blkrep::replica_daemon: Replica ready listen=127.0.0.1:40001 metrics=off control=/tmp/r/replica.ctl
2026-01-01T00:00:00.000002Z  INFO nbd_shim::server::listener: listening listener=unix:/tmp/r/nbd.sock
======== harness: start #2 ========
2026-01-01T00:00:01.000001Z  INFO nbd_shim::server::listener: listening listener=unix:/tmp/r/nbd.sock
2026-01-01T00:00:01.000002Z  INFO nbd_shim::server::listener: listening listener=tcp:127.0.0.1:40002 (TLS required)
2026-01-01T00:00:01.000003Z  INFO blkrep::metrics: Serving metrics at /metrics local_addr=127.0.0.1:40003
";

    #[test]
    fn reads_the_latest_run_only() {
        let port = |what| reported_address(LOG, what).map(|a| a.port());
        assert_eq!(port(NBD_TCP), Some(40002));
        assert_eq!(port(METRICS), Some(40003));
        // Logged by the first run only: not the latest run's address.
        assert_eq!(port(REPLICA_API), None);
        let first_run = &LOG[..LOG.find("======== harness: start #2").expect("second run")];
        assert_eq!(
            reported_address(first_run, REPLICA_API).map(|a| a.port()),
            Some(40001)
        );
    }
}
