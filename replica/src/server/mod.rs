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
//! encrypted) every request carries the pre-shared key ([`PSK_HEADER`], compared in
//! constant time) and the name the primary claims ([`IDENTITY_HEADER`]); a request
//! without the right key is answered 401 and nothing else happens.
//!
//! Authorisation: the identity is matched against the configured entries, in order.
//! The first matching entry gives the storage directory and trust
//! group; a replica is only visible to peers of its trust group (others get 404, as if it
//! did not exist). Replica names are checked with [`wire::api::valid_name`] before they
//! become a path component.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use wire::api::{
    valid_name, CommitRequest, DiskInfo, EnableRequest, ErrorCode, HashAnswer, HashRequest,
    InitialMethod, ReplicaInfo, TransferOffer, IDENTITY_HEADER, MAX_JSON_BODY, PSK_HEADER,
};
use wire::error_chain;
use wire::tls::certificate_names;

use crate::compare;
use crate::limits::{LimitReached, Limits, RefusalLog, Slot, Slots};
use crate::store::{apply_transfer, Claim, Replica, ReplicaState, StoreError};

/// How long a connection may wait for its next request's headers (hyper's timer runs
/// from the moment it waits): the primary's echo every 90 s keeps its data connection
/// open; the first request is held to [`Limits::handshake_timeout`] instead.
const HEADER_TIMEOUT: Duration = Duration::from_secs(120);
/// At most one warning about refused connections per this period.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);
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
    /// carries the primary's claimed name in [`IDENTITY_HEADER`] and the key of the
    /// authorisation entry allowing that name ([`AuthEntry::psk`]) in [`PSK_HEADER`].
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

/// How the requests of one connection are authenticated.
#[derive(Debug, Clone)]
enum Auth {
    /// By the TLS handshake: the peer, or `None` if no entry allows its certificate.
    Connection(Option<Peer>),
    /// Lab mode: each request by its headers.
    PerRequest(Arc<PlainConnection>),
}

/// How connections start.
#[derive(Clone)]
enum Acceptor {
    /// With a TLS handshake.
    Tls(TlsAcceptor),
    /// Lab mode: plain HTTP; each request carries its identity and key.
    Plain,
}

/// A plain-HTTP connection: where from, and what was last logged about it (so a
/// connection logs its primary once, not every request).
#[derive(Debug)]
struct PlainConnection {
    remote: SocketAddr,
    logged: Mutex<Option<String>>,
}

impl PlainConnection {
    /// Whether `outcome` (an identity, or "" for a failed authentication) differs from
    /// what was logged last; remembers it.
    fn first_time(&self, outcome: String) -> bool {
        let mut logged = lock(&self.logged);
        if logged.as_deref() == Some(outcome.as_str()) {
            return false;
        }
        *logged = Some(outcome);
        true
    }
}

pub mod api;
mod applier;
mod authorization;
mod upload;

use api::{refuse, ApiCall, Refusal, ReplicaCall};
use applier::{Applier, ApplyRequests, Outcome};
use authorization::{authorise, Peer, PlainRefusal};
pub use authorization::{problems as authorization_problems, resolve, AuthEntry, PreSharedKey};

struct Context {
    settings: ServerSettings,
    replicas: Mutex<HashMap<PathBuf, Arc<Mutex<Replica>>>>,
    apply: ApplyRequests,
    /// Told of each planned failover a primary asked for.
    failover_listener: Mutex<Option<FailoverListener>>,
    /// Chunk uploads in progress, per primary identity.
    uploads: Arc<Slots<String>>,
}

/// What is told of a planned failover (the daemon serves the live disks).
pub type FailoverListener = Arc<dyn Fn(FailedOver) + Send + Sync>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a running server's replicas from other threads (status, metrics); cheap to
/// clone. After the server shut down it still reads the stores.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    context: Arc<Context>,
}

