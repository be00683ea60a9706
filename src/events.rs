//! The event log: health changes, resyncs, suspensions, refusals and failovers as
//! structured events, one JSON object per line, for admins and their log shippers.
//!
//! Contract: any crate emits an event as a tracing event with target [`TARGET`] and
//! the fields `event` (a snake_case name), `group` (when it concerns one) and
//! `reason`, plus any others. Every such event goes to the daemon's log like any
//! other line (stderr, so journald under systemd), and, when the configuration names
//! an `event_log` file, [`EventLayer`] appends it there as
//! `{"time": RFC 3339, "event": ..., "group": ..., "reason": ..., "message": ...}`
//! whatever `BLKREP_LOG` filters. A line is written with one `write` on a file
//! opened for appending, so lines of concurrent events never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use serde_json::{Map, Value};
use thiserror::Error;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The tracing target of events.
pub const TARGET: &str = "blkrep_event";

/// The file events go to, once the daemon opened it.
static FILE: OnceLock<Mutex<File>> = OnceLock::new();

/// Why the event log cannot be used.
#[derive(Debug, Error)]
pub enum EventLogError {
    /// The file (or its directory) cannot be created or opened.
    #[error("Cannot open the event log {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A daemon opens one event log, once.
    #[error("The event log is already open")]
    AlreadyOpen,
}

/// Opens `path` for appending (creating it, mode 0640, and its directory) and sends
/// every later event there.
pub fn open(path: &Path) -> Result<(), EventLogError> {
    let failed = |source| EventLogError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(failed)?;
    FILE.set(Mutex::new(file))
        .map_err(|_| EventLogError::AlreadyOpen)
}

/// Writes events to the file [`open`] opened; a layer of the daemon's subscriber.
#[derive(Debug, Default)]
pub struct EventLayer;

impl<S: Subscriber> Layer<S> for EventLayer {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let Some(file) = FILE.get() else {
            return;
        };
        let mut line = event_line(event, SystemTime::now());
        line.push('\n');
        let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
        // Nowhere to report a failure but the log, which has this event already.
        let _ = file.write_all(line.as_bytes());
    }
}

/// The JSON line of `event`, without its newline.
fn event_line(event: &Event<'_>, at: SystemTime) -> String {
    let mut fields = Fields(Map::new());
    fields.0.insert(
        "time".into(),
        Value::String(humantime::format_rfc3339_millis(at).to_string()),
    );
    event.record(&mut fields);
    for required in ["event", "group", "reason"] {
        fields.0.entry(required).or_insert(Value::Null);
    }
    Value::Object(fields.0).to_string()
}

/// An event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// Collects the lines [`event_line`] makes of events with the event target.
    #[derive(Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Lines {
        fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
            if event.metadata().target() == TARGET {
                let line = event_line(event, SystemTime::UNIX_EPOCH);
                self.0.lock().expect("lines").push(line);
            }
        }
    }

    #[test]
    fn events_become_json_lines_with_time_event_group_and_reason() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Lines(Arc::clone(&lines)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "blkrep_event", event = "replication_suspended", group = %"vm1", reason = %"Unauthenticated: \"who?\"", cycle = 7u64, "Replication suspended");
            tracing::info!(target: "blkrep_event", event = "failover", "No group, no reason");
            tracing::info!(group = "vm1", "An ordinary line is not an event");
        });
        let lines = lines.lock().expect("lines");
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first: Value = serde_json::from_str(&lines[0]).expect("JSON");
        assert_eq!(first["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(first["event"], "replication_suspended");
        assert_eq!(first["group"], "vm1");
        assert_eq!(first["reason"], "Unauthenticated: \"who?\"");
        assert_eq!(first["cycle"], 7);
        assert_eq!(first["message"], "Replication suspended");
        let second: Value = serde_json::from_str(&lines[1]).expect("JSON");
        assert_eq!(second["event"], "failover");
        assert!(second["group"].is_null() && second["reason"].is_null());
    }

    #[test]
    fn open_creates_the_directory_and_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log/events.jsonl");
        // The test process has no event log of its own; the one opened here is it.
        open(&path).expect("open");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077 & !0o040, 0, "{mode:o}");
        assert!(matches!(open(&path), Err(EventLogError::AlreadyOpen)));
        let subscriber = tracing_subscriber::registry().with(EventLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "blkrep_event", event = "resync_started", group = "vm1", reason = "test", "Resync starts");
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let event: Value = serde_json::from_str(text.trim_end()).expect("one JSON line");
        assert_eq!(event["event"], "resync_started");
    }
}
