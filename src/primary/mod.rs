//! The primary daemon: opens every group's log ring (recovering after a crash), serves
//! every disk over NBD through the tracker, runs a shipper per group, and answers the
//! control API. SIGTERM and SIGINT shut it down cleanly: listeners close, in-flight
//! requests finish and are answered, shippers stop, rings and images are synced and
//! the rings marked clean.

pub mod tracked_disk;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base::sync::lock;
use std::time::{Duration, UNIX_EPOCH};

use nbd_shim::backend::{ImageFile, ImageFileOptions};
use nbd_shim::{BlockDevice, Server, ServerConfig};
use nix::sys::signal::{SigSet, Signal};
use shipper::remote::{ClientSettings, Credentials, Relationship, ReplicaClient, Throttle};
use shipper::{
    AdminAction, CycleSink, DiscardSink, LocalCopySink, RemoteOptions, RemoteSink,
    ReplicationSetup, RetryPolicy, Shipper, ShipperOptions,
};
use thiserror::Error;
use tracing::{error, info, warn};
use tracker::{DiskSpec, Group, PreviousShutdown, TrackingMode};

use crate::config::{ConsumerConfig, GroupConfig, PrimaryConfig, ReplicaConsumer};
use crate::control::{self, Request};
use crate::status::{
    CycleReport, DiskReport, GroupReport, RingReport, StatusReport, ThrottleReport,
};
use tracked_disk::TrackedDisk;

