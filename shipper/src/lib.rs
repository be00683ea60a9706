//! shipper: one thread per group that closes the group's cycle every interval and
//! delivers it to a consumer ([`CycleSink`]), acknowledging it only once the consumer
//! made it durable.
//!
//! The shipping path: [`thread`] schedules cycles, resyncs and retries; [`resync`]
//! reads the blocks a resync copies, after [`compare`] dropped those the consumer
//! has already; [`remote`] sends transfers to a replica server
//! over HTTPS through the stages of the [`pipeline`]; the local consumers live
//! beside the [`CycleSink`] trait; [`schedule`]
//! holds the retry table and the health rules; [`rpo`] measures the achieved
//! recovery point; [`measure`] keeps the figures of recent deliveries; [`freeze`] runs the freeze and thaw
//! commands of application-consistent points.
//!
//! Ordering: cycles are delivered oldest first, each exactly once per success; after a
//! failure the same cycles are delivered again at the next attempt (consumers apply
//! idempotently, and a replica resumes a transfer at the chunk it lacks). A group that
//! needs a resync is resynchronised through the same sink: logging restarts, the
//! marked blocks are copied from the images, and the next cycle makes the fuzzy copy
//! consistent.
#![warn(missing_docs)]

pub mod compare;
pub mod freeze;
pub mod measure;
pub mod media;
pub mod pipeline;
pub mod remote;
pub mod resync;
pub mod rpo;
pub mod schedule;
mod sink;
pub mod thread;

pub use freeze::AppConsistentOptions;
pub use remote::{RemoteOptions, RemoteSink};
pub use schedule::{Health, RetryPolicy};
pub use sink::{CycleSink, DiscardSink, LocalCopySink, Resume, SinkError};
pub use thread::{
    error_chain, AdminAction, AppConsistentReport, ReplicationSetup, ReplicationState, Shipper,
    ShipperError, ShipperOptions, ShipperStatus,
};
