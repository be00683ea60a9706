//! The `blkrep replica ...` commands: the daemon itself (`run`), and those that talk
//! to it over its control socket or work on its storage directly (`seed`).

use super::failover::pick;
use super::live::ReverseTarget;
use super::render::{format_ms, point_kind};
use super::run;
use replica::server::Transport;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use wire::api::ReplicaInfo;

use anyhow::Context as _;

use super::config::{self, ReplicaConfig};
use super::protocol::{
    call, call_typed, FailedOverTo, HandedBack, Imported, ReplicaRequest, TestStarted,
};
use super::render::{render_live, render_points, render_status};
use super::DaemonError;
use crate::control;
use base::time::unix_secs;

/// How long a status request may take.
pub(super) const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an import may take: it reads and stores the whole initial copy.
pub(super) const IMPORT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long starting or stopping a test failover may take (it waits for an apply, and
/// merges the test's undo data).
pub(super) const TEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a planned failover may take: it compares every block of both sides.
pub(super) const PLANNED_FAILOVER_TIMEOUT: Duration = control::EXPORT_TIMEOUT;

/// `blkrep replica ...`
#[derive(Debug, clap::Subcommand)]
pub enum ReplicaCommand {
    /// Run the replica daemon: receive replicas from authorised primaries and apply
    /// them (SIGTERM/SIGINT: clean shutdown).
    Run {
        /// The replica's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Check the configuration (TLS material or key file included) and exit.
        #[arg(long)]
        check: bool,
    },
    /// Show the running replica daemon's replicas.
    Status {
        /// The replica's configuration (its control socket is read from it).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The replica daemon's control socket [default: /run/blkrep/replica.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Import the initial copy a primary exported to external media
    /// (`blkrep replication export`) into its replica; replication then resumes.
    Import {
        /// The replica's configuration (its control socket is read from it).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The replica daemon's control socket [default: /run/blkrep/replica.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The group's export directory on the media.
        dir: PathBuf,
    },
    /// Pause replication into a replica: transfers are refused and the primary
    /// retries every interval (its health turns Warning), until `resume`.
    Pause(OneReplica),
    /// Resume replication into a replica paused on this side.
    Resume(OneReplica),
    /// List a replica's recovery points (the ids `test-failover --point` takes).
    Points {
        #[command(flatten)]
        target: OneReplica,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fail over to a replica (the primary is lost): fence its former primary off,
    /// bring the disks to a recovery point (the latest by default) and serve them as
    /// the group's live disks. Another point may be chosen until `complete-failover`.
    Failover {
        #[command(flatten)]
        target: OneReplica,
        /// The recovery point (an id from `blkrep replica points`).
        #[arg(long)]
        point: Option<u64>,
    },
    /// Complete a failover: the point chosen stays, the other recovery points are
    /// deleted.
    CompleteFailover(OneReplica),
    /// Failback: planned failover of a failed-over group's live disks to the replica
    /// server they replicate back to (`reverse`). Refuses while NBD clients are
    /// connected (unless --force), then refuses writes, ships every change, compares
    /// every block of both sides and hands the group over; these disks then wait as
    /// an existing copy for replication from the new primary, so no full copy is sent.
    PlannedFailover {
        #[command(flatten)]
        target: OneReplica,
        /// Go ahead while NBD clients are connected (their writes fail from then on).
        #[arg(long)]
        force: bool,
    },
    /// Reverse replication: replicate a failed-over group's live disks back to the
    /// replica server at the old site, where the old primary's disks were placed as an
    /// existing copy (`blkrep replica seed` there); blocks are compared and only those
    /// that differ are sent.
    Reverse {
        #[command(flatten)]
        target: OneReplica,
        /// The replica server to replicate to (`https://host:port`).
        #[arg(long)]
        url: String,
        /// CA certificate(s) that sign that server's certificate.
        #[arg(long)]
        ca: PathBuf,
        /// This host's client certificate, which that server authorises.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key.
        #[arg(long)]
        key: PathBuf,
        /// Replication interval.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Set how many additional recovery points a replica keeps, and how far apart.
    Recovery {
        #[command(flatten)]
        target: OneReplica,
        /// Additional points kept besides the latest (0 to 24).
        #[arg(long)]
        points: u32,
        /// Least time between two points (e.g. 1h, 15m).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        spacing: Duration,
    },
    /// Test failover: serve a recovery point's disks as writable NBD exports (writes
    /// go to throwaway overlays) while replication goes on.
    #[command(subcommand)]
    TestFailover(TestFailoverCommand),
    /// Place an existing copy of a group's disks (a restored backup, an old replica)
    /// on this replica server, so that the primary's initial replication compares
    /// blocks and sends only those that differ (`initial_replication = "existing"`).
    Seed {
        /// The replica's configuration (the trust group's storage is read from it).
        #[arg(long, short)]
        config: PathBuf,
        /// The trust group of the primary that will claim the copy.
        #[arg(long)]
        trust_group: String,
        /// The group's name on the primary.
        #[arg(long)]
        name: String,
        /// A disk of the group, in group order: `NAME=IMAGE` (raw image).
        #[arg(
            long = "disk",
            value_name = "NAME=IMAGE",
            required_unless_present = "from_primary",
            conflicts_with = "from_primary"
        )]
        disks: Vec<String>,
        /// Reverse replication in one step: take the disks of group `--name` from this
        /// primary configuration (the old primary on this host). Refused unless the
        /// group's replication record says it was failed over (superseded), unless
        /// --force.
        #[arg(long, value_name = "PRIMARY_CONFIG")]
        from_primary: Option<PathBuf>,
        /// With --from-primary: seed even though the record does not say the group
        /// was failed over.
        #[arg(long, requires = "from_primary")]
        force: bool,
        /// Move the images into the storage (same filesystem) instead of copying them.
        #[arg(long = "move")]
        move_images: bool,
    },
}

/// `blkrep replica test-failover ...`
#[derive(Debug, clap::Subcommand)]
pub enum TestFailoverCommand {
    /// Serve a point (the latest by default) as `test/<name>/<disk>` on the daemon's
    /// NBD socket.
    Start {
        #[command(flatten)]
        target: OneReplica,
        /// The recovery point (an id from `blkrep replica points`).
        #[arg(long)]
        point: Option<u64>,
    },
    /// Stop the test: the exports go and every write made to them is discarded.
    Stop {
        #[command(flatten)]
        target: OneReplica,
        /// Stop even while NBD clients are connected (they then get I/O errors).
        #[arg(long)]
        force: bool,
    },
}

/// One replica of the running daemon.
#[derive(Debug, clap::Args)]
pub struct OneReplica {
    /// The replica's configuration (its control socket is read from it).
    #[arg(long, short, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The replica daemon's control socket [default: /run/blkrep/replica.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The replica (the group's name).
    #[arg(long)]
    name: String,
    /// Its trust group, when several have a replica of that name.
    #[arg(long)]
    trust_group: Option<String>,
}

impl OneReplica {
    /// Sends the request `make` builds from the replica's name and trust group to
    /// the daemon; returns the name and the answer.
    fn call<T: serde::de::DeserializeOwned>(
        self,
        timeout: Duration,
        make: impl FnOnce(String, Option<String>) -> ReplicaRequest,
    ) -> anyhow::Result<(String, T)> {
        let socket = control_socket(self.socket, self.config)?;
        let answer = call_typed(&socket, &make(self.name.clone(), self.trust_group), timeout)?;
        Ok((self.name, answer))
    }
}

/// Prints NBD URIs of `exports` on `nbd_socket`.
pub(super) fn print_exports<'a>(exports: impl Iterator<Item = &'a str>, nbd_socket: &Path) {
    for export in exports {
        println!("  nbd+unix:///{export}?socket={}", nbd_socket.display());
    }
}

/// Runs `blkrep replica ...`; `init_logging` is called before a daemon starts.
pub fn main(command: ReplicaCommand, init_logging: impl FnOnce()) -> anyhow::Result<()> {
    let pausing = matches!(command, ReplicaCommand::Pause { .. });
    match command {
        ReplicaCommand::Run { config, check } => {
            run_daemon(&config, check, init_logging)?;
        }
        ReplicaCommand::Pause(target) | ReplicaCommand::Resume(target) => {
            let paused = pausing;
            let (name, _): (_, ReplicaInfo) =
                target.call(STATUS_TIMEOUT, |name, trust_group| {
                    ReplicaRequest::SetPaused {
                        name,
                        trust_group,
                        paused,
                    }
                })?;
            println!(
                "Replication into {name} {}",
                if paused {
                    "is paused on the replica side; the primary retries every interval"
                } else {
                    "resumes"
                }
            );
        }
        ReplicaCommand::Import {
            config,
            socket,
            dir,
        } => {
            let socket = control_socket(socket, config)?;
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("Cannot resolve {}", dir.display()))?;
            let done: Imported =
                call_typed(&socket, &ReplicaRequest::Import { dir }, IMPORT_TIMEOUT)?;
            println!(
                "Imported {} transfer(s) into replica {}; cycles from the primary are accepted again",
                done.imported, done.replica.name
            );
        }
        ReplicaCommand::Failover { target, point } => {
            failover(target, point)?;
        }
        ReplicaCommand::PlannedFailover { target, force } => {
            let (name, handed): (String, HandedBack) =
                target.call(PLANNED_FAILOVER_TIMEOUT, |name, trust_group| {
                    ReplicaRequest::PlannedFailover {
                        name,
                        trust_group,
                        force,
                    }
                })?;
            println!(
                "Group {name} failed over to {}: every block compared equal, and that side serves the live disks now at epoch {}. These disks stopped being served; they wait as an existing copy, so replication back from there (`blkrep replica reverse --name {name} ...` on that side) sends only what differs.",
                handed.url, handed.replica.epoch
            );
        }
        ReplicaCommand::CompleteFailover(target) => {
            let (name, _): (_, ReplicaInfo) = target.call(TEST_TIMEOUT, |name, trust_group| {
                ReplicaRequest::CompleteFailover { name, trust_group }
            })?;
            println!("Failover of {name} completed; the other recovery points are deleted");
        }
        ReplicaCommand::Reverse {
            target,
            url,
            ca,
            cert,
            key,
            interval,
        } => {
            reverse(target, url, ca, cert, key, interval)?;
        }
        ReplicaCommand::Recovery {
            target,
            points,
            spacing,
        } => {
            let policy = wire::api::RecoveryPolicy {
                points,
                spacing_secs: spacing.as_secs(),
            };
            let (_, info): (_, ReplicaInfo) = target.call(TEST_TIMEOUT, |name, trust_group| {
                ReplicaRequest::SetRecovery {
                    name,
                    trust_group,
                    policy,
                }
            })?;
            print!("{}", render_points(&info, unix_secs()));
        }
        ReplicaCommand::Points { target, json } => {
            let socket = control_socket(target.socket, target.config)?;
            let replicas: Vec<ReplicaInfo> =
                call_typed(&socket, &ReplicaRequest::Status, STATUS_TIMEOUT)?;
            let info = pick(&replicas, &target.name, target.trust_group.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info.recovery_points)?);
            } else {
                print!("{}", render_points(info, unix_secs()));
            }
        }
        ReplicaCommand::TestFailover(TestFailoverCommand::Start { target, point }) => {
            start_test(target, point)?;
        }
        ReplicaCommand::TestFailover(TestFailoverCommand::Stop { target, force }) => {
            let (name, _): (_, ReplicaInfo) =
                target.call(TEST_TIMEOUT, |name, trust_group| ReplicaRequest::StopTest {
                    name,
                    trust_group,
                    force,
                })?;
            println!("Test failover of {name} stopped; its writes are discarded");
        }
        ReplicaCommand::Status {
            config,
            socket,
            json,
        } => {
            status(config, socket, json)?;
        }
        ReplicaCommand::Seed {
            config,
            trust_group,
            name,
            disks,
            from_primary,
            force,
            move_images,
        } => seed_command(&SeedArgs {
            config,
            trust_group,
            name,
            disks,
            from_primary,
            force,
            move_images,
        })?,
    }
    Ok(())
}

