//! blkrep: asynchronous disaster-recovery replication of virtual disks for Linux/KVM.
//!
//! `blkrep primary` serves each protected disk over NBD and logs every write;
//! `blkrep status` and `blkrep cycles` talk to it or to its files.

mod cert;
mod config;
mod control;
mod cycles;
mod daemon;
mod dashboard;
mod events;
mod generate_docs;
mod groups;
mod key_files;
mod libvirt;
mod measure;
mod metrics;
mod primary;
mod replica_daemon;
mod replication_cli;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use shipper::error_chain;

use crate::config::PrimaryConfig;
use crate::control::{ControlRequest, CycleClosed};
use crate::status::StatusReport;

/// Asynchronous disaster-recovery replication of virtual disks.
#[derive(Debug, Parser)]
#[command(name = "blkrep", version, about, propagate_version = true)]
struct Cli {
    /// Log format for daemons.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the primary daemon: serve the configured disks over NBD and track writes.
    Primary {
        /// The primary's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Check the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Show the running primary's groups, disks, cycles and consumers.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the running primary read its configuration file again and apply its
    /// groups: new groups start, removed ones stop (their rings are kept unless
    /// asked), changed ones restart; other groups keep serving. Same as SIGHUP.
    Reload {
        #[command(flatten)]
        target: Target,
        /// Also delete the rings (and replication records) of the groups removed.
        #[arg(long)]
        delete_removed_rings: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Work with cycles.
    Cycles {
        #[command(subcommand)]
        command: CyclesCommand,
    },
    /// Make a small certificate authority and host certificates for a lab.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Manage a group's replication on the running primary.
    Replication {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: replication_cli::ReplicationCommand,
    },
    /// Connect libvirt domains to the disks the primary serves.
    Libvirt {
        #[command(subcommand)]
        command: LibvirtCommand,
    },
    /// Run the replica daemon, or show its replicas.
    Replica {
        #[command(subcommand)]
        command: replica_daemon::ReplicaCommand,
    },
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where `man/` and `completions/` go.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum LibvirtCommand {
    /// Print the <disk> element that points a domain at a disk of the primary
    /// (NBD over its unix socket, or its TCP listener with --tcp), for `virsh edit`
    /// or `virsh attach-device`.
    DiskXml {
        /// The primary's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// The disk (its `name` in [[group.disk]], which is its NBD export).
        #[arg(long)]
        disk: String,
        /// The guest device name.
        #[arg(long, default_value = "vda")]
        target: String,
        /// The guest bus.
        #[arg(long, default_value = "virtio")]
        bus: String,
        /// Seconds QEMU keeps reconnecting when the primary restarts (adds
        /// <reconnect delay='N'/>; needs a libvirt that knows it, newer than
        /// Debian 12's 9.0).
        #[arg(long)]
        reconnect_delay: Option<u32>,
        /// Use the TCP listener even if there is a unix socket.
        #[arg(long)]
        tcp: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Create DIR/ca.pem and DIR/ca.key (never overwrites).
    Ca {
        /// Where the CA's files go.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "blkrep lab CA")]
        name: String,
    },
    /// Issue DIR/<NAME>.pem and DIR/<NAME>.key for a host, signed by the CA in DIR, good
    /// for both a primary and a replica.
    Issue {
        /// The directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IP addresses of the host; the first names the files.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
}

/// Which daemon to talk to.
#[derive(Debug, clap::Args)]
struct Target {
    /// The primary's configuration (its control socket is read from it).
    #[arg(long, short, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The daemon's control socket: the primary's, or a replica daemon's for the
    /// live group of a replica failed over to (which it replicates back).
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CyclesCommand {
    /// Close a group's cycle now on the running primary and wait until its consumer
    /// has applied and acknowledged it. Prints {"cycle": N}.
    Close {
        #[command(flatten)]
        target: Target,
        /// The group.
        #[arg(long, short)]
        group: String,
        /// How long to wait for delivery, e.g. 60s.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Apply a STOPPED group's log to its local copies: recover the ring after a crash,
    /// replay it onto the images if needed, apply every unacknowledged change to
    /// DIR/<disk>.img and acknowledge. Afterwards every copy equals its image.
    Apply {
        /// The primary's configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// The group.
        #[arg(long, short)]
        group: String,
        /// The directory holding the copies (DIR/<disk>.img).
        #[arg(long)]
        to: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLKREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    // BLKREP_LOG filters the log lines only: the event log gets every event.
    let events = events::EventLayer.with_filter(
        tracing_subscriber::filter::Targets::new()
            .with_target(events::TARGET, tracing::Level::TRACE),
    );
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(events)
        .init();
}

fn control_socket(target: &Target) -> anyhow::Result<PathBuf> {
    match (&target.socket, &target.config) {
        (Some(socket), _) => Ok(socket.clone()),
        (None, Some(config)) => Ok(load(config)?.control_socket),
        (None, None) => Ok(PathBuf::from(config::DEFAULT_CONTROL_SOCKET)),
    }
}

/// `blkrep reload`'s text: one line per thing that happened.
fn render_reload(report: &control::ReloadReport) -> String {
    let mut text = String::new();
    let mut line = |what: &str, names: &[String]| {
        if !names.is_empty() {
            text.push_str(&format!("{what}: {}\n", names.join(", ")));
        }
    };
    line("Added", &report.added);
    line("Removed", &report.removed);
    line("Deleted rings", &report.deleted_rings);
    line("Changed", &report.changed);
    line("Unchanged", &report.unchanged);
    line("Needs a restart to apply", &report.needs_restart);
    for failure in &report.failed {
        text.push_str(&format!("Failed: {}: {}\n", failure.group, failure.error));
    }
    if text.is_empty() {
        text.push_str("Nothing to do: no groups are configured\n");
    }
    text
}

fn load(path: &Path) -> anyhow::Result<PrimaryConfig> {
    Ok(PrimaryConfig::load(path)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Primary {
            config: path,
            check,
        } => {
            let config = load(&path)?;
            if check {
                println!("Configuration is valid: {} group(s)", config.groups.len());
                for warning in &config.nbd.access.warnings {
                    println!("Warning: {warning}");
                }
                return Ok(());
            }
            init_logging(cli.log_format);
            if let Some(event_log) = &config.event_log {
                events::open(event_log)?;
            }
            primary::run(config, &path)?;
        }
        Command::Status { target, json } => {
            let socket = control_socket(&target)?;
            let value = control::call(
                &socket,
                control::PRIMARY,
                &ControlRequest::Status,
                Duration::from_secs(30),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let report: StatusReport =
                    serde_json::from_value(value).context("Unreadable status report")?;
                print!("{}", report.render());
            }
        }
        Command::Libvirt {
            command:
                LibvirtCommand::DiskXml {
                    config,
                    disk,
                    target,
                    bus,
                    reconnect_delay,
                    tcp,
                },
        } => {
            let config = load(&config)?;
            let options = libvirt::DiskXmlOptions {
                target,
                bus,
                reconnect_delay,
                tcp,
            };
            print!("{}", libvirt::disk_xml(&config, &disk, &options)?);
        }
        Command::Reload {
            target,
            delete_removed_rings,
            json,
        } => {
            let socket = control_socket(&target)?;
            let report: control::ReloadReport = control::call_typed(
                &socket,
                control::PRIMARY,
                &ControlRequest::Reload {
                    delete_removed_rings,
                },
                Duration::from_secs(600),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_reload(&report));
            }
            if !report.failed.is_empty() {
                bail!("{} group(s) could not be applied", report.failed.len());
            }
        }
        Command::Cycles {
            command:
                CyclesCommand::Close {
                    target,
                    group,
                    timeout,
                },
        } => {
            let socket = control_socket(&target)?;
            let request = ControlRequest::CloseCycle {
                group,
                timeout_secs: timeout.as_secs().max(1),
            };
            let closed: CycleClosed = control::call_typed(
                &socket,
                control::PRIMARY,
                &request,
                timeout + Duration::from_secs(5),
            )?;
            println!("{}", serde_json::to_string(&closed)?);
        }
        Command::Cert {
            command: CertCommand::Ca { dir, name },
        } => {
            daemon::process::private_files();
            let cert = cert::create_lab_ca(&dir, &name)?;
            println!(
                "CA certificate: {} (its key beside it: keep it off the hosts)",
                cert.display()
            );
        }
        Command::Cert {
            command: CertCommand::Issue { dir, names },
        } => {
            daemon::process::private_files();
            let (cert, key) = cert::issue(&dir, &names)?;
            println!("Certificate: {}\nKey: {}", cert.display(), key.display());
        }
        Command::Cycles {
            command: CyclesCommand::Apply { config, group, to },
        } => {
            let config = load(&config)?;
            let Some(group_config) = config.group(&group) else {
                bail!("No group named {group:?} in the configuration");
            };
            init_logging(cli.log_format);
            let summary = cycles::apply_offline(group_config, &to)?;
            println!("{}", serde_json::to_string(&summary)?);
        }
        Command::Replication { target, command } => {
            replication_cli::run(&control_socket(&target)?, command)?;
        }
        Command::Replica { command } => {
            replica_daemon::main(command, || init_logging(cli.log_format))?;
        }
        Command::GenerateDocs { dir } => {
            for path in generate_docs::generate(Cli::command(), &dir)? {
                println!("{}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("blkrep: {}", error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}
