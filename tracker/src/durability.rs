//! Making the log and the images durable together.
//!
//! FLUSH and FUA need both the ring file and the image on stable storage. The two
//! `fdatasync`s are submitted to one io_uring and run in parallel, so a flush costs
//! one device round trip instead of two. FSYNC operations carry no buffers, so the
//! in-flight table is just the count of submitted operations, all reaped before
//! [`Durability::datasync`] returns (and by `Drop` of the ring if a wait fails).

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};
use tracing::warn;

/// Entries in the submission queue; more fds than this are synced in batches.
const QUEUE_DEPTH: u32 = 8;

/// Parallel `fdatasync` of several files.
pub struct Durability {
    ring: Mutex<IoUring>,
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability").finish_non_exhaustive()
    }
}

impl Durability {
    /// Sets up the ring.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            ring: Mutex::new(IoUring::new(QUEUE_DEPTH)?),
        })
    }

    /// `fdatasync`s every fd; returns the first error after all have completed.
    pub fn datasync(&self, fds: &[RawFd]) -> io::Result<()> {
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut first_error = None;
        for batch in fds.chunks(QUEUE_DEPTH as usize) {
            let mut submitted = 0usize;
            {
                let mut queue = ring.submission();
                for (index, fd) in batch.iter().enumerate() {
                    let entry = opcode::Fsync::new(types::Fd(*fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(index as u64);
                    // SAFETY: an FSYNC entry references no memory, only the fd, which the
                    // caller keeps open until this function returns (it waits for every
                    // completion below).
                    if unsafe { queue.push(&entry) }.is_err() {
                        break;
                    }
                    submitted += 1;
                }
            }
            let mut reaped = 0usize;
            while reaped < submitted {
                match ring.submit_and_wait(submitted - reaped) {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        // The ring cannot be trusted: sync the whole batch with plain
                        // syscalls, and replace the ring so completions still owed by
                        // the old one can never be counted for a later call.
                        warn!(%error, "io_uring fsync failed; syncing synchronously");
                        for fd in batch {
                            if let Err(error) = nix::unistd::fdatasync(*fd) {
                                first_error.get_or_insert(error.into());
                            }
                        }
                        if let Ok(fresh) = IoUring::new(QUEUE_DEPTH) {
                            *ring = fresh;
                        }
                        submitted = batch.len();
                        break;
                    }
                }
                for completion in ring.completion() {
                    reaped += 1;
                    if completion.result() < 0 {
                        first_error
                            .get_or_insert(io::Error::from_raw_os_error(-completion.result()));
                    }
                }
            }
            // Anything not run through the ring (queue full, or the ring failed) is synced
            // synchronously, so durability never depends on io_uring working.
            for fd in &batch[submitted..] {
                if let Err(error) = nix::unistd::fdatasync(*fd) {
                    first_error.get_or_insert(error.into());
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn syncs_several_files() {
        let mut a = tempfile::tempfile().unwrap();
        let mut b = tempfile::tempfile().unwrap();
        a.write_all(b"a").unwrap();
        b.write_all(b"b").unwrap();
        let fds: Vec<RawFd> = (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    a.as_raw_fd()
                } else {
                    b.as_raw_fd()
                }
            })
            .collect();
        Durability::new().unwrap().datasync(&fds).unwrap();
    }

    #[test]
    fn bad_fd_is_an_error() {
        assert!(Durability::new().unwrap().datasync(&[-1]).is_err());
    }
}
