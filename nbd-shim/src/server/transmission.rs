//! The transmission phase of one connection.
//!
//! Loop: read as much as the socket gives into the receive buffer; parse, validate and
//! execute every complete request in it, in arrival order, appending replies to the output
//! buffer; when no complete request is left (just before the thread would block on
//! `read`), send all queued replies with one write. Replies therefore go out in request
//! order, and a reply is only queued after its request completed on the device (with FUA:
//! after it is durable).
//!
//! Buffers:
//! - A write whose header and payload fit in the receive buffer is passed to
//!   [`BlockDevice::write_at`] straight from it. A larger one is read into a reusable
//!   buffer sized after validation.
//! - Read data goes straight from [`BlockDevice::read_at`] into the output buffer, behind
//!   its reply header.
//! - The output buffer is sent early once it holds `reply_flush_threshold` bytes, so large
//!   reads stream out while later ones execute.
//!
//! Bad input: a wrong request magic means the stream is desynchronised and the connection
//! closes (after sending the replies already queued). Anything else that validation
//! refuses is answered with its errno; a refused write's payload is skipped so the
//! connection stays in sync and usable.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use super::buffers::{OutBuf, RecvBuf};
use super::export::ContextSource;
use super::handshake::Session;
use super::ServerConfig;
use crate::backend::{BlockDevice, ZeroMode};
use crate::proto::reply::*;
use crate::proto::request::*;
use crate::proto::*;

/// Hole chunks smaller than this are sent as data: a chunk per tiny hole costs more than
/// the zeroes.
const MIN_HOLE_CHUNK: u64 = 64 << 10;
/// Most block-status descriptors per chunk (the spec's limit is 2^20; this bounds the
/// reply to 512 KiB).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// How a connection's transmission phase ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests without `NBD_CMD_DISC`.
    PeerClosed,
    /// The server is shutting down; queued requests were answered.
    Shutdown,
}

/// Why a connection's transmission phase failed.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// The socket failed (the client vanished, possibly mid-request).
    #[error("Connection I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The request stream lost sync (bad magic); the connection was closed.
    #[error("Request stream desynchronised: {0}")]
    Desync(RequestError),
}

/// Per-batch counters, added to the export's atomics once per batch.
#[derive(Default)]
struct BatchStats {
    requests: u64,
    errors: u64,
    bytes_read: u64,
    bytes_written: u64,
}

/// Executes validated requests and encodes their replies.
struct Executor<'a> {
    dev: &'a dyn BlockDevice,
    session: &'a Session,
    out: OutBuf,
    stats: BatchStats,
    sparse_read_threshold: Option<u32>,
}

