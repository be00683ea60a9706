//! `blkrep replica`: the replica daemon and its status command.
//!
//! `blkrep replica run --config F` serves the replica API ([`replica::server`]) until
//! SIGTERM or SIGINT, then stops accepting, lets the applier finish its current
//! transfer and removes its control socket. With `metrics` configured it also serves
//! Prometheus metrics ([`crate::metrics`]).
//!
//! Control API: a unix socket (mode 0600, so only the daemon's user and root) speaking
//! one JSON request line and one JSON response line per connection, in the envelope of
//! [`crate::control::Response`]. The one request, `{"op":"status"}`, answers the list
//! of [`ReplicaInfo`] of every storage.

pub mod config;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use nix::sys::signal::{SigSet, Signal};
use replica::server::{FailedOver, ReplicaServer, ReplicaServerError, ServerHandle, Transport};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tracing::{error, info, warn};
use wire::api::ReplicaInfo;

use crate::control::{self, ControlError};
use crate::metrics::{MetricsError, MetricsText};
use config::{FailoverHook, ReplicaConfig};

/// How long a status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an import may take: it reads and stores the whole initial copy.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How long starting or stopping a test failover may take (it waits for an apply, and
/// merges the test's undo data).
const TEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a planned failover may take: it compares every block of both sides.
const PLANNED_FAILOVER_TIMEOUT: Duration = control::EXPORT_TIMEOUT;

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
    fn call(
        self,
        timeout: Duration,
        make: impl FnOnce(String, Option<String>) -> Request,
    ) -> anyhow::Result<(String, Value)> {
        let socket = control_socket(self.socket, self.config)?;
        let value = call(&socket, &make(self.name.clone(), self.trust_group), timeout)?;
        Ok((self.name, value))
    }
}

/// The replica an answer carries.
fn replica_in(value: &Value) -> anyhow::Result<ReplicaInfo> {
    serde_json::from_value(value.clone()).context("Unreadable answer")
}

/// Prints NBD URIs of `exports` on the socket the answer `value` names.
fn print_exports<'a>(exports: impl Iterator<Item = &'a str>, value: &Value) {
    let nbd_socket = value["nbd_socket"].as_str().unwrap_or("?");
    for export in exports {
        println!("  nbd+unix:///{export}?socket={nbd_socket}");
    }
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Every replica's [`ReplicaInfo`].
    Status,
    /// Import an initial copy from external media.
    Import {
        /// The export directory (DIR/<group> of `blkrep replication export`).
        dir: PathBuf,
    },
    /// Fail over to a replica.
    Failover {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// The point; the latest if none.
        point: Option<u64>,
    },
    /// Complete a failover.
    CompleteFailover {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
    },
    /// Planned failover of a failed-over group's live disks (failback).
    PlannedFailover {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Even while clients are connected.
        force: bool,
    },
    /// Replicate a failed-over group back.
    Reverse {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Where to.
        target: ReverseTarget,
    },
    /// The failed-over groups served as live disks, and their replication.
    Live,
    /// Set a replica's recovery history.
    SetRecovery {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// The history to keep.
        policy: wire::api::RecoveryPolicy,
    },
    /// Start a test failover.
    StartTest {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// The point; the latest if none.
        point: Option<u64>,
    },
    /// Stop a test failover.
    StopTest {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Even while clients are connected.
        force: bool,
    },
    /// Pause or resume replication into a replica.
    SetPaused {
        /// The replica.
        name: String,
        /// Its trust group, when several have that name.
        trust_group: Option<String>,
        /// Pause (true) or resume (false).
        paused: bool,
    },
}

