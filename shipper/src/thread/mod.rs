//! The shipper thread of a group.
//!
//! Every interval the thread closes the group's cycle and delivers everything closed,
//! oldest first, as transfers to its consumer; a cycle's ring space is freed only
//! once the consumer committed it. A group that needs a resync (initial replication,
//! ring overflow, unclean shutdown, an administrator's request) is copied in batches
//! first; the cycle after the last batch makes the copy consistent.
//!
//! Administrative state (paused, suspended, removed) lives in the relationship
//! record, so it survives restarts.
//!
//! This module holds the handle ([`Shipper`]) and the thread's state; each job of the
//! thread has its own module: `worker` runs the loop and gates attempts, `cycles`
//! closes and delivers cycles and applies the retry table, `copy` copies a resync in
//! batches, `relationship` keeps the relationship record and enables the replica,
//! `failover` hands the group over to its replica, `admin` carries out an
//! administrator's requests, and `status` is what the thread reports.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use thiserror::Error;
use tracker::{Group, TrackerError};
use wire::api::{ErrorCode, InitialMethod};

use crate::compare::CompareError;
use crate::freeze::{AppConsistent, AppConsistentOptions};
use crate::measure::{DeliveryLog, Measurement};
use crate::pipeline::upload::LinkMeter;
use crate::remote::{FailureClass, RelationshipError};
use crate::resync::ReadError;
use crate::schedule::{CycleHistory, RetryPolicy};
use crate::sink::{CycleSink, SinkError};

mod admin;
mod copy;
mod cycles;
mod failover;
mod relationship;
mod status;
mod worker;

#[cfg(test)]
mod tests;

pub use admin::AdminAction;
pub use copy::RESYNC_BATCH;
pub use status::{
    AppConsistentReport, ComparisonReport, ReplicationState, ResyncReport, ShipperStatus,
};

