//! The primary's TOML configuration: parsed, then validated as a whole, so an admin
//! sees every problem with the file's own names before anything starts.
//!
//! The types here are the file's schema, with their defaults; [`validate`] loads a file
//! and checks it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use shipper::remote::{BandwidthSchedule, SystemClock, Throttle, TimeOfDay, Weekday, Window};
use thiserror::Error;

mod validate;

pub(crate) use validate::private_key_problem;

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
    /// Where health changes, resyncs, suspensions and failovers are appended as JSON
    /// lines (`crate::events`), e.g. `/var/log/blkrep/events.jsonl`.
    pub event_log: Option<PathBuf>,
    /// Disk groups (one per VM).
    #[serde(rename = "group", default)]
    pub groups: Vec<GroupConfig>,
}

/// Daemon-wide replication settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Bandwidth limit of all groups together, in bytes per second (`50MiB`).
    pub bandwidth_limit: Option<ByteSize>,
    /// Limits of all groups together by time of day, over `bandwidth_limit`.
    #[serde(default)]
    pub bandwidth_schedule: Vec<BandwidthWindow>,
    /// The name this host gives the replica server (default: the host name).
    pub host_name: Option<String>,
    /// How many nice steps the shipping threads run below the NBD connection threads.
    #[serde(default)]
    pub background_nice: BackgroundNice,
}

/// Nice steps between the threads serving VMs' I/O and replication's threads (0-19,
/// default 10; see `base::priority`). Applies at the daemon's next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundNice(pub u8);

impl Default for BackgroundNice {
    fn default() -> Self {
        Self(base::priority::DEFAULT_BACKGROUND_NICE)
    }
}

impl<'de> Deserialize<'de> for BackgroundNice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let steps = i64::deserialize(deserializer)?;
        u8::try_from(steps)
            .ok()
            .filter(|steps| *steps <= base::priority::MAX_BACKGROUND_NICE)
            .map(Self)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "background_nice {steps} is not a number of nice steps from 0 to {}",
                    base::priority::MAX_BACKGROUND_NICE
                ))
            })
    }
}

impl BackgroundNice {
    /// Makes it the daemon's: background threads started from now on use it.
    pub fn apply(self) {
        if let Err(error) = base::priority::set_background_nice(self.0) {
            tracing::warn!(%error, "Cannot read this process's CPU priority; replication threads run at the same priority as the VMs' I/O");
        }
    }
}

impl ReplicationConfig {
    /// The daemon-wide throttle, if any limit is configured.
    pub fn throttle(&self) -> Option<Arc<Throttle>> {
        throttle(self.bandwidth_limit, &self.bandwidth_schedule)
    }
}

/// One window of a `bandwidth_schedule`, in the host's local time. The first window
/// that contains the time sets the limit; outside all of them `bandwidth_limit`
/// applies (or none). A window whose `to` is before its `from` crosses midnight and
/// belongs to the day it starts on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthWindow {
    /// The days the window starts on (`mon` to `sun`; default every day).
    #[serde(default = "every_day")]
    pub days: Vec<Weekday>,
    /// Start, `HH:MM` (or `HH:MM:SS`), inclusive.
    pub from: TimeOfDay,
    /// End, exclusive; `24:00` is midnight at the end of the day.
    pub to: TimeOfDay,
    /// Bytes per second inside the window.
    pub limit: ByteSize,
}

fn every_day() -> Vec<Weekday> {
    Weekday::ALL.to_vec()
}

