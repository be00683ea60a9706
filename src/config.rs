//! The primary's TOML configuration: parsed, then validated as a whole, so an admin
//! sees every problem with the file's own names before anything starts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Default control socket of the primary.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/blkrep/primary.sock";

/// Errors in a configuration file.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("Cannot read configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("Configuration {path} is not valid: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        message: String,
    },
    /// The file parses but says something impossible.
    #[error("Configuration {path} has {count} problem(s):\n  - {problems}", count = .problems.len(), problems = .problems.join("\n  - "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<String>,
    },
}

/// A size written as bytes (`4096`) or with a binary unit (`64MiB`, `1G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(bytes) => Ok(Self(bytes)),
            Raw::Text(text) => parse_size(&text)
                .map(Self)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `512`, `4KiB`, `64 MiB`, `1G`, `2TiB` (units are binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 4096, 4KiB, 64MiB, 1GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// An interval written as `30s`, `5m`, `15min`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map(Self).map_err(|error| {
            serde::de::Error::custom(format!(
                "{text:?} is not an interval ({error}); examples: 30s, 5m, 15m"
            ))
        })
    }
}

/// The whole primary configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrimaryConfig {
    /// Unix socket of the control API (`blkrep status`, `blkrep cycles close`).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// NBD listeners.
    pub nbd: NbdConfig,
    /// Settings shared by every group that replicates.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Prometheus metrics endpoint, e.g. `127.0.0.1:9441`.
    pub metrics: Option<String>,
    /// Disk groups (one per VM).
    #[serde(rename = "group", default)]
    pub groups: Vec<GroupConfig>,
}

/// Daemon-wide replication settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Bandwidth limit of all groups together, in bytes per second (`50MiB`).
    pub bandwidth_limit: Option<ByteSize>,
    /// The name this host gives the replica server (default: the host name).
    pub host_name: Option<String>,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// Where NBD clients connect, and who may. The replica daemon's `[nbd]` is the same
/// section (its unix socket has a default there).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// A unix socket path.
    pub unix_socket: Option<PathBuf>,
    /// A TCP address, e.g. `127.0.0.1:10809`.
    pub tcp: Option<String>,
    /// TLS on the TCP listener.
    #[serde(default)]
    pub tls: NbdTlsMode,
    /// The listener's certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM), private to the daemon's user.
    pub tls_key: Option<PathBuf>,
    /// CA that must have signed every client's certificate; none asks for no certificate.
    pub tls_ca: Option<PathBuf>,
    /// Mode of the unix socket file, in octal (`"0660"`); default `"0600"`.
    pub socket_mode: Option<String>,
    /// Group given the unix socket file (e.g. `libvirt-qemu`).
    pub socket_group: Option<String>,
    /// The validated TLS and socket settings, filled in by [`PrimaryConfig::parse`]
    /// (the replica keeps its own copy in its validated configuration).
    #[serde(skip)]
    pub access: NbdAccess,
}

/// `tls` of an `[nbd]` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTlsMode {
    /// Plaintext only (clients asking for TLS are refused).
    #[default]
    Off,
    /// Clients may upgrade to TLS; plaintext clients are served too.
    On,
    /// Clients must upgrade before any export is listed or opened.
    Require,
}

/// Validated `[nbd]` TLS and socket settings.
#[derive(Debug, Clone, Default)]
pub struct NbdAccess {
    /// What the TCP listener does with NBD_OPT_STARTTLS.
    pub tls: nbd_shim::TlsPolicy,
    /// Mode and group of the unix socket.
    pub socket: nbd_shim::SocketAccess,
    /// Valid but risky choices, for the log and `--check`.
    pub warnings: Vec<String>,
}

