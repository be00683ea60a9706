//! Opening a group: its images, its log ring (recovering after a crash), the devices
//! NBD clients write through, and its shipper when it has a consumer.
//!
//! Ordering: the log is replayed onto the images before the group's devices exist,
//! so no client reads or writes an image the log disagrees with; the daemon adds the
//! exports only once every group opened.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nbd_shim::backend::{ImageFile, ImageFileOptions};
use nbd_shim::BlockDevice;
use shipper::remote::{Relationship, Throttle};
use shipper::{CycleSink, DiscardSink, LocalCopySink, RetryPolicy, Shipper, ShipperOptions};
use tracing::{info, warn};
use tracker::{DiskSpec, Group, PreviousShutdown};

use super::tracked_disk::TrackedDisk;
use super::{GroupError, RunningDisk, RunningGroup};
use crate::config::{ConsumerConfig, GroupConfig};

/// What every replicating group of the daemon shares.
pub struct SharedReplication {
    /// The daemon-wide bandwidth limit, if any.
    pub(super) throttle: Option<Arc<Throttle>>,
    /// The host name the replica records as the primary's.
    pub(super) host_name: String,
}

impl SharedReplication {
    /// The daemon-wide bandwidth `throttle` and the host name (the configured one, or
    /// the system's).
    pub fn new(throttle: Option<Arc<Throttle>>, host_name: Option<String>) -> Self {
        Self {
            throttle,
            host_name: host_name.unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|name| name.into_string().ok())
                    .unwrap_or_else(|| "primary".into())
            }),
        }
    }
}

/// How a group's disks are named as NBD exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportNaming {
    /// The disk's name (the primary: disk names are unique across its groups).
    Disk,
    /// `<group>/<disk>` (the replica daemon, whose live groups come from many
    /// primaries).
    GroupAndDisk,
}

impl ExportNaming {
    /// The export of disk `disk` of group `group`.
    pub fn export(self, group: &str, disk: &str) -> String {
        match self {
            Self::Disk => disk.to_string(),
            Self::GroupAndDisk => format!("{group}/{disk}"),
        }
    }
}

