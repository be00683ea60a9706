//! `blkrep replica`: the replica daemon and its status command.
//!
//! `blkrep replica run --config F` serves the replica API ([`replica::server`]) until
//! SIGTERM or SIGINT, then stops accepting, lets the applier finish its current
//! transfer and removes its control socket. With `metrics` configured it also serves
//! Prometheus metrics ([`crate::metrics`]).
//!
//! Control API: a unix socket (mode 0600, so only the daemon's user and root) speaking
//! one JSON request line and one JSON response line per connection, in the envelope of
//! [`crate::control::Response`]. The one request, `{"op":"status"}`, answers the list
//! of [`ReplicaInfo`] of every storage.

pub mod config;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use nix::sys::signal::{SigSet, Signal};
use replica::server::{ReplicaServer, ServerError, ServerHandle, Transport};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use wire::api::ReplicaInfo;

use crate::control::{self, ControlError};
use crate::metrics::{MetricsError, MetricsText};
use config::ReplicaConfig;

/// How long a status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an import may take: it reads and stores the whole initial copy.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `blkrep replica ...`
#[derive(Debug, clap::Subcommand)]
pub enum ReplicaCommand {
    /// Run the replica daemon: receive replicas from authorised primaries and apply
    /// them (SIGTERM/SIGINT: clean shutdown).
    Run {
        /// The replica's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Check the configuration (TLS material or key file included) and exit.
        #[arg(long)]
        check: bool,
    },
    /// Show the running replica daemon's replicas.
    Status {
        /// The replica's configuration (its control socket is read from it).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The replica daemon's control socket [default: /run/blkrep/replica.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Import the initial copy a primary exported to external media
    /// (`blkrep replication export`) into its replica; replication then resumes.
    Import {
        /// The replica's configuration (its control socket is read from it).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The replica daemon's control socket [default: /run/blkrep/replica.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The group's export directory on the media.
        dir: PathBuf,
    },
    /// Pause replication into a replica: transfers are refused and the primary
    /// retries every interval (its health turns Warning), until `resume`.
    Pause(OneReplica),
    /// Resume replication into a replica paused on this side.
    Resume(OneReplica),
    /// Place an existing copy of a group's disks (a restored backup, an old replica)
    /// on this replica server, so that the primary's initial replication compares
    /// blocks and sends only those that differ (`initial_replication = "existing"`).
    Seed {
        /// The replica's configuration (the trust group's storage is read from it).
        #[arg(long, short)]
        config: PathBuf,
        /// The trust group of the primary that will claim the copy.
        #[arg(long)]
        trust_group: String,
        /// The group's name on the primary.
        #[arg(long)]
        name: String,
        /// A disk of the group, in group order: `NAME=IMAGE` (raw image).
        #[arg(long = "disk", required = true, value_name = "NAME=IMAGE")]
        disks: Vec<String>,
        /// Move the images into the storage (same filesystem) instead of copying them.
        #[arg(long = "move")]
        move_images: bool,
    },
}

/// One replica of the running daemon, for `pause` and `resume`.
#[derive(Debug, clap::Args)]
pub struct OneReplica {
    /// The replica's configuration (its control socket is read from it).
    #[arg(long, short, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The replica daemon's control socket [default: /run/blkrep/replica.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The replica (the group's name).
    #[arg(long)]
    name: String,
    /// Its trust group, when several have a replica of that name.
    #[arg(long)]
    trust_group: Option<String>,
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Every replica's [`ReplicaInfo`].
    Status,
    /// Import an initial copy from external media.
    Import {
        /// The export directory (DIR/<group> of `blkrep replication export`).
        dir: PathBuf,
    },
    /// Pause or resume replication into a replica.
    SetPaused {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Pause (true) or resume (false).
        paused: bool,
    },
}

/// Errors of the replica daemon and of talking to it.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The replica server cannot start.
    #[error("Cannot start the replica server")]
    Server(#[from] ServerError),
    /// The metrics endpoint cannot start.
    #[error("Cannot start the metrics endpoint")]
    Metrics(#[from] MetricsError),
    /// Another daemon answers on the control socket.
    #[error("Another blkrep replica is running with control socket {0}")]
    AlreadyRunning(PathBuf),
    /// The control socket cannot be set up.
    #[error("Cannot listen on control socket {path}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Threads or signals cannot be set up.
    #[error("Cannot set up the daemon")]
    Setup(#[source] std::io::Error),
    /// Talking to the daemon failed.
    #[error(transparent)]
    Talk(#[from] ControlError),
    /// A seed request is not possible.
    #[error("{0}")]
    Seed(String),
    /// Seeding failed.
    #[error("Cannot seed the existing copy")]
    Store(#[from] replica::store::StoreError),
}

/// Runs `blkrep replica ...`; `init_logging` is called before a daemon starts.
pub fn main(command: ReplicaCommand, init_logging: impl FnOnce()) -> anyhow::Result<()> {
    let pausing = matches!(command, ReplicaCommand::Pause { .. });
    match command {
        ReplicaCommand::Run { config, check } => {
            let config = ReplicaConfig::load(&config)?;
            if check {
                let transport = match config.transport {
                    Transport::Tls(_) => "HTTPS with client certificates",
                    Transport::PlainWithPsk { .. } => {
                        "PLAIN HTTP with a pre-shared key (isolated labs only)"
                    }
                };
                println!(
                    "Configuration is valid: {} authorization entr{}, {transport}",
                    config.authorization.len(),
                    if config.authorization.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    }
                );
                return Ok(());
            }
            init_logging();
            run(&config)?;
        }
        ReplicaCommand::Pause(target) | ReplicaCommand::Resume(target) => {
            let paused = pausing;
            let OneReplica {
                config,
                socket,
                name,
                trust_group,
            } = target;
            let socket = control_socket(socket, config)?;
            let request = Request::SetPaused {
                name: name.clone(),
                trust_group,
                paused,
            };
            call(&socket, &request, STATUS_TIMEOUT)?;
            println!(
                "Replication into {name} {}",
                if paused {
                    "is paused on the replica side; the primary retries every interval"
                } else {
                    "resumes"
                }
            );
        }
        ReplicaCommand::Import {
            config,
            socket,
            dir,
        } => {
            let socket = control_socket(socket, config)?;
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("Cannot resolve {}", dir.display()))?;
            let value = call(&socket, &Request::Import { dir }, IMPORT_TIMEOUT)?;
            println!(
                "Imported {} transfer(s) into replica {}; cycles from the primary are accepted again",
                value["imported"],
                value["replica"]["name"].as_str().unwrap_or("?")
            );
        }
        ReplicaCommand::Status {
            config,
            socket,
            json,
        } => {
            let socket = control_socket(socket, config)?;
            let value = call(&socket, &Request::Status, STATUS_TIMEOUT)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let replicas: Vec<ReplicaInfo> =
                    serde_json::from_value(value).context("Unreadable status report")?;
                print!("{}", render_status(&replicas, unix_now()));
            }
        }
        ReplicaCommand::Seed {
            config,
            trust_group,
            name,
            disks,
            move_images,
        } => {
            let config = ReplicaConfig::load(&config)?;
            let dir = seed(&config, &trust_group, &name, &disks, move_images)?;
            println!(
                "Existing copy of {name} placed in {}; enable replication on the primary with initial_replication = \"existing\" to claim it",
                dir.display()
            );
        }
    }
    Ok(())
}

/// `blkrep replica seed`: makes the images an unclaimed replica in the trust group's
/// storage. Works on the storage directly; a running daemon sees the replica when a
/// primary enables it.
fn seed(
    config: &ReplicaConfig,
    trust_group: &str,
    name: &str,
    disks: &[String],
    move_images: bool,
) -> Result<PathBuf, DaemonError> {
    if !wire::api::valid_name(name) {
        return Err(DaemonError::Seed(format!(
            "{name:?} is not a valid group name (1 to 64 of A-Z a-z 0-9 . _ -)"
        )));
    }
    let mut storages: Vec<&Path> = config
        .authorization
        .iter()
        .filter(|entry| entry.trust_group == trust_group)
        .map(|entry| entry.storage.as_path())
        .collect();
    storages.dedup();
    let storage = match storages.as_slice() {
        [storage] => *storage,
        [] => {
            return Err(DaemonError::Seed(format!(
                "No [[authorization]] entry has trust_group {trust_group:?}"
            )))
        }
        _ => {
            return Err(DaemonError::Seed(format!(
                "Trust group {trust_group:?} has several storages; give each its own trust group"
            )))
        }
    };
    let mut images = Vec::new();
    for disk in disks {
        let Some((disk_name, image)) = disk.split_once('=') else {
            return Err(DaemonError::Seed(format!(
                "--disk {disk:?} is not NAME=IMAGE"
            )));
        };
        if !wire::api::valid_name(disk_name) {
            return Err(DaemonError::Seed(format!(
                "{disk_name:?} is not a valid disk name"
            )));
        }
        images.push((disk_name.to_string(), PathBuf::from(image)));
    }
    std::fs::create_dir_all(storage).map_err(|e| {
        DaemonError::Seed(format!("Cannot create storage {}: {e}", storage.display()))
    })?;
    let dir = storage.join(name);
    replica::store::Replica::seed(&dir, name, trust_group, &images, move_images)?;
    Ok(dir)
}

/// The control socket given, or the configuration's, or the default.
fn control_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(socket), _) => socket,
        (None, Some(config)) => config::control_socket(&config)?,
        (None, None) => PathBuf::from(config::DEFAULT_CONTROL_SOCKET),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signals that stop the daemon. Blocked in every thread (set before any is spawned)
/// and taken synchronously by the main thread.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Runs the replica daemon until SIGTERM or SIGINT.
pub fn run(config: &ReplicaConfig) -> Result<(), DaemonError> {
    let signals = stop_signals();
    signals
        .thread_block()
        .map_err(|errno| DaemonError::Setup(errno.into()))?;
    let control = bind_control(&config.control_socket)?;
    let result = serve(config, control, &signals);
    let _ = std::fs::remove_file(&config.control_socket);
    result
}

fn serve(
    config: &ReplicaConfig,
    control: UnixListener,
    signals: &SigSet,
) -> Result<(), DaemonError> {
    let mut server = ReplicaServer::start(config.settings())?;
    let metrics = match config.metrics {
        Some(listen) => {
            let handle = server.handle();
            Some(crate::metrics::serve(
                listen,
                Arc::new(move || render_metrics(&handle.replicas())),
            )?)
        }
        None => None,
    };
    spawn_control(control, server.handle())?;
    let metrics_addr = metrics
        .as_ref()
        .map_or_else(|| "off".to_string(), |m| m.local_addr().to_string());
    info!(
        listen = %server.local_addr(),
        metrics = %metrics_addr,
        control = %config.control_socket.display(),
        "Replica ready"
    );
    let signal = signals
        .wait()
        .map_err(|errno| DaemonError::Setup(errno.into()))?;
    info!(?signal, "Shutting down");
    drop(metrics);
    server.shutdown();
    info!("Replica server stopped");
    Ok(())
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    let control_error = |source| DaemonError::Control {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
        }
        // Left by a daemon that did not stop cleanly.
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener = UnixListener::bind(path).map_err(control_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(control_error)?;
    Ok(listener)
}

fn spawn_control(listener: UnixListener, server: ServerHandle) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let server = server.clone();
                // A slow client must not hold up the next one.
                let spawned = std::thread::Builder::new()
                    .name("control-request".into())
                    .spawn(move || {
                        if let Err(error) = serve_control(&stream, &server) {
                            warn!(%error, "Control request failed");
                        }
                    });
                if let Err(error) = spawned {
                    warn!(%error, "Cannot serve a control request");
                }
            }
        })
        .map(drop)
        .map_err(DaemonError::Setup)
}

