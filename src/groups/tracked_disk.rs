//! A protected disk: an image whose every change is logged by the tracker first.
//!
//! Each write, trim and write-zeroes follows the tracker's write protocol (see
//! `tracker::group`): log, write the image, release the log guard, then the server
//! replies. FLUSH and FUA sync the ring and the image together.
//!
//! Writes the group refuses ([`tracker::Group::refuse_writes`], a planned failover) fail with
//! `EROFS`, which NBD clients see as `EPERM`.

use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;

use nbd_shim::backend::{BlockSizeLimits, ImageFile};
use nbd_shim::{BlockDevice, Extent, PendingWrite, ZeroMode};
use tracker::{DiskTracker, TrackerError};

/// The name of the tracker's dirty-map context.
pub const DIRTY_CONTEXT: &str = "x-blkrep:dirty";

/// An image served with tracking.
pub struct TrackedDisk {
    image: ImageFile,
    tracker: DiskTracker,
}

impl std::fmt::Debug for TrackedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedDisk")
            .field("image", &self.image.path())
            .finish_non_exhaustive()
    }
}

fn tracker_error(error: TrackerError) -> io::Error {
    match error {
        TrackerError::OutOfRange => io::Error::from_raw_os_error(libc::EINVAL),
        TrackerError::WritesRefused => io::Error::from_raw_os_error(libc::EROFS),
        other => io::Error::other(other),
    }
}

impl TrackedDisk {
    /// Serves `image` with writes logged by `tracker`.
    pub fn new(image: ImageFile, tracker: DiskTracker) -> io::Result<Self> {
        // A second descriptor of the image, for syncing it beside the ring.
        tracker.attach_image(File::open(image.path())?);
        Ok(Self { image, tracker })
    }

    fn sync(&self) -> io::Result<()> {
        self.tracker.sync().map_err(tracker_error)
    }
}

impl BlockDevice for TrackedDisk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.image.read_only()
    }

    fn block_size(&self) -> BlockSizeLimits {
        self.image.block_size()
    }

    fn can_trim(&self) -> bool {
        self.image.can_trim()
    }

    fn can_fast_zero(&self) -> bool {
        self.image.can_fast_zero()
    }

    fn can_multi_conn(&self) -> bool {
        // One ring and one image descriptor for every connection: a flush on any of
        // them syncs what all of them completed.
        self.image.can_multi_conn()
    }

    fn waits_on_device(&self) -> bool {
        self.image.waits_on_device()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset)
    }

    fn read_source(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        self.image.read_source(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let guard = self.tracker.log_write(offset, buf).map_err(tracker_error)?;
        match self.image.write_at(buf, offset, false) {
            Ok(()) => drop(guard),
            Err(error) => {
                guard.image_failed(|record| self.image.read_at(record, offset));
                return Err(error);
            }
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn write_target(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        self.image.write_target(offset, len)
    }

    fn begin_write(
        &self,
        data: &[u8],
        offset: u64,
        may_wait: bool,
    ) -> io::Result<PendingWrite<'_>> {
        let logged = if may_wait {
            self.tracker.log_write(offset, data)
        } else {
            self.tracker.try_log_write(offset, data)
        };
        let guard = logged.map_err(|error| match error {
            TrackerError::WouldWait => io::Error::from(io::ErrorKind::WouldBlock),
            other => tracker_error(other),
        })?;
        // The same protocol as `write_at`: the guard lives until the image write is done.
        Ok(PendingWrite::new(move |written| match written {
            Ok(()) => drop(guard),
            Err(_) => guard.image_failed(|record| self.image.read_at(record, offset)),
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        let guard = self
            .tracker
            .log_zero(offset, len, false)
            .map_err(tracker_error)?;
        match self.image.write_zeroes(offset, len, mode, false) {
            Ok(()) => drop(guard),
            // FAST_ZERO refused: the image is untouched, so the record is withdrawn.
            Err(error) if mode.fast_only && error.kind() == io::ErrorKind::Unsupported => {
                guard.cancel();
                return Err(error);
            }
            Err(error) => {
                guard.image_failed(|_| Err(io::Error::other("zeroes cannot be read back")));
                return Err(error);
            }
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let guard = self
            .tracker
            .log_zero(offset, len, true)
            .map_err(tracker_error)?;
        match self.image.trim(offset, len, false) {
            Ok(()) => drop(guard),
            Err(error) => {
                guard.image_failed(|_| Err(io::Error::other("a trim cannot be read back")));
                return Err(error);
            }
        }
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.sync()
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image.cache(offset, len)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.image.allocation(offset, len)
    }

    fn meta_contexts(&self) -> Vec<String> {
        vec![DIRTY_CONTEXT.to_string()]
    }

    fn context_extents(&self, index: usize, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if index != 0 {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        // Flag 1 = dirty, as qemu's dirty-bitmap contexts report it.
        Ok(self
            .tracker
            .dirty_extents(offset, len)
            .into_iter()
            .map(|(length, dirty)| Extent {
                length,
                flags: u32::from(dirty),
            })
            .collect())
    }
}
