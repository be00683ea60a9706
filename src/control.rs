//! The control protocol of both daemons: a unix socket speaking one JSON request line
//! and one JSON response line per connection, in the [`Response`] envelope. Only
//! local users with access to the socket (it is created mode 0600) can use it.
//!
//! This module holds the envelope, the client side ([`call`], [`call_typed`]), the
//! primary's requests ([`ControlRequest`]) and the typed answers of the group
//! requests both daemons take ([`CycleClosed`], [`ActionDone`]); the replica
//! daemon's own requests are in `replica_daemon::protocol`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The command that runs the primary daemon, for errors when it is not running.
pub const PRIMARY: &str = "blkrep primary";

/// The command that runs the replica daemon, for errors when it is not running.
pub const REPLICA: &str = "blkrep replica run";

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// A request on the primary's control socket; its group requests (`group_status`,
/// `close_cycle`, `replication`) have the same shape on the replica daemon's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The daemon's status.
    Status,
    /// One group's [`crate::status::GroupReport`].
    GroupStatus {
        /// The group.
        group: String,
    },
    /// Close the group's cycle now and wait until its consumer acknowledged it.
    CloseCycle {
        /// The group.
        group: String,
        /// How long to wait for delivery.
        timeout_secs: u64,
    },
    /// Change a group's replication.
    Replication {
        /// The group.
        group: String,
        /// What to do.
        action: ReplicationAction,
    },
    /// The figures of a group's deliveries over the last `since_secs` (a primary's
    /// group, or a replica daemon's live group). Answers a
    /// [`shipper::measure::Measurement`].
    Measure {
        /// The group.
        group: String,
        /// The window, in seconds back from now.
        since_secs: u64,
    },
    /// Read the configuration file again and apply its groups (primary only): see
    /// `primary::reload`. Answers a [`ReloadReport`].
    Reload {
        /// Delete the rings of the groups removed (by default they are kept, marked
        /// clean, so that adding the group back resumes where it stopped).
        #[serde(default)]
        delete_removed_rings: bool,
    },
}

/// What a reload did, group by group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Groups opened and exported.
    pub added: Vec<String>,
    /// Groups whose exports were closed and whose rings were marked clean.
    pub removed: Vec<String>,
    /// Rings deleted with their removed groups.
    #[serde(default)]
    pub deleted_rings: Vec<String>,
    /// Groups closed and opened again with their new settings.
    pub changed: Vec<String>,
    /// Groups left as they were.
    pub unchanged: Vec<String>,
    /// Groups that could not be added or changed, with why; a changed group that
    /// could not reopen runs on with its previous settings.
    pub failed: Vec<ReloadFailure>,
    /// Settings that changed in the file but only take effect at a restart.
    pub needs_restart: Vec<String>,
}

/// A group a reload could not apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadFailure {
    /// The group.
    pub group: String,
    /// Why, with causes.
    pub error: String,
}

/// What `blkrep replication` asks of a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ReplicationAction {
    /// Stop shipping; changes keep being tracked.
    Pause,
    /// Ship again; after a suspension, once its cause is fixed.
    Resume,
    /// Copy every block again.
    Resync,
    /// Stop replicating.
    Remove {
        /// Also delete the replica on the replica server.
        delete_replica: bool,
    },
    /// Replicate again after `remove` (a full initial replication).
    Enable {
        /// Not before this time (seconds since the epoch).
        start_after_unix: Option<u64>,
    },
    /// Planned failover to the replica.
    Failover {
        /// Even while NBD clients are connected.
        force: bool,
    },
    /// Write the initial copy to a directory, for external media.
    Export {
        /// The directory (the group's export goes to `DIR/<group>`).
        dir: std::path::PathBuf,
    },
}

/// The answer to [`ControlRequest::CloseCycle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleClosed {
    /// The cycle closed and acknowledged.
    pub cycle: u64,
}

/// The answer to [`ControlRequest::Replication`]: what happened, for the administrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionDone {
    /// What happened.
    pub message: String,
}

/// How long an export may take: it writes every allocated block of the group.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The answer, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors talking to a daemon.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Nobody listens on the socket.
    #[error("Cannot reach the daemon at {path} (is `{command}` running?)")]
    Connect {
        /// The socket.
        path: String,
        /// The command that runs the daemon.
        command: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The exchange broke.
    #[error("Control connection failed")]
    Io(#[from] std::io::Error),
    /// The daemon answered something unreadable.
    #[error("Unreadable answer from the daemon")]
    Decode(#[from] serde_json::Error),
    /// The daemon refused.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the daemon run by `command` and decodes its answer as `T`,
/// the response type of that request.
pub fn call_typed<R: Serialize, T: DeserializeOwned>(
    socket: &Path,
    command: &'static str,
    request: &R,
    timeout: Duration,
) -> Result<T, ControlError> {
    Ok(serde_json::from_value(call(
        socket, command, request, timeout,
    )?)?)
}

/// Sends one request to the daemon run by `command` (for the error when it is not
/// running) and returns the result.
pub fn call<R: Serialize>(
    socket: &Path,
    command: &'static str,
    request: &R,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        command,
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    // Bounds what a daemon can make us buffer.
    BufReader::new(stream.take(16 << 20)).read_line(&mut answer)?;
    let response: Response = serde_json::from_str(&answer)?;
    if response.ok {
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused(response.error.unwrap_or_else(|| {
            "The daemon refused without a reason".into()
        })))
    }
}

/// Answers one request on `stream`: reads a line of at most [`MAX_REQUEST`] bytes
/// (10 s at most), parses it as `R`, and writes `handle`'s result as a [`Response`].
pub fn answer<R: DeserializeOwned>(
    stream: &UnixStream,
    handle: impl FnOnce(R) -> Result<serde_json::Value, String>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut line)?;
    let outcome = serde_json::from_str::<R>(&line)
        .map_err(|error| format!("Bad request: {error}"))
        .and_then(handle);
    let response = match outcome {
        Ok(result) => Response {
            ok: true,
            result: Some(result),
            error: None,
        },
        Err(message) => Response {
            ok: false,
            result: None,
            error: Some(message),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    let mut writer = stream;
    writer.write_all(&out)
}
