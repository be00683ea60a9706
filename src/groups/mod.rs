//! The group runtime both daemons own.
//!
//! A group is a set of disks that replicate together (one VM): their images, the
//! tracker's log ring that records every write, and, when the group has a consumer,
//! the shipper that closes cycles and delivers them. The primary daemon runs the
//! groups of its configuration; the replica daemon runs the group of every replica
//! it failed over to, serving the replica's disks as the group's live disks and
//! replicating them back when asked. Both run them through this module, so every
//! group-level command ([`control`]), status report ([`report`]) and metric
//! ([`metrics`]) works the same whichever daemon runs the group.
//!
//! - [`open`]: opening a group's images and ring, recovering after a crash (the log
//!   is replayed onto the images before any client connects), and its shipper.
//! - [`replication`]: the consumer that sends to a replica server, starting
//!   replication on a running group (reverse replication) and the planned failover.
//! - [`tracked_disk`]: the block device NBD clients write through: each write is
//!   logged by the tracker before the image is written.
//!
//! Ownership: a daemon owns its [`RunningGroup`]s; their devices are handed to the
//! NBD server as exports named [`RunningDisk::export`]. Shutdown order is the
//! daemon's: stop the NBD server (no client writes any more), stop the shippers, then
//! [`RunningGroup::close`] syncs the images and marks the rings clean.

pub mod control;
pub mod metrics;
pub mod open;
pub mod replication;
pub mod report;
pub mod tracked_disk;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;

use shipper::Shipper;
use thiserror::Error;
use tracing::{error, info};
use tracker::Group;

use crate::config::{ConsumerConfig, GroupConfig};

pub use open::{
    create_added_copies, open_group, replay, serve_failed_over, tracker_config, SharedReplication,
};

/// Errors of opening and running a group.
#[derive(Debug, Error)]
pub enum GroupError {
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
}

/// A disk as the daemon runs it.
pub(crate) struct RunningDisk {
    name: String,
    /// Its NBD export (see [`open::ExportNaming`]).
    export: String,
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

    /// The settings the group was opened with.
    pub(crate) fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The NBD exports of its disks, in disk order.
    pub(crate) fn exports(&self) -> impl Iterator<Item = &str> {
        self.disks.iter().map(|disk| disk.export.as_str())
    }

    /// The group's shipper, if it has a consumer.
    pub(crate) fn shipper(&self) -> Option<&Shipper> {
        self.shipper.as_ref()
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