/// A throttle for a plain limit and a schedule over it; `None` when neither is set.
pub fn throttle(limit: Option<ByteSize>, schedule: &[BandwidthWindow]) -> Option<Arc<Throttle>> {
    if limit.is_none() && schedule.is_empty() {
        return None;
    }
    let schedule = BandwidthSchedule {
        windows: schedule
            .iter()
            .map(|window| Window {
                days: window.days.clone(),
                from: window.from,
                to: window.to,
                limit: window.limit.0,
            })
            .collect(),
        otherwise: limit.map(|limit| limit.0),
    };
    Some(Arc::new(Throttle::scheduled(
        schedule,
        Arc::new(SystemClock::default()),
    )))
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

/// One group: a VM whose disks close cycles together.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

/// A consumer of closed cycles.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
    /// Compress chunks: `"auto"` (when the link is slower than the compressor),
    /// `"on"` (`true`) or `"off"` (`false`).
    #[serde(default)]
    pub compression: CompressionSetting,
    /// The codec: `"zstd"` (used when the replica decodes it, DEFLATE otherwise) or
    /// `"deflate"`.
    #[serde(default)]
    pub compression_codec: CompressionCodec,
    /// The codec's level: zstd 1 to 19 or a fast level -1 to -7 (default
    /// [`DEFAULT_ZSTD_LEVEL`]); DEFLATE 1 (fastest) to 9 (smallest) (default 1).
    pub compression_level: Option<i32>,
    /// Multiplies the retry delays (1.0 = 1, 2, 4, 8, 10 then 30 minutes).
    #[serde(default = "default_retry_scale")]
    pub retry_scale: f64,
    /// Bandwidth limit of this group, in bytes per second.
    pub bandwidth_limit: Option<ByteSize>,
    /// Limits of this group by time of day, over `bandwidth_limit`.
    #[serde(default)]
    pub bandwidth_schedule: Vec<BandwidthWindow>,
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

/// Which codec compresses a group's chunks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionCodec {
    /// zstd (RFC 8878), when the replica decodes it.
    #[default]
    Zstd,
    /// DEFLATE (RFC 1951), which every replica decodes.
    Deflate,
}

/// zstd's level unless configured. Measured on 64 MiB in 2 MiB blocks: on fio's
/// 50%-compressible buffers -1 ran 1.8 times as fast as level 1 at the same ratio
/// (0.504); on executables as fast, at 0.299 against 0.275. Replication shares the
/// host's cores with its VMs, so the fast level.
pub const DEFAULT_ZSTD_LEVEL: i32 = -1;
/// DEFLATE's level unless configured.
pub const DEFAULT_DEFLATE_LEVEL: i32 = 1;

impl CompressionCodec {
    /// The levels it takes, for validation and its message.
    pub fn levels(self) -> (&'static [std::ops::RangeInclusive<i32>], &'static str) {
        match self {
            Self::Zstd => (
                &[-7..=-1, 1..=19],
                "zstd levels are 1 to 19 and the fast levels -1 to -7",
            ),
            Self::Deflate => (&[1..=9], "DEFLATE levels are 1 to 9"),
        }
    }
}

impl ReplicaConsumer {
    /// The codec and its level; the level as configured, which validation checks.
    pub fn codec(&self) -> wire::chunk::Codec {
        use wire::chunk::Codec;
        match self.compression_codec {
            CompressionCodec::Zstd => Codec::Zstd {
                level: self.compression_level.unwrap_or(DEFAULT_ZSTD_LEVEL),
            },
            CompressionCodec::Deflate => Codec::Deflate {
                level: self
                    .compression_level
                    .unwrap_or(DEFAULT_DEFLATE_LEVEL)
                    .clamp(1, 9)
                    .unsigned_abs(),
            },
        }
    }

    /// How the shipping pipeline compresses this group's chunks.
    pub fn compression(&self) -> shipper::pipeline::compress::Compression {
        use shipper::pipeline::compress::Compression;
        match self.compression {
            CompressionSetting::Auto => Compression::Auto(self.codec()),
            CompressionSetting::On => Compression::On(self.codec()),
            CompressionSetting::Off => Compression::Off,
        }
    }
}

fn default_request_timeout() -> Interval {
    Interval(shipper::remote::REQUEST_TIMEOUT)
}

fn default_retry_scale() -> f64 {
    1.0
}

/// A protected disk.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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

impl PrimaryConfig {
    /// The group called `name`.
    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|group| group.name == name)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