impl NbdConfig {
    /// Checks the TLS and socket settings as a whole (every problem goes to `problems`) and loads the
    /// TLS material, so a key that does not match its certificate is caught here.
    pub fn validate_access(&self, problems: &mut Vec<String>) -> Option<NbdAccess> {
        let before = problems.len();
        let mut warnings = Vec::new();
        let tls_files = [
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
            ("tls_ca", &self.tls_ca),
        ];
        let tls = match self.tls {
            NbdTlsMode::Off => {
                for (name, file) in tls_files {
                    if file.is_some() {
                        problems.push(format!(
                            "[nbd] {name} is set but tls = \"off\"; set tls = \"require\" (or \"on\") or remove it"
                        ));
                    }
                }
                let loopback = self
                    .tcp
                    .as_deref()
                    .and_then(|tcp| tcp.parse::<std::net::SocketAddr>().ok())
                    .is_none_or(|address| address.ip().is_loopback());
                if !loopback {
                    warnings.push(format!(
                        "[nbd] tcp = {:?} is not a loopback address and tls = \"off\": disk data and writes cross the network unencrypted and unauthenticated; set tls = \"require\" with tls_cert, tls_key and tls_ca",
                        self.tcp.as_deref().unwrap_or_default()
                    ));
                }
                Some(nbd_shim::TlsPolicy::Off)
            }
            mode => self.tls_policy(mode == NbdTlsMode::Require, problems),
        };
        let mode = match self.socket_mode.as_deref() {
            None => Some(nbd_shim::SocketAccess::default().mode),
            Some(text) => {
                let parsed = u32::from_str_radix(text.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|mode| *mode <= 0o777);
                if parsed.is_none() {
                    problems.push(format!(
                        "[nbd] socket_mode = {text:?} is not an octal mode like \"0600\" or \"0660\""
                    ));
                }
                parsed
            }
        };
        let group =
            self.socket_group.as_deref().and_then(|name| {
                match nix::unistd::Group::from_name(name) {
                    Ok(Some(group)) => Some(group.gid.as_raw()),
                    Ok(None) => {
                        problems.push(format!("[nbd] socket_group = {name:?}: no such group"));
                        None
                    }
                    Err(errno) => {
                        problems.push(format!("[nbd] socket_group = {name:?}: {errno}"));
                        None
                    }
                }
            });
        if problems.len() > before {
            return None;
        }
        Some(NbdAccess {
            tls: tls?,
            socket: nbd_shim::SocketAccess { mode: mode?, group },
            warnings,
        })
    }

    fn tls_policy(
        &self,
        required: bool,
        problems: &mut Vec<String>,
    ) -> Option<nbd_shim::TlsPolicy> {
        if self.tcp.is_none() {
            problems.push("[nbd] tls applies to the tcp listener; set tcp".into());
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            problems.push(
                "[nbd] tls needs tls_cert and tls_key (and tls_ca to require client certificates)"
                    .into(),
            );
            return None;
        };
        if let Some(problem) = private_key_problem("[nbd] tls_key", key) {
            problems.push(problem);
            return None;
        }
        match wire::tls::server_config_with_optional_client_ca(cert, key, self.tls_ca.as_deref()) {
            Ok(config) if required => Some(nbd_shim::TlsPolicy::Required(config)),
            Ok(config) => Some(nbd_shim::TlsPolicy::Optional(config)),
            Err(error) => {
                problems.push(format!("[nbd] TLS: {}", wire::error_chain(&error)));
                None
            }
        }
    }
}

/// One group: a VM whose disks close cycles together.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Group name.
    pub name: String,
    /// The log ring file.
    pub ring: PathBuf,
    /// Ring capacity.
    #[serde(default = "default_ring_size")]
    pub ring_size: ByteSize,
    /// Dirty-map granularity.
    #[serde(default = "default_block_size")]
    pub block_size: ByteSize,
    /// Replication interval.
    #[serde(default = "default_interval")]
    pub interval: Interval,
    /// Whether writes are tracked at all.
    #[serde(default = "default_true")]
    pub tracking: bool,
    /// What happens when the log ring is full.
    #[serde(default)]
    pub on_ring_full: RingFullSetting,
    /// With `on_ring_full = "throttle"`, the most a write is delayed waiting for ring
    /// space ([`DEFAULT_THROTTLE_MAX_DELAY`] if unset).
    pub throttle_max_delay: Option<Interval>,
    /// Who consumes closed cycles.
    pub consumer: Option<ConsumerConfig>,
    /// Application-consistent points (none without this section).
    pub app_consistent: Option<AppConsistentConfig>,
    /// The group's disks.
    #[serde(rename = "disk", default)]
    pub disks: Vec<DiskConfig>,
}

/// `on_ring_full`: what a group does when its log ring is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RingFullSetting {
    /// Track by dirty map and resync (the recovery point is lost until the resync
    /// ends); writes are never delayed.
    #[default]
    Bitmap,
    /// Slow writers, at most `throttle_max_delay` per write, to keep the log.
    Throttle,
}

/// The delay bound of `on_ring_full = "throttle"` when `throttle_max_delay` is unset.
/// A burst that fills the ring before the first acknowledgement waits for the
/// cycle holding it to ship, about `ring_size` / link bandwidth: 10 s covers a 1 GiB
/// ring (the default) on a 100 MiB/s link, and stays well below guests' I/O timeouts.
pub const DEFAULT_THROTTLE_MAX_DELAY: Duration = Duration::from_secs(10);

/// The largest `throttle_max_delay`: guests give up on an I/O after 30 s (Linux's
/// SCSI default), so a write must never wait that long.
pub const MAX_THROTTLE_MAX_DELAY: Duration = Duration::from_secs(20);

impl GroupConfig {
    /// The tracker's policy for a full ring.
    pub fn on_ring_full(&self) -> tracker::OnRingFull {
        match self.on_ring_full {
            RingFullSetting::Bitmap => tracker::OnRingFull::Bitmap,
            RingFullSetting::Throttle => tracker::OnRingFull::Throttle {
                max_delay: self
                    .throttle_max_delay
                    .map_or(DEFAULT_THROTTLE_MAX_DELAY, |delay| delay.0),
            },
        }
    }

