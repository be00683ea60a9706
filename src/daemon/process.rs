//! Process settings every daemon (and every command that writes replica or key
//! material) starts with: a private umask, so every file it creates is 0600 and every
//! directory 0700 (disk images, state, control sockets alike), and the open-files limit
//! raised to its hard limit, so connections and disks do not run out of descriptors
//! at the soft limit's usual 1024.

use tracing::{info, warn};

/// The umask of every blkrep process that creates files: nothing for group or others.
pub const PRIVATE_UMASK: u32 = 0o077;

/// Makes every file and directory this process creates from now on private to its
/// user.
pub fn private_files() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(PRIVATE_UMASK));
}

/// The soft and hard limits of open files, after raising the soft one to the hard one.
fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

/// What a daemon does first: private files, and as many open files as it may have.
pub fn harden_process() {
    private_files();
    match raise_open_files_limit() {
        Ok((soft, hard)) => {
            info!(open_files = soft, hard_limit = hard, umask = %format!("{PRIVATE_UMASK:04o}"), "Process limits set");
        }
        Err(error) => {
            warn!(%error, "Cannot raise the open-files limit; connections may run out of descriptors")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_ends_at_the_hard_limit() {
        let (soft, hard) = raise_open_files_limit().unwrap();
        assert_eq!(soft, hard);
        let (again, _) = raise_open_files_limit().unwrap();
        assert_eq!(again, hard);
    }
}
