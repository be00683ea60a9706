//! The shipper thread of a group.
//!
//! Every interval the thread closes the group's cycle and delivers everything closed,
//! oldest first, as transfers to its consumer; a cycle's ring space is freed only
//! once the consumer committed it. A group that needs a resync (initial replication,
//! ring overflow, unclean shutdown, an administrator's request) is copied in batches
//! first; the cycle after the last batch makes the copy consistent.
//!
//! Failures follow the retry table of [`crate::schedule`]: network failures back off,
//! a paused or full replica is retried every interval, and authentication failures or
//! a broken chain suspend replication until an administrator acts. Administrative
//! state (paused, suspended, removed) lives in the relationship record, so it
//! survives restarts.
//!
//! When an application-consistent point is due, the cycle closes between the group's
//! freeze and thaw commands ([`crate::freeze`]); its transfer says whether the freeze
//! succeeded.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use thiserror::Error;
use tracing::{debug, error, info, warn};
use tracker::{ChangeData, Group, ResyncReason, TrackerError};
use wire::api::{ErrorCode, InitialMethod, TransferKind};
use wire::chunk::{max_record_bytes, ChunkEncoder};

use crate::compare::{self, CompareError};
use crate::freeze::{AppConsistent, AppConsistentOptions, FreezeError, Phase, PointEnv};
use crate::media::MediaExport;
use crate::remote::{CopyProgress, FailureClass, RelationshipError};
use crate::resync::{read_range, Cursor, ReadError, ResyncMaps, READ_PIECE};
use crate::schedule::{CycleHistory, RetryPolicy};
use crate::sink::{CycleSink, SinkError};

mod admin;
mod failover;
mod relationship;
mod status;

pub use admin::AdminAction;
use admin::Repair;
use failover::superseded_message;
use relationship::{disk_infos, load_relationship, RelationshipFile};
pub use status::{
    AppConsistentReport, ComparisonReport, ReplicationState, ResyncReport, ShipperStatus,
};

#[cfg(test)]
mod tests;

/// Data bytes of one resync batch (one transfer), before compression.
pub const RESYNC_BATCH: u64 = 256 << 20;
/// A resync sends a chunk at least this often, even a small one.
const FRAME_AT_LEAST_EVERY: Duration = Duration::from_secs(5);
/// How often an idle shipper lets its consumer keep connections alive.
const IDLE_POLL: Duration = Duration::from_secs(5);

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
    #[error("{0}")]
    Refused(String),
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

enum Command {
    CloseNow(Sender<Result<u64, String>>),
    Admin(AdminAction, Sender<Result<String, String>>),
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
    /// DEFLATE level of exported chunks, `None` for none.
    pub compression: Option<u32>,
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
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A resync being copied.
#[derive(Debug)]
struct ResyncProgress {
    reason: ResyncReason,
    epoch: u32,
    maps: ResyncMaps,
    total_bytes: u64,
    /// Marked bytes from `batch_start` on (counted once per batch: a scan of the maps).
    remaining_bytes: u64,
    next_batch: u32,
    /// Where the batch being sent starts (everything before is committed).
    batch_start: Cursor,
    /// Whether that batch is the last, once decided: every offer of a batch says the
    /// same.
    batch_last: Option<bool>,
    /// Every batch is committed: the next delivered cycle finishes the resync.
    copied: bool,
}

impl ResyncProgress {
    fn advance(&mut self, end: Cursor, last: bool) {
        self.batch_start = end;
        self.remaining_bytes = self.maps.bytes_from(end);
        self.next_batch += 1;
        self.batch_last = None;
        self.copied = last;
    }

    fn report(&self) -> ResyncReport {
        ResyncReport {
            reason: self.reason.to_string(),
            epoch: self.epoch,
            batch: self.next_batch,
            total_bytes: self.total_bytes,
            done_bytes: self.total_bytes.saturating_sub(self.remaining_bytes),
        }
    }
}

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
    /// Consecutive network failures, and when the next retry is due.
    network_failures: u32,
    retry_at: Option<Instant>,
    history: CycleHistory,
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
            retry_at: None,
            history: CycleHistory::default(),
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
            .spawn(move || worker.run(&receiver, interval))
            .map_err(|error| ShipperError::Failed(format!("Cannot start the shipper: {error}")))?;
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

