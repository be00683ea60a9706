//! The primary daemon: opens every group of its configuration through the group
//! runtime ([`crate::groups`]), serves every disk over NBD, and answers the control
//! API. SIGTERM and SIGINT shut it down cleanly: listeners close, in-flight requests
//! finish and are answered, shippers stop, rings and images are synced and the rings
//! marked clean.
//!
//! **Live groups.** SIGHUP, or `blkrep reload` on the control socket, reads the
//! configuration file again and applies its groups ([`reload`]) while every other
//! group keeps serving and shipping: a new group is opened and exported; a removed
//! group's exports close their connections (each answers what it received first),
//! its shipper stops and its ring is marked clean, and kept unless the reload asks to
//! delete it; a changed group is removed and added again, and reopened with its
//! previous settings if the new ones fail. A file that does not validate changes
//! nothing. One reload runs at a time.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base::sync::lock;
use nbd_shim::{Server, ServerConfig};
use shipper::error_chain;
use shipper::remote::Relationship;
use thiserror::Error;
use tracing::{error, info, warn};

use crate::config::{GroupConfig, PrimaryConfig};
use crate::control::{self, ControlRequest, ReloadFailure, ReloadReport};
use crate::daemon::activation::{Activated, ActivationError};
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
    /// The sockets the service manager passed cannot be used.
    #[error(transparent)]
    Activation(#[from] ActivationError),
}

mod reload;

/// How long a removed group's ring may stay in use by requests still running on
/// the control socket before it is reopened regardless (a changed group).
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The state the control API reads.
struct Daemon {
    groups: RwLock<Vec<Arc<RunningGroup>>>,
    server: Server,
    started_unix: u64,
    /// The configuration file a reload reads.
    config_path: PathBuf,
    /// The configuration the daemon started with (its daemon-wide settings apply).
    started: PrimaryConfig,
    shared: SharedReplication,
    /// Held for the whole of a reload.
    reloading: Mutex<()>,
}

impl Daemon {
    /// The group named `name`.
    fn group(&self, name: &str) -> Result<Arc<RunningGroup>, CommandError> {
        self.groups()
            .into_iter()
            .find(|group| group.name() == name)
            .ok_or_else(|| CommandError::NoGroup(name.to_string()))
    }

