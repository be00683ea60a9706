//! What a reload changes: the running groups against the configuration file read
//! again ([`plan`]), and the settings that only a restart applies
//! ([`settings_needing_restart`]).
//!
//! A group is identified by its name. A group in the file and not running is added;
//! one running and no longer in the file is removed; one in both with any setting
//! changed (its disks, ring, consumer, interval ...) is closed and opened again with
//! the new settings; disks added after the group's existing ones are taken in by the
//! ring when it opens (`tracker::OpenReport::added_disks`) and copied by a resync.
//! Daemon-wide settings (listeners, control socket, metrics, replication defaults) are
//! read at start only.

use crate::config::{GroupConfig, PrimaryConfig};

/// The group changes a reload makes.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    /// Groups of the file that do not run.
    pub(crate) add: Vec<GroupConfig>,
    /// Running groups the file no longer has.
    pub(crate) remove: Vec<String>,
    /// Running groups whose settings changed: their new settings.
    pub(crate) change: Vec<GroupConfig>,
    /// Running groups the file has unchanged.
    pub(crate) keep: Vec<String>,
}

/// Compares the running groups' settings with the file's groups.
pub(crate) fn plan<'a>(
    running: impl IntoIterator<Item = &'a GroupConfig>,
    file: &[GroupConfig],
) -> Plan {
    let running: Vec<&GroupConfig> = running.into_iter().collect();
    let mut plan = Plan::default();
    for old in &running {
        match file.iter().find(|new| new.name == old.name) {
            None => plan.remove.push(old.name.clone()),
            Some(new) if new == *old => plan.keep.push(old.name.clone()),
            Some(new) => plan.change.push(new.clone()),
        }
    }
    plan.add = file
        .iter()
        .filter(|new| running.iter().all(|old| old.name != new.name))
        .cloned()
        .collect();
    plan
}

/// The daemon-wide settings that differ between `started` (what the daemon runs
/// with) and `file`, by their names in the file.
pub(crate) fn settings_needing_restart(
    started: &PrimaryConfig,
    file: &PrimaryConfig,
) -> Vec<String> {
    let (old, new) = (&started.nbd, &file.nbd);
    [
        (
            "control_socket",
            started.control_socket == file.control_socket,
        ),
        ("metrics", started.metrics == file.metrics),
        ("event_log", started.event_log == file.event_log),
        ("replication", started.replication == file.replication),
        ("nbd.unix_socket", old.unix_socket == new.unix_socket),
        ("nbd.tcp", old.tcp == new.tcp),
        ("nbd.tls", old.tls == new.tls),
        ("nbd.tls_cert", old.tls_cert == new.tls_cert),
        ("nbd.tls_key", old.tls_key == new.tls_key),
        ("nbd.tls_ca", old.tls_ca == new.tls_ca),
        ("nbd.socket_mode", old.socket_mode == new.socket_mode),
        ("nbd.socket_group", old.socket_group == new.socket_group),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(name, _)| name.to_string())
    .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The file as read, before validation (which would look for the images).
    fn config(text: &str) -> PrimaryConfig {
        toml::from_str(text).unwrap()
    }

    const BASE: &str = r#"
        control_socket = "/run/blkrep/primary.ctl"
        [nbd]
        unix_socket = "/run/blkrep/nbd.sock"
        [[group]]
        name = "vm1"
        ring = "/var/lib/blkrep/vm1.ring"
        [[group.disk]]
        name = "vm1-disk0"
        image = "/var/lib/images/vm1.img"
        [[group]]
        name = "vm2"
        ring = "/var/lib/blkrep/vm2.ring"
        [[group.disk]]
        name = "vm2-disk0"
        image = "/var/lib/images/vm2.img"
    "#;

    #[test]
    fn the_same_file_changes_nothing() {
        let old = config(BASE);
        let plan = plan(&old.groups, &config(BASE).groups);
        assert_eq!(plan.keep, ["vm1", "vm2"]);
        assert!(plan.add.is_empty() && plan.remove.is_empty() && plan.change.is_empty());
        assert!(settings_needing_restart(&old, &config(BASE)).is_empty());
    }

    #[test]
    fn groups_are_added_removed_and_changed_by_name() {
        let old = config(BASE);
        let new = config(
            &BASE
                .replace("name = \"vm1\"", "name = \"vm3\"")
                .replace("vm2.img", "vm2-moved.img"),
        );
        let plan = plan(&old.groups, &new.groups);
        assert_eq!(plan.remove, ["vm1"]);
        assert_eq!(
            plan.add.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            ["vm3"]
        );
        assert_eq!(plan.change.len(), 1);
        assert_eq!(plan.change[0].name, "vm2");
        assert_eq!(
            plan.change[0].disks[0].image,
            std::path::Path::new("/var/lib/images/vm2-moved.img")
        );
        assert!(plan.keep.is_empty());
    }

    #[test]
    fn daemon_wide_settings_are_named_for_a_restart() {
        let old = config(BASE);
        let new = config(&BASE.replace("nbd.sock", "nbd2.sock").replace(
            "control_socket = \"/run/blkrep/primary.ctl\"",
            "control_socket = \"/run/blkrep/p.ctl\"\nmetrics = \"127.0.0.1:9441\"",
        ));
        assert_eq!(
            settings_needing_restart(&old, &new),
            ["control_socket", "metrics", "nbd.unix_socket"]
        );
        assert!(plan(&old.groups, &new.groups).change.is_empty());
    }
}
