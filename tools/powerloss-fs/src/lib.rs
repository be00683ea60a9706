//! A test tool: a FUSE filesystem that simulates power loss, in the manner of LazyFS
//! (dsrhaslab/lazyfs). This is **our own small reimplementation** in Rust, not
//! LazyFS: CI here reaches crates.io but not GitHub, so LazyFS cannot be fetched or
//! built, and its code is not vendored. It mounts a passthrough view of a backing
//! directory and behaves as below.
//!
//! # Contract
//!
//! - **Data is cached until synced.** Writes (including the kernel's write-back of
//!   `mmap(MAP_SHARED)` pages), size changes (truncate, extension) and fallocate
//!   (mode 0 grows the size; `PUNCH_HOLE|KEEP_SIZE` and `ZERO_RANGE` write zeroes;
//!   other modes fail with EOPNOTSUPP) go into a per-inode page cache in memory. The
//!   backing file is written only by `fsync`/`fdatasync` of that inode (also
//!   `msync(MS_SYNC)` and io_uring's `IORING_OP_FSYNC`, which reach the filesystem
//!   as FUSE fsync) or by [`Mounted::sync_all`]. `close` is not a sync.
//! - **Reads see the cache over the backing file**, and sizes include cached
//!   extensions and truncations.
//! - **Metadata passes straight through** to the backing directory: create, mkdir,
//!   unlink, rmdir, rename, link, symlink, chmod, chown, utimes; directory fsync
//!   syncs the backing directory. The cache belongs to the inode, so a file renamed
//!   before its data is synced keeps the data until a power cut, then has none of it
//!   (the "rename before fsync" bug).
//! - `SEEK_DATA`/`SEEK_HOLE` report every byte below the size as data (holes are
//!   not tracked through the cache); O_DIRECT is not supported; statfs is the backing
//!   directory's.
//! - **Power cut** ([`Mounted::power_cut`], or SIGUSR1 to the CLI): every later
//!   operation fails with EIO, the unsynced cache is discarded (what it held is
//!   counted in [`Dropped`]), and the mount is detached (lazily, since a process may
//!   still hold files open), so the kernel's page cache of the mount goes with it.
//!   Nothing unsynced reaches the backing directory after the cut. Mounting the same
//!   backing directory again shows exactly what was synced. (A descriptor opened
//!   before the cut may still read pages the kernel cached until it is closed;
//!   its writes and syncs fail.)
//! - The FUSE server runs in the process that mounts. A process must not exit while
//!   holding a dirty shared mapping of its own mount (the kernel writes it back at
//!   unmap, to a server that is gone): unmap first, or mount from another process.
//! - The backing directory must not be changed by others while mounted.

mod cache;
mod fs;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, MountOption, Session, SessionUnmounter};

pub use cache::{FileCache, PAGE};
pub use fs::Dropped;

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum PowerLossError {
    #[error("Cannot open the backing directory {path}")]
    Backing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot mount on {path}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot sync the cached files")]
    Sync(#[source] std::io::Error),
    #[error("Cannot unmount {path}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why FUSE mounts cannot work here, if they cannot (tests skip with this reason).
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        return Some("/dev/fuse cannot be opened".into());
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("fusermount3").is_file()));
    if !on_path {
        return Some("fusermount3 is not installed (Debian package fuse3)".into());
    }
    None
}

/// A mounted power-loss filesystem. Dropping it cuts the power.
#[derive(Debug)]
pub struct Mounted {
    shared: Arc<fs::Shared>,
    mountpoint: PathBuf,
    backing: PathBuf,
    unmounter: Option<SessionUnmounter>,
    session: Option<JoinHandle<std::io::Result<()>>>,
}

impl Mounted {
    /// Mounts a view of `backing` on `mountpoint` (both existing directories).
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Mounted, PowerLossError> {
        let shared =
            Arc::new(
                fs::Shared::new(backing).map_err(|source| PowerLossError::Backing {
                    path: backing.to_path_buf(),
                    source,
                })?,
            );
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powerloss-fs".into()),
            MountOption::Subtype("powerloss".into()),
            MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(4);
        let filesystem = fs::PowerLossFs {
            shared: shared.clone(),
        };
        let mount_error = |source| PowerLossError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        };
        let mut session = Session::new(filesystem, mountpoint, &config).map_err(mount_error)?;
        let unmounter = session.unmount_callable();
        let session = std::thread::Builder::new()
            .name("powerloss-fs".into())
            .spawn(move || session.run())
            .map_err(mount_error)?;
        Ok(Mounted {
            shared,
            mountpoint: mountpoint.to_path_buf(),
            backing: backing.to_path_buf(),
            unmounter: Some(unmounter),
            session: Some(session),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// What a power cut would drop now.
    pub fn unsynced(&self) -> Dropped {
        self.shared.unsynced()
    }

    /// Bytes written to the backing directory by syncs so far.
    pub fn synced_bytes(&self) -> u64 {
        self.shared
            .synced_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Persists every cached file (what `syncfs` would do).
    pub fn sync_all(&self) -> Result<u64, PowerLossError> {
        self.shared.sync_all().map_err(PowerLossError::Sync)
    }

    /// Cuts the power: see the module's contract. Returns what was dropped.
    pub fn power_cut(mut self) -> Dropped {
        self.cut()
    }

    /// A clean shutdown: syncs everything, then unmounts (fails if files are open).
    pub fn unmount(mut self) -> Result<(), PowerLossError> {
        self.sync_all()?;
        if let Some(mut unmounter) = self.unmounter.take() {
            unmounter
                .unmount()
                .map_err(|source| PowerLossError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })?;
        }
        if let Some(session) = self.session.take() {
            let _ = session.join();
        }
        Ok(())
    }

    fn cut(&mut self) -> Dropped {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Dropped::default();
        };
        let dropped = self.shared.cut_power();
        detach(&self.mountpoint);
        // The mount is gone from the namespace, so fuser's own unmount finds nothing
        // at the path (and must not find a later mount there): it only gives up its
        // handle, and its error is expected.
        let _ = unmounter.unmount();
        // The session ends when the last file of the detached mount is closed (the
        // killed process's); it is not waited for.
        drop(self.session.take());
        dropped
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Lazily unmounts `mountpoint`: directly as root, else through fusermount3.
fn detach(mountpoint: &Path) {
    if let Ok(path) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let _ = Command::new("fusermount3")
        .args(["-u", "-z", "-q", "--"])
        .arg(mountpoint)
        .status();
}
