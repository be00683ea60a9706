//! The primary daemon: opens every group's log ring (recovering after a crash), serves
//! every disk over NBD through the tracker, runs a shipper per group, and answers the
//! control API. SIGTERM and SIGINT shut it down cleanly: listeners close, in-flight
//! requests finish and are answered, shippers stop, rings and images are synced and
//! the rings marked clean.

pub mod tracked_disk;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nbd_shim::backend::{ImageFile, ImageFileOptions};
use nbd_shim::{BlockDevice, Server, ServerConfig};
use nix::sys::signal::{SigSet, Signal};
use shipper::{CycleSink, DiscardSink, LocalCopySink, Shipper};
use thiserror::Error;
use tracing::{error, info, warn};
use tracker::{DiskSpec, Group, PreviousShutdown, TrackingMode};

use crate::config::{ConsumerConfig, GroupConfig, PrimaryConfig};
use crate::control::{self, Request, Response};
use crate::status::{CycleReport, DiskReport, GroupReport, RingReport, StatusReport};
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
        source: replica::ApplyError,
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
struct RunningGroup {
    config: GroupConfig,
    tracker: Option<Group>,
    shipper: Option<Shipper>,
    disks: Vec<RunningDisk>,
}

impl RunningGroup {
    fn image_fds(&self) -> Vec<RawFd> {
        self.disks
            .iter()
            .map(|disk| disk.sync_file.as_raw_fd())
            .collect()
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
    let signals = stop_signals();
    signals
        .thread_block()
        .map_err(|errno| PrimaryError::Setup(errno.into()))?;
    let control = bind_control(&config.control_socket)?;
    let mut groups = Vec::new();
    let mut exports = Vec::new();
    for group in &config.groups {
        let (running, devices) = open_group(group)?;
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
    if let Some(path) = &config.nbd.unix_socket {
        remove_stale_socket(path)?;
        server.listen_unix(path)?;
    }
    if let Some(address) = &config.nbd.tcp {
        server.listen_tcp(address.as_str())?;
    }
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let daemon = Arc::new(Daemon {
        groups,
        server,
        started_unix,
    });
    spawn_control(control, Arc::clone(&daemon))?;
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
        if let Some(shipper) = &group.shipper {
            shipper.stop();
        }
    }
    for group in &daemon.groups {
        let fds = group.image_fds();
        match &group.tracker {
            Some(tracker) => match tracker.shutdown_clean(&fds) {
                Ok(()) => info!(group = %group.config.name, "Ring synced and marked clean"),
                Err(error) => {
                    error!(group = %group.config.name, error = %shipper::error_chain(&error), "Clean shutdown failed")
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
        .map(|(disk, size)| replica::ReplicaDisk::open(&disk.image, *size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(replay_error)?;
    let stats = replica::apply::apply_cycle(&disks, &view).map_err(replay_error)?;
    info!(group = %config.name, changes = stats.changes, bytes = stats.written, "Replayed the log onto the images");
    Ok(())
}

/// Opens a group's images and tracker, recovering after a crash. Returns the group
/// and the devices to export, in disk order.
fn open_group(
    config: &GroupConfig,
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
        let shipper = match &config.consumer {
            None => None,
            Some(consumer) => {
                let sink: Box<dyn CycleSink> = match consumer {
                    ConsumerConfig::Discard => Box::new(DiscardSink::default()),
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
                Some(
                    Shipper::spawn(
                        group.clone(),
                        images,
                        config.block_size.0,
                        config.interval.0,
                        sink,
                    )
                    .map_err(PrimaryError::Setup)?,
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
                        if let Err(error) = serve_control(stream, &daemon) {
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

fn serve_control(stream: UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(control::MAX_REQUEST)).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(error) => Response {
            ok: false,
            result: None,
            error: Some(format!("Bad request: {error}")),
        },
        Ok(request) => match handle(&request, daemon) {
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
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

fn handle(request: &Request, daemon: &Daemon) -> Result<serde_json::Value, String> {
    match request {
        Request::Status => serde_json::to_value(status(daemon)).map_err(|error| error.to_string()),
        Request::CloseCycle {
            group,
            timeout_secs,
        } => {
            let running = daemon
                .groups
                .iter()
                .find(|g| g.config.name == *group)
                .ok_or_else(|| format!("No group named {group:?}"))?;
            let shipper = running.shipper.as_ref().ok_or_else(|| {
                format!("Group {group:?} has no consumer running, so nothing consumes its cycles")
            })?;
            let cycle = shipper
                .close_now(Duration::from_secs(*timeout_secs))
                .map_err(|error| shipper::error_chain(&error))?;
            Ok(serde_json::json!({ "cycle": cycle }))
        }
    }
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