    /// The running groups, in the order they were opened.
    fn groups(&self) -> Vec<Arc<RunningGroup>> {
        self.groups
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Opens `config`'s group and exports its disks; on failure nothing of it stays.
    fn start_group(&self, config: &GroupConfig) -> Result<Arc<RunningGroup>, String> {
        let (running, devices) = groups::open_group(config, &self.shared, ExportNaming::Disk)
            .map_err(|error| error_chain(&error))?;
        let description = format!("blkrep group {}", config.name);
        let mut exported: Vec<String> = Vec::new();
        for (export, device) in running.exports().zip(devices) {
            if let Err(error) = self
                .server
                .add_export(export, Some(description.clone()), device)
            {
                for name in &exported {
                    self.server.remove_export(name);
                }
                running.stop_shipper();
                running.close();
                return Err(error_chain(&error));
            }
            exported.push(export.to_string());
        }
        Ok(Arc::new(running))
    }

    /// Closes `group`'s exports (after their connections answered what they
    /// received), stops its shipper, marks its ring clean, and waits until nothing
    /// else holds the group, so its ring is free.
    fn stop_group(&self, group: Arc<RunningGroup>) {
        for export in group.exports() {
            self.server.retire_export(export);
        }
        group.stop_shipper();
        group.close();
        let deadline = Instant::now() + RELEASE_WAIT;
        let mut group = group;
        loop {
            match Arc::try_unwrap(group) {
                Ok(alone) => {
                    drop(alone);
                    return;
                }
                Err(shared) if Instant::now() < deadline => {
                    group = shared;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(shared) => {
                    warn!(group = %shared.name(), "A removed group is still in use; its ring is released when that ends");
                    return;
                }
            }
        }
    }

    /// Takes the group called `name` out of the running list.
    fn take_group(&self, name: &str) -> Option<Arc<RunningGroup>> {
        let mut groups = self
            .groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = groups.iter().position(|group| group.name() == name)?;
        Some(groups.remove(index))
    }

    fn push_group(&self, group: Arc<RunningGroup>) {
        self.groups
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(group);
    }

    /// Reads the configuration file again and applies its groups (module docs).
    fn reload(&self, delete_removed_rings: bool) -> Result<ReloadReport, String> {
        let _one_at_a_time = lock(&self.reloading);
        let file = PrimaryConfig::load(&self.config_path).map_err(|error| {
            format!(
                "The configuration was not reloaded: {}",
                error_chain(&error)
            )
        })?;
        // Only the settings: a group held here could not release its ring.
        let running: Vec<GroupConfig> = self
            .groups()
            .iter()
            .map(|group| group.config().clone())
            .collect();
        let plan = reload::plan(&running, &file.groups);
        let mut report = ReloadReport {
            needs_restart: reload::settings_needing_restart(&self.started, &file),
            unchanged: plan.keep,
            ..ReloadReport::default()
        };
        for name in plan.remove {
            let Some(group) = self.take_group(&name) else {
                continue;
            };
            let ring = group.config().ring.clone();
            self.stop_group(group);
            info!(group = %name, "Group removed");
            if delete_removed_rings {
                match delete_ring(&ring) {
                    Ok(()) => report.deleted_rings.push(ring.display().to_string()),
                    Err(error) => report.failed.push(ReloadFailure {
                        group: name.clone(),
                        error: format!("Removed, but its ring could not be deleted: {error}"),
                    }),
                }
            }
            report.removed.push(name);
        }
        for new in plan.change {
            let Some(old) = self.take_group(&new.name) else {
                continue;
            };
            let previous = old.config().clone();
            self.stop_group(old);
            match self.start_group(&new) {
                Ok(group) => {
                    self.push_group(group);
                    info!(group = %new.name, "Group reopened with its new settings");
                    report.changed.push(new.name.clone());
                }
                Err(error) => {
                    let restored = self
                        .start_group(&previous)
                        .map(|group| self.push_group(group));
                    let error = match restored {
                        Ok(()) => format!("{error}; it runs on with its previous settings"),
                        Err(again) => {
                            error!(group = %new.name, error = %again, "A changed group could not reopen with its previous settings either");
                            format!("{error}; reopening it with its previous settings failed too: {again}")
                        }
                    };
                    warn!(group = %new.name, %error, "Group not changed");
                    report.failed.push(ReloadFailure {
                        group: new.name.clone(),
                        error,
                    });
                }
            }
        }
        for new in plan.add {
            match self.start_group(&new) {
                Ok(group) => {
                    self.push_group(group);
                    info!(group = %new.name, "Group added");
                    report.added.push(new.name.clone());
                }
                Err(error) => {
                    warn!(group = %new.name, %error, "Group not added");
                    report.failed.push(ReloadFailure {
                        group: new.name.clone(),
                        error,
                    });
                }
            }
        }
        for setting in &report.needs_restart {
            warn!(%setting, "Changed in the configuration file; it applies at the next restart");
        }
        Ok(report)
    }
}

/// Deletes a removed group's ring and its replication record.
fn delete_ring(ring: &Path) -> std::io::Result<()> {
    let not_found_is_fine = |result: std::io::Result<()>| match result {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    not_found_is_fine(std::fs::remove_file(Relationship::path_for_ring(ring)))?;
    not_found_is_fine(std::fs::remove_file(ring))
}

/// Runs the primary until SIGTERM or SIGINT; SIGHUP reloads its groups from
/// `config_path`.
pub fn run(config: PrimaryConfig, config_path: &Path) -> Result<(), PrimaryError> {
    crate::daemon::process::harden_process();
    config.replication.background_nice.apply();
    let signals = StopSignals::block_with_reload().map_err(PrimaryError::Setup)?;
    let control = control_socket::bind(control::PRIMARY, &config.control_socket)?;
    let shared = SharedReplication::new(
        config.replication.throttle(),
        config.replication.host_name.clone(),
    );
    let mut groups = Vec::new();
    let mut exports = Vec::new();
    for group in &config.groups {
        let (running, devices) = groups::open_group(group, &shared, ExportNaming::Disk)?;
        for (export, device) in running.exports().zip(devices) {
            exports.push((export.to_string(), group.name.clone(), device));
        }
        groups.push(Arc::new(running));
    }
    // Exports are added after every group opened, so no client writes before recovery.
    let server = Server::new(ServerConfig::default());
    for (name, group, device) in exports {
        server.add_export(&name, Some(format!("blkrep group {group}")), device)?;
    }
    for warning in &config.nbd.access.warnings {
        tracing::warn!("{warning}");
    }
    let mut activated = Activated::from_environment().map_err(PrimaryError::Activation)?;
    // A socket the service manager passed is its own: it stays when this process ends.
    let mut socket_is_ours = false;
    if let Some(path) = &config.nbd.unix_socket {
        if let Some(listener) = activated.take_unix(path) {
            info!(socket = %path.display(), "Serving the NBD socket the service manager passed");
            server.serve_unix_listener(listener)?;
        } else {
            control_socket::remove_stale("unix socket", path)?;
            server.listen_unix_with(path, config.nbd.access.socket)?;
            socket_is_ours = true;
        }
    }
    if let Some(address) = &config.nbd.tcp {
        let tls = config.nbd.access.tls.clone();
        match activated.take_tcp(address) {
            Some(listener) => {
                info!(%address, "Serving the NBD TCP socket the service manager passed");
                server.serve_tcp_listener(listener, tls)?;
            }
            None => {
                server.listen_tcp_tls(address.as_str(), tls)?;
            }
        }
    }
    activated.close_unused();
    let daemon = Arc::new(Daemon {
        groups: RwLock::new(groups),
        server,
        started_unix: base::time::unix_secs(),
        config_path: config_path.to_owned(),
        started: config.clone(),
        shared,
        reloading: Mutex::new(()),
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
                .map_err(|error| PrimaryError::Metrics(error_chain(&error)))?,
            );
            Some(
                crate::metrics::serve(
                    address,
                    Arc::new(move || render_metrics(&source)),
                    Some(Arc::new(move || dashboard.page())),
                )
                .map_err(|error| PrimaryError::Metrics(error_chain(&error)))?,
            )
        }
    };
    let metrics_addr = metrics
        .as_ref()
        .map_or_else(|| "off".to_string(), |m| m.local_addr().to_string());
    info!(
        groups = daemon.groups().len(),
        unix = ?config.nbd.unix_socket,
        tcp = ?config.nbd.tcp,
        control = %config.control_socket.display(),
        metrics = %metrics_addr,
        "Primary ready"
    );
    let notifier = crate::daemon::notify::ready(&config.control_socket);
    let signal = loop {
        let signal = signals.wait().map_err(PrimaryError::Setup)?;
        if !StopSignals::is_reload(signal) {
            break signal;
        }
        info!("SIGHUP: reloading the configuration");
        match daemon.reload(false) {
            Ok(report) => info!(
                added = ?report.added,
                removed = ?report.removed,
                changed = ?report.changed,
                failed = report.failed.len(),
                "Configuration reloaded"
            ),
            Err(error) => warn!(%error, "Reload refused"),
        }
    };
    info!(?signal, "Shutting down");
    notifier.stopping();
    shutdown(&daemon);
    let _ = std::fs::remove_file(&config.control_socket);
    if let (Some(path), true) = (&config.nbd.unix_socket, socket_is_ours) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn shutdown(daemon: &Daemon) {
    // A reload in progress finishes first.
    let _no_reload = lock(&daemon.reloading);
    daemon.server.shutdown();
    let groups = daemon.groups();
    for group in &groups {
        group.stop_shipper();
    }
    for group in &groups {
        group.close();
    }
}

/// Answers one control request; errors become text here, once, with their causes.
fn handle(request: &ControlRequest, daemon: &Daemon) -> Result<serde_json::Value, String> {
    let answer = match request {
        ControlRequest::Status => serde_json::to_value(status(daemon)),
        ControlRequest::GroupStatus { group } => {
            serde_json::to_value(groups::report::group_report(
                &*daemon.group(group).map_err(|error| error.to_text())?,
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
                    groups::control::close_cycle(&group, Duration::from_secs(*timeout_secs))
                })
                .map_err(|error| error.to_text())?,
        ),
        ControlRequest::Replication { group, action } => serde_json::to_value(
            daemon
                .group(group)
                .and_then(|group| groups::control::replication(&group, &daemon.server, action))
                .map_err(|error| error.to_text())?,
        ),
        ControlRequest::Measure { group, since_secs } => serde_json::to_value(
            daemon
                .group(group)
                .and_then(|group| {
                    groups::control::measure(&group, Duration::from_secs(*since_secs))
                })
                .map_err(|error| error.to_text())?,
        ),
        ControlRequest::Reload {
            delete_removed_rings,
        } => serde_json::to_value(daemon.reload(*delete_removed_rings)?),
    };
    answer.map_err(|error| error.to_string())
}

fn status(daemon: &Daemon) -> StatusReport {
    StatusReport {
        version: 1,
        pid: std::process::id(),
        started_unix: daemon.started_unix,
        groups: daemon
            .groups()
            .iter()
            .map(|group| groups::report::group_report(group, &daemon.server))
            .collect(),
    }
}

/// The Prometheus text of the daemon: per group its ring and replication, per disk
/// its NBD traffic.
fn render_metrics(daemon: &Daemon) -> String {
    let mut text = crate::metrics::MetricsText::new();
    for group in &daemon.groups() {
        groups::metrics::group_metrics(&mut text, group, &daemon.server);
    }
    text.finish()
}
