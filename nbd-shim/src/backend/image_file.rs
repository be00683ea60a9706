//! A raw disk image: a regular file or a block device.
//!
//! One file descriptor is shared by every connection (positioned I/O only, so there is no
//! shared file offset), which is why [`BlockDevice::can_multi_conn`] is true: `fdatasync`
//! on that descriptor covers every write any connection completed.
//!
//! Modes:
//! - **Buffered** (default): `pread`/`pwrite` through the page cache. FUA writes use
//!   `pwritev2(RWF_DSYNC)` (durable for that write only), falling back to `pwrite` +
//!   `fdatasync` on kernels without it; FLUSH and FUA on zeroing/trim are `fdatasync`.
//! - **Direct** (`O_DIRECT`): the minimum block size becomes the device's logical block
//!   size (`BLKSSZGET`), or 4096 for files. Buffers that are not aligned in memory go
//!   through an aligned per-thread bounce buffer. The unaligned tail of an image whose size
//!   is not a multiple of the block size is served through a second, buffered descriptor.
//!
//! Zeroing and trimming:
//! - Files: `write_zeroes` punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`)
//!   when the client allows holes, else `FALLOC_FL_ZERO_RANGE`; if the filesystem can do
//!   neither it writes zero buffers, unless the client asked for a fast zero (then
//!   `Unsupported`). `trim` punches a hole, so trimmed ranges read back as zeroes.
//! - Block devices: `write_zeroes` uses `fallocate(PUNCH_HOLE)` (the kernel's
//!   "zero out, may unmap, never fall back to writing" on block devices) when holes are
//!   allowed, and `BLKZEROOUT` otherwise or when that is not supported (never for a fast
//!   zero: `BLKZEROOUT` may write every block). `trim` tries the same zeroing punch first
//!   and falls back to `BLKDISCARD`: **a discard on a block device need not zero**, so on
//!   devices without cheap zeroing a trimmed range may read back as old data or garbage
//!   (the NBD spec allows that; callers that need zeroes must use `write_zeroes`).
//!   Both need 512-byte alignment; unaligned edges are written as zeroes (zeroing) or
//!   left alone (trim, which is a hint).
//!
//! `allocation` uses `SEEK_DATA`/`SEEK_HOLE` on files (holes are reported as
//! `HOLE | ZERO`); a block device is reported as fully allocated.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno as NixErrno;
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

use super::{BlockDevice, BlockSizeLimits, Extent, ZeroMode};
use crate::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};

/// Largest request advertised: the spec's interoperable maximum, 2^25 bytes.
const MAX_REQUEST: u32 = 32 << 20;
/// Preferred request size: one page.
const PREFERRED: u32 = 4096;
/// Alignment of direct I/O on regular files (safe for every common filesystem).
const FILE_DIRECT_ALIGNMENT: u32 = 4096;
/// Sector size that block device zeroing and discard ioctls require.
const SECTOR: u64 = 512;
/// Reads up to this size go through a descriptor with readahead off. Many small reads in
/// flight on io_uring look sequential to the kernel's readahead, which then reads the
/// whole image for a random 4 KiB workload (measured with fio's io_uring engine on a
/// file: 2 GiB cached for 0.8 GiB read, against exactly what was read with
/// `POSIX_FADV_RANDOM`). A guest reads ahead in its own page cache anyway; its large
/// reads keep the host's readahead.
const SMALL_READ: u64 = 128 << 10;
/// Size of the zero buffer used when zeroes have to be written.
const ZERO_CHUNK: usize = 1 << 20;
/// Most extents one `allocation` call reports; the client asks again for the rest.
const MAX_ALLOCATION_EXTENTS: usize = 1024;

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t); BLKSSZGET = _IO(0x12, 104) returning int;
    // BLKDISCARD = _IO(0x12, 119) and BLKZEROOUT = _IO(0x12, 127) taking u64[2] {start, len}.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// How to open an [`ImageFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageFileOptions {
    /// Open read-only and refuse writes, trims and zeroing.
    pub read_only: bool,
    /// Open with `O_DIRECT`, bypassing the page cache.
    pub direct: bool,
}

