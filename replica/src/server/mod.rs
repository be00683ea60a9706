//! The replica server: HTTPS with mutual TLS (or plain HTTP with a pre-shared key in
//! lab mode), authorisation by trust group, the API of [`wire::api`] over the stores of
//! [`crate::store`], and an applier thread.
//!
//! Threads: a small tokio runtime accepts connections, runs the TLS handshakes and the
//! HTTP/1.1 exchanges; every store operation (fsyncs included) runs on tokio's blocking
//! pool under that replica's mutex. One applier thread applies committed transfers,
//! without holding the replica's mutex while it writes the disks, so receiving goes on.
//!
//! Authentication ([`Transport`]): with TLS, the client certificate is verified by
//! rustls against the configured client CAs during the handshake, and its DNS names are
//! the primary's identity, for the whole connection. In lab mode (plain HTTP, nothing
//! encrypted) every request carries the pre-shared key
//! ([`PSK_HEADER`](wire::api::PSK_HEADER), compared in constant time) and the name the
//! primary claims ([`IDENTITY_HEADER`](wire::api::IDENTITY_HEADER)); a request without
//! the right key is answered 401 and nothing else happens.
//!
//! Authorisation: the identity is matched against the configured entries, in order.
//! The first matching entry gives the storage directory and trust
//! group; a replica is only visible to peers of its trust group (others get 404, as if it
//! did not exist). Replica names are checked with [`wire::api::valid_name`] before they
//! become a path component.
//!
//! Modules: [`api`] parses requests (pure), `authorization` decides who may do what
//! where, `http` is the plumbing (listener, TLS, connections, bodies, answers),
//! `handlers` run the API's calls against the stores, `upload` streams chunk uploads,
//! `applier` schedules applies, and `admin` is the administrator's side of a
//! [`ServerHandle`]. This module holds the entry points: [`ReplicaServer::start`],
//! its settings and the handle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use wire::api::ReplicaInfo;

use crate::limits::{Limits, Slots};
use crate::store::{apply_transfer, sync_all, Replica, StoreError};

mod admin;
pub mod api;
mod applier;
mod authorization;
mod handlers;
mod http;
mod upload;

pub use admin::AdminError;
use applier::{Applier, ApplyRequests, Outcome};
pub use authorization::{problems as authorization_problems, resolve, AuthEntry, PreSharedKey};
use http::{accept_loop, Acceptor};

/// Shortest pre-shared key lab mode accepts.
pub const MIN_PSK_LEN: usize = 16;

