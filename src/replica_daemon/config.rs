//! The replica daemon's TOML configuration: parsed, then validated as a whole (every
//! problem listed with the file's own names), then turned into what the server needs.
//! Validation reads the TLS material or the pre-shared key, so `--check` catches a key
//! that does not match its certificate or a key file others can read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use replica::limits::Limits;
use replica::server::{
    authorization_problems, AuthEntry, PreSharedKey, ServerSettings, Transport,
    DEFAULT_MAX_DISK_SIZE,
};
use serde::Deserialize;
use wire::api::valid_name;
use wire::error_chain;
use wire::tls::{server_config, NamePattern, TlsFiles};

use crate::config::{private_key_problem, ByteSize, ConfigError, NbdAccess, NbdConfig};

/// Default control socket of the replica daemon.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/blkrep/replica.sock";
/// Default free space kept in reserve on each storage.
pub const DEFAULT_RESERVE: u64 = 1 << 30;
/// Default unix socket serving failover and test failover disks over NBD.
pub const DEFAULT_NBD_SOCKET: &str = "/run/blkrep/replica-nbd.sock";

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    metrics: Option<String>,
    #[serde(default = "default_reserve")]
    reserve: ByteSize,
    #[serde(default = "default_max_disk_size")]
    max_disk_size: ByteSize,
    #[serde(default = "default_control_socket")]
    control_socket: PathBuf,
    tls: Option<RawTls>,
    plain_http: Option<RawPlainHttp>,
    #[serde(default)]
    authorization: Vec<RawAuthorization>,
    /// Where the disks of a test failover or failover are served: the primary's
    /// `[nbd]` section, with a default unix socket.
    #[serde(default)]
    nbd: NbdConfig,
    failover: Option<RawFailover>,
    #[serde(default)]
    limits: RawLimits,
    event_log: Option<PathBuf>,
    #[serde(default)]
    background_nice: crate::config::BackgroundNice,
}

/// What peers may hold of the server; every field defaults to
/// [`replica::limits::Limits::default`]'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_uploads_per_primary: Option<usize>,
    handshake_timeout: Option<crate::config::Interval>,
    body_timeout: Option<crate::config::Interval>,
}

impl RawLimits {
    fn validate(&self, problems: &mut Vec<String>) -> Limits {
        let defaults = Limits::default();
        let limits = Limits {
            max_connections: self.max_connections.unwrap_or(defaults.max_connections),
            max_connections_per_address: self
                .max_connections_per_address
                .unwrap_or(defaults.max_connections_per_address),
            max_uploads_per_primary: self
                .max_uploads_per_primary
                .unwrap_or(defaults.max_uploads_per_primary),
            handshake_timeout: self
                .handshake_timeout
                .map_or(defaults.handshake_timeout, |interval| interval.0),
            body_timeout: self
                .body_timeout
                .map_or(defaults.body_timeout, |interval| interval.0),
        };
        for (name, value) in [
            ("max_connections", limits.max_connections),
            (
                "max_connections_per_address",
                limits.max_connections_per_address,
            ),
            ("max_uploads_per_primary", limits.max_uploads_per_primary),
        ] {
            if value == 0 {
                problems.push(format!("[limits] {name} must be at least 1"));
            }
        }
        if limits.max_connections_per_address > limits.max_connections {
            problems.push(format!(
                "[limits] max_connections_per_address ({}) is more than max_connections ({})",
                limits.max_connections_per_address, limits.max_connections
            ));
        }
        for (name, value) in [
            ("handshake_timeout", limits.handshake_timeout),
            ("body_timeout", limits.body_timeout),
        ] {
            if value < std::time::Duration::from_secs(1) {
                problems.push(format!("[limits] {name} must be at least 1s"));
            }
        }
        limits
    }
}

/// What runs after a failover.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    hook: Option<Vec<String>>,
    #[serde(default = "default_hook_timeout")]
    hook_timeout: crate::config::Interval,
    #[serde(default = "default_live_ring_size")]
    live_ring_size: ByteSize,
}

fn default_live_ring_size() -> ByteSize {
    ByteSize(DEFAULT_LIVE_RING_SIZE)
}

