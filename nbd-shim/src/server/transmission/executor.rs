//! Running one validated request on the device and encoding its reply.
//!
//! An [`Executor`] belongs to one thread (the connection thread or one worker) and appends
//! every reply to its own output buffer; the caller sends that buffer. A reply is encoded
//! only after the device call returned, so what the parent module promises about ordering
//! and durability holds for every request run here. A failed read replaces whatever it had
//! queued for itself with an error reply: nothing of it was sent yet.

use std::io;

use super::{len_usize, BatchStats};
use crate::backend::{BlockDevice, ZeroMode};
use crate::proto::reply::*;
use crate::proto::request::*;
use crate::proto::*;
use crate::server::buffers::OutBuf;
use crate::server::export::ContextSource;
use crate::server::handshake::Session;
use crate::server::ServerConfig;

/// A piece of a read: offset, length, and whether it is a hole.
pub(super) type Segment = (u64, u32, bool);

/// Hole chunks smaller than this are sent as data: a chunk per tiny hole costs more than
/// the zeroes.
const MIN_HOLE_CHUNK: u64 = 64 << 10;

/// Most block-status descriptors per chunk (the spec's limit is 2^20; this bounds the
/// reply to 512 KiB).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Executes validated requests and encodes their replies.
pub(super) struct Executor<'a> {
    dev: &'a dyn BlockDevice,
    pub(super) session: &'a Session,
    pub(super) out: OutBuf,
    pub(super) stats: BatchStats,
    sparse_read_threshold: Option<u32>,
}

impl<'a> Executor<'a> {
    pub(super) fn new(session: &'a Session, config: &ServerConfig) -> Self {
        Executor {
            dev: session.export.dev.as_ref(),
            session,
            out: OutBuf::new(64 << 10),
            stats: BatchStats::default(),
            sparse_read_threshold: config.sparse_read_threshold,
        }
    }

    fn reply_ok(&mut self, cookie: u64) {
        put_simple_reply(&mut self.out, cookie, 0);
    }

    /// Structured replies carry a message; without them only the errno goes out.
    pub(super) fn reply_error(&mut self, cookie: u64, errno: Errno, message: &str) {
        self.stats.errors += 1;
        if self.session.structured {
            put_error(&mut self.out, cookie, errno, message);
        } else {
            put_simple_reply(&mut self.out, cookie, errno.code());
        }
    }

    pub(super) fn reply_io(&mut self, request: &Request, result: io::Result<()>) {
        match result {
            Ok(()) => self.reply_ok(request.cookie),
            Err(err) => self.reply_device_error(request, &err),
        }
    }

    pub(super) fn reply_device_error(&mut self, request: &Request, err: &io::Error) {
        let errno = Errno::from_io_error(err);
        let command = request.op.command();
        if errno == Errno::Io {
            tracing::warn!(%command, offset = request.offset, length = request.length, %err, "device I/O error");
        } else {
            tracing::debug!(%command, offset = request.offset, length = request.length, %err, %errno, "device error");
        }
        let message = format!(
            "{command} at {}+{} failed: {err}",
            request.offset, request.length
        );
        self.reply_error(request.cookie, errno, &message);
    }

    pub(super) fn execute(&mut self, request: &Request, payload: &[u8]) {
        self.stats.requests += 1;
        let (offset, length) = (request.offset, u64::from(request.length));
        match request.op {
            Op::Read { df } => self.read(request, df),
            Op::Write { fua } => {
                let result = if payload.is_empty() {
                    Ok(())
                } else {
                    self.dev.write_at(payload, offset, fua)
                };
                if result.is_ok() {
                    self.stats.bytes_written += u64::from(request.length);
                }
                self.reply_io(request, result);
            }
            Op::Flush => {
                let result = self.dev.flush();
                self.reply_io(request, result);
            }
            Op::Trim { fua } => {
                let result = if length == 0 {
                    Ok(())
                } else {
                    self.dev.trim(offset, length, fua)
                };
                self.reply_io(request, result);
            }
            Op::Cache => {
                let result = if length == 0 {
                    Ok(())
                } else {
                    self.dev.cache(offset, length)
                };
                self.reply_io(request, result);
            }
            Op::WriteZeroes { fua, no_hole, fast } => {
                let mode = ZeroMode {
                    may_trim: !no_hole,
                    fast_only: fast,
                };
                let result = if length == 0 {
                    Ok(())
                } else {
                    self.dev.write_zeroes(offset, length, mode, fua)
                };
                self.reply_io(request, result);
            }
            Op::BlockStatus { req_one } => self.block_status(request, req_one),
            // Handled by the loop before execution; nothing to answer.
            Op::Disc => {}
        }
    }

    /// Makes `request`, a FUA write whose data the engine already wrote, durable, and
    /// answers it: the reply waits for the sync.
    pub(super) fn sync_written(&mut self, request: &Request) {
        let result = self.dev.flush();
        if result.is_ok() {
            self.stats.bytes_written += u64::from(request.length);
        }
        self.reply_io(request, result);
    }