    fn ring_full_problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match (self.on_ring_full, self.throttle_max_delay) {
            (RingFullSetting::Bitmap, Some(_)) => problems.push(format!(
                "{at}: throttle_max_delay applies only with on_ring_full = \"throttle\""
            )),
            (RingFullSetting::Throttle, Some(delay))
                if delay.0.is_zero() || delay.0 > MAX_THROTTLE_MAX_DELAY =>
            {
                problems.push(format!(
                    "{at}: throttle_max_delay must be above 0s and at most {} (guests time out I/O after 30s)",
                    humantime::format_duration(MAX_THROTTLE_MAX_DELAY)
                ));
            }
            _ => {}
        }
        if self.on_ring_full == RingFullSetting::Throttle && !self.tracking {
            problems.push(format!(
                "{at}: on_ring_full = \"throttle\" needs tracking = true"
            ));
        }
        problems
    }
}

fn default_ring_size() -> ByteSize {
    ByteSize(1 << 30)
}

/// A group's dirty-map block size unless configured (and that of a failed-over
/// group's live disks on the replica).
pub const DEFAULT_BLOCK_SIZE: u64 = 4096;

/// A group's replication interval unless configured (and that of a failed-over
/// group's live disks until replication is reversed with its own).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

fn default_block_size() -> ByteSize {
    ByteSize(DEFAULT_BLOCK_SIZE)
}

fn default_interval() -> Interval {
    Interval(DEFAULT_INTERVAL)
}

fn default_true() -> bool {
    true
}

/// Application-consistent points of a group: every so often the cycle closes between
/// a freeze and a thaw command (for QEMU guests, the guest agent's fsfreeze through
/// `virsh domfsfreeze` / `virsh domfsthaw`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConsistentConfig {
    /// Time between points; at least the group's interval.
    #[serde(default = "default_app_consistent_every")]
    pub every: Interval,
    /// Run before the cycle closes: program and arguments (no shell).
    pub freeze_command: Vec<String>,
    /// Run right after it closed, whenever the freeze command ran.
    pub thaw_command: Vec<String>,
    /// How long each command may take before it is killed (and counts as failed).
    #[serde(default = "default_app_consistent_timeout")]
    pub timeout: Interval,
}

fn default_app_consistent_every() -> Interval {
    Interval(Duration::from_secs(4 * 3600))
}

fn default_app_consistent_timeout() -> Interval {
    Interval(Duration::from_secs(60))
}

impl AppConsistentConfig {
    fn problems(&self, at: &str, interval: Duration, has_consumer: bool) -> Vec<String> {
        let mut problems = Vec::new();
        for (option, argv) in [
            ("freeze_command", &self.freeze_command),
            ("thaw_command", &self.thaw_command),
        ] {
            if argv.first().is_none_or(|program| program.trim().is_empty()) {
                problems.push(format!(
                    "{at}: app_consistent.{option} is empty; give the program and its arguments, e.g. [\"virsh\", \"domfsfreeze\", \"vm1\"]"
                ));
            }
        }
        if self.every.0 < interval {
            problems.push(format!(
                "{at}: app_consistent.every ({}) must be at least the interval ({})",
                humantime::format_duration(self.every.0),
                humantime::format_duration(interval)
            ));
        }
        if self.timeout.0.is_zero() {
            problems.push(format!("{at}: app_consistent.timeout must be above 0s"));
        }
        if !has_consumer {
            problems.push(format!(
                "{at}: app_consistent needs a [group.consumer] (cycles close only for one)"
            ));
        }
        problems
    }
}

/// A consumer of closed cycles.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ConsumerConfig {
    /// Apply each cycle to `DIR/<disk>.img`.
    LocalCopy {
        /// The directory holding the copies.
        dir: PathBuf,
    },
    /// Read each cycle fully and drop it (benchmarks).
    Discard,
    /// Ship each cycle to a replica server.
    Replica(Box<ReplicaConsumer>),
}

