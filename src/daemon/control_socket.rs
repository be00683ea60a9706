//! A daemon's unix sockets: the control socket (mode 0600, one thread per request)
//! and the clearing of sockets a daemon that did not stop cleanly left behind.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::warn;

/// Errors setting up a daemon's sockets.
#[derive(Debug, Error)]
pub enum SocketError {
    /// Another daemon answers on the control socket.
    #[error("Another {daemon} is running with control socket {}", path.display())]
    AlreadyRunning {
        /// The command that runs the daemon.
        daemon: &'static str,
        /// The socket.
        path: PathBuf,
    },
    /// A socket cannot be bound, or is in use by a running process.
    #[error("Cannot listen on {what} {}", path.display())]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The thread serving the socket cannot start.
    #[error("Cannot start the control thread")]
    Thread(#[source] std::io::Error),
}

/// Removes the unix socket `what` at `path` left by a daemon that did not stop
/// cleanly (and creates its directory); fails if a process answers on it.
pub fn remove_stale(what: &'static str, path: &Path) -> Result<(), SocketError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::Bind {
                what,
                path: path.to_path_buf(),
                source: std::io::ErrorKind::AddrInUse.into(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    Ok(())
}

/// Binds the control socket of `daemon` at `path`, private to this user; refuses if
/// another daemon answers there.
pub fn bind(daemon: &'static str, path: &Path) -> Result<UnixListener, SocketError> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(SocketError::AlreadyRunning {
            daemon,
            path: path.to_path_buf(),
        });
    }
    remove_stale("control socket", path)?;
    let bind_error = |source| SocketError::Bind {
        what: "control socket",
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves the control socket: each connection gets its own thread running `serve`,
/// since some requests (closing a cycle, a failover) wait for long and a slow client
/// must not hold up the next one.
pub fn spawn<F>(listener: UnixListener, serve: F) -> Result<(), SocketError>
where
    F: Fn(&UnixStream) -> std::io::Result<()> + Clone + Send + 'static,
{
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let serve = serve.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-request".into())
                    .spawn(move || {
                        if let Err(error) = serve(&stream) {
                            warn!(%error, "Control request failed");
                        }
                    });
                if let Err(error) = spawned {
                    warn!(%error, "Cannot serve a control request");
                }
            }
        })
        .map(drop)
        .map_err(SocketError::Thread)
}
