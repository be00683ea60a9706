//! `blkrep replication ...`: an administrator's commands for a group's replication,
//! sent to the running primary over its control socket.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;

use crate::control::{self, ActionDone, ControlRequest, ReplicationAction};
use shipper::ReplicationState;

use crate::status::{human_bytes, human_duration, progress_bar, state_name, GroupReport};

/// How long an administrative request may take (a remove may wait for the replica
/// server's answer, 120 s at most).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(160);

/// `blkrep replication ...`
#[derive(Debug, Subcommand)]
pub enum ReplicationCommand {
    /// Enable replication again after `remove` (a full initial replication follows).
    Enable {
        /// The group.
        #[arg(long, short)]
        group: String,
        /// Start the initial replication at this time (RFC 3339, e.g.
        /// 2026-11-24T02:00:00Z) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Stop shipping cycles; writes keep being tracked in the ring.
    Pause {
        /// The group.
        #[arg(long, short)]
        group: String,
    },
    /// Ship again after a pause, or after fixing the cause of a suspension.
    Resume {
        /// The group.
        #[arg(long, short)]
        group: String,
    },
    /// Copy every block to the replica again.
    Resync {
        /// The group.
        #[arg(long, short)]
        group: String,
    },
    /// Stop replicating the group. The replica server keeps the replica unless
    /// --delete-replica --yes is given.
    Remove {
        /// The group.
        #[arg(long, short)]
        group: String,
        /// Also delete the replica and its disks on the replica server.
        #[arg(long)]
        delete_replica: bool,
        /// Confirms --delete-replica.
        #[arg(long)]
        yes: bool,
    },
    /// Write the initial copy of a group with `initial_replication = "media"` to
    /// DIR/<group> (external media), to be imported on the replica server with
    /// `blkrep replica import`.
    Export {
        /// The group.
        #[arg(long, short)]
        group: String,
        /// The directory on the media.
        #[arg(long)]
        to: std::path::PathBuf,
    },
    /// Planned failover: refuse the group's writes, ship every change, compare every
    /// block with the replica, and hand the group over to it (the replica then serves
    /// the live disks). No acknowledged write is lost.
    Failover {
        /// The group.
        #[arg(long, short)]
        group: String,
        /// Go ahead although NBD clients are connected (their writes fail from now on).
        #[arg(long)]
        force: bool,
    },
    /// The figures of the group's replication over a window, as Hyper-V's
    /// Measure-VMReplication: transfer sizes and times, successes, failures and
    /// missed intervals, the achieved recovery point (p50, p99), bytes sent and the
    /// compression ratio. Kept in memory since the daemon started.
    Measure {
        /// The group.
        #[arg(long, short)]
        group: String,
        /// The window, back from now (e.g. 30m, 1h, 1day).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the group's replication; --watch follows an initial replication or resync
    /// with a progress bar until it ends.
    Status {
        /// The group.
        #[arg(long, short)]
        group: String,
        /// Follow until no copy is running.
        #[arg(long)]
        watch: bool,
    },
}

/// Runs a replication command against the primary listening on `socket`.
pub fn run(socket: &Path, command: ReplicationCommand) -> anyhow::Result<()> {
    let (group, action) = match command {
        ReplicationCommand::Status { group, watch } => return status(socket, &group, watch),
        ReplicationCommand::Measure { group, since, json } => {
            return crate::measure::run(socket, &group, since, json)
        }
        ReplicationCommand::Enable { group, at } => {
            let start_after_unix = match at {
                None => None,
                Some(text) => Some(base::time::unix_secs_of(
                    humantime::parse_rfc3339_weak(&text).with_context(|| {
                        format!("{text:?} is not a time like 2026-11-24T02:00:00Z")
                    })?,
                )),
            };
            (group, ReplicationAction::Enable { start_after_unix })
        }
        ReplicationCommand::Pause { group } => (group, ReplicationAction::Pause),
        ReplicationCommand::Resume { group } => (group, ReplicationAction::Resume),
        ReplicationCommand::Resync { group } => (group, ReplicationAction::Resync),
        ReplicationCommand::Failover { group, force } => {
            (group, ReplicationAction::Failover { force })
        }
        ReplicationCommand::Export { group, to } => {
            let dir = std::path::absolute(&to)
                .with_context(|| format!("Cannot resolve {}", to.display()))?;
            (group, ReplicationAction::Export { dir })
        }
        ReplicationCommand::Remove {
            group,
            delete_replica,
            yes,
        } => {
            if delete_replica && !yes {
                bail!("--delete-replica deletes the replica's disks on the replica server, which cannot be undone; add --yes to confirm, or leave out --delete-replica to keep the replica");
            }
            (group, ReplicationAction::Remove { delete_replica })
        }
    };
    let timeout = match action {
        ReplicationAction::Export { .. } | ReplicationAction::Failover { .. } => {
            control::EXPORT_TIMEOUT
        }
        _ => ADMIN_TIMEOUT,
    };
    let done: ActionDone = control::call_typed(
        socket,
        control::PRIMARY,
        &ControlRequest::Replication { group, action },
        timeout,
    )?;
    println!("{}", done.message);
    Ok(())
}

fn status(socket: &Path, group: &str, watch: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    loop {
        let request = ControlRequest::GroupStatus {
            group: group.to_string(),
        };
        let found: GroupReport =
            control::call_typed(socket, control::PRIMARY, &request, Duration::from_secs(30))?;
        let Some(consumer) = &found.consumer else {
            bail!("Group {group:?} has no consumer");
        };
        let state = consumer.state;
        let words = state_name(state).replace('_', " ");
        let line = match &consumer.resync {
            Some(resync) => {
                let (done, total) = (resync.done_bytes, resync.total_bytes);
                format!(
                    "{group}: {words} {} {} of {}",
                    progress_bar(done, total),
                    human_bytes(done),
                    human_bytes(total)
                )
            }
            None => format!(
                "{group}: {words}, health {}, replica {} behind",
                consumer
                    .health
                    .map_or_else(|| "?".to_string(), |health| format!("{health:?}")),
                consumer.lag_secs.map_or_else(|| "?".into(), human_duration)
            ),
        };
        let mut out = std::io::stdout().lock();
        if watch && tty {
            write!(out, "\r\x1b[2K{line}")?;
        } else {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        // A copy waiting for external media does not move on by itself.
        let waits_for_admin = matches!(
            state,
            ReplicationState::AwaitingExport | ReplicationState::AwaitingImport
        );
        let copying = consumer.resync.is_some() || state == ReplicationState::InitialReplication;
        if !watch || waits_for_admin || !copying {
            if watch && tty {
                writeln!(out)?;
            }
            if let Some(error) = &consumer.last_error {
                writeln!(out, "last error: {error}")?;
            }
            return Ok(());
        }
        drop(out);
        std::thread::sleep(Duration::from_secs(1));
    }
}
