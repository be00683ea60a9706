//! Listening sockets, accept threads and per-connection threads.
//!
//! An accept thread polls its listener and the server's wake pipe; shutdown makes the pipe
//! readable, which stops every accept thread. Each accepted connection gets its own thread
//! and a registry entry holding a clone of its socket, so shutdown can `shutdown(2)` it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::handshake::{self, Negotiation, Outcome};
use super::tls::{self, TlsPolicy};
use super::transmission::{self, Ending, TransmissionError};
use super::{ConnEntry, Inner};

/// A connected socket the server can serve.
pub(crate) trait Transport: Read + Write + AsFd + Send + Sized + 'static {
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn try_clone_stream(&self) -> io::Result<Self>;
    fn shutdown_handle(&self) -> io::Result<ShutdownHandle>;
}

impl Transport for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
    fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        self.try_clone().map(ShutdownHandle::Unix)
    }
}

impl Transport for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
    fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        self.try_clone().map(ShutdownHandle::Tcp)
    }
}

/// A second handle on a connection's socket, to interrupt it from another thread.
#[derive(Debug)]
pub(crate) enum ShutdownHandle {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl ShutdownHandle {
    pub(crate) fn shutdown(&self, how: Shutdown) {
        // ENOTCONN once the peer is gone is fine: the socket is down either way.
        let _ = match self {
            ShutdownHandle::Unix(s) => s.shutdown(how),
            ShutdownHandle::Tcp(s) => s.shutdown(how),
        };
    }
}

/// Waits until `open` finds no connection left in `guard`'s state (`ended` is
/// signalled as connections end), at most until `deadline`; then shuts down both
/// directions of those still open, which end at their next socket call, and returns
/// without waiting for them.
pub(crate) fn wait_or_cut_off<'a, G>(
    mut guard: MutexGuard<'a, G>,
    ended: &Condvar,
    deadline: Instant,
    open: impl Fn(&G) -> Vec<&ShutdownHandle>,
    why: &str,
) -> MutexGuard<'a, G> {
    loop {
        let left = open(&guard);
        if left.is_empty() {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            tracing::warn!(
                connections = left.len(),
                "cutting off connections after the grace period ({why})"
            );
            for handle in left {
                handle.shutdown(Shutdown::Both);
            }
            break;
        }
        guard = ended
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    guard
}

/// A bound listener.
pub(crate) enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we created, so we only unlink our own;
        /// `None` for a listener the process was given, whose file is not ours.
        identity: Option<(u64, u64)>,
    },
    Tcp {
        listener: TcpListener,
        tls: TlsPolicy,
    },
}

