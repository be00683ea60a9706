//! The NBD server: export registry, listeners, connections, shutdown.
//!
//! Threads: one accept thread per listener ([`Server::listen_unix`],
//! [`Server::listen_tcp`]) and one thread per connection, plus, for a connection that
//! upgraded to TLS, one thread moving its bytes through rustls (see [`TlsPolicy`]). A connection thread runs the
//! handshake, then the transmission loop: requests that complete quickly (reads and
//! writes of buffered images, block status) run on the connection thread in arrival
//! order, their replies batched into one write whenever no further complete request is
//! buffered; requests that wait (FLUSH, CACHE, FUA, and all I/O of a device that
//! [waits on I/O](BlockDevice::waits_on_device)) run on up to
//! [`ServerConfig::parallel_requests`] worker threads per connection and are answered as
//! they finish, out of order.
//!
//! Durability: a reply is queued only after the [`BlockDevice`] call returned, so a write
//! is acknowledged only once the device has it, and with FUA only once it is durable.
//! FLUSH calls [`BlockDevice::flush`], which covers writes completed on every connection
//! when the device says [`BlockDevice::can_multi_conn`].
//!
//! Memory per connection: the receive buffer ([`ServerConfig::recv_buffer_size`]), an
//! output buffer that grows to the largest batch of replies (bounded by the flush
//! threshold plus one maximum-size read), and for writes larger than the receive buffer a
//! payload buffer of at most the export's maximum payload. No buffer is sized by a peer
//! before the request is validated.
//!
//! Signals: a client that vanishes turns our next write into `EPIPE`; Rust binaries ignore
//! `SIGPIPE` by default, but a host process that does not must ignore it before serving.
//!
//! Shutdown ([`Server::shutdown`]): stop accepting; `shutdown(SHUT_RD)` every connection so
//! blocked reads return; each connection answers the requests it already received, sends
//! the replies and closes; after [`ServerConfig::shutdown_grace`] stragglers (e.g. a client
//! that stopped reading) are cut off with `SHUT_RDWR`; all threads are joined.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::backend::BlockDevice;

mod buffers;
mod export;
mod handshake;
mod listener;
mod tls;
mod transmission;

pub use handshake::{HandshakeError, Negotiated, MAX_OPTION_DATA, MAX_OPTION_SKIP};
pub use tls::TlsPolicy;
pub use transmission::TransmissionError;

use export::{Export, ExportTable};
use listener::{Listener, ShutdownHandle};

/// How long [`Server::retire_export`] waits for connection threads to let go of the
/// retired export.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Tuning knobs; [`ServerConfig::default`] suits a VM disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Bytes of receive buffer per connection (at least 64 KiB is used). A write whose
    /// header and payload fit is executed straight from it; larger writes cost one copy.
    /// Default 4 MiB.
    pub recv_buffer_size: usize,
    /// Queued replies are sent once they reach this many bytes, even if more requests are
    /// waiting, so large reads stream out. Default 256 KiB.
    pub reply_flush_threshold: usize,
    /// With structured replies, reads of at least this many bytes ask
    /// [`BlockDevice::allocation`] and send zero ranges of 64 KiB or more as
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`. `None` never does. Default 1 MiB (smaller reads would
    /// pay a syscall for little gain).
    pub sparse_read_threshold: Option<u32>,
    /// Longest a client may take to finish the handshake; `None` waits forever.
    /// Default 10 s.
    pub handshake_timeout: Option<Duration>,
    /// How long [`Server::shutdown`] lets connections finish before cutting them off.
    /// Default 30 s.
    pub shutdown_grace: Duration,
    /// Most requests of one connection that run at once on worker threads: FLUSH,
    /// CACHE and FUA requests, and every read and write of a device that
    /// [waits on I/O](BlockDevice::waits_on_device). They are answered as they finish,
    /// out of order. The rest run on the connection thread. 0 runs every request on the
    /// connection thread, in order. Default 16.
    pub parallel_requests: usize,
    /// Write payload bytes one connection may have queued for its workers before it stops
    /// reading requests. Default 64 MiB.
    pub max_in_flight_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            recv_buffer_size: 4 << 20,
            reply_flush_threshold: 256 << 10,
            sparse_read_threshold: Some(1 << 20),
            handshake_timeout: Some(Duration::from_secs(10)),
            shutdown_grace: Duration::from_secs(30),
            parallel_requests: 16,
            max_in_flight_bytes: 64 << 20,
        }
    }
}

/// Counters of one export (a snapshot; totals since the export was added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStats {
    /// Connections in the transmission phase now.
    pub connections: u64,
    /// Connections that ever entered the transmission phase.
    pub connections_total: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes accepted by successful writes.
    pub bytes_written: u64,
    /// Requests answered (including refused ones).
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections closed because the request stream lost sync.
    pub protocol_errors: u64,
    /// Connections lost mid-request or to a socket error (a client hanging up between
    /// requests is a normal close, not counted here).
    pub dropped_connections: u64,
}

/// Mode and group of a unix socket listener's file ([`Server::listen_unix_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (e.g. `0o660`); only the lowest nine are used.
    pub mode: u32,
    /// Group id given to the file, if any.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    /// Only the daemon's user may connect.
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

