//! Reads through the connection's I/O engine, so a connection keeps as many reads in
//! flight as its client sends.
//!
//! A read whose range the device can serve from a file ([`BlockDevice::read_source`])
//! is queued on the connection's [`IoEngine`] with a buffer of its own, and all reads
//! queued while parsing one batch of requests are submitted with one `io_uring_enter`.
//! The kernel serves data in the page cache right there (the completion is ready when
//! the submit returns) and hands the rest to its workers, so a connection has as many
//! reads waiting on the disk as its client sent. (A `preadv2(RWF_NOWAIT)` probe before
//! queueing was measured too: it adds a syscall per read and won nothing.) When a read
//! completes, its reply header is encoded and kept with its buffer until the connection
//! next sends, which writes them with the rest of its output in one `writev`. Replies
//! go out of order, which the spec allows (clients match cookies).
//!
//! Ownership: the engine's table owns a read's buffer until its completion; the
//! [`ReadyReply`] list owns it until it is sent; then it is kept for reuse.
//!
//! Bounds: at most [`ServerConfig::max_in_flight_bytes`] of read buffers are in flight;
//! a read that would exceed it, or find every engine slot taken, first waits for
//! completions (the device, not the client, so it cannot deadlock). Completed reads
//! count toward the connection's reply flush threshold, so they are sent (and their
//! buffers freed) as the connection goes, however long the client's request burst.
//!
//! Ending: the connection waits for every read in flight and sends its reply before it
//! closes; dropping the engine waits as well (see [`crate::engine`]).

use std::io::{self, IoSlice, Write};
use std::os::fd::BorrowedFd;

use super::executor::Executor;
use super::{len_usize, MAX_SPARE_BUFFER};
use crate::backend::BlockDevice;
use crate::engine::{IoBuf, IoEngine};
use crate::proto::reply::*;
use crate::proto::request::Request;
use crate::server::buffers::OutBuf;
use crate::server::ServerConfig;

/// Engine slots per connection: more reads than a client usually keeps in flight.
const ENGINE_DEPTH: u32 = 128;
/// Read buffers kept for reuse (the largest kept is the write pool's,
/// [`MAX_SPARE_BUFFER`]).
const MAX_SPARE_READ_BUFFERS: usize = 64;

/// A reply header (simple, or a structured `OFFSET_DATA` chunk header).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplyHead {
    bytes: [u8; 32],
    len: usize,
}

impl ReplySink for ReplyHead {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        self.bytes[self.len..end].copy_from_slice(bytes);
        self.len = end;
    }
}

impl ReplyHead {
    fn for_read(request: &Request, structured: bool) -> Self {
        let mut head = ReplyHead {
            bytes: [0; 32],
            len: 0,
        };
        if structured {
            put_offset_data_header(
                &mut head,
                request.cookie,
                request.offset,
                request.length,
                true,
            );
        } else {
            put_simple_reply(&mut head, request.cookie, 0);
        }
        head
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A completed read waiting to be sent.
pub(super) type ReadyReply = (ReplyHead, IoBuf);

/// The connection's engine reads.
pub(super) struct EngineReads<'a> {
    /// Set up at the first read that needs it; `None` after setting it up failed.
    engine: Option<IoEngine<'a, Request>>,
    setup_failed: bool,
    ready: Vec<ReadyReply>,
    /// Data bytes of the ready replies.
    ready_bytes: usize,
    spare: Vec<IoBuf>,
    bytes_in_flight: usize,
    max_bytes: usize,
}

impl<'a> EngineReads<'a> {
    pub(super) fn new(config: &ServerConfig) -> Self {
        EngineReads {
            engine: None,
            setup_failed: false,
            ready: Vec::new(),
            ready_bytes: 0,
            spare: Vec::new(),
            bytes_in_flight: 0,
            max_bytes: config.max_in_flight_bytes.max(1),
        }
    }

    /// Reads in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.engine.as_ref().map_or(0, IoEngine::in_flight)
    }