/// A raw image file or block device served as an export.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: File,
    /// Buffered descriptor for I/O that `O_DIRECT` cannot do (the unaligned tail);
    /// `None` in buffered mode.
    buffered_fallback: Option<File>,
    /// Buffered mode: a read-only descriptor with readahead off
    /// (`POSIX_FADV_RANDOM`), for small reads (see [`SMALL_READ`]).
    random_reads: Option<File>,
    size: u64,
    block_device: bool,
    options: ImageFileOptions,
    /// Alignment `O_DIRECT` needs (1 in buffered mode).
    alignment: u32,
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn nix_err(err: NixErrno) -> io::Error {
    io::Error::from(err)
}

/// Byte counts as u64 (usize is at most 64 bits on every target this crate builds for).
fn len64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY)
    ) || err.kind() == io::ErrorKind::Unsupported
}

thread_local! {
    /// Per-thread bounce buffer for direct I/O from unaligned memory.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on an `align`-aligned scratch slice of `len` bytes.
fn with_bounce<R>(len: usize, align: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|cell| {
        let mut buf = cell.borrow_mut();
        let needed = len + align;
        if buf.len() < needed {
            buf.resize(needed, 0);
        }
        // align_offset on a u8 pointer always succeeds for a power-of-two alignment and
        // is < align, so the slice below stays in bounds.
        let skew = buf.as_ptr().align_offset(align).min(align);
        f(&mut buf[skew..skew + len])
    })
}