impl ServerHandle {
    /// Every replica in every storage (each storage once, however many entries name it).
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        self.loaded()
            .iter()
            .map(|(_, replica)| lock(replica).info())
            .collect()
    }

    /// Every replica that loads, with its directory.
    fn loaded(&self) -> Vec<(PathBuf, Arc<Mutex<Replica>>)> {
        let mut out = Vec::new();
        for storage in self.storages() {
            let Ok(dirs) = std::fs::read_dir(storage) else {
                continue;
            };
            for dir in dirs.flatten() {
                if !Replica::exists(&dir.path()) {
                    continue;
                }
                if let Ok(replica) = load(&self.context, &dir.path()) {
                    out.push((dir.path(), replica));
                }
            }
        }
        out
    }

    /// Starts a test failover of replica `name` at `point` (the latest if `None`):
    /// returns the replica and one writable device per disk, in group order, to serve
    /// as the replica's `exports` (see [`crate::failover_drill`]).
    pub fn start_test(
        &self,
        name: &str,
        trust_group: Option<&str>,
        point: Option<u64>,
    ) -> Result<(ReplicaInfo, Vec<Arc<nbd_shim::backend::Overlay>>), AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        // Between two applies the disks hold the latest point.
        let test = while_busy(TEST_WAIT, || lock(&replica).begin_test(point))?;
        let mut replica = lock(&replica);
        let disks: Vec<(PathBuf, u64)> = replica
            .state()
            .disks
            .iter()
            .map(|disk| (replica.disk_path(&disk.name), disk.size))
            .collect();
        let overlays = crate::failover_drill::overlays(
            &replica.history(),
            test.point,
            &disks,
            &dir.join(TEST_DIR),
        );
        match overlays {
            Ok(overlays) => {
                info!(replica = %name, cycle = test.stamp.cycle, "Test failover started");
                Ok((replica.info(), overlays))
            }
            Err(error) => {
                let _ = replica.end_test();
                Err(AdminError::Invalid(format!(
                    "Cannot create the test's overlays in {}: {error}",
                    dir.join(TEST_DIR).display()
                )))
            }
        }
    }

    /// Stops the test failover of replica `name`: its overlays are deleted and its
    /// temporary point merged away. The caller removed the exports first.
    pub fn stop_test(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<ReplicaInfo, AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        let mut replica = lock(&replica);
        if replica.end_test()?.is_none() {
            return Err(AdminError::Invalid(format!(
                "No test failover of {name} is running"
            )));
        }
        let _ = std::fs::remove_dir_all(dir.join(TEST_DIR));
        info!(replica = %name, "Test failover stopped; its writes are discarded");
        Ok(replica.info())
    }

    /// Ends the test failovers a previous daemon left running (their overlays are
    /// throwaway).
    pub fn end_stale_tests(&self) {
        for (dir, replica) in self.loaded() {
            let mut replica = lock(&replica);
            if replica.state().test.is_none() {
                continue;
            }
            match replica.end_test() {
                Ok(_) => {
                    let _ = std::fs::remove_dir_all(dir.join(TEST_DIR));
                    warn!(replica = %replica.state().name, "A test failover was running when the daemon stopped; it is ended and its writes discarded");
                }
                Err(error) => {
                    warn!(replica = %replica.state().name, error = %error_chain(&error), "Cannot end a stale test failover");
                }
            }
        }
    }
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

fn failed_over(dir: &Path, replica: &Replica) -> FailedOver {
    FailedOver {
        info: replica.info(),
        dir: dir.to_path_buf(),
        disks: replica
            .state()
            .disks
            .iter()
            .map(|disk| (disk.name.clone(), replica.disk_path(&disk.name)))
            .collect(),
    }
}

