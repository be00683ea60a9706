//! Planned failover: once the group's writes are fenced off, every change ships, every
//! block of the replica is compared with the images, and the replica takes over; this
//! primary is then superseded and never ships to it again.

use tracing::{error, info, warn};
use wire::error_chain;

use crate::compare;
use crate::resync::ResyncMaps;
use crate::sink::SinkError;

use super::worker::Gate;
use super::{not_now, Refusal};
use super::{ShipperError, Worker};

/// Why a superseded group does not ship, and what the administrator can do.
pub(super) fn superseded_message(group: &str, reason: &str) -> String {
    format!(
        "Group {group} is superseded: its replica was failed over to and is the live copy ({reason}). These disks are no longer the group's live disks and are never shipped over it; keep them aside, and stop replicating them with `blkrep replication remove --group {group}`"
    )
}

impl Worker {
    /// Planned failover (the group's writes are fenced off): ships every change,
    /// checks that every block of the replica equals the image's, and has the replica
    /// take over; this primary is then superseded.
    pub(super) fn planned_failover(&mut self) -> Result<String, ShipperError> {
        let name = self.group.name().to_string();
        match self.gate() {
            Gate::Open => {}
            Gate::Superseded(reason) => {
                return Err(ShipperError::Refused(Refusal::Superseded {
 group: name.to_string(),
 reason: reason.clone(),
 }))
            }
            _ => {
                return Err(not_now(format!(
                    "Replication of group {name} is not running (paused, suspended, removed or not started): resume it first"
                )))
            }
        }
        if self.resync.is_some() || self.group.resync_reason().is_some() {
            return Err(not_now(format!(
                "Group {name} is resynchronising: the replica is not consistent until that ends; fail over once it is replicating"
            )));
        }
        let cycle = self.ship()?;
        if self.resync.is_some() || self.group.resync_reason().is_some() {
            return Err(not_now(format!(
                "Group {name} needed a resync while shipping its last changes; fail over once it is replicating"
            )));
        }
        // Every block of every disk, compared.
        let sizes = self.group.disk_sizes();
        let maps = sizes
            .iter()
            .map(|size| {
                let blocks = usize::try_from(size.div_ceil(self.block_size)).unwrap_or(usize::MAX);
                tracker::DirtyBits::repeat(true, blocks)
            })
            .collect();
        let mut maps = ResyncMaps::new(maps, self.block_size, sizes);
        let stats =
            compare::narrow(&mut maps, &self.images, self.sink.as_mut())?.ok_or_else(|| {
                not_now(format!(
                    "{} cannot compare blocks, so it cannot be failed over to",
                    self.sink.describe()
                ))
            })?;
        if stats.differing_bytes > 0 {
            return Err(not_now(format!(
                "After shipping every change up to cycle {cycle}, the replica differs from the images in {} bytes; failover refused (resync, then try again)",
                stats.differing_bytes
            )));
        }
        info!(group = %name, cycle, bytes = stats.marked_bytes, hashes = stats.hashes, "Replica equals the images; handing the group over");
        // Fenced on disk before the request goes out: the replica may take over even
        // if its answer is lost, and then these disks must never take writes again.
        self.record_fenced(true)?;
        if let Err(error) = self.sink.fail_over(cycle) {
            let unknown =
                matches!(&error, SinkError::Remote { source, .. } if source.outcome_unknown());
            if unknown {
                error!(group = %name, cycle, error = %error_chain(&error), "The replica's answer to the hand-over was lost: it may be the live copy now, so these disks stay fenced");
            } else {
                self.record_fenced(false)?;
            }
            return Err(error.into());
        }
        let reason = format!("planned failover at cycle {cycle}");
        if let Some(relationship) = &mut self.relationship {
            relationship.state.superseded = Some(reason);
            relationship.state.fenced = true;
            relationship.save()?;
        }
        warn!(target: "blkrep_event", event = "planned_failover", group = %name, reason = "an administrator's planned failover", cycle, "Planned failover done: the replica is the live copy; this primary no longer ships and its disks refuse writes");
        Ok(format!(
            "Group {name} failed over to its replica at cycle {cycle}: every block compared equal ({} bytes); the replica serves the live disks, and these refuse writes",
            stats.marked_bytes
        ))
    }

    /// Records whether a planned failover fenced the group's disks (they refuse writes,
    /// also after a restart).
    fn record_fenced(&mut self, fenced: bool) -> Result<(), ShipperError> {
        if let Some(relationship) = &mut self.relationship {
            relationship.state.fenced = fenced;
            relationship.save()?;
        }
        Ok(())
    }
}
