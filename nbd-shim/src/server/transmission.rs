//! The transmission phase of one connection.
//!
//! The connection thread reads as much as the socket gives into the receive buffer and
//! parses and validates every complete request in it, in arrival order. Then:
//! - Reads of a range the device serves from a file, and writes of a range the device
//!   writes to a file directly (an `O_DIRECT` image; with FUA, a worker syncs the
//!   device once the data is written, then answers), go to the connection's
//!   I/O engine ([`engine_io`]): queued on its io_uring with the others of the batch,
//!   submitted together (cached data completes during the submit) and answered as they
//!   complete. While they are in flight the thread waits on the socket and the ring
//!   together, and finishes its writes before anything that could wait for writes.
//! - Other requests that complete quickly (writes of a buffered image, trims, zeroing,
//!   block status, reads of other devices) run right there; their replies are appended
//!   to the output buffer, which is sent with one write just before the thread would
//!   block on `read`.
//! - Requests that wait (FLUSH, CACHE, anything with FUA, and the writes and reads the
//!   engine does not take of a device that
//!   [waits on I/O](crate::backend::BlockDevice::waits_on_device)) become jobs for the
//!   connection's workers ([`pool`]): up to [`ServerConfig::parallel_requests`] scoped
//!   threads, started as concurrency needs them. A worker runs the job and sends its reply
//!   through the shared writer as soon as it is done, so replies go out of order (the spec
//!   allows it; clients match them by cookie).
//!
//! Ordering and durability: a reply is sent only after its request completed on the
//! device (with FUA: after it is durable). A FLUSH covers every write answered before it
//! arrived, since those completed before it was even parsed. Writes still in flight when
//! a FLUSH arrives need not be covered (NBD spec, "Ordering of messages and writes").
//!
//! Buffers: a write executed inline uses its payload straight from the receive buffer (or,
//! if larger, from a reusable buffer sized after validation). A job owns its payload
//! buffer until its worker is done; buffers are recycled. The connection stops reading
//! while [`ServerConfig::max_in_flight_bytes`] of payload or `parallel_requests` jobs are
//! in flight, so a client cannot make the server buffer without bound.
//!
//! Ending: on DISC, end of stream or shutdown, the workers finish every job already
//! received and send its reply before the connection closes. A worker that cannot send
//! (the client vanished) makes the remaining jobs be dropped unanswered.
//!
//! Bad input: a wrong request magic means the stream is desynchronised and the connection
//! closes (after sending the replies already queued). Anything else that validation
//! refuses is answered with its errno; a refused write's payload is skipped so the
//! connection stays in sync and usable.

use std::io::{self, Read, Write};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::buffers::{OutBuf, RecvBuf};
use super::handshake::Session;
use super::ServerConfig;
use crate::engine::IoBuf;
use crate::proto::request::*;
use crate::proto::*;

mod engine_io;
mod executor;
mod pool;

use engine_io::EngineIo;
use executor::Executor;
use pool::{Job, Pool, Shared};

/// Payload (and read) buffers up to this size are kept for reuse.
const MAX_SPARE_BUFFER: usize = 4 << 20;
/// At most this many are kept.
const MAX_SPARE_BUFFERS: usize = 8;

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

fn len_usize(len: u32) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// Where replies go: the connection's own stream (every request runs on the connection
/// thread, in order) or a shared writer that workers send through too.
#[derive(Clone, Copy)]
enum Replies<'w> {
    Inline,
    Shared(&'w Mutex<dyn Write + Send + 'w>),
}

impl Replies<'_> {
    /// Sends everything in `out`, which must hold whole replies.
    fn send(self, stream: &mut impl Write, out: &mut OutBuf) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        match self {
            Replies::Inline => {
                stream.write_all(out.as_slice())?;
                out.clear();
                Ok(())
            }
            Replies::Shared(writer) => send_shared(writer, out),
        }
    }
}

/// Sends the whole replies in `out` through the connection's shared writer, so no other
/// thread's reply interleaves with them.
fn send_shared(writer: &Mutex<dyn Write + Send + '_>, out: &mut OutBuf) -> io::Result<()> {
    if !out.is_empty() {
        writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(out.as_slice())?;
    }
    out.clear();
    Ok(())
}