impl Listener {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp { listener, .. } => listener.as_fd(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
            Listener::Tcp { listener, tls } => {
                let tls = match tls {
                    TlsPolicy::Off => "",
                    TlsPolicy::Optional(_) => " (TLS optional)",
                    TlsPolicy::Required(_) => " (TLS required)",
                };
                listener
                    .local_addr()
                    .map_or_else(|_| format!("tcp:?{tls}"), |a| format!("tcp:{a}{tls}"))
            }
        }
    }

    fn remove_socket_file(&self) {
        if let Listener::Unix {
            path,
            identity: Some(identity),
            ..
        } = self
        {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == *identity {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

pub(crate) fn identity_of(path: &std::path::Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Accept loop; runs until shutdown.
pub(crate) fn accept_loop(inner: Arc<Inner>, listener: Listener) {
    let name = listener.describe();
    tracing::info!(listener = %name, "listening");
    loop {
        if inner.shutting_down.load(Ordering::Acquire) {
            break;
        }
        let mut fds = [
            PollFd::new(listener.fd(), PollFlags::POLLIN),
            PollFd::new(inner.wake_read.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                tracing::error!(listener = %name, %err, "poll failed; listener stopped");
                break;
            }
        }
        if fds[1].any().unwrap_or(false) {
            break;
        }
        let accepted = match &listener {
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| {
                // Which process connected (e.g. which qemu) is the useful identity here.
                let peer =
                    nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                        .map_or_else(
                            |_| "unix".to_owned(),
                            |c| format!("unix pid {} uid {}", c.pid(), c.uid()),
                        );
                (Conn::Unix(s), peer)
            }),
            Listener::Tcp { listener, tls } => listener
                .accept()
                .map(|(s, addr)| (Conn::Tcp(s, tls.clone()), addr.to_string())),
        };
        match accepted {
            Ok((conn, peer)) => {
                if inner.shutting_down.load(Ordering::Acquire) {
                    break;
                }
                spawn_connection(&inner, conn, peer);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = %name, %err, "accept failed");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    listener.remove_socket_file();
    tracing::info!(listener = %name, "stopped listening");
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream, TlsPolicy),
}

fn spawn_connection(inner: &Arc<Inner>, conn: Conn, peer: String) {
    let id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let prepared = match conn {
        Conn::Unix(s) => prepare(s).map(|(h, s)| (h, Conn::Unix(s))),
        Conn::Tcp(s, tls) => {
            // "both the client and server SHOULD disable Nagle's algorithm"
            let _ = s.set_nodelay(true);
            let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::KeepAlive, &true);
            prepare(s).map(|(h, s)| (h, Conn::Tcp(s, tls)))
        }
    };
    let (handle, conn) = match prepared {
        Ok(p) => p,
        Err(err) => {
            tracing::warn!(%peer, %err, "could not set up connection");
            return;
        }
    };
    // The registry lock is held across spawn so the thread cannot deregister before it
    // is registered.
    let mut registry = inner.lock_connections();
    let thread_inner = Arc::clone(inner);
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            // A guest waits on this thread: it may preempt replication's (its TLS
            // pump and workers inherit this).
            base::priority::enter_foreground();
            match conn {
                Conn::Unix(s) => run_connection(&thread_inner, id, s, &peer, &TlsPolicy::Off),
                Conn::Tcp(s, tls) => run_connection(&thread_inner, id, s, &peer, &tls),
            }
            let mut registry = thread_inner.lock_connections();
            registry.remove(&id);
            if registry.is_empty() {
                thread_inner.connections_idle.notify_all();
            }
        });
    match spawned {
        Ok(thread) => {
            registry.insert(id, ConnEntry { handle, thread });
        }
        Err(err) => tracing::warn!(%err, "could not spawn a connection thread"),
    }
}

fn prepare<S: Transport>(s: S) -> io::Result<(ShutdownHandle, S)> {
    // An accepted socket must block even if the listener does not.
    set_blocking(s.as_fd().as_raw_fd(), true)?;
    Ok((s.shutdown_handle()?, s))
}

/// Clears or sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_blocking(fd: std::os::fd::RawFd, blocking: bool) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.set(nix::fcntl::OFlag::O_NONBLOCK, !blocking);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Stream wrapper that enforces an overall handshake deadline on top of the socket
/// timeout (which only bounds each read).
struct Deadline<'a, S> {
    stream: &'a mut S,
    deadline: Option<Instant>,
}

impl<S: Read> Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "Handshake took too long",
            ));
        }
        self.stream.read(buf)
    }
}

