//! base: the few helpers every blkrep crate needs, kept in one leaf crate so that
//! each is written (and reasoned about) once.
//!
//! - [`priority`]: background threads (replication) below the threads serving VMs.
//! - [`sync`]: locks that survive a panicking holder.
//! - [`time`]: wall-clock time as Unix seconds and milliseconds.
#![warn(missing_docs)]

pub mod priority;
pub mod sync;
pub mod time;