    /// The engine's descriptor to poll beside the socket, while reads are in flight.
    pub(super) fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.engine
            .as_ref()
            .filter(|engine| engine.in_flight() > 0)
            .map(IoEngine::poll_fd)
    }

    /// Serves `request` (a validated read, not sparse) if the device can read its range
    /// from a file. Returns `false` when the caller must run it the usual way.
    pub(super) fn try_read(
        &mut self,
        dev: &'a dyn BlockDevice,
        exec: &mut Executor<'_>,
        request: &Request,
    ) -> io::Result<bool> {
        let len = len_usize(request.length);
        if len == 0 {
            return Ok(false);
        }
        let Some(fd) = dev.read_source(request.offset, u64::from(request.length)) else {
            return Ok(false);
        };
        if self.engine.is_none() && !self.set_up() {
            return Ok(false);
        }
        // Room: a slot, and the memory bound (one read alone may always go).
        while self.in_flight() > 0
            && (!self.engine.as_ref().is_some_and(IoEngine::has_room)
                || self.bytes_in_flight.saturating_add(len) > self.max_bytes)
        {
            self.reap(exec, 1)?;
        }
        let Some(mut buf) = self.buffer(len) else {
            return Ok(false);
        };
        buf.set_len(len);
        let Some(engine) = self.engine.as_mut() else {
            return Ok(false);
        };
        if let Err(full) = engine.read(fd, request.offset, buf, *request) {
            // Cannot happen after the wait above; run it the usual way.
            self.spare.push(full.buf);
            return Ok(false);
        }
        exec.stats.requests += 1;
        self.bytes_in_flight += len;
        Ok(true)
    }

    fn set_up(&mut self) -> bool {
        if self.setup_failed {
            return false;
        }
        match IoEngine::new(ENGINE_DEPTH) {
            Ok(engine) => {
                self.engine = Some(engine);
                true
            }
            Err(err) => {
                tracing::warn!(%err, "could not set up io_uring; reads run one at a time");
                self.setup_failed = true;
                false
            }
        }
    }

    /// A buffer of at least `len` bytes, reused when one is spare.
    fn buffer(&mut self, len: usize) -> Option<IoBuf> {
        match self.spare.iter().position(|buf| buf.capacity() >= len) {
            Some(index) => Some(self.spare.swap_remove(index)),
            None => IoBuf::new(len).ok(),
        }
    }

    fn keep_spare(&mut self, buf: IoBuf) {
        if buf.capacity() <= MAX_SPARE_BUFFER && self.spare.len() < MAX_SPARE_READ_BUFFERS {
            self.spare.push(buf);
        }
    }

    /// Hands the reads queued so far to the kernel.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        match self.engine.as_mut() {
            Some(engine) => engine.submit(),
            None => Ok(()),
        }
    }

    /// Collects finished reads, waiting until at least `wait_for` have finished:
    /// successful ones join the ready replies, failed ones are answered in `exec.out`.
    pub(super) fn reap(&mut self, exec: &mut Executor<'_>, wait_for: usize) -> io::Result<()> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(());
        };
        let (ready, spare, bytes) = (&mut self.ready, &mut self.spare, &mut self.bytes_in_flight);
        let ready_bytes = &mut self.ready_bytes;
        let structured = exec.session.structured;
        engine.complete(wait_for, |done| {
            *bytes -= done.buf.len();
            match done.result {
                Ok(()) => {
                    exec.stats.bytes_read += u64::from(done.tag.length);
                    *ready_bytes += done.buf.len();
                    ready.push((ReplyHead::for_read(&done.tag, structured), done.buf));
                }
                Err(err) => {
                    exec.reply_device_error(&done.tag, &err);
                    spare.push(done.buf);
                }
            }
        })?;
        Ok(())
    }

    /// Waits for every read in flight.
    pub(super) fn drain(&mut self, exec: &mut Executor<'_>) -> io::Result<()> {
        while self.in_flight() > 0 {
            let all = self.in_flight();
            self.reap(exec, all)?;
        }
        Ok(())
    }

    /// Data bytes of the completed reads waiting to be sent (0: none wait, since a read
    /// of no bytes never goes to the engine).
    pub(super) fn ready_bytes(&self) -> usize {
        self.ready_bytes
    }

    /// Writes `out` and every ready read reply to `writer` (whole replies, one
    /// `writev` where the socket takes it all), then empties both.
    pub(super) fn send_with(&mut self, writer: &mut dyn Write, out: &mut OutBuf) -> io::Result<()> {
        let mut slices = Vec::with_capacity(1 + 2 * self.ready.len());
        if !out.is_empty() {
            slices.push(IoSlice::new(out.as_slice()));
        }
        for (head, buf) in &self.ready {
            slices.push(IoSlice::new(head.as_slice()));
            slices.push(IoSlice::new(buf.as_slice()));
        }
        let result = write_all_vectored(writer, &mut slices);
        drop(slices);
        out.clear();
        self.ready_bytes = 0;
        let ready = std::mem::take(&mut self.ready);
        for (_, buf) in ready {
            self.keep_spare(buf);
        }
        result
    }
}

/// Writes every byte of `slices`, retrying on `EINTR`.
fn write_all_vectored(writer: &mut dyn Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match writer.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