impl<S: Write> Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Handshake then transmission on one socket; logs and counts how it ended.
pub(crate) fn run_connection<S: Transport>(
    inner: &Inner,
    id: u64,
    mut stream: S,
    peer: &str,
    tls: &TlsPolicy,
) {
    let span = tracing::info_span!("nbd_conn", id, peer);
    let _entered = span.enter();
    let timeout = inner.config.handshake_timeout;
    if let Err(err) = stream.set_timeouts(timeout) {
        tracing::warn!(%err, "could not set handshake timeouts");
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let started = {
        let mut guarded = Deadline {
            stream: &mut stream,
            deadline,
        };
        Negotiation::start(&mut guarded, inner, tls.mode())
    };
    match started {
        Ok(negotiation) => proceed(inner, id, stream, negotiation, deadline, tls),
        Err(err) => tracing::debug!(%err, "handshake failed"),
    }
}

/// Options, then transmission, on `stream`; after `NBD_OPT_STARTTLS` the rest runs over
/// TLS through [`serve_over_tls`].
fn proceed<S: Transport>(
    inner: &Inner,
    id: u64,
    mut stream: S,
    mut negotiation: Negotiation,
    deadline: Option<Instant>,
    tls: &TlsPolicy,
) {
    let outcome = {
        let mut guarded = Deadline {
            stream: &mut stream,
            deadline,
        };
        negotiation.options(&mut guarded, inner)
    };
    let session = match outcome {
        Ok(Outcome::Transmission(session)) => session,
        Ok(Outcome::Aborted) => {
            tracing::debug!("client aborted the handshake");
            return;
        }
        Ok(Outcome::StartTls) => {
            match tls.config() {
                Some(config) => serve_over_tls(inner, id, stream, negotiation, deadline, config),
                // The gate refuses STARTTLS on listeners without TLS.
                None => tracing::error!("STARTTLS acknowledged on a listener without TLS"),
            }
            return;
        }
        Err(err) => {
            tracing::debug!(%err, "handshake failed");
            return;
        }
    };
    // The handshake's snapshot of the export table would keep every export of that
    // moment (and its device) alive as long as the connection: a removed export's
    // device must go when its own connections end.
    drop(negotiation);
    if let Err(err) = stream.set_timeouts(None) {
        tracing::warn!(%err, "could not clear handshake timeouts");
    }
    // Workers send their replies through a second handle on the socket.
    let writer = match stream.try_clone_stream() {
        Ok(writer) => Some(Mutex::new(writer)),
        Err(err) => {
            tracing::warn!(%err, "could not clone the socket; requests run one at a time");
            None
        }
    };
    let writer = writer.as_ref().map(|w| w as &Mutex<dyn Write + Send>);
    let socket = stream.as_fd().as_raw_fd();
    let handle = match stream.shutdown_handle() {
        Ok(handle) => handle,
        Err(err) => {
            tracing::warn!(%err, "could not set up the connection's shutdown handle");
            return;
        }
    };
    let Some(_entry) = session.export.enter(id, handle) else {
        tracing::info!(export = %session.export.name, "export removed; closing the connection");
        return;
    };
    let _ = serve_session(inner, &mut stream, Some(socket), writer, &session);
}

/// The TLS handshake on `socket`, then the rest of the connection over one end of a
/// socketpair whose other end [`tls::pump`] joins to `socket`.
fn serve_over_tls<S: Transport>(
    inner: &Inner,
    id: u64,
    mut socket: S,
    mut negotiation: Negotiation,
    deadline: Option<Instant>,
    config: &Arc<rustls::ServerConfig>,
) {
    let accepted = {
        let mut guarded = Deadline {
            stream: &mut socket,
            deadline,
        };
        tls::accept(&mut guarded, config, deadline)
    };
    let connection = match accepted {
        Ok(connection) => connection,
        Err(err) => {
            tracing::warn!(%err, "TLS handshake failed; closing the connection");
            return;
        }
    };
    tracing::info!(
        version = ?connection.protocol_version(),
        client_certificate = connection.peer_certificates().is_some(),
        "TLS established"
    );
    if let Err(err) = socket.set_timeouts(None) {
        tracing::warn!(%err, "could not clear handshake timeouts");
    }
    let (plain, pump_end) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(err) => {
            tracing::warn!(%err, "could not create the TLS socketpair");
            return;
        }
    };
    if let Err(err) = plain.set_timeouts(inner.config.handshake_timeout) {
        tracing::warn!(%err, "could not set handshake timeouts");
    }
    negotiation.tls_started();
    let span = tracing::Span::current();
    thread::scope(|scope| {
        let pump = thread::Builder::new()
            .name(format!("nbd-tls-{id}"))
            .spawn_scoped(scope, move || {
                let _entered = span.enter();
                match tls::pump(socket, connection, pump_end) {
                    Ok(()) => tracing::debug!("TLS connection closed"),
                    Err(err) => tracing::info!(%err, "TLS connection ended"),
                }
            });
        match pump {
            // Dropping `plain` at the end of proceed() is what ends the pump.
            Ok(_) => proceed(inner, id, plain, negotiation, deadline, &TlsPolicy::Off),
            Err(err) => tracing::warn!(%err, "could not spawn the TLS pump thread"),
        }
    });
}

/// Transmission with accounting; shared by socket threads and [`crate::Server::serve_stream`].
pub(crate) fn serve_session<S: Read + Write>(
    inner: &Inner,
    stream: &mut S,
    socket: Option<std::os::fd::RawFd>,
    writer: Option<&Mutex<dyn Write + Send + '_>>,
    session: &handshake::Session,
) -> Result<Ending, TransmissionError> {
    let export = &session.export;
    let counters = &export.counters;
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.connections_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(export = %export.name, structured = session.structured, contexts = session.contexts.len(), "client connected");
    let result = transmission::serve(
        stream,
        socket,
        writer,
        session,
        &inner.config,
        &inner.shutting_down,
    );
    counters.connections.fetch_sub(1, Ordering::Relaxed);
    match &result {
        Ok(Ending::Disconnect) => tracing::info!(export = %export.name, "client disconnected"),
        Ok(Ending::Shutdown) => {
            tracing::debug!(export = %export.name, "connection closed for shutdown")
        }
        Ok(Ending::PeerClosed) if export.is_retired() => {
            tracing::info!(export = %export.name, "connection closed: the export was removed");
        }
        Ok(Ending::PeerClosed) => {
            // Between requests: many clients (libnbd's close, fio) just hang up.
            tracing::info!(export = %export.name, "client closed the connection");
        }
        Err(TransmissionError::Io(err)) if inner.shutting_down.load(Ordering::Acquire) => {
            // Cut off by our own shutdown (e.g. the client's next write met the closed
            // read side and it hung up before reading its replies).
            tracing::debug!(export = %export.name, %err, "connection ended during shutdown");
        }
        Err(TransmissionError::Io(err)) => {
            counters.dropped_connections.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(export = %export.name, %err, "connection lost");
        }
        Err(err @ TransmissionError::Desync(_)) => {
            counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::info!(export = %export.name, %err, "closing a desynchronised connection");
        }
    }
    result
}