/// A replica server as the consumer of a group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConsumer {
    /// `https://host:port` (`http://` only with `psk_file`).
    pub url: String,
    /// CA certificate(s) that sign the replica server's certificate.
    pub ca: Option<PathBuf>,
    /// This primary's client certificate (chain).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Lab mode: plain HTTP authenticated by this pre-shared key file.
    pub psk_file: Option<PathBuf>,
    /// Lab mode: the identity the replica server authorises.
    pub identity: Option<String>,
    /// Compress chunks (DEFLATE): `"auto"` (when the link is slower than the
    /// compressor), `"on"` (`true`) or `"off"` (`false`).
    #[serde(default)]
    pub compression: CompressionSetting,
    /// DEFLATE level 1 (fastest) to 9 (smallest).
    #[serde(default = "default_compression_level")]
    pub compression_level: u32,
    /// Multiplies the retry delays (1.0 = 1, 2, 4, 8, 10 then 30 minutes).
    #[serde(default = "default_retry_scale")]
    pub retry_scale: f64,
    /// Bandwidth limit of this group, in bytes per second.
    pub bandwidth_limit: Option<ByteSize>,
    /// Local address to send from (a dedicated replication network).
    pub source_address: Option<std::net::IpAddr>,
    /// Time one request to the replica (a control exchange, one chunk) may take.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: Interval,
    /// Where the initial copy comes from: `network` (every allocated block is sent)
    /// or `existing` (a copy seeded on the replica server is compared block by block).
    #[serde(default)]
    pub initial_replication: wire::api::InitialMethod,
    /// Start the initial replication at this time (RFC 3339, e.g.
    /// `2026-11-24T02:00:00Z`) instead of at once.
    pub start_at: Option<String>,
    /// Additional recovery points the replica keeps besides the latest (0 to 24);
    /// unset leaves the replica's own setting.
    pub recovery_points: Option<u32>,
    /// Least time between two of them.
    #[serde(default = "default_recovery_point_spacing")]
    pub recovery_point_spacing: Interval,
}

fn default_recovery_point_spacing() -> Interval {
    Interval(Duration::from_secs(3600))
}

impl ReplicaConsumer {
    /// The recovery history to ask the replica for, if configured.
    pub fn recovery(&self) -> Option<wire::api::RecoveryPolicy> {
        self.recovery_points
            .map(|points| wire::api::RecoveryPolicy {
                points,
                spacing_secs: self.recovery_point_spacing.0.as_secs().max(1),
            })
    }
}

/// Whether a group's chunks are compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "CompressionWord")]
pub enum CompressionSetting {
    /// While compressing makes the transfer faster, measured as it goes.
    #[default]
    Auto,
    /// Always (chunks that do not compress are still sent stored).
    On,
    /// Never.
    Off,
}

/// How `compression` may be written.
#[derive(Deserialize)]
#[serde(untagged)]
enum CompressionWord {
    Flag(bool),
    Word(String),
}

impl TryFrom<CompressionWord> for CompressionSetting {
    type Error = String;

    fn try_from(word: CompressionWord) -> Result<Self, String> {
        match word {
            CompressionWord::Flag(true) => Ok(Self::On),
            CompressionWord::Flag(false) => Ok(Self::Off),
            CompressionWord::Word(word) => match word.as_str() {
                "auto" => Ok(Self::Auto),
                "on" => Ok(Self::On),
                "off" => Ok(Self::Off),
                _ => Err(format!(
                    "compression is \"auto\", \"on\" or \"off\", not {word:?}"
                )),
            },
        }
    }
}

impl ReplicaConsumer {
    /// How the shipping pipeline compresses this group's chunks.
    pub fn compression(&self) -> shipper::pipeline::compress::Compression {
        use shipper::pipeline::compress::Compression;
        match self.compression {
            CompressionSetting::Auto => Compression::Auto(self.compression_level),
            CompressionSetting::On => Compression::On(self.compression_level),
            CompressionSetting::Off => Compression::Off,
        }
    }
}

fn default_compression_level() -> u32 {
    1
}

fn default_request_timeout() -> Interval {
    Interval(shipper::remote::REQUEST_TIMEOUT)
}

fn default_retry_scale() -> f64 {
    1.0
}

impl ReplicaConsumer {
    /// What is wrong with the options, each naming `at` (where they are written).
    pub(crate) fn problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let https = self.url.starts_with("https://");
        let tls_files = [&self.ca, &self.cert, &self.key];
        if https {
            if tls_files.iter().any(|f| f.is_none()) {
                problems.push(format!("{at}: an https:// replica needs ca, cert and key"));
            }
            if self.psk_file.is_some() {
                problems.push(format!(
                    "{at}: psk_file is for the plain-HTTP lab mode only"
                ));
            }
        } else if self.url.starts_with("http://") {
            if self.psk_file.is_none() || self.identity.is_none() {
                problems.push(format!(
                    "{at}: a plain http:// replica (isolated labs only) needs psk_file and identity"
                ));
            }
        } else {
            problems.push(format!("{at}: url {:?} must start with https://", self.url));
        }
        for file in tls_files.into_iter().flatten() {
            if !file.is_file() {
                problems.push(format!("{at}: {} is not a readable file", file.display()));
            }
        }
        // The replica reads its keys under the same rules (`crate::key_files`).
        if let Some(Err(error)) = self.psk_file.as_deref().map(crate::key_files::read_psk) {
            problems.push(format!("{at} psk_file: {}", wire::error_chain(&error)));
        }
        if !(1..=9).contains(&self.compression_level) {
            problems.push(format!("{at}: compression_level is 1 to 9"));
        }
        if !(self.retry_scale > 0.0 && self.retry_scale <= 100.0) {
            problems.push(format!("{at}: retry_scale must be above 0 and at most 100"));
        }
        if self.request_timeout.0 < Duration::from_secs(1) {
            problems.push(format!("{at}: request_timeout must be at least 1s"));
        }
        if self.bandwidth_limit.is_some_and(|limit| limit.0 < 4096) {
            problems.push(format!(
                "{at}: bandwidth_limit must be at least 4KiB (per second)"
            ));
        }
        if let Some(problem) = self.recovery().and_then(|policy| policy.problem()) {
            problems.push(format!("{at}: {problem}"));
        }
        if self.recovery_point_spacing.0 < Duration::from_secs(1) {
            problems.push(format!("{at}: recovery_point_spacing must be at least 1s"));
        }
        if let Some(start) = &self.start_at {
            if humantime::parse_rfc3339_weak(start).is_err() {
                problems.push(format!(
                    "{at}: start_at {start:?} is not a time like 2026-11-24T02:00:00Z"
                ));
            }
        }
        problems
    }
}