/// Errors starting the server.
#[derive(Debug, Error)]
pub enum ReplicaServerError {
    /// Binding or setting up the listener failed.
    #[error("Cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The runtime or a thread could not start.
    #[error("Cannot start the server's threads")]
    Threads(#[source] std::io::Error),
    /// Lab mode would listen beyond this machine without being told it may.
    #[error("Plain HTTP on {0} would carry keys and data unencrypted beyond this machine; listen on loopback, use TLS, or allow it explicitly")]
    PlainHttpExposed(SocketAddr),
    /// The authorisation entries, taken together, are unsafe.
    #[error("Invalid authorisation entries: {0}")]
    Authorization(String),
    /// A storage directory is unusable.
    #[error("Cannot use storage directory {path}")]
    Storage {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How primaries connect and prove who they are.
#[derive(Clone)]
pub enum Transport {
    /// HTTPS: the server certificate, and client certificates required and verified by
    /// this configuration; a certificate's DNS names are the primary's identity.
    Tls(Arc<rustls::ServerConfig>),
    /// Lab mode, for isolated networks only: plain HTTP, nothing encrypted. Every request
    /// carries the primary's claimed name in
    /// [`IDENTITY_HEADER`](wire::api::IDENTITY_HEADER) and the key of the authorisation
    /// entry allowing that name ([`AuthEntry::psk`]) in
    /// [`PSK_HEADER`](wire::api::PSK_HEADER).
    PlainWithPsk {
        /// Whether listening on an address other than loopback is allowed (the key
        /// and everything replicated then cross a network unencrypted).
        allow_non_loopback: bool,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tls(config) => f.debug_tuple("Tls").field(config).finish(),
            Transport::PlainWithPsk { allow_non_loopback } => f
                .debug_struct("PlainWithPsk")
                .field("allow_non_loopback", allow_non_loopback)
                .finish(),
        }
    }
}

/// What the server needs.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// TLS, or lab mode's plain HTTP.
    pub transport: Transport,
    /// Authorisation entries, tried in order.
    pub authorization: Vec<AuthEntry>,
    /// Free space each storage keeps in reserve.
    pub reserve: u64,
    /// The largest replica disk accepted, in bytes.
    pub max_disk_size: u64,
    /// What peers may hold of the server.
    pub limits: Limits,
}

/// The largest replica disk accepted unless configured: 64 TiB, the largest VHDX.
pub const DEFAULT_MAX_DISK_SIZE: u64 = 64 << 40;

struct Context {
    settings: ServerSettings,
    /// The authorisation entries in force: `settings.authorization` at start, then
    /// what [`ServerHandle::set_authorization`] put.
    authorization: std::sync::RwLock<Arc<Vec<AuthEntry>>>,
    replicas: Mutex<HashMap<PathBuf, Arc<Mutex<Replica>>>>,
    apply: ApplyRequests,
    /// Told of each planned failover a primary asked for.
    failover_listener: Mutex<Option<FailoverListener>>,
    /// Chunk uploads in progress, per primary identity.
    uploads: Arc<Slots<String>>,
}

impl Context {
    /// The authorisation entries in force.
    fn authorization(&self) -> Arc<Vec<AuthEntry>> {
        Arc::clone(
            &self
                .authorization
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// What is told of a planned failover (the daemon serves the live disks).
pub type FailoverListener = Arc<dyn Fn(FailedOver) + Send + Sync>;

use base::sync::lock;

/// Reads a running server's replicas from other threads (status, metrics); cheap to
/// clone. After the server shut down it still reads the stores.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    context: Arc<Context>,
}

/// A replica failed over to: what the daemon needs to serve its disks.
#[derive(Debug, Clone)]
pub struct FailedOver {
    /// The replica afterwards.
    pub info: ReplicaInfo,
    /// Its directory.
    pub dir: PathBuf,
    /// Its disks: name and image, in group order.
    pub disks: Vec<(String, PathBuf)>,
}

/// A running replica server.
#[derive(Debug)]
pub struct ReplicaServer {
    local_addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    applier: Option<Applier>,
    context: Arc<Context>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl ReplicaServer {
    /// Opens the storages, applies whatever was received before a restart, and starts
    /// serving.
    pub fn start(settings: ServerSettings) -> Result<Self, ReplicaServerError> {
        let plain = match settings.transport {
            Transport::PlainWithPsk { allow_non_loopback } => {
                if !allow_non_loopback && !settings.listen.ip().is_loopback() {
                    return Err(ReplicaServerError::PlainHttpExposed(settings.listen));
                }
                true
            }
            Transport::Tls(_) => false,
        };
        for entry in &settings.authorization {
            std::fs::create_dir_all(&entry.storage).map_err(|source| {
                ReplicaServerError::Storage {
                    path: entry.storage.clone(),
                    source,
                }
            })?;
        }
        let problems = authorization::problems(&settings.authorization, plain);
        if !problems.is_empty() {
            return Err(ReplicaServerError::Authorization(problems.join("; ")));
        }
        let apply = ApplyRequests::new();
        let context = Arc::new(Context {
            authorization: std::sync::RwLock::new(Arc::new(settings.authorization.clone())),
            settings: settings.clone(),
            replicas: Mutex::new(HashMap::new()),
            apply: apply.clone(),
            failover_listener: Mutex::new(None),
            uploads: Slots::new(usize::MAX, settings.limits.max_uploads_per_primary),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("replica-http")
            .on_thread_start(base::priority::enter_background)
            .enable_all()
            .build()
            .map_err(ReplicaServerError::Threads)?;
        let listener = runtime
            .block_on(TcpListener::bind(settings.listen))
            .map_err(|source| ReplicaServerError::Listen {
                addr: settings.listen,
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ReplicaServerError::Listen {
                addr: settings.listen,
                source,
            })?;
        let applier = {
            let context = Arc::clone(&context);
            Applier::start(&apply, Arc::new(move |dir: &Path| apply_all(&context, dir)))
                .map_err(ReplicaServerError::Threads)?
        };
        // Transfers received before a restart are applied first.
        for entry in &settings.authorization {
            if let Ok(dirs) = std::fs::read_dir(&entry.storage) {
                for dir in dirs.flatten() {
                    if Replica::exists(&dir.path()) {
                        apply.request(&dir.path());
                    }
                }
            }
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let acceptor = match &settings.transport {
            Transport::Tls(config) => {
                info!(%local_addr, "Replica server listening (HTTPS, client certificates required)");
                Acceptor::Tls(TlsAcceptor::from(Arc::clone(config)))
            }
            Transport::PlainWithPsk { .. } => {
                warn!(%local_addr, "Replica server listening on PLAIN HTTP: replicated data, keys and identities cross the network UNENCRYPTED and anyone who sees the traffic can impersonate a primary; for isolated labs only, never in production");
                Acceptor::Plain
            }
        };
        runtime.spawn(accept_loop(
            listener,
            acceptor,
            Arc::clone(&context),
            stopped,
        ));
        Ok(ReplicaServer {
            local_addr,
            runtime: Some(runtime),
            stop: Some(stop),
            applier: Some(applier),
            context,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every replica in every storage, for status.
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        self.handle().replicas()
    }

    /// A handle for reading the replicas from other threads.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            context: Arc::clone(&self.context),
        }
    }

    /// Stops accepting, closes connections and stops the applier after its current
    /// transfer.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(10));
        }
        if let Some(mut applier) = self.applier.take() {
            applier.stop();
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Loads (once) and returns the replica in `dir`.
fn load(context: &Context, dir: &Path) -> Result<Arc<Mutex<Replica>>, StoreError> {
    let mut replicas = lock(&context.replicas);
    if let Some(replica) = replicas.get(dir) {
        return Ok(Arc::clone(replica));
    }
    let replica = Arc::new(Mutex::new(Replica::open(dir, context.settings.reserve)?));
    replicas.insert(dir.to_path_buf(), Arc::clone(&replica));
    Ok(replica)
}

/// Applies every committed transfer of the replica in `dir`, into the files that are
/// its disks now (see [`Replica::disks_for_apply`]).
fn apply_all(context: &Context, dir: &Path) -> Outcome {
    if !Replica::exists(dir) {
        return Outcome::Gone;
    }
    let replica = match load(context, dir) {
        Ok(replica) => replica,
        Err(error) => return Outcome::Failed(error),
    };
    match apply_queued(&replica, dir) {
        Ok(()) => Outcome::Done,
        Err(StoreError::Removed(_)) => Outcome::Gone,
        Err(error) => {
            // The next try opens the disks afresh.
            lock(&replica).forget_disks();
            Outcome::Failed(error)
        }
    }
}

fn apply_queued(replica: &Mutex<Replica>, dir: &Path) -> Result<(), StoreError> {
    loop {
        let (next, path, disks, history) = {
            let mut held = lock(replica);
            let Some((next, path)) = held.begin_apply()? else {
                // A sync that failed before is due still.
                let unsynced = !held.state().unsynced.is_empty();
                drop(held);
                if unsynced {
                    sync_applied(replica, dir)?;
                }
                return Ok(());
            };
            (next, path, held.disks_for_apply()?, held.history())
        };
        let started = std::time::Instant::now();
        let applied = apply_transfer(&path, next.id, next.chunks, &disks, &history)?;
        let took = started.elapsed();
        let sync_due = {
            let mut replica = lock(replica);
            replica.note_apply(applied.written, took);
            replica.finish_apply(next, applied.written)?;
            replica.sync_due()
        };
        info!(
            replica = %dir.display(),
            transfer = next.id,
            kind = ?next.kind,
            bytes = applied.written,
            apply_ms = took.as_millis(),
            capture_ms = applied.capture.as_millis(),
            history_sync_ms = applied.history_sync.as_millis(),
            write_ms = applied.write.as_millis(),
            "Transfer applied"
        );
        if sync_due {
            sync_applied(replica, dir)?;
        }
    }
}

/// Syncs the disks of the replica in `dir` after a run of applied transfers, without
/// holding the replica: receiving and status go on meanwhile.
fn sync_applied(replica: &Mutex<Replica>, dir: &Path) -> Result<(), StoreError> {
    let (ids, disks) = {
        let mut replica = lock(replica);
        (replica.unsynced(), replica.disks_for_apply()?)
    };
    if ids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    sync_all(&disks)?;
    let took = started.elapsed();
    lock(replica).finish_sync(&ids)?;
    info!(replica = %dir.display(), transfers = ids.len(), sync_ms = took.as_millis(), "Replica disks synced");
    Ok(())
}