impl SocketAccess {
    fn apply(self, path: &Path) -> Result<(), ServerError> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.group {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(
                |errno| ServerError::Io {
                    context: format!("Giving {} to group {gid}", path.display()),
                    source: errno.into(),
                },
            )?;
        }
        // chmod after chown: chown may clear bits, and the umask does not apply here.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode & 0o777))
            .map_err(io_err(format!("Setting the mode of {}", path.display())))
    }
}

/// Errors of the server API.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An export with this name exists already.
    #[error("Export {0:?} already exists")]
    DuplicateExport(String),
    /// Not a valid NBD string (UTF-8, no NUL, at most 4096 bytes).
    #[error("Invalid export name or description for {0:?}")]
    InvalidExportName(String),
    /// The device's minimum block size is not a power of two ≤ 64 KiB.
    #[error("Export {export:?} has an invalid minimum block size {minimum}")]
    InvalidBlockSize {
        /// Export name.
        export: String,
        /// The device's minimum.
        minimum: u32,
    },
    /// [`Server::shutdown`] was called.
    #[error("The server is shutting down")]
    ShuttingDown,
    /// The unix socket path is in use by a live server or is not a socket.
    #[error("Socket path {0} is in use")]
    AddressInUse(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The handshake of [`Server::serve_stream`] failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The transmission phase of [`Server::serve_stream`] failed.
    #[error(transparent)]
    Transmission(#[from] TransmissionError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

pub(crate) struct ConnEntry {
    handle: ShutdownHandle,
    thread: JoinHandle<()>,
}

pub(crate) struct Inner {
    pub(crate) config: ServerConfig,
    exports: RwLock<Arc<ExportTable>>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) next_conn_id: AtomicU64,
    connections: Mutex<HashMap<u64, ConnEntry>>,
    pub(crate) connections_idle: Condvar,
    accept_threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) wake_read: OwnedFd,
    wake_write: OwnedFd,
    /// Held for the whole of [`Server::shutdown`]; `true` once it finished.
    shutdown_done: Mutex<bool>,
}

impl Inner {
    pub(crate) fn export_table(&self) -> ExportTable {
        let table = self.exports.read().unwrap_or_else(PoisonError::into_inner);
        ExportTable::clone(&table)
    }

