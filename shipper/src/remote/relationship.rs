//! The primary's record of a replication relationship, kept beside the group's ring.
//!
//! It says which replica the group replicates to, whether the replica was created,
//! which chain of transfers is current, and what an administrator decided (paused,
//! removed) or must decide (suspended). It is rewritten atomically (temporary file,
//! fsync, rename, directory fsync), so after a crash it holds the old or the new
//! state, never a mix.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors reading or writing the record.
#[derive(Debug, Error)]
pub enum RelationshipError {
    /// A file operation failed.
    #[error("Cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a relationship record.
    #[error("Replication state {path} is corrupt: {reason}; move it away to enable replication afresh (a full initial replication follows)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
}

/// What the record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relationship {
    /// Chosen at random when replication is enabled; the replica accepts transfers only
    /// with this id.
    pub id: u64,
    /// The replica server it was enabled with.
    pub replica_url: String,
    /// The replica exists (enable answered).
    pub enabled: bool,
    /// The current chain: the epoch of the latest resync, part of every transfer id so
    /// the transfers of an older chain can never be taken for newer ones.
    pub chain: u32,
    /// Paused by an administrator.
    pub paused: bool,
    /// Why replication is suspended until an administrator acts (`resume`).
    #[serde(default)]
    pub suspended: Option<String>,
    /// What `resume` repairs after the suspension (`reenable`, `resync`).
    #[serde(default)]
    pub repair_on_resume: Option<String>,
    /// The replica was failed over to and refused this primary as superseded: the
    /// replica's message. Nothing ships again for this relationship.
    #[serde(default)]
    pub superseded: Option<String>,
    /// A planned failover fenced the group's disks: they refuse writes. Set before the
    /// hand-over request goes out, so it is also set when the request's answer was
    /// lost; [`Relationship::handed_over`] tells the two apart.
    #[serde(default)]
    pub fenced: bool,
    /// The failover epoch it speaks for (see [`wire::api::EPOCH_HEADER`]).
    #[serde(default = "wire::api::first_epoch")]
    pub epoch: u64,
    /// Removed by an administrator: nothing is shipped until replication is enabled
    /// again.
    pub removed: bool,
    /// Do not start the initial replication before this time (seconds since the epoch).
    #[serde(default)]
    pub start_after_unix: Option<u64>,
    /// When replication was enabled (seconds since the epoch).
    pub enabled_unix: u64,
    /// The resync copy of the current chain, while it runs: after a daemon crash it
    /// continues with this batch (the tracker knows where the batch starts).
    #[serde(default)]
    pub copy: Option<CopyProgress>,
    /// The chain whose initial copy was exported to external media.
    #[serde(default)]
    pub media_exported: Option<u32>,
    /// The disks the replica was last enabled with. When the group has more (disks
    /// were added), the replica is enabled again with them before anything ships.
    #[serde(default)]
    pub enabled_disks: Vec<wire::api::DiskInfo>,
}

/// Where a resync copy stands, as the relationship record keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyProgress {
    /// The chain (resync epoch) the copy belongs to.
    pub chain: u32,
    /// The batch being sent.
    pub batch: u32,
    /// Whether that batch was offered as the last.
    pub last: bool,
    /// Bytes the copy had to send when it began (for progress).
    pub total_bytes: u64,
}

impl Relationship {
    /// Whether a planned failover handed the group over, as the replica answered: the
    /// disks are fenced and this side knows itself superseded. Fenced without that, the
    /// hand-over's outcome is unknown (its answer was lost) until it is tried again.
    pub fn handed_over(&self) -> bool {
        self.fenced && self.superseded.is_some()
    }

    /// A new relationship with `url`: random id, nothing done yet.
    pub fn new(url: &str) -> Self {
        Relationship {
            id: rand::random::<u64>().max(1),
            replica_url: url.to_string(),
            enabled: false,
            chain: 0,
            paused: false,
            suspended: None,
            repair_on_resume: None,
            superseded: None,
            fenced: false,
            epoch: wire::api::FIRST_EPOCH,
            removed: false,
            start_after_unix: None,
            enabled_unix: crate::thread::unix_now(),
            copy: None,
            media_exported: None,
            enabled_disks: Vec::new(),
        }
    }

    /// The record of the group whose ring is `ring`.
    pub fn path_for_ring(ring: &Path) -> PathBuf {
        let mut name = ring.as_os_str().to_os_string();
        name.push(".replication.json");
        PathBuf::from(name)
    }

    /// Reads the record of the group whose ring is `ring`; `None` if there is none.
    pub fn load_for_ring(ring: &Path) -> Result<Option<Self>, RelationshipError> {
        Self::load(&Self::path_for_ring(ring))
    }

    /// Reads the record; `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, RelationshipError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RelationshipError::Io {
                    what: "read",
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| RelationshipError::Corrupt {
                path: path.to_path_buf(),
                reason: error.to_string(),
            })
    }

    /// Writes the record atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), RelationshipError> {
        let io = |what| {
            let path = path.to_path_buf();
            move |source| RelationshipError::Io { what, path, source }
        };
        let mut temporary = path.as_os_str().to_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let text = serde_json::to_vec_pretty(self).map_err(|error| RelationshipError::Io {
            what: "encode",
            path: path.to_path_buf(),
            source: std::io::Error::other(error),
        })?;
        let mut file = File::create(&temporary).map_err(io("create"))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .map_err(io("write"))?;
        std::fs::rename(&temporary, path).map_err(io("replace"))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(io("sync the directory of"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = Relationship::path_for_ring(&dir.path().join("vm1.ring"));
        assert!(path.ends_with("vm1.ring.replication.json"));
        assert_eq!(Relationship::load(&path).expect("load"), None);
        let mut relationship = Relationship::new("https://replica:8443");
        assert_ne!(relationship.id, 0);
        relationship.chain = 7;
        relationship.save(&path).expect("save");
        assert_eq!(
            Relationship::load(&path).expect("load"),
            Some(relationship.clone())
        );
        relationship.paused = true;
        relationship.save(&path).expect("save again");
        assert!(Relationship::load(&path)
            .expect("load")
            .is_some_and(|r| r.paused));
        std::fs::write(&path, b"{ not json").expect("corrupt");
        let error = Relationship::load(&path).expect_err("corrupt");
        assert!(error.to_string().contains("corrupt"), "{error}");
    }
}
