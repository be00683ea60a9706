//! The primary's control API: a unix socket speaking one JSON request line and one
//! JSON response line per connection. Only local users with access to the socket (it
//! is created mode 0600) can use it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 64 * 1024;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The daemon's status.
    Status,
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
}

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

/// Errors talking to the daemon.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Nobody listens on the socket.
    #[error("Cannot reach the primary daemon at {path} (is `blkrep primary` running?)")]
    Connect {
        /// The socket.
        path: String,
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

/// Sends one request and returns the result.
pub fn call(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream.take_limited()).read_line(&mut answer)?;
    let response: Response = serde_json::from_str(&answer)?;
    if response.ok {
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused(response.error.unwrap_or_else(|| {
            "The daemon refused without a reason".into()
        })))
    }
}

trait TakeLimited: std::io::Read + Sized {
    /// Bounds what a peer can make us buffer.
    fn take_limited(self) -> std::io::Take<Self> {
        self.take(16 << 20)
    }
}

impl TakeLimited for UnixStream {}