    pub(crate) fn lock_connections(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// An NBD server with named exports, serving each connection on its own thread.
///
/// Dropping the server shuts it down (see [`Server::shutdown`]).
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.inner.export_table();
        f.debug_struct("Server")
            .field("config", &self.inner.config)
            .field("exports", &table.by_name.keys().collect::<Vec<_>>())
            .field(
                "shutting_down",
                &self.inner.shutting_down.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl Server {
    /// A server with no exports and no listeners.
    ///
    /// # Panics
    ///
    /// If the process cannot create a pipe (out of file descriptors).
    pub fn new(config: ServerConfig) -> Self {
        // The wake pipe is how shutdown interrupts accept threads blocked in poll();
        // nothing works without descriptors, hence the documented panic.
        let (wake_read, wake_write) = nix::unistd::pipe().expect("pipe() for the shutdown wake-up");
        Server {
            inner: Arc::new(Inner {
                config,
                exports: RwLock::new(Arc::new(ExportTable::default())),
                shutting_down: AtomicBool::new(false),
                next_conn_id: AtomicU64::new(1),
                connections: Mutex::new(HashMap::new()),
                connections_idle: Condvar::new(),
                accept_threads: Mutex::new(Vec::new()),
                wake_read,
                wake_write,
                shutdown_done: Mutex::new(false),
            }),
        }
    }

    /// Adds an export. The empty name is the default export; a client asking for the
    /// empty name also gets the only export when there is exactly one.
    ///
    /// The device's metadata contexts ([`BlockDevice::meta_contexts`]) are read once,
    /// here. If it offers `x-blkrep:dirty`, that context is also offered as
    /// `qemu:dirty-bitmap:blkrep` so qemu tools can read it.
    pub fn add_export(
        &self,
        name: &str,
        description: Option<String>,
        dev: Arc<dyn BlockDevice>,
    ) -> Result<(), ServerError> {
        let export = Export::new(name, description, dev)?;
        let mut table = self
            .inner
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if table.by_name.contains_key(name) {
            return Err(ServerError::DuplicateExport(name.to_owned()));
        }
        let mut next = ExportTable::clone(&table);
        next.by_name.insert(name.to_owned(), Arc::new(export));
        *table = Arc::new(next);
        tracing::info!(export = name, "export added");
        Ok(())
    }

    /// Removes an export from new handshakes; connections using it keep it until they
    /// close. Returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        self.take_export(name).is_some()
    }

    /// Removes an export and closes its connections: each answers the requests it
    /// already received, then closes; those still open after
    /// [`ServerConfig::shutdown_grace`] are cut off. Returns when they are all closed,
    /// with how many there were, or `None` if there was no such export. Other exports'
    /// connections are not touched.
    pub fn retire_export(&self, name: &str) -> Option<usize> {
        let export = self.take_export(name)?;
        let open = export.retire(self.inner.config.shutdown_grace);
        // Its connections' threads let go of it right after they leave transmission;
        // once they have, dropping it here releases the device (a caller may reopen
        // what the device held). A handshake in progress may hold it a little longer.
        let deadline = Instant::now() + RELEASE_WAIT;
        while Arc::strong_count(&export) > 1 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        tracing::info!(export = name, connections = open, "export removed");
        Some(open)
    }

    fn take_export(&self, name: &str) -> Option<Arc<Export>> {
        let mut table = self
            .inner
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = ExportTable::clone(&table);
        let removed = next.by_name.remove(name);
        *table = Arc::new(next);
        removed
    }

    /// Names of the exports.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.export_table().by_name.keys().cloned().collect()
    }

    /// Counters of export `name`, if it exists.
    pub fn export_stats(&self, name: &str) -> Option<ExportStats> {
        self.inner
            .export_table()
            .by_name
            .get(name)
            .map(|e| e.counters.snapshot())
    }

    /// Counters of every export.
    pub fn all_export_stats(&self) -> BTreeMap<String, ExportStats> {
        self.inner
            .export_table()
            .by_name
            .iter()
            .map(|(n, e)| (n.clone(), e.counters.snapshot()))
            .collect()
    }

    fn check_running(&self) -> Result<(), ServerError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            Err(ServerError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    fn spawn_accept(&self, listener: Listener, name: &str) -> Result<(), ServerError> {
        let inner = Arc::clone(&self.inner);
        let thread = thread::Builder::new()
            .name(format!("nbd-accept-{name}"))
            .spawn(move || listener::accept_loop(inner, listener))
            .map_err(io_err("Spawning the accept thread"))?;
        self.inner
            .accept_threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(thread);
        Ok(())
    }

    /// Listens on a unix socket at `path` and accepts connections on a new thread.
    ///
    /// A stale socket file (nothing accepting on it) is replaced; a live one, or a path
    /// that is not a socket, is an error. The socket file is removed at shutdown. Its
    /// mode is what the process umask leaves; [`Server::listen_unix_with`] sets it.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> Result<(), ServerError> {
        self.bind_unix(path.as_ref(), None)
    }

    /// Like [`Server::listen_unix`], and gives the socket file `access`'s mode and group
    /// right after binding, before any connection is accepted (connecting needs write
    /// permission on the file, so the mode decides who may use the disks).
    pub fn listen_unix_with(
        &self,
        path: impl AsRef<Path>,
        access: SocketAccess,
    ) -> Result<(), ServerError> {
        self.bind_unix(path.as_ref(), Some(access))
    }

    fn bind_unix(&self, path: &Path, access: Option<SocketAccess>) -> Result<(), ServerError> {
        self.check_running()?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            let stale = meta.file_type().is_socket()
                && UnixStream::connect(path)
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(ServerError::AddressInUse(path.display().to_string()));
            }
            tracing::info!(path = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path)
                .map_err(io_err(format!("Removing stale socket {}", path.display())))?;
        }
        let listener =
            UnixListener::bind(path).map_err(io_err(format!("Binding {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("Setting the listener non-blocking"))?;
        let identity = listener::identity_of(path).map_err(io_err(format!(
            "Reading the metadata of {}",
            path.display()
        )))?;
        if let Some(access) = access {
            access.apply(path)?;
        }
        self.spawn_accept(
            Listener::Unix {
                listener,
                path: path.to_owned(),
                identity: Some(identity),
            },
            "unix",
        )
    }

    /// Accepts connections on a listening unix socket the process was given (systemd
    /// socket activation), on a new thread. Its file belongs to whoever created it and
    /// stays at shutdown, so clients keep connecting to it (they wait in its backlog)
    /// while the next process starts.
    pub fn serve_unix_listener(&self, listener: UnixListener) -> Result<(), ServerError> {
        self.check_running()?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("Setting the listener non-blocking"))?;
        let path = listener
            .local_addr()
            .ok()
            .and_then(|address| address.as_pathname().map(Path::to_owned))
            .unwrap_or_default();
        self.spawn_accept(
            Listener::Unix {
                listener,
                path,
                identity: None,
            },
            "unix",
        )
    }

    /// Accepts connections on a listening TCP socket the process was given, with
    /// NBD_OPT_STARTTLS handled as `tls` says. Returns its address.
    pub fn serve_tcp_listener(
        &self,
        listener: TcpListener,
        tls: TlsPolicy,
    ) -> Result<SocketAddr, ServerError> {
        self.check_running()?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("Setting the listener non-blocking"))?;
        let local = listener
            .local_addr()
            .map_err(io_err("Reading the bound address"))?;
        self.spawn_accept(Listener::Tcp { listener, tls }, "tcp")?;
        Ok(local)
    }

