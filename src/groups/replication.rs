//! Replication to a replica server: the consumer a group's shipper sends through,
//! replication started on a running group (a failed-over group's live disks
//! replicated back), and the planned failover that hands a group over to its replica.

use std::time::{Duration, UNIX_EPOCH};

use base::sync::lock;
use nbd_shim::Server;
use shipper::remote::{ClientSettings, Credentials, Relationship, ReplicaClient};
use shipper::{
    AdminAction, CycleSink, RemoteOptions, RemoteSink, ReplicationSetup, RetryPolicy, Shipper,
    ShipperOptions,
};
use tracing::{info, warn};

use super::{GroupError, RunningGroup, SharedReplication};
use crate::config::{ConsumerConfig, GroupConfig, ReplicaConsumer};
use crate::control;

impl RunningGroup {
    /// Starts replicating a running group (a failed-over replica's live disks
    /// replicated back, once): a shipper over its tracker, to the replica server
    /// `replica` describes, a cycle every `interval`, at failover epoch `epoch`.
    pub(crate) fn start_replication(
        &mut self,
        replica: &ReplicaConsumer,
        interval: Duration,
        epoch: u64,
    ) -> Result<(), GroupError> {
        let name = self.config.name.clone();
        let failed = |reason: String| GroupError::Replication {
            group: name.clone(),
            reason,
        };
        let Some(tracker) = &self.tracker else {
            return Err(failed("its writes are not tracked".into()));
        };
        if self.shipper.is_some() {
            return Err(failed("it replicates already".into()));
        }
        let mut config = self.config.clone();
        config.interval = crate::config::Interval(interval);
        config.consumer = Some(ConsumerConfig::Replica(Box::new(replica.clone())));
        let shared = SharedReplication::new(None, None);
        let (sink, setup) = replica_sink(&config, replica, &shared, false, epoch)?;
        let options = ShipperOptions {
            interval,
            retry: RetryPolicy {
                scale: replica.retry_scale,
            },
            replication: Some(setup),
            app_consistent: None,
        };
        let images = config.disks.iter().map(|d| d.image.clone()).collect();
        let shipper = Shipper::spawn(tracker.clone(), images, config.block_size.0, options, sink)
            .map_err(|source| GroupError::Shipper {
            group: name.clone(),
            source,
        })?;
        self.shipper = Some(shipper);
        self.config = config;
        Ok(())
    }

    /// Planned failover: refuses while NBD clients are connected to the group's
    /// exports on `server` unless `force`, fences the group's writes, then has its
    /// shipper ship everything, compare every block and hand the group over to the
    /// replica. If that fails, writes are accepted again. Returns what happened.
    pub(crate) fn planned_failover(&self, server: &Server, force: bool) -> Result<String, String> {
        let group = &self.config.name;
        let Some(shipper) = &self.shipper else {
            return Err(format!(
                "Group {group} does not replicate, so there is no replica to fail over to"
            ));
        };
        let Some(tracker) = &self.tracker else {
            return Err(format!("Group {group} is not tracked"));
        };
        let mut handed_over = lock(&self.handed_over);
        if *handed_over {
            return Err(format!(
                "Group {group} was handed over to its replica by a planned failover already"
            ));
        }
        let connected: Vec<String> = self
            .exports()
            .filter_map(|export| {
                let connections = server.export_stats(export)?.connections;
                (connections > 0).then(|| format!("{export} ({connections})"))
            })
            .collect();
        if !connected.is_empty() && !force {
            return Err(format!(
                "NBD clients are still connected to {}: shut the VM down first, or pass --force (their writes fail from now on)",
                connected.join(", ")
            ));
        }
        tracker.refuse_writes(true);
        info!(%group, "Planned failover: writes are refused from now on");
        let message = shipper
            .admin(AdminAction::PlannedFailover, control::EXPORT_TIMEOUT)
            .map_err(|error| {
                // The shipper fences the disks on record before it asks the replica to
                // take over; then, or while it may still ask, writes stay refused.
                let fenced = Relationship::load_for_ring(&self.config.ring)
                    .ok()
                    .flatten()
                    .is_some_and(|record| record.fenced);
                if fenced || matches!(error, shipper::ShipperError::Timeout) {
                    warn!(%group, "Planned failover interrupted; the replica may have taken over, so writes stay refused");
                    return format!(
                        "{} (the replica may have taken the group over: these disks keep refusing writes; `blkrep replication status --group {group}` says superseded if it did; otherwise try again)",
                        shipper::error_chain(&error)
                    );
                }
                tracker.refuse_writes(false);
                warn!(%group, "Planned failover failed; writes are accepted again");
                format!(
                    "{} (the failover did not happen; writes are accepted again)",
                    shipper::error_chain(&error)
                )
            })?;
        *handed_over = true;
        Ok(message)
    }
}

/// The consumer of a group that replicates to a replica server, and what its shipper
/// needs to manage the relationship.
pub(super) fn replica_sink(
    config: &GroupConfig,
    replica: &ReplicaConsumer,
    shared: &SharedReplication,
    fresh_ring: bool,
    epoch: u64,
) -> Result<(Box<dyn CycleSink>, ReplicationSetup), GroupError> {
    let failed = |reason: String| GroupError::Replication {
        group: config.name.clone(),
        reason,
    };
    let credentials = match (&replica.psk_file, &replica.ca, &replica.cert, &replica.key) {
        (Some(psk_file), ..) => {
            let psk = crate::key_files::read_psk(psk_file)
                .map_err(|error| failed(wire::error_chain(&error)))?;
            warn!(group = %config.name, url = %replica.url, "Replication uses plain HTTP with a pre-shared key: traffic is NOT encrypted; for isolated labs only");
            Credentials::PlainWithPsk {
                identity: replica.identity.clone().unwrap_or_default(),
                psk,
            }
        }
        (None, Some(ca), Some(cert), Some(key)) => {
            let files = wire::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            };
            Credentials::Tls(
                wire::tls::client_config(&files)
                    .map_err(|error| failed(shipper::error_chain(&error)))?,
            )
        }
        _ => return Err(failed("ca, cert and key are required".into())),
    };
    let client = ReplicaClient::new(
        ClientSettings {
            url: replica.url.clone(),
            credentials,
            source_address: replica.source_address,
            request_timeout: replica.request_timeout.0,
        },
        0,
    )
    .map_err(failed)?;
    let mut throttles: Vec<_> =
        crate::config::throttle(replica.bandwidth_limit, &replica.bandwidth_schedule)
            .into_iter()
            .collect();
    throttles.extend(shared.throttle.clone());
    let sink = RemoteSink::new(
        client,
        &config.name,
        RemoteOptions {
            compression: replica.compression(),
            throttles,
        },
    );
    let start_after_unix = replica
        .start_at
        .as_deref()
        .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map(|since| since.as_secs());
    let setup = ReplicationSetup {
        relationship_path: Relationship::path_for_ring(&config.ring),
        replica_url: replica.url.clone(),
        primary_host: shared.host_name.clone(),
        disk_names: config.disks.iter().map(|d| d.name.clone()).collect(),
        fresh_ring,
        start_after_unix,
        initial: replica.initial_replication,
        // Media has no link to measure: compressed unless turned off. Nor a replica
        // to ask what it decodes: DEFLATE, which every replica imports.
        compression: replica.compression().codec_for(false),
        recovery: replica.recovery(),
        epoch,
    };
    Ok((Box::new(sink), setup))
}