/// Serves `session` on `stream` until the client disconnects, the stream fails, or
/// `shutting_down` is set (then requests already received are answered first).
///
/// With `socket`, the descriptor `stream` reads from (kept open by `stream` throughout),
/// reads of files run on an I/O engine, many at once; without, one at a time.
/// With `writer` (a second handle on the same stream) and
/// [`ServerConfig::parallel_requests`] > 0, slow requests run on worker threads and are
/// answered as they finish; without, every request runs in order on this thread.
pub(crate) fn serve<S: Read + Write>(
    stream: &mut S,
    socket: Option<RawFd>,
    writer: Option<&Mutex<dyn Write + Send + '_>>,
    session: &Session,
    config: &ServerConfig,
    shutting_down: &AtomicBool,
) -> Result<Ending, TransmissionError> {
    let writer = match writer {
        Some(writer) if config.parallel_requests > 0 => writer,
        _ => {
            return Connection::new(session, config, socket, Replies::Inline, None)
                .run(stream, shutting_down)
        }
    };
    let shared = Shared {
        writer,
        state: Mutex::default(),
        finished: Condvar::new(),
    };
    let (jobs, queue) = crossbeam_channel::unbounded();
    let result = thread::scope(|scope| {
        let pool = Pool {
            scope,
            shared: &shared,
            session,
            config,
            jobs,
            queue,
            max_workers: config.parallel_requests,
            max_bytes: config.max_in_flight_bytes.max(1),
        };
        Connection::new(session, config, socket, Replies::Shared(writer), Some(pool))
            .run(stream, shutting_down)
        // Dropping the pool closes the queue; the scope waits for the workers to finish
        // every job already received.
    });
    let lost = shared.lock().failed.take();
    match (result, lost) {
        (Ok(_), Some(err)) => Err(TransmissionError::Io(err)),
        (result, _) => result,
    }
}

/// The connection thread: reads, parses and validates requests, runs the quick ones and
/// hands the slow ones to the pool.
struct Connection<'a, 'scope, 'env> {
    exec: Executor<'a>,
    dev: &'a dyn crate::backend::BlockDevice,
    engine_io: EngineIo<'a>,
    /// The socket's descriptor, to wait on beside the engine's; without it reads run
    /// one at a time.
    socket: Option<RawFd>,
    replies: Replies<'a>,
    pool: Option<Pool<'scope, 'env>>,
    recv: RecvBuf,
    /// Payload buffer for writes larger than the receive buffer that run inline.
    large: Vec<u8>,
    flush_threshold: usize,
    device_waits: bool,
}

impl<'a, 'scope, 'env> Connection<'a, 'scope, 'env> {
    fn new(
        session: &'a Session,
        config: &'a ServerConfig,
        socket: Option<RawFd>,
        replies: Replies<'a>,
        pool: Option<Pool<'scope, 'env>>,
    ) -> Self {
        Connection {
            exec: Executor::new(session, config),
            dev: session.export.dev.as_ref(),
            engine_io: EngineIo::new(config),
            socket,
            replies,
            pool,
            recv: RecvBuf::new(config.recv_buffer_size.max(64 << 10)),
            large: Vec::new(),
            flush_threshold: config.reply_flush_threshold.max(1),
            device_waits: session.export.dev.waits_on_device(),
        }
    }

    /// Sends the queued replies, with the engine's completed reads.
    fn send_queued(&mut self, stream: &mut impl Write) -> io::Result<()> {
        if self.engine_io.ready_bytes() == 0 {
            return self.replies.send(stream, &mut self.exec.out);
        }
        match self.replies {
            Replies::Inline => self.engine_io.send_with(stream, &mut self.exec.out),
            Replies::Shared(writer) => {
                let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
                self.engine_io.send_with(&mut *writer, &mut self.exec.out)
            }
        }
    }

    fn run<S: Read + Write>(
        mut self,
        stream: &mut S,
        shutting_down: &AtomicBool,
    ) -> Result<Ending, TransmissionError> {
        let mut result = self.run_loop(stream, shutting_down);
        // Operations still in flight are answered before the connection closes; after
        // an error too, so that every write is finished on its device (and a FUA
        // write made durable).
        let drained = self
            .engine_io
            .drain(&mut self.exec)
            .and_then(|()| self.sync_completed_fua_writes(stream));
        if let Err(err) = drained {
            if result.is_ok() {
                result = Err(err.into());
            }
        }
        // Whatever was answered before an error (e.g. garbage) still goes out.
        let sent = self.send_queued(stream);
        publish(&self.exec.session.export, &mut self.exec.stats);
        match (result, sent) {
            (Ok(ending), Err(err)) if ending != Ending::Shutdown => Err(err.into()),
            (result, _) => result,
        }
    }

