//! The initial copy on external media: what `blkrep replication export` writes on
//! the primary and `blkrep replica import` reads on the replica server.
//!
//! A directory per group holds one file per transfer, `<id as 16 hex digits>.xfer`,
//! the transfer's chunk frames back to back exactly as they would cross the network
//! (each checked again when imported), and [`MANIFEST_FILE`], written last and
//! atomically, which lists the complete transfers in order. A transfer file not in the
//! manifest is incomplete and ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::{DiskInfo, Position, TransferKind};

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The format this version writes and reads.
pub const FORMAT: &str = "blkrep-initial-copy/1";
/// Largest manifest accepted.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// Errors reading an export's manifest.
#[derive(Debug, Error)]
pub enum MediaError {
    /// The file cannot be read.
    #[error("Cannot read {path}")]
    Io {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a manifest this version reads.
    #[error("{path} is not an export manifest: {reason}")]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The manifest of the export in `dir`; `None` when there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, MediaError> {
    let path = dir.join(MANIFEST_FILE);
    let io = |source| MediaError::Io {
        path: path.clone(),
        source,
    };
    let invalid = |reason: String| MediaError::Invalid {
        path: path.clone(),
        reason,
    };
    let meta = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.map_err(io)?,
    };
    if meta.len() > MAX_MANIFEST {
        return Err(invalid(format!("larger than {MAX_MANIFEST} bytes")));
    }
    let bytes = std::fs::read(&path).map_err(io)?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.format != FORMAT {
        return Err(invalid(format!(
            "format {:?}, expected {FORMAT:?}",
            manifest.format
        )));
    }
    Ok(Some(manifest))
}

/// The file holding transfer `id`.
pub fn transfer_file(id: u64) -> String {
    format!("{id:016x}.xfer")
}

/// What an export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The group (the replica's name).
    pub name: String,
    /// The relationship whose replica may import it.
    pub relationship: u64,
    /// The primary host that exported it.
    pub primary_host: String,
    /// The group's disks.
    pub disks: Vec<DiskInfo>,
    /// Complete transfers, in the order they apply.
    pub transfers: Vec<MediaTransfer>,
    /// Whether every transfer of the copy is there.
    pub complete: bool,
}

/// One complete transfer of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaTransfer {
    /// Transfer id.
    pub id: u64,
    /// What it carries (a resync batch).
    pub kind: TransferKind,
    /// Chunk frames in its file.
    pub chunks: u32,
    /// Bytes of its file.
    pub bytes: u64,
    /// Where its data ends.
    pub end: Option<Position>,
}