/// `blkrep replica run`: checks the configuration, or runs the daemon.
fn run_daemon(path: &Path, check: bool, init_logging: impl FnOnce()) -> anyhow::Result<()> {
    let config = ReplicaConfig::load(path)?;
    if check {
        for warning in &config.warnings {
            println!("Warning: {warning}");
        }
        let transport = match config.transport {
            Transport::Tls(_) => "HTTPS with client certificates",
            Transport::PlainWithPsk { .. } => {
                "PLAIN HTTP with a pre-shared key (isolated labs only)"
            }
        };
        println!(
            "Configuration is valid: {} authorization entr{}, {transport}",
            config.authorization.len(),
            if config.authorization.len() == 1 {
                "y"
            } else {
                "ies"
            }
        );
        for warning in &config.nbd_access.warnings {
            println!("Warning: {warning}");
        }
        return Ok(());
    }
    init_logging();
    if let Some(event_log) = &config.event_log {
        crate::events::open(event_log)?;
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    run(&config, path)?;
    Ok(())
}

/// A recovery point as `cycle N (time, kind)`.
fn point_text(cycle: u64, time_unix_ms: u64, app_consistent: bool) -> String {
    format!(
        "cycle {cycle} ({}, {})",
        format_ms(time_unix_ms),
        point_kind(app_consistent)
    )
}

/// `blkrep replica failover`.
fn failover(target: OneReplica, point: Option<u64>) -> anyhow::Result<()> {
    let (_, answer): (_, FailedOverTo) =
        target.call(TEST_TIMEOUT, |name, trust_group| ReplicaRequest::Failover {
            name,
            trust_group,
            point,
        })?;
    let info = &answer.replica;
    if let Some(failover) = &info.failover {
        println!(
            "Failed over to {} at {}; its former primary is fenced off. Complete with `blkrep replica complete-failover --name {}` once the point is right.",
            info.name,
            point_text(failover.cycle, failover.time_unix_ms, failover.app_consistent),
            info.name
        );
    }
    println!("Its disks:");
    print_exports(
        answer.exports.iter().map(String::as_str),
        &answer.nbd_socket,
    );
    Ok(())
}

/// `blkrep replica test-failover start`.
fn start_test(target: OneReplica, point: Option<u64>) -> anyhow::Result<()> {
    let (_, answer): (_, TestStarted) = target.call(TEST_TIMEOUT, |name, trust_group| {
        ReplicaRequest::StartTest {
            name,
            trust_group,
            point,
        }
    })?;
    let info = &answer.replica;
    if let Some(test) = &info.test_failover {
        println!(
            "Test failover of {} started at {}; replication goes on. Its disks (writes are discarded when the test stops):",
            info.name,
            point_text(test.cycle, test.time_unix_ms, test.app_consistent)
        );
        print_exports(test.exports.iter().map(String::as_str), &answer.nbd_socket);
    }
    Ok(())
}

/// `blkrep replica status`: every replica, then the live groups.
fn status(config: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let socket = control_socket(socket, config)?;
    let value = call(&socket, &ReplicaRequest::Status, STATUS_TIMEOUT)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let replicas: Vec<ReplicaInfo> =
            serde_json::from_value(value).context("Unreadable status report")?;
        print!("{}", render_status(&replicas, unix_secs()));
        let live = call(&socket, &ReplicaRequest::Live, STATUS_TIMEOUT)?;
        let live: Vec<super::live::LiveGroupReport> =
            serde_json::from_value(live).context("Unreadable live groups")?;
        print!("{}", render_live(&live));
    }
    Ok(())
}

