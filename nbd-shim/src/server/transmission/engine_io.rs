//! Reads, and writes of devices that wait on I/O, through the connection's I/O
//! engine, so a connection keeps as many of them in flight as its client sends.
//!
//! **Reads.** A read whose range the device can serve from a file
//! ([`BlockDevice::read_source`]) is queued on the connection's [`IoEngine`] with a
//! buffer of its own, and all reads queued while parsing one batch of requests are
//! submitted with one `io_uring_enter`. The kernel serves data in the page cache right
//! there (the completion is ready when the submit returns) and hands the rest to its
//! workers, so a connection has as many reads waiting on the disk as its client sent.
//! (A `preadv2(RWF_NOWAIT)` probe before queueing was measured too: it adds a syscall
//! per read and won nothing.) When a read completes, its reply header is encoded and
//! kept with its buffer until the connection next sends, which writes them with the
//! rest of its output in one `writev`. Replies go out of order, which the spec allows
//! (clients match cookies).
//!
//! **Writes.** A write whose range the device can write to a file directly
//! ([`BlockDevice::write_target`]: an `O_DIRECT` image) is received into an aligned
//! buffer, begun on the device ([`BlockDevice::begin_write`]: a tracked disk logs it)
//! and queued on the engine like a read. Its reply goes out once the engine reports
//! the data written and the device's [`PendingWrite`] was finished with that result;
//! a FUA write is then made durable first ([`EngineIo::take_needing_sync`]: the
//! connection hands it to a worker, which syncs the device, with group commit on a
//! tracked disk, and answers it).
//!
//! **Never wait while holding writes.** A begun write may hold what the device keeps
//! for it ([`PendingWrite::holds`]: a tracked disk's log guard, which overlapping
//! writes, the workers' writes and the cycle close wait for) until the connection
//! reaps its completion. So, while such writes are in flight, the connection thread
//! blocks on nothing that could wait for them: it begins writes without waiting
//! ([`BlockDevice::begin_write`] with `may_wait = false`), and before it runs a write,
//! trim or zeroing inline, waits for a free worker, or waits for the rest of a payload
//! from the socket, it finishes every write in flight ([`EngineIo::settle_writes`]),
//! which only waits for the device. A FLUSH goes to a worker without settling: a sync
//! waits for no write, and covers only writes answered before it arrived. One
//! exception remains: sending replies blocks while the client does not read them, and
//! a client that stops reading holds its writes in flight meanwhile.
//!
//! Ownership: the engine's table owns a buffer until its completion; then a read's
//! [`ReadyReply`] owns it until it is sent; then it is kept for reuse.
//!
//! Bounds: at most [`ServerConfig::max_in_flight_bytes`] of buffers are in flight; an
//! operation that would exceed it, or find every engine slot taken, first waits for
//! completions (the device, not the client, so it cannot deadlock). Completed reads
//! count toward the connection's reply flush threshold, so they are sent (and their
//! buffers freed) as the connection goes, however long the client's request burst.
//!
//! Ending: the connection waits for every operation in flight and sends its reply
//! before it closes; dropping the engine waits as well (see [`crate::engine`]), and a
//! write dropped unreaped is reported failed to its device, which then trusts the file
//! rather than the data.

use std::io::{self, IoSlice, Write};
use std::os::fd::BorrowedFd;

use super::executor::Executor;
use super::{len_usize, MAX_SPARE_BUFFER};
use crate::backend::{BlockDevice, PendingWrite};
use crate::engine::{IoBuf, IoEngine};
use crate::proto::reply::*;
use crate::proto::request::{Op, Request};
use crate::server::buffers::OutBuf;
use crate::server::ServerConfig;

/// Engine slots per connection: more requests than a client usually keeps in flight.
const ENGINE_DEPTH: u32 = 128;
/// Buffers kept for reuse (the largest kept is the write pool's,
/// [`MAX_SPARE_BUFFER`]).
const MAX_SPARE_ENGINE_BUFFERS: usize = 64;

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

/// What an engine operation is for.
enum EngineOp<'a> {
    Read(Request),
    /// A write, and what its device keeps for it until it is finished.
    Write(Request, PendingWrite<'a>),
}