    fn read(&mut self, request: &Request, df: bool) {
        let start = self.out.len();
        let len = len_usize(request.length);
        if !self.session.structured {
            put_simple_reply(&mut self.out, request.cookie, 0);
            let result = self.dev.read_at(self.out.tail(len), request.offset);
            match result {
                Ok(()) => {
                    self.out.commit(len);
                    self.stats.bytes_read += u64::from(request.length);
                }
                Err(err) => {
                    // Nothing was sent yet: replace the header with an error reply.
                    self.out.truncate(start);
                    self.reply_device_error(request, &err);
                }
            }
            return;
        }
        if request.length == 0 {
            put_none(&mut self.out, request.cookie);
            return;
        }
        let segments = self
            .sparse_segments(request, df)
            .unwrap_or_else(|| vec![(request.offset, request.length, false)]);
        self.read_in_segments(request, &segments);
    }

    /// Answers `request`, a read with structured replies, with one chunk per segment
    /// (data read from the device, or a hole): what [`Executor::sparse_segments`]
    /// found for it.
    pub(super) fn read_sparse(&mut self, request: &Request, segments: &[Segment]) {
        self.stats.requests += 1;
        self.read_in_segments(request, segments);
    }

    fn read_in_segments(&mut self, request: &Request, segments: &[Segment]) {
        let start = self.out.len();
        let last = segments.len().saturating_sub(1);
        for (i, &(offset, length, hole)) in segments.iter().enumerate() {
            // Everything is read before anything is sent, so the last content chunk can
            // carry DONE: no error can be found while transmitting it.
            let done = i == last;
            if hole {
                put_offset_hole(&mut self.out, request.cookie, offset, length, done);
                continue;
            }
            put_offset_data_header(&mut self.out, request.cookie, offset, length, done);
            let n = len_usize(length);
            if let Err(err) = self.dev.read_at(self.out.tail(n), offset) {
                self.out.truncate(start);
                self.reply_device_error(request, &err);
                return;
            }
            self.out.commit(n);
        }
        self.stats.bytes_read += u64::from(request.length);
    }

    /// The data and hole segments `request`, a read, is answered with when it has hole
    /// chunks: structured replies, no `DF`, at least the sparse threshold long, and
    /// holes in its range; `None` otherwise.
    pub(super) fn sparse_segments(&self, request: &Request, df: bool) -> Option<Vec<Segment>> {
        let sparse = self.session.structured
            && !df
            && self
                .sparse_read_threshold
                .is_some_and(|t| request.length >= t);
        if sparse {
            self.read_segments(request)
        } else {
            None
        }
    }

    /// Splits a large read into data and hole segments from `allocation()`; `None` when
    /// there is no hole worth a chunk (or allocation failed: then a plain read is right).
    fn read_segments(&self, request: &Request) -> Option<Vec<Segment>> {
        let extents = self
            .dev
            .allocation(request.offset, u64::from(request.length))
            .ok()?;
        let end = request.offset + u64::from(request.length);
        let mut segments: Vec<(u64, u32, bool)> = Vec::new();
        let mut at = request.offset;
        for extent in extents {
            if at >= end || extent.length == 0 {
                break;
            }
            let piece = extent.length.min(end - at);
            let zero = extent.flags & NBD_STATE_ZERO != 0 && piece >= MIN_HOLE_CHUNK;
            // piece ≤ request length, a u32.
            let piece32 = u32::try_from(piece).ok()?;
            match segments.last_mut() {
                Some((_, len, was_zero)) if *was_zero == zero => *len += piece32,
                _ => segments.push((at, piece32, zero)),
            }
            at += piece;
        }
        if at < end {
            // Whatever allocation() did not cover is read as data.
            let rest = u32::try_from(end - at).ok()?;
            match segments.last_mut() {
                Some((_, len, false)) => *len += rest,
                _ => segments.push((at, rest, false)),
            }
        }
        segments.iter().any(|s| s.2).then_some(segments)
    }

    fn block_status(&mut self, request: &Request, req_one: bool) {
        let (offset, length) = (request.offset, u64::from(request.length));
        let alignment = self.session.export.limits.minimum;
        let mut chunks = Vec::with_capacity(self.session.contexts.len());
        for &(id, source) in &self.session.contexts {
            let extents = match source {
                ContextSource::Allocation => match self.dev.allocation(offset, length) {
                    Ok(extents) => extents,
                    Err(err) => {
                        // "a server MAY reply with a single block status descriptor with
                        // *length* matching the requested length": status 0 (allocated,
                        // contents unknown) is always safe for base:allocation.
                        tracing::debug!(%err, "allocation() failed; reporting the range as allocated");
                        Vec::new()
                    }
                },
                ContextSource::Backend(index) => {
                    match self.dev.context_extents(index, offset, length) {
                        Ok(extents) => extents,
                        Err(err) => return self.reply_device_error(request, &err),
                    }
                }
            };
            let mut descriptors = descriptors_for(
                &extents,
                request.length,
                alignment,
                req_one,
                MAX_DESCRIPTORS,
            );
            if descriptors.is_empty() {
                if source != ContextSource::Allocation {
                    let err = io::Error::other("The backend returned no extents");
                    return self.reply_device_error(request, &err);
                }
                descriptors.push(Descriptor {
                    length: request.length,
                    flags: 0,
                });
            }
            chunks.push((id, descriptors));
        }
        let last = chunks.len().saturating_sub(1);
        for (i, (id, descriptors)) in chunks.iter().enumerate() {
            put_block_status(&mut self.out, request.cookie, *id, descriptors, i == last);
        }
    }
}
