//! replica: the side that receives changes.
//!
//! [`apply`] writes coalesced changes (from a closed cycle, or from the network) to
//! replica disks; [`copy`] makes the sparse copy a local replica starts from.
//! Applying is idempotent: a change says what its range holds, not how to get there,
//! so re-applying a cycle after a crash gives the same disks. [`writeback`] starts
//! the device writing early, so syncs find little left to do.
#![warn(missing_docs)]

pub mod apply;
pub mod compare;
pub mod copy;
pub mod failover_drill;
pub mod history;
pub mod limits;
pub mod server;
pub mod store;
pub mod writeback;

pub use apply::{ApplyError, ApplyStats, ReplicaDisk};
