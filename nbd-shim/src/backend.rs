//! What an export is served from.
//!
//! A [`BlockDevice`] is shared by every connection of an export and called from their
//! threads concurrently, so it must be `Send + Sync`. Calls are synchronous: a call that
//! returns `Ok` has completed; with `fua = true` it is also durable.
//!
//! Errors are plain [`std::io::Error`]s; the server maps them to NBD errnos
//! (`ENOSPC` stays `ENOSPC`, `EROFS`/`EPERM` become `EPERM`, `Unsupported` becomes
//! `ENOTSUP`, anything else `EIO`).

use std::io;
use std::os::fd::BorrowedFd;

mod image_file;
pub use image_file::{ImageFile, ImageFileOptions};
mod overlay;
pub use overlay::{Overlay, OverlayBase, OverlayExtent};

/// One extent of a block-status answer: `length` bytes with NBD `flags`
/// (for `base:allocation`: `NBD_STATE_HOLE` = 1, `NBD_STATE_ZERO` = 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; never zero.
    pub length: u64,
    /// Context-specific flags.
    pub flags: u32,
}

/// How WRITE_ZEROES may produce its zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// The range may be deallocated (the client did not set `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with [`io::ErrorKind::Unsupported`] rather than write zeroes slowly
    /// (`NBD_CMD_FLAG_FAST_ZERO`).
    pub fast_only: bool,
}

/// Limits advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeLimits {
    /// Minimum block size (1 unless the backend needs alignment, e.g. O_DIRECT).
    pub minimum: u32,
    /// Preferred block size (a power of two, at least `minimum`).
    pub preferred: u32,
    /// Largest payload accepted for one request (a multiple of `minimum`).
    pub maximum: u32,
}

/// A write begun with [`BlockDevice::begin_write`] whose data the caller writes to the
/// device's file itself; [`PendingWrite::finish`] reports how that went.
///
/// Dropped without `finish`, it reports the write as failed: the device then reads
/// back what its file holds instead of trusting the data (a tracked disk rewrites its
/// log record from the image), which is right whatever happened to the write.
#[derive(Default)]
#[must_use = "finish it with the write's result once the data is written"]
pub struct PendingWrite<'a> {
    finish: Option<FinishWrite<'a>>,
}

/// What a device runs when a [`PendingWrite`] finishes.
type FinishWrite<'a> = Box<dyn FnOnce(Result<(), &io::Error>) + 'a>;

impl<'a> PendingWrite<'a> {
    /// A pending write that runs `finish` with the write's result.
    pub fn new(finish: impl FnOnce(Result<(), &io::Error>) + 'a) -> Self {
        PendingWrite {
            finish: Some(Box::new(finish)),
        }
    }

    /// Whether the device keeps something for the write until it is finished (a
    /// tracked disk's log guard, which other writes may wait for).
    pub fn holds(&self) -> bool {
        self.finish.is_some()
    }

    /// Reports that the data was written (`Ok`), or not, or only in part (`Err`).
    pub fn finish(mut self, result: Result<(), &io::Error>) {
        if let Some(finish) = self.finish.take() {
            finish(result);
        }
    }
}

impl std::fmt::Debug for PendingWrite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingWrite")
            .field("finished", &self.finish.is_none())
            .finish()
    }
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish(Err(&io::Error::other(
                "The write was abandoned before it completed",
            )));
        }
    }
}

/// A disk served over NBD.
pub trait BlockDevice: Send + Sync {
    /// Export size in bytes.
    fn size(&self) -> u64;
    /// Whether writes, trims and zeroing are refused.
    fn read_only(&self) -> bool;
    /// Block size limits; requests outside them are refused before any I/O.
    fn block_size(&self) -> BlockSizeLimits;
    /// Whether TRIM does anything (`NBD_FLAG_SEND_TRIM`).
    fn can_trim(&self) -> bool;
    /// Whether WRITE_ZEROES with FAST_ZERO can ever succeed (`NBD_FLAG_SEND_FAST_ZERO`).
    fn can_fast_zero(&self) -> bool;
    /// Whether a FLUSH on one connection covers writes completed on every other one.
    fn can_multi_conn(&self) -> bool;
    /// Whether reads and writes wait on the device (O_DIRECT, slow or remote storage), so
    /// a connection should keep several in flight instead of running them one after
    /// another. FLUSH, CACHE and FUA requests always run beside the others.
    fn waits_on_device(&self) -> bool {
        false
    }

