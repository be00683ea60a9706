//! Secret files (TLS private keys, lab-mode pre-shared keys), read under one set of
//! rules whichever daemon reads them: private to the daemon's user, and a pre-shared
//! key printable (it travels in an HTTP header) and at least [`MIN_PSK_LEN`] bytes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use replica::server::MIN_PSK_LEN;
use thiserror::Error;

/// Why a secret file cannot be used.
#[derive(Debug, Error)]
pub(crate) enum KeyFileError {
    /// The file cannot be read.
    #[error("Cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read it.
    #[error("{} is open to group or others (mode {mode:04o}); the key must be private to the daemon's user: chmod 600 {}", path.display(), path.display())]
    NotPrivate { path: PathBuf, mode: u32 },
    /// A pre-shared key with spaces or non-ASCII bytes.
    #[error("The key in {} must be printable ASCII without spaces (it travels in an HTTP header)", path.display())]
    NotPrintable { path: PathBuf },
    /// A pre-shared key too short to resist guessing.
    #[error("The key in {} has {length} bytes; it needs at least {MIN_PSK_LEN} (e.g. `openssl rand -hex 32`)", path.display())]
    TooShort { path: PathBuf, length: usize },
}

/// Checks that only the file's owner may read it.
pub(crate) fn check_private(path: &Path) -> Result<(), KeyFileError> {
    let metadata = std::fs::metadata(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::NotPrivate {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a lab-mode pre-shared key: the file's content without surrounding
/// whitespace, from a private file, printable, at least [`MIN_PSK_LEN`] bytes.
pub(crate) fn read_psk(path: &Path) -> Result<String, KeyFileError> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let key = text.trim();
    if !key.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(KeyFileError::NotPrintable {
            path: path.to_path_buf(),
        });
    }
    if key.len() < MIN_PSK_LEN {
        return Err(KeyFileError::TooShort {
            path: path.to_path_buf(),
            length: key.len(),
        });
    }
    Ok(key.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("key");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_printable_long_key_is_read_without_its_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_file(dir.path(), "  0123456789abcdef0123\n", 0o600);
        assert_eq!(read_psk(&path).unwrap(), "0123456789abcdef0123");
    }

    #[test]
    fn keys_others_may_read_short_or_unprintable_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = key_file(dir.path(), "0123456789abcdef0123", 0o640);
        assert!(matches!(
            read_psk(&open),
            Err(KeyFileError::NotPrivate { mode: 0o640, .. })
        ));
        let short = key_file(dir.path(), "0123456789", 0o600);
        assert!(matches!(
            read_psk(&short),
            Err(KeyFileError::TooShort { length: 10, .. })
        ));
        let spaced = key_file(dir.path(), "0123456789 abcdef0123", 0o600);
        assert!(matches!(
            read_psk(&spaced),
            Err(KeyFileError::NotPrintable { .. })
        ));
        assert!(matches!(
            read_psk(&dir.path().join("missing")),
            Err(KeyFileError::Io { .. })
        ));
    }
}
