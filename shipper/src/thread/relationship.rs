//! The relationship record of a replica consumer: loaded at start (a changed replica
//! server or a new ring starts afresh), saved on every change, and the replica
//! enabled from it on first use.

use std::path::PathBuf;

use tracing::{info, warn};
use tracker::{Group, ResyncReason};
use wire::api::{DiskInfo, EnableRequest};

use crate::remote::{Relationship, RelationshipError};

use super::{ReplicationSetup, ShipperError, Worker};

/// The relationship record, and the setup it was loaded for.
pub(super) struct RelationshipFile {
    path: PathBuf,
    pub(super) state: Relationship,
    pub(super) setup: ReplicationSetup,
}

impl RelationshipFile {
    pub(super) fn save(&self) -> Result<(), RelationshipError> {
        self.state.save(&self.path)
    }
}

/// The group's disks as the replica API describes them.
pub(super) fn disk_infos(setup: &ReplicationSetup, group: &Group) -> Vec<DiskInfo> {
    setup
        .disk_names
        .iter()
        .zip(group.disk_sizes())
        .map(|(name, size)| DiskInfo {
            name: name.clone(),
            size,
        })
        .collect()
}

/// Loads the relationship record (a new one if there is none or the replica server
/// changed) and saves it as this start sees it.
pub(super) fn load_relationship(setup: ReplicationSetup) -> Result<RelationshipFile, ShipperError> {
    let path = setup.relationship_path.clone();
    let mut state = match Relationship::load(&path)? {
        Some(state) if state.replica_url == setup.replica_url => state,
        Some(old) => {
            warn!(old = %old.replica_url, new = %setup.replica_url, "The replica server changed: replication is enabled afresh with a full initial replication");
            Relationship::new(&setup.replica_url)
        }
        None => {
            let mut fresh = Relationship::new(&setup.replica_url);
            fresh.start_after_unix = setup.start_after_unix;
            fresh
        }
    };
    state.epoch = state.epoch.max(setup.epoch);
    let mut file = RelationshipFile { path, state, setup };
    if file.setup.fresh_ring && file.state.enabled {
        info!("The ring is new: the replica is brought up to date with a full initial replication");
        file.state.enabled = false;
    }
    file.save()?;
    Ok(file)
}

impl Worker {
    /// Creates the replica on first use, then has every block copied.
    pub(super) fn ensure_enabled(&mut self) -> Result<(), ShipperError> {
        let Some(relationship) = &self.relationship else {
            return Ok(());
        };
        let resend_recovery = relationship.setup.recovery.is_some() && !self.recovery_sent;
        let disks = disk_infos(&relationship.setup, &self.group);
        let disks_added = relationship.state.enabled_disks != disks;
        if relationship.state.enabled && !resend_recovery && !disks_added {
            return Ok(());
        }
        let request = EnableRequest {
            name: self.group.name().to_string(),
            disks,
            primary_host: relationship.setup.primary_host.clone(),
            relationship: relationship.state.id,
            initial: relationship.setup.initial,
            recovery: relationship.setup.recovery,
        };
        if relationship.state.enabled {
            // Enabling again is idempotent and carries the configured history, and
            // the disks added to the group since (the replica adds them; the
            // tracker's resync copies them).
            let answer = self.sink.enable(&request);
            if let Err(error) = &answer {
                if disks_added {
                    warn!(group = %self.group.name(), %error, "The replica did not take the disks added to the group");
                }
            }
            answer?;
            self.recovery_sent = true;
            return self.record_enabled_disks(request.disks);
        }
        self.sink.enable(&request)?;
        self.recovery_sent = true;
        // A resync in progress belonged to the replica before this one.
        self.resync = None;
        self.group
            .request_full_resync(ResyncReason::InitialReplication)?;
        if let Some(relationship) = &mut self.relationship {
            relationship.state.enabled = true;
            relationship.state.enabled_disks = request.disks;
            relationship.save()?;
            info!(group = %self.group.name(), replica = %relationship.state.replica_url, relationship = %format!("{:x}", relationship.state.id), "Replication enabled; the initial replication starts");
        }
        Ok(())
    }

    /// Records the disks the replica now has, once (a record of an older version has
    /// none: the first enable after the upgrade fills it in).
    fn record_enabled_disks(&mut self, disks: Vec<DiskInfo>) -> Result<(), ShipperError> {
        let Some(relationship) = &mut self.relationship else {
            return Ok(());
        };
        if relationship.state.enabled_disks != disks {
            info!(group = %self.group.name(), disks = disks.len(), "The replica has the group's disks");
            relationship.state.enabled_disks = disks;
            relationship.save()?;
        }
        Ok(())
    }
}