    /// Fills `buf` from `offset`. The range is within [`BlockDevice::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// A file `len` bytes at `offset` (within [`BlockDevice::size`]) can be read from
    /// directly, at the export's offsets and with the same result as
    /// [`BlockDevice::read_at`], so that a connection keeps many reads in flight; `None`
    /// when only `read_at` can read them. The file may be open with `O_DIRECT`: read it
    /// into memory aligned to [`crate::engine::IoBuf::ALIGN`].
    fn read_source(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        let _ = (offset, len);
        None
    }
    /// Writes `buf` at `offset`; durable before returning when `fua`.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// A file a write of `len` bytes at `offset` (within [`BlockDevice::size`]) can be
    /// written to directly, at the export's offsets, so that a connection keeps many
    /// writes in flight on its I/O engine; `None` when only `write_at` can write them.
    /// The caller first calls [`BlockDevice::begin_write`], then writes the data to the
    /// file from memory aligned to [`crate::engine::IoBuf::ALIGN`] (the file may be open
    /// with `O_DIRECT`), then finishes the [`PendingWrite`] with the result. Offered
    /// only by devices that [wait on the device](BlockDevice::waits_on_device).
    fn write_target(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        let _ = (offset, len);
        None
    }
    /// Prepares a write of `data` at `offset` to [`BlockDevice::write_target`]'s file
    /// (a tracked disk logs it here). Without `may_wait`, fails with
    /// [`io::ErrorKind::WouldBlock`] rather than wait for other writes in flight: the
    /// caller may hold [`PendingWrite`]s of its own that those writes wait for.
    fn begin_write(
        &self,
        data: &[u8],
        offset: u64,
        may_wait: bool,
    ) -> io::Result<PendingWrite<'_>> {
        let _ = (data, offset, may_wait);
        Ok(PendingWrite::default())
    }
    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()>;
    /// Discards `len` bytes at `offset`; afterwards they read as zeroes.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Prefetches a range (NBD_CMD_CACHE); a hint, so errors may be ignored.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()>;

    /// `base:allocation` extents covering at least the first byte of
    /// `offset..offset + len`, in order, contiguous, none extending past the export.
    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
    /// Names of the backend's own metadata contexts (besides `base:allocation`),
    /// e.g. `x-blkrep:dirty`. Each may also be matched by a query prefix
    /// (`x-blkrep:` lists them all).
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }
    /// Extents for the backend's own context number `index` (into
    /// [`BlockDevice::meta_contexts`]), with the same shape rules as
    /// [`BlockDevice::allocation`].
    fn context_extents(&self, index: usize, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = (index, offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn a_pending_write_reports_its_result_once() {
        let seen = RefCell::new(Vec::new());
        PendingWrite::new(|result| seen.borrow_mut().push(result.is_ok())).finish(Ok(()));
        let err = io::Error::from_raw_os_error(libc::EIO);
        PendingWrite::new(|result| seen.borrow_mut().push(result.is_ok())).finish(Err(&err));
        assert_eq!(*seen.borrow(), [true, false]);
    }

    #[test]
    fn a_pending_write_dropped_unfinished_reports_a_failure() {
        let seen = RefCell::new(None);
        drop(PendingWrite::new(|result| {
            *seen.borrow_mut() = Some(result.map_err(io::Error::kind));
        }));
        assert_eq!(
            *seen.borrow(),
            Some(Err(io::ErrorKind::Other)),
            "the device must trust its file, not the data"
        );
        // Nothing to report for a device that keeps nothing.
        let nothing = PendingWrite::default();
        assert!(!nothing.holds());
        drop(nothing);
    }
}