    /// Listens on TCP `addr` (port 0 picks one) and accepts connections on a new thread.
    /// Returns the bound address. Connections get `TCP_NODELAY` and keep-alive.
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> Result<SocketAddr, ServerError> {
        self.listen_tcp_tls(addr, TlsPolicy::Off)
    }

    /// Like [`Server::listen_tcp`], with NBD_OPT_STARTTLS handled as `tls` says.
    pub fn listen_tcp_tls(
        &self,
        addr: impl ToSocketAddrs,
        tls: TlsPolicy,
    ) -> Result<SocketAddr, ServerError> {
        self.check_running()?;
        let listener = TcpListener::bind(addr).map_err(io_err("Binding the TCP listener"))?;
        self.serve_tcp_listener(listener, tls)
    }

    /// Runs only the handshake on `stream` (any `Read + Write`, e.g. in memory): greeting,
    /// options, and on success the reply that enters transmission. Returns what was agreed,
    /// or `None` if the client aborted. For tests, fuzzing and tools.
    pub fn negotiate<S: Read + Write>(
        &self,
        stream: &mut S,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        self.negotiate_tls(stream, &TlsPolicy::Off)
    }

    /// [`Server::negotiate`] as a TCP listener with `tls` would run it: after
    /// `NBD_OPT_STARTTLS` the TLS handshake and the remaining options run over `stream`
    /// through rustls.
    pub fn negotiate_tls<S: Read + Write>(
        &self,
        stream: &mut S,
        tls: &TlsPolicy,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let mut negotiation = handshake::Negotiation::start(stream, &self.inner, tls.mode())?;
        let outcome = match (negotiation.options(stream, &self.inner)?, tls.config()) {
            (handshake::Outcome::StartTls, Some(config)) => {
                let connection = tls::accept(stream, config, None).map_err(HandshakeError::Tls)?;
                negotiation.tls_started();
                let mut encrypted = rustls::StreamOwned::new(connection, stream);
                negotiation.options(&mut encrypted, &self.inner)?
            }
            (outcome, _) => outcome,
        };
        match outcome {
            handshake::Outcome::Transmission(session) => Ok(Some(session.summary())),
            // The gate refuses a second STARTTLS, and STARTTLS without a configuration.
            handshake::Outcome::Aborted | handshake::Outcome::StartTls => Ok(None),
        }
    }

