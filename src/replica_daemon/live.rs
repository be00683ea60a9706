//! The groups of replicas failed over to: their disks served as the group's live
//! disks, through the same group runtime as a primary's groups ([`crate::groups`]),
//! with tracking on, replicated back once reversed, and handed back by a failback.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};
use wire::api::ReplicaInfo;

use std::sync::RwLock;

use base::sync::{lock, read, write};
use replica::server::FailedOver;
use serde::{Deserialize, Serialize};

use std::sync::RwLockReadGuard;

use super::failover::run_failover_hook;
use super::protocol::HandedBack;
use super::Daemon;
use crate::control::{ActionDone, CycleClosed, ReplicationAction};
use crate::groups::control::CommandError;
use crate::groups::GroupError;
use crate::groups::{self, RunningGroup};
use crate::metrics::MetricsText;
use crate::status::GroupReport;
use replica::server::AdminError;
use thiserror::Error;

/// Why a request about a replica's served disks (its live group, a test failover,
/// a failover) did not happen. Typed until the control socket answers it as text.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The replica server refused or failed.
    #[error(transparent)]
    Replica(#[from] AdminError),
    /// The live group cannot be opened or replicated.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A group command on the live group failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The NBD server refused an export.
    #[error("Cannot serve {export}")]
    Export {
        /// The export.
        export: String,
        /// The cause.
        #[source]
        source: nbd_shim::server::ServerError,
    },
    /// The reverse replication target cannot be recorded.
    #[error("Cannot record {}", path.display())]
    Record {
        /// The record.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not possible in the replica's state; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
}

impl ServeError {
    /// The error and its causes as one line, for the control socket.
    pub fn to_text(&self) -> String {
        wire::error_chain(self)
    }
}

/// A replica failed over to, served as its group's live disks with tracking on.
pub(super) struct LiveGroup {
    /// Written only to start replicating back; a planned failover holds it for
    /// reading, so status stays answered meanwhile.
    group: Arc<RwLock<RunningGroup>>,
}

impl LiveGroup {
    fn group(&self) -> RwLockReadGuard<'_, RunningGroup> {
        read(&self.group)
    }

    fn exports(&self) -> Vec<String> {
        self.group().exports().map(str::to_string).collect()
    }
}

/// A live group as `blkrep replica status` shows it: the same report as a
/// primary's group, and the NBD exports of its disks.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveGroupReport {
    /// The group, as the primary reports its groups.
    #[serde(flatten)]
    pub group: GroupReport,
    /// The exports of its disks on the daemon's NBD socket.
    pub exports: Vec<String>,
}

/// Refused: the replica's disks are not served as a live group.
fn not_served(name: &str) -> ServeError {
    ServeError::Refused(format!("The live disks of {name} are not served"))
}

impl Daemon {
    /// At start: clears the live files a failback left, finishes a failback a crash
    /// interrupted, serves every replica failed over to as a live group and resumes
    /// its replication back.
    pub(super) fn resume_live_groups(&self) {
        for info in self.server.replicas() {
            // A failback interrupted after the copy was made: its live files are stale.
            if info.failover.is_none() {
                if let Ok((dir, _)) = self.server.replica(&info.name, Some(&info.trust_group)) {
                    if dir.join(LIVE_RING).exists() {
                        remove_live_files(&dir);
                    }
                }
            }
        }
        for failed in self.server.failed_over() {
            if handed_over(&failed.dir) {
                // A failback interrupted before its disks became the existing copy.
                if let Err(error) = self.hand_back(&failed.dir, &failed.info) {
                    error!(replica = %failed.info.name, %error, "Cannot finish the failback");
                }
                continue;
            }
            if let Err(error) = self.serve_live(&failed) {
                error!(replica = %failed.info.name, %error, "Cannot serve the failed-over disks");
                continue;
            }
            let Ok(text) = std::fs::read(failed.dir.join(REVERSE_FILE)) else {
                continue;
            };
            let resumed = serde_json::from_slice::<ReverseTarget>(&text)
                .map_err(|error| ServeError::Refused(format!("Unreadable {REVERSE_FILE}: {error}")))
                .and_then(|target| self.reverse(&failed.dir, &failed.info, &target));
            if let Err(error) = resumed {
                error!(replica = %failed.info.name, %error, "Cannot resume replicating the live disks back");
            }
        }
    }

