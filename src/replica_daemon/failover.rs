//! Test failover and failover of a replica: the replica server changes the
//! replica's state, the daemon serves its disks over NBD and, after a failover, runs
//! the failover hook.

use super::live::LIVE_RING;
use super::render::{format_ms, point_kind};
use replica::server::FailedOver;
use std::path::Path;

use tracing::{info, warn};
use wire::api::ReplicaInfo;

use super::config::FailoverHook;
use super::live::ServeError;
use super::protocol::{FailedOverTo, TestStarted};
use super::Daemon;

/// Starts a test failover and serves its disks.
pub(super) fn start_test(
    control: &Daemon,
    name: &str,
    trust_group: Option<&str>,
    point: Option<u64>,
) -> Result<TestStarted, ServeError> {
    let (info, overlays) = control.server.start_test(name, trust_group, point)?;
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
            return Err(ServeError::Export {
                export: export.clone(),
                source: error,
            });
        }
    }
    Ok(TestStarted {
        replica: info,
        nbd_socket: control.nbd_socket.clone(),
    })
}

/// Fails over to a replica, serves its disks and runs the failover hook.
pub(super) fn fail_over(
    control: &Daemon,
    name: &str,
    trust_group: Option<&str>,
    point: Option<u64>,
) -> Result<FailedOverTo, ServeError> {
    let (dir, before) = control.server.replica(name, trust_group)?;
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
            return Err(error.into());
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
    Ok(FailedOverTo {
        replica: failed.info,
        nbd_socket: control.nbd_socket.clone(),
        exports,
        hook,
    })
}

/// Runs the failover hook with the point's metadata in its environment. Returns
/// its outcome for the answer (a failed hook does not undo the failover).
pub(super) fn run_failover_hook(
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
pub(super) fn stop_test(
    control: &Daemon,
    name: &str,
    trust_group: Option<&str>,
    force: bool,
) -> Result<ReplicaInfo, ServeError> {
    let (_, info) = control.server.replica(name, trust_group)?;
    let Some(test) = &info.test_failover else {
        return Err(ServeError::Refused(format!(
            "No test failover of {name} is running"
        )));
    };
    let connected: u64 = test
        .exports
        .iter()
        .filter_map(|export| control.nbd.export_stats(export))
        .map(|stats| stats.connections)
        .sum();
    if connected > 0 && !force {
        return Err(ServeError::Refused(format!(
            "{connected} NBD client(s) are connected to the test's disks: shut the test VM down first, or pass --force to cut them off (the test's writes are discarded either way)"
        )));
    }
    for export in &test.exports {
        control.nbd.remove_export(export);
    }
    Ok(control.server.stop_test(name, trust_group)?)
}

/// The replica `name` (of `trust_group`) in a status report.
pub(super) fn pick<'a>(
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
