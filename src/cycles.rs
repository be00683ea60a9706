//! `blkrep cycles`: closing cycles on a running daemon, and applying a stopped group's
//! log to its local copies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use shipper::{LocalCopySink, Shipper, ShipperError};
use thiserror::Error;
use tracker::{Group, TrackerError};

use crate::config::GroupConfig;
use crate::groups::{self, GroupError};

/// Errors of the offline apply.
#[derive(Debug, Error)]
pub enum CyclesError {
    /// The group is served by a running daemon.
    #[error("Group {group} is in use by a running primary; stop it first, or use `blkrep cycles close` against it")]
    InUse {
        /// Group name.
        group: String,
    },
    /// The group does not track writes.
    #[error("Group {0} has tracking = false, so it has no log to apply")]
    NotTracked(String),
    /// The ring does not exist.
    #[error("Group {group} has no ring at {ring}: tracking never started")]
    NoRing {
        /// Group name.
        group: String,
        /// The ring path.
        ring: PathBuf,
    },
    /// Opening, recovering or replaying failed.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The copies cannot be opened.
    #[error("Cannot open the copies in {dir}")]
    Copies {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: shipper::SinkError,
    },
    /// Delivering failed.
    #[error("Cannot apply the log")]
    Ship(#[from] ShipperError),
    /// Marking the ring clean failed.
    #[error("Cannot mark the ring clean")]
    Tracker(#[from] TrackerError),
    /// Threads could not start.
    #[error("Cannot start")]
    Setup(#[from] std::io::Error),
}

/// What an offline apply did.
#[derive(Debug, Serialize)]
pub struct ApplySummary {
    /// The group.
    pub group: String,
    /// The last cycle applied.
    pub cycle: u64,
    /// Bytes of data applied.
    pub bytes: u64,
    /// Whether the log was replayed onto the images first (after a crash).
    pub replayed: bool,
}

/// Recovers a stopped group's ring, replays it onto the images if the daemon crashed,
/// then applies every unacknowledged record to the copies in `dir` and acknowledges.
pub fn apply_offline(config: &GroupConfig, dir: &Path) -> Result<ApplySummary, CyclesError> {
    if !config.tracking {
        return Err(CyclesError::NotTracked(config.name.clone()));
    }
    if !config.ring.exists() {
        return Err(CyclesError::NoRing {
            group: config.name.clone(),
            ring: config.ring.clone(),
        });
    }
    let sizes = config
        .disks
        .iter()
        .map(|disk| {
            nbd_shim::backend::ImageFile::open(
                &disk.image,
                nbd_shim::backend::ImageFileOptions {
                    read_only: true,
                    direct: false,
                },
            )
            .map(|image| nbd_shim::BlockDevice::size(&image))
            .map_err(|source| GroupError::Image {
                disk: disk.name.clone(),
                path: disk.image.clone(),
                source,
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    groups::create_added_copies(config, dir, &sizes)?;
    let (group, report) = match Group::open(&groups::tracker_config(config, &sizes)) {
        Err(TrackerError::RingInUse(_)) => {
            return Err(CyclesError::InUse {
                group: config.name.clone(),
            })
        }
        Err(source) => {
            return Err(GroupError::Tracker {
                group: config.name.clone(),
                source,
            }
            .into())
        }
        Ok(opened) => opened,
    };
    let replayed = report.needs_replay();
    if replayed {
        groups::replay(&group, config, &sizes)?;
    }
    let named: Vec<(String, u64)> = config
        .disks
        .iter()
        .zip(&sizes)
        .map(|(d, s)| (d.name.clone(), *s))
        .collect();
    let sink = LocalCopySink::open(dir, &named).map_err(|source| CyclesError::Copies {
        dir: dir.to_path_buf(),
        source,
    })?;
    let images = config.disks.iter().map(|d| d.image.clone()).collect();
    let shipper = Shipper::spawn(
        group.clone(),
        images,
        config.block_size.0,
        shipper::ShipperOptions {
            interval: Duration::from_secs(86400),
            retry: shipper::RetryPolicy::default(),
            replication: None,
            // Applying offline: there is no running guest to freeze.
            app_consistent: None,
        },
        Box::new(sink),
    )?;
    let cycle = shipper.close_now(Duration::from_secs(86400))?;
    let bytes = shipper.status().bytes_delivered;
    shipper.stop();
    let image_files = config
        .disks
        .iter()
        .map(|disk| std::fs::File::open(&disk.image))
        .collect::<std::io::Result<Vec<_>>>()?;
    let fds: Vec<_> = image_files
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    group.shutdown_clean(&fds)?;
    Ok(ApplySummary {
        group: config.name.clone(),
        cycle,
        bytes,
        replayed,
    })
}
