//! The worker loop: the thread waits for the next interval, a due retry or a
//! command, and gates every attempt on the relationship's administrative state.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tracing::debug;
use wire::error_chain;

use super::{unix_now, Command, Worker};
use super::{Refusal, ShipperError};
use crate::measure::Outcome;

/// How often an idle shipper lets its consumer keep connections alive.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// What stops an attempt before it starts.
pub(super) enum Gate {
    Open,
    Paused,
    Superseded(String),
    Suspended(String),
    Removed,
    NotBefore(u64),
}

impl Worker {
    pub(super) fn run(&mut self, commands: &Receiver<Command>, interval: Duration) {
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
                    let result = self.admin(action);
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

    pub(super) fn gate(&self) -> Gate {
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
                // Backing off (network failures, a busy replica): this interval's
                // cycle is missed; the retry closes one.
                self.history.record(unix_now(), false);
                self.record_outcome(Outcome::Skipped);
            }
            Gate::Open => {
                let _ = self.attempt();
            }
        }
    }

    /// An administrator's "close a cycle now": tried even while backing off.
    fn attempt_now(&mut self) -> Result<u64, ShipperError> {
        let refusal = match self.gate() {
            Gate::Open => return self.attempt(),
            Gate::Paused => Refusal::Paused,
            Gate::Superseded(reason) => Refusal::Superseded {
                group: self.group.name().to_string(),
                reason,
            },
            Gate::Suspended(reason) => Refusal::Suspended(reason),
            Gate::Removed => Refusal::Removed,
            Gate::NotBefore(at) => Refusal::NotBefore(at),
        };
        Err(refusal.into())
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
}