    /// A primary handed its group over by a planned failover: serves the replica's
    /// disks as the live group and runs the failover hook.
    pub(super) fn planned_failover_arrived(&self, failed: &FailedOver) {
        match self.serve_live(failed) {
            Ok(exports) => {
                if let Some(hook) = &self.hook {
                    run_failover_hook(hook, failed, &exports, &self.nbd_socket);
                }
            }
            Err(error) => {
                error!(replica = %failed.info.name, %error, "Cannot serve the disks after a planned failover");
            }
        }
    }

    /// Serves the disks of a replica failed over to, with tracking (ring
    /// `<replica>/live.ring`).
    pub(super) fn serve_live(&self, failed: &FailedOver) -> Result<Vec<String>, ServeError> {
        let name = &failed.info.name;
        let ring = failed.dir.join(LIVE_RING);
        let (group, devices) =
            groups::serve_failed_over(name, &failed.disks, &ring, self.live_ring_size)?;
        let mut exports: Vec<String> = Vec::new();
        for (export, device) in group.exports().zip(devices) {
            let export = export.to_string();
            let description = format!("blkrep group {name} (failed over)");
            if let Err(error) = self.nbd.add_export(&export, Some(description), device) {
                for added in &exports {
                    self.nbd.remove_export(added.as_str());
                }
                group.close();
                return Err(ServeError::Export {
                    export,
                    source: error,
                });
            }
            exports.push(export);
        }
        info!(replica = %name, exports = ?exports, "Serving the failed-over disks as the group's live disks");
        lock(&self.live).insert(
            failed.dir.clone(),
            LiveGroup {
                group: Arc::new(RwLock::new(group)),
            },
        );
        Ok(exports)
    }

    /// Stops serving a failed-over replica (to change its point): refused while
    /// clients are connected. Its ring stays until the new point is in place.
    pub(super) fn unserve_live(&self, dir: &Path, name: &str) -> Result<(), ServeError> {
        let mut live = lock(&self.live);
        let Some(serving) = live.get(dir) else {
            return Ok(());
        };
        let connected: u64 = serving
            .exports()
            .iter()
            .filter_map(|export| self.nbd.export_stats(export))
            .map(|stats| stats.connections)
            .sum();
        if connected > 0 {
            return Err(ServeError::Refused(format!(
                "{connected} NBD client(s) use the failed-over disks of {name}: shut the VM down before choosing another point"
            )));
        }
        if serving.group().was_written() {
            // The recovery points describe the disks as they were at the failover:
            // another point over these writes would mix them in.
            return Err(ServeError::Refused(format!(
                "The failed-over disks of {name} were written since the failover, so no other point can be chosen any more; complete the failover (`blkrep replica complete-failover --name {name}`)"
            )));
        }
        if let Some(serving) = live.remove(dir) {
            for export in &serving.exports() {
                self.nbd.remove_export(export);
            }
            serving.group().close();
        }
        Ok(())
    }

    /// Starts replicating the live group of the replica in `dir` to `target`, at the
    /// replica's failover epoch, and records it so a restarted daemon carries on.
    pub(super) fn reverse(
        &self,
        dir: &Path,
        info: &ReplicaInfo,
        target: &ReverseTarget,
    ) -> Result<(), ServeError> {
        let name = &info.name;
        let consumer = target.consumer()?;
        let problems = consumer.problems("reverse");
        if !problems.is_empty() {
            return Err(ServeError::Refused(problems.join("; ")));
        }
        let mut live = lock(&self.live);
        let serving = live.get_mut(dir).ok_or_else(|| not_served(name))?;
        write(&serving.group).start_replication(
            &consumer,
            Duration::from_secs(target.interval_secs),
            info.epoch,
        )?;
        let path = dir.join(REVERSE_FILE);
        let text = serde_json::to_vec_pretty(target).map_err(|error| {
            ServeError::Refused(format!("Cannot encode the reverse target: {error}"))
        })?;
        std::fs::write(&path, text).map_err(|source| ServeError::Record { path, source })?;
        info!(replica = %name, url = %target.url, "Replicating the live disks back");
        Ok(())
    }