fn serve_control(stream: &UnixStream, server: &ServerHandle) -> std::io::Result<()> {
    control::answer(stream, |request: Request| match request {
        Request::Status => {
            serde_json::to_value(server.replicas()).map_err(|error| error.to_string())
        }
        Request::SetPaused {
            name,
            trust_group,
            paused,
        } => {
            let info = server
                .set_paused(&name, trust_group.as_deref(), paused)
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        Request::Import { dir } => {
            let (info, imported) = server
                .import(&dir)
                .map_err(|error| wire::error_chain(&error))?;
            Ok(serde_json::json!({ "replica": info, "imported": imported }))
        }
    })
}

/// Sends one request to the replica daemon at `socket` and returns the result.
pub fn call(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    control::call(socket, "blkrep replica run", request, timeout)
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// The status as text: one line per replica.
pub fn render_status(replicas: &[ReplicaInfo], now_unix: u64) -> String {
    if replicas.is_empty() {
        return "No replicas\n".into();
    }
    let mut sorted: Vec<&ReplicaInfo> = replicas.iter().collect();
    sorted.sort_by(|a, b| (&a.trust_group, &a.name).cmp(&(&b.trust_group, &b.name)));
    let mut out = String::new();
    for info in sorted {
        let applied = match (info.last_applied_cycle, info.last_applied_unix) {
            (Some(cycle), Some(at)) => {
                let age = Duration::from_secs(now_unix.saturating_sub(at));
                format!("cycle {cycle} ({} ago)", humantime::format_duration(age))
            }
            (Some(cycle), None) => format!("cycle {cycle}"),
            (None, _) => "none".into(),
        };
        out.push_str(&format!(
            "{}: trust group {}, consistent {}, last applied {applied}, pending transfers {}, paused {}\n",
            info.name,
            info.trust_group,
            yes_no(info.consistent),
            info.pending_transfers,
            yes_no(info.paused),
        ));
        if info.awaiting_import {
            out.push_str("  waiting for its initial copy: run `blkrep replica import DIR` with the exported directory\n");
        }
    }
    out
}

/// The Prometheus metrics of `replicas`.
pub fn render_metrics(replicas: &[ReplicaInfo]) -> String {
    let mut text = MetricsText::new();
    let flag = |value: bool| if value { 1.0 } else { 0.0 };
    for info in replicas {
        let labels = [
            ("replica", info.name.as_str()),
            ("trust_group", info.trust_group.as_str()),
        ];
        text.gauge(
            "blkrep_replica_consistent",
            "Whether the replica's disks hold a state the primary had (1) or not (0).",
            &labels,
            flag(info.consistent),
        );
        if let Some(cycle) = info.last_applied_cycle {
            text.gauge(
                "blkrep_replica_last_applied_cycle",
                "Newest cycle applied to the replica's disks.",
                &labels,
                cycle as f64,
            );
        }
        if let Some(at) = info.last_applied_unix {
            text.gauge(
                "blkrep_replica_last_applied_timestamp_seconds",
                "When the newest cycle was applied, in seconds since the epoch.",
                &labels,
                at as f64,
            );
        }
        text.gauge(
            "blkrep_replica_pending_transfers",
            "Transfers received and not yet applied.",
            &labels,
            f64::from(info.pending_transfers),
        );
        text.gauge(
            "blkrep_replica_paused",
            "Whether replication is paused on the replica side (1) or not (0).",
            &labels,
            flag(info.paused),
        );
        text.counter(
            "blkrep_replica_applied_transfers_total",
            "Transfers applied to the replica's disks.",
            &labels,
            info.applied_transfers as f64,
        );
        text.counter(
            "blkrep_replica_applied_bytes_total",
            "Data bytes written to the replica's disks by applied transfers.",
            &labels,
            info.applied_bytes as f64,
        );
        text.counter(
            "blkrep_replica_apply_seconds_total",
            "Time spent applying transfers (the apply rate is applied bytes over this).",
            &labels,
            info.apply_micros as f64 / 1e6,
        );
        if let Some(micros) = info.last_apply_micros {
            text.gauge(
                "blkrep_replica_last_apply_seconds",
                "Time the latest transfer took to apply.",
                &labels,
                micros as f64 / 1e6,
            );
        }
    }
    text.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use wire::api::DiskInfo;

    fn info(name: &str, group: &str) -> ReplicaInfo {
        ReplicaInfo {
            name: name.into(),
            trust_group: group.into(),
            disks: vec![DiskInfo {
                name: "disk0".into(),
                size: 1 << 20,
            }],
            consistent: true,
            last_received_cycle: Some(8),
            last_applied_cycle: Some(7),
            last_applied_unix: Some(1_000),
            pending_transfers: 1,
            resync_epoch: None,
            paused: false,
            awaiting_import: false,
            applied_transfers: 3,
            applied_bytes: 3 << 20,
            apply_micros: 1_500_000,
            last_apply_micros: Some(250_000),
        }
    }

    #[test]
    fn status_lines() {
        let mut fresh = info("vm2", "dc1");
        fresh.consistent = false;
        fresh.last_applied_cycle = None;
        fresh.last_applied_unix = None;
        fresh.paused = true;
        let text = render_status(&[fresh, info("vm1", "dc1")], 1_000 + 3_725);
        assert_eq!(
            text,
            "vm1: trust group dc1, consistent yes, last applied cycle 7 (1h 2m 5s ago), pending transfers 1, paused no\n\
             vm2: trust group dc1, consistent no, last applied none, pending transfers 1, paused yes\n"
        );
        assert_eq!(render_status(&[], 0), "No replicas\n");
    }

    #[test]
    fn metrics_per_replica() {
        let mut other = info("vm\"1", "dc2");
        other.last_applied_cycle = None;
        other.last_applied_unix = None;
        let text = render_metrics(&[info("vm1", "dc1"), other]);
        for line in [
            "# TYPE blkrep_replica_consistent gauge",
            "blkrep_replica_consistent{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_consistent{replica=\"vm\\\"1\",trust_group=\"dc2\"} 1",
            "blkrep_replica_last_applied_cycle{replica=\"vm1\",trust_group=\"dc1\"} 7",
            "blkrep_replica_last_applied_timestamp_seconds{replica=\"vm1\",trust_group=\"dc1\"} 1000",
            "blkrep_replica_pending_transfers{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_paused{replica=\"vm1\",trust_group=\"dc1\"} 0",
            "blkrep_replica_applied_bytes_total{replica=\"vm1\",trust_group=\"dc1\"} 3145728",
            "blkrep_replica_apply_seconds_total{replica=\"vm1\",trust_group=\"dc1\"} 1.5",
            "blkrep_replica_last_apply_seconds{replica=\"vm1\",trust_group=\"dc1\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("last_applied_cycle{replica=\"vm\\\"1\""),
            "{text}"
        );
        assert_eq!(text.matches("# HELP blkrep_replica_paused ").count(), 1);
    }

    #[test]
    fn control_socket_serves_the_servers_status() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("dc1");
        let mut server = ReplicaServer::start(replica::server::ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            transport: Transport::PlainWithPsk {
                psk: "0123456789abcdef".into(),
            },
            authorization: vec![replica::server::AuthEntry {
                primary: None,
                storage: storage.clone(),
                trust_group: "dc1".into(),
            }],
            reserve: 0,
        })
        .unwrap();
        let state = replica::store::ReplicaState::new(
            "vm1".into(),
            "dc1".into(),
            7,
            "host1".into(),
            "host1.example.com".into(),
            vec![DiskInfo {
                name: "disk0".into(),
                size: 1 << 20,
            }],
        );
        replica::store::Replica::create(&storage.join("vm1"), state, 0).unwrap();

        let socket = dir.path().join("run/ctl.sock");
        let listener = bind_control(&socket).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind_control(&socket),
            Err(DaemonError::AlreadyRunning(_))
        ));
        spawn_control(listener, server.handle()).unwrap();
        let value = call(&socket, &Request::Status, Duration::from_secs(10)).unwrap();
        let replicas: Vec<ReplicaInfo> = serde_json::from_value(value).unwrap();
        assert_eq!(replicas.len(), 1);
        assert_eq!(
            (replicas[0].name.as_str(), replicas[0].consistent),
            ("vm1", false)
        );
        assert!(render_metrics(&server.replicas())
            .contains("blkrep_replica_consistent{replica=\"vm1\",trust_group=\"dc1\"} 0\n"));

        let mut raw = UnixStream::connect(&socket).unwrap();
        raw.write_all(b"{\"op\":\"reboot\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(raw).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("{\"ok\":false,\"error\":\"Bad request: unknown variant"),
            "{line}"
        );

        server.shutdown();
        let error = call(
            &dir.path().join("none"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("is `blkrep replica run` running?"),
            "{error}"
        );
    }
}
