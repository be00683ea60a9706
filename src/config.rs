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
    /// Disk groups (one per VM).
    #[serde(rename = "group", default)]
    pub groups: Vec<GroupConfig>,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

/// Where NBD clients connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// A unix socket path.
    pub unix_socket: Option<PathBuf>,
    /// A TCP address, e.g. `127.0.0.1:10809`.
    pub tcp: Option<String>,
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
    /// Who consumes closed cycles.
    pub consumer: Option<ConsumerConfig>,
    /// The group's disks.
    #[serde(rename = "disk", default)]
    pub disks: Vec<DiskConfig>,
}

fn default_ring_size() -> ByteSize {
    ByteSize(1 << 30)
}

fn default_block_size() -> ByteSize {
    ByteSize(4096)
}

fn default_interval() -> Interval {
    Interval(Duration::from_secs(300))
}

fn default_true() -> bool {
    true
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
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.into(),
            message: error.to_string(),
        })?;
        let problems = config.problems();
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
            if !group.tracking && group.consumer.is_some() {
                problems.push(format!("{at}: a consumer needs tracking = true"));
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