/// Opens a group's images and tracker, recovering after a crash. Returns the group
/// and the devices to export, in disk order.
pub fn open_group(
    config: &GroupConfig,
    shared: &SharedReplication,
    naming: ExportNaming,
) -> Result<(RunningGroup, Vec<Arc<dyn BlockDevice>>), GroupError> {
    let images = open_images(config)?;
    let sizes: Vec<u64> = images.iter().map(BlockDevice::size).collect();
    let disks = running_disks(config, &sizes, naming)?;
    let mut handed_over = false;
    let (tracker, shipper, devices) = if config.tracking {
        let fresh = !config.ring.exists();
        if let Some(ConsumerConfig::LocalCopy { dir }) = &config.consumer {
            if fresh {
                seed_local_copies(config, dir)?;
            } else {
                create_added_copies(config, dir, &sizes)?;
            }
        }
        let (group, fresh_ring, was_handed_over) = open_tracker(config, &sizes)?;
        handed_over = was_handed_over;
        let shipper = match &config.consumer {
            None => None,
            Some(consumer) => Some(spawn_shipper(
                config, consumer, &group, &sizes, shared, fresh_ring,
            )?),
        };
        let devices = tracked_devices(config, images, &group)?;
        (Some(group), shipper, devices)
    } else {
        let devices = images
            .into_iter()
            .map(|image| Arc::new(image) as Arc<dyn BlockDevice>)
            .collect();
        (None, None, devices)
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

/// Serves the disks of a replica that was failed over to as group `name`'s live
/// disks: images `disks` (name, path) tracked with the ring at `ring` (created of
/// `ring_size` bytes if missing, else recovered after a crash at the size it has),
/// with a group's default block size and interval and no consumer until replication
/// is reversed. Exports are named `<name>/<disk>`. Returns the group and its devices,
/// in disk order.
pub fn serve_failed_over(
    name: &str,
    disks: &[(String, PathBuf)],
    ring: &Path,
    ring_size: u64,
) -> Result<(RunningGroup, Vec<Arc<dyn BlockDevice>>), GroupError> {
    use crate::config::{ByteSize, DiskConfig, Interval, RingFullSetting};
    let config = GroupConfig {
        name: name.to_string(),
        ring: ring.to_path_buf(),
        ring_size: ByteSize(Group::existing_ring_size(ring).unwrap_or(ring_size)),
        block_size: ByteSize(crate::config::DEFAULT_BLOCK_SIZE),
        interval: Interval(crate::config::DEFAULT_INTERVAL),
        tracking: true,
        on_ring_full: RingFullSetting::Bitmap,
        throttle_max_delay: None,
        consumer: None,
        app_consistent: None,
        disks: disks
            .iter()
            .map(|(disk, image)| DiskConfig {
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
    open_group(&config, &shared, ExportNaming::GroupAndDisk)
}

fn open_images(config: &GroupConfig) -> Result<Vec<ImageFile>, GroupError> {
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
            .map_err(|source| GroupError::Image {
                disk: disk.name.clone(),
                path: disk.image.clone(),
                source,
            })
        })
        .collect()
}

/// The disks as the group runs them, with a file each to sync the image at shutdown.
fn running_disks(
    config: &GroupConfig,
    sizes: &[u64],
    naming: ExportNaming,
) -> Result<Vec<RunningDisk>, GroupError> {
    config
        .disks
        .iter()
        .zip(sizes)
        .map(|(disk, size)| {
            let sync_file = File::open(&disk.image).map_err(|source| GroupError::Image {
                disk: disk.name.clone(),
                path: disk.image.clone(),
                source,
            })?;
            Ok(RunningDisk {
                name: disk.name.clone(),
                export: naming.export(&config.name, &disk.name),
                image: disk.image.clone(),
                size: *size,
                read_only: disk.read_only,
                sync_file,
            })
        })
        .collect()
}

/// Makes the local copies a fresh ring starts from.
fn seed_local_copies(config: &GroupConfig, dir: &Path) -> Result<(), GroupError> {
    // The copy must be the images as they are when tracking starts: made before the
    // ring exists, so a crash in between just makes it again.
    info!(group = %config.name, dir = %dir.display(), "Tracking starts: making the local copies");
    for disk in &config.disks {
        let _ = std::fs::remove_file(LocalCopySink::copy_path(dir, &disk.name));
    }
    let named: Vec<(String, PathBuf)> = config
        .disks
        .iter()
        .map(|d| (d.name.clone(), d.image.clone()))
        .collect();
    LocalCopySink::seed(dir, &named).map_err(|source| GroupError::Consumer {
        group: config.name.clone(),
        source,
    })
}

/// Makes empty copies of the disks added to a group since its ring was made: the
/// tracker marks them whole, so the resync fills them. Made before the ring records
/// the disks, so a crash in between makes them again.
pub fn create_added_copies(
    config: &GroupConfig,
    dir: &Path,
    sizes: &[u64],
) -> Result<(), GroupError> {
    let Some(tracked) = Group::existing_disk_names(&config.ring) else {
        return Ok(());
    };
    let names = config.disks.iter().map(|disk| &disk.name);
    if tracked.len() > config.disks.len() || !names.zip(&tracked).all(|(a, b)| a == b) {
        // Not an addition: opening the ring refuses this configuration.
        return Ok(());
    }
    let added: Vec<(String, u64)> = config
        .disks
        .iter()
        .zip(sizes)
        .skip(tracked.len())
        .map(|(disk, size)| (disk.name.clone(), *size))
        .collect();
    if !added.is_empty() {
        info!(group = %config.name, dir = %dir.display(), disks = ?added, "Disks added: their local copies start empty and are filled by a resync");
    }
    LocalCopySink::create_empty(dir, &added).map_err(|source| GroupError::Consumer {
        group: config.name.clone(),
        source,
    })
}

/// Opens the group's ring, replays the log onto the images after a crash, and fences
/// the writes of a group a planned failover handed over (or may have). Returns the
/// tracker, whether its ring was just created, and whether the group was handed over.
fn open_tracker(config: &GroupConfig, sizes: &[u64]) -> Result<(Group, bool, bool), GroupError> {
    let (group, report) =
        Group::open(&tracker_config(config, sizes)).map_err(|source| GroupError::Tracker {
            group: config.name.clone(),
            source,
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
        replay(&group, config, sizes)?;
    }
    group.set_on_ring_full(config.on_ring_full());
    let record = Relationship::load_for_ring(&config.ring).ok().flatten();
    let handed_over = record.as_ref().is_some_and(Relationship::handed_over);
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
    Ok((group, fresh_ring, handed_over))
}

/// The shipper of a group with a consumer, over its tracker.
fn spawn_shipper(
    config: &GroupConfig,
    consumer: &ConsumerConfig,
    group: &Group,
    sizes: &[u64],
    shared: &SharedReplication,
    fresh_ring: bool,
) -> Result<Shipper, GroupError> {
    let mut replication = None;
    let sink: Box<dyn CycleSink> = match consumer {
        ConsumerConfig::Discard => Box::new(DiscardSink::default()),
        ConsumerConfig::Replica(replica) => {
            let (sink, setup) = super::replication::replica_sink(
                config,
                replica,
                shared,
                fresh_ring,
                wire::api::FIRST_EPOCH,
            )?;
            replication = Some(setup);
            sink
        }
        ConsumerConfig::LocalCopy { dir } => local_copy_sink(config, dir, sizes)?,
    };
    let images = config.disks.iter().map(|d| d.image.clone()).collect();
    let retry = match consumer {
        ConsumerConfig::Replica(replica) => RetryPolicy {
            scale: replica.retry_scale,
        },
        _ => RetryPolicy::default(),
    };
    let app_consistent = config
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
    Shipper::spawn(group.clone(), images, config.block_size.0, options, sink).map_err(|source| {
        GroupError::Shipper {
            group: config.name.clone(),
            source,
        }
    })
}

/// The consumer that applies cycles to local copies, which must exist.
fn local_copy_sink(
    config: &GroupConfig,
    dir: &Path,
    sizes: &[u64],
) -> Result<Box<dyn CycleSink>, GroupError> {
    let named: Vec<(String, u64)> = config
        .disks
        .iter()
        .zip(sizes)
        .map(|(d, s)| (d.name.clone(), *s))
        .collect();
    if let Some(missing) = named
        .iter()
        .map(|(name, _)| LocalCopySink::copy_path(dir, name))
        .find(|copy| !copy.exists())
    {
        return Err(GroupError::CopyMissing {
            group: config.name.clone(),
            copy: missing,
            ring: config.ring.clone(),
        });
    }
    let sink = LocalCopySink::open(dir, &named).map_err(|source| GroupError::Consumer {
        group: config.name.clone(),
        source,
    })?;
    Ok(Box::new(sink))
}

/// The devices NBD clients write through: each image behind its disk's tracker.
fn tracked_devices(
    config: &GroupConfig,
    images: Vec<ImageFile>,
    group: &Group,
) -> Result<Vec<Arc<dyn BlockDevice>>, GroupError> {
    let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for (index, image) in images.into_iter().enumerate() {
        let Some(disk_tracker) = group.disk(index) else {
            continue;
        };
        let device = TrackedDisk::new(image, disk_tracker).map_err(|source| GroupError::Image {
            disk: config.disks[index].name.clone(),
            path: config.disks[index].image.clone(),
            source,
        })?;
        devices.push(Arc::new(device) as Arc<dyn BlockDevice>);
    }
    Ok(devices)
}

/// The tracker configuration of a group whose images are open.
pub fn tracker_config(config: &GroupConfig, sizes: &[u64]) -> tracker::TrackerConfig {
    tracker::TrackerConfig {
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
pub fn replay(group: &Group, config: &GroupConfig, sizes: &[u64]) -> Result<(), GroupError> {
    let replay_error = |source| GroupError::Replay {
        group: config.name.clone(),
        source,
    };
    let view = group
        .recovery_view()
        .map_err(|source| GroupError::Tracker {
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