impl ImageFile {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: impl AsRef<Path>, options: ImageFileOptions) -> io::Result<Self> {
        let path = path.as_ref();
        let open = |direct: bool| {
            let mut opts = OpenOptions::new();
            opts.read(true).write(!options.read_only);
            if direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            opts.open(path)
        };
        let file = open(options.direct)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let size = if block_device {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a
            // live local; the fd is open for the duration of the call.
            unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(nix_err)?;
            size
        } else {
            meta.len()
        };
        let alignment = if !options.direct {
            1
        } else if block_device {
            let mut sector: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live
            // local; the fd is open for the duration of the call.
            unsafe { ioctl::blksszget(file.as_raw_fd(), &mut sector) }.map_err(nix_err)?;
            u32::try_from(sector)
                .ok()
                .filter(|s| s.is_power_of_two())
                .unwrap_or(FILE_DIRECT_ALIGNMENT)
        } else {
            FILE_DIRECT_ALIGNMENT
        };
        let buffered_fallback = if options.direct {
            Some(open(false)?)
        } else {
            None
        };
        let random_reads = if options.direct {
            None
        } else {
            Self::open_for_random_reads(&file)
                .inspect_err(|err| {
                    tracing::warn!(path = %path.display(), %err, "no descriptor for small reads; they keep the kernel's readahead");
                })
                .ok()
        };
        tracing::debug!(path = %path.display(), size, block_device, ?options, "opened image");
        Ok(ImageFile {
            path: path.to_owned(),
            file,
            buffered_fallback,
            random_reads,
            size,
            block_device,
            options,
            alignment,
        })
    }

    /// A second, read-only descriptor of `file`'s open file (not of the path, which could
    /// have been replaced since) with readahead off.
    fn open_for_random_reads(file: &File) -> io::Result<File> {
        let same = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        posix_fadvise(
            same.as_raw_fd(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_RANDOM,
        )
        .map_err(nix_err)?;
        Ok(same)
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The options it was opened with.
    pub fn options(&self) -> ImageFileOptions {
        self.options
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Range past the end of the image",
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.options.read_only {
            Err(io::Error::from_raw_os_error(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Whether the range can go through the `O_DIRECT` descriptor as far as offset and
    /// length are concerned (memory alignment is handled by bouncing).
    fn direct_aligned(&self, offset: u64, len: usize) -> bool {
        let align = u64::from(self.alignment);
        offset % align == 0 && len64(len) % align == 0
    }

    /// The descriptor for an `offset`/`len` pair and whether memory must be aligned.
    fn descriptor_for(&self, offset: u64, len: usize) -> (&File, bool) {
        match &self.buffered_fallback {
            Some(buffered) if !self.direct_aligned(offset, len) => (buffered, false),
            Some(_) => (&self.file, true),
            None => (&self.file, false),
        }
    }

    fn align(&self) -> usize {
        usize::try_from(self.alignment).unwrap_or(4096)
    }

    fn pwrite_dsync(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr().cast_mut().cast(),
                iov_len: rest.len(),
            };
            let at = to_off(offset + len64(done))?;
            // SAFETY: iov describes `rest`, a live borrowed slice that the kernel only
            // reads; iovcnt is 1 and the fd is open for the duration of the call.
            let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, at, libc::RWF_DSYNC) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            done += usize::try_from(n).unwrap_or(rest.len());
        }
        Ok(())
    }

    fn write_raw(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let (file, needs_aligned_memory) = self.descriptor_for(offset, buf.len());
        let write = |data: &[u8]| -> io::Result<()> {
            if fua {
                match Self::pwrite_dsync(file, data, offset) {
                    // Kernels before 4.7 have no RWF_DSYNC.
                    Err(e) if is_unsupported(&e) => {
                        file.write_all_at(data, offset)?;
                        file.sync_data()
                    }
                    other => other,
                }
            } else {
                file.write_all_at(data, offset)
            }
        };
        let align = self.align();
        if needs_aligned_memory && buf.as_ptr().align_offset(align) != 0 {
            with_bounce(buf.len(), align, |bounce| {
                bounce.copy_from_slice(buf);
                write(bounce)
            })
        } else {
            write(buf)
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = usize::try_from((end - at).min(len64(ZERO_CHUNK))).unwrap_or(ZERO_CHUNK);
            self.write_raw(&zeroes[..n], at, false)?;
            at += len64(n);
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        fallocate(self.fd(), flags, to_off(offset)?, to_off(len)?).map_err(nix_err)
    }

    fn blk_ioctl_range(&self, discard: bool, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        let result = if discard {
            // SAFETY: BLKDISCARD reads a u64[2] through the pointer, which points at a
            // live local; the fd is open for the duration of the call.
            unsafe { ioctl::blkdiscard(self.fd(), &range) }
        } else {
            // SAFETY: BLKZEROOUT reads a u64[2] through the pointer, which points at a
            // live local; the fd is open for the duration of the call.
            unsafe { ioctl::blkzeroout(self.fd(), &range) }
        };
        result.map(drop).map_err(nix_err)
    }

    fn zero_file(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let zero_range = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let mut result = if mode.may_trim {
            self.fallocate(punch, offset, len)
        } else {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        };
        if result.as_ref().is_err_and(is_unsupported) {
            result = self.fallocate(zero_range, offset, len);
        }
        match result {
            Ok(()) => {
                if fua {
                    self.file.sync_data()?;
                }
                Ok(())
            }
            Err(e) if is_unsupported(&e) => {
                if mode.fast_only {
                    return Err(io::Error::from(io::ErrorKind::Unsupported));
                }
                self.write_zero_buffers(offset, len, fua)
            }
            Err(e) => Err(e),
        }
    }

    fn zero_block_device(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fua: bool,
    ) -> io::Result<()> {
        // The ioctls and fallocate need sector alignment; the unaligned edges are written.
        let start = offset.div_ceil(SECTOR) * SECTOR;
        let end = (offset + len) / SECTOR * SECTOR;
        if start >= end {
            // Less than two partial sectors: writing them is as fast as anything.
            return self.write_zero_buffers(offset, len, fua);
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let middle = if mode.may_trim {
            match self.fallocate(punch, start, end - start) {
                Err(e) if is_unsupported(&e) && !mode.fast_only => {
                    self.blk_ioctl_range(false, start, end - start)
                }
                Err(e) if is_unsupported(&e) => Err(io::Error::from(io::ErrorKind::Unsupported)),
                other => other,
            }
        } else if mode.fast_only {
            // BLKZEROOUT without unmapping may write every block: not fast.
            Err(io::Error::from(io::ErrorKind::Unsupported))
        } else {
            self.blk_ioctl_range(false, start, end - start)
        };
        middle?;
        if offset < start {
            self.write_zero_buffers(offset, start - offset, false)?;
        }
        if end < offset + len {
            self.write_zero_buffers(end, offset + len - end, false)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

impl BlockDevice for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.options.read_only
    }

    fn block_size(&self) -> BlockSizeLimits {
        BlockSizeLimits {
            minimum: self.alignment,
            preferred: PREFERRED.max(self.alignment),
            maximum: MAX_REQUEST,
        }
    }

    fn can_trim(&self) -> bool {
        !self.options.read_only
    }

    fn can_fast_zero(&self) -> bool {
        !self.options.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn waits_on_device(&self) -> bool {
        // Buffered I/O completes in the page cache; direct I/O waits for the device.
        self.options.direct
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, len64(buf.len()))?;
        let (file, needs_aligned_memory) = self.descriptor_for(offset, buf.len());
        let align = self.align();
        if needs_aligned_memory && buf.as_ptr().align_offset(align) != 0 {
            with_bounce(buf.len(), align, |bounce| {
                file.read_exact_at(bounce, offset)?;
                buf.copy_from_slice(bounce);
                Ok(())
            })
        } else {
            file.read_exact_at(buf, offset)
        }
    }

    fn read_source(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        self.check_range(offset, len).ok()?;
        if len <= SMALL_READ {
            if let Some(file) = &self.random_reads {
                return Some(file.as_fd());
            }
        }
        let (file, _) = self.descriptor_for(offset, usize::try_from(len).ok()?);
        Some(file.as_fd())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len64(buf.len()))?;
        self.write_raw(buf, offset, fua)
    }

    fn write_target(&self, offset: u64, len: u64) -> Option<BorrowedFd<'_>> {
        // Only an O_DIRECT image waits on the device; buffered writes are quicker inline.
        if !self.options.direct || self.options.read_only {
            return None;
        }
        self.check_range(offset, len).ok()?;
        let (file, aligned_memory) = self.descriptor_for(offset, usize::try_from(len).ok()?);
        aligned_memory.then(|| file.as_fd())
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            self.zero_block_device(offset, len, mode, fua)
        } else {
            self.zero_file(offset, len, mode, fua)
        }
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let result = if self.block_device {
            // Trim is a hint: only whole sectors inside the range are discarded.
            let start = offset.div_ceil(SECTOR) * SECTOR;
            let end = (offset + len) / SECTOR * SECTOR;
            if start >= end {
                return Ok(());
            }
            match self.fallocate(punch, start, end - start) {
                Err(e) if is_unsupported(&e) => self.blk_ioctl_range(true, start, end - start),
                other => other,
            }
        } else {
            self.fallocate(punch, offset, len)
        };
        match result {
            // Nothing to discard with: a no-op trim is allowed ("A server MAY discard").
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(e),
            Ok(()) => {
                if fua {
                    self.file.sync_data()?;
                }
                Ok(())
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if self.options.direct {
            // The page cache is bypassed: there is nothing to warm.
            return Ok(());
        }
        posix_fadvise(
            self.fd(),
            to_off(offset)?,
            to_off(len)?,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(nix_err)
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset + len;
        if self.block_device {
            return Ok(vec![Extent {
                length: len,
                flags: 0,
            }]);
        }
        let fd = self.fd();
        let mut extents = Vec::new();
        let mut at = offset;
        while at < end && extents.len() < MAX_ALLOCATION_EXTENTS {
            let data = match lseek(fd, to_off(at)?, Whence::SeekData) {
                Ok(pos) => u64::try_from(pos).unwrap_or(end).min(self.size),
                // No data at or after `at`: the rest of the file is a hole.
                Err(NixErrno::ENXIO) => self.size,
                // SEEK_DATA unsupported: report everything as data.
                Err(NixErrno::EINVAL) if extents.is_empty() => {
                    return Ok(vec![Extent {
                        length: len,
                        flags: 0,
                    }])
                }
                Err(e) => return Err(nix_err(e)),
            };
            if data > at {
                extents.push(Extent {
                    length: data.min(end) - at,
                    flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
                });
                at = data;
                continue;
            }
            let hole = match lseek(fd, to_off(at)?, Whence::SeekHole) {
                Ok(pos) => u64::try_from(pos).unwrap_or(end).min(self.size),
                Err(NixErrno::ENXIO) => self.size,
                Err(e) => return Err(nix_err(e)),
            };
            // Guarantee progress even if the file changed under us.
            let hole = hole.max(at + 1);
            extents.push(Extent {
                length: hole.min(end) - at,
                flags: 0,
            });
            at = hole;
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests;