/// Errors of the primary daemon.
#[derive(Debug, Error)]
pub enum PrimaryError {
    /// An image cannot be opened.
    #[error("Cannot open image {path} of disk {disk}")]
    Image {
        /// Disk name.
        disk: String,
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A group's tracker cannot start.
    #[error("Cannot start tracking group {group}")]
    Tracker {
        /// Group name.
        group: String,
        /// The cause.
        #[source]
        source: tracker::TrackerError,
    },
    /// Replaying the log onto the images after a crash failed.
    #[error("Cannot replay group {group}'s log onto its images after a crash")]
    Replay {
        /// Group name.
        group: String,
        /// The cause.
        #[source]
        source: image_ops::ApplyError,
    },
    /// The consumer cannot start.
    #[error("Cannot start the consumer of group {group}")]
    Consumer {
        /// Group name.
        group: String,
        /// The cause.
        #[source]
        source: shipper::SinkError,
    },
    /// The replica consumer cannot be set up (credentials, URL).
    #[error("Cannot set up replication of group {group}: {reason}")]
    Replication {
        /// Group name.
        group: String,
        /// Why.
        reason: String,
    },
    /// The shipper cannot start.
    #[error("Cannot start the shipper of group {group}")]
    Shipper {
        /// Group name.
        group: String,
        /// The cause.
        #[source]
        source: shipper::ShipperError,
    },
    /// A local copy is missing although its ring already tracks changes.
    #[error("Local copy {copy} of group {group} is missing, but its ring {ring} has tracked changes since the copy was made; restore the copy, or delete the ring to start tracking afresh with a new copy")]
    CopyMissing {
        /// Group name.
        group: String,
        /// The missing copy.
        copy: PathBuf,
        /// The ring.
        ring: PathBuf,
    },
    /// A socket cannot be set up.
    #[error("Cannot listen on {what} {address}")]
    Listen {
        /// Which socket.
        what: &'static str,
        /// Its address.
        address: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The NBD server refused an export or a listener.
    #[error("NBD server")]
    Server(#[from] nbd_shim::server::ServerError),
    /// The metrics endpoint cannot start.
    #[error("Cannot serve metrics: {0}")]
    Metrics(String),
    /// Another daemon answers on the control socket.
    #[error("Another blkrep primary is running with control socket {0}")]
    AlreadyRunning(PathBuf),
    /// Threads or signals cannot be set up.
    #[error("Cannot set up the daemon")]
    Setup(#[source] std::io::Error),
}

/// A disk as the daemon runs it.
struct RunningDisk {
    name: String,
    image: PathBuf,
    size: u64,
    read_only: bool,
    /// For syncing the image at shutdown.
    sync_file: File,
}

/// A group as the daemon runs it.
pub(crate) struct RunningGroup {
    config: GroupConfig,
    tracker: Option<Group>,
    shipper: Option<Shipper>,
    disks: Vec<RunningDisk>,
    /// A planned failover handed the group over (its writes stay refused). Held for
    /// the whole of a planned failover, so a second one waits and is refused rather
    /// than accept writes again when it fails.
    handed_over: Mutex<bool>,
}

impl RunningGroup {
    fn image_fds(&self) -> Vec<RawFd> {
        self.disks
            .iter()
            .map(|disk| disk.sync_file.as_raw_fd())
            .collect()
    }

    /// Starts replicating a running group (a failed-over replica's live disks
    /// replicated back, once): a shipper over its tracker, to the replica server
    /// `replica` describes, a cycle every `interval`, at failover epoch `epoch`.
    pub(crate) fn start_replication(
        &mut self,
        replica: &ReplicaConsumer,
        interval: Duration,
        epoch: u64,
    ) -> Result<(), PrimaryError> {
        let name = self.config.name.clone();
        let failed = |reason: String| PrimaryError::Replication {
            group: name.clone(),
            reason,
        };
        let Some(tracker) = &self.tracker else {
            return Err(failed("its writes are not tracked".into()));
        };
        if self.shipper.is_some() {
            return Err(failed("it replicates already".into()));
        }
        let mut config = self.config.clone();
        config.interval = crate::config::Interval(interval);
        config.consumer = Some(ConsumerConfig::Replica(Box::new(replica.clone())));
        let shared = SharedReplication {
            throttle: None,
            host_name: host_name(None),
        };
        let (sink, setup) = replica_sink(&config, replica, &shared, false, epoch)?;
        let options = ShipperOptions {
            interval,
            retry: RetryPolicy {
                scale: replica.retry_scale,
            },
            replication: Some(setup),
            app_consistent: None,
        };
        let images = config.disks.iter().map(|d| d.image.clone()).collect();
        let shipper = Shipper::spawn(tracker.clone(), images, config.block_size.0, options, sink)
            .map_err(|source| PrimaryError::Shipper {
            group: name.clone(),
            source,
        })?;
        self.shipper = Some(shipper);
        self.config = config;
        Ok(())
    }

    /// Whether anything was written since the ring was created: logged records not
    /// yet acknowledged, dirty blocks, or marks for a resync.
    pub(crate) fn was_written(&self) -> bool {
        self.tracker.as_ref().is_some_and(|tracker| {
            let status = tracker.status();
            status.ring_used > 0
                || status.resync.is_some()
                || status
                    .disks
                    .iter()
                    .any(|d| d.dirty_bytes > 0 || d.resync_bytes > 0)
        })
    }

    /// The group's name.
    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    /// The replica server the group replicates to, if any.
    pub(crate) fn replica_url(&self) -> Option<String> {
        match &self.config.consumer {
            Some(ConsumerConfig::Replica(replica)) => Some(replica.url.clone()),
            _ => None,
        }
    }

    /// The shipper's status, if the group replicates.
    pub(crate) fn replication_status(&self) -> Option<shipper::ShipperStatus> {
        self.shipper.as_ref().map(Shipper::status)
    }

    /// Planned failover: refuses while NBD clients are connected to `exports` (the
    /// group's disks on `server`) unless `force`, fences the group's writes, then has
    /// its shipper ship everything, compare every block and hand the group over to
    /// the replica. If that fails, writes are accepted again. Returns what happened.
    pub(crate) fn planned_failover(
        &self,
        server: &Server,
        exports: &[String],
        force: bool,
    ) -> Result<String, String> {
        let group = &self.config.name;
        let Some(shipper) = &self.shipper else {
            return Err(format!(
                "Group {group} does not replicate, so there is no replica to fail over to"
            ));
        };
        let Some(tracker) = &self.tracker else {
            return Err(format!("Group {group} is not tracked"));
        };
        let mut handed_over = lock(&self.handed_over);
        if *handed_over {
            return Err(format!(
                "Group {group} was handed over to its replica by a planned failover already"
            ));
        }
        let connected: Vec<String> = exports
            .iter()
            .filter_map(|export| {
                let connections = server.export_stats(export)?.connections;
                (connections > 0).then(|| format!("{export} ({connections})"))
            })
            .collect();
        if !connected.is_empty() && !force {
            return Err(format!(
                "NBD clients are still connected to {}: shut the VM down first, or pass --force (their writes fail from now on)",
                connected.join(", ")
            ));
        }
        tracker.refuse_writes(true);
        info!(%group, "Planned failover: writes are refused from now on");
        let message = shipper
            .admin(AdminAction::PlannedFailover, control::EXPORT_TIMEOUT)
            .map_err(|error| {
                // The shipper fences the disks on record before it asks the replica to
                // take over; then, or while it may still ask, writes stay refused.
                let fenced = Relationship::load_for_ring(&self.config.ring)
                    .ok()
                    .flatten()
                    .is_some_and(|record| record.fenced);
                if fenced || matches!(error, shipper::ShipperError::Timeout) {
                    warn!(%group, "Planned failover interrupted; the replica may have taken over, so writes stay refused");
                    return format!(
                        "{} (the replica may have taken the group over: these disks keep refusing writes; `blkrep replication status --group {group}` says superseded if it did; otherwise try again)",
                        shipper::error_chain(&error)
                    );
                }
                tracker.refuse_writes(false);
                warn!(%group, "Planned failover failed; writes are accepted again");
                format!(
                    "{} (the failover did not happen; writes are accepted again)",
                    shipper::error_chain(&error)
                )
            })?;
        *handed_over = true;
        Ok(message)
    }

    /// Stops the group's shipper, if it has one.
    pub(crate) fn stop_shipper(&self) {
        if let Some(shipper) = &self.shipper {
            shipper.stop();
        }
    }

    /// Syncs the images and marks the ring clean (the shipper stopped, no client
    /// writes any more).
    pub(crate) fn close(&self) {
        let fds = self.image_fds();
        match &self.tracker {
            Some(tracker) => match tracker.shutdown_clean(&fds) {
                Ok(()) => info!(group = %self.config.name, "Ring synced and marked clean"),
                Err(error) => {
                    error!(group = %self.config.name, error = %shipper::error_chain(&error), "Clean shutdown failed")
                }
            },
            None => {
                for fd in fds {
                    let _ = nix::unistd::fdatasync(fd);
                }
            }
        }
    }
}

/// The state the control API reads.
struct Daemon {
    groups: Vec<RunningGroup>,
    server: Server,
    started_unix: u64,
}

/// Signals that stop the daemon. Blocked in every thread (set before any is spawned)
/// and taken synchronously by the main thread.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Runs the primary until SIGTERM or SIGINT.
pub fn run(config: PrimaryConfig) -> Result<(), PrimaryError> {
    crate::daemon_setup::harden_process();
    let signals = stop_signals();
    signals
        .thread_block()
        .map_err(|errno| PrimaryError::Setup(errno.into()))?;
    let control = bind_control(&config.control_socket)?;
    let mut groups = Vec::new();
    let mut exports = Vec::new();
    let daemon_throttle = config
        .replication
        .bandwidth_limit
        .map(|limit| Arc::new(Throttle::new(limit.0)));
    let host_name = host_name(config.replication.host_name.clone());
    let shared = SharedReplication {
        throttle: daemon_throttle,
        host_name,
    };
    for group in &config.groups {
        let (running, devices) = open_group(group, &shared)?;
        for (disk, device) in running.disks.iter().zip(devices) {
            exports.push((disk.name.clone(), group.name.clone(), device));
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
        remove_stale_socket(path)?;
        server.listen_unix_with(path, config.nbd.access.socket)?;
    }
    if let Some(address) = &config.nbd.tcp {
        server.listen_tcp_tls(address.as_str(), config.nbd.access.tls.clone())?;
    }
    let started_unix = base::time::unix_secs();
    let daemon = Arc::new(Daemon {
        groups,
        server,
        started_unix,
    });
    spawn_control(control, Arc::clone(&daemon))?;
    let _metrics = match &config.metrics {
        None => None,
        Some(address) => {
            let address = address.parse().map_err(|_| PrimaryError::Listen {
                what: "metrics endpoint",
                address: address.clone(),
                source: std::io::ErrorKind::InvalidInput.into(),
            })?;
            let source = Arc::clone(&daemon);
            Some(
                crate::metrics::serve(address, Arc::new(move || render_metrics(&source)))
                    .map_err(|error| PrimaryError::Metrics(shipper::error_chain(&error)))?,
            )
        }
    };
    info!(
        groups = daemon.groups.len(),
        unix = ?config.nbd.unix_socket,
        tcp = ?config.nbd.tcp,
        control = %config.control_socket.display(),
        "Primary ready"
    );
    let signal = signals
        .wait()
        .map_err(|errno| PrimaryError::Setup(errno.into()))?;
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

fn open_images(config: &GroupConfig) -> Result<Vec<ImageFile>, PrimaryError> {
    config
        .disks
        .iter()
        .map(|disk| {
            ImageFile::open(
                &disk.image,
                ImageFileOptions {
                    read_only: disk.read_only,
                    direct: disk.direct,
                },
            )
            .map_err(|source| PrimaryError::Image {
                disk: disk.name.clone(),
                path: disk.image.clone(),
                source,
            })
        })
        .collect()
}

/// The tracker configuration of a group whose images are open.
pub fn tracker_config(config: &GroupConfig, sizes: &[u64]) -> tracker::GroupConfig {
    tracker::GroupConfig {
        name: config.name.clone(),
        ring_path: config.ring.clone(),
        ring_size: config.ring_size.0,
        block_size: config.block_size.0,
        disks: config
            .disks
            .iter()
            .zip(sizes)
            .map(|(disk, size)| DiskSpec {
                name: disk.name.clone(),
                size: *size,
            })
            .collect(),
    }
}

/// Replays the log onto the images after a crash, so image and log agree.
pub fn replay(group: &Group, config: &GroupConfig, sizes: &[u64]) -> Result<(), PrimaryError> {
    let replay_error = |source| PrimaryError::Replay {
        group: config.name.clone(),
        source,
    };
    let view = group
        .recovery_view()
        .map_err(|source| PrimaryError::Tracker {
            group: config.name.clone(),
            source,
        })?;
    let disks = config
        .disks
        .iter()
        .zip(sizes)
        .map(|(disk, size)| image_ops::ReplicaDisk::open(&disk.image, *size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(replay_error)?;
    let stats = image_ops::apply::apply_cycle(&disks, &view).map_err(replay_error)?;
    info!(group = %config.name, changes = stats.changes, bytes = stats.written, "Replayed the log onto the images");
    Ok(())
}

/// Serves the disks of a replica that was failed over to as group `name`'s live
/// disks: images `disks` (name, path) tracked with the ring at `ring` (created of
/// `ring_size` bytes if missing, else recovered after a crash at the size it has),
/// with no consumer until replication is reversed. Returns the group and its devices,
/// in disk order.
pub(crate) fn serve_failed_over(
    name: &str,
    disks: &[(String, PathBuf)],
    ring: &Path,
    ring_size: u64,
) -> Result<(RunningGroup, Vec<Arc<dyn BlockDevice>>), PrimaryError> {
    let config = GroupConfig {
        name: name.to_string(),
        ring: ring.to_path_buf(),
        ring_size: crate::config::ByteSize(Group::existing_ring_size(ring).unwrap_or(ring_size)),
        block_size: crate::config::ByteSize(4096),
        interval: crate::config::Interval(Duration::from_secs(300)),
        tracking: true,
        on_ring_full: crate::config::RingFullSetting::Bitmap,
        throttle_max_delay: None,
        consumer: None,
        app_consistent: None,
        disks: disks
            .iter()
            .map(|(disk, image)| crate::config::DiskConfig {
                name: disk.clone(),
                image: image.clone(),
                read_only: false,
                direct: false,
            })
            .collect(),
    };
    let shared = SharedReplication {
        throttle: None,
        host_name: String::new(),
    };
    open_group(&config, &shared)
}

/// The host name the replica records: the configured one, or the system's.
fn host_name(configured: Option<String>) -> String {
    configured.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "primary".into())
    })
}

/// What every replicating group of the daemon shares.
pub(crate) struct SharedReplication {
    throttle: Option<Arc<Throttle>>,
    host_name: String,
}

/// The consumer of a group that replicates to a replica server, and what its shipper
/// needs to manage the relationship.
fn replica_sink(
    config: &GroupConfig,
    replica: &ReplicaConsumer,
    shared: &SharedReplication,
    fresh_ring: bool,
    epoch: u64,
) -> Result<(Box<dyn CycleSink>, ReplicationSetup), PrimaryError> {
    let failed = |reason: String| PrimaryError::Replication {
        group: config.name.clone(),
        reason,
    };
    let credentials = match (&replica.psk_file, &replica.ca, &replica.cert, &replica.key) {
        (Some(psk_file), ..) => {
            let psk = crate::key_files::read_psk(psk_file)
                .map_err(|error| failed(wire::error_chain(&error)))?;
            warn!(group = %config.name, url = %replica.url, "Replication uses plain HTTP with a pre-shared key: traffic is NOT encrypted; for isolated labs only");
            Credentials::PlainWithPsk {
                identity: replica.identity.clone().unwrap_or_default(),
                psk,
            }
        }
        (None, Some(ca), Some(cert), Some(key)) => {
            let files = wire::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            Credentials::Tls(
                wire::tls::client_config(&files)
                    .map_err(|error| failed(shipper::error_chain(&error)))?,
            )
        }
        _ => return Err(failed("ca, cert and key are required".into())),
    };
    let client = ReplicaClient::new(
        ClientSettings {
            url: replica.url.clone(),
            credentials,
            source_address: replica.source_address,
            request_timeout: replica.request_timeout.0,
        },
        0,
    )
    .map_err(failed)?;
    let mut throttles = Vec::new();
    if let Some(limit) = replica.bandwidth_limit {
        throttles.push(Arc::new(Throttle::new(limit.0)));
    }
    throttles.extend(shared.throttle.clone());
    let sink = RemoteSink::new(
        client,
        &config.name,
        RemoteOptions {
            compression: replica.compression(),
            throttles,
        },
    );
    let start_after_unix = replica
        .start_at
        .as_deref()
        .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map(|since| since.as_secs());
    let setup = ReplicationSetup {
        relationship_path: Relationship::path_for_ring(&config.ring),
        replica_url: replica.url.clone(),
        primary_host: shared.host_name.clone(),
        disk_names: config.disks.iter().map(|d| d.name.clone()).collect(),
        fresh_ring,
        start_after_unix,
        initial: replica.initial_replication,
        // Media has no link to measure: compressed unless turned off.
        compression: replica.compression().level(),
        recovery: replica.recovery(),
        epoch,
    };
    Ok((Box::new(sink), setup))
}

/// Opens a group's images and tracker, recovering after a crash. Returns the group
/// and the devices to export, in disk order.
pub(crate) fn open_group(
    config: &GroupConfig,
    shared: &SharedReplication,
) -> Result<(RunningGroup, Vec<Arc<dyn BlockDevice>>), PrimaryError> {
    let images = open_images(config)?;
    let sizes: Vec<u64> = images.iter().map(BlockDevice::size).collect();
    let mut disks = Vec::new();
    for (disk, size) in config.disks.iter().zip(&sizes) {
        let sync_file = File::open(&disk.image).map_err(|source| PrimaryError::Image {
            disk: disk.name.clone(),
            path: disk.image.clone(),
            source,
        })?;
        disks.push(RunningDisk {
            name: disk.name.clone(),
            image: disk.image.clone(),
            size: *size,
            read_only: disk.read_only,
            sync_file,
        });
    }
    let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut handed_over = false;
    let (tracker, shipper) = if config.tracking {
        let fresh = !config.ring.exists();
        if let (true, Some(ConsumerConfig::LocalCopy { dir })) = (fresh, &config.consumer) {
            // The copy must be the images as they are when tracking starts: made
            // before the ring exists, so a crash in between just makes it again.
            info!(group = %config.name, dir = %dir.display(), "Tracking starts: making the local copies");
            for disk in &config.disks {
                let _ = std::fs::remove_file(LocalCopySink::copy_path(dir, &disk.name));
            }
            let named: Vec<(String, PathBuf)> = config
                .disks
                .iter()
                .map(|d| (d.name.clone(), d.image.clone()))
                .collect();
            LocalCopySink::seed(dir, &named).map_err(|source| PrimaryError::Consumer {
                group: config.name.clone(),
                source,
            })?;
        }
        let (group, report) = Group::open(&tracker_config(config, &sizes)).map_err(|source| {
            PrimaryError::Tracker {
                group: config.name.clone(),
                source,
            }
        })?;
        match report.previous {
            PreviousShutdown::DaemonCrash => {
                warn!(group = %config.name, "The previous daemon stopped uncleanly; recovering the log")
            }
            PreviousShutdown::HostCrash => {
                warn!(group = %config.name, "The host stopped uncleanly; recovering the log")
            }
            PreviousShutdown::Created | PreviousShutdown::Clean => {}
        }
        if report.needs_replay() {
            replay(&group, config, &sizes)?;
        }
        group.set_on_ring_full(config.on_ring_full());
        let record = Relationship::load_for_ring(&config.ring).ok().flatten();
        handed_over = record.as_ref().is_some_and(Relationship::handed_over);
        if record.as_ref().is_some_and(|r| r.fenced) {
            group.refuse_writes(true);
            if handed_over {
                // A planned failover handed the group over: these disks stay read-only.
                warn!(group = %config.name, "A planned failover handed this group over to its replica: its disks refuse writes");
            } else {
                warn!(group = %config.name, "A planned failover was interrupted before the replica answered, so it may have taken the group over: the disks refuse writes until `blkrep replication failover` is run again (it finishes the failover, or learns that the replica took over)");
            }
        }
        let fresh_ring = report.previous == PreviousShutdown::Created;
        let shipper = match &config.consumer {
            None => None,
            Some(consumer) => {
                let mut replication = None;
                let sink: Box<dyn CycleSink> = match consumer {
                    ConsumerConfig::Discard => Box::new(DiscardSink::default()),
                    ConsumerConfig::Replica(replica) => {
                        let (sink, setup) = replica_sink(
                            config,
                            replica,
                            shared,
                            fresh_ring,
                            wire::api::FIRST_EPOCH,
                        )?;
                        replication = Some(setup);
                        sink
                    }
                    ConsumerConfig::LocalCopy { dir } => {
                        let named: Vec<(String, u64)> = config
                            .disks
                            .iter()
                            .zip(&sizes)
                            .map(|(d, s)| (d.name.clone(), *s))
                            .collect();
                        if let Some(missing) = named
                            .iter()
                            .map(|(name, _)| LocalCopySink::copy_path(dir, name))
                            .find(|copy| !copy.exists())
                        {
                            return Err(PrimaryError::CopyMissing {
                                group: config.name.clone(),
                                copy: missing,
                                ring: config.ring.clone(),
                            });
                        }
                        Box::new(LocalCopySink::open(dir, &named).map_err(|source| {
                            PrimaryError::Consumer {
                                group: config.name.clone(),
                                source,
                            }
                        })?)
                    }
                };
                let images = config.disks.iter().map(|d| d.image.clone()).collect();
                let retry = match consumer {
                    ConsumerConfig::Replica(replica) => RetryPolicy {
                        scale: replica.retry_scale,
                    },
                    _ => RetryPolicy::default(),
                };
                let app_consistent =
                    config
                        .app_consistent
                        .as_ref()
                        .map(|app| shipper::AppConsistentOptions {
                            every: app.every.0,
                            freeze_command: app.freeze_command.clone(),
                            thaw_command: app.thaw_command.clone(),
                            timeout: app.timeout.0,
                            state_path: Some(shipper::freeze::state_path_for_ring(&config.ring)),
                        });
                let options = ShipperOptions {
                    interval: config.interval.0,
                    retry,
                    replication,
                    app_consistent,
                };
                Some(
                    Shipper::spawn(group.clone(), images, config.block_size.0, options, sink)
                        .map_err(|source| PrimaryError::Shipper {
                            group: config.name.clone(),
                            source,
                        })?,
                )
            }
        };
        for (index, image) in images.into_iter().enumerate() {
            let Some(disk_tracker) = group.disk(index) else {
                continue;
            };
            let device =
                TrackedDisk::new(image, disk_tracker).map_err(|source| PrimaryError::Image {
                    disk: config.disks[index].name.clone(),
                    path: config.disks[index].image.clone(),
                    source,
                })?;
            devices.push(Arc::new(device) as Arc<dyn BlockDevice>);
        }
        (Some(group), shipper)
    } else {
        devices.extend(
            images
                .into_iter()
                .map(|image| Arc::new(image) as Arc<dyn BlockDevice>),
        );
        (None, None)
    };
    info!(group = %config.name, disks = disks.len(), tracking = config.tracking, "Group opened");
    Ok((
        RunningGroup {
            config: config.clone(),
            tracker,
            shipper,
            disks,
            handed_over: Mutex::new(handed_over),
        },
        devices,
    ))
}

fn remove_stale_socket(path: &Path) -> Result<(), PrimaryError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(PrimaryError::Listen {
                what: "unix socket",
                address: path.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    Ok(())
}

fn bind_control(path: &Path) -> Result<UnixListener, PrimaryError> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(PrimaryError::AlreadyRunning(path.to_path_buf()));
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(|source| PrimaryError::Listen {
        what: "control socket",
        address: path.display().to_string(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(PrimaryError::Setup)?;
    Ok(listener)
}

fn spawn_control(listener: UnixListener, daemon: Arc<Daemon>) -> Result<(), PrimaryError> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let daemon = Arc::clone(&daemon);
                // Requests like close_cycle wait for a delivery; each gets its thread.
                let spawned = std::thread::Builder::new()
                    .name("control-request".into())
                    .spawn(move || {
                        if let Err(error) = serve_control(&stream, &daemon) {
                            warn!(%error, "Control request failed");
                        }
                    });
                if let Err(error) = spawned {
                    warn!(%error, "Cannot serve a control request");
                }
            }
        })
        .map(drop)
        .map_err(PrimaryError::Setup)
}

fn serve_control(stream: &UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    control::answer(stream, |request: Request| handle(&request, daemon))
}

/// The shipper of group `group`, or why there is none.
fn shipper_of<'a>(daemon: &'a Daemon, group: &str) -> Result<&'a Shipper, String> {
    let running = daemon
        .groups
        .iter()
        .find(|g| g.config.name == group)
        .ok_or_else(|| format!("No group named {group:?}"))?;
    running.shipper.as_ref().ok_or_else(|| {
        format!("Group {group:?} has no consumer running; configure [group.consumer]")
    })
}

fn handle(request: &Request, daemon: &Daemon) -> Result<serde_json::Value, String> {
    match request {
        Request::Status => serde_json::to_value(status(daemon)).map_err(|error| error.to_string()),
        Request::CloseCycle {
            group,
            timeout_secs,
        } => {
            let shipper = shipper_of(daemon, group)?;
            let cycle = shipper
                .close_now(Duration::from_secs(*timeout_secs))
                .map_err(|error| shipper::error_chain(&error))?;
            Ok(serde_json::json!({ "cycle": cycle }))
        }
        Request::Replication {
            group,
            action: control::ReplicationAction::Failover { force },
        } => planned_failover(daemon, group, *force),
        Request::Replication { group, action } => {
            let shipper = shipper_of(daemon, group)?;
            let action = match action {
                control::ReplicationAction::Pause => AdminAction::Pause,
                control::ReplicationAction::Resume => AdminAction::Resume,
                control::ReplicationAction::Resync => AdminAction::Resync,
                control::ReplicationAction::Remove { delete_replica } => AdminAction::Remove {
                    delete_replica: *delete_replica,
                },
                control::ReplicationAction::Enable { start_after_unix } => AdminAction::Enable {
                    start_after_unix: *start_after_unix,
                },
                control::ReplicationAction::Export { dir } => {
                    AdminAction::Export { dir: dir.clone() }
                }
                control::ReplicationAction::Failover { .. } => AdminAction::PlannedFailover,
            };
            let timeout = match action {
                AdminAction::Export { .. } => control::EXPORT_TIMEOUT,
                _ => Duration::from_secs(150),
            };
            let message = shipper
                .admin(action, timeout)
                .map_err(|error| shipper::error_chain(&error))?;
            Ok(serde_json::json!({ "message": message }))
        }
    }
}

/// Planned failover of `group` (see [`RunningGroup::planned_failover`]); its exports
/// are its disks' names.
fn planned_failover(
    daemon: &Daemon,
    group: &str,
    force: bool,
) -> Result<serde_json::Value, String> {
    let running = daemon
        .groups
        .iter()
        .find(|g| g.config.name == group)
        .ok_or_else(|| format!("No group named {group:?}"))?;
    let exports: Vec<String> = running.disks.iter().map(|d| d.name.clone()).collect();
    let message = running.planned_failover(&daemon.server, &exports, force)?;
    Ok(serde_json::json!({ "message": message }))
}

fn status(daemon: &Daemon) -> StatusReport {
    let groups = daemon
        .groups
        .iter()
        .map(|group| {
            let tracker_status = group.tracker.as_ref().map(Group::status);
            let disks = group
                .disks
                .iter()
                .enumerate()
                .map(|(index, disk)| {
                    let stats = daemon.server.export_stats(&disk.name);
                    let tracked = tracker_status.as_ref().and_then(|s| s.disks.get(index));
                    DiskReport {
                        name: disk.name.clone(),
                        image: disk.image.display().to_string(),
                        size: disk.size,
                        read_only: disk.read_only,
                        dirty_bytes: tracked.map_or(0, |d| d.dirty_bytes),
                        resync_bytes: tracked.map_or(0, |d| d.resync_bytes),
                        connections: stats.as_ref().map_or(0, |s| s.connections),
                        total_connections: stats.as_ref().map_or(0, |s| s.connections_total),
                        bytes_read: stats.as_ref().map_or(0, |s| s.bytes_read),
                        bytes_written: stats.as_ref().map_or(0, |s| s.bytes_written),
                    }
                })
                .collect();
            let (tracking, cycle, ring) = match &tracker_status {
                None => (
                    "off".to_string(),
                    CycleReport::default(),
                    RingReport::default(),
                ),
                Some(s) => (
                    match s.mode {
                        TrackingMode::Logging => "logging".to_string(),
                        TrackingMode::DirtyMap => "bitmap".to_string(),
                    },
                    CycleReport {
                        open: s.open_cycle,
                        last_closed: s.last_closed,
                        last_acked: s.last_acked,
                    },
                    RingReport {
                        path: group.config.ring.display().to_string(),
                        size: s.ring_size,
                        used: s.ring_used,
                        records_logged: s.records_logged,
                        on_full: if s.on_ring_full.max_delay().is_some() {
                            "throttle".into()
                        } else {
                            "bitmap".into()
                        },
                        throttle: throttle_report(s),
                    },
                ),
            };
            let resync = tracker_status.as_ref().and_then(|s| s.resync);
            GroupReport {
                name: group.config.name.clone(),
                tracking,
                resync_required: resync.is_some(),
                resync_reason: resync.map(|reason| reason.to_string()),
                interval_secs: group.config.interval.0.as_secs_f64(),
                cycle,
                ring,
                consumer: group
                    .shipper
                    .as_ref()
                    .and_then(|s| serde_json::to_value(s.status()).ok()),
                disks,
            }
        })
        .collect();
    StatusReport {
        version: 1,
        pid: std::process::id(),
        started_unix: daemon.started_unix,
        groups,
    }
}

/// The throttle figures of a group whose policy is [`tracker::OnRingFull::Throttle`].
fn throttle_report(status: &tracker::GroupStatus) -> Option<ThrottleReport> {
    let max_delay = status.on_ring_full.max_delay()?;
    let ms = |delay: Duration| u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    Some(ThrottleReport {
        bound_ms: ms(max_delay),
        writes: status.throttle.writes,
        total_delay_ms: ms(status.throttle.total_delay),
        max_delay_ms: ms(status.throttle.max_delay),
        expired: status.throttle.expired,
    })
}

/// The Prometheus text of the daemon: per group its ring and replication, per disk
/// its NBD traffic.
fn render_metrics(daemon: &Daemon) -> String {
    let mut text = crate::metrics::MetricsText::new();
    let as_f64 = crate::metrics::count_f64;
    for group in &daemon.groups {
        let name = group.config.name.as_str();
        let labels = [("group", name)];
        if let Some(tracker) = &group.tracker {
            let status = tracker.status();
            text.gauge(
                "blkrep_ring_used_bytes",
                "Ring bytes holding unacknowledged changes",
                &labels,
                as_f64(status.ring_used),
            );
            text.gauge(
                "blkrep_ring_size_bytes",
                "Ring capacity",
                &labels,
                as_f64(status.ring_size),
            );
            text.gauge(
                "blkrep_resync_required",
                "1 while the group needs a resync",
                &labels,
                f64::from(u8::from(status.resync.is_some())),
            );
            text.counter(
                "blkrep_records_logged_total",
                "Records logged since start",
                &labels,
                as_f64(status.records_logged),
            );
            crate::metrics::ring_full_samples(&mut text, &labels, &status);
        }
        if let Some(shipper) = &group.shipper {
            let status = shipper.status();
            let health = match status.health {
                Some(shipper::Health::Normal) => 0.0,
                Some(shipper::Health::Warning) => 1.0,
                Some(shipper::Health::Critical) => 2.0,
                None => -1.0,
            };
            text.gauge(
                "blkrep_replication_health",
                "0 Normal, 1 Warning, 2 Critical, -1 not replicating",
                &labels,
                health,
            );
            if let Some(lag_ms) = status.lag_ms {
                text.gauge(
                    "blkrep_replication_lag_seconds",
                    "Age of the primary state the replica holds",
                    &labels,
                    as_f64(lag_ms) / 1000.0,
                );
            }
            let rpo = status.rpo.cumulative();
            let buckets: Vec<(f64, u64)> = rpo
                .iter()
                .map(|(bound_ms, count)| (as_f64(*bound_ms) / 1000.0, *count))
                .collect();
            text.histogram(
                "blkrep_replication_rpo_seconds",
                "Achieved recovery point just before each delivery: its time minus the close of the cycle delivered before",
                &labels,
                &buckets,
                status.rpo.count,
                as_f64(status.rpo.sum_ms) / 1000.0,
            );
            if let Some(at) = status.last_success_unix {
                text.gauge(
                    "blkrep_replication_last_success_timestamp_seconds",
                    "When the newest cycle was acknowledged",
                    &labels,
                    as_f64(at),
                );
            }
            text.counter(
                "blkrep_replication_cycles_delivered_total",
                "Cycles delivered since start",
                &labels,
                as_f64(status.cycles_delivered),
            );
            text.counter(
                "blkrep_replication_failures_total",
                "Failed attempts since start",
                &labels,
                as_f64(status.failures),
            );
            text.counter(
                "blkrep_replication_bytes_delivered_total",
                "Change bytes delivered since start",
                &labels,
                as_f64(status.bytes_delivered),
            );
            text.counter(
                "blkrep_replication_network_bytes_total",
                "Bytes sent to the replica since start",
                &labels,
                as_f64(status.network_bytes),
            );
            text.gauge(
                "blkrep_replication_missed_cycles_last_hour",
                "Intervals of the last hour that missed their cycle",
                &labels,
                as_f64(status.missed_last_hour),
            );
            if let Some(app) = &status.app_consistent {
                text.counter(
                    "blkrep_app_consistent_points_total",
                    "Application-consistent points made since start",
                    &labels,
                    as_f64(app.points),
                );
                text.counter(
                    "blkrep_freeze_failures_total",
                    "Freeze commands that failed since start (their cycles are crash-consistent)",
                    &labels,
                    as_f64(app.freeze_failures),
                );
                text.counter(
                    "blkrep_thaw_failures_total",
                    "Thaw commands that failed since start (a guest may have stayed frozen)",
                    &labels,
                    as_f64(app.thaw_failures),
                );
                if let Some(at) = app.last_unix {
                    text.gauge(
                        "blkrep_app_consistent_last_point_timestamp_seconds",
                        "When the newest application-consistent cycle closed",
                        &labels,
                        as_f64(at),
                    );
                }
            }
            if let Some(resync) = &status.resync {
                text.gauge(
                    "blkrep_replication_copy_done_bytes",
                    "Bytes of the running initial replication or resync committed",
                    &labels,
                    as_f64(resync.done_bytes),
                );
                text.gauge(
                    "blkrep_replication_copy_total_bytes",
                    "Bytes the running initial replication or resync copies",
                    &labels,
                    as_f64(resync.total_bytes),
                );
            }
        }
        for disk in &group.disks {
            let Some(stats) = daemon.server.export_stats(&disk.name) else {
                continue;
            };
            let labels = [("group", name), ("disk", disk.name.as_str())];
            text.counter(
                "blkrep_disk_written_bytes_total",
                "Bytes written by NBD clients",
                &labels,
                as_f64(stats.bytes_written),
            );
            text.counter(
                "blkrep_disk_read_bytes_total",
                "Bytes read by NBD clients",
                &labels,
                as_f64(stats.bytes_read),
            );
            text.gauge(
                "blkrep_disk_connections",
                "Open NBD connections",
                &labels,
                as_f64(stats.connections),
            );
        }
    }
    text.finish()
}
