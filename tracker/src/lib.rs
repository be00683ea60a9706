//! tracker: the log ring and dirty maps of blkrep's write path.
//!
//! Every write, trim and write-zeroes acknowledged to an NBD client is first recorded
//! in its group's log ring ([`Group`], [`DiskTracker`]): a preallocated, mapped file of
//! checksummed records ([`record`]). A group is one VM; its disks share one ring and one
//! sequence, so closing a cycle is one instant across all of them. A closed cycle reads
//! back as coalesced changes ([`ClosedCycle`]); its ring space is freed only when the
//! consumer acknowledges it. When the ring fills, the group falls back to dirty maps
//! ([`bitmap`]) and needs a resync, or, with [`OnRingFull::Throttle`], first slows its
//! writers for a bounded time to keep the log.
//!
//! The write protocol, the ordering and durability guarantees, and crash recovery are
//! described in [`group`].
#![warn(missing_docs)]

use std::path::PathBuf;

use thiserror::Error;

pub mod activity;
pub mod bitmap;
pub mod cycle;
pub mod durability;
pub mod group;
mod le;
pub mod record;
pub mod superblock;

pub use bitmap::{AtomicBitmap, DirtyBits};
pub use cycle::{Change, ChangeData, ClosedCycle, CycleStats};
pub use group::{
    DiskSpec, DiskStatus, DiskTracker, Group, GroupStatus, LogGuard, OnRingFull, OpenReport,
    PreviousShutdown, ThrottleStats, TrackerConfig, TrackingMode,
};
pub use superblock::ResyncReason;

/// Errors of the tracker.
#[derive(Debug, Error)]
pub enum TrackerError {
    /// A file operation failed.
    #[error("Cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the ring.
    #[error("Ring {0} is in use by another process (a running primary?)")]
    RingInUse(PathBuf),
    /// The ring on disk does not fit the configuration.
    #[error("Ring {path} does not match the configuration: {detail}; to start tracking afresh, ship or apply its pending cycles, then delete it")]
    RingMismatch {
        /// The ring file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The superblock cannot be read or written.
    #[error("Ring superblock unusable")]
    Superblock(#[source] superblock::SuperblockError),
    /// Invalid group configuration.
    #[error("Invalid group configuration: {0}")]
    Config(String),
    /// A range beyond the disk's end.
    #[error("Range beyond the end of the disk")]
    OutOfRange,
    /// The group must be resynchronised before cycles can ship again.
    #[error("Resync required: {0}")]
    ResyncRequired(ResyncReason),
    /// A closed cycle or recovery view is already being read.
    #[error("Another consumer is reading this group's cycles")]
    ConsumerBusy,
    /// Recovery views replay the log; they cannot be acknowledged.
    #[error("A recovery view cannot be acknowledged")]
    RecoveryViewAck,
    /// The group refuses writes ([`Group::refuse_writes`]).
    #[error("Writes to this group are refused")]
    WritesRefused,
    /// [`DiskTracker::try_log_write`] would have had to wait for other writes.
    #[error("The write would wait for writes in flight")]
    WouldWait,
}