/// `blkrep replica reverse`.
fn reverse(
    target: OneReplica,
    url: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
) -> anyhow::Result<()> {
    let absolute = |path: PathBuf| {
        std::path::absolute(&path).with_context(|| format!("Cannot resolve {}", path.display()))
    };
    let reverse = ReverseTarget {
        url,
        ca: absolute(ca)?,
        cert: absolute(cert)?,
        key: absolute(key)?,
        interval_secs: interval.as_secs().max(1),
    };
    let url = reverse.url.clone();
    let (name, ()) = target.call(TEST_TIMEOUT, |name, trust_group| ReplicaRequest::Reverse {
        name,
        trust_group,
        target: reverse,
    })?;
    println!(
        "Group {name} replicates back to {url}: blocks are compared with the existing copy there and only those that differ are sent (`blkrep replica status` follows it)"
    );
    Ok(())
}

/// The arguments of `blkrep replica seed`.
struct SeedArgs {
    config: PathBuf,
    trust_group: String,
    name: String,
    disks: Vec<String>,
    from_primary: Option<PathBuf>,
    force: bool,
    move_images: bool,
}

/// `blkrep replica seed`.
fn seed_command(args: &SeedArgs) -> anyhow::Result<()> {
    let SeedArgs {
        config,
        trust_group,
        name,
        disks,
        from_primary,
        force,
        move_images,
    } = args;
    let (force, move_images) = (*force, *move_images);
    crate::daemon::process::private_files();
    let config = ReplicaConfig::load(config)?;
    let images = match &from_primary {
        Some(primary) => old_primary_disks(primary, name, force, move_images)?,
        None => disk_args(disks)?,
    };
    let dir = seed(&config, trust_group, name, &images, move_images)?;
    println!(
        "Existing copy of {name} placed in {}; enable replication on the primary with initial_replication = \"existing\" (or `blkrep replica reverse` on a failed-over site) to claim it",
        dir.display()
    );
    if from_primary.is_some() {
        println!(
            "{}",
            if move_images {
                "The old primary's images moved there: remove the group from that primary's configuration"
            } else {
                "The old primary's images stay where they are, as they were (kept aside)"
            }
        );
    }
    Ok(())
}