    fn run_loop<S: Read + Write>(
        &mut self,
        stream: &mut S,
        shutting_down: &AtomicBool,
    ) -> Result<Ending, TransmissionError> {
        let shape = ExportShape {
            size: self.exec.session.size,
            limits: self.exec.session.export.limits,
            transmission_flags: self.exec.session.transmission_flags,
            structured_replies: self.exec.session.structured,
            meta_contexts: self.exec.session.contexts.len(),
        };
        loop {
            // Execute every complete request already received.
            while let Some(ending) = self.next_request(stream, &shape)? {
                if let Some(ending) = ending {
                    return Ok(ending);
                }
            }
            // Nothing complete is left: start the reads queued, collect those done and
            // send the replies before blocking.
            self.engine_io.submit()?;
            self.engine_io.reap(&mut self.exec, 0)?;
            self.sync_completed_fua_writes(stream)?;
            self.send_queued(stream)?;
            publish(&self.exec.session.export, &mut self.exec.stats);
            if let Some(pool) = &self.pool {
                if let Some(err) = pool.shared.lock().failed.take() {
                    return Err(err.into());
                }
            }
            // No shutdown check here: shutdown has already shut the socket's read side, so
            // this read returns what the client had sent (those requests are answered too)
            // and then end-of-stream instead of blocking.
            let needed = match RequestHeader::parse(self.recv.pending()) {
                Ok(header) => REQUEST_HEADER_LEN.saturating_add(len_usize(header.payload_len())),
                Err(_) => REQUEST_HEADER_LEN,
            };
            self.recv.make_room(needed);
            if !self.wait_for_input()? {
                // A read completed first: answer it.
                continue;
            }
            if self.recv.fill_from(stream)? == 0 {
                if shutting_down.load(Ordering::Acquire) {
                    return Ok(Ending::Shutdown);
                }
                if self.recv.pending_len() > 0 {
                    return Err(TransmissionError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                return Ok(Ending::PeerClosed);
            }
        }
    }

    /// While reads are in flight, waits until either the client sent something (`true`)
    /// or a read completed (`false`). Without reads in flight, the caller's `read` blocks.
    fn wait_for_input(&self) -> io::Result<bool> {
        let (Some(ring), Some(socket)) = (self.engine_io.poll_fd(), self.socket) else {
            return Ok(true);
        };
        // SAFETY: `serve`'s caller keeps the socket open while the connection runs.
        let socket = unsafe { BorrowedFd::borrow_raw(socket) };
        let mut fds = [
            PollFd::new(socket, PollFlags::POLLIN),
            PollFd::new(ring, PollFlags::POLLIN),
        ];
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(err) => return Err(err.into()),
            }
        }
        // Any event on the socket (data, hang-up, error) is for `read` to report.
        Ok(fds[0].revents().is_some_and(|events| !events.is_empty()))
    }

