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
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use thiserror::Error;
use tracing::{debug, error, info, warn};
use tracker::{Group, TrackerError};
use wire::api::{ErrorCode, InitialMethod, TransferKind};
use wire::chunk::max_record_bytes;

use crate::compare::CompareError;
use crate::freeze::{AppConsistent, AppConsistentOptions, FreezeError, Phase, PointEnv};
use crate::remote::{FailureClass, RelationshipError};
use crate::resync::ReadError;
use crate::schedule::{CycleHistory, RetryPolicy};
use crate::sink::{CycleSink, SinkError};

mod admin;
mod copy;
mod failover;
mod relationship;
mod status;

pub use admin::AdminAction;
use admin::Repair;
use copy::ResyncProgress;
pub use copy::RESYNC_BATCH;
use failover::superseded_message;
use relationship::{load_relationship, RelationshipFile};
pub use status::{
    AppConsistentReport, ComparisonReport, ReplicationState, ResyncReport, ShipperStatus,
};

#[cfg(test)]
mod tests;

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
