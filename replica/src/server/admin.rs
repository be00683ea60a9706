//! The administrator's side of a running server ([`ServerHandle`]): status, test
//! failovers, failovers and failback, pause, the recovery history and imports from
//! external media, asked by the daemon on the replica's machine rather than by a
//! primary.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};
use wire::api::{valid_name, ReplicaInfo};
use wire::error_chain;

use super::{load, lock, AuthEntry, FailedOver, FailoverListener, ServerHandle};
use crate::store::{Replica, StoreError};

impl ServerHandle {
    /// Every replica in every storage (each storage once, however many entries name it).
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        self.loaded()
            .iter()
            .map(|(_, replica)| lock(replica).info())
            .collect()
    }

    /// Every replica that loads, with its directory.
    fn loaded(&self) -> Vec<(PathBuf, Arc<Mutex<Replica>>)> {
        let mut out = Vec::new();
        for storage in self.storages() {
            let Ok(dirs) = std::fs::read_dir(storage) else {
                continue;
            };
            for dir in dirs.flatten() {
                if !Replica::exists(&dir.path()) {
                    continue;
                }
                if let Ok(replica) = load(&self.context, &dir.path()) {
                    out.push((dir.path(), replica));
                }
            }
        }
        out
    }

    /// Starts a test failover of replica `name` at `point` (the latest if `None`):
    /// returns the replica and one writable device per disk, in group order, to serve
    /// as the replica's `exports` (see [`crate::failover_drill`]).
    pub fn start_test(
        &self,
        name: &str,
        trust_group: Option<&str>,
        point: Option<u64>,
    ) -> Result<(ReplicaInfo, Vec<Arc<nbd_shim::backend::Overlay>>), AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        // Between two applies the disks hold the latest point.
        let test = while_busy(TEST_WAIT, || lock(&replica).begin_test(point))?;
        let mut replica = lock(&replica);
        let disks: Vec<(PathBuf, u64)> = replica
            .state()
            .disks
            .iter()
            .map(|disk| (replica.disk_path(&disk.name), disk.size))
            .collect();
        let overlays = crate::failover_drill::overlays(
            &replica.history(),
            test.point,
            &disks,
            &dir.join(TEST_DIR),
        );
        match overlays {
            Ok(overlays) => {
                info!(replica = %name, cycle = test.stamp.cycle, "Test failover started");
                Ok((replica.info(), overlays))
            }
            Err(error) => {
                let _ = replica.end_test();
                Err(AdminError::Invalid(format!(
                    "Cannot create the test's overlays in {}: {error}",
                    dir.join(TEST_DIR).display()
                )))
            }
        }
    }

    /// Stops the test failover of replica `name`: its overlays are deleted and its
    /// temporary point merged away. The caller removed the exports first.
    pub fn stop_test(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<ReplicaInfo, AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        let mut replica = lock(&replica);
        if replica.end_test()?.is_none() {
            return Err(AdminError::Invalid(format!(
                "No test failover of {name} is running"
            )));
        }
        let _ = std::fs::remove_dir_all(dir.join(TEST_DIR));
        info!(replica = %name, "Test failover stopped; its writes are discarded");
        Ok(replica.info())
    }

    /// Ends the test failovers a previous daemon left running (their overlays are
    /// throwaway).
    pub fn end_stale_tests(&self) {
        for (dir, replica) in self.loaded() {
            let mut replica = lock(&replica);
            if replica.state().test.is_none() {
                continue;
            }
            match replica.end_test() {
                Ok(_) => {
                    let _ = std::fs::remove_dir_all(dir.join(TEST_DIR));
                    warn!(replica = %replica.state().name, "A test failover was running when the daemon stopped; it is ended and its writes discarded");
                }
                Err(error) => {
                    warn!(replica = %replica.state().name, error = %error_chain(&error), "Cannot end a stale test failover");
                }
            }
        }
    }
}

pub(super) fn failed_over(dir: &Path, replica: &Replica) -> FailedOver {
    FailedOver {
        info: replica.info(),
        dir: dir.to_path_buf(),
        disks: replica
            .state()
            .disks
            .iter()
            .map(|disk| (disk.name.clone(), replica.disk_path(&disk.name)))
            .collect(),
    }
}