/// A protected disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Export name.
    pub name: String,
    /// Raw image file or block device.
    pub image: PathBuf,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Open the image with O_DIRECT.
    #[serde(default)]
    pub direct: bool,
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !name.starts_with('.')
}

impl PrimaryConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.into(),
            message: error.to_string(),
        })?;
        let mut problems = config.problems();
        if let Some(access) = config.nbd.validate_access(&mut problems) {
            config.nbd.access = access;
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.into(),
                problems,
            })
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.nbd.unix_socket.is_none() && self.nbd.tcp.is_none() {
            problems.push("[nbd] needs unix_socket or tcp (or both)".into());
        }
        if let Some(address) = &self.nbd.tcp {
            if address.parse::<std::net::SocketAddr>().is_err() {
                problems.push(format!("[nbd] tcp = {address:?} is not an address:port"));
            }
        }
        if self.groups.is_empty() {
            problems.push("no [[group]] is configured".into());
        }
        if let Some(address) = &self.metrics {
            if address.parse::<std::net::SocketAddr>().is_err() {
                problems.push(format!("metrics = {address:?} is not an address:port"));
            }
        }
        if self
            .replication
            .bandwidth_limit
            .is_some_and(|limit| limit.0 < 4096)
        {
            problems
                .push("[replication] bandwidth_limit must be at least 4KiB (per second)".into());
        }
        let mut group_names = HashSet::new();
        let mut disk_names = HashSet::new();
        let mut rings = HashSet::new();
        for group in &self.groups {
            let at = format!("group {:?}", group.name);
            if !valid_name(&group.name) {
                problems.push(format!(
                    "{at}: names are 1-63 characters of A-Z a-z 0-9 . _ -"
                ));
            }
            if !group_names.insert(group.name.clone()) {
                problems.push(format!("{at} is configured twice"));
            }
            if !rings.insert(group.ring.clone()) {
                problems.push(format!(
                    "{at}: ring {} is used by another group",
                    group.ring.display()
                ));
            }
            if group.interval.0 < Duration::from_secs(1) {
                problems.push(format!("{at}: interval must be at least 1s"));
            }
            let ring = group.ring_size.0;
            if ring < tracker::group::MIN_RING_SIZE || ring % 4096 != 0 {
                problems.push(format!(
                    "{at}: ring_size must be a multiple of 4KiB and at least 4MiB"
                ));
            }
            let block = group.block_size.0;
            if !block.is_power_of_two() || !(512..=(1 << 30)).contains(&block) {
                problems.push(format!(
                    "{at}: block_size must be a power of two from 512 to 1GiB"
                ));
            }
            if group.disks.is_empty() {
                problems.push(format!("{at} has no [[group.disk]]"));
            }
            if group.disks.len() > tracker::superblock::MAX_DISKS {
                problems.push(format!(
                    "{at} has more than {} disks",
                    tracker::superblock::MAX_DISKS
                ));
            }
            problems.extend(group.ring_full_problems(&at));
            if !group.tracking && group.consumer.is_some() {
                problems.push(format!("{at}: a consumer needs tracking = true"));
            }
            if let Some(ConsumerConfig::Replica(replica)) = &group.consumer {
                problems.extend(replica.problems(&at));
            }
            if let Some(app) = &group.app_consistent {
                problems.extend(app.problems(&at, group.interval.0, group.consumer.is_some()));
            }
            for disk in &group.disks {
                let at = format!("{at}, disk {:?}", disk.name);
                if !valid_name(&disk.name) {
                    problems.push(format!(
                        "{at}: names are 1-63 characters of A-Z a-z 0-9 . _ -"
                    ));
                }
                if !disk_names.insert(disk.name.clone()) {
                    problems.push(format!("{at}: export name used twice"));
                }
                match std::fs::metadata(&disk.image) {
                    Err(error) => {
                        problems.push(format!("{at}: image {}: {error}", disk.image.display()))
                    }
                    Ok(meta)
                        if !(meta.is_file()
                            || std::os::unix::fs::FileTypeExt::is_block_device(
                                &meta.file_type(),
                            )) =>
                    {
                        problems.push(format!(
                            "{at}: image {} is neither a file nor a block device",
                            disk.image.display()
                        ));
                    }
                    Ok(_) => {}
                }
            }
        }
        problems
    }

    /// The group called `name`.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|group| group.name == name)
    }
}

