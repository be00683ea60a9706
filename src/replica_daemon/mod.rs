//! `blkrep replica`: the replica daemon and its commands.
//!
//! `blkrep replica run --config F` serves the replica API ([`replica::server`]) until
//! SIGTERM or SIGINT, then stops accepting, lets the applier finish its current
//! transfer and removes its control socket. With `metrics` configured it also serves
//! Prometheus metrics ([`crate::metrics`]).
//!
//! The daemon's parts, each in its module:
//! - [`cli`]: the `blkrep replica ...` commands, which talk to the daemon;
//! - [`protocol`]: its control requests (a unix socket, mode 0600, one JSON request
//!   line and one JSON response line per connection, in the envelope of
//!   [`crate::control::Response`]);
//! - [`handlers`]: how the daemon answers each request;
//! - [`failover`]: test failover and failover of a replica, and the failover hook;
//! - [`live`]: the groups of replicas failed over to, served as live disks through
//!   the group runtime ([`crate::groups`]) like a primary's groups, and replicated
//!   back;
//! - [`render`]: status, recovery points and metrics as text.

pub mod cli;
pub mod config;
pub mod failover;
pub mod handlers;
pub mod live;
pub mod protocol;
pub mod render;

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use replica::server::{FailedOver, ReplicaServer, ReplicaServerError, ServerHandle};
use thiserror::Error;
use tracing::info;

use crate::control::{self, ControlError};
use crate::daemon::control_socket::{self, SocketError};
use crate::daemon::StopSignals;
use crate::dashboard::{DaemonKind, Dashboard, DashboardError, Figures};
use crate::metrics::{MetricsError, MetricsText};
use config::{FailoverHook, ReplicaConfig};

pub use cli::{main, ReplicaCommand};