    /// Each live group's report.
    pub(super) fn live_status(&self) -> Vec<LiveGroupReport> {
        lock(&self.live)
            .values()
            .map(|serving| LiveGroupReport {
                group: groups::report::group_report(&serving.group(), &self.nbd),
                exports: serving.exports(),
            })
            .collect()
    }

    /// The Prometheus samples of every live group, as a primary exports its groups'.
    pub(super) fn live_metrics(&self, text: &mut MetricsText) {
        for serving in lock(&self.live).values() {
            groups::metrics::group_metrics(text, &serving.group(), &self.nbd);
        }
    }

    /// The live group named `name` (the replica's name).
    fn live_group(&self, name: &str) -> Result<Arc<RwLock<RunningGroup>>, ServeError> {
        let live = lock(&self.live);
        let mut named = live
            .values()
            .filter(|serving| serving.group().name() == name);
        match (named.next(), named.next()) {
            (Some(serving), None) => Ok(Arc::clone(&serving.group)),
            (None, _) => Err(ServeError::Refused(format!(
                "No live group named {name:?}: only replicas failed over to are served as groups here"
            ))),
            (Some(_), Some(_)) => Err(ServeError::Refused(format!(
                "Several live groups are named {name:?} (from different trust groups); use `blkrep replica` commands with --trust-group"
            ))),
        }
    }

    /// The report of live group `name`.
    pub(super) fn live_group_report(&self, name: &str) -> Result<GroupReport, ServeError> {
        let group = self.live_group(name)?;
        let group = read(&group);
        Ok(groups::report::group_report(&group, &self.nbd))
    }