use copy::ResyncProgress;
use cycles::Closed;
use relationship::{load_relationship, RelationshipFile};

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
    #[error(transparent)]
    Image(#[from] ReadError),
    /// Comparing the images with the consumer's copy failed.
    #[error("Block comparison")]
    Compare(#[from] CompareError),
    /// The relationship record cannot be written.
    #[error("Relationship record")]
    Relationship(#[from] RelationshipError),
    /// The replica holds chunks of a resync batch this process did not produce.
    #[error("The replica holds {have} chunks of resync batch {batch}, which this primary cannot continue; the resync starts again")]
    ResyncLost {
        /// The batch.
        batch: u32,
        /// Chunks the replica has.
        have: u32,
    },
    /// The request is not possible in the current state.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The shipper thread cannot start.
    #[error("Cannot start the shipper")]
    Spawn(#[source] std::io::Error),
    /// The shipper thread has stopped.
    #[error("The shipper has stopped")]
    Stopped,
    /// No answer in time.
    #[error("Timed out waiting for the shipper")]
    Timeout,
}

impl ShipperError {
    /// How the schedule reacts.
    pub fn class(&self) -> FailureClass {
        match self {
            ShipperError::Sink(error) | ShipperError::Compare(CompareError::Sink(error)) => {
                error.class()
            }
            _ => FailureClass::NextInterval,
        }
    }

    fn code(&self) -> Option<ErrorCode> {
        match self {
            ShipperError::Sink(SinkError::Remote { source, .. })
            | ShipperError::Compare(CompareError::Sink(SinkError::Remote { source, .. })) => {
                source.code()
            }
            _ => None,
        }
    }
}

/// Why the shipper does not do what was asked, in its current state. Typed until
/// the control socket or the log line turns it into text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// Replication is paused.
    #[error("Replication is paused; resume it first")]
    Paused,
    /// Replication is suspended until its cause is fixed and it is resumed.
    #[error("Replication is suspended ({0}); fix the cause, then resume it")]
    Suspended(String),
    /// The group's replica was failed over to: these disks are no longer the live
    /// ones.
    #[error("{}", failover::superseded_message(group, reason))]
    Superseded {
        /// The group.
        group: String,
        /// What the replica said.
        reason: String,
    },
    /// Replication is removed.
    #[error("Replication is removed; enable it first")]
    Removed,
    /// The initial replication is scheduled for later (seconds since the epoch).
    #[error("The initial replication is scheduled to start at {0} (seconds since the epoch)")]
    NotBefore(u64),
    /// Another request the current state does not allow; the message says why.
    #[error("{0}")]
    NotNow(String),
}

/// A [`Refusal::NotNow`] saying `why`.
fn not_now(why: impl Into<String>) -> ShipperError {
    Refusal::NotNow(why.into()).into()
}

/// What the handle asks of the thread.
enum Command {
    CloseNow(Sender<Result<u64, ShipperError>>),
    Admin(AdminAction, Sender<Result<String, ShipperError>>),
    Stop,
}

/// What a replica consumer needs beyond the sink.
#[derive(Debug, Clone)]
pub struct ReplicationSetup {
    /// The relationship record.
    pub relationship_path: PathBuf,
    /// The configured replica server.
    pub replica_url: String,
    /// This host's name, for the replica's records.
    pub primary_host: String,
    /// The disks' names, in group order.
    pub disk_names: Vec<String>,
    /// The ring was just created: the replica (if any) holds nothing this ring
    /// describes, so the initial replication runs again.
    pub fresh_ring: bool,
    /// A new relationship's initial replication starts at this time (seconds since
    /// the epoch), not at once.
    pub start_after_unix: Option<u64>,
    /// Where the initial copy comes from.
    pub initial: InitialMethod,
    /// Codec of exported chunks, `None` for none.
    pub compression: Option<wire::chunk::Codec>,
    /// Recovery history to ask the replica for (sent when replication is enabled and
    /// once after each start, so a changed setting reaches an existing replica).
    pub recovery: Option<wire::api::RecoveryPolicy>,
    /// The failover epoch this group replicates at: [`wire::api::FIRST_EPOCH`], or a
    /// failed-over replica's epoch for the group serving its disks.
    pub epoch: u64,
}

/// How a shipper runs.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// Replication interval.
    pub interval: Duration,
    /// Retry table.
    pub retry: RetryPolicy,
    /// Set for a replica consumer.
    pub replication: Option<ReplicationSetup>,
    /// Set for a group that makes application-consistent points.
    pub app_consistent: Option<AppConsistentOptions>,
}

/// The running shipper of one group.
#[derive(Debug)]
pub struct Shipper {
    commands: Sender<Command>,
    status: Arc<Mutex<ShipperStatus>>,
    /// Bytes sent, counted as frames go out (the thread updates `status` only
    /// between deliveries).
    sent_meter: Option<Arc<LinkMeter>>,
    deliveries: Arc<Mutex<DeliveryLog>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The thread's state; each job's module adds its methods.
struct Worker {
    group: Group,
    images: Vec<(PathBuf, File)>,
    block_size: u64,
    sink: Box<dyn CycleSink>,
    status: Arc<Mutex<ShipperStatus>>,
    retry: RetryPolicy,
    relationship: Option<RelationshipFile>,
    /// The chain of a consumer without a relationship record.
    local_chain: u32,
    resync: Option<ResyncProgress>,
    /// Consecutive network failures and Busy answers, and when the next retry is due.
    network_failures: u32,
    busy_answers: u32,
    retry_at: Option<Instant>,
    /// The replication interval.
    interval: Duration,
    history: CycleHistory,
    /// Every interval's outcome, for `blkrep replication measure`.
    deliveries: Arc<Mutex<DeliveryLog>>,
    /// What cycles closed by this process and not yet delivered say of their point.
    closed: BTreeMap<u64, Closed>,
    /// The application-consistent points' schedule and commands.
    app: Option<AppConsistent>,
    started_unix: u64,
    buffer: Vec<u8>,
    /// The configured recovery history reached the replica since this start.
    recovery_sent: bool,
    /// The replica's error code of the latest failed attempt.
    last_code: Option<ErrorCode>,
}

impl Shipper {
    /// Starts the shipper of `group`: every interval it closes a cycle and delivers
    /// everything closed to `sink`. `images` are the disks' images in group order,
    /// read during a resync; `block_size` is the dirty-map granularity.
    pub fn spawn(
        group: Group,
        images: Vec<PathBuf>,
        block_size: u64,
        options: ShipperOptions,
        sink: Box<dyn CycleSink>,
    ) -> Result<Self, ShipperError> {
        let opened = images
            .into_iter()
            .map(|path| match File::open(&path) {
                Ok(file) => Ok((path, file)),
                Err(source) => Err(ReadError { path, source }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let relationship = match options.replication.clone() {
            None => None,
            Some(setup) => Some(load_relationship(setup)?),
        };
        let app = options
            .app_consistent
            .map(|app| AppConsistent::new(app, options.interval));
        let status = Arc::new(Mutex::new(ShipperStatus {
            consumer: sink.describe(),
            interval_secs: options.interval.as_secs_f64(),
            app_consistent: app.as_ref().map(|app| AppConsistentReport {
                every_secs: app.options().every.as_secs(),
                last_attempt_unix: app.last_attempt_ms().map(|ms| ms / 1000),
                next_due_unix: app.due_at_ms().map(|ms| ms / 1000),
                ..AppConsistentReport::default()
            }),
            ..ShipperStatus::default()
        }));
        let mut sink = sink;
        let sent_meter = sink.sent_meter();
        let deliveries = Arc::new(Mutex::new(DeliveryLog::default()));
        if let Some(relationship) = &relationship {
            sink.set_relationship(relationship.state.id, relationship.state.epoch);
        }
        let (commands, receiver) = bounded(16);
        let mut worker = Worker {
            group,
            images: opened,
            block_size,
            sink,
            status: Arc::clone(&status),
            retry: options.retry,
            relationship,
            local_chain: new_chain(),
            resync: None,
            network_failures: 0,
            busy_answers: 0,
            retry_at: None,
            interval: options.interval,
            history: CycleHistory::default(),
            deliveries: Arc::clone(&deliveries),
            closed: BTreeMap::new(),
            app,
            started_unix: unix_now(),
            buffer: Vec::new(),
            recovery_sent: false,
            last_code: None,
        };
        worker.update_status();
        let name = format!("ship-{}", worker.group.name());
        let interval = options.interval;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Compression workers and the resync's hashing threads inherit it.
                base::priority::enter_background();
                worker.run(&receiver, interval)
            })
            .map_err(ShipperError::Spawn)?;
        Ok(Self {
            commands,
            status,
            sent_meter,
            deliveries,
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
            Ok(Err(error)) => Err(error),
            Err(RecvTimeoutError::Timeout) => Err(ShipperError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ShipperError::Stopped),
        }
    }

    /// Carries out an administrator's request; returns what was done, for people.
    pub fn admin(&self, action: AdminAction, timeout: Duration) -> Result<String, ShipperError> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Admin(action, reply))
            .map_err(|_| ShipperError::Stopped)?;
        match answer.recv_timeout(timeout) {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(error)) => Err(error),
            Err(RecvTimeoutError::Timeout) => Err(ShipperError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ShipperError::Stopped),
        }
    }

    /// The figures of the deliveries of the last `window` (see [`crate::measure`]).
    pub fn measure(&self, window: Duration) -> Measurement {
        let now_ms = unix_now_ms();
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .measure(now_ms.saturating_sub(window_ms), now_ms)
    }

    /// A copy of the current status.
    pub fn status(&self) -> ShipperStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(meter) = &self.sent_meter {
            status.network_bytes = meter.total_bytes();
        }
        // Lag grows between updates.
        if let Some(closed_ms) = status.last_delivered_close_unix_ms {
            let lag_ms = unix_now_ms().saturating_sub(closed_ms);
            status.lag_ms = Some(lag_ms);
            status.lag_secs = Some(lag_ms / 1000);
        }
        status
    }

    /// Stops the thread after its current delivery and waits for it. A resync copy in
    /// progress hands what is left back to the tracker, so a clean shutdown saves it.
    /// Later calls to [`Shipper::close_now`] fail with [`ShipperError::Stopped`].
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

pub(crate) use base::time::{unix_millis as unix_now_ms, unix_secs as unix_now};

pub use wire::error_chain;

/// A random chain number (31 bits, never 0).
fn new_chain() -> u32 {
    (rand::random::<u32>() & 0x7fff_ffff).max(1)
}

/// The id of the transfer of delta `cycle` in `chain`. Ids of different chains never
/// collide, so a replica never takes a cycle of an older chain for a newer one.
fn delta_id(chain: u32, cycle: u64) -> u64 {
    (u64::from(chain & 0x7fff_ffff) << 32) | (cycle & 0xffff_ffff)
}

/// The id of batch `batch` of the resync that starts `chain`.
fn resync_id(chain: u32, batch: u32) -> u64 {
    (1 << 63) | (u64::from(chain & 0x7fff_ffff) << 32) | u64::from(batch)
}