/// Errors of the replica daemon and of talking to it.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The replica server cannot start.
    #[error("Cannot start the replica server")]
    Server(#[from] ReplicaServerError),
    /// The metrics endpoint cannot start.
    #[error("Cannot start the metrics endpoint")]
    Metrics(#[from] MetricsError),
    /// The status page's sampler cannot start.
    #[error(transparent)]
    Dashboard(#[from] DashboardError),
    /// The control socket or the NBD unix socket cannot be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Signals cannot be set up.
    #[error("Cannot set up the daemon")]
    Setup(#[source] std::io::Error),
    /// Talking to the daemon failed.
    #[error(transparent)]
    Talk(#[from] ControlError),
    /// The NBD server of test failover disks cannot start.
    #[error("Cannot serve failover disks over NBD")]
    Nbd(#[from] nbd_shim::server::ServerError),
    /// A seed request is not possible.
    #[error("{0}")]
    Seed(String),
    /// Seeding failed.
    #[error("Cannot seed the existing copy")]
    Store(#[from] replica::store::StoreError),
}

/// The daemon's state, which control requests act on.
#[derive(Clone)]
pub(crate) struct Daemon {
    server: ServerHandle,
    /// Serves test failover disks and failed-over disks.
    nbd: Arc<nbd_shim::Server>,
    nbd_socket: PathBuf,
    /// Replicas failed over to, served as live groups, by replica directory.
    live: Arc<Mutex<HashMap<PathBuf, live::LiveGroup>>>,
    hook: Option<FailoverHook>,
    /// Size of the ring created for live disks.
    live_ring_size: u64,
}

/// Runs the replica daemon until SIGTERM or SIGINT; SIGHUP reads `path` again and
/// puts its authorisation entries in force ([`reload_authorization`]).
pub fn run(config: &ReplicaConfig, path: &Path) -> Result<(), DaemonError> {
    crate::daemon::process::harden_process();
    config.background_nice.apply();
    let signals = StopSignals::block_with_reload().map_err(DaemonError::Setup)?;
    let control = control_socket::bind(control::REPLICA, &config.control_socket)?;
    let result = serve(config, path, control, &signals);
    let _ = std::fs::remove_file(&config.control_socket);
    result
}

fn serve(
    config: &ReplicaConfig,
    path: &Path,
    control: UnixListener,
    signals: &StopSignals,
) -> Result<(), DaemonError> {
    let mut server = ReplicaServer::start(config.settings())?;
    server.handle().end_stale_tests();
    let nbd = Arc::new(nbd_shim::Server::new(nbd_shim::ServerConfig::default()));
    control_socket::remove_stale("unix socket", &config.nbd_unix_socket)?;
    for warning in &config.nbd_access.warnings {
        tracing::warn!("{warning}");
    }
    nbd.listen_unix_with(&config.nbd_unix_socket, config.nbd_access.socket)?;
    if let Some(address) = config.nbd_tcp {
        nbd.listen_tcp_tls(address, config.nbd_access.tls.clone())?;
    }
    let daemon = Daemon {
        server: server.handle(),
        nbd: Arc::clone(&nbd),
        nbd_socket: config.nbd_unix_socket.clone(),
        live: Arc::default(),
        hook: config.failover_hook.clone(),
        live_ring_size: config.live_ring_size,
    };
    daemon.resume_live_groups();
    let on_failover = daemon.clone();
    server
        .handle()
        .on_failover(Arc::new(move |failed: FailedOver| {
            on_failover.planned_failover_arrived(&failed);
        }));
    let metrics = match config.metrics {
        Some(listen) => {
            let source = daemon.clone();
            let sampled = daemon.clone();
            let dashboard = Arc::new(Dashboard::start(
                DaemonKind::Replica,
                Arc::new(move || Figures {
                    groups: sampled.live_status().into_iter().map(|l| l.group).collect(),
                    replicas: sampled.server.replicas(),
                }),
            )?);
            Some(crate::metrics::serve(
                listen,
                Arc::new(move || render_metrics(&source)),
                Some(Arc::new(move || dashboard.page())),
            )?)
        }
        None => None,
    };
    let answering = daemon.clone();
    control_socket::spawn(control, move |stream: &UnixStream| {
        handlers::serve_control(stream, &answering)
    })?;
    let metrics_addr = metrics
        .as_ref()
        .map_or_else(|| "off".to_string(), |m| m.local_addr().to_string());
    info!(
        listen = %server.local_addr(),
        metrics = %metrics_addr,
        control = %config.control_socket.display(),
        "Replica ready"
    );
    let notifier = crate::daemon::notify::ready(&config.control_socket);
    let signal = loop {
        let signal = signals.wait().map_err(DaemonError::Setup)?;
        if !StopSignals::is_reload(signal) {
            break signal;
        }
        reload_authorization(&server.handle(), config, path);
    };
    info!(?signal, "Shutting down");
    notifier.stopping();
    drop(metrics);
    nbd.shutdown();
    daemon.close_live();
    let _ = std::fs::remove_file(&config.nbd_unix_socket);
    server.shutdown();
    info!("Replica server stopped");
    Ok(())
}

/// SIGHUP: reads the configuration at `path` again and puts its authorisation
/// entries in force; primaries added are served from their next connection, those
/// removed are refused from their next request. Every other setting applies at the
/// next restart, and those that changed are named. An invalid file changes nothing.
fn reload_authorization(server: &ServerHandle, started: &ReplicaConfig, path: &Path) {
    let file = match ReplicaConfig::load(path) {
        Ok(file) => file,
        Err(error) => {
            tracing::warn!(error = %shipper::error_chain(&error), "Reload refused: the configuration is not valid; nothing changed");
            return;
        }
    };
    let mut restart_only = Vec::new();
    if file.listen != started.listen {
        restart_only.push("listen");
    }
    if file.control_socket != started.control_socket {
        restart_only.push("control_socket");
    }
    if file.metrics != started.metrics {
        restart_only.push("metrics");
    }
    if file.event_log != started.event_log {
        restart_only.push("event_log");
    }
    if file.nbd_unix_socket != started.nbd_unix_socket || file.nbd_tcp != started.nbd_tcp {
        restart_only.push("nbd");
    }
    let entries = file.authorization.len();
    match server.set_authorization(file.authorization) {
        Ok(()) => info!(entries, "Reloaded: authorisation entries in force"),
        Err(error) => {
            tracing::warn!(error = %shipper::error_chain(&error), "Reload refused; the previous authorisation entries stay")
        }
    }
    for setting in restart_only {
        tracing::warn!(%setting, "Changed in the configuration file; it applies at the next restart");
    }
}

/// The Prometheus text of the daemon: every replica, and every live group with the
/// same metrics a primary exports for its groups.
fn render_metrics(daemon: &Daemon) -> String {
    let mut text = MetricsText::new();
    render::replica_metrics(&mut text, &daemon.server.replicas());
    daemon.live_metrics(&mut text);
    text.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use protocol::{call, ReplicaRequest};
    use replica::server::Transport;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;
    use wire::api::{DiskInfo, ReplicaInfo};

    #[test]
    fn control_socket_serves_the_servers_status() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("dc1");
        let mut server = ReplicaServer::start(replica::server::ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            transport: Transport::PlainWithPsk {
                allow_non_loopback: false,
            },
            authorization: vec![replica::server::AuthEntry {
                primary: Some(wire::tls::NamePattern::parse("primary.example.com").unwrap()),
                storage: storage.clone(),
                trust_group: "dc1".into(),
                quota: None,
                psk: replica::server::PreSharedKey::new("0123456789abcdef".into()),
            }],
            reserve: 0,
            max_disk_size: replica::server::DEFAULT_MAX_DISK_SIZE,
            limits: replica::limits::Limits::default(),
        })
        .unwrap();
        let state = replica::store::ReplicaState::new(
            "vm1".into(),
            "dc1".into(),
            replica::store::Claim {
                relationship: 7,
                epoch: wire::api::FIRST_EPOCH,
            },
            "host1".into(),
            "host1.example.com".into(),
            vec![DiskInfo {
                name: "disk0".into(),
                size: 1 << 20,
            }],
        );
        replica::store::Replica::create(&storage.join("vm1"), state, 0).unwrap();

        let socket = dir.path().join("run/ctl.sock");
        let listener = control_socket::bind(control::REPLICA, &socket).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            control_socket::bind(control::REPLICA, &socket),
            Err(SocketError::AlreadyRunning { .. })
        ));
        let daemon = Daemon {
            server: server.handle(),
            nbd: Arc::new(nbd_shim::Server::new(nbd_shim::ServerConfig::default())),
            nbd_socket: dir.path().join("run/nbd.sock"),
            live: Arc::default(),
            hook: None,
            live_ring_size: config::DEFAULT_LIVE_RING_SIZE,
        };
        let answering = daemon.clone();
        control_socket::spawn(listener, move |stream: &UnixStream| {
            handlers::serve_control(stream, &answering)
        })
        .unwrap();
        let value = call(&socket, &ReplicaRequest::Status, Duration::from_secs(10)).unwrap();
        let replicas: Vec<ReplicaInfo> = serde_json::from_value(value).unwrap();
        assert_eq!(replicas.len(), 1);
        assert_eq!(
            (replicas[0].name.as_str(), replicas[0].consistent),
            ("vm1", false)
        );
        assert!(render_metrics(&daemon)
            .contains("blkrep_replica_consistent{replica=\"vm1\",trust_group=\"dc1\"} 0\n"));
        assert!(render_metrics(&daemon)
            .contains("blkrep_replica_recoverable{replica=\"vm1\",trust_group=\"dc1\"} 0\n"));

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
            &ReplicaRequest::Status,
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