    /// Closes the cycle of live group `name` now (it must replicate back).
    pub(super) fn close_live_cycle(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<CycleClosed, ServeError> {
        let group = self.live_group(name)?;
        let group = read(&group);
        Ok(groups::control::close_cycle(&group, timeout)?)
    }

    /// The figures of live group `name`'s deliveries back over the last `since`.
    pub(super) fn measure_live(
        &self,
        name: &str,
        since: Duration,
    ) -> Result<shipper::measure::Measurement, ServeError> {
        let group = self.live_group(name)?;
        let group = read(&group);
        Ok(groups::control::measure(&group, since)?)
    }

    /// Changes the replication back of live group `name`, as `blkrep replication`
    /// changes a primary group's. A planned failover is a failback: once the other
    /// side took over, these disks are handed back (see [`Self::planned_failover`]).
    pub(super) fn live_replication(
        &self,
        name: &str,
        action: &ReplicationAction,
    ) -> Result<ActionDone, ServeError> {
        if let ReplicationAction::Failover { force } = action {
            let handed = self.planned_failover(name, None, *force)?;
            return Ok(ActionDone {
                message: format!(
                    "Failed back: {} runs group {name} as its primary now; these disks wait as an existing copy for replication back",
                    handed.url
                ),
            });
        }
        let group = self.live_group(name)?;
        let group = read(&group);
        Ok(groups::control::replication(&group, &self.nbd, action)?)
    }

    /// Stops every live group (daemon shutdown, after the NBD server stopped).
    pub(super) fn close_live(&self) {
        let live: Vec<LiveGroup> = lock(&self.live).drain().map(|(_, s)| s).collect();
        for serving in &live {
            serving.group().stop_shipper();
        }
        for serving in live {
            serving.group().close();
        }
    }

    /// Failback: a planned failover of the live disks of the failed-over replica
    /// `name` to the replica server they replicate to (see
    /// [`crate::groups::RunningGroup::planned_failover`]). Once that side is the
    /// primary, these disks stop being served and become an existing copy it can
    /// claim to replicate back.
    pub(super) fn planned_failover(
        &self,
        name: &str,
        trust_group: Option<&str>,
        force: bool,
    ) -> Result<HandedBack, ServeError> {
        let (dir, info) = self.server.replica(name, trust_group)?;
        if info.failover.is_none() {
            return Err(ServeError::Refused(format!(
                "Replica {name} was not failed over, so it serves no live disks: a planned failover to it starts on its primary (`blkrep replication failover --group {name}`)"
            )));
        }
        let group = {
            let live = lock(&self.live);
            let serving = live.get(&dir).ok_or_else(|| not_served(name))?;
            Arc::clone(&serving.group)
        };
        let url = {
            let group = read(&group);
            if group.replication_status().is_none() {
                return Err(ServeError::Refused(format!(
                    "The live disks of {name} do not replicate anywhere: reverse replication first (`blkrep replica reverse --name {name} ...`), then fail over to that side"
                )));
            }
            group
                .planned_failover(&self.nbd, force)
                .map_err(CommandError::Failover)?;
            group.replica_url().unwrap_or_default()
        };
        let info = self.hand_back(&dir, &info)?;
        Ok(HandedBack { replica: info, url })
    }

    /// After a planned failover handed the live disks of the replica in `dir` over:
    /// stops serving them and makes them an existing copy at the next epoch. Also
    /// finishes one a daemon crash interrupted.
    pub(super) fn hand_back(
        &self,
        dir: &Path,
        info: &ReplicaInfo,
    ) -> Result<ReplicaInfo, ServeError> {
        if let Some(serving) = lock(&self.live).remove(dir) {
            for export in &serving.exports() {
                self.nbd.remove_export(export);
            }
            let group = serving.group();
            group.stop_shipper();
            group.close();
        }
        let handed = self
            .server
            .hand_back(&info.name, Some(&info.trust_group))
            .map_err(|error| {
                ServeError::Refused(format!(
                    "The group was handed over, but its disks are not yet the existing copy ({}); restarting the replica daemon finishes that",
                    wire::error_chain(&error)
                ))
            })?;
        remove_live_files(dir);
        warn!(replica = %info.name, epoch = handed.epoch, "Failback done: the other side is the primary; these disks wait as an existing copy for replication back");
        Ok(handed)
    }
}

/// Removes the ring of a replica's former live disks and what lies beside it: once
/// its failover is handed back, a later failover starts afresh.
pub(super) fn remove_live_files(dir: &Path) {
    let ring = dir.join(LIVE_RING);
    for path in [
        shipper::remote::Relationship::path_for_ring(&ring),
        shipper::freeze::state_path_for_ring(&ring),
        dir.join(REVERSE_FILE),
        ring,
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(path = %path.display(), %error, "Cannot remove a file of the former live disks")
            }
        }
    }
}

/// Whether the live disks of the failed-over replica in `dir` were handed over by a
/// planned failover: their relationship record says so.
pub(super) fn handed_over(dir: &Path) -> bool {
    shipper::remote::Relationship::load_for_ring(&dir.join(LIVE_RING))
        .ok()
        .flatten()
        .as_ref()
        .is_some_and(shipper::remote::Relationship::handed_over)
}

/// The ring of a failed-over replica's live disks.
pub(super) const LIVE_RING: &str = "live.ring";
/// Where a failed-over replica's live disks replicate back to ([`ReverseTarget`]).
pub(super) const REVERSE_FILE: &str = "reverse.json";

/// Where a failed-over group's live disks replicate back to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReverseTarget {
    /// The replica server at the old site.
    pub url: String,
    /// CA certificate(s) of that server.
    pub ca: PathBuf,
    /// This host's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// Replication interval, in seconds.
    pub interval_secs: u64,
}

impl ReverseTarget {
    /// The consumer options: the old primary's disks are an existing copy there.
    fn consumer(&self) -> Result<crate::config::ReplicaConsumer, ServeError> {
        let mut table = toml::Table::new();
        table.insert("url".into(), self.url.clone().into());
        for (key, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            table.insert(key.into(), path.display().to_string().into());
        }
        table.insert("initial_replication".into(), "existing".into());
        toml::Value::Table(table).try_into().map_err(|error| {
            ServeError::Refused(format!("Invalid reverse replication target: {error}"))
        })
    }
}