/// The log ring of a failed-over group's live disks, unless configured: the writes
/// it holds since the failover ship as deltas once replication is reversed; past
/// that, the disks are tracked by dirty maps and their marked blocks compared.
pub const DEFAULT_LIVE_RING_SIZE: u64 = 256 << 20;

fn default_hook_timeout() -> crate::config::Interval {
    crate::config::Interval(std::time::Duration::from_secs(300))
}

fn default_nbd_socket() -> PathBuf {
    PathBuf::from(DEFAULT_NBD_SOCKET)
}

fn default_reserve() -> ByteSize {
    ByteSize(DEFAULT_RESERVE)
}

fn default_max_disk_size() -> ByteSize {
    ByteSize(DEFAULT_MAX_DISK_SIZE)
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlainHttp {
    /// Where the single key of earlier versions was: now each entry has its own.
    psk_file: Option<PathBuf>,
    #[serde(default)]
    allow_non_loopback: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthorization {
    primary: Option<String>,
    storage: PathBuf,
    trust_group: String,
    quota: Option<ByteSize>,
    psk_file: Option<PathBuf>,
}

/// A valid replica configuration.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Where primaries connect.
    pub listen: SocketAddr,
    /// Where Prometheus scrapes, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Free space kept in reserve on each storage, in bytes.
    pub reserve: u64,
    /// The largest replica disk accepted, in bytes.
    pub max_disk_size: u64,
    /// Unix socket of the control API (`blkrep replica status`).
    pub control_socket: PathBuf,
    /// TLS, or lab mode's plain HTTP with its key read from the file.
    pub transport: Transport,
    /// Authorisation entries, in the file's order.
    pub authorization: Vec<AuthEntry>,
    /// Unix socket serving test failover disks over NBD.
    pub nbd_unix_socket: PathBuf,
    /// TCP address serving them too.
    pub nbd_tcp: Option<SocketAddr>,
    /// TLS of the TCP listener, mode and group of the unix socket.
    pub nbd_access: NbdAccess,
    /// Runs after each failover, with the point's metadata in its environment.
    pub failover_hook: Option<FailoverHook>,
    /// Size of the log ring created for a failed-over group's live disks.
    pub live_ring_size: u64,
    /// What is allowed but probably not meant (printed by `--check` and logged at
    /// start).
    pub warnings: Vec<String>,
    /// What peers may hold of the server.
    pub limits: Limits,
    /// Where refusals and failovers are appended as JSON lines (`crate::events`).
    pub event_log: Option<PathBuf>,
    /// Nice steps the receiving and applying threads run below the NBD connection
    /// threads of test failovers and live groups.
    pub background_nice: crate::config::BackgroundNice,
}

/// A command run after a failover (program and arguments, no shell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverHook {
    /// The command.
    pub command: Vec<String>,
    /// How long it may run before it is killed.
    pub timeout: std::time::Duration,
}

impl ReplicaConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&read(path)?, path)
    }

    /// Parses and validates configuration text; `path` names it in errors. Files it
    /// names (TLS material, the key file) are read.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw = parse_raw(text, path)?;
        let mut problems = Vec::new();
        let config = raw.validate(&mut problems);
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                path: path.into(),
                problems,
            }),
        }
    }

    /// What the server needs.
    pub fn settings(&self) -> ServerSettings {
        ServerSettings {
            listen: self.listen,
            transport: self.transport.clone(),
            authorization: self.authorization.clone(),
            reserve: self.reserve,
            max_disk_size: self.max_disk_size,
            limits: self.limits,
        }
    }
}

/// The control socket a configuration file names, without validating the rest (the
/// status command needs no keys).
pub fn control_socket(path: &Path) -> Result<PathBuf, ConfigError> {
    Ok(parse_raw(&read(path)?, path)?.control_socket)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|error| ConfigError::Syntax {
        path: path.into(),
        message: error.to_string(),
    })
}

fn address(what: &str, text: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    let parsed = text.parse::<SocketAddr>();
    if parsed.is_err() {
        problems.push(format!(
            "{what} = {text:?} is not an address:port (examples: 0.0.0.0:8443, [::]:8443)"
        ));
    }
    parsed.ok()
}

