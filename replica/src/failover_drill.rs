//! The test-failover drill (Hyper-V's "Test Failover"): a recovery point served as
//! writable disks while replication goes on.
//!
//! Each disk of the point is a [`PointView`] (the point's state, read through the undo
//! history, frozen however the replica disk changes underneath) under a throwaway
//! [`Overlay`] that takes the test's writes. The replica disks and their history are
//! never written by a test: stopping it deletes the overlays, and a daemon restart ends
//! a running test the same way (the overlays hold nothing worth keeping).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_shim::backend::{Extent, Overlay, OverlayBase};

use crate::history::History;

/// The NBD export name of disk `disk` of replica `name` during a test failover.
pub fn test_export(name: &str, disk: &str) -> String {
    format!("test/{name}/{disk}")
}

/// Overlay block size: the unit a partial write copies from the point.
const OVERLAY_BLOCK: u32 = 4096;

/// One disk as a recovery point has it.
#[derive(Debug)]
pub struct PointView {
    history: Arc<History>,
    point: u64,
    disk: usize,
    image: File,
    path: PathBuf,
    size: u64,
}

impl PointView {
    /// The view of disk `disk` (the replica disk at `path`, `size` bytes) at `point`.
    pub fn open(
        history: Arc<History>,
        point: u64,
        disk: usize,
        path: &Path,
        size: u64,
    ) -> io::Result<Self> {
        Ok(PointView {
            history,
            point,
            disk,
            image: File::open(path)?,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl OverlayBase for PointView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.history
            .read()
            .read_at(
                self.point,
                self.disk,
                (&self.image, &self.path),
                buf,
                offset,
            )
            .map_err(|error| io::Error::other(wire::error_chain(&error)))
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        // Everything reads as data: exact, if not the sparsest answer.
        Ok(vec![Extent {
            length: len.min(self.size.saturating_sub(offset)).max(1),
            flags: 0,
        }])
    }
}

/// The overlays of a test: one writable device per disk, in group order.
pub fn overlays(
    history: &Arc<History>,
    point: u64,
    disks: &[(PathBuf, u64)],
    overlay_dir: &Path,
) -> io::Result<Vec<Arc<Overlay>>> {
    if overlay_dir.exists() {
        std::fs::remove_dir_all(overlay_dir)?;
    }
    std::fs::create_dir_all(overlay_dir)?;
    disks
        .iter()
        .enumerate()
        .map(|(index, (path, size))| {
            let view = PointView::open(Arc::clone(history), point, index, path, *size)?;
            let overlay = Overlay::create(
                Arc::new(view),
                &overlay_dir.join(format!("{index}.overlay")),
                OVERLAY_BLOCK,
            )?;
            Ok(Arc::new(overlay))
        })
        .collect()
}