    /// Serves one whole connection (handshake and transmission) on `stream`, on the
    /// calling thread, until the client disconnects or the stream ends. Such a connection
    /// is counted in the export's stats but not interrupted by [`Server::shutdown`] (the
    /// caller owns the stream); no handshake timeout applies.
    pub fn serve_stream<S: Read + Write>(&self, stream: &mut S) -> Result<(), ServerError> {
        match handshake::negotiate(stream, &self.inner)? {
            handshake::Outcome::Transmission(session) => {
                listener::serve_session(&self.inner, stream, None, None, &session)?;
                Ok(())
            }
            // Without TLS the gate refuses STARTTLS.
            handshake::Outcome::Aborted | handshake::Outcome::StartTls => Ok(()),
        }
    }

    /// Stops accepting, lets every connection answer the requests it already received,
    /// closes the connections and joins all threads. Idempotent; later calls return once
    /// the first has finished.
    pub fn shutdown(&self) {
        let inner = &self.inner;
        let mut done = inner
            .shutdown_done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *done {
            return;
        }
        inner.shutting_down.store(true, Ordering::Release);
        // Wake the accept threads; the byte is never read, so every poller sees it.
        if let Err(err) = nix::unistd::write(&inner.wake_write, &[1]) {
            tracing::error!(%err, "could not wake the accept threads");
        }
        let accept_threads = std::mem::take(
            &mut *inner
                .accept_threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for thread in accept_threads {
            let _ = thread.join();
        }

        // No new connection can register now. Interrupt blocked reads.
        let open = {
            let registry = inner.lock_connections();
            for entry in registry.values() {
                entry.handle.shutdown(Shutdown::Read);
            }
            registry.len()
        };
        if open > 0 {
            tracing::info!(connections = open, "waiting for connections to finish");
        }
        let deadline = Instant::now() + inner.config.shutdown_grace;
        let mut registry = listener::wait_or_cut_off(
            inner.lock_connections(),
            &inner.connections_idle,
            deadline,
            |registry| registry.values().map(|entry| &entry.handle).collect(),
            "shutdown",
        );
        let stragglers: Vec<_> = registry.drain().map(|(_, entry)| entry.thread).collect();
        drop(registry);
        for thread in stragglers {
            let _ = thread.join();
        }
        *done = true;
        tracing::info!("server shut down");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