/// A lab-mode key (`at` names its setting), read under the primary's rules
/// ([`crate::key_files::read_psk`]).
fn read_psk(at: &str, path: &Path, problems: &mut Vec<String>) -> Option<PreSharedKey> {
    let key = crate::key_files::read_psk(path)
        .map_err(|error| problems.push(format!("{at}: {}", error_chain(&error))))
        .ok()?;
    // `read_psk` enforced the minimum length `new` checks.
    PreSharedKey::new(key)
}

impl RawConfig {
    /// The valid configuration, or `None` with the reasons in `problems`.
    fn validate(self, problems: &mut Vec<String>) -> Option<ReplicaConfig> {
        let listen = address("listen", &self.listen, problems);
        let metrics = match &self.metrics {
            Some(text) => address("metrics", text, problems).map(Some),
            None => Some(None),
        };
        if let (Some(listen), Some(Some(metrics))) = (listen, metrics) {
            // Port 0 asks the kernel for a free port: two of them never collide.
            if listen == metrics && listen.port() != 0 {
                problems.push(format!(
                    "metrics and listen are both {listen}; metrics needs its own port"
                ));
            }
        }
        let transport = match (&self.tls, &self.plain_http) {
            (Some(_), Some(_)) => {
                problems.push(
                    "both [tls] and [plain_http] are set; choose one ([plain_http] is for isolated labs only)".into(),
                );
                None
            }
            (None, None) => {
                problems.push(
                    "no transport: add [tls] with cert, key and ca (or [plain_http] with psk_file, for an isolated lab)".into(),
                );
                None
            }
            (Some(tls), None) => {
                if let Some(problem) = private_key_problem("[tls] key", &tls.key) {
                    problems.push(problem);
                }
                let files = TlsFiles {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                    ca: tls.ca.clone(),
                };
                match server_config(&files) {
                    Ok(config) => Some(Transport::Tls(config)),
                    Err(error) => {
                        problems.push(format!("[tls]: {}", error_chain(&error)));
                        None
                    }
                }
            }
            (None, Some(plain)) => {
                if plain.psk_file.is_some() {
                    problems.push("[plain_http] psk_file: lab mode now has a key per authorization entry, bound to its primary names; move psk_file into each [[authorization]] entry (with a key of its own)".into());
                }
                if let Some(listen) = listen.filter(|l| !l.ip().is_loopback()) {
                    if !plain.allow_non_loopback {
                        problems.push(format!(
                            "listen = {listen} is not a loopback address: plain HTTP would carry keys and replicated data unencrypted over the network; use [tls], listen on 127.0.0.1, or (isolated labs only) set allow_non_loopback = true in [plain_http]"
                        ));
                    }
                }
                Some(Transport::PlainWithPsk {
                    allow_non_loopback: plain.allow_non_loopback,
                })
            }
        };
        let mut warnings = Vec::new();
        let authorization = self.authorization(self.plain_http.is_some(), problems, &mut warnings);
        let nbd_tcp = match &self.nbd.tcp {
            Some(text) => address("[nbd] tcp", text, problems).map(Some),
            None => Some(None),
        };
        let nbd_access = self.nbd.validate_access(problems);
        let failover_hook = self.failover.as_ref().and_then(|failover| {
            Some(FailoverHook {
                command: failover.hook.clone()?,
                timeout: failover.hook_timeout.0,
            })
        });
        let live_ring_size = self
            .failover
            .as_ref()
            .map_or(DEFAULT_LIVE_RING_SIZE, |failover| failover.live_ring_size.0);
        if live_ring_size < tracker::group::MIN_RING_SIZE || live_ring_size % 4096 != 0 {
            problems.push(format!(
                "[failover] live_ring_size must be a multiple of 4KiB and at least {}MiB",
                tracker::group::MIN_RING_SIZE >> 20
            ));
        }
        if let Some(hook) = &failover_hook {
            if hook.command.first().is_none_or(String::is_empty) {
                problems.push("[failover] hook is empty: give a program and its arguments, e.g. [\"/etc/blkrep/after-failover\"]".into());
            }
            if hook.timeout.is_zero() {
                problems.push("[failover] hook_timeout must be more than zero".into());
            }
        }
        let limits = self.limits.validate(problems);
        Some(ReplicaConfig {
            event_log: self.event_log.clone(),
            background_nice: self.background_nice,
            limits,
            failover_hook,
            live_ring_size,
            nbd_unix_socket: self.nbd.unix_socket.unwrap_or_else(default_nbd_socket),
            nbd_tcp: nbd_tcp?,
            nbd_access: nbd_access?,
            listen: listen?,
            metrics: metrics?,
            reserve: self.reserve.0,
            max_disk_size: self.max_disk_size.0,
            warnings,
            control_socket: self.control_socket,
            transport: transport?,
            authorization,
        })
    }