/// A problem if the key file at `path` (`at` names it) cannot be read, or can be read
/// by anyone but its owner.
pub(crate) fn private_key_problem(at: &str, path: &Path) -> Option<String> {
    crate::key_files::check_private(path)
        .err()
        .map(|error| format!("{at}: {}", wire::error_chain(&error)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(image: &Path, extra: &str) -> String {
        format!(
            r#"
control_socket = "/tmp/ctl"
[nbd]
unix_socket = "/tmp/nbd.sock"
[[group]]
name = "vm1"
ring = "/tmp/vm1.ring"
ring_size = "64MiB"
interval = "30s"
{extra}
[[group.disk]]
name = "disk0"
image = "{}"
"#,
            image.display()
        )
    }

    #[test]
    fn parses_a_good_file() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let config = PrimaryConfig::parse(
            &sample(image.path(), "[group.consumer]\ntype = \"discard\""),
            Path::new("x"),
        )
        .unwrap();
        let group = &config.groups[0];
        assert_eq!(group.ring_size, ByteSize(64 << 20));
        assert_eq!(group.interval, Interval(Duration::from_secs(30)));
        assert!(matches!(group.consumer, Some(ConsumerConfig::Discard)));
    }

    #[test]
    fn reports_every_problem() {
        let text =
            sample(Path::new("/nonexistent/image"), "block_size = 1000").replace("30s", "0s");
        let error = PrimaryConfig::parse(&text, Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        for expected in [
            "interval must be at least 1s",
            "block_size must be a power of two",
            "/nonexistent/image",
        ] {
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn on_ring_full_defaults_to_bitmap_and_throttle_takes_a_bounded_delay() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let parse =
            |extra: &str| PrimaryConfig::parse(&sample(image.path(), extra), Path::new("p.toml"));
        let config = parse("").unwrap();
        assert_eq!(config.groups[0].on_ring_full(), tracker::OnRingFull::Bitmap);
        let config = parse("on_ring_full = \"throttle\"").unwrap();
        assert_eq!(
            config.groups[0].on_ring_full(),
            tracker::OnRingFull::Throttle {
                max_delay: DEFAULT_THROTTLE_MAX_DELAY
            }
        );
        let config = parse("on_ring_full = \"throttle\"\nthrottle_max_delay = \"500ms\"").unwrap();
        assert_eq!(
            config.groups[0].on_ring_full(),
            tracker::OnRingFull::Throttle {
                max_delay: Duration::from_millis(500)
            }
        );
        for (extra, expected) in [
            (
                "on_ring_full = \"block\"",
                "unknown variant `block`, expected `bitmap` or `throttle`",
            ),
            (
                "throttle_max_delay = \"1s\"",
                "throttle_max_delay applies only with on_ring_full = \"throttle\"",
            ),
            (
                "on_ring_full = \"throttle\"\nthrottle_max_delay = \"0s\"",
                "throttle_max_delay must be above 0s and at most 20s",
            ),
            (
                "on_ring_full = \"throttle\"\nthrottle_max_delay = \"1m\"",
                "throttle_max_delay must be above 0s and at most 20s",
            ),
            (
                "on_ring_full = \"throttle\"\ntracking = false",
                "on_ring_full = \"throttle\" needs tracking = true",
            ),
        ] {
            let error = parse(extra).unwrap_err().to_string();
            assert!(error.contains(expected), "{extra}: {error}");
        }
    }

    #[test]
    fn replica_consumers_need_credentials_that_exist() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let pem = tempfile::NamedTempFile::new().unwrap();
        let pem = pem.path().display();
        let good = format!(
            "[group.consumer]\ntype = \"replica\"\nurl = \"https://replica:8443\"\nca = \"{pem}\"\ncert = \"{pem}\"\nkey = \"{pem}\"\nbandwidth_limit = \"10MiB\"\nsource_address = \"127.0.0.1\"\nstart_at = \"2026-11-24T02:00:00Z\""
        );
        let config = PrimaryConfig::parse(&sample(image.path(), &good), Path::new("x")).unwrap();
        let Some(ConsumerConfig::Replica(replica)) = &config.groups[0].consumer else {
            panic!("not a replica consumer");
        };
        assert_eq!(replica.compression, CompressionSetting::Auto);
        assert_eq!(replica.bandwidth_limit, Some(ByteSize(10 << 20)));
        // The older true/false still work; anything else is refused by name.
        for (written, meant) in [
            ("true", CompressionSetting::On),
            ("false", CompressionSetting::Off),
            ("\"off\"", CompressionSetting::Off),
            ("\"auto\"", CompressionSetting::Auto),
        ] {
            let text = format!("{good}\ncompression = {written}");
            let config =
                PrimaryConfig::parse(&sample(image.path(), &text), Path::new("x")).unwrap();
            let Some(ConsumerConfig::Replica(replica)) = &config.groups[0].consumer else {
                panic!("not a replica consumer");
            };
            assert_eq!(replica.compression, meant, "{written}");
        }
        let text = format!("{good}\ncompression = \"zstd\"");
        let error = PrimaryConfig::parse(&sample(image.path(), &text), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("compression is \"auto\", \"on\" or \"off\""),
            "{error}"
        );
        let bad = "[group.consumer]\ntype = \"replica\"\nurl = \"http://replica:8443\"\nca = \"/nonexistent/ca.pem\"\ncompression_level = 12\nretry_scale = 0.0\nstart_at = \"tomorrow\"";
        let error = PrimaryConfig::parse(&sample(image.path(), bad), Path::new("x"))
            .unwrap_err()
            .to_string();
        for expected in [
            "needs psk_file and identity",
            "/nonexistent/ca.pem is not a readable file",
            "compression_level is 1 to 9",
            "retry_scale must be above 0",
            "start_at \"tomorrow\"",
        ] {
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    /// The primary reads its lab-mode key under the replica's rules.
    #[test]
    fn a_lab_key_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let image = tempfile::NamedTempFile::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("lab.psk");
        let consumer = format!(
            "[group.consumer]\ntype = \"replica\"\nurl = \"http://replica:8080\"\nidentity = \"vm-host\"\npsk_file = {key:?}"
        );
        let check = |text: &str, mode: u32| {
            std::fs::write(&key, text).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            PrimaryConfig::parse(&sample(image.path(), &consumer), Path::new("x"))
                .err()
                .map(|error| error.to_string())
        };
        assert_eq!(check("0123456789abcdef0123\n", 0o600), None);
        let open = check("0123456789abcdef0123\n", 0o644).unwrap();
        assert!(
            open.contains("is open to group or others (mode 0644)"),
            "{open}"
        );
        let short = check("0123456789\n", 0o600).unwrap();
        assert!(
            short.contains("has 10 bytes; it needs at least 16"),
            "{short}"
        );
    }

    #[test]
    fn application_consistent_points_are_optional_and_checked() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let config = PrimaryConfig::parse(
            &sample(image.path(), "[group.consumer]\ntype = \"discard\""),
            Path::new("x"),
        )
        .unwrap();
        assert!(config.groups[0].app_consistent.is_none());
        let good = "[group.consumer]\ntype = \"discard\"\n[group.app_consistent]\nfreeze_command = [\"virsh\", \"domfsfreeze\", \"vm1\"]\nthaw_command = [\"virsh\", \"domfsthaw\", \"vm1\"]";
        let config = PrimaryConfig::parse(&sample(image.path(), good), Path::new("x")).unwrap();
        let app = config.groups[0].app_consistent.as_ref().unwrap();
        assert_eq!(app.every, Interval(Duration::from_secs(4 * 3600)));
        assert_eq!(app.timeout, Interval(Duration::from_secs(60)));
        assert_eq!(app.freeze_command, ["virsh", "domfsfreeze", "vm1"]);
        let bad = "[group.app_consistent]\nevery = \"10s\"\ntimeout = \"0s\"\nfreeze_command = []\nthaw_command = [\"\"]";
        let error = PrimaryConfig::parse(&sample(image.path(), bad), Path::new("x"))
            .unwrap_err()
            .to_string();
        for expected in [
            "group \"vm1\": app_consistent.freeze_command is empty",
            "app_consistent.thaw_command is empty",
            "app_consistent.every (10s) must be at least the interval (30s)",
            "app_consistent.timeout must be above 0s",
            "app_consistent needs a [group.consumer]",
        ] {
            assert!(error.contains(expected), "{expected}: {error}");
        }
        let typo = "[group.app_consistent]\nfreeze = [\"x\"]";
        let error = PrimaryConfig::parse(&sample(image.path(), typo), Path::new("x")).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `freeze`"),
            "{error}"
        );
    }

    /// A lab CA and a certificate for 127.0.0.1 in `dir`, the key with `key_mode`.
    fn nbd_tls_files(dir: &Path, key_mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let ca = lab_ca::create_ca("nbd test CA").unwrap();
        let host = lab_ca::issue_host(&ca, &["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
        std::fs::write(dir.join("cert.pem"), &host.cert).unwrap();
        std::fs::write(dir.join("key.pem"), &host.key).unwrap();
        std::fs::set_permissions(
            dir.join("key.pem"),
            std::fs::Permissions::from_mode(key_mode),
        )
        .unwrap();
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\ntls_ca = {:?}\n",
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("ca.pem")
        )
    }

    fn with_nbd(image: &Path, nbd: &str) -> String {
        sample(image, "").replace(
            "unix_socket = \"/tmp/nbd.sock\"\n",
            &format!("unix_socket = \"/tmp/nbd.sock\"\n{nbd}"),
        )
    }

    #[test]
    fn nbd_tls_and_socket_access_are_validated_as_a_whole() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = nbd_tls_files(dir.path(), 0o600);
        let good = format!(
            "tcp = \"0.0.0.0:10809\"\ntls = \"require\"\n{files}socket_mode = \"0660\"\nsocket_group = \"root\"\n"
        );
        let config = PrimaryConfig::parse(&with_nbd(image.path(), &good), Path::new("x")).unwrap();
        assert!(matches!(
            config.nbd.access.tls,
            nbd_shim::TlsPolicy::Required(_)
        ));
        assert_eq!(config.nbd.access.socket.mode, 0o660);
        assert_eq!(config.nbd.access.socket.group, Some(0));
        assert!(config.nbd.access.warnings.is_empty());
        let on = good.replace("\"require\"", "\"on\"");
        let config = PrimaryConfig::parse(&with_nbd(image.path(), &on), Path::new("x")).unwrap();
        assert!(matches!(
            config.nbd.access.tls,
            nbd_shim::TlsPolicy::Optional(_)
        ));

        // Defaults: no TLS, 0600, no group; a loopback listener draws no warning.
        let plain = "tcp = \"127.0.0.1:10809\"\n";
        let config = PrimaryConfig::parse(&with_nbd(image.path(), plain), Path::new("x")).unwrap();
        assert!(matches!(config.nbd.access.tls, nbd_shim::TlsPolicy::Off));
        assert_eq!(config.nbd.access.socket, nbd_shim::SocketAccess::default());
        assert!(config.nbd.access.warnings.is_empty());
        let open = "tcp = \"0.0.0.0:10809\"\n";
        let config = PrimaryConfig::parse(&with_nbd(image.path(), open), Path::new("x")).unwrap();
        assert!(
            config.nbd.access.warnings[0].contains("unencrypted and unauthenticated"),
            "{:?}",
            config.nbd.access.warnings
        );

        let other_dir = tempfile::tempdir().unwrap();
        nbd_tls_files(other_dir.path(), 0o600);
        let mismatched = format!(
            "tcp = \"127.0.0.1:1\"\ntls = \"require\"\n{}",
            files.replace(
                &dir.path().join("key.pem").display().to_string(),
                &other_dir.path().join("key.pem").display().to_string()
            )
        );
        let error = PrimaryConfig::parse(&with_nbd(image.path(), &mismatched), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("[nbd] TLS: "), "{error}");

        let readable = tempfile::tempdir().unwrap();
        let readable_files = nbd_tls_files(readable.path(), 0o640);
        let bad = format!(
            "tls = \"on\"\n{readable_files}socket_mode = \"0999\"\nsocket_group = \"no-such-group-blkrep\"\n"
        );
        let error = PrimaryConfig::parse(&with_nbd(image.path(), &bad), Path::new("x"))
            .unwrap_err()
            .to_string();
        for expected in [
            "[nbd] tls applies to the tcp listener; set tcp",
            "is open to group or others (mode 0640)",
            "socket_mode = \"0999\" is not an octal mode",
            "socket_group = \"no-such-group-blkrep\": no such group",
        ] {
            assert!(error.contains(expected), "{expected}: {error}");
        }
        let stray = "tcp = \"127.0.0.1:1\"\ntls = \"require\"\ntls_ca = \"/x\"\n";
        let error = PrimaryConfig::parse(&with_nbd(image.path(), stray), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("tls needs tls_cert and tls_key"), "{error}");
        let off = format!("tcp = \"127.0.0.1:1\"\n{files}");
        let error = PrimaryConfig::parse(&with_nbd(image.path(), &off), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls_cert is set but tls = \"off\""),
            "{error}"
        );
        let typo = "tls = \"maybe\"\n";
        assert!(PrimaryConfig::parse(&with_nbd(image.path(), typo), Path::new("x")).is_err());
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let error = PrimaryConfig::parse("[nbd\n", Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("Configuration p.toml is not valid"),
            "{error}"
        );
        let image = tempfile::NamedTempFile::new().unwrap();
        let error = PrimaryConfig::parse(
            &sample(image.path(), "block_size = \"12 parsecs\""),
            Path::new("p"),
        )
        .unwrap_err();
        assert!(error.to_string().contains("unknown unit"), "{error}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    proptest! {
        #[test]
        fn parse_size_never_panics(text in ".{0,20}") {
            let _ = parse_size(&text);
        }

        #[test]
        fn parse_size_round_trips(number in 0u64..(1 << 20), unit in 0usize..5) {
            let names = ["", "KiB", "MiB", "GiB", "TiB"];
            prop_assert_eq!(parse_size(&format!("{number}{}", names[unit])), Ok(number << (10 * unit)));
        }
    }
}