/// Calls `attempt` until it is not [`StoreError::Busy`] (the replica is between two
/// steps of an apply), for at most `wait`.
fn while_busy<T>(
    wait: Duration,
    mut attempt: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match attempt() {
            Err(StoreError::Busy(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Where a replica keeps a test's overlays.
const TEST_DIR: &str = "test";
/// How long a failover waits for received transfers to be applied.
const FAILOVER_WAIT: Duration = Duration::from_secs(600);
/// How long starting a test waits for an apply in progress to end.
const TEST_WAIT: Duration = Duration::from_secs(60);

impl ServerHandle {
    /// The directories of every storage (each once, however many entries name it).
    fn storages(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for entry in &self.context.settings.authorization {
            if !out.contains(&entry.storage.as_path()) {
                out.push(&entry.storage);
            }
        }
        out
    }

    /// The one replica named `name` (of `trust_group`, when given) in any storage.
    fn one_replica(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<(PathBuf, Arc<Mutex<Replica>>), AdminError> {
        if !valid_name(name) {
            return Err(AdminError::Invalid(format!(
                "{name:?} is not a replica name"
            )));
        }
        let mut found = Vec::new();
        for entry in &self.context.settings.authorization {
            let dir = entry.storage.join(name);
            if trust_group.is_some_and(|group| group != entry.trust_group)
                || found.iter().any(|(seen, _)| *seen == dir)
                || !Replica::exists(&dir)
            {
                continue;
            }
            let replica = load(&self.context, &dir)?;
            found.push((dir, replica));
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(AdminError::Invalid(format!("No replica named {name}"))),
            _ => Err(AdminError::Invalid(format!(
                "Several trust groups have a replica named {name}; say which with --trust-group"
            ))),
        }
    }

    /// Sets the recovery history replica `name` keeps (until the primary asks for
    /// another when replication is enabled again).
    pub fn set_recovery(
        &self,
        name: &str,
        trust_group: Option<&str>,
        policy: wire::api::RecoveryPolicy,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.set_recovery(policy)?;
            info!(replica = %name, points = policy.points, spacing_secs = policy.spacing_secs, "Recovery history set");
            Ok(())
        })
    }

    /// Runs `act` on replica `name` (of `trust_group`, when given) under its lock;
    /// returns the replica afterwards.
    fn administer(
        &self,
        name: &str,
        trust_group: Option<&str>,
        act: impl FnOnce(&mut Replica) -> Result<(), StoreError>,
    ) -> Result<ReplicaInfo, AdminError> {
        let (_, replica) = self.one_replica(name, trust_group)?;
        let mut replica = lock(&replica);
        act(&mut replica)?;
        Ok(replica.info())
    }

    /// Fails replica `name` over to `point` (the latest if `None`), waiting for the
    /// transfers received to be applied first (they are part of the latest point).
    /// Returns the replica, its directory and its disks (name, path), in group order.
    pub fn fail_over(
        &self,
        name: &str,
        trust_group: Option<&str>,
        point: Option<u64>,
    ) -> Result<FailedOver, AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        self.context.apply.request(&dir);
        let failover = while_busy(FAILOVER_WAIT, || lock(&replica).fail_over(point, false))?;
        warn!(replica = %name, cycle = failover.stamp.cycle, "Failed over: the replica's disks are now the live copy and its former primary is fenced off");
        let guard = lock(&replica);
        Ok(failed_over(&dir, &guard))
    }

    /// The replicas failed over to (served as live disks by the daemon).
    pub fn failed_over(&self) -> Vec<FailedOver> {
        self.loaded()
            .iter()
            .filter_map(|(dir, replica)| {
                let replica = lock(replica);
                replica
                    .state()
                    .failover
                    .is_some()
                    .then(|| failed_over(dir, &replica))
            })
            .collect()
    }

    /// Completes the failover of replica `name`: the other recovery points go.
    pub fn complete_failover(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.complete_failover()?;
            info!(replica = %name, "Failover completed; the other recovery points are deleted");
            Ok(())
        })
    }

    /// Failback: the live disks of the failed-over replica `name` were handed over
    /// by a planned failover to the replica they replicated to, which is now the
    /// primary; they become an existing copy for replication back (see
    /// [`Replica::hand_back`]).
    pub fn hand_back(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.hand_back()?;
            let epoch = replica.state().epoch;
            info!(replica = %name, epoch, "The live disks were handed over; they wait as an existing copy for replication back");
            Ok(())
        })
    }

    /// Sets who is told of planned failovers primaries ask for.
    pub fn on_failover(&self, listener: FailoverListener) {
        *lock(&self.context.failover_listener) = Some(listener);
    }

    /// Replica `name` (of `trust_group`, when given), and its directory.
    pub fn replica(
        &self,
        name: &str,
        trust_group: Option<&str>,
    ) -> Result<(PathBuf, ReplicaInfo), AdminError> {
        let (dir, replica) = self.one_replica(name, trust_group)?;
        let info = lock(&replica).info();
        Ok((dir, info))
    }

    /// Pauses (or resumes) replication into replica `name` on this side: transfers
    /// are refused as paused, and the primary retries each interval. `trust_group`
    /// picks among replicas of that name in several trust groups.
    pub fn set_paused(
        &self,
        name: &str,
        trust_group: Option<&str>,
        paused: bool,
    ) -> Result<ReplicaInfo, AdminError> {
        self.administer(name, trust_group, |replica| {
            replica.set_paused(paused)?;
            info!(replica = %name, paused, "Replication paused or resumed on the replica side");
            Ok(())
        })
    }

    /// Imports the initial copy exported to `dir` (external media) into its replica,
    /// which must exist (the primary created it when replication was enabled): found
    /// by the export's name and relationship. Returns the replica afterwards and the
    /// transfers newly imported.
    pub fn import(&self, dir: &Path) -> Result<(ReplicaInfo, u32), AdminError> {
        let manifest = wire::media::read_manifest(dir)?.ok_or_else(|| {
            AdminError::Invalid(format!("{} holds no export manifest", dir.display()))
        })?;
        if !valid_name(&manifest.name) {
            return Err(AdminError::Invalid(format!(
                "{:?} is not a replica name",
                manifest.name
            )));
        }
        let mut found = None;
        for entry in &self.context.settings.authorization {
            let candidate = entry.storage.join(&manifest.name);
            if !Replica::exists(&candidate) {
                continue;
            }
            let replica = load(&self.context, &candidate)?;
            if lock(&replica).state().relationship == manifest.relationship {
                found = Some((candidate, replica));
                break;
            }
        }
        let Some((replica_dir, replica)) = found else {
            return Err(AdminError::Invalid(format!(
                "No replica {} of this export's relationship here: enable replication on the primary first (it creates the replica)",
                manifest.name
            )));
        };
        let imported = lock(&replica).import(dir, &manifest)?;
        self.context.apply.request(&replica_dir);
        info!(replica = %manifest.name, transfers = imported, "Initial copy imported from external media");
        let info = lock(&replica).info();
        Ok((info, imported))
    }
}

