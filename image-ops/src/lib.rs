//! image-ops: what both sides of replication do to a disk image.
//!
//! The replica applies received changes and compares its disks with the primary's;
//! the primary replays its own log after a crash, copies images for a local replica
//! or external media, and hashes its side of a comparison. Both use these
//! operations, so they live below `shipper` and `replica` and neither of those
//! depends on the other.
//!
//! - [`apply`] writes coalesced changes (from a closed cycle, or from the network)
//!   to disks. Applying is idempotent: a change says what its range holds, not how
//!   to get there, so re-applying a cycle after a crash gives the same disks.
//! - [`copy`] copies an image sparsely, finds data and holes, and drops what a pass
//!   read from the page cache behind it.
//! - [`hash`] hashes ranges with BLAKE3 for the block comparison of a resync.
//! - [`writeback`] starts the device writing early, so syncs find little left to do.
#![warn(missing_docs)]

pub mod apply;
pub mod copy;
pub mod hash;
pub mod writeback;

pub use apply::{ApplyError, ApplyStats, ReplicaDisk};