/// The connection's engine reads and writes.
pub(super) struct EngineIo<'a> {
    /// Set up at the first operation that needs it; `None` after setting it up failed.
    engine: Option<IoEngine<'a, EngineOp<'a>>>,
    setup_failed: bool,
    ready: Vec<ReadyReply>,
    /// Data bytes of the ready replies.
    ready_bytes: usize,
    spare: Vec<IoBuf>,
    bytes_in_flight: usize,
    writes_in_flight: usize,
    /// Writes in flight whose [`PendingWrite`] holds something.
    writes_holding: usize,
    /// FUA writes the engine wrote, waiting for their sync before their reply.
    needing_sync: Vec<Request>,
    max_bytes: usize,
}

impl<'a> EngineIo<'a> {
    pub(super) fn new(config: &ServerConfig) -> Self {
        EngineIo {
            engine: None,
            setup_failed: false,
            ready: Vec::new(),
            ready_bytes: 0,
            spare: Vec::new(),
            bytes_in_flight: 0,
            writes_in_flight: 0,
            writes_holding: 0,
            needing_sync: Vec::new(),
            max_bytes: config.max_in_flight_bytes.max(1),
        }
    }

    /// Operations in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.engine.as_ref().map_or(0, IoEngine::in_flight)
    }

    /// The engine's descriptor to poll beside the socket, while operations are in flight.
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
        let Some(mut buf) = self.room_for(exec, len)? else {
            return Ok(false);
        };
        buf.set_len(len);
        let Some(engine) = self.engine.as_mut() else {
            return Ok(false);
        };
        if let Err(full) = engine.read(fd, request.offset, buf, EngineOp::Read(*request)) {
            // Cannot happen after `room_for`; run it the usual way.
            self.spare.push(full.buf);
            return Ok(false);
        }
        exec.stats.requests += 1;
        self.bytes_in_flight += len;
        Ok(true)
    }

    /// An aligned buffer for the payload of `request` (a validated write)
    /// if the device can write its range through the engine, once there is room;
    /// `None` when the caller must run it the usual way. The caller fills the buffer
    /// and passes it to [`EngineIo::write`].
    pub(super) fn write_buffer(
        &mut self,
        dev: &'a dyn BlockDevice,
        exec: &mut Executor<'_>,
        request: &Request,
    ) -> io::Result<Option<IoBuf>> {
        let len = len_usize(request.length);
        if len == 0
            || dev
                .write_target(request.offset, u64::from(request.length))
                .is_none()
        {
            return Ok(None);
        }
        let Some(mut buf) = self.room_for(exec, len)? else {
            return Ok(None);
        };
        buf.set_len(len);
        Ok(Some(buf))
    }

    /// Begins `request`, a write whose payload `buf` holds, on the device and queues it
    /// on the engine. A device error is answered in `exec.out`.
    pub(super) fn write(
        &mut self,
        dev: &'a dyn BlockDevice,
        exec: &mut Executor<'_>,
        request: &Request,
        buf: IoBuf,
    ) -> io::Result<()> {
        exec.stats.requests += 1;
        let (offset, len) = (request.offset, u64::from(request.length));
        let begun = match dev.begin_write(buf.as_slice(), offset, self.writes_holding == 0) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                // It would wait for writes, maybe this connection's own: finish those
                // first, then it may wait for the others'.
                self.settle_writes(exec)?;
                dev.begin_write(buf.as_slice(), offset, true)
            }
            begun => begun,
        };
        let pending = match begun {
            Ok(pending) => pending,
            Err(err) => {
                exec.reply_device_error(request, &err);
                self.keep_spare(buf);
                return Ok(());
            }
        };
        // Checked before the buffer was handed out; the device may not change its mind,
        // but if it did, the write fails cleanly.
        let (Some(fd), Some(engine)) = (dev.write_target(offset, len), self.engine.as_mut()) else {
            let err = io::Error::other("The device has no file to write to");
            pending.finish(Err(&err));
            exec.reply_device_error(request, &err);
            self.keep_spare(buf);
            return Ok(());
        };
        let bytes = buf.len();
        let holds = pending.holds();
        if let Err(full) = engine.write(fd, offset, buf, EngineOp::Write(*request, pending)) {
            // Cannot happen after `write_buffer` made room (nothing was queued since).
            let err = io::Error::other("No room for the write on the I/O engine");
            if let EngineOp::Write(_, pending) = full.tag {
                pending.finish(Err(&err));
            }
            exec.reply_device_error(request, &err);
            self.keep_spare(full.buf);
            return Ok(());
        }
        self.bytes_in_flight += bytes;
        self.writes_in_flight += 1;
        self.writes_holding += usize::from(holds);
        Ok(())
    }

    /// Waits until every write in flight has completed and is answered in `exec.out`,
    /// if any of them holds something: before the connection thread does anything that
    /// could wait for other writes.
    pub(super) fn settle_writes(&mut self, exec: &mut Executor<'_>) -> io::Result<()> {
        if self.writes_holding == 0 {
            return Ok(());
        }
        self.submit()?;
        while self.writes_in_flight > 0 {
            self.reap(exec, 1)?;
        }
        Ok(())
    }

    /// A buffer of `len` bytes once a slot and the memory bound allow one more operation
    /// (one alone may always go); `None` without an engine or memory.
    fn room_for(&mut self, exec: &mut Executor<'_>, len: usize) -> io::Result<Option<IoBuf>> {
        if self.engine.is_none() && !self.set_up() {
            return Ok(None);
        }
        while self.in_flight() > 0
            && (!self.engine.as_ref().is_some_and(IoEngine::has_room)
                || self.bytes_in_flight.saturating_add(len) > self.max_bytes)
        {
            self.submit()?;
            self.reap(exec, 1)?;
        }
        Ok(self.buffer(len))
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
                tracing::warn!(%err, "could not set up io_uring; reads and direct writes run one at a time");
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
        keep_spare(&mut self.spare, buf);
    }

    /// Hands the reads queued so far to the kernel.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        match self.engine.as_mut() {
            Some(engine) => engine.submit(),
            None => Ok(()),
        }
    }

    /// Collects finished operations, waiting until at least `wait_for` have finished:
    /// successful reads join the ready replies; writes are finished on their device and
    /// answered in `exec.out`, as are failed reads.
    pub(super) fn reap(&mut self, exec: &mut Executor<'_>, wait_for: usize) -> io::Result<()> {
        let Some(engine) = self.engine.as_mut() else {
            return Ok(());
        };
        let (ready, spare, bytes) = (&mut self.ready, &mut self.spare, &mut self.bytes_in_flight);
        let (ready_bytes, writes) = (&mut self.ready_bytes, &mut self.writes_in_flight);
        let holding = &mut self.writes_holding;
        let needing_sync = &mut self.needing_sync;
        let structured = exec.session.structured;
        engine.complete(wait_for, |done| {
            *bytes -= done.buf.len();
            match (done.tag, done.result) {
                (EngineOp::Read(request), Ok(())) => {
                    exec.stats.bytes_read += u64::from(request.length);
                    *ready_bytes += done.buf.len();
                    ready.push((ReplyHead::for_read(&request, structured), done.buf));
                }
                (EngineOp::Read(request), Err(err)) => {
                    exec.reply_device_error(&request, &err);
                    keep_spare(spare, done.buf);
                }
                (EngineOp::Write(request, pending), result) => {
                    *writes -= 1;
                    *holding -= usize::from(pending.holds());
                    pending.finish(result.as_ref().map(|_| ()));
                    match (result, request.op) {
                        // Durable first: the connection has it synced, then answered.
                        (Ok(()), Op::Write { fua: true }) => needing_sync.push(request),
                        (result, _) => {
                            if result.is_ok() {
                                exec.stats.bytes_written += u64::from(request.length);
                            }
                            exec.reply_io(&request, result);
                        }
                    }
                    keep_spare(spare, done.buf);
                }
            }
        })?;
        Ok(())
    }

    /// The FUA writes written since the last call, to be synced and then answered.
    pub(super) fn take_needing_sync(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.needing_sync)
    }

    /// Waits for every operation in flight.
    pub(super) fn drain(&mut self, exec: &mut Executor<'_>) -> io::Result<()> {
        self.submit()?;
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

/// Keeps `buf` for reuse unless `spare` is full or it is too large to keep.
fn keep_spare(spare: &mut Vec<IoBuf>, buf: IoBuf) {
    if buf.capacity() <= MAX_SPARE_BUFFER && spare.len() < MAX_SPARE_ENGINE_BUFFERS {
        spare.push(buf);
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