/// Errors of an administrator's request on the replica side (import, pause).
#[derive(Debug, Error)]
pub enum AdminError {
    /// The export cannot be read or does not fit.
    #[error("{0}")]
    Invalid(String),
    /// The manifest cannot be read.
    #[error(transparent)]
    Manifest(#[from] wire::media::MediaError),
    /// The replica refused a transfer.
    #[error("Import")]
    Store(#[from] StoreError),
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
            settings: settings.clone(),
            replicas: Mutex::new(HashMap::new()),
            apply: apply.clone(),
            failover_listener: Mutex::new(None),
            uploads: Slots::new(usize::MAX, settings.limits.max_uploads_per_primary),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("replica-http")
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
            let mut replica = lock(replica);
            let Some((next, path)) = replica.begin_apply()? else {
                return Ok(());
            };
            (next, path, replica.disks_for_apply()?, replica.history())
        };
        let started = std::time::Instant::now();
        let applied = apply_transfer(&path, next.id, &disks, &history)?;
        let took = started.elapsed();
        {
            let mut replica = lock(replica);
            replica.note_apply(applied.written, took);
            replica.finish_apply(next)?;
        }
        info!(
            replica = %dir.display(),
            transfer = next.id,
            kind = ?next.kind,
            bytes = applied.written,
            apply_ms = took.as_millis(),
            capture_ms = applied.capture.as_millis(),
            history_sync_ms = applied.history_sync.as_millis(),
            write_ms = applied.write.as_millis(),
            disk_sync_ms = applied.disk_sync.as_millis(),
            "Transfer applied"
        );
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Acceptor,
    context: Arc<Context>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let limits = context.settings.limits;
    let connections = Slots::new(limits.max_connections, limits.max_connections_per_address);
    let refusals = RefusalLog::new(REFUSAL_LOG_PERIOD);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                warn!(%error, "Accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Counted before any TLS work, so a flood costs an accept and a close.
        let slot = match connections.take(remote.ip().to_canonical()) {
            Ok(slot) => slot,
            Err(full) => {
                drop(stream);
                if let Some(refused) = refusals.note() {
                    let (limit, value) = match full {
                        LimitReached::Total => ("max_connections", limits.max_connections),
                        LimitReached::Key => (
                            "max_connections_per_address",
                            limits.max_connections_per_address,
                        ),
                    };
                    warn!(%remote, refused, limit, value, "Closing new connections over a connection limit ([limits] in the configuration); this count since the last such line");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, context) = (acceptor.clone(), Arc::clone(&context));
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = serve_connection(stream, remote, acceptor, context).await {
                info!(%remote, %error, "Connection ended");
            }
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: Acceptor,
    context: Arc<Context>,
) -> Result<(), String> {
    let limits = context.settings.limits;
    let first_request_by = tokio::time::Instant::now() + limits.handshake_timeout;
    let acceptor = match acceptor {
        Acceptor::Tls(acceptor) => acceptor,
        Acceptor::Plain => {
            let connection = Arc::new(PlainConnection {
                remote,
                logged: Mutex::new(None),
            });
            let auth = Auth::PerRequest(connection);
            return serve_http(TokioIo::new(stream), auth, context, first_request_by).await;
        }
    };
    let tls = tokio::time::timeout_at(first_request_by, acceptor.accept(stream))
        .await
        .map_err(|_| format!("TLS handshake not done in {:?}", limits.handshake_timeout))?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(certificate_names)
        .unwrap_or_default();
    let peer = authorise(&context.settings.authorization, &names);
    match &peer {
        Some(peer) => {
            info!(%remote, identity = %peer.identity, trust_group = %peer.trust_group, "Primary connected")
        }
        None if names.is_empty() => {
            warn!(%remote, "Refusing a client certificate without a DNS name among its subject alternative names: a primary's identity is its DNS names only (never its common name or IP addresses)")
        }
        None => warn!(%remote, ?names, "Refusing a primary no authorisation entry allows"),
    }
    serve_http(
        TokioIo::new(tls),
        Auth::Connection(peer),
        context,
        first_request_by,
    )
    .await
}

/// Serves HTTP/1.1 on a connection whose first request's headers must arrive by
/// `first_request_by`.
async fn serve_http<I>(
    io: I,
    auth: Auth,
    context: Arc<Context>,
    first_request_by: tokio::time::Instant,
) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let first_request = Arc::new(tokio::sync::Notify::new());
    let body_timeout = BodyTimeout(context.settings.limits.body_timeout);
    let service = {
        let first_request = Arc::clone(&first_request);
        service_fn(move |mut request: Request<Incoming>| {
            first_request.notify_one();
            request.extensions_mut().insert(body_timeout);
            let (context, auth) = (Arc::clone(&context), auth.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(&context, &auth, request).await) }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let started = tokio::select! {
        served = &mut connection => return served.map_err(|e| e.to_string()),
        started = tokio::time::timeout_at(first_request_by, first_request.notified()) => started,
    };
    if started.is_err() {
        return Err("No request in time after connecting".into());
    }
    connection.await.map_err(|e| e.to_string())
}

type Answer = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl Refusal {
    fn answer(&self) -> Answer {
        let status =
            StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json(status, &self.0)
    }
}

fn store_refusal(error: &StoreError) -> Refusal {
    let message = error_chain(error);
    let code = match error {
        _ if error.is_no_space() => ErrorCode::InsufficientStorage,
        StoreError::Chunk(_) | StoreError::Apply(_) => ErrorCode::BadRequest,
        StoreError::Conflict(_) => ErrorCode::Conflict,
        StoreError::OtherRelationship(_) => ErrorCode::OtherRelationship,
        StoreError::ChainBroken(_) => ErrorCode::ChainBroken,
        StoreError::Paused(_) => ErrorCode::Paused,
        StoreError::Busy(_) => ErrorCode::Busy,
        StoreError::Superseded(_) => ErrorCode::Superseded,
        StoreError::Removed(_) => ErrorCode::NotFound,
        StoreError::Io { .. }
        | StoreError::CorruptState { .. }
        | StoreError::NoSpace { .. }
        | StoreError::History(_) => {
            warn!(error = %message, "Replica store failed");
            ErrorCode::Internal
        }
    };
    refuse(code, message)
}

/// Set while a request's body is not read yet (a request extension).
#[derive(Debug, Clone)]
struct UnreadBody(Arc<AtomicBool>);

/// How long a request's body may go without a byte arriving (a request extension).
#[derive(Debug, Clone, Copy)]
struct BodyTimeout(Duration);

/// What a body reader needs from its request's extensions: the flag to clear once the
/// body is read, and how long the body may stall.
fn body_extensions(request: &Request<Incoming>) -> (Option<UnreadBody>, Duration) {
    let unread = request.extensions().get::<UnreadBody>().cloned();
    let BodyTimeout(idle) = request
        .extensions()
        .get::<BodyTimeout>()
        .copied()
        .unwrap_or(BodyTimeout(crate::limits::DEFAULT_BODY_TIMEOUT));
    (unread, idle)
}

/// Reads a whole body of at most `limit` bytes; a body that stalls for the connection's
/// [`BodyTimeout`] is refused (and, unread, closes the connection).
async fn body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let (unread, idle) = body_extensions(&request);
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("Body larger than {limit} bytes"),
        ));
    }
    let mut incoming = Limited::new(request.into_body(), limit);
    let mut bytes = Vec::new();
    loop {
        let frame = tokio::time::timeout(idle, incoming.frame())
            .await
            .map_err(|_| {
                refuse(
                    ErrorCode::BadRequest,
                    format!("The body stalled: no byte for {idle:?}"),
                )
            })?;
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|e| refuse(ErrorCode::BadRequest, format!("Cannot read the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    if let Some(UnreadBody(unread)) = unread {
        unread.store(false, Ordering::Relaxed);
    }
    Ok(Bytes::from(bytes))
}

/// An upload's place among the peer's uploads in progress, held until it ends. Over
/// the limit the upload is refused as busy before any of its body is read, so a
/// primary's uploads hold a bounded amount of memory.
fn upload_slot(context: &Context, peer: &Peer) -> Result<Slot<String>, Refusal> {
    context.uploads.take(peer.identity.clone()).map_err(|_| {
        refuse(
            ErrorCode::Busy,
            format!(
                "{} chunk uploads of {} are in progress already; retry later",
                context.settings.limits.max_uploads_per_primary, peer.identity
            ),
        )
    })
}

async fn json_body<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Refusal> {
    let bytes = body(request, MAX_JSON_BODY).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(ErrorCode::BadRequest, format!("Invalid JSON: {e}")))
}

/// Runs a store operation on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(refuse(ErrorCode::Internal, format!("Worker failed: {e}"))))
}

/// The peer a request comes from, or the refusal to answer it with.
fn peer_of(
    context: &Context,
    auth: &Auth,
    request: &Request<Incoming>,
) -> Result<Option<Peer>, Refusal> {
    let connection = match auth {
        Auth::Connection(peer) => return Ok(peer.clone()),
        Auth::PerRequest(connection) => connection,
    };
    let remote = connection.remote;
    let header = |name: &str| request.headers().get(name).map(|v| v.as_bytes());
    let identity = header(IDENTITY_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let authenticated = authorization::authenticate_plain(
        &context.settings.authorization,
        identity.as_deref(),
        header(PSK_HEADER),
    );
    let peer = match authenticated {
        Ok(peer) => peer,
        Err(refused) => {
            let claimed = identity.unwrap_or_default();
            if connection.first_time(format!("refused {claimed}")) {
                warn!(%remote, identity = %claimed, reason = ?refused, "Refusing a plain-HTTP request: no valid name, or not the key of the entry allowing it");
            }
            return Err(refuse(
                ErrorCode::Unauthenticated,
                match refused {
                    PlainRefusal::NoIdentity => format!(
                        "Missing or invalid {IDENTITY_HEADER} header (the primary's DNS name)"
                    ),
                    PlainRefusal::WrongKey | PlainRefusal::NotAuthorised => format!(
                        "Missing or wrong pre-shared key ({PSK_HEADER} header) for this primary's name"
                    ),
                },
            ));
        }
    };
    if connection.first_time(peer.identity.clone()) {
        info!(%remote, identity = %peer.identity, trust_group = %peer.trust_group, "Primary connected (plain HTTP, pre-shared key)");
    }
    Ok(Some(peer))
}

async fn handle(context: &Arc<Context>, auth: &Auth, mut request: Request<Incoming>) -> Answer {
    let unread = Arc::new(AtomicBool::new(!request.body().is_end_stream()));
    request
        .extensions_mut()
        .insert(UnreadBody(Arc::clone(&unread)));
    let mut answer = respond(context, auth, request).await;
    // Answered without reading the body (refused first): the body is still on the
    // connection, which hyper then cannot reuse; tell the client so it does not either.
    if unread.load(Ordering::Relaxed) {
        answer
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    answer
}

async fn respond(context: &Arc<Context>, auth: &Auth, request: Request<Incoming>) -> Answer {
    let peer = match peer_of(context, auth, &request) {
        Ok(peer) => peer,
        Err(refusal) => return refusal.answer(),
    };
    let Some(peer) = peer else {
        return refuse(
            ErrorCode::Forbidden,
            "This primary is not authorised on this replica server",
        )
        .answer();
    };
    match route(context, &peer, request).await {
        Ok(answer) => answer,
        Err(refusal) => refusal.answer(),
    }
}

async fn route(
    context: &Arc<Context>,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<Answer, Refusal> {
    let call = api::parse(request.method(), request.uri().path(), request.headers())?;
    let (name, call) = match call {
        ApiCall::Echo => return Ok(json(StatusCode::OK, &serde_json::json!({}))),
        ApiCall::Enable { epoch } => {
            let enable: EnableRequest = json_body(request).await?;
            api::check_enable(&enable, context.settings.max_disk_size)?;
            let (context, peer) = (Arc::clone(context), peer.clone());
            return blocking(move || enable_replica(&context, &peer, enable, epoch)).await;
        }
        ApiCall::Replica { name, call } => (name, call),
    };
    let dir = peer.storage.join(name);
    let replica = {
        let (context, peer, dir) = (Arc::clone(context), peer.clone(), dir.clone());
        blocking(move || find(&context, &peer, &dir)).await?
    };
    match call {
        ReplicaCall::Info => Ok(json(StatusCode::OK, &lock(&replica).info())),
        ReplicaCall::Remove(claim) => {
            lock(&replica)
                .check_relationship(claim)
                .map_err(|e| store_refusal(&e))?;
            let context = Arc::clone(context);
            blocking(move || remove_replica(&context, &dir, &replica)).await
        }
        ReplicaCall::PlannedFailover(claim) => {
            let asked: wire::api::FailoverRequest = json_body(request).await?;
            let context = Arc::clone(context);
            blocking(move || planned_failover(&context, &dir, &replica, claim, asked.cycle)).await
        }
        ReplicaCall::Hashes(claim) => {
            let asked: HashRequest = json_body(request).await?;
            blocking(move || hash_replica_disk(&replica, claim, &asked)).await
        }
        ReplicaCall::Offer(claim) => {
            let offer: TransferOffer = json_body(request).await?;
            blocking(move || {
                let mut replica = lock(&replica);
                if replica.state().awaiting_import {
                    replica
                        .check_relationship(claim)
                        .map_err(|e| store_refusal(&e))?;
                    return Err(refuse(
                        ErrorCode::Busy,
                        format!("Replica {} waits for its initial copy to be imported from external media (`blkrep replica import` on the replica server)", replica.state().name),
                    ));
                }
                let answer = replica
                    .offer(claim, &offer)
                    .map_err(|e| store_refusal(&e))?;
                Ok(json(StatusCode::OK, &answer))
            })
            .await
        }
        ReplicaCall::PutChunk { claim, id, index } => {
            let _upload = upload_slot(context, peer)?;
            let stored = upload::receive(&replica, claim, id, index, request).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "have_chunks": stored }),
            ))
        }
        ReplicaCall::Commit { claim, id } => {
            let commit: CommitRequest = json_body(request).await?;
            let apply = context.apply.clone();
            blocking(move || {
                let mut replica = lock(&replica);
                replica
                    .commit(claim, id, commit.chunks)
                    .map_err(|e| store_refusal(&e))?;
                apply.request(&dir);
                Ok(json(StatusCode::OK, &replica.info()))
            })
            .await
        }
    }
}