    /// Handles the first buffered request. `None`: no complete request is buffered;
    /// `Some(None)`: one was handled; `Some(Some(ending))`: the connection ends.
    fn next_request<S: Read + Write>(
        &mut self,
        stream: &mut S,
        shape: &ExportShape,
    ) -> Result<Option<Option<Ending>>, TransmissionError> {
        let pending = self.recv.pending();
        if pending.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let header = RequestHeader::parse(pending).map_err(TransmissionError::Desync)?;
        let payload_len = len_usize(header.payload_len());
        let total = REQUEST_HEADER_LEN.saturating_add(payload_len);
        let have = pending.len();
        let request = match header.validate(shape) {
            Ok(request) => request,
            Err(err) => {
                self.exec.stats.requests += 1;
                tracing::debug!(?header, %err, "refused request");
                self.exec
                    .reply_error(header.cookie, err.errno(), &err.to_string());
                // Skip a refused write's payload to stay in sync.
                self.recv.consume(have.min(total));
                if have < total {
                    self.engine_io.settle_writes(&mut self.exec)?;
                    self.recv
                        .skip_from(stream, u64::try_from(total - have).unwrap_or(u64::MAX))?;
                }
                return self.after_request(stream);
            }
        };
        if request.op == Op::Disc {
            // "The server MUST handle all outstanding requests": all earlier ones are
            // answered (the pool finishes its jobs before the connection closes); the
            // client sends nothing after it.
            self.recv.consume(REQUEST_HEADER_LEN);
            return Ok(Some(Some(Ending::Disconnect)));
        }
        if have < total && total <= self.recv.capacity() {
            // Wait for the rest of the payload.
            return Ok(None);
        }
        if let Op::Read { df } = request.op {
            // Asked once: a device's allocation() may cost a system call per extent.
            match self.exec.sparse_segments(&request, df) {
                // With holes: answered here, unless a worker must read the device.
                Some(segments) if !self.device_waits || self.pool.is_none() => {
                    self.exec.read_sparse(&request, &segments);
                    self.recv.consume(total);
                    return self.after_request(stream);
                }
                Some(_) => {}
                None if self.socket.is_some()
                    && self
                        .engine_io
                        .try_read(self.dev, &mut self.exec, &request)? =>
                {
                    self.recv.consume(total);
                    return self.after_request(stream);
                }
                None => {}
            }
        }
        if matches!(request.op, Op::Write { .. }) && self.socket.is_some() && self.device_waits {
            if let Some(buf) = self
                .engine_io
                .write_buffer(self.dev, &mut self.exec, &request)?
            {
                self.write_on_engine(stream, &request, buf, payload_len)?;
                return self.after_request(stream);
            }
        }
        let to_pool = self
            .pool
            .as_ref()
            .is_some_and(|pool| pool.takes(&request, self.device_waits));
        if !to_pool && request.op.changes_data() {
            // Inline, it may wait for other writes (see `engine_io`).
            self.engine_io.settle_writes(&mut self.exec)?;
        }
        if to_pool {
            self.submit(stream, request, payload_len)?;
        } else if have >= total {
            self.exec
                .execute(&request, &pending[REQUEST_HEADER_LEN..total]);
            self.recv.consume(total);
        } else {
            self.execute_large(stream, request, payload_len)?;
        }
        self.after_request(stream)
    }

    /// Hands the FUA writes the engine completed to the workers, to be made durable
    /// and answered (inline without workers).
    fn sync_completed_fua_writes(&mut self, stream: &mut impl Write) -> io::Result<()> {
        let written = self.engine_io.take_needing_sync();
        if written.is_empty() {
            return Ok(());
        }
        let Some(pool) = self.pool.as_ref() else {
            self.engine_io.settle_writes(&mut self.exec)?;
            for request in &written {
                self.exec.sync_written(request);
            }
            return Ok(());
        };
        for request in written {
            let (replies, engine_io, exec) = (self.replies, &mut self.engine_io, &mut self.exec);
            pool.wait_for_room(0, || {
                engine_io.settle_writes(exec)?;
                replies.send(stream, &mut exec.out)
            })?;
            let job = Job {
                request,
                payload: Vec::new(),
                sync_only: true,
            };
            if let Some(job) = pool.submit(job) {
                self.engine_io.settle_writes(&mut self.exec)?;
                self.exec.sync_written(&job.request);
            }
        }
        Ok(())
    }

    fn after_request(
        &mut self,
        stream: &mut impl Write,
    ) -> Result<Option<Option<Ending>>, TransmissionError> {
        self.sync_completed_fua_writes(stream)?;
        // Completed engine reads count too: they hold memory until sent.
        if self.exec.out.len() + self.engine_io.ready_bytes() >= self.flush_threshold {
            self.send_queued(stream)?;
        }
        Ok(Some(None))
    }

    /// Fills `buf` with the payload of `request` (the buffered part, then the rest from
    /// the stream) and queues the write on the engine.
    fn write_on_engine(
        &mut self,
        stream: &mut (impl Read + Write),
        request: &Request,
        mut buf: IoBuf,
        payload_len: usize,
    ) -> io::Result<()> {
        let pending = self.recv.pending();
        let buffered = pending.len().min(REQUEST_HEADER_LEN + payload_len) - REQUEST_HEADER_LEN;
        let payload = buf.as_mut_slice();
        payload[..buffered]
            .copy_from_slice(&pending[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + buffered]);
        self.recv.consume(REQUEST_HEADER_LEN + buffered);
        if buffered < payload_len {
            // About to block on the client: no write may be held meanwhile, and the
            // client may be waiting for the replies queued.
            self.engine_io.settle_writes(&mut self.exec)?;
            self.send_queued(stream)?;
            stream.read_exact(&mut buf.as_mut_slice()[buffered..payload_len])?;
        }
        self.engine_io.write(self.dev, &mut self.exec, request, buf)
    }

