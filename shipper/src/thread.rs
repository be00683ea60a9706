//! The shipper thread of a group.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use serde::Serialize;
use thiserror::Error;
use tracing::{debug, info, warn};
use tracker::{Change, ChangeData, DirtyBits, Group, ResyncReason, TrackerError};

use crate::sink::{CycleSink, SinkError};

#[cfg(test)]
mod tests;

/// Largest read during a resync.
const RESYNC_CHUNK: u64 = 2 << 20;

/// Errors of a shipping attempt.
#[derive(Debug, Error)]
pub enum ShipperError {
    /// The tracker refused (ring, resync state).
    #[error("Tracker")]
    Tracker(#[from] TrackerError),
    /// The consumer failed.
    #[error("Consumer")]
    Sink(#[from] SinkError),
    /// Reading an image during a resync failed.
    #[error("Cannot read image {path} for resync")]
    Image {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The attempt made on request failed (the message holds the whole chain).
    #[error("{0}")]
    Failed(String),
    /// The shipper thread has stopped.
    #[error("The shipper has stopped")]
    Stopped,
    /// No answer in time.
    #[error("Timed out waiting for the shipper")]
    Timeout,
}

/// What the shipper has done, for status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShipperStatus {
    /// The consumer.
    pub consumer: String,
    /// Interval between cycles, in seconds.
    pub interval_secs: f64,
    /// Cycles delivered and acknowledged since start.
    pub cycles_delivered: u64,
    /// The newest acknowledged cycle.
    pub last_delivered: Option<u64>,
    /// When it was acknowledged (seconds since the epoch).
    pub last_success_unix: Option<u64>,
    /// How long delivering it took, in milliseconds.
    pub last_duration_ms: Option<u64>,
    /// Data bytes of the newest delivered cycle (after coalescing).
    pub last_cycle_bytes: u64,
    /// Largest cycle delivered, in data bytes.
    pub max_cycle_bytes: u64,
    /// Data bytes delivered since start.
    pub bytes_delivered: u64,
    /// Failed attempts since start.
    pub failures: u64,
    /// The newest failure, if the newest attempt failed.
    pub last_error: Option<String>,
    /// Resyncs completed since start.
    pub resyncs: u64,
}

enum Command {
    CloseNow(Sender<Result<u64, String>>),
    Stop,
}

/// The running shipper of one group.
#[derive(Debug)]
pub struct Shipper {
    commands: Sender<Command>,
    status: Arc<Mutex<ShipperStatus>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Worker {
    group: Group,
    images: Vec<(PathBuf, File)>,
    block_size: u64,
    sink: Box<dyn CycleSink>,
    status: Arc<Mutex<ShipperStatus>>,
    /// The marked blocks were copied; the resync ends once a cycle closed after
    /// that is delivered (in whichever attempt that happens).
    resync_copied: bool,
}

impl Shipper {
    /// Starts the shipper of `group`: every `interval` it closes a cycle and delivers
    /// everything closed to `sink`. `images` are the disks' images in group order,
    /// read during a resync; `block_size` is the dirty-map granularity.
    pub fn spawn(
        group: Group,
        images: Vec<PathBuf>,
        block_size: u64,
        interval: Duration,
        sink: Box<dyn CycleSink>,
    ) -> std::io::Result<Self> {
        let opened = images
            .into_iter()
            .map(|path| File::open(&path).map(|file| (path, file)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let status = Arc::new(Mutex::new(ShipperStatus {
            consumer: sink.describe(),
            interval_secs: interval.as_secs_f64(),
            ..ShipperStatus::default()
        }));
        let (commands, receiver) = bounded(16);
        let mut worker = Worker {
            group,
            images: opened,
            block_size,
            sink,
            status: Arc::clone(&status),
            resync_copied: false,
        };
        let name = format!("ship-{}", worker.group.name());
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run(&receiver, interval))?;
        Ok(Self {
            commands,
            status,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Closes a cycle now and waits until it is delivered. Returns its number.
    pub fn close_now(&self, timeout: Duration) -> Result<u64, ShipperError> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::CloseNow(reply))
            .map_err(|_| ShipperError::Stopped)?;
        match answer.recv_timeout(timeout) {
            Ok(Ok(cycle)) => Ok(cycle),
            Ok(Err(message)) => Err(ShipperError::Failed(message)),
            Err(RecvTimeoutError::Timeout) => Err(ShipperError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ShipperError::Stopped),
        }
    }

    /// A copy of the current status.
    pub fn status(&self) -> ShipperStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops the thread after its current delivery and waits for it. Later calls to
    /// [`Shipper::close_now`] fail with [`ShipperError::Stopped`].
    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

pub use wire::error_chain;

impl Worker {
    fn run(&mut self, commands: &Receiver<Command>, interval: Duration) {
        let mut next = Instant::now() + interval;
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::CloseNow(reply)) => {
                    let result = self.attempt().map_err(|error| error_chain(&error));
                    let _ = reply.send(result);
                }
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.attempt();
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        // Delivery took longer than an interval: start the next one now
                        // rather than run a backlog of back-to-back cycles.
                        next = now + interval;
                    }
                }
            }
        }
        debug!(group = %self.group.name(), "Shipper stopped");
    }

    /// One shipping attempt: resync if needed, close a cycle, deliver everything closed.
    fn attempt(&mut self) -> Result<u64, ShipperError> {
        let started = Instant::now();
        let result = self.ship();
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(_) => {
                status.last_error = None;
                status.last_duration_ms =
                    Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
            }
            Err(error) => {
                status.failures += 1;
                let message = error_chain(error);
                if status.last_error.as_deref() != Some(message.as_str()) {
                    warn!(group = %self.group.name(), error = %message, "Shipping failed; will retry next interval");
                }
                status.last_error = Some(message);
            }
        }
        result
    }

