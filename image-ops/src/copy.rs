//! Sparse copies of disk images: the starting point of a local replica.
//!
//! Only allocated ranges are copied (found with `SEEK_DATA`/`SEEK_HOLE`), with
//! `copy_file_range` so the kernel can share extents on filesystems that support it.
//! The copy is written to a temporary name, synced, then renamed into place, so a
//! crash never leaves a partial copy under the final name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Copies `source` to `target` sparsely and durably. Returns the bytes copied.
pub fn sparse_copy(source: &Path, target: &Path) -> io::Result<u64> {
    let input = File::open(source)?;
    let size = input.metadata()?.len();
    let mut temporary = target.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)?;
    output.set_len(size)?;
    let mut copied = 0u64;
    let mut position = 0u64;
    while position < size {
        let Some(data) = next_data(&input, position).filter(|data| *data < size) else {
            break;
        };
        let hole = next_hole(&input, data, size);
        copy_range(&input, &output, data, hole - data)?;
        copied += hole - data;
        position = hole;
    }
    output.sync_all()?;
    drop(output);
    std::fs::rename(&temporary, target)?;
    if let Some(parent) = target.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(copied)
}

/// Largest folio the page cache builds for a file (a PMD on x86-64): cached ranges are
/// dropped in whole, aligned units of this size.
const LARGEST_FOLIO: u64 = 2 << 20;

/// Drops the page cache behind a pass that reads a disk once (a resync or an initial
/// copy), as the pass goes.
///
/// Such a pass would otherwise push the host's useful cache out for data read once,
/// and leave the image cached in the large folios that big sequential reads get.
/// Pages are dropped only once the pass is past a whole [`LARGEST_FOLIO`] (the kernel
/// drops only folios entirely inside the range it is given, and readahead has already
/// cached a little beyond the read). Dirty pages stay (the kernel only starts their
/// writeback). Advice only: a failure changes nothing that is correct, so it is ignored.
#[derive(Debug, Clone, Copy)]
pub struct DropBehind {
    from: u64,
}

impl DropBehind {
    /// A pass that starts reading at `offset`.
    pub fn new(offset: u64) -> Self {
        Self {
            from: offset - offset % LARGEST_FOLIO,
        }
    }

    /// The pass has read everything below `offset`.
    pub fn passed(&mut self, file: &File, offset: u64) {
        let to = offset - offset % LARGEST_FOLIO;
        if to > self.from {
            drop_cached(file, self.from, to - self.from);
            self.from = to;
        }
    }

    /// The pass ended at `offset`: the rest of its last unit goes too.
    pub fn finish(mut self, file: &File, offset: u64) {
        self.passed(file, offset.saturating_add(LARGEST_FOLIO - 1));
    }
}

/// Drops the clean page-cache pages of `offset..offset + length` (whole folios only).
/// Advice only: a failure is ignored.
fn drop_cached(file: &File, offset: u64, length: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    if let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) {
        let _ = posix_fadvise(
            file.as_raw_fd(),
            offset,
            length,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// How many bytes of `file` the page cache holds (`mincore` over a mapping of it), for
/// tests and diagnostics of [`DropBehind`].
pub fn cached_bytes(file: &File) -> io::Result<u64> {
    let length = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if length == 0 {
        return Ok(0);
    }
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|page| usize::try_from(page).ok())
        .unwrap_or(4096);
    // SAFETY: a new shared read-only mapping of the open file; it is never read
    // through (mincore only asks the kernel about it) and is unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut resident = vec![0u8; length.div_ceil(page)];
    // SAFETY: `map` spans `length` bytes; `resident` has one byte per page of it.
    let result = unsafe { libc::mincore(map, length, resident.as_mut_ptr()) };
    let error = io::Error::last_os_error();
    // SAFETY: unmaps the mapping made above, which nothing else knows of.
    unsafe { libc::munmap(map, length) };
    if result != 0 {
        return Err(error);
    }
    let pages = resident.iter().filter(|state| **state & 1 == 1).count();
    Ok(pages as u64 * page as u64)
}

/// Where the next allocated byte at or after `offset` is, if the filesystem knows
/// (`None`: no data up to the end). Filesystems and devices without `SEEK_DATA` report
/// everything as data, so nothing is ever skipped by mistake.
pub fn next_data(file: &File, offset: u64) -> Option<u64> {
    match lseek(file, offset, libc::SEEK_DATA) {
        Ok(found) => Some(found.max(offset)),
        Err(error) if error.raw_os_error() == Some(libc::ENXIO) => None,
        Err(_) => Some(offset),
    }
}

/// Where the hole after the allocated byte at `offset` (below `end`) starts, at most
/// `end` (`end` too when the filesystem does not say).
pub fn next_hole(file: &File, offset: u64, end: u64) -> u64 {
    lseek(file, offset, libc::SEEK_HOLE).map_or(end, |found| found.clamp(offset + 1, end))
}

fn lseek(file: &File, from: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = i64::try_from(from).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek has no memory effects; the fd is open for the call's duration.
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    u64::try_from(result).map_err(|_| io::Error::last_os_error())
}

fn copy_range(input: &File, output: &File, offset: u64, length: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < length {
        let mut from = i64::try_from(offset + done)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut to = from;
        let chunk = usize::try_from((length - done).min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: both offsets point at live i64s; the fds are open for the call.
        let copied = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                &mut from,
                output.as_raw_fd(),
                &mut to,
                chunk,
                0,
            )
        };
        if copied < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if copied == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        done += u64::try_from(copied).unwrap_or(0);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Whether the page cache of `dir`'s filesystem can drop pages (tmpfs cannot).
    fn drops_pages(dir: &Path) -> bool {
        nix::sys::statfs::statfs(dir)
            .is_ok_and(|fs| fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC)
    }

    #[test]
    fn a_pass_drops_what_it_read_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        if !drops_pages(dir.path()) {
            eprintln!("the temporary directory is on tmpfs; skipping");
            return;
        }
        let path = dir.path().join("image");
        std::fs::write(&path, vec![5u8; 9 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        let mut buffer = vec![0u8; 9 << 20];
        file.read_exact_at(&mut buffer, 0).unwrap();
        assert!(cached_bytes(&file).unwrap() >= 8 << 20);
        // Read up to 5 MiB: everything below 4 MiB goes, nothing above it.
        let mut behind = DropBehind::new(1000);
        behind.passed(&file, 5 << 20);
        let cached = cached_bytes(&file).unwrap();
        assert!((4 << 20..=5 << 20).contains(&cached), "{cached}");
        behind.finish(&file, 9 << 20);
        assert_eq!(cached_bytes(&file).unwrap(), 0);
    }

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("s"), dir.path().join("t"));
        let file = File::create(&source).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        file.write_all_at(&[9u8; 10], (8 << 20) - 10).unwrap();
        let copied = sparse_copy(&source, &target).unwrap();
        assert!(copied < 2 << 20, "copied {copied}");
        assert_eq!(
            std::fs::read(&source).unwrap(),
            std::fs::read(&target).unwrap()
        );
    }
}
