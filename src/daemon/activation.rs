//! Listening sockets passed by the service manager (systemd socket activation,
//! `LISTEN_FDS`): with `blkrep-primary.socket`, systemd owns the NBD socket, so it
//! stays open across a restart of the daemon and clients that connect meanwhile wait
//! in its backlog instead of being refused.
//!
//! Each passed descriptor is identified by its bound address and used for the
//! configured listener with that address; one the configuration does not name is
//! closed with a warning. Ownership: [`Activated`] owns the descriptors until a
//! listener is taken out of it.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
};
use thiserror::Error;

/// Why the passed descriptors cannot be used.
#[derive(Debug, Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` or `LISTEN_PID` is malformed.
    #[error("Socket activation variables are malformed")]
    Environment(#[source] std::io::Error),
    /// A passed descriptor is not a listening stream socket.
    #[error("Descriptor {fd} passed by the service manager is not a listening socket: {reason}")]
    NotListening {
        /// The descriptor.
        fd: i32,
        /// What it is instead.
        reason: String,
    },
}

/// The listening sockets the service manager passed, by address.
#[derive(Debug, Default)]
pub struct Activated {
    unix: Vec<(PathBuf, UnixListener)>,
    tcp: Vec<(SocketAddr, TcpListener)>,
}

impl Activated {
    /// Takes the descriptors passed to this process, if any (none without socket
    /// activation).
    pub fn from_environment() -> Result<Self, ActivationError> {
        let mut activated = Activated::default();
        for fd in sd_notify::listen_fds().map_err(ActivationError::Environment)? {
            // SAFETY: the service manager passed `fd` to this process to own (checked
            // by LISTEN_PID), and nothing else in it has taken it: this runs once, at
            // start, before any other code looks at inherited descriptors.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let not_listening = |reason: String| ActivationError::NotListening { fd, reason };
            if !getsockopt(&owned, sockopt::AcceptConn).map_err(|e| not_listening(e.to_string()))? {
                return Err(not_listening("a socket that does not listen".into()));
            }
            let address: SockaddrStorage =
                getsockname(fd).map_err(|e| not_listening(e.to_string()))?;
            match address.family() {
                Some(AddressFamily::Unix) => {
                    let path = address
                        .as_unix_addr()
                        .and_then(|unix| unix.path())
                        .map(Path::to_owned)
                        .ok_or_else(|| not_listening("an unnamed unix socket".into()))?;
                    activated.unix.push((path, UnixListener::from(owned)));
                }
                Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                    let listener = TcpListener::from(owned);
                    let address = listener
                        .local_addr()
                        .map_err(|e| not_listening(e.to_string()))?;
                    activated.tcp.push((address, listener));
                }
                other => return Err(not_listening(format!("address family {other:?}"))),
            }
        }
        Ok(activated)
    }

    /// The passed unix listener bound to `path`.
    pub fn take_unix(&mut self, path: &Path) -> Option<UnixListener> {
        let index = self.unix.iter().position(|(bound, _)| bound == path)?;
        Some(self.unix.swap_remove(index).1)
    }

    /// The passed TCP listener bound to `address` (as the configuration writes it).
    pub fn take_tcp(&mut self, address: &str) -> Option<TcpListener> {
        let wanted: SocketAddr = address.parse().ok()?;
        let index = self.tcp.iter().position(|(bound, _)| *bound == wanted)?;
        Some(self.tcp.swap_remove(index).1)
    }

    /// Closes what no configured listener took, naming each.
    pub fn close_unused(self) {
        for (path, _) in self.unix {
            tracing::warn!(socket = %path.display(), "The service manager passed a unix socket the configuration does not name; closing it");
        }
        for (address, _) in self.tcp {
            tracing::warn!(%address, "The service manager passed a TCP socket the configuration does not name; closing it");
        }
    }
}