    fn ship(&mut self) -> Result<u64, ShipperError> {
        if self.group.status().resync.is_some() {
            self.resync()?;
        }
        // Deliver anything closed earlier (a failed attempt, or a restart) first.
        self.deliver_closed()?;
        let cycle = self.group.close_cycle()?;
        self.deliver_closed()?;
        if self.resync_copied {
            // That cycle holds every write since logging resumed, so the fuzzy copy
            // is now consistent.
            self.group.finish_resync()?;
            self.resync_copied = false;
            self.status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .resyncs += 1;
        }
        Ok(cycle)
    }

    fn deliver_closed(&mut self) -> Result<(), ShipperError> {
        while let Some(cycle) = self.group.take_closed()? {
            for change in cycle.changes() {
                self.sink.apply(&change)?;
            }
            self.sink.commit()?;
            let (id, stats) = (cycle.id(), cycle.stats());
            cycle.acknowledge()?;
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            status.cycles_delivered += 1;
            status.last_delivered = Some(id);
            status.last_success_unix = Some(unix_now());
            status.last_cycle_bytes = stats.data_bytes;
            status.max_cycle_bytes = status.max_cycle_bytes.max(stats.data_bytes);
            status.bytes_delivered += stats.data_bytes;
            debug!(group = %self.group.name(), cycle = id, records = stats.records, bytes = stats.data_bytes, "Cycle delivered");
        }
        Ok(())
    }

    fn resync(&mut self) -> Result<(), ShipperError> {
        // Anything already closed goes first; its blocks would be copied anyway.
        let maps = self.group.begin_resync()?;
        info!(group = %self.group.name(), "Resynchronising the marked blocks");
        match self.copy_marked(&maps) {
            Ok(()) => {
                // The copy is fuzzy until the next delivered cycle (see `ship`).
                self.resync_copied = true;
                Ok(())
            }
            Err(error) => {
                self.group.abort_resync(&maps, ResyncReason::RingOverflow);
                Err(error)
            }
        }
    }

    fn copy_marked(&mut self, maps: &[DirtyBits]) -> Result<(), ShipperError> {
        let mut buffer = Vec::new();
        let sizes = self.group.disk_sizes();
        for (disk, bits) in maps.iter().enumerate() {
            let Some((path, image)) = self.images.get(disk) else {
                continue;
            };
            // The tracker's size: a block device's metadata length is 0.
            let Some(&size) = sizes.get(disk) else {
                continue;
            };
            let mut ones = bits.iter_ones().peekable();
            while let Some(first) = ones.next() {
                // Extend the run while blocks are consecutive and the chunk has room.
                let mut last = first;
                while let Some(&next) = ones.peek() {
                    if next != last + 1
                        || (next as u64 - first as u64 + 1) * self.block_size > RESYNC_CHUNK
                    {
                        break;
                    }
                    last = next;
                    ones.next();
                }
                let offset = first as u64 * self.block_size;
                let end = ((last as u64 + 1) * self.block_size).min(size);
                if offset >= end {
                    continue;
                }
                buffer.resize(usize::try_from(end - offset).unwrap_or(0), 0);
                image
                    .read_exact_at(&mut buffer, offset)
                    .map_err(|source| ShipperError::Image {
                        path: path.clone(),
                        source,
                    })?;
                let change = Change {
                    disk,
                    offset,
                    length: end - offset,
                    data: ChangeData::Write(&buffer),
                };
                self.sink.apply(&change)?;
            }
        }
        self.sink.commit()?;
        Ok(())
    }
}
