//! The connection's workers: scoped threads that run the requests which wait (FLUSH,
//! CACHE, the sync of a FUA write, and what the engine does not take of a device that
//! waits on I/O), each answered through the shared writer as soon as it is done.
//!
//! Bounds: at most [`ServerConfig::parallel_requests`] jobs and
//! [`ServerConfig::max_in_flight_bytes`] of payload in flight; the connection thread
//! waits for room ([`Pool::wait_for_room`]) before it reads another payload. Payload
//! buffers are recycled. After a lost connection the remaining jobs are dropped
//! unanswered.

use std::io::{self, Write};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use crossbeam_channel::{Receiver, Sender};

use super::executor::Executor;
use super::{publish, reserve_payload, send_shared, MAX_SPARE_BUFFER, MAX_SPARE_BUFFERS};
use crate::proto::request::*;
use crate::server::handshake::Session;
use crate::server::ServerConfig;

/// A request handed to a worker, with its payload.
pub(super) struct Job {
    pub(super) request: Request,
    pub(super) payload: Vec<u8>,
    /// The request (a FUA write) already ran on the engine: only make it durable, then
    /// answer it.
    pub(super) sync_only: bool,
}

/// What the connection thread and its workers share.
pub(super) struct Shared<'w> {
    pub(super) writer: &'w Mutex<dyn Write + Send + 'w>,
    pub(super) state: Mutex<WorkState>,
    /// Signalled whenever a job finishes.
    pub(super) finished: Condvar,
}

#[derive(Default)]
pub(super) struct WorkState {
    /// Jobs queued or running.
    in_flight: usize,
    /// Payload bytes they hold.
    in_flight_bytes: usize,
    workers: usize,
    /// The first reply a worker could not send: the connection is lost.
    pub(super) failed: Option<io::Error>,
    /// Payload buffers to reuse.
    spare: Vec<Vec<u8>>,
}

impl Shared<'_> {
    pub(super) fn lock(&self) -> MutexGuard<'_, WorkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The connection's workers: scoped threads, started as concurrent requests need them.
pub(super) struct Pool<'scope, 'env> {
    pub(super) scope: &'scope thread::Scope<'scope, 'env>,
    pub(super) shared: &'env Shared<'env>,
    pub(super) session: &'env Session,
    pub(super) config: &'env ServerConfig,
    pub(super) jobs: Sender<Job>,
    pub(super) queue: Receiver<Job>,
    pub(super) max_workers: usize,
    /// Payload bytes in flight above which the connection stops reading.
    pub(super) max_bytes: usize,
}

impl Pool<'_, '_> {
    /// Whether `request` runs on a worker rather than on the connection thread.
    pub(super) fn takes(&self, request: &Request, device_waits: bool) -> bool {
        match request.op {
            Op::Flush | Op::Cache => true,
            Op::Write { fua } | Op::Trim { fua } | Op::WriteZeroes { fua, .. } => {
                fua || device_waits
            }
            Op::Read { .. } => device_waits,
            Op::BlockStatus { .. } | Op::Disc => false,
        }
    }

    /// Waits until a job of `bytes` fits the limits; first sends the connection thread's
    /// queued replies, since the client may be waiting for them. Returns the error of a
    /// worker that lost the connection.
    pub(super) fn wait_for_room(
        &self,
        bytes: usize,
        mut send_queued: impl FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        let full = |state: &WorkState| {
            state.failed.is_none()
                && state.in_flight > 0
                && (state.in_flight >= self.max_workers
                    || state.in_flight_bytes.saturating_add(bytes) > self.max_bytes)
        };
        if full(&self.shared.lock()) {
            send_queued()?;
        }
        let mut state = self.shared.lock();
        while full(&state) {
            state = self
                .shared
                .finished
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match state.failed.take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// An empty buffer with room for `len` bytes, reused when possible.
    pub(super) fn payload_buffer(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = self.shared.lock().spare.pop().unwrap_or_default();
        reserve_payload(&mut buf, len)?;
        Ok(buf)
    }

    /// Queues `job`, starting a worker if every running one is busy. Gives the job back
    /// when there is no worker to run it (none could be started).
    pub(super) fn submit(&self, job: Job) -> Option<Job> {
        let start_worker = {
            let mut state = self.shared.lock();
            state.in_flight += 1;
            state.in_flight_bytes += job.payload.len();
            let start = state.in_flight > state.workers && state.workers < self.max_workers;
            if start {
                state.workers += 1;
            }
            start
        };
        if start_worker {
            let (shared, session, config) = (self.shared, self.session, self.config);
            let queue = self.queue.clone();
            let spawned = thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(self.scope, move || work(&queue, shared, session, config));
            if let Err(err) = spawned {
                tracing::warn!(%err, "could not start an NBD worker thread");
                let mut state = self.shared.lock();
                state.workers -= 1;
                if state.workers == 0 {
                    state.in_flight -= 1;
                    state.in_flight_bytes -= job.payload.len();
                    return Some(job);
                }
            }
        }
        // The queue is unbounded and its receiver lives in `self`: sending cannot fail.
        let _ = self.jobs.send(job);
        None
    }
}

/// A worker: runs jobs until the connection thread closes the queue.
fn work(queue: &Receiver<Job>, shared: &Shared<'_>, session: &Session, config: &ServerConfig) {
    let mut exec = Executor::new(session, config);
    while let Ok(job) = queue.recv() {
        run_job(job, &mut exec, shared);
    }
}

fn run_job(job: Job, exec: &mut Executor<'_>, shared: &Shared<'_>) {
    // After a lost connection the remaining jobs are dropped unanswered, like the
    // requests an inline connection had not reached.
    let lost = shared.lock().failed.is_some();
    let sent = if lost {
        Ok(())
    } else {
        if job.sync_only {
            exec.sync_written(&job.request);
        } else {
            exec.execute(&job.request, &job.payload);
        }
        send_shared(shared.writer, &mut exec.out)
    };
    exec.out.clear();
    publish(&exec.session.export, &mut exec.stats);
    let mut payload = job.payload;
    let mut state = shared.lock();
    state.in_flight -= 1;
    state.in_flight_bytes -= payload.len();
    if let Err(err) = sent {
        state.failed.get_or_insert(err);
    }
    if payload.capacity() <= MAX_SPARE_BUFFER && state.spare.len() < MAX_SPARE_BUFFERS {
        payload.clear();
        state.spare.push(payload);
    }
    drop(state);
    shared.finished.notify_all();
}
