//! replica: the side that receives changes.
//!
//! [`server`] is the replica server primaries send to over HTTPS with mutual TLS: it
//! authorises each primary, stores what it sends ([`store`]: offers, chunks, commits,
//! recovery points, failover) and applies it to the replica disks with the image
//! operations of `image_ops`. [`history`] keeps the undo data behind recovery points;
//! [`failover_drill`] runs a test failover on overlays; [`limits`] bounds what a
//! primary may make the server hold.
#![warn(missing_docs)]

pub mod failover_drill;
pub mod history;
pub mod limits;
pub mod server;
pub mod store;