    fn authorization(
        &self,
        plain: bool,
        problems: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> Vec<AuthEntry> {
        if self.authorization.is_empty() {
            problems.push(
                "no [[authorization]] entry: no primary could replicate here; add one with primary, storage and trust_group".into(),
            );
        }
        let mut entries: Vec<AuthEntry> = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (index, raw) in self.authorization.iter().enumerate() {
            let number = index + 1;
            let at = match &raw.primary {
                Some(primary) => format!("[[authorization]] {number} (primary {primary:?})"),
                None => format!("[[authorization]] {number} (any primary)"),
            };
            if let Some(first) = catch_all {
                problems.push(format!(
                    "{at} comes after [[authorization]] {first}, which has no primary and so allows every authenticated primary: entries are tried in order, so this one would never be used; put the entry without primary last"
                ));
            }
            let primary = match raw.primary.as_deref().map(NamePattern::parse) {
                None => {
                    catch_all.get_or_insert(number);
                    None
                }
                Some(Ok(pattern)) => {
                    if let Some(same) = entries
                        .iter()
                        .position(|e| e.primary.as_ref() == Some(&pattern))
                    {
                        problems.push(format!(
                            "{at}: [[authorization]] {} already has this primary, so this entry would never be used",
                            same + 1
                        ));
                    } else if let Some(wider) = entries.iter().position(|e| {
                        e.primary
                            .as_ref()
                            .is_some_and(|earlier| earlier.covers(&pattern))
                    }) {
                        warnings.push(format!(
                            "{at}: [[authorization]] {} comes first and allows every name this entry allows, so this entry is never used; put the narrower entry first",
                            wider + 1
                        ));
                    }
                    Some(pattern)
                }
                Some(Err(message)) => {
                    problems.push(format!("{at}: {message}"));
                    None
                }
            };
            if !valid_name(&raw.trust_group) {
                problems.push(format!(
                    "{at}: trust_group {:?} is not a name (1-64 characters of A-Z a-z 0-9 . _ -, not starting with a dot)",
                    raw.trust_group
                ));
            }
            if raw.storage.as_os_str().is_empty() {
                problems.push(format!("{at}: storage is empty"));
            }
            if raw.quota.is_some_and(|quota| quota.0 == 0) {
                problems.push(format!("{at}: quota must be more than zero"));
            }
            if plain && raw.primary.is_none() {
                problems.push(format!(
                    "{at}: in lab mode each key is bound to the primary names of its entry, so every entry names its primary"
                ));
            }
            if plain && raw.psk_file.is_none() {
                problems.push(format!(
                    "{at}: in lab mode every entry needs psk_file, a key of its own (e.g. `openssl rand -hex 32`)"
                ));
            }
            let psk = match &raw.psk_file {
                Some(path) if plain => read_psk(&format!("{at} psk_file"), path, problems),
                Some(_) => {
                    problems.push(format!(
                        "{at}: psk_file is for the plain-HTTP lab mode only; with [tls] a primary proves its name with its certificate"
                    ));
                    None
                }
                None => None,
            };
            entries.push(AuthEntry {
                primary,
                storage: raw.storage.clone(),
                trust_group: raw.trust_group.clone(),
                quota: raw.quota.map(|quota| quota.0),
                psk,
            });
        }
        // Lab mode's own rules are checked above, with the file's names.
        problems.extend(authorization_problems(&entries, false));
        entries
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
