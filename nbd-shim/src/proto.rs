//! The NBD wire format (doc/proto.md of NetworkBlockDevice/nbd): constants, option
//! parsing, request parsing and validation, reply encoding.
//!
//! Everything here is pure: functions take byte slices and return typed values, or append
//! encoded bytes to a [`reply::ReplySink`]. No I/O, no allocation sized by a peer before
//! that size has been checked.
//!
//! The transmission side follows parse → validate → execute:
//! [`request::RequestHeader::parse`] turns 28 bytes into a header (only the magic can fail
//! there, and a bad magic means the stream is desynchronised);
//! [`request::RequestHeader::validate`] checks it against the export's
//! [`request::ExportShape`] and yields a typed [`request::Request`] or a
//! [`request::RequestError`] whose [`request::RequestError::errno`] is the reply's error.

use std::io;

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;

pub use consts::*;

/// The error values a reply may carry ("the allowed values for the error field have been
/// restricted to set of possibilities").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// "`NBD_EPERM` (1), Operation not permitted."
    Perm,
    /// "`NBD_EIO` (5), Input/output error."
    Io,
    /// "`NBD_ENOMEM` (12), Cannot allocate memory."
    NoMem,
    /// "`NBD_EINVAL` (22), Invalid argument."
    Inval,
    /// "`NBD_ENOSPC` (28), No space left on device."
    NoSpc,
    /// "`NBD_EOVERFLOW` (75), Value too large."
    Overflow,
    /// "`NBD_ENOTSUP` (95), Operation not supported."
    NotSup,
    /// "`NBD_ESHUTDOWN` (108), Server is in the process of being shut down."
    Shutdown,
}

impl Errno {
    /// The value sent in a reply's error field.
    pub const fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// The errno for a wire value, if it is one the spec defines.
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }

    /// Maps a backend error: `ENOSPC` (and, as the spec asks, `EDQUOT`/`EFBIG`) →
    /// `ENOSPC`; `EROFS`/`EPERM`/`EACCES` → `EPERM`; unsupported → `ENOTSUP`; `EINVAL` →
    /// `EINVAL`; `ENOMEM` → `ENOMEM`; anything else `EIO`.
    pub fn from_io_error(err: &io::Error) -> Self {
        if let Some(raw) = err.raw_os_error() {
            return match raw {
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
                libc::EROFS | libc::EPERM | libc::EACCES => Errno::Perm,
                libc::EOPNOTSUPP | libc::ENOSYS => Errno::NotSup,
                libc::EINVAL => Errno::Inval,
                libc::ENOMEM => Errno::NoMem,
                libc::ESHUTDOWN => Errno::Shutdown,
                _ => Errno::Io,
            };
        }
        match err.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Errno::NoSpc,
            io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied => Errno::Perm,
            io::ErrorKind::Unsupported => Errno::NotSup,
            io::ErrorKind::InvalidInput => Errno::Inval,
            io::ErrorKind::OutOfMemory => Errno::NoMem,
            _ => Errno::Io,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// Checks a string from the wire: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes ("that
/// string is a sequence of UTF-8 code points, which is not `NUL` terminated, MUST NOT
/// contain `NUL` characters ... MUST be no longer than 4096 bytes").
pub fn wire_str(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Cuts a message to at most [`MAX_STRING_LEN`] bytes on a character boundary, so that
/// error strings we send obey the spec's string rules.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_STRING_LEN {
        return message;
    }
    let mut end = MAX_STRING_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_codes_round_trip() {
        for errno in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(errno.code()), Some(errno));
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::from_code(2), None);
    }

    #[test]
    fn io_errors_map_as_documented() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(Errno::from_io_error(&os(libc::ENOSPC)), Errno::NoSpc);
        assert_eq!(Errno::from_io_error(&os(libc::EDQUOT)), Errno::NoSpc);
        assert_eq!(Errno::from_io_error(&os(libc::EROFS)), Errno::Perm);
        assert_eq!(Errno::from_io_error(&os(libc::EPERM)), Errno::Perm);
        assert_eq!(Errno::from_io_error(&os(libc::EINVAL)), Errno::Inval);
        assert_eq!(Errno::from_io_error(&os(libc::EOPNOTSUPP)), Errno::NotSup);
        assert_eq!(Errno::from_io_error(&os(libc::EIO)), Errno::Io);
        assert_eq!(Errno::from_io_error(&os(libc::EBADF)), Errno::Io);
        let kind = io::Error::from;
        assert_eq!(
            Errno::from_io_error(&kind(io::ErrorKind::Unsupported)),
            Errno::NotSup
        );
        assert_eq!(
            Errno::from_io_error(&kind(io::ErrorKind::StorageFull)),
            Errno::NoSpc
        );
        assert_eq!(
            Errno::from_io_error(&kind(io::ErrorKind::ReadOnlyFilesystem)),
            Errno::Perm
        );
        assert_eq!(
            Errno::from_io_error(&kind(io::ErrorKind::InvalidInput)),
            Errno::Inval
        );
        assert_eq!(
            Errno::from_io_error(&kind(io::ErrorKind::UnexpectedEof)),
            Errno::Io
        );
    }

    #[test]
    fn wire_strings_are_checked() {
        assert_eq!(wire_str(b"disk0"), Some("disk0"));
        assert_eq!(wire_str(b""), Some(""));
        assert_eq!(wire_str(b"a\0b"), None);
        assert_eq!(wire_str(&[0xff, 0xfe]), None);
        assert_eq!(
            wire_str(&[b'a'; MAX_STRING_LEN]).map(str::len),
            Some(MAX_STRING_LEN)
        );
        assert_eq!(wire_str(&[b'a'; MAX_STRING_LEN + 1]), None);
    }

    #[test]
    fn messages_are_truncated_on_char_boundaries() {
        let long = "é".repeat(MAX_STRING_LEN);
        let cut = truncate_message(&long);
        assert!(cut.len() <= MAX_STRING_LEN);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate_message("short"), "short");
    }
}