/// A planned failover its primary asked for: once the last cycle is applied, the
/// replica becomes the live copy (and its primary is refused from then on).
fn planned_failover(
    context: &Context,
    dir: &Path,
    replica: &Mutex<Replica>,
    claim: Claim,
    cycle: u64,
) -> Result<Answer, Refusal> {
    let failed = once_applied(replica, claim, |replica| {
        let last = replica.state().last_received_cycle;
        if last != Some(cycle) {
            return Err(refuse(
                ErrorCode::Conflict,
                format!(
                    "Cycle {cycle} is not the last one received (that is {last:?}): ship every change first"
                ),
            ));
        }
        let failover = replica
            .fail_over(None, true)
            .map_err(|e| store_refusal(&e))?;
        warn!(replica = %replica.state().name, cycle = failover.stamp.cycle, "Planned failover: the replica is now the live copy");
        Ok(failed_over(dir, replica))
    })?;
    let info = failed.info.clone();
    let listener = lock(&context.failover_listener).clone();
    if let Some(listener) = listener {
        listener(failed);
    }
    Ok(json(StatusCode::OK, &info))
}

/// How long a request waits for received transfers to be applied.
const APPLIED_WAIT: Duration = Duration::from_secs(60);

/// Runs `then` on `replica` (which `claim` must own) under its lock once every
/// received transfer is applied, waiting at most [`APPLIED_WAIT`] for that.
fn once_applied<T>(
    replica: &Mutex<Replica>,
    claim: Claim,
    mut then: impl FnMut(&mut Replica) -> Result<T, Refusal>,
) -> Result<T, Refusal> {
    let deadline = std::time::Instant::now() + APPLIED_WAIT;
    loop {
        {
            let mut replica = lock(replica);
            replica
                .check_relationship(claim)
                .map_err(|e| store_refusal(&e))?;
            if replica.state().queue.is_empty() {
                return then(&mut replica);
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(refuse(
                ErrorCode::Busy,
                "Received transfers are still being applied; ask again later",
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hashes ranges of a replica disk once every received transfer is applied (the
/// hashes then describe what the next transfers build on). The replica is not locked
/// while hashing.
fn hash_replica_disk(
    replica: &Mutex<Replica>,
    claim: Claim,
    asked: &HashRequest,
) -> Result<Answer, Refusal> {
    let (path, size) = once_applied(replica, claim, |replica| {
        let disk = usize::try_from(asked.disk)
            .ok()
            .and_then(|index| replica.state().disks.get(index))
            .ok_or_else(|| refuse(ErrorCode::BadRequest, "No such disk"))?;
        Ok((replica.disk_path(&disk.name), disk.size))
    })?;
    compare::check_ranges(&asked.ranges, size)
        .map_err(|e| refuse(ErrorCode::BadRequest, e.to_string()))?;
    let image = std::fs::File::open(&path).map_err(|e| {
        refuse(
            ErrorCode::Internal,
            format!("Cannot open {}: {e}", path.display()),
        )
    })?;
    let hashes = compare::hash_ranges(&image, size, &asked.ranges).map_err(|e| {
        refuse(
            ErrorCode::Internal,
            format!("Cannot hash {}: {}", path.display(), error_chain(&e)),
        )
    })?;
    Ok(json(
        StatusCode::OK,
        &HashAnswer {
            hashes: hashes.iter().map(compare::to_hex).collect(),
        },
    ))
}

/// The replica in `dir` if it exists and belongs to the peer's trust group.
fn find(context: &Context, peer: &Peer, dir: &Path) -> Result<Arc<Mutex<Replica>>, Refusal> {
    let not_found = || refuse(ErrorCode::NotFound, "No such replica");
    if !Replica::exists(dir) {
        return Err(not_found());
    }
    let replica = load(context, dir).map_err(|e| store_refusal(&e))?;
    if lock(&replica).state().trust_group != peer.trust_group {
        return Err(not_found());
    }
    Ok(replica)
}

fn enable_replica(
    context: &Context,
    peer: &Peer,
    enable: EnableRequest,
    epoch: u64,
) -> Result<Answer, Refusal> {
    let claim = Claim {
        relationship: enable.relationship,
        epoch,
    };
    let dir = peer.storage.join(&enable.name);
    if Replica::exists(&dir) {
        let replica = load(context, &dir).map_err(|e| store_refusal(&e))?;
        let replica = lock(&replica);
        let state = replica.state();
        if state.trust_group != peer.trust_group {
            return Err(refuse(
                ErrorCode::OtherRelationship,
                "The replica name is in use",
            ));
        }
        if replica.is_unclaimed() {
            return claim_existing_copy(replica, peer, &enable, claim);
        }
        if state.failover.is_some() {
            return Err(refuse(
                ErrorCode::Superseded,
                format!(
                    "Replica {} was failed over to and is the group's live copy: no primary can replicate into it or replace it",
                    state.name
                ),
            ));
        }
        if state.relationship != enable.relationship || state.disks != enable.disks {
            return Err(refuse(
                ErrorCode::OtherRelationship,
                format!(
                    "Replica {} exists for another relationship or other disks (enabled by {} from {}); remove it on the replica server first",
                    state.name, state.enabled_by, state.primary_host
                ),
            ));
        }
        replica
            .check_relationship(claim)
            .map_err(|e| store_refusal(&e))?;
        let mut replica = replica;
        if let Some(policy) = enable.recovery.filter(|p| *p != replica.state().recovery) {
            replica
                .set_recovery(policy)
                .map_err(|e| store_refusal(&e))?;
        }
        return Ok(json(StatusCode::OK, &replica.info()));
    }
    if enable.initial == InitialMethod::Existing {
        return Err(refuse(
            ErrorCode::NotFound,
            format!(
                "No existing copy of {} on this replica server; place one with `blkrep replica seed`, or enable with the network initial replication",
                enable.name
            ),
        ));
    }
    let needed: u64 = context.settings.reserve;
    let free = crate::store::free_space(&peer.storage).map_err(|e| store_refusal(&e))?;
    if free < needed {
        return Err(refuse(
            ErrorCode::InsufficientStorage,
            format!("{free} bytes free, {needed} kept in reserve"),
        ));
    }
    if let Some(quota) = peer.quota {
        let asked = enable
            .disks
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.size));
        let used = provisioned(context, &peer.storage);
        if used.saturating_add(asked) > quota {
            return Err(refuse(
                ErrorCode::InsufficientStorage,
                format!(
                    "The quota of this primary's storage is {quota} bytes of disks; its replicas have {used} and these disks need {asked} more"
                ),
            ));
        }
    }
    let mut state = ReplicaState::new(
        enable.name.clone(),
        peer.trust_group.clone(),
        claim,
        enable.primary_host,
        peer.identity.clone(),
        enable.disks,
    );
    state.awaiting_import = enable.initial == InitialMethod::Media;
    if let Some(policy) = enable.recovery {
        state.recovery = policy;
    }
    let replica =
        Replica::create(&dir, state, context.settings.reserve).map_err(|e| store_refusal(&e))?;
    info!(replica = %enable.name, identity = %peer.identity, trust_group = %peer.trust_group, "Replica created");
    let info = replica.info();
    lock(&context.replicas).insert(dir, Arc::new(Mutex::new(replica)));
    Ok(json(StatusCode::CREATED, &info))
}

/// The disk sizes of every replica in `storage`, added up.
fn provisioned(context: &Context, storage: &Path) -> u64 {
    let Ok(dirs) = std::fs::read_dir(storage) else {
        return 0;
    };
    dirs.flatten()
        .filter(|dir| Replica::exists(&dir.path()))
        .filter_map(|dir| load(context, &dir.path()).ok())
        .flat_map(|replica| {
            let sizes: Vec<u64> = lock(&replica)
                .state()
                .disks
                .iter()
                .map(|d| d.size)
                .collect();
            sizes
        })
        .fold(0u64, u64::saturating_add)
}

/// Gives a seeded existing copy to the enabling primary, if it asked for one and the
/// disks match.
fn claim_existing_copy(
    mut replica: std::sync::MutexGuard<'_, Replica>,
    peer: &Peer,
    enable: &EnableRequest,
    claim: Claim,
) -> Result<Answer, Refusal> {
    let state = replica.state();
    if enable.initial != InitialMethod::Existing {
        return Err(refuse(
            ErrorCode::OtherRelationship,
            format!(
                "Replica {} is an existing copy seeded on the replica server; enable with initial_replication = \"existing\" to use it, or remove it there",
                state.name
            ),
        ));
    }
    if state.disks != enable.disks {
        let describe = |disks: &[DiskInfo]| {
            disks
                .iter()
                .map(|d| format!("{} ({} bytes)", d.name, d.size))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(refuse(
            ErrorCode::OtherRelationship,
            format!(
                "The existing copy {} has disks {}; the primary has {}",
                state.name,
                describe(&state.disks),
                describe(&enable.disks)
            ),
        ));
    }
    replica
        .claim(claim, &enable.primary_host, &peer.identity)
        .map_err(|e| store_refusal(&e))?;
    info!(replica = %enable.name, identity = %peer.identity, "Existing copy claimed; blocks are compared before any is sent");
    Ok(json(StatusCode::OK, &replica.info()))
}

fn remove_replica(
    context: &Context,
    dir: &Path,
    replica: &Arc<Mutex<Replica>>,
) -> Result<Answer, Refusal> {
    let mut guard = lock(replica);
    // Out of the map first: whoever looks the name up from now on gets a new
    // replica or none, never this one.
    lock(&context.replicas).remove(dir);
    guard.remove().map_err(|e| store_refusal(&e))?;
    info!(replica = %guard.state().name, "Replica removed");
    Ok(json(StatusCode::OK, &serde_json::json!({})))
}
