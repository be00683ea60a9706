//! nbd-shim: the NBD server that sits in front of every protected disk.
//!
//! Layout:
//! - [`proto`]: the wire format of doc/proto.md (NetworkBlockDevice/nbd): constants,
//!   option and request parsing, reply encoding. Pure code over byte slices, no I/O.
//! - [`backend`]: the [`BlockDevice`] trait an export is served from, and
//!   [`backend::ImageFile`], a raw image file or block device.
//! - [`engine`]: the I/O engine, an io_uring with an in-flight table that owns every
//!   buffer the kernel may touch; each connection reads through its own.
//! - [`server`]: listeners (unix and TCP, the latter optionally with TLS), the export
//!   registry, the handshake and the transmission loop of each connection.
//!
//! Contracts:
//! - Every request is parsed and validated against the export before any I/O or
//!   allocation sized by the peer (see [`proto::request`]).
//! - A write is acknowledged only after [`BlockDevice::write_at`] returned; with FUA
//!   only after it is durable. FLUSH on any connection makes every write completed on
//!   any connection of the export durable, which is what CAN_MULTI_CONN promises.
#![warn(missing_docs)]

pub mod backend;
pub mod engine;
pub mod proto;
pub mod server;
#[cfg(test)]
mod test_support;

pub use backend::{BlockDevice, Extent, PendingWrite, ZeroMode};
pub use server::{ExportStats, Server, ServerConfig, ServerError, SocketAccess, TlsPolicy};