/// Errors of the replica daemon and of talking to it.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The replica server cannot start.
    #[error("Cannot start the replica server")]
    Server(#[from] ReplicaServerError),
    /// The metrics endpoint cannot start.
    #[error("Cannot start the metrics endpoint")]
    Metrics(#[from] MetricsError),
    /// Another daemon answers on the control socket.
    #[error("Another blkrep replica is running with control socket {0}")]
    AlreadyRunning(PathBuf),
    /// The control socket cannot be set up.
    #[error("Cannot listen on control socket {path}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Threads or signals cannot be set up.
    #[error("Cannot set up the daemon")]
    Setup(#[source] std::io::Error),
    /// Talking to the daemon failed.
    #[error(transparent)]
    Talk(#[from] ControlError),
    /// The NBD server of test failover disks cannot start.
    #[error("Cannot serve failover disks over NBD")]
    Nbd(#[from] nbd_shim::server::ServerError),
    /// A seed request is not possible.
    #[error("{0}")]
    Seed(String),
    /// Seeding failed.
    #[error("Cannot seed the existing copy")]
    Store(#[from] replica::store::StoreError),
}

/// Runs `blkrep replica ...`; `init_logging` is called before a daemon starts.
pub fn main(command: ReplicaCommand, init_logging: impl FnOnce()) -> anyhow::Result<()> {
    let pausing = matches!(command, ReplicaCommand::Pause { .. });
    match command {
        ReplicaCommand::Run { config, check } => {
            let config = ReplicaConfig::load(&config)?;
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
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            run(&config)?;
        }
        ReplicaCommand::Pause(target) | ReplicaCommand::Resume(target) => {
            let paused = pausing;
            let (name, _) =
                target.call(STATUS_TIMEOUT, |name, trust_group| Request::SetPaused {
                    name,
                    trust_group,
                    paused,
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
            let value = call(&socket, &Request::Import { dir }, IMPORT_TIMEOUT)?;
            println!(
                "Imported {} transfer(s) into replica {}; cycles from the primary are accepted again",
                value["imported"],
                value["replica"]["name"].as_str().unwrap_or("?")
            );
        }
        ReplicaCommand::Failover { target, point } => {
            let (_, value) = target.call(TEST_TIMEOUT, |name, trust_group| Request::Failover {
                name,
                trust_group,
                point,
            })?;
            let info = replica_in(&value["replica"])?;
            if let Some(failover) = &info.failover {
                println!(
                    "Failed over to {} at cycle {} ({}, {}); its former primary is fenced off. Complete with `blkrep replica complete-failover --name {}` once the point is right.",
                    info.name,
                    failover.cycle,
                    format_ms(failover.time_unix_ms),
                    point_kind(failover.app_consistent),
                    info.name
                );
            }
            if let Some(exports) = value["exports"].as_array() {
                println!("Its disks:");
                print_exports(exports.iter().filter_map(Value::as_str), &value);
            }
        }
        ReplicaCommand::PlannedFailover { target, force } => {
            let (name, value) = target.call(PLANNED_FAILOVER_TIMEOUT, |name, trust_group| {
                Request::PlannedFailover {
                    name,
                    trust_group,
                    force,
                }
            })?;
            let info = replica_in(&value["replica"])?;
            println!(
                "Group {name} failed over to {}: every block compared equal, and that side serves the live disks now at epoch {}. These disks stopped being served; they wait as an existing copy, so replication back from there (`blkrep replica reverse --name {name} ...` on that side) sends only what differs.",
                value["url"].as_str().unwrap_or("its replica"),
                info.epoch
            );
        }
        ReplicaCommand::CompleteFailover(target) => {
            let (name, _) = target.call(TEST_TIMEOUT, |name, trust_group| {
                Request::CompleteFailover { name, trust_group }
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
            let absolute = |path: PathBuf| {
                std::path::absolute(&path)
                    .with_context(|| format!("Cannot resolve {}", path.display()))
            };
            let reverse = ReverseTarget {
                url,
                ca: absolute(ca)?,
                cert: absolute(cert)?,
                key: absolute(key)?,
                interval_secs: interval.as_secs().max(1),
            };
            let url = reverse.url.clone();
            let (name, _) = target.call(TEST_TIMEOUT, |name, trust_group| Request::Reverse {
                name,
                trust_group,
                target: reverse,
            })?;
            println!(
                "Group {name} replicates back to {url}: blocks are compared with the existing copy there and only those that differ are sent (`blkrep replica status` follows it)"
            );
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
            let (_, value) =
                target.call(TEST_TIMEOUT, |name, trust_group| Request::SetRecovery {
                    name,
                    trust_group,
                    policy,
                })?;
            let info = replica_in(&value)?;
            print!("{}", render_points(&info, unix_now()));
        }
        ReplicaCommand::Points { target, json } => {
            let socket = control_socket(target.socket, target.config)?;
            let value = call(&socket, &Request::Status, STATUS_TIMEOUT)?;
            let replicas: Vec<ReplicaInfo> =
                serde_json::from_value(value).context("Unreadable status report")?;
            let info = pick(&replicas, &target.name, target.trust_group.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info.recovery_points)?);
            } else {
                print!("{}", render_points(info, unix_now()));
            }
        }
        ReplicaCommand::TestFailover(TestFailoverCommand::Start { target, point }) => {
            let (_, value) = target.call(TEST_TIMEOUT, |name, trust_group| Request::StartTest {
                name,
                trust_group,
                point,
            })?;
            let info = replica_in(&value["replica"])?;
            if let Some(test) = &info.test_failover {
                println!(
                    "Test failover of {} started at cycle {} ({}, {}); replication goes on. Its disks (writes are discarded when the test stops):",
                    info.name,
                    test.cycle,
                    format_ms(test.time_unix_ms),
                    point_kind(test.app_consistent)
                );
                print_exports(test.exports.iter().map(String::as_str), &value);
            }
        }
        ReplicaCommand::TestFailover(TestFailoverCommand::Stop { target, force }) => {
            let (name, _) = target.call(TEST_TIMEOUT, |name, trust_group| Request::StopTest {
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
            let socket = control_socket(socket, config)?;
            let value = call(&socket, &Request::Status, STATUS_TIMEOUT)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let replicas: Vec<ReplicaInfo> =
                    serde_json::from_value(value).context("Unreadable status report")?;
                print!("{}", render_status(&replicas, unix_now()));
                let live = call(&socket, &Request::Live, STATUS_TIMEOUT)?;
                print!("{}", render_live(&live));
            }
        }
        ReplicaCommand::Seed {
            config,
            trust_group,
            name,
            disks,
            from_primary,
            force,
            move_images,
        } => {
            crate::daemon_setup::private_files();
            let config = ReplicaConfig::load(&config)?;
            let images = match &from_primary {
                Some(primary) => old_primary_disks(primary, &name, force, move_images)?,
                None => disk_args(&disks)?,
            };
            let dir = seed(&config, &trust_group, &name, &images, move_images)?;
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
        }
    }
    Ok(())
}

/// The disks (name and image, in group order) of group `name` of the primary
/// configured by `config`, for `blkrep replica seed --from-primary`: refused unless
/// the group's replication record says it was failed over (or `force`), and, to move
/// the images, while that primary daemon runs.
fn old_primary_disks(
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
fn disk_args(disks: &[String]) -> Result<Vec<(String, PathBuf)>, DaemonError> {
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
fn seed(
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
fn control_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(socket), _) => socket,
        (None, Some(config)) => config::control_socket(&config)?,
        (None, None) => PathBuf::from(config::DEFAULT_CONTROL_SOCKET),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signals that stop the daemon. Blocked in every thread (set before any is spawned)
/// and taken synchronously by the main thread.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Runs the replica daemon until SIGTERM or SIGINT.
pub fn run(config: &ReplicaConfig) -> Result<(), DaemonError> {
    crate::daemon_setup::harden_process();
    let signals = stop_signals();
    signals
        .thread_block()
        .map_err(|errno| DaemonError::Setup(errno.into()))?;
    let control = bind_control(&config.control_socket)?;
    let result = serve(config, control, &signals);
    let _ = std::fs::remove_file(&config.control_socket);
    result
}

fn serve(
    config: &ReplicaConfig,
    control: UnixListener,
    signals: &SigSet,
) -> Result<(), DaemonError> {
    let mut server = ReplicaServer::start(config.settings())?;
    server.handle().end_stale_tests();
    let nbd = Arc::new(nbd_shim::Server::new(nbd_shim::ServerConfig::default()));
    remove_stale_socket(&config.nbd_unix_socket)?;
    for warning in &config.nbd_access.warnings {
        tracing::warn!("{warning}");
    }
    nbd.listen_unix_with(&config.nbd_unix_socket, config.nbd_access.socket)?;
    if let Some(address) = config.nbd_tcp {
        nbd.listen_tcp_tls(address, config.nbd_access.tls.clone())?;
    }
    let metrics = match config.metrics {
        Some(listen) => {
            let handle = server.handle();
            Some(crate::metrics::serve(
                listen,
                Arc::new(move || render_metrics(&handle.replicas())),
            )?)
        }
        None => None,
    };
    let control_state = Control {
        server: server.handle(),
        nbd: Arc::clone(&nbd),
        nbd_socket: config.nbd_unix_socket.clone(),
        live: Arc::default(),
        hook: config.failover_hook.clone(),
        live_ring_size: config.live_ring_size,
    };
    for info in server.handle().replicas() {
        // A failback interrupted after the copy was made: its live files are stale.
        if info.failover.is_none() {
            if let Ok((dir, _)) = server.handle().replica(&info.name, Some(&info.trust_group)) {
                if dir.join(LIVE_RING).exists() {
                    remove_live_files(&dir);
                }
            }
        }
    }
    for failed in server.handle().failed_over() {
        if handed_over(&failed.dir) {
            // A failback interrupted before its disks became the existing copy.
            if let Err(error) = control_state.hand_back(&failed.dir, &failed.info) {
                error!(replica = %failed.info.name, %error, "Cannot finish the failback");
            }
            continue;
        }
        if let Err(error) = control_state.serve_live(&failed) {
            error!(replica = %failed.info.name, %error, "Cannot serve the failed-over disks");
            continue;
        }
        let Ok(text) = std::fs::read(failed.dir.join(REVERSE_FILE)) else {
            continue;
        };
        let resumed = serde_json::from_slice::<ReverseTarget>(&text)
            .map_err(|error| error.to_string())
            .and_then(|target| control_state.reverse(&failed.dir, &failed.info, &target));
        if let Err(error) = resumed {
            error!(replica = %failed.info.name, %error, "Cannot resume replicating the live disks back");
        }
    }
    let on_failover = control_state.clone();
    server.handle().on_failover(Arc::new(move |failed: FailedOver| {
        match on_failover.serve_live(&failed) {
            Ok(exports) => {
                if let Some(hook) = &on_failover.hook {
                    run_failover_hook(hook, &failed, &exports, &on_failover.nbd_socket);
                }
            }
            Err(error) => {
                error!(replica = %failed.info.name, %error, "Cannot serve the disks after a planned failover");
            }
        }
    }));
    spawn_control(control, control_state.clone())?;
    let metrics_addr = metrics
        .as_ref()
        .map_or_else(|| "off".to_string(), |m| m.local_addr().to_string());
    info!(
        listen = %server.local_addr(),
        metrics = %metrics_addr,
        control = %config.control_socket.display(),
        "Replica ready"
    );
    let signal = signals
        .wait()
        .map_err(|errno| DaemonError::Setup(errno.into()))?;
    info!(?signal, "Shutting down");
    drop(metrics);
    nbd.shutdown();
    control_state.close_live();
    let _ = std::fs::remove_file(&config.nbd_unix_socket);
    server.shutdown();
    info!("Replica server stopped");
    Ok(())
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    let control_error = |source| DaemonError::Control {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(DaemonError::AlreadyRunning(path.to_path_buf()));
    }
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(control_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(control_error)?;
    Ok(listener)
}

/// What control requests act on.
#[derive(Clone)]
struct Control {
    server: ServerHandle,
    /// Serves test failover disks and failed-over disks.
    nbd: Arc<nbd_shim::Server>,
    nbd_socket: PathBuf,
    /// Replicas failed over to, served as live disks, by replica directory.
    live: Arc<Mutex<HashMap<PathBuf, LiveGroup>>>,
    hook: Option<FailoverHook>,
    /// Size of the ring created for live disks.
    live_ring_size: u64,
}

/// A replica failed over to, served as its group's live disks with tracking on.
struct LiveGroup {
    /// Written only to start replicating back; a planned failover holds it for
    /// reading, so status stays answered meanwhile.
    group: Arc<RwLock<crate::primary::RunningGroup>>,
    exports: Vec<String>,
}

impl LiveGroup {
    fn group(&self) -> std::sync::RwLockReadGuard<'_, crate::primary::RunningGroup> {
        self.group.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The NBD export of disk `disk` of a failed-over group `name`.
fn live_export(name: &str, disk: &str) -> String {
    format!("{name}/{disk}")
}

impl Control {
    /// Serves the disks of a replica failed over to, with tracking (ring
    /// `<replica>/live.ring`).
    fn serve_live(&self, failed: &FailedOver) -> Result<Vec<String>, String> {
        let name = &failed.info.name;
        let ring = failed.dir.join(LIVE_RING);
        let (group, devices) =
            crate::primary::serve_failed_over(name, &failed.disks, &ring, self.live_ring_size)
                .map_err(|error| wire::error_chain(&error))?;
        let mut exports: Vec<String> = Vec::new();
        for ((disk, _), device) in failed.disks.iter().zip(devices) {
            let export = live_export(name, disk);
            let description = format!("blkrep group {name} (failed over)");
            if let Err(error) = self.nbd.add_export(&export, Some(description), device) {
                for added in &exports {
                    self.nbd.remove_export(added.as_str());
                }
                group.close();
                return Err(format!(
                    "Cannot serve {export}: {}",
                    wire::error_chain(&error)
                ));
            }
            exports.push(export);
        }
        info!(replica = %name, exports = ?exports, "Serving the failed-over disks as the group's live disks");
        lock(&self.live).insert(
            failed.dir.clone(),
            LiveGroup {
                group: Arc::new(RwLock::new(group)),
                exports: exports.clone(),
            },
        );
        Ok(exports)
    }

    /// Stops serving a failed-over replica (to change its point): refused while
    /// clients are connected. Its ring stays until the new point is in place.
    fn unserve_live(&self, dir: &Path, name: &str) -> Result<(), String> {
        let mut live = lock(&self.live);
        let Some(serving) = live.get(dir) else {
            return Ok(());
        };
        let connected: u64 = serving
            .exports
            .iter()
            .filter_map(|export| self.nbd.export_stats(export))
            .map(|stats| stats.connections)
            .sum();
        if connected > 0 {
            return Err(format!(
                "{connected} NBD client(s) use the failed-over disks of {name}: shut the VM down before choosing another point"
            ));
        }
        if serving.group().was_written() {
            // The recovery points describe the disks as they were at the failover:
            // another point over these writes would mix them in.
            return Err(format!(
                "The failed-over disks of {name} were written since the failover, so no other point can be chosen any more; complete the failover (`blkrep replica complete-failover --name {name}`)"
            ));
        }
        if let Some(serving) = live.remove(dir) {
            for export in &serving.exports {
                self.nbd.remove_export(export);
            }
            serving.group().close();
        }
        Ok(())
    }

    /// Starts replicating the live group of the replica in `dir` to `target`, at the
    /// replica's failover epoch, and records it so a restarted daemon carries on.
    fn reverse(
        &self,
        dir: &Path,
        info: &ReplicaInfo,
        target: &ReverseTarget,
    ) -> Result<(), String> {
        let name = &info.name;
        let consumer = target.consumer()?;
        let problems = consumer.problems("reverse");
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let mut live = lock(&self.live);
        let serving = live
            .get_mut(dir)
            .ok_or_else(|| format!("The live disks of {name} are not served"))?;
        serving
            .group
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .start_replication(
                &consumer,
                Duration::from_secs(target.interval_secs),
                info.epoch,
            )
            .map_err(|error| wire::error_chain(&error))?;
        let path = dir.join(REVERSE_FILE);
        let text = serde_json::to_vec_pretty(target).map_err(|error| error.to_string())?;
        std::fs::write(&path, text)
            .map_err(|error| format!("Cannot record {}: {error}", path.display()))?;
        info!(replica = %name, url = %target.url, "Replicating the live disks back");
        Ok(())
    }

    /// Each live group: its exports and replication status.
    fn live_status(&self) -> Value {
        let live = lock(&self.live);
        let groups: Vec<Value> = live
            .values()
            .map(|serving| {
                let group = serving.group();
                serde_json::json!({
                    "name": group.name(),
                    "exports": serving.exports,
                    "replication": group.replication_status(),
                })
            })
            .collect();
        Value::Array(groups)
    }

    /// Stops every live group (daemon shutdown, after the NBD server stopped).
    fn close_live(&self) {
        let live: Vec<LiveGroup> = lock(&self.live).drain().map(|(_, s)| s).collect();
        for serving in &live {
            serving.group().stop_shipper();
        }
        for serving in live {
            serving.group().close();
        }
    }

    /// Failback: a planned failover of the live disks of the failed-over replica
    /// `name` to the replica server they replicate to (see
    /// [`crate::primary::RunningGroup::planned_failover`]). Once that side is the
    /// primary, these disks stop being served and become an existing copy it can
    /// claim to replicate back.
    fn planned_failover(
        &self,
        name: &str,
        trust_group: Option<&str>,
        force: bool,
    ) -> Result<Value, String> {
        let (dir, info) = self
            .server
            .replica(name, trust_group)
            .map_err(|error| wire::error_chain(&error))?;
        if info.failover.is_none() {
            return Err(format!(
                "Replica {name} was not failed over, so it serves no live disks: a planned failover to it starts on its primary (`blkrep replication failover --group {name}`)"
            ));
        }
        let (group, exports) = {
            let live = lock(&self.live);
            let serving = live
                .get(&dir)
                .ok_or_else(|| format!("The live disks of {name} are not served"))?;
            (Arc::clone(&serving.group), serving.exports.clone())
        };
        let url = {
            let group = group.read().unwrap_or_else(PoisonError::into_inner);
            if group.replication_status().is_none() {
                return Err(format!(
                    "The live disks of {name} do not replicate anywhere: reverse replication first (`blkrep replica reverse --name {name} ...`), then fail over to that side"
                ));
            }
            group.planned_failover(&self.nbd, &exports, force)?;
            group.replica_url().unwrap_or_default()
        };
        let info = self.hand_back(&dir, &info)?;
        Ok(serde_json::json!({ "replica": info, "url": url }))
    }

    /// After a planned failover handed the live disks of the replica in `dir` over:
    /// stops serving them and makes them an existing copy at the next epoch. Also
    /// finishes one a daemon crash interrupted.
    fn hand_back(&self, dir: &Path, info: &ReplicaInfo) -> Result<ReplicaInfo, String> {
        if let Some(serving) = lock(&self.live).remove(dir) {
            for export in &serving.exports {
                self.nbd.remove_export(export);
            }
            let group = serving.group();
            group.stop_shipper();
            group.close();
        }
        let handed = self
            .server
            .hand_back(&info.name, Some(&info.trust_group))
            .map_err(|error| {
                format!(
                    "The group was handed over, but its disks are not yet the existing copy ({}); restarting the replica daemon finishes that",
                    wire::error_chain(&error)
                )
            })?;
        remove_live_files(dir);
        warn!(replica = %info.name, epoch = handed.epoch, "Failback done: the other side is the primary; these disks wait as an existing copy for replication back");
        Ok(handed)
    }
}

/// Removes the ring of a replica's former live disks and what lies beside it: once
/// its failover is handed back, a later failover starts afresh.
fn remove_live_files(dir: &Path) {
    let ring = dir.join(LIVE_RING);
    for path in [
        shipper::remote::Relationship::path_for_ring(&ring),
        shipper::freeze::state_path_for_ring(&ring),
        dir.join(REVERSE_FILE),
        ring,
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(path = %path.display(), %error, "Cannot remove a file of the former live disks")
            }
        }
    }
}

/// Whether the live disks of the failed-over replica in `dir` were handed over by a
/// planned failover: their relationship record says so.
fn handed_over(dir: &Path) -> bool {
    shipper::remote::Relationship::load_for_ring(&dir.join(LIVE_RING))
        .ok()
        .flatten()
        .as_ref()
        .is_some_and(shipper::remote::Relationship::handed_over)
}

/// The ring of a failed-over replica's live disks.
const LIVE_RING: &str = "live.ring";
/// Where a failed-over replica's live disks replicate back to ([`ReverseTarget`]).
const REVERSE_FILE: &str = "reverse.json";

/// Where a failed-over group's live disks replicate back to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReverseTarget {
    /// The replica server at the old site.
    pub url: String,
    /// CA certificate(s) of that server.
    pub ca: PathBuf,
    /// This host's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// Replication interval, in seconds.
    pub interval_secs: u64,
}

impl ReverseTarget {
    /// The consumer options: the old primary's disks are an existing copy there.
    fn consumer(&self) -> Result<crate::config::ReplicaConsumer, String> {
        let mut table = toml::Table::new();
        table.insert("url".into(), self.url.clone().into());
        for (key, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            table.insert(key.into(), path.display().to_string().into());
        }
        table.insert("initial_replication".into(), "existing".into());
        toml::Value::Table(table)
            .try_into()
            .map_err(|error| format!("Invalid reverse replication target: {error}"))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a unix socket left by a daemon that did not stop cleanly; fails if one
/// answers.
fn remove_stale_socket(path: &Path) -> Result<(), DaemonError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Control {
                path: path.to_path_buf(),
                source: std::io::ErrorKind::AddrInUse.into(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    Ok(())
}

fn spawn_control(listener: UnixListener, server: Control) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let server = server.clone();
                // A slow client must not hold up the next one.
                let spawned = std::thread::Builder::new()
                    .name("control-request".into())
                    .spawn(move || {
                        if let Err(error) = serve_control(&stream, &server) {
                            warn!(%error, "Control request failed");
                        }
                    });
                if let Err(error) = spawned {
                    warn!(%error, "Cannot serve a control request");
                }
            }
        })
        .map(drop)
        .map_err(DaemonError::Setup)
}

fn serve_control(stream: &UnixStream, control: &Control) -> std::io::Result<()> {
    let server = &control.server;
    control::answer(stream, |request: Request| match request {
        Request::StartTest {
            name,
            trust_group,
            point,
        } => start_test(control, &name, trust_group.as_deref(), point),
        Request::Failover {
            name,
            trust_group,
            point,
        } => fail_over(control, &name, trust_group.as_deref(), point),
        Request::Reverse {
            name,
            trust_group,
            target,
        } => {
            let (dir, info) = server
                .replica(&name, trust_group.as_deref())
                .map_err(|error| wire::error_chain(&error))?;
            match &info.failover {
                Some(failover) if failover.completed => {}
                Some(_) => return Err(format!("Complete the failover of {name} first (`blkrep replica complete-failover --name {name}`): replicating back fixes its point")),
                None => return Err(format!("Replica {name} was not failed over: it is a replica, not a live copy to replicate")),
            }
            control.reverse(&dir, &info, &target)?;
            Ok(Value::Null)
        }
        Request::Live => Ok(control.live_status()),
        Request::PlannedFailover {
            name,
            trust_group,
            force,
        } => control.planned_failover(&name, trust_group.as_deref(), force),
        Request::CompleteFailover { name, trust_group } => {
            let info = server
                .complete_failover(&name, trust_group.as_deref())
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        Request::SetRecovery {
            name,
            trust_group,
            policy,
        } => {
            let info = server
                .set_recovery(&name, trust_group.as_deref(), policy)
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        Request::StopTest {
            name,
            trust_group,
            force,
        } => stop_test(control, &name, trust_group.as_deref(), force),
        Request::Status => {
            serde_json::to_value(server.replicas()).map_err(|error| error.to_string())
        }
        Request::SetPaused {
            name,
            trust_group,
            paused,
        } => {
            let info = server
                .set_paused(&name, trust_group.as_deref(), paused)
                .map_err(|error| wire::error_chain(&error))?;
            serde_json::to_value(info).map_err(|error| error.to_string())
        }
        Request::Import { dir } => {
            let (info, imported) = server
                .import(&dir)
                .map_err(|error| wire::error_chain(&error))?;
            Ok(serde_json::json!({ "replica": info, "imported": imported }))
        }
    })
}

/// Starts a test failover and serves its disks.
fn start_test(
    control: &Control,
    name: &str,
    trust_group: Option<&str>,
    point: Option<u64>,
) -> Result<Value, String> {
    let (info, overlays) = control
        .server
        .start_test(name, trust_group, point)
        .map_err(|error| wire::error_chain(&error))?;
    let exports = info
        .test_failover
        .as_ref()
        .map(|test| test.exports.clone())
        .unwrap_or_default();
    for (index, (export, overlay)) in exports.iter().zip(overlays).enumerate() {
        let description = format!("blkrep test failover of {name}");
        if let Err(error) = control.nbd.add_export(export, Some(description), overlay) {
            for added in &exports[..index] {
                control.nbd.remove_export(added);
            }
            let _ = control.server.stop_test(name, trust_group);
            return Err(format!(
                "Cannot serve {export}: {}",
                wire::error_chain(&error)
            ));
        }
    }
    Ok(serde_json::json!({ "replica": info, "nbd_socket": control.nbd_socket }))
}

/// Fails over to a replica, serves its disks and runs the failover hook.
fn fail_over(
    control: &Control,
    name: &str,
    trust_group: Option<&str>,
    point: Option<u64>,
) -> Result<Value, String> {
    let error_text = |error: &replica::server::AdminError| wire::error_chain(error);
    let (dir, before) = control
        .server
        .replica(name, trust_group)
        .map_err(|e| error_text(&e))?;
    // Choosing another point before completion: the live disks stop being served
    // first (a completed failover is refused by the replica itself).
    let serving = match before.failover {
        Some(failover) if !failover.completed => {
            control.unserve_live(&dir, name)?;
            Some(dir)
        }
        _ => None,
    };
    let failed = match control.server.fail_over(name, trust_group, point) {
        Ok(failed) => failed,
        Err(error) => {
            // The disks were not changed: serve them again as they were.
            if let Some(dir) = serving {
                if let Some(current) = control
                    .server
                    .failed_over()
                    .into_iter()
                    .find(|f| f.dir == dir)
                {
                    control.serve_live(&current)?;
                }
            }
            return Err(error_text(&error));
        }
    };
    if let Some(dir) = &serving {
        // The writes that ring tracked were undone by the new point.
        let _ = std::fs::remove_file(dir.join(LIVE_RING));
    }
    let exports = control.serve_live(&failed)?;
    let hook = control
        .hook
        .as_ref()
        .map(|hook| run_failover_hook(hook, &failed, &exports, &control.nbd_socket));
    Ok(serde_json::json!({
        "replica": failed.info,
        "nbd_socket": control.nbd_socket,
        "exports": exports,
        "hook": hook,
    }))
}

/// Runs the failover hook with the point's metadata in its environment. Returns
/// its outcome for the answer (a failed hook does not undo the failover).
fn run_failover_hook(
    hook: &FailoverHook,
    failed: &FailedOver,
    exports: &[String],
    nbd_socket: &Path,
) -> String {
    let Some(failover) = &failed.info.failover else {
        return "not run: no failover recorded".into();
    };
    let uris: Vec<String> = exports
        .iter()
        .map(|export| format!("nbd+unix:///{export}?socket={}", nbd_socket.display()))
        .collect();
    let images: Vec<String> = failed
        .disks
        .iter()
        .map(|(_, path)| path.display().to_string())
        .collect();
    let names: Vec<&str> = failed.disks.iter().map(|(name, _)| name.as_str()).collect();
    let cycle = failover.cycle.to_string();
    let time_ms = failover.time_unix_ms.to_string();
    let time = format_ms(failover.time_unix_ms);
    let kind = point_kind(failover.app_consistent);
    let (disks, uris, images) = (names.join(","), uris.join(" "), images.join(","));
    let env = [
        ("BLKREP_GROUP", failed.info.name.as_str()),
        ("BLKREP_TRUST_GROUP", failed.info.trust_group.as_str()),
        (
            "BLKREP_FAILOVER",
            if failover.planned {
                "planned"
            } else {
                "unplanned"
            },
        ),
        ("BLKREP_POINT_CYCLE", cycle.as_str()),
        ("BLKREP_POINT_TIME", time.as_str()),
        ("BLKREP_POINT_TIME_MS", time_ms.as_str()),
        ("BLKREP_POINT_KIND", kind),
        ("BLKREP_DISKS", disks.as_str()),
        ("BLKREP_DISK_IMAGES", images.as_str()),
        ("BLKREP_NBD_URIS", uris.as_str()),
    ];
    let command = shipper::freeze::display_command(&hook.command);
    match shipper::freeze::run_command(&hook.command, &env, hook.timeout) {
        Ok(()) => {
            info!(replica = %failed.info.name, %command, "Failover hook ran");
            format!("{command}: succeeded")
        }
        Err(error) => {
            let message = wire::error_chain(&error);
            warn!(replica = %failed.info.name, %command, error = %message, "Failover hook failed; the failover stands");
            format!("{command}: FAILED: {message}")
        }
    }
}

/// Stops a test failover: its exports go, then its overlays and temporary point.
fn stop_test(
    control: &Control,
    name: &str,
    trust_group: Option<&str>,
    force: bool,
) -> Result<Value, String> {
    let (_, info) = control
        .server
        .replica(name, trust_group)
        .map_err(|error| wire::error_chain(&error))?;
    let Some(test) = &info.test_failover else {
        return Err(format!("No test failover of {name} is running"));
    };
    let connected: u64 = test
        .exports
        .iter()
        .filter_map(|export| control.nbd.export_stats(export))
        .map(|stats| stats.connections)
        .sum();
    if connected > 0 && !force {
        return Err(format!(
            "{connected} NBD client(s) are connected to the test's disks: shut the test VM down first, or pass --force to cut them off (the test's writes are discarded either way)"
        ));
    }
    for export in &test.exports {
        control.nbd.remove_export(export);
    }
    let info = control
        .server
        .stop_test(name, trust_group)
        .map_err(|error| wire::error_chain(&error))?;
    serde_json::to_value(info).map_err(|error| error.to_string())
}

/// The replica `name` (of `trust_group`) in a status report.
fn pick<'a>(
    replicas: &'a [ReplicaInfo],
    name: &str,
    trust_group: Option<&str>,
) -> anyhow::Result<&'a ReplicaInfo> {
    let found: Vec<&ReplicaInfo> = replicas
        .iter()
        .filter(|r| r.name == name && trust_group.is_none_or(|group| r.trust_group == group))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => anyhow::bail!("No replica named {name}"),
        _ => anyhow::bail!(
            "Several trust groups have a replica named {name}; say which with --trust-group"
        ),
    }
}

/// A time in milliseconds since the epoch, as RFC 3339 (UTC, seconds).
fn format_ms(unix_ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn point_kind(app_consistent: bool) -> &'static str {
    if app_consistent {
        "application-consistent"
    } else {
        "crash-consistent"
    }
}

/// A replica's recovery points as text: one line each, oldest first.
pub fn render_points(info: &ReplicaInfo, now_unix: u64) -> String {
    let mut out = format!(
        "{}: {} additional point(s) kept, at least {} apart
",
        info.name,
        info.recovery.points,
        humantime::format_duration(Duration::from_secs(info.recovery.spacing_secs))
    );
    if info.recovery_points.is_empty() {
        out.push_str(
            "  no recovery point yet: the initial replication has not finished
",
        );
    }
    for point in &info.recovery_points {
        let age = Duration::from_secs(now_unix.saturating_sub(point.time_unix_ms / 1000));
        let id = if point.latest {
            "latest".to_string()
        } else {
            point.id.to_string()
        };
        out.push_str(&format!(
            "  {id:>6}  {}  ({} ago)  cycle {}  {}  {}
",
            format_ms(point.time_unix_ms),
            humantime::format_duration(age),
            point.cycle,
            point_kind(point.app_consistent),
            if point.latest {
                "the replica disks".to_string()
            } else {
                format!("{} bytes of undo data", point.size)
            }
        ));
    }
    out
}

/// Sends one request to the replica daemon at `socket` and returns the result.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Value, ControlError> {
    control::call(socket, "blkrep replica run", request, timeout)
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// The status as text: one line per replica.
pub fn render_status(replicas: &[ReplicaInfo], now_unix: u64) -> String {
    if replicas.is_empty() {
        return "No replicas\n".into();
    }
    let mut sorted: Vec<&ReplicaInfo> = replicas.iter().collect();
    sorted.sort_by(|a, b| (&a.trust_group, &a.name).cmp(&(&b.trust_group, &b.name)));
    let mut out = String::new();
    for info in sorted {
        let applied = match (info.last_applied_cycle, info.last_applied_unix) {
            (Some(cycle), Some(at)) => {
                let age = Duration::from_secs(now_unix.saturating_sub(at));
                format!("cycle {cycle} ({} ago)", humantime::format_duration(age))
            }
            (Some(cycle), None) => format!("cycle {cycle}"),
            (None, _) => "none".into(),
        };
        let role = match info.role {
            wire::api::Role::Replica => "replica",
            wire::api::Role::Primary => "primary",
        };
        out.push_str(&format!(
            "{}: {role} at epoch {}, trust group {}, consistent {}, last applied {applied}, pending transfers {}, paused {}\n",
            info.name,
            info.epoch,
            info.trust_group,
            yes_no(info.consistent),
            info.pending_transfers,
            yes_no(info.paused),
        ));
        if info.unclaimed {
            out.push_str("  an existing copy no primary has claimed: replicating this group with initial_replication = \"existing\" (or `blkrep replica reverse` from a failed-over site) claims it and sends only differing blocks\n");
        }
        if info.awaiting_import {
            out.push_str("  waiting for its initial copy: run `blkrep replica import DIR` with the exported directory\n");
        }
        if let Some(failover) = &info.failover {
            let age = Duration::from_secs(now_unix.saturating_sub(failover.at_unix));
            out.push_str(&format!(
                "  FAILED OVER {} ago to cycle {} ({}); live disks served as {}/<disk>; former primary fenced off{}\n",
                humantime::format_duration(age),
                failover.cycle,
                point_kind(failover.app_consistent),
                info.name,
                if failover.completed {
                    String::new()
                } else {
                    format!("; complete with `blkrep replica complete-failover --name {}`", info.name)
                }
            ));
        }
        let kept = info.recovery_points.iter().filter(|p| !p.latest).count();
        if info.recovery.points > 0 || kept > 0 {
            out.push_str(&format!(
                "  recovery points: {kept} of {} additional kept (`blkrep replica points --name {}`)\n",
                info.recovery.points, info.name
            ));
        }
        if let Some(test) = &info.test_failover {
            let age = Duration::from_secs(now_unix.saturating_sub(test.started_unix));
            out.push_str(&format!(
                "  TEST FAILOVER in progress for {} at cycle {}: exports {}\n",
                humantime::format_duration(age),
                test.cycle,
                test.exports.join(", ")
            ));
        } else if let Some(at) = info.last_test_unix {
            let age = Duration::from_secs(now_unix.saturating_sub(at));
            out.push_str(&format!(
                "  last test failover: {} ago\n",
                humantime::format_duration(age)
            ));
        }
    }
    out
}

/// The failed-over groups served as live disks, one line each (and their
/// replication back, if any).
fn render_live(live: &Value) -> String {
    let mut out = String::new();
    for group in live.as_array().map_or(&[][..], Vec::as_slice) {
        let exports: Vec<&str> = group["exports"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter_map(Value::as_str)
            .collect();
        out.push_str(&format!(
            "live group {}: disks {}",
            group["name"].as_str().unwrap_or("?"),
            exports.join(", ")
        ));
        let replication = &group["replication"];
        if replication.is_null() {
            out.push_str("; not replicated back (`blkrep replica reverse`)\n");
        } else {
            out.push_str(&format!(
                "; replicating back: {}, health {}{}\n",
                replication["state"].as_str().unwrap_or("?"),
                replication["health"].as_str().unwrap_or("?"),
                replication["last_error"]
                    .as_str()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

/// The Prometheus metrics of `replicas`.
pub fn render_metrics(replicas: &[ReplicaInfo]) -> String {
    let mut text = MetricsText::new();
    let flag = |value: bool| if value { 1.0 } else { 0.0 };
    for info in replicas {
        let labels = [
            ("replica", info.name.as_str()),
            ("trust_group", info.trust_group.as_str()),
        ];
        text.gauge(
            "blkrep_replica_consistent",
            "Whether the replica's disks hold a state the primary had (1) or not (0).",
            &labels,
            flag(info.consistent),
        );
        if let Some(cycle) = info.last_applied_cycle {
            text.gauge(
                "blkrep_replica_last_applied_cycle",
                "Newest cycle applied to the replica's disks.",
                &labels,
                cycle as f64,
            );
        }
        if let Some(at) = info.last_applied_unix {
            text.gauge(
                "blkrep_replica_last_applied_timestamp_seconds",
                "When the newest cycle was applied, in seconds since the epoch.",
                &labels,
                at as f64,
            );
        }
        text.gauge(
            "blkrep_replica_pending_transfers",
            "Transfers received and not yet applied.",
            &labels,
            f64::from(info.pending_transfers),
        );
        text.gauge(
            "blkrep_replica_paused",
            "Whether replication is paused on the replica side (1) or not (0).",
            &labels,
            flag(info.paused),
        );
        text.counter(
            "blkrep_replica_applied_transfers_total",
            "Transfers applied to the replica's disks.",
            &labels,
            info.applied_transfers as f64,
        );
        text.counter(
            "blkrep_replica_applied_bytes_total",
            "Data bytes written to the replica's disks by applied transfers.",
            &labels,
            info.applied_bytes as f64,
        );
        text.counter(
            "blkrep_replica_apply_seconds_total",
            "Time spent applying transfers (the apply rate is applied bytes over this).",
            &labels,
            info.apply_micros as f64 / 1e6,
        );
        if let Some(micros) = info.last_apply_micros {
            text.gauge(
                "blkrep_replica_last_apply_seconds",
                "Time the latest transfer took to apply.",
                &labels,
                micros as f64 / 1e6,
            );
        }
    }
    text.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use wire::api::DiskInfo;

    fn info(name: &str, group: &str) -> ReplicaInfo {
        ReplicaInfo {
            name: name.into(),
            trust_group: group.into(),
            disks: vec![DiskInfo {
                name: "disk0".into(),
                size: 1 << 20,
            }],
            consistent: true,
            last_received_cycle: Some(8),
            last_applied_cycle: Some(7),
            last_applied_unix: Some(1_000),
            pending_transfers: 1,
            resync_epoch: None,
            paused: false,
            awaiting_import: false,
            applied_transfers: 3,
            applied_bytes: 3 << 20,
            apply_micros: 1_500_000,
            last_apply_micros: Some(250_000),
            recovery: wire::api::RecoveryPolicy::default(),
            recovery_points: Vec::new(),
            test_failover: None,
            last_test_unix: None,
            failover: None,
            role: wire::api::Role::Replica,
            epoch: wire::api::FIRST_EPOCH,
            unclaimed: false,
        }
    }

    #[test]
    fn status_lines() {
        let mut fresh = info("vm2", "dc1");
        fresh.consistent = false;
        fresh.last_applied_cycle = None;
        fresh.last_applied_unix = None;
        fresh.paused = true;
        fresh.role = wire::api::Role::Primary;
        fresh.epoch = 2;
        let text = render_status(&[fresh, info("vm1", "dc1")], 1_000 + 3_725);
        assert_eq!(
            text,
            "vm1: replica at epoch 1, trust group dc1, consistent yes, last applied cycle 7 (1h 2m 5s ago), pending transfers 1, paused no\n\
             vm2: primary at epoch 2, trust group dc1, consistent no, last applied none, pending transfers 1, paused yes\n"
        );
        assert_eq!(render_status(&[], 0), "No replicas\n");
    }

    #[test]
    fn metrics_per_replica() {
        let mut other = info("vm\"1", "dc2");
        other.last_applied_cycle = None;
        other.last_applied_unix = None;
        let text = render_metrics(&[info("vm1", "dc1"), other]);
        for line in [
            "# TYPE blkrep_replica_consistent gauge",
            "blkrep_replica_consistent{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_consistent{replica=\"vm\\\"1\",trust_group=\"dc2\"} 1",
            "blkrep_replica_last_applied_cycle{replica=\"vm1\",trust_group=\"dc1\"} 7",
            "blkrep_replica_last_applied_timestamp_seconds{replica=\"vm1\",trust_group=\"dc1\"} 1000",
            "blkrep_replica_pending_transfers{replica=\"vm1\",trust_group=\"dc1\"} 1",
            "blkrep_replica_paused{replica=\"vm1\",trust_group=\"dc1\"} 0",
            "blkrep_replica_applied_bytes_total{replica=\"vm1\",trust_group=\"dc1\"} 3145728",
            "blkrep_replica_apply_seconds_total{replica=\"vm1\",trust_group=\"dc1\"} 1.5",
            "blkrep_replica_last_apply_seconds{replica=\"vm1\",trust_group=\"dc1\"} 0.25",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("last_applied_cycle{replica=\"vm\\\"1\""),
            "{text}"
        );
        assert_eq!(text.matches("# HELP blkrep_replica_paused ").count(), 1);
    }

    #[test]
    fn control_socket_serves_the_servers_status() {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("dc1");
        let mut server = ReplicaServer::start(replica::server::ServerSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            transport: Transport::PlainWithPsk {
                allow_non_loopback: false,
            },
            authorization: vec![replica::server::AuthEntry {
                primary: Some(wire::tls::NamePattern::parse("primary.example.com").unwrap()),
                storage: storage.clone(),
                trust_group: "dc1".into(),
                quota: None,
                psk: replica::server::PreSharedKey::new("0123456789abcdef".into()),
            }],
            reserve: 0,
            max_disk_size: replica::server::DEFAULT_MAX_DISK_SIZE,
            limits: replica::limits::Limits::default(),
        })
        .unwrap();
        let state = replica::store::ReplicaState::new(
            "vm1".into(),
            "dc1".into(),
            replica::store::Claim {
                relationship: 7,
                epoch: wire::api::FIRST_EPOCH,
            },
            "host1".into(),
            "host1.example.com".into(),
            vec![DiskInfo {
                name: "disk0".into(),
                size: 1 << 20,
            }],
        );
        replica::store::Replica::create(&storage.join("vm1"), state, 0).unwrap();

        let socket = dir.path().join("run/ctl.sock");
        let listener = bind_control(&socket).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind_control(&socket),
            Err(DaemonError::AlreadyRunning(_))
        ));
        spawn_control(
            listener,
            Control {
                server: server.handle(),
                nbd: Arc::new(nbd_shim::Server::new(nbd_shim::ServerConfig::default())),
                nbd_socket: dir.path().join("run/nbd.sock"),
                live: Arc::default(),
                hook: None,
                live_ring_size: config::DEFAULT_LIVE_RING_SIZE,
            },
        )
        .unwrap();
        let value = call(&socket, &Request::Status, Duration::from_secs(10)).unwrap();
        let replicas: Vec<ReplicaInfo> = serde_json::from_value(value).unwrap();
        assert_eq!(replicas.len(), 1);
        assert_eq!(
            (replicas[0].name.as_str(), replicas[0].consistent),
            ("vm1", false)
        );
        assert!(render_metrics(&server.replicas())
            .contains("blkrep_replica_consistent{replica=\"vm1\",trust_group=\"dc1\"} 0\n"));

        let mut raw = UnixStream::connect(&socket).unwrap();
        raw.write_all(b"{\"op\":\"reboot\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(raw).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("{\"ok\":false,\"error\":\"Bad request: unknown variant"),
            "{line}"
        );

        server.shutdown();
        let error = call(
            &dir.path().join("none"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("is `blkrep replica run` running?"),
            "{error}"
        );
    }
}