/// The disks (name and image, in group order) of group `name` of the primary
/// configured by `config`, for `blkrep replica seed --from-primary`: refused unless
/// the group's replication record says it was failed over (or `force`), and, to move
/// the images, while that primary daemon runs.
pub(super) fn old_primary_disks(
    config: &Path,
    name: &str,
    force: bool,
    move_images: bool,
) -> Result<Vec<(String, PathBuf)>, DaemonError> {
    let primary = crate::config::PrimaryConfig::load(config)
        .map_err(|error| DaemonError::Seed(wire::error_chain(&error)))?;
    let group = primary
        .groups
        .iter()
        .find(|group| group.name == name)
        .ok_or_else(|| {
            DaemonError::Seed(format!("{} has no group named {name}", config.display()))
        })?;
    let failed_over = shipper::remote::Relationship::load_for_ring(&group.ring)
        .map_err(|error| DaemonError::Seed(wire::error_chain(&error)))?
        .is_some_and(|relationship| relationship.fenced || relationship.superseded.is_some());
    if !failed_over && !force {
        return Err(DaemonError::Seed(format!(
            "Group {name}'s replication record ({}) does not say it was failed over, so its disks may be the live copy. If its replica was failed over while this primary was down, start the primary once (it learns it is superseded and says so), or pass --force to seed from its images anyway (they are copied, not changed, unless --move)",
            shipper::remote::Relationship::path_for_ring(&group.ring).display()
        )));
    }
    if move_images && UnixStream::connect(&primary.control_socket).is_ok() {
        return Err(DaemonError::Seed(format!(
            "The primary daemon runs (it answers on {}) and holds the images of {name} open: stop it before moving them, or seed without --move (a copy)",
            primary.control_socket.display()
        )));
    }
    Ok(group
        .disks
        .iter()
        .map(|disk| (disk.name.clone(), disk.image.clone()))
        .collect())
}

