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
