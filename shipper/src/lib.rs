//! shipper: one thread per group that closes the group's cycle every interval and
//! delivers it to a consumer ([`CycleSink`]), acknowledging it only once the consumer
//! made it durable.
//!
//! Ordering: cycles are delivered oldest first, each exactly once per success; after a
//! failure the same cycles are delivered again at the next attempt (consumers apply
//! idempotently). A group that needs a resync is resynchronised through the same sink:
//! logging restarts, the marked blocks are copied from the images, and the next cycle
//! makes the fuzzy copy consistent.
#![warn(missing_docs)]

mod sink;
mod thread;

pub use sink::{CycleSink, DiscardSink, LocalCopySink, SinkError};
pub use thread::{error_chain, Shipper, ShipperError, ShipperStatus};
