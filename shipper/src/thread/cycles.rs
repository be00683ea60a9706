//! Cycles: closing the group's cycle, delivering everything closed oldest first,
//! and the retry table applied to a failed attempt.
//!
//! Failures follow the retry table of [`crate::schedule`]: network failures back off,
//! a paused or full replica is retried every interval, and authentication failures or
//! a broken chain suspend replication until an administrator acts.
//!
//! When an application-consistent point is due, the cycle closes between the group's
//! freeze and thaw commands ([`crate::freeze`]); its transfer says whether the freeze
//! succeeded.

use std::sync::PoisonError;
use std::time::Instant;

use tracing::{debug, error, info, warn};
use tracker::TrackerError;
use wire::api::{ErrorCode, TransferKind};
use wire::chunk::max_record_bytes;
use wire::error_chain;

use crate::freeze::{FreezeError, Phase, PointEnv};
use crate::measure::Outcome;
use crate::remote::FailureClass;

use super::admin::Repair;
use super::not_now;
use super::{delta_id, unix_now, unix_now_ms, ShipperError, Worker};

/// What a cycle closed by this process says of its point.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closed {
    /// When it closed, in milliseconds since the epoch.
    unix_ms: u64,
    /// Closed between a successful freeze and its thaw.
    app_consistent: bool,
}

impl Worker {
    /// One shipping attempt, with the retry table applied to its failure.
    pub(super) fn attempt(&mut self) -> Result<u64, ShipperError> {
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
                self.busy_answers = 0;
                self.retry_at = None;
                self.last_code = None;
            }
            Err(error) => {
                self.last_code = error.code();
                self.record_outcome(Outcome::Failed);
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

    /// Adds an interval's outcome to the log `blkrep replication measure` reads.
    pub(super) fn record_outcome(&self, outcome: Outcome) {
        self.deliveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(unix_now_ms(), outcome);
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
            error!(target: "blkrep_event", event = "superseded", %group, reason = %message, "This primary is SUPERSEDED: its replica was failed over to and is the group's live copy; shipping stops for good and these disks are no longer the live ones");
            return;
        }
        match class {
            FailureClass::Network => {
                self.network_failures += 1;
                let delay = self.retry.delay(self.network_failures);
                self.retry_at = Some(Instant::now() + delay);
                warn!(%group, error = %message, retry_in_secs = delay.as_secs_f64(), failures = self.network_failures, "Replication failed; retrying");
            }
            FailureClass::NextInterval if code == Some(ErrorCode::Busy) => {
                // Busy applying what it received: that ends by itself, usually long
                // before a long interval does.
                self.busy_answers += 1;
                let delay = self.retry.busy_delay(self.busy_answers);
                if delay < self.interval {
                    self.retry_at = Some(Instant::now() + delay);
                    warn!(%group, error = %message, retry_in_secs = delay.as_secs_f64(), "The replica is busy; retrying");
                } else {
                    self.retry_at = None;
                    warn!(%group, error = %message, "The replica is busy; retrying next interval");
                }
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
                error!(target: "blkrep_event", event = "replication_suspended", %group, reason = %message, class = ?class, "Replication suspended: an administrator must act (then `blkrep replication resume`)");
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

    pub(super) fn chain(&self) -> u32 {
        self.relationship
            .as_ref()
            .map_or(self.local_chain, |r| r.state.chain)
    }

    pub(super) fn ship(&mut self) -> Result<u64, ShipperError> {
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
            return Err(not_now(format!(
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
                info!(target: "blkrep_event", event = "resync_finished", group = %self.group.name(), reason = %resync.reason, bytes = resync.total_bytes, "Resync finished; the replica is consistent");
            }
            // One update, so the status never shows the resync gone but not counted.
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            status.resync = None;
            status.resyncs += 1;
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
            return Err(not_now("No application-consistent points are configured"));
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
        loop {
            let started = Instant::now();
            let Some(cycle) = self.group.take_closed()? else {
                break;
            };
            let read_ms = started.elapsed().as_millis();
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
            let sent_before = self.sink.bytes_sent();
            let answer = self.sink.begin(delta_id(self.chain(), id), kind, bytes)?;
            let begun_ms = started.elapsed().as_millis();
            let mut sent_ms = 0;
            if !answer.committed {
                for change in cycle.changes() {
                    self.sink.apply(&change)?;
                }
                sent_ms = started.elapsed().as_millis();
                self.sink.commit()?;
            }
            let committed_ms = started.elapsed().as_millis();
            cycle.acknowledge()?;
            // Where a cycle's shipping time went: reading the ring into extents, the
            // offer, streaming the changes, the replica's commit, freeing the ring.
            debug!(
                group = %self.group.name(),
                cycle = id,
                read_ms,
                offered_ms = begun_ms,
                sent_ms,
                committed_ms,
                acknowledged_ms = started.elapsed().as_millis(),
                "Cycle shipped"
            );
            let closed_unix = closed_unix_ms / 1000;
            self.closed = self.closed.split_off(&(id + 1));
            let now_ms = unix_now_ms();
            let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            let rpo_ms = status
                .last_delivered_close_unix_ms
                .map(|before_ms| now_ms.saturating_sub(before_ms));
            if let Some(rpo_ms) = rpo_ms {
                status.rpo.observe(rpo_ms);
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
            status.last_duration_ms = Some(duration_ms);
            drop(status);
            self.record_outcome(Outcome::Delivered {
                data_bytes: stats.data_bytes,
                network_bytes: self.sink.bytes_sent().saturating_sub(sent_before),
                duration_ms,
                rpo_ms,
            });
            debug!(group = %self.group.name(), cycle = id, records = stats.records, bytes = stats.data_bytes, resumed_at = answer.have_chunks, "Cycle delivered");
        }
        Ok(())
    }
}