/// Calls `attempt` until it is not [`StoreError::Busy`] (the replica is between two
/// steps of an apply), for at most `wait`.
fn while_busy<T>(
    wait: Duration,
    mut attempt: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match attempt() {
            Err(StoreError::Busy(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Where a replica keeps a test's overlays.
const TEST_DIR: &str = "test";
/// How long a failover waits for received transfers to be applied.
const FAILOVER_WAIT: Duration = Duration::from_secs(600);
/// How long starting a test waits for an apply in progress to end.
const TEST_WAIT: Duration = Duration::from_secs(60);

impl ServerHandle {
    /// Puts `entries` in force in place of the authorisation entries (a reload of the
    /// daemon's configuration), once they pass the checks the start makes and their
    /// storages exist. A primary no entry allows any more is refused from its next
    /// request on, on connections already open too; transfers already stored stay.
    pub fn set_authorization(&self, entries: Vec<AuthEntry>) -> Result<(), AdminError> {
        let plain = matches!(
            self.context.settings.transport,
            super::Transport::PlainWithPsk { .. }
        );
        let problems = super::authorization::problems(&entries, plain);
        if !problems.is_empty() {
            return Err(AdminError::Invalid(problems.join("; ")));
        }
        for entry in &entries {
            std::fs::create_dir_all(&entry.storage).map_err(|source| {
                AdminError::Invalid(format!(
                    "Cannot create storage {}: {source}",
                    entry.storage.display()
                ))
            })?;
        }
        *self
            .context
            .authorization
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(entries);
        info!("Authorisation entries reloaded");
        Ok(())
    }

    /// The directories of every storage (each once, however many entries name it).
    fn storages(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for entry in self.context.authorization().iter() {
            if !out.contains(&entry.storage) {
                out.push(entry.storage.clone());
            }
        }
        out
    }

    /// The one replica named `name` (of `trust_group`, when given) in any storage.
    fn one_replica(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<(PathBuf, Arc<Mutex<Replica>>), AdminError> {
        if !valid_name(name) {
            return Err(AdminError::Invalid(format!(
                "{name:?} is not a replica name"
            )));
        }
        let mut found = Vec::new();
        for entry in self.context.authorization().iter() {
            let dir = entry.storage.join(name);
            if trust_group.is_some_and(|group| group != entry.trust_group)
                || found.iter().any(|(seen, _)| *seen == dir)
                || !Replica::exists(&dir)
            {
                continue;
            }
            let replica = load(&self.context, &dir)?;
            found.push((dir, replica));
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(AdminError::Invalid(format!("No replica named {name}"))),
            _ => Err(AdminError::Invalid(format!(
                "Several trust groups have a replica named {name}; say which with --trust-group"
            ))),
        }
    }

    /// Sets the recovery history replica `name` keeps (until the primary asks for
    /// another when replication is enabled again).
    pub fn set_recovery(
        &self,
        name: &str,
        trust_group: Option<&str>,
        policy: wire::api::RecoveryPolicy,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.set_recovery(policy)?;
            info!(replica = %name, points = policy.points, spacing_secs = policy.spacing_secs, "Recovery history set");
            Ok(())
        })
    }

    /// Runs `act` on replica `name` (of `trust_group`, when given) under its lock;
    /// returns the replica afterwards.
    fn administer(
        &self,
        name: &str,
        trust_group: Option<&str>,
        act: impl FnOnce(&mut Replica) -> Result<(), StoreError>,
    ) -> Result<ReplicaInfo, AdminError> {
        let (_, replica) = self.one_replica(name, trust_group)?;
        let mut replica = lock(&replica);
        act(&mut replica)?;
        Ok(replica.info())
    }

    /// Fails replica `name` over to `point` (the latest if `None`), waiting for the
    /// transfers received to be applied first (they are part of the latest point).
    /// Returns the replica, its directory and its disks (name, path), in group order.
    pub fn fail_over(
        &self,
        name: &str,
        trust_group: Option<&str>,
        point: Option<u64>,
    ) -> Result<FailedOver, AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        self.context.apply.request(&dir);
        let failover = while_busy(FAILOVER_WAIT, || lock(&replica).fail_over(point, false))?;
        warn!(replica = %name, cycle = failover.stamp.cycle, "Failed over: the replica's disks are now the live copy and its former primary is fenced off");
        let guard = lock(&replica);
        Ok(failed_over(&dir, &guard))
    }

    /// The replicas failed over to (served as live disks by the daemon).
    pub fn failed_over(&self) -> Vec<FailedOver> {
        self.loaded()
            .iter()
            .filter_map(|(dir, replica)| {
                let replica = lock(replica);
                replica
                    .state()
                    .failover
                    .is_some()
                    .then(|| failed_over(dir, &replica))
            })
            .collect()
    }

    /// Completes the failover of replica `name`: the other recovery points go.
    pub fn complete_failover(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.complete_failover()?;
            info!(replica = %name, "Failover completed; the other recovery points are deleted");
            Ok(())
        })
    }

    /// Failback: the live disks of the failed-over replica `name` were handed over
    /// by a planned failover to the replica they replicated to, which is now the
    /// primary; they become an existing copy for replication back (see
    /// [`Replica::hand_back`]).
    pub fn hand_back(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.hand_back()?;
            let epoch = replica.state().epoch;
            info!(replica = %name, epoch, "The live disks were handed over; they wait as an existing copy for replication back");
            Ok(())
        })
    }

    /// Sets who is told of planned failovers primaries ask for.
    pub fn on_failover(&self, listener: FailoverListener) {
        *lock(&self.context.failover_listener) = Some(listener);
    }

    /// Replica `name` (of `trust_group`, when given), and its directory.
    pub fn replica(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<(PathBuf, ReplicaInfo), AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        let info = lock(&replica).info();
        Ok((dir, info))
    }

    /// Pauses (or resumes) replication into replica `name` on this side: transfers
    /// are refused as paused, and the primary retries each interval. `trust_group`
    /// picks among replicas of that name in several trust groups.
    pub fn set_paused(
        &self,
        name: &str,
        trust_group: Option<&str>,
        paused: bool,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.set_paused(paused)?;
            info!(replica = %name, paused, "Replication paused or resumed on the replica side");
            Ok(())
        })
    }

    /// Imports the initial copy exported to `dir` (external media) into its replica,
    /// which must exist (the primary created it when replication was enabled): found
    /// by the export's name and relationship. Returns the replica afterwards and the
    /// transfers newly imported.
    pub fn import(&self, dir: &Path) -> Result<(ReplicaInfo, u32), AdminError> {
        let manifest = wire::media::read_manifest(dir)?.ok_or_else(|| {
            AdminError::Invalid(format!("{} holds no export manifest", dir.display()))
        })?;
        if !valid_name(&manifest.name) {
            return Err(AdminError::Invalid(format!(
                "{:?} is not a replica name",
                manifest.name
            )));
        }
        let mut found = None;
        for entry in self.context.authorization().iter() {
            let candidate = entry.storage.join(&manifest.name);
            if !Replica::exists(&candidate) {
                continue;
            }
            let replica = load(&self.context, &candidate)?;
            if lock(&replica).state().relationship == manifest.relationship {
                found = Some((candidate, replica));
                break;
            }
        }
        let Some((replica_dir, replica)) = found else {
            return Err(AdminError::Invalid(format!(
                "No replica {} of this export's relationship here: enable replication on the primary first (it creates the replica)",
                manifest.name
            )));
        };
        let imported = lock(&replica).import(dir, &manifest)?;
        self.context.apply.request(&replica_dir);
        info!(replica = %manifest.name, transfers = imported, "Initial copy imported from external media");
        let info = lock(&replica).info();
        Ok((info, imported))
    }
}

/// Errors of an administrator's request on the replica side (import, pause).
#[derive(Debug, Error)]
pub enum AdminError {
    /// The export cannot be read or does not fit.
    #[error("{0}")]
    Invalid(String),
    /// The manifest cannot be read.
    #[error(transparent)]
    Manifest(#[from] wire::media::MediaError),
    /// The replica refused a transfer.
    #[error("Import")]
    Store(#[from] StoreError),
}