    /// Runs inline a write whose payload is larger than the receive buffer: gathers it in
    /// `large`, sized now that the length is validated.
    fn execute_large(
        &mut self,
        stream: &mut (impl Read + Write),
        request: Request,
        payload_len: usize,
    ) -> io::Result<()> {
        if reserve_payload(&mut self.large, payload_len).is_err() {
            return self.refuse_payload(stream, &request, payload_len);
        }
        receive_payload(
            &mut self.recv,
            self.replies,
            &mut self.exec.out,
            stream,
            &mut self.large,
            payload_len,
        )?;
        self.exec.execute(&request, &self.large);
        Ok(())
    }

    /// Hands `request` to the pool with its payload (the buffered part and the rest read
    /// from the stream), once the pool has room for it.
    fn submit(
        &mut self,
        stream: &mut (impl Read + Write),
        request: Request,
        payload_len: usize,
    ) -> io::Result<()> {
        let Some(pool) = self.pool.as_ref() else {
            return Ok(());
        };
        let (replies, engine_io, exec) = (self.replies, &mut self.engine_io, &mut self.exec);
        // A full pool may wait for workers that wait for this connection's writes.
        pool.wait_for_room(payload_len, || {
            engine_io.settle_writes(exec)?;
            replies.send(stream, &mut exec.out)
        })?;
        let mut payload = match pool.payload_buffer(payload_len) {
            Ok(payload) => payload,
            Err(_) => return self.refuse_payload(stream, &request, payload_len),
        };
        receive_payload(
            &mut self.recv,
            self.replies,
            &mut self.exec.out,
            stream,
            &mut payload,
            payload_len,
        )?;
        let job = Job {
            request,
            payload,
            sync_only: false,
        };
        if let Some(job) = pool.submit(job) {
            self.engine_io.settle_writes(&mut self.exec)?;
            self.exec.execute(&job.request, &job.payload);
        }
        Ok(())
    }

    /// Answers ENOMEM for a write whose payload buffer cannot be allocated, and skips the
    /// payload.
    fn refuse_payload(
        &mut self,
        stream: &mut (impl Read + Write),
        request: &Request,
        payload_len: usize,
    ) -> io::Result<()> {
        self.exec.stats.requests += 1;
        self.exec.reply_error(
            request.cookie,
            Errno::NoMem,
            "Cannot allocate the write buffer",
        );
        self.engine_io.settle_writes(&mut self.exec)?;
        let total = REQUEST_HEADER_LEN + payload_len;
        let have = self.recv.pending_len().min(total);
        self.recv.consume(have);
        self.recv
            .skip_from(stream, u64::try_from(total - have).unwrap_or(u64::MAX))
    }
}

/// Makes room in `buf` for `len` bytes without allocating more than that.
fn reserve_payload(buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
    buf.clear();
    buf.try_reserve_exact(len)
        .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))
}

/// Sets `payload` to the `len`-byte payload of the request at the front of `recv`: the
/// part already buffered (copied once, not zeroed first), then the rest from the stream
/// (after sending the queued replies in `out`, since the client may wait for them).
/// Consumes the request.
fn receive_payload(
    recv: &mut RecvBuf,
    replies: Replies<'_>,
    out: &mut OutBuf,
    stream: &mut (impl Read + Write),
    payload: &mut Vec<u8>,
    len: usize,
) -> io::Result<()> {
    let pending = recv.pending();
    let buffered = pending.len().min(REQUEST_HEADER_LEN + len) - REQUEST_HEADER_LEN;
    payload.clear();
    payload.extend_from_slice(&pending[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + buffered]);
    recv.consume(REQUEST_HEADER_LEN + buffered);
    if buffered < len {
        replies.send(stream, out)?;
        payload.resize(len, 0);
        stream.read_exact(&mut payload[buffered..])?;
    }
    Ok(())
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