fn len_usize(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

impl Executor<'_> {
    fn reply_ok(&mut self, cookie: u64) {
        put_simple_reply(&mut self.out, cookie, 0);
    }

    /// Structured replies carry a message; without them only the errno goes out.
    fn reply_error(&mut self, cookie: u64, errno: Errno, message: &str) {
        self.stats.errors += 1;
        if self.session.structured {
            put_error(&mut self.out, cookie, errno, message);
        } else {
            put_simple_reply(&mut self.out, cookie, errno.code());
        }
    }

    fn reply_io(&mut self, request: &Request, result: io::Result<()>) {
        match result {
            Ok(()) => self.reply_ok(request.cookie),
            Err(err) => self.reply_device_error(request, &err),
        }
    }

    fn reply_device_error(&mut self, request: &Request, err: &io::Error) {
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

    fn execute(&mut self, request: &Request, payload: &[u8]) {
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
        let sparse = !df
            && self
                .sparse_read_threshold
                .is_some_and(|t| request.length >= t);
        let segments = if sparse {
            self.read_segments(request)
        } else {
            None
        };
        let segments = segments.unwrap_or_else(|| vec![(request.offset, request.length, false)]);
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

    /// Splits a large read into data and hole segments from `allocation()`; `None` when
    /// there is no hole worth a chunk (or allocation failed: then a plain read is right).
    fn read_segments(&self, request: &Request) -> Option<Vec<(u64, u32, bool)>> {
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

fn flush_out(stream: &mut impl Write, out: &mut OutBuf) -> io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out.as_slice())?;
        out.clear();
    }
    Ok(())
}

/// Serves `session` on `stream` until the client disconnects, the stream fails, or
/// `shutting_down` is set (then requests already received are answered first).
pub(crate) fn serve<S: Read + Write>(
    stream: &mut S,
    session: &Session,
    config: &ServerConfig,
    shutting_down: &AtomicBool,
) -> Result<Ending, TransmissionError> {
    let export = &session.export;
    let shape = ExportShape {
        size: session.size,
        limits: export.limits,
        transmission_flags: session.transmission_flags,
        structured_replies: session.structured,
        meta_contexts: session.contexts.len(),
    };
    let mut recv = RecvBuf::new(config.recv_buffer_size.max(64 << 10));
    let mut exec = Executor {
        dev: export.dev.as_ref(),
        session,
        out: OutBuf::new(64 << 10),
        stats: BatchStats::default(),
        sparse_read_threshold: config.sparse_read_threshold,
    };
    let mut large = Vec::new();
    let flush_threshold = config.reply_flush_threshold.max(1);

    let result = (|| loop {
        // Execute every complete request already received.
        loop {
            let pending = recv.pending();
            if pending.len() < REQUEST_HEADER_LEN {
                break;
            }
            let header = match RequestHeader::parse(pending) {
                Ok(header) => header,
                Err(err) => {
                    // Whatever was answered before the garbage still goes out.
                    let _ = flush_out(stream, &mut exec.out);
                    return Err(TransmissionError::Desync(err));
                }
            };
            let payload_len = len_usize(header.payload_len());
            let total = REQUEST_HEADER_LEN.saturating_add(payload_len);
            match header.validate(&shape) {
                Ok(Request { op: Op::Disc, .. }) => {
                    // "The server MUST handle all outstanding requests": all earlier ones
                    // are answered; the client sends nothing after it.
                    recv.consume(REQUEST_HEADER_LEN);
                    flush_out(stream, &mut exec.out)?;
                    return Ok(Ending::Disconnect);
                }
                Ok(request) if payload_len > 0 => {
                    if pending.len() >= total {
                        exec.execute(&request, &pending[REQUEST_HEADER_LEN..total]);
                        recv.consume(total);
                    } else if total <= recv.capacity() {
                        // Wait for the rest of the payload.
                        break;
                    } else {
                        // Larger than the receive buffer: gather it in `large`, sized now
                        // that the length is validated.
                        if large.len() < payload_len {
                            if large.try_reserve_exact(payload_len - large.len()).is_err() {
                                exec.stats.requests += 1;
                                exec.reply_error(
                                    request.cookie,
                                    Errno::NoMem,
                                    "Cannot allocate the write buffer",
                                );
                                let have = pending.len();
                                recv.consume(have);
                                recv.skip_from(
                                    stream,
                                    u64::try_from(total - have).unwrap_or(u64::MAX),
                                )?;
                                continue;
                            }
                            large.resize(payload_len, 0);
                        }
                        let have = pending.len() - REQUEST_HEADER_LEN;
                        large[..have].copy_from_slice(&pending[REQUEST_HEADER_LEN..]);
                        recv.clear();
                        // Queued replies go out before blocking on the payload.
                        flush_out(stream, &mut exec.out)?;
                        stream.read_exact(&mut large[have..payload_len])?;
                        exec.execute(&request, &large[..payload_len]);
                    }
                }
                Ok(request) => {
                    recv.consume(REQUEST_HEADER_LEN);
                    exec.execute(&request, &[]);
                }
                Err(err) => {
                    exec.stats.requests += 1;
                    tracing::debug!(?header, %err, "refused request");
                    exec.reply_error(header.cookie, err.errno(), &err.to_string());
                    // Skip a refused write's payload to stay in sync.
                    let have = pending.len().min(total);
                    recv.consume(have);
                    if have < total {
                        recv.skip_from(stream, u64::try_from(total - have).unwrap_or(u64::MAX))?;
                    }
                }
            }
            if exec.out.len() >= flush_threshold {
                flush_out(stream, &mut exec.out)?;
            }
        }

        // Nothing complete is left: send the replies before blocking.
        flush_out(stream, &mut exec.out)?;
        publish(export, &mut exec.stats);
        // No shutdown check here: shutdown has already shut the socket's read side, so
        // this read returns what the client had sent (those requests are answered too)
        // and then end-of-stream instead of blocking.
        let needed = match RequestHeader::parse(recv.pending()) {
            Ok(header) => REQUEST_HEADER_LEN.saturating_add(len_usize(header.payload_len())),
            Err(_) => REQUEST_HEADER_LEN,
        };
        recv.make_room(needed);
        if recv.fill_from(stream)? == 0 {
            if shutting_down.load(Ordering::Acquire) {
                return Ok(Ending::Shutdown);
            }
            if recv.pending_len() > 0 {
                return Err(TransmissionError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            return Ok(Ending::PeerClosed);
        }
    })();
    publish(export, &mut exec.stats);
    result
}

fn publish(export: &super::export::Export, stats: &mut BatchStats) {
    let c = &export.counters;
    if stats.requests > 0 {
        c.requests.fetch_add(stats.requests, Ordering::Relaxed);
        c.errors.fetch_add(stats.errors, Ordering::Relaxed);
        c.bytes_read.fetch_add(stats.bytes_read, Ordering::Relaxed);
        c.bytes_written
            .fetch_add(stats.bytes_written, Ordering::Relaxed);
    }
    *stats = BatchStats::default();
}