/// The `--disk NAME=IMAGE` arguments of `blkrep replica seed`.
pub(super) fn disk_args(disks: &[String]) -> Result<Vec<(String, PathBuf)>, DaemonError> {
    disks
        .iter()
        .map(|disk| {
            disk.split_once('=')
                .map(|(name, image)| (name.to_string(), PathBuf::from(image)))
                .ok_or_else(|| DaemonError::Seed(format!("--disk {disk:?} is not NAME=IMAGE")))
        })
        .collect()
}

/// `blkrep replica seed`: makes the images an unclaimed replica in the trust group's
/// storage. Works on the storage directly; a running daemon sees the replica when a
/// primary enables it.
pub(super) fn seed(
    config: &ReplicaConfig,
    trust_group: &str,
    name: &str,
    images: &[(String, PathBuf)],
    move_images: bool,
) -> Result<PathBuf, DaemonError> {
    if !wire::api::valid_name(name) {
        return Err(DaemonError::Seed(format!(
            "{name:?} is not a valid group name (1 to 64 of A-Z a-z 0-9 . _ -)"
        )));
    }
    let mut storages: Vec<&Path> = config
        .authorization
        .iter()
        .filter(|entry| entry.trust_group == trust_group)
        .map(|entry| entry.storage.as_path())
        .collect();
    storages.dedup();
    let storage = match storages.as_slice() {
        [storage] => *storage,
        [] => {
            return Err(DaemonError::Seed(format!(
                "No [[authorization]] entry has trust_group {trust_group:?}"
            )))
        }
        _ => {
            return Err(DaemonError::Seed(format!(
                "Trust group {trust_group:?} has several storages; give each its own trust group"
            )))
        }
    };
    if let Some((disk, _)) = images.iter().find(|(disk, _)| !wire::api::valid_name(disk)) {
        return Err(DaemonError::Seed(format!(
            "{disk:?} is not a valid disk name"
        )));
    }
    std::fs::create_dir_all(storage).map_err(|e| {
        DaemonError::Seed(format!("Cannot create storage {}: {e}", storage.display()))
    })?;
    let dir = storage.join(name);
    replica::store::Replica::seed(&dir, name, trust_group, images, move_images)?;
    Ok(dir)
}

/// The control socket given, or the configuration's, or the default.
pub(super) fn control_socket(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(socket), _) => socket,
        (None, Some(config)) => config::control_socket(&config)?,
        (None, None) => PathBuf::from(config::DEFAULT_CONTROL_SOCKET),
    })
}
