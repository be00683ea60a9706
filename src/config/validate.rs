//! Loading the primary's configuration and checking it as a whole: every section's
//! problems are collected, each naming where it is written, so [`ConfigError::Invalid`]
//! lists them all at once. The `[nbd]` checks also load the TLS material, so a key that
//! does not match its certificate is caught here, not when the listener starts.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::{
    AppConsistentConfig, BandwidthWindow, ConfigError, ConsumerConfig, GroupConfig, NbdAccess,
    NbdConfig, NbdTlsMode, PrimaryConfig, ReplicaConsumer, RingFullSetting, MAX_THROTTLE_MAX_DELAY,
};

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

impl GroupConfig {
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
        let (levels, said) = self.compression_codec.levels();
        if let Some(level) = self
            .compression_level
            .filter(|level| !levels.iter().any(|range| range.contains(level)))
        {
            problems.push(format!("{at}: compression_level {level}: {said}"));
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
        schedule_problems(at, &self.bandwidth_schedule, &mut problems);
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

/// What is wrong with the windows of a `bandwidth_schedule` (days and times are
/// checked as they parse).
fn schedule_problems(at: &str, windows: &[BandwidthWindow], problems: &mut Vec<String>) {
    for (index, window) in windows.iter().enumerate() {
        let at = format!("{at} bandwidth_schedule window {}", index + 1);
        if window.days.is_empty() {
            problems.push(format!("{at}: days is empty (leave it out for every day)"));
        }
        if window.from == window.to {
            problems.push(format!(
                "{at}: from and to are both {} (a window needs a length)",
                window.from
            ));
        }
        if window.limit.0 < 4096 {
            problems.push(format!("{at}: limit must be at least 4KiB (per second)"));
        }
    }
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
        schedule_problems(
            "[replication]",
            &self.replication.bandwidth_schedule,
            &mut problems,
        );
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
}

/// A problem if the key file at `path` (`at` names it) cannot be read, or can be read
/// by anyone but its owner.
pub(crate) fn private_key_problem(at: &str, path: &Path) -> Option<String> {
    crate::key_files::check_private(path)
        .err()
        .map(|error| format!("{at}: {}", wire::error_chain(&error)))
}