    /// Carries out an administrator's request; returns what was done, for people.
    pub fn admin(&self, action: AdminAction, timeout: Duration) -> Result<String, ShipperError> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Admin(action, reply))
            .map_err(|_| ShipperError::Stopped)?;
        match answer.recv_timeout(timeout) {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(message)) => Err(ShipperError::Refused(message)),
            Err(RecvTimeoutError::Timeout) => Err(ShipperError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ShipperError::Stopped),
        }
    }

    /// A copy of the current status.
    pub fn status(&self) -> ShipperStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
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

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Milliseconds since the epoch.
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

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

/// What stops an attempt before it starts.
/// What a cycle closed by this process says of its point.
#[derive(Debug, Clone, Copy)]
struct Closed {
    /// When it closed, in milliseconds since the epoch.
    unix_ms: u64,
    /// Closed between a successful freeze and its thaw.
    app_consistent: bool,
}

enum Gate {
    Open,
    Paused,
    Superseded(String),
    Suspended(String),
    Removed,
    NotBefore(u64),
}

impl Worker {
    fn run(&mut self, commands: &Receiver<Command>, interval: Duration) {
        let mut next_tick = Instant::now() + interval;
        loop {
            let now = Instant::now();
            let wake = self
                .retry_at
                .map_or(next_tick, |at| at.min(next_tick))
                .min(now + IDLE_POLL);
            match commands.recv_timeout(wake.saturating_duration_since(now)) {
                // The status reflects a request's outcome before its answer goes out.
                Ok(Command::CloseNow(reply)) => {
                    let result = self.attempt_now();
                    self.update_status();
                    let _ = reply.send(result);
                }
                Ok(Command::Admin(action, reply)) => {
                    let result = self.admin(action).map_err(|error| error_chain(&error));
                    self.update_status();
                    let _ = reply.send(result);
                }
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    if now >= next_tick {
                        next_tick += interval;
                        if next_tick < now {
                            // Delivery took longer than an interval: start the next one
                            // now rather than run a backlog of back-to-back cycles.
                            next_tick = now + interval;
                        }
                        self.tick();
                    } else if self.retry_at.is_some_and(|at| now >= at) {
                        self.retry_at = None;
                        if matches!(self.gate(), Gate::Open) {
                            let _ = self.attempt();
                        }
                    } else {
                        self.sink.idle();
                    }
                }
            }
            self.update_status();
        }
        self.hand_back_resync();
        debug!(group = %self.group.name(), "Shipper stopped");
    }

    fn gate(&self) -> Gate {
        let Some(relationship) = &self.relationship else {
            return Gate::Open;
        };
        let state = &relationship.state;
        if state.removed {
            Gate::Removed
        } else if let Some(reason) = &state.superseded {
            Gate::Superseded(reason.clone())
        } else if let Some(reason) = &state.suspended {
            Gate::Suspended(reason.clone())
        } else if state.paused {
            Gate::Paused
        } else if let Some(at) = state.start_after_unix.filter(|at| *at > unix_now()) {
            Gate::NotBefore(at)
        } else {
            Gate::Open
        }
    }

    /// One interval.
    fn tick(&mut self) {
        match self.gate() {
            Gate::Removed => self.drop_cycles(),
            Gate::Paused | Gate::Suspended(_) | Gate::Superseded(_) | Gate::NotBefore(_) => {}
            Gate::Open if self.retry_at.is_some() => {
                // Backing off after network failures: this interval's cycle is missed.
                self.history.record(unix_now(), false);
            }
            Gate::Open => {
                let _ = self.attempt();
            }
        }
    }

    /// An administrator's "close a cycle now": tried even while backing off.
    fn attempt_now(&mut self) -> Result<u64, String> {
        match self.gate() {
            Gate::Open => self.attempt().map_err(|error| error_chain(&error)),
            Gate::Paused => Err("Replication is paused; resume it first".into()),
            Gate::Superseded(reason) => Err(superseded_message(self.group.name(), &reason)),
            Gate::Suspended(reason) => Err(format!(
                "Replication is suspended ({reason}); fix the cause, then resume it"
            )),
            Gate::Removed => Err("Replication is removed; enable it first".into()),
            Gate::NotBefore(at) => Err(format!(
                "The initial replication is scheduled to start at {at} (seconds since the epoch)"
            )),
        }
    }

    /// Removed: cycles are acknowledged unshipped so the ring never fills.
    fn drop_cycles(&mut self) {
        let dropped = self.group.close_cycle().and_then(|_| {
            while let Some(cycle) = self.group.take_closed()? {
                cycle.acknowledge()?;
            }
            Ok(())
        });
        if let Err(error) = dropped {
            debug!(group = %self.group.name(), error = %error_chain(&error), "Cannot drop cycles");
        }
    }

    /// One shipping attempt, with the retry table applied to its failure.
    fn attempt(&mut self) -> Result<u64, ShipperError> {
        let started = Instant::now();
        let result = self.ship();
        let now = unix_now();
        self.history.record(now, result.is_ok());
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(_) => {
                if status.last_error.is_some() {
                    info!(group = %self.group.name(), "Replication recovered");
                }
                status.last_error = None;
                status.failure_class = None;
                status.last_duration_ms =
                    Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                self.network_failures = 0;
                self.retry_at = None;
                self.last_code = None;
            }
            Err(error) => {
                self.last_code = error.code();
                status.failures += 1;
                let message = error_chain(error);
                let class = error.class();
                status.failure_class = Some(class);
                status.last_error = Some(message.clone());
                drop(status);
                self.sink_failed(class, error.code(), &message);
            }
        }
        result
    }

    fn sink_failed(&mut self, class: FailureClass, code: Option<ErrorCode>, message: &str) {
        let group = self.group.name().to_string();
        if code == Some(ErrorCode::Superseded) {
            self.retry_at = None;
            if let Some(relationship) = &mut self.relationship {
                relationship.state.superseded = Some(message.to_string());
                if let Err(error) = relationship.save() {
                    error!(%group, error = %error_chain(&error), "Cannot record that this primary is superseded");
                }
            }
            error!(%group, error = %message, "This primary is SUPERSEDED: its replica was failed over to and is the group's live copy; shipping stops for good and these disks are no longer the live ones");
            return;
        }
        match class {
            FailureClass::Network => {
                self.network_failures += 1;
                let delay = self.retry.delay(self.network_failures);
                self.retry_at = Some(Instant::now() + delay);
                warn!(%group, error = %message, retry_in_secs = delay.as_secs_f64(), failures = self.network_failures, "Replication failed; retrying");
            }
            FailureClass::NextInterval => {
                self.retry_at = None;
                warn!(%group, error = %message, "Replication failed; retrying next interval");
            }
            FailureClass::Authentication | FailureClass::Unrecoverable => {
                self.retry_at = None;
                let repair = match code {
                    Some(ErrorCode::NotFound) => Some(Repair::Reenable),
                    Some(ErrorCode::ChainBroken) => Some(Repair::Resync),
                    _ => None,
                };
                if let Err(error) = self.suspend(message, repair) {
                    error!(%group, error = %error_chain(&error), "Cannot record the suspension");
                }
                error!(%group, error = %message, class = ?class, "Replication suspended: an administrator must act (then `blkrep replication resume`)");
            }
        }
    }

    fn suspend(&mut self, reason: &str, repair: Option<Repair>) -> Result<(), ShipperError> {
        let Some(relationship) = &mut self.relationship else {
            return Ok(());
        };
        relationship.state.suspended = Some(reason.to_string());
        relationship.state.repair_on_resume = repair.map(|r| r.as_str().to_string());
        relationship.save()?;
        Ok(())
    }

    fn chain(&self) -> u32 {
        self.relationship
            .as_ref()
            .map_or(self.local_chain, |r| r.state.chain)
    }

    fn ship(&mut self) -> Result<u64, ShipperError> {
        match self.ship_once() {
            // The ring overflowed during this attempt: resync now, not an interval later.
            Err(ShipperError::Tracker(TrackerError::ResyncRequired(reason))) => {
                info!(group = %self.group.name(), %reason, "The ring overflowed during this attempt; the resync starts now");
                self.ship_once()
            }
            other => other,
        }
    }

    fn ship_once(&mut self) -> Result<u64, ShipperError> {
        self.ensure_enabled()?;
        if self.awaits_export() {
            return Err(ShipperError::Refused(format!(
                "The initial copy goes by external media: export it with `blkrep replication export --group {} --to DIR`",
                self.group.name()
            )));
        }
        if self.resync.is_some() && self.group.resync_reason().is_some() {
            // The ring overflowed during the resync: restart it with the new marks.
            info!(group = %self.group.name(), "The ring overflowed during the resync; it starts again with every mark");
            self.hand_back_resync();
        }
        if self.resync.is_none() && self.group.resync_reason().is_some() {
            self.start_resync()?;
        }
        match self.copy_batches() {
            Err(error @ ShipperError::ResyncLost { .. }) => {
                self.hand_back_resync();
                return Err(error);
            }
            other => other?,
        }
        // Deliver anything closed earlier (a failed attempt, or a restart) first.
        self.deliver_closed()?;
        let cycle = self.close_cycle()?;
        self.deliver_closed()?;
        if self.resync.as_ref().is_some_and(|resync| resync.copied) {
            // That cycle holds every write since logging resumed, so the fuzzy copy
            // is now consistent.
            self.group.finish_resync()?;
            if let Some(relationship) = &mut self.relationship {
                relationship.state.copy = None;
                relationship.save()?;
            }
            if let Some(resync) = self.resync.take() {
                info!(group = %self.group.name(), reason = %resync.reason, bytes = resync.total_bytes, "Resync finished; the replica is consistent");
            }
            self.status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .resyncs += 1;
        }
        Ok(cycle)
    }

    /// Closes the open cycle; between the freeze and thaw commands when an
    /// application-consistent point is due.
    fn close_cycle(&mut self) -> Result<u64, ShipperError> {
        let now_ms = unix_now_ms();
        if self.app.as_ref().is_some_and(|app| app.is_due(now_ms)) {
            return self.close_frozen(now_ms);
        }
        let cycle = self.group.close_cycle()?;
        self.closed.insert(
            cycle,
            Closed {
                unix_ms: unix_now_ms(),
                app_consistent: false,
            },
        );
        Ok(cycle)
    }

    /// An application-consistent point: freeze, close, thaw. A failed freeze still
    /// closes the cycle (it ships crash-consistent) and still thaws.
    fn close_frozen(&mut self, now_ms: u64) -> Result<u64, ShipperError> {
        let name = self.group.name().to_string();
        let group_status = self.group.status();
        let disks = group_status
            .disks
            .iter()
            .map(|disk| disk.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let Some(app) = &mut self.app else {
            return Err(ShipperError::Refused(
                "No application-consistent points are configured".into(),
            ));
        };
        if let Err(error) = app.record_attempt(now_ms) {
            warn!(group = %name, error = %error_chain(&error), "Cannot record the application-consistent point's time; after a restart the next one may come early");
        }
        let mut point = PointEnv {
            group: &name,
            cycle: group_status.open_cycle,
            disks: &disks,
        };
        let started = Instant::now();
        let frozen = app.run(Phase::Freeze, &point);
        // Nothing between the freeze and the close: the guest's writes wait.
        let closed = self.group.close_cycle();
        let closed_ms = unix_now_ms();
        if let Ok(cycle) = closed {
            point.cycle = cycle;
        }
        // A thaw after a failed freeze is harmless; a missing one leaves the guest
        // frozen. Only a freeze that never started needs none.
        let thawed = match &frozen {
            Err(error) if !error.started() => None,
            _ => Some(app.run(Phase::Thaw, &point)),
        };
        let held_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let cycle = point.cycle;
        let point_made = frozen.is_ok() && closed.is_ok();
        if point_made {
            info!(group = %name, cycle, held_ms, "Application-consistent point made");
        }
        let freeze_failure = frozen.err().map(|error| {
            let message = error_chain(&error);
            warn!(group = %name, cycle, error = %message, "The freeze command failed; the cycle ships crash-consistent");
            format!("Freeze of cycle {cycle}: {message}")
        });
        let thaw_failure = thawed.and_then(Result::err).map(|error: FreezeError| {
            let command = crate::freeze::display_command(&app.options().thaw_command);
            let message = error_chain(&error);
            error!(group = %name, cycle, error = %message, "The thaw command `{command}` failed: the guest may stay frozen until it succeeds; run it by hand");
            format!("Thaw after cycle {cycle} (the guest may be frozen): {message}")
        });
        let next_due = app.due_at_ms();
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let report = status.app_consistent.get_or_insert_with(Default::default);
        report.last_attempt_unix = Some(now_ms / 1000);
        report.next_due_unix = next_due.map(|ms| ms / 1000);
        report.last_frozen_ms = Some(held_ms);
        if point_made {
            report.points += 1;
            report.last_cycle = Some(cycle);
            report.last_unix = Some(closed_ms / 1000);
        }
        report.freeze_failures += u64::from(freeze_failure.is_some());
        report.thaw_failures += u64::from(thaw_failure.is_some());
        report.last_failure = match (freeze_failure, thaw_failure) {
            (None, None) if point_made => None,
            (None, None) => report.last_failure.take(),
            (freeze, None) => freeze,
            (None, thaw) => thaw,
            (Some(freeze), Some(thaw)) => Some(format!("{freeze}; {thaw}")),
        };
        drop(status);
        let cycle = closed?;
        self.closed.insert(
            cycle,
            Closed {
                unix_ms: closed_ms,
                app_consistent: point_made,
            },
        );
        Ok(cycle)
    }

    fn start_resync(&mut self) -> Result<(), ShipperError> {
        let reason = self
            .group
            .status()
            .resync
            .unwrap_or(ResyncReason::Requested);
        if let Some(resumed) = self.resume_interrupted_copy(reason)? {
            self.resync = Some(resumed);
            return Ok(());
        }
        // The new chain is durable before any of its transfers exists.
        let chain = new_chain();
        match &mut self.relationship {
            Some(relationship) => {
                relationship.state.chain = chain;
                relationship.state.copy = None;
                relationship.save()?;
            }
            None => self.local_chain = chain,
        }
        let maps = self.group.begin_resync()?;
        let mut maps = ResyncMaps::new(maps, self.block_size, self.group.disk_sizes());
        if self.compares(reason) {
            self.narrow_by_comparison(reason, &mut maps)?;
        }
        let total_bytes = maps.bytes_from(Cursor::default());
        info!(group = %self.group.name(), %reason, bytes = total_bytes, chain, "Resync copy starts");
        self.resync = Some(ResyncProgress {
            reason,
            epoch: chain,
            maps,
            total_bytes,
            remaining_bytes: total_bytes,
            next_batch: 0,
            batch_start: Cursor::default(),
            batch_last: None,
            copied: false,
        });
        Ok(())
    }

    /// Whether the initial copy goes by external media and was not exported yet.
    fn awaits_export(&self) -> bool {
        self.relationship.as_ref().is_some_and(|r| {
            r.setup.initial == InitialMethod::Media && r.state.media_exported.is_none()
        })
    }

    /// Writes the initial copy into `dir`/<group>: the resync's batches go to files
    /// instead of the network; cycles then wait until the replica imported them.
    fn export_initial_copy(&mut self, dir: &std::path::Path) -> Result<String, ShipperError> {
        let name = self.group.name().to_string();
        if !self.awaits_export() {
            return Err(ShipperError::Refused(format!(
                "Group {name} has no initial copy to export: it needs initial_replication = \"media\" and an initial replication not yet exported"
            )));
        }
        self.ensure_enabled()?;
        if self.resync.is_none() {
            self.start_resync()?;
        }
        let Some(relationship) = &self.relationship else {
            return Ok(String::new());
        };
        let disks = disk_infos(&relationship.setup, &self.group);
        let target = dir.join(&name);
        let export = MediaExport::open(
            &target,
            &name,
            relationship.state.id,
            &relationship.setup.primary_host,
            disks,
            relationship.setup.compression,
        )?;
        info!(group = %name, dir = %target.display(), "Exporting the initial copy");
        let network = std::mem::replace(&mut self.sink, Box::new(export));
        let copied = self.copy_batches();
        let export = std::mem::replace(&mut self.sink, network);
        copied?;
        let chain = self.chain();
        if let Some(relationship) = &mut self.relationship {
            relationship.state.media_exported = Some(chain);
            relationship.save()?;
        }
        let (total, batches) = self
            .resync
            .as_ref()
            .map_or((0, 0), |r| (r.total_bytes, r.next_batch));
        info!(group = %name, dir = %target.display(), bytes = total, batches, "Initial copy exported");
        drop(export);
        Ok(format!(
            "Group {name}: {} MiB of data in {batches} transfer(s) exported to {}; carry it to the replica server and run `blkrep replica import --config FILE {}` there",
            total.div_ceil(1 << 20),
            target.display(),
            target.display()
        ))
    }

    /// Whether a resync for `reason` compares block hashes before copying, so only
    /// differing blocks are copied (equal regions cost one hash): every resync but a
    /// first copy into an empty replica, where nothing can be equal.
    fn compares(&self, reason: ResyncReason) -> bool {
        match reason {
            ResyncReason::InitialReplication => self
                .relationship
                .as_ref()
                .is_some_and(|r| r.setup.initial == InitialMethod::Existing),
            ResyncReason::Requested
            | ResyncReason::RingOverflow
            | ResyncReason::UncleanHostShutdown
            | ResyncReason::ImageWriteError
            | ResyncReason::DirtyMapLost => true,
        }
    }

    /// Unmarks the blocks the consumer holds already. On failure the marks go back to
    /// the tracker, so the next attempt compares again.
    fn narrow_by_comparison(
        &mut self,
        reason: ResyncReason,
        maps: &mut ResyncMaps,
    ) -> Result<(), ShipperError> {
        let started = Instant::now();
        info!(group = %self.group.name(), %reason, bytes = maps.bytes_from(Cursor::default()), "Comparing block hashes with the consumer's copy");
        match compare::narrow(maps, &self.images, self.sink.as_mut()) {
            Ok(Some(stats)) => {
                info!(group = %self.group.name(), marked = stats.marked_bytes, differing = stats.differing_bytes, hashes = stats.hashes, requests = stats.requests, seconds = started.elapsed().as_secs(), "Block comparison done; only differing blocks are copied");
                self.status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .last_comparison = Some(ComparisonReport {
                    marked_bytes: stats.marked_bytes,
                    differing_bytes: stats.differing_bytes,
                    hashes: stats.hashes,
                });
                Ok(())
            }
            Ok(None) => {
                info!(group = %self.group.name(), consumer = %self.sink.describe(), "The consumer cannot compare blocks; every marked block is copied");
                Ok(())
            }
            Err(error) => {
                self.group
                    .abort_resync(&maps.remaining(Cursor::default()), reason);
                Err(error.into())
            }
        }
    }

    /// After a daemon crash mid-copy: the copy of the current chain continues with the
    /// batch the relationship record names, from where the tracker says it started
    /// (the log holds every write since the copy began). `None` when there is no such
    /// copy; then a new resync copies every marked block.
    fn resume_interrupted_copy(
        &mut self,
        reason: ResyncReason,
    ) -> Result<Option<ResyncProgress>, ShipperError> {
        let Some((disk, offset)) = self.group.resumable_copy() else {
            return Ok(None);
        };
        let Some((chain, copy)) = self.relationship.as_ref().and_then(|relationship| {
            let state = &relationship.state;
            state
                .copy
                .filter(|copy| copy.chain == state.chain)
                .map(|copy| (state.chain, copy))
        }) else {
            return Ok(None);
        };
        let maps = self.group.resume_copy()?;
        let mut maps = ResyncMaps::new(maps, self.block_size, self.group.disk_sizes());
        if self.compares(reason) {
            // The tracker marked everything from the position on: compare it again
            // rather than send what the replica has.
            self.narrow_by_comparison(reason, &mut maps)?;
        }
        let start = Cursor { disk, offset };
        let remaining_bytes = maps.bytes_from(start);
        info!(group = %self.group.name(), %reason, chain, batch = copy.batch, remaining = remaining_bytes, "Resync copy resumes after the daemon stopped uncleanly");
        Ok(Some(ResyncProgress {
            reason,
            epoch: chain,
            maps,
            total_bytes: copy.total_bytes.max(remaining_bytes),
            remaining_bytes,
            next_batch: copy.batch,
            batch_start: start,
            batch_last: Some(copy.last),
            copied: false,
        }))
    }

    /// Makes where the copy stands survive a daemon crash: the tracker records where
    /// the batch starts, the relationship record which batch it is.
    fn record_copy_position(&mut self, batch: u32, last: bool) -> Result<(), ShipperError> {
        let Some(resync) = &self.resync else {
            return Ok(());
        };
        let (start, epoch, total_bytes) = (resync.batch_start, resync.epoch, resync.total_bytes);
        self.group.note_copy_position(start.disk, start.offset)?;
        if let Some(relationship) = &mut self.relationship {
            let copy = CopyProgress {
                chain: epoch,
                batch,
                last,
                total_bytes,
            };
            if relationship.state.copy != Some(copy) {
                relationship.state.copy = Some(copy);
                relationship.save()?;
            }
        }
        Ok(())
    }

    /// Gives the blocks a resync has not committed back to the tracker: when the
    /// shipper stops (a clean shutdown saves them), or to start the resync again.
    fn hand_back_resync(&mut self) {
        if let Some(resync) = self.resync.take() {
            let remaining = resync.maps.remaining(resync.batch_start);
            self.group.abort_resync(&remaining, resync.reason);
        }
    }

    /// Sends the resync's batches that are not committed yet.
    fn copy_batches(&mut self) -> Result<(), ShipperError> {
        loop {
            let Some(resync) = &mut self.resync else {
                return Ok(());
            };
            if resync.copied {
                return Ok(());
            }
            let remaining = resync.remaining_bytes;
            let last = *resync.batch_last.get_or_insert(remaining <= RESYNC_BATCH);
            let (batch, start) = (resync.next_batch, resync.batch_start);
            let id = resync_id(resync.epoch, batch);
            let kind = TransferKind::Resync {
                epoch: u64::from(resync.epoch),
                batch,
                last,
            };
            let bound = if last {
                remaining
            } else {
                remaining.min(RESYNC_BATCH + READ_PIECE)
            };
            // At worst one record per 4 KiB grain.
            let bytes = max_record_bytes(bound / 4096 + 2, bound);
            self.record_copy_position(batch, last)?;
            let answer = self.sink.begin(id, kind, bytes)?;
            let have = answer.have_chunks;
            let end_of_disks = Cursor {
                disk: self.images.len(),
                offset: 0,
            };
            let end = if answer.committed {
                match (answer.resume_from, last) {
                    (Some(end), _) => end,
                    // An empty last batch: nothing was left to copy.
                    (None, true) => end_of_disks,
                    (None, false) => return Err(ShipperError::ResyncLost { batch, have }),
                }
            } else {
                let end = if have == 0 {
                    self.stream_batch(start, 0, last)?
                } else {
                    // The replica says where the data it holds ends: the chunks from
                    // `have` on continue from there.
                    let from = answer
                        .resume_from
                        .filter(|from| *from >= start && from.disk < self.images.len())
                        .ok_or(ShipperError::ResyncLost { batch, have })?;
                    self.sink.resume_at(have);
                    debug!(group = %self.group.name(), batch, have, ?from, "Resuming a resync batch");
                    // Bytes of the batch the replica holds, as the batch size counts them.
                    let sent = self.resync.as_ref().map_or(0, |resync| {
                        resync.maps.bytes_from(start) - resync.maps.bytes_from(from)
                    });
                    self.stream_batch(from, sent, last)?
                };
                self.sink.commit()?;
                end
            };
            if let Some(resync) = &mut self.resync {
                resync.advance(end, last);
            }
        }
    }

    /// Streams one batch from `from`, `sent` data bytes of it being on the replica
    /// already. A batch that is not the last ends once it holds [`RESYNC_BATCH`] data
    /// bytes. Returns where it ended.
    fn stream_batch(
        &mut self,
        from: Cursor,
        sent: u64,
        last: bool,
    ) -> Result<Cursor, ShipperError> {
        let Worker {
            resync,
            sink,
            images,
            buffer,
            ..
        } = self;
        let Some(resync) = resync else {
            return Ok(Cursor::default());
        };
        let mut sent = sent;
        let mut framed_at = Instant::now();
        for (disk, run_start, run_end) in resync.maps.runs_from(from) {
            let Some((path, image)) = images.get(disk) else {
                continue;
            };
            let flow = read_range::<ShipperError>(
                image,
                path,
                disk,
                run_start,
                run_end,
                buffer,
                &mut |change| {
                    // A chunk also ends when it has been filling for a while (long
                    // runs of zeroes take many reads for few bytes), so the upload
                    // never idles long enough for the replica to cut it.
                    if sink.room() < ChunkEncoder::encoded_len(change)
                        || framed_at.elapsed() >= FRAME_AT_LEAST_EVERY
                    {
                        sink.cut()?;
                        framed_at = Instant::now();
                    }
                    sink.apply(change)?;
                    if let ChangeData::Write(bytes) = change.data {
                        sent += bytes.len() as u64;
                    }
                    Ok(if !last && sent >= RESYNC_BATCH {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                },
            )?;
            if let ControlFlow::Break(offset) = flow {
                sink.cut()?;
                return Ok(Cursor { disk, offset });
            }
        }
        sink.cut()?;
        Ok(Cursor {
            disk: images.len(),
            offset: 0,
        })
    }

    fn deliver_closed(&mut self) -> Result<(), ShipperError> {
        while let Some(cycle) = self.group.take_closed()? {
            let started = Instant::now();
            let (id, stats) = (cycle.id(), cycle.stats());
            let changes: u64 = (0..cycle.disk_count())
                .map(|disk| cycle.change_count(disk) as u64)
                .sum();
            let bytes = max_record_bytes(changes, stats.data_bytes);
            // A cycle closed before a restart has no record: it was closed before this
            // process started, and ships crash-consistent, never claiming more than
            // is known.
            let Closed {
                unix_ms: closed_unix_ms,
                app_consistent,
            } = self.closed.get(&id).copied().unwrap_or(Closed {
                unix_ms: self.started_unix.saturating_mul(1000),
                app_consistent: false,
            });
            let kind = TransferKind::Delta {
                cycle: id,
                closed_unix_ms,
                app_consistent,
            };
            let answer = self.sink.begin(delta_id(self.chain(), id), kind, bytes)?;
            if !answer.committed {
                for change in cycle.changes() {
                    self.sink.apply(&change)?;
                }
                self.sink.commit()?;
            }
            cycle.acknowledge()?;
            let closed_unix = closed_unix_ms / 1000;
            self.closed = self.closed.split_off(&(id + 1));
            let now_ms = unix_now_ms();
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(before_ms) = status.last_delivered_close_unix_ms {
                status.rpo.observe(now_ms.saturating_sub(before_ms));
            }
            status.last_delivered_close_unix_ms = Some(closed_unix_ms);
            status.lag_ms = Some(now_ms.saturating_sub(closed_unix_ms));
            if let Some(report) = status.app_consistent.as_mut().filter(|_| app_consistent) {
                report.points_delivered += 1;
                report.last_delivered_cycle = Some(id);
            }
            status.cycles_delivered += 1;
            status.last_delivered = Some(id);
            status.last_success_unix = Some(unix_now());
            status.last_delivered_close_unix = Some(closed_unix);
            status.last_cycle_bytes = stats.data_bytes;
            status.max_cycle_bytes = status.max_cycle_bytes.max(stats.data_bytes);
            status.bytes_delivered += stats.data_bytes;
            status.avg_cycle_bytes = status.bytes_delivered / status.cycles_delivered;
            status.last_duration_ms =
                Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
            debug!(group = %self.group.name(), cycle = id, records = stats.records, bytes = stats.data_bytes, resumed_at = answer.have_chunks, "Cycle delivered");
        }
        Ok(())
    }
}
