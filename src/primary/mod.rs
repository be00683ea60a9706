//! The primary daemon: opens every group of its configuration through the group
//! runtime ([`crate::groups`]), serves every disk over NBD, and answers the control
//! API. SIGTERM and SIGINT shut it down cleanly: listeners close, in-flight requests
//! finish and are answered, shippers stop, rings and images are synced and the rings
//! marked clean.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use nbd_shim::{Server, ServerConfig};
use shipper::remote::Throttle;
use thiserror::Error;
use tracing::info;

use crate::config::PrimaryConfig;
use crate::control::{self, ControlRequest};
use crate::daemon::control_socket::{self, SocketError};
use crate::daemon::StopSignals;
use crate::dashboard::{DaemonKind, Dashboard, Figures};
use crate::groups::control::CommandError;
use crate::groups::open::ExportNaming;
use crate::groups::{self, GroupError, RunningGroup, SharedReplication};
use crate::status::StatusReport;

/// Errors of the primary daemon.
#[derive(Debug, Error)]
pub enum PrimaryError {
    /// A group cannot be opened.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The control socket or the NBD unix socket cannot be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The metrics address is not an address.
    #[error("Invalid metrics address {0:?}")]
    MetricsAddress(String),
    /// The NBD server refused an export or a listener.
    #[error("NBD server")]
    Server(#[from] nbd_shim::server::ServerError),
    /// The metrics endpoint cannot start.
    #[error("Cannot serve metrics: {0}")]
    Metrics(String),
    /// Signals cannot be set up.
    #[error("Cannot set up the daemon")]
    Setup(#[source] std::io::Error),
}

/// The state the control API reads.
struct Daemon {
    groups: Vec<RunningGroup>,
    server: Server,
    started_unix: u64,
}

impl Daemon {
    /// The group named `name`.
    fn group(&self, name: &str) -> Result<&RunningGroup, CommandError> {
        self.groups
            .iter()
            .find(|group| group.name() == name)
            .ok_or_else(|| CommandError::NoGroup(name.to_string()))
    }
}

/// Runs the primary until SIGTERM or SIGINT.
pub fn run(config: PrimaryConfig) -> Result<(), PrimaryError> {
    crate::daemon::process::harden_process();
    let signals = StopSignals::block().map_err(PrimaryError::Setup)?;
    let control = control_socket::bind(control::PRIMARY, &config.control_socket)?;
    let shared = SharedReplication::new(
        config
            .replication
            .bandwidth_limit
            .map(|limit| Arc::new(Throttle::new(limit.0))),
        config.replication.host_name.clone(),
    );
    let mut groups = Vec::new();
    let mut exports = Vec::new();
    for group in &config.groups {
        let (running, devices) = groups::open_group(group, &shared, ExportNaming::Disk)?;
        for (export, device) in running.exports().zip(devices) {
            exports.push((export.to_string(), group.name.clone(), device));
        }
        groups.push(running);
    }
    // Exports are added after every group opened, so no client writes before recovery.
    let server = Server::new(ServerConfig::default());
    for (name, group, device) in exports {
        server.add_export(&name, Some(format!("blkrep group {group}")), device)?;
    }
    for warning in &config.nbd.access.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(path) = &config.nbd.unix_socket {
        control_socket::remove_stale("unix socket", path)?;
        server.listen_unix_with(path, config.nbd.access.socket)?;
    }
    if let Some(address) = &config.nbd.tcp {
        server.listen_tcp_tls(address.as_str(), config.nbd.access.tls.clone())?;
    }
    let daemon = Arc::new(Daemon {
        groups,
        server,
        started_unix: base::time::unix_secs(),
    });
    let answering = Arc::clone(&daemon);
    control_socket::spawn(control, move |stream: &UnixStream| {
        control::answer(stream, |request: ControlRequest| {
            handle(&request, &answering)
        })
    })?;
    let metrics = match &config.metrics {
        None => None,
        Some(address) => {
            let address = address
                .parse()
                .map_err(|_| PrimaryError::MetricsAddress(address.clone()))?;
            let source = Arc::clone(&daemon);
            let sampled = Arc::clone(&daemon);
            let dashboard = Arc::new(
                Dashboard::start(
                    DaemonKind::Primary,
                    Arc::new(move || Figures {
                        groups: status(&sampled).groups,
                        replicas: Vec::new(),
                    }),
                )
                .map_err(|error| PrimaryError::Metrics(shipper::error_chain(&error)))?,
            );
            Some(
                crate::metrics::serve(
                    address,
                    Arc::new(move || render_metrics(&source)),
                    Some(Arc::new(move || dashboard.page())),
                )
                .map_err(|error| PrimaryError::Metrics(shipper::error_chain(&error)))?,
            )
        }
    };
    let metrics_addr = metrics
        .as_ref()
        .map_or_else(|| "off".to_string(), |m| m.local_addr().to_string());
    info!(
        groups = daemon.groups.len(),
        unix = ?config.nbd.unix_socket,
        tcp = ?config.nbd.tcp,
        control = %config.control_socket.display(),
        metrics = %metrics_addr,
        "Primary ready"
    );
    let signal = signals.wait().map_err(PrimaryError::Setup)?;
    info!(?signal, "Shutting down");
    shutdown(&daemon);
    let _ = std::fs::remove_file(&config.control_socket);
    if let Some(path) = &config.nbd.unix_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn shutdown(daemon: &Daemon) {
    daemon.server.shutdown();
    for group in &daemon.groups {
        group.stop_shipper();
    }
    for group in &daemon.groups {
        group.close();
    }
}

/// Answers one control request; errors become text here, once, with their causes.
fn handle(request: &ControlRequest, daemon: &Daemon) -> Result<serde_json::Value, String> {
    let answer = match request {
        ControlRequest::Status => serde_json::to_value(status(daemon)),
        ControlRequest::GroupStatus { group } => {
            serde_json::to_value(groups::report::group_report(
                daemon.group(group).map_err(|error| error.to_text())?,
                &daemon.server,
            ))
        }
        ControlRequest::CloseCycle {
            group,
            timeout_secs,
        } => serde_json::to_value(
            daemon
                .group(group)
                .and_then(|group| {
                    groups::control::close_cycle(group, Duration::from_secs(*timeout_secs))
                })
                .map_err(|error| error.to_text())?,
        ),
        ControlRequest::Replication { group, action } => serde_json::to_value(
            daemon
                .group(group)
                .and_then(|group| groups::control::replication(group, &daemon.server, action))
                .map_err(|error| error.to_text())?,
        ),
    };
    answer.map_err(|error| error.to_string())
}

fn status(daemon: &Daemon) -> StatusReport {
    StatusReport {
        version: 1,
        pid: std::process::id(),
        started_unix: daemon.started_unix,
        groups: daemon
            .groups
            .iter()
            .map(|group| groups::report::group_report(group, &daemon.server))
            .collect(),
    }
}

/// The Prometheus text of the daemon: per group its ring and replication, per disk
/// its NBD traffic.
fn render_metrics(daemon: &Daemon) -> String {
    let mut text = crate::metrics::MetricsText::new();
    for group in &daemon.groups {
        groups::metrics::group_metrics(&mut text, group, &daemon.server);
    }
    text.finish()
}
