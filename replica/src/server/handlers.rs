//! The API's handlers: a parsed call (see [`api`]) run against the replica it names,
//! store operations on the blocking pool under that replica's mutex, and what the
//! store refuses answered as the API's refusals.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tracing::{info, warn};
use wire::api::{
    CommitRequest, DiskInfo, EnableRequest, ErrorCode, HashAnswer, HashRequest, InitialMethod,
    TransferOffer,
};
use wire::error_chain;

use super::admin::failed_over;
use super::api::{self, refuse, ApiCall, Refusal, ReplicaCall};
use super::authorization::Peer;
use super::http::{blocking, json, json_body, store_refusal, Answer};
use super::{load, lock, upload, Context};
use crate::limits::Slot;
use crate::store::{Claim, Replica, ReplicaState};
use image_ops::hash;

/// An upload's place among the peer's uploads in progress, held until it ends. Over
/// the limit the upload is refused as busy before any of its body is read, so a
/// primary's uploads hold a bounded amount of memory.
fn upload_slot(context: &Context, peer: &Peer) -> Result<Slot<String>, Refusal> {
    context.uploads.take(peer.identity.clone()).map_err(|_| {
        refuse(
            ErrorCode::Busy,
            format!(
                "{} chunk uploads of {} are in progress already; retry later",
                context.settings.limits.max_uploads_per_primary, peer.identity
            ),
        )
    })
}

pub(super) async fn route(
    context: &Arc<Context>,
    peer: &Peer,
    request: Request<Incoming>,
) -> Result<Answer, Refusal> {
    let call = api::parse(request.method(), request.uri().path(), request.headers())?;
    let (name, call) = match call {
        ApiCall::Echo => return Ok(json(StatusCode::OK, &serde_json::json!({}))),
        ApiCall::Enable { epoch } => {
            let enable: EnableRequest = json_body(request).await?;
            api::check_enable(&enable, context.settings.max_disk_size)?;
            let (context, peer) = (Arc::clone(context), peer.clone());
            return blocking(move || enable_replica(&context, &peer, enable, epoch)).await;
        }
        ApiCall::Replica { name, call } => (name, call),
    };
    let dir = peer.storage.join(name);
    let replica = {
        let (context, peer, dir) = (Arc::clone(context), peer.clone(), dir.clone());
        blocking(move || find(&context, &peer, &dir)).await?
    };
    match call {
        ReplicaCall::Info => Ok(json(StatusCode::OK, &lock(&replica).info())),
        ReplicaCall::Remove(claim) => {
            lock(&replica)
                .check_relationship(claim)
                .map_err(|e| store_refusal(&e))?;
            let context = Arc::clone(context);
            blocking(move || remove_replica(&context, &dir, &replica)).await
        }
        ReplicaCall::PlannedFailover(claim) => {
            let asked: wire::api::FailoverRequest = json_body(request).await?;
            let context = Arc::clone(context);
            blocking(move || planned_failover(&context, &dir, &replica, claim, asked.cycle)).await
        }
        ReplicaCall::Hashes(claim) => {
            let asked: HashRequest = json_body(request).await?;
            blocking(move || hash_replica_disk(&replica, claim, &asked)).await
        }
        ReplicaCall::Offer(claim) => {
            let offer: TransferOffer = json_body(request).await?;
            blocking(move || {
                let mut replica = lock(&replica);
                if replica.state().awaiting_import {
                    replica
                        .check_relationship(claim)
                        .map_err(|e| store_refusal(&e))?;
                    return Err(refuse(
                        ErrorCode::Busy,
                        format!("Replica {} waits for its initial copy to be imported from external media (`blkrep replica import` on the replica server)", replica.state().name),
                    ));
                }
                let answer = replica
                    .offer(claim, &offer)
                    .map_err(|e| store_refusal(&e))?;
                // What this server decodes goes with every answer: the primary picks
                // its codec per transfer.
                Ok(json(StatusCode::OK, &answer.announcing_codecs()))
            })
            .await
        }
        ReplicaCall::PutChunk { claim, id, index } => {
            let _upload = upload_slot(context, peer)?;
            let stored = upload::receive(&replica, claim, id, index, request).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "have_chunks": stored }),
            ))
        }
        ReplicaCall::Commit { claim, id } => {
            let commit: CommitRequest = json_body(request).await?;
            let apply = context.apply.clone();
            blocking(move || {
                let mut replica = lock(&replica);
                replica
                    .commit(claim, id, commit.chunks)
                    .map_err(|e| store_refusal(&e))?;
                apply.request(&dir);
                Ok(json(StatusCode::OK, &replica.info()))
            })
            .await
        }
    }
}

/// A planned failover its primary asked for: once the last cycle is applied, the
/// replica becomes the live copy (and its primary is refused from then on).
fn planned_failover(
    context: &Context,
    dir: &Path,
    replica: &Mutex<Replica>,
    claim: Claim,
    cycle: u64,
) -> Result<Answer, Refusal> {
    let failed = once_applied(replica, claim, |replica| {
        let last = replica.state().last_received_cycle;
        if last != Some(cycle) {
            return Err(refuse(
                ErrorCode::Conflict,
                format!(
                    "Cycle {cycle} is not the last one received (that is {last:?}): ship every change first"
                ),
            ));
        }
        let failover = replica
            .fail_over(None, true)
            .map_err(|e| store_refusal(&e))?;
        warn!(replica = %replica.state().name, cycle = failover.stamp.cycle, "Planned failover: the replica is now the live copy");
        Ok(failed_over(dir, replica))
    })?;
    let info = failed.info.clone();
    let listener = lock(&context.failover_listener).clone();
    if let Some(listener) = listener {
        listener(failed);
    }
    Ok(json(StatusCode::OK, &info))
}

/// How long a request waits for received transfers to be applied.
const APPLIED_WAIT: Duration = Duration::from_secs(60);

/// Runs `then` on `replica` (which `claim` must own) under its lock once every
/// received transfer is applied, waiting at most [`APPLIED_WAIT`] for that.
fn once_applied<T>(
    replica: &Mutex<Replica>,
    claim: Claim,
    mut then: impl FnMut(&mut Replica) -> Result<T, Refusal>,
) -> Result<T, Refusal> {
    let deadline = std::time::Instant::now() + APPLIED_WAIT;
    loop {
        {
            let mut replica = lock(replica);
            replica
                .check_relationship(claim)
                .map_err(|e| store_refusal(&e))?;
            if replica.state().queue.is_empty() {
                return then(&mut replica);
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(refuse(
                ErrorCode::Busy,
                "Received transfers are still being applied; ask again later",
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hashes ranges of a replica disk once every received transfer is applied (the
/// hashes then describe what the next transfers build on). The replica is not locked
/// while hashing.
fn hash_replica_disk(
    replica: &Mutex<Replica>,
    claim: Claim,
    asked: &HashRequest,
) -> Result<Answer, Refusal> {
    let (path, size) = once_applied(replica, claim, |replica| {
        let disk = usize::try_from(asked.disk)
            .ok()
            .and_then(|index| replica.state().disks.get(index))
            .ok_or_else(|| refuse(ErrorCode::BadRequest, "No such disk"))?;
        Ok((replica.disk_path(&disk.name), disk.size))
    })?;
    hash::check_ranges(&asked.ranges, size)
        .map_err(|e| refuse(ErrorCode::BadRequest, e.to_string()))?;
    let image = std::fs::File::open(&path).map_err(|e| {
        refuse(
            ErrorCode::Internal,
            format!("Cannot open {}: {e}", path.display()),
        )
    })?;
    let hashes = hash::hash_ranges(&image, size, &asked.ranges).map_err(|e| {
        refuse(
            ErrorCode::Internal,
            format!("Cannot hash {}: {}", path.display(), error_chain(&e)),
        )
    })?;
    Ok(json(
        StatusCode::OK,
        &HashAnswer {
            hashes: hashes.iter().map(hash::to_hex).collect(),
        },
    ))
}

/// The replica in `dir` if it exists and belongs to the peer's trust group.
fn find(context: &Context, peer: &Peer, dir: &Path) -> Result<Arc<Mutex<Replica>>, Refusal> {
    let not_found = || refuse(ErrorCode::NotFound, "No such replica");
    if !Replica::exists(dir) {
        return Err(not_found());
    }
    let replica = load(context, dir).map_err(|e| store_refusal(&e))?;
    if lock(&replica).state().trust_group != peer.trust_group {
        return Err(not_found());
    }
    Ok(replica)
}

/// Enables replication of a group: creates its replica, or, if it exists, claims an
/// existing copy, answers for a replica enabled already, or adds the disks appended
/// to the group's list (see [`enable_existing`]).
fn enable_replica(
    context: &Context,
    peer: &Peer,
    enable: EnableRequest,
    epoch: u64,
) -> Result<Answer, Refusal> {
    let claim = Claim {
        relationship: enable.relationship,
        epoch,
    };
    let dir = peer.storage.join(&enable.name);
    if Replica::exists(&dir) {
        return enable_existing(context, peer, &enable, claim, &dir);
    }
    if enable.initial == InitialMethod::Existing {
        return Err(refuse(
            ErrorCode::NotFound,
            format!(
                "No existing copy of {} on this replica server; place one with `blkrep replica seed`, or enable with the network initial replication",
                enable.name
            ),
        ));
    }
    check_room(context, peer, total_size(&enable.disks))?;
    let mut state = ReplicaState::new(
        enable.name.clone(),
        peer.trust_group.clone(),
        claim,
        enable.primary_host,
        peer.identity.clone(),
        enable.disks,
    );
    state.awaiting_import = enable.initial == InitialMethod::Media;
    if let Some(policy) = enable.recovery {
        state.recovery = policy;
    }
    let replica =
        Replica::create(&dir, state, context.settings.reserve).map_err(|e| store_refusal(&e))?;
    info!(replica = %enable.name, identity = %peer.identity, trust_group = %peer.trust_group, "Replica created");
    let info = replica.info();
    lock(&context.replicas).insert(dir, Arc::new(Mutex::new(replica)));
    Ok(json(StatusCode::CREATED, &info))
}

/// What an enable request is to the existing, claimed replica of its relationship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enabling {
    /// The same disks: replication is enabled already.
    Same,
    /// The replica's disks, then more from this index on: they are added.
    Adds(usize),
}

/// An enable request for the replica in `dir`, which exists. Disks appended to the
/// group's list are added once they pass the checks a new replica's pass (the room
/// checks run without the replica locked, as they lock every replica of the storage
/// in turn; the request is judged again under the lock before anything changes).
fn enable_existing(
    context: &Context,
    peer: &Peer,
    enable: &EnableRequest,
    claim: Claim,
    dir: &Path,
) -> Result<Answer, Refusal> {
    let replica = load(context, dir).map_err(|e| store_refusal(&e))?;
    let first = {
        let replica = lock(&replica);
        if replica.state().trust_group != peer.trust_group {
            return Err(refuse(
                ErrorCode::OtherRelationship,
                "The replica name is in use",
            ));
        }
        if replica.is_unclaimed() {
            return claim_existing_copy(replica, peer, enable, claim);
        }
        judge_enable(&replica, enable, claim)?
    };
    if let Enabling::Adds(had) = first {
        check_room(context, peer, total_size(&enable.disks[had..]))?;
    }
    let mut replica = lock(&replica);
    match judge_enable(&replica, enable, claim)? {
        Enabling::Same => {}
        Enabling::Adds(had) if first == Enabling::Adds(had) => {
            let added = &enable.disks[had..];
            replica.add_disks(added).map_err(|e| store_refusal(&e))?;
            let names: Vec<&str> = added.iter().map(|d| d.name.as_str()).collect();
            let sizes: Vec<u64> = added.iter().map(|d| d.size).collect();
            info!(replica = %enable.name, identity = %peer.identity, ?names, ?sizes, "Disks added");
        }
        Enabling::Adds(_) => {
            return Err(refuse(
                ErrorCode::Busy,
                format!(
                    "Replica {} changed while this request was checked; retry",
                    enable.name
                ),
            ));
        }
    }
    if let Some(policy) = enable.recovery.filter(|p| *p != replica.state().recovery) {
        replica
            .set_recovery(policy)
            .map_err(|e| store_refusal(&e))?;
    }
    Ok(json(StatusCode::OK, &replica.info()))
}

/// Judges an enable request for `replica`, claimed by a primary: its relationship at
/// its epoch, and the same disks or the replica's followed by more.
fn judge_enable(
    replica: &Replica,
    enable: &EnableRequest,
    claim: Claim,
) -> Result<Enabling, Refusal> {
    let state = replica.state();
    if state.failover.is_some() {
        return Err(refuse(
            ErrorCode::Superseded,
            format!(
                "Replica {} was failed over to and is the group's live copy: no primary can replicate into it or replace it",
                state.name
            ),
        ));
    }
    if state.relationship != enable.relationship {
        return Err(refuse(
            ErrorCode::OtherRelationship,
            format!(
                "Replica {} exists for another relationship (enabled by {} from {}); remove it on the replica server first",
                state.name, state.enabled_by, state.primary_host
            ),
        ));
    }
    replica
        .check_relationship(claim)
        .map_err(|e| store_refusal(&e))?;
    if state.disks == enable.disks {
        return Ok(Enabling::Same);
    }
    let had = state.disks.len();
    if !extends(&state.disks, &enable.disks) {
        return Err(refuse(
            ErrorCode::OtherRelationship,
            format!(
                "Replica {} has disks {}; the primary has {}: a disk can only be added after the existing ones, none removed, renamed, resized or reordered. Put the group's disks back in their order and sizes on the primary, or remove the replica on the replica server and enable replication again (a full copy)",
                state.name,
                describe(&state.disks),
                describe(&enable.disks)
            ),
        ));
    }
    replica
        .check_add_disks(&enable.disks[had..])
        .map_err(|e| store_refusal(&e))?;
    Ok(Enabling::Adds(had))
}

/// Whether `longer` is `disks` followed by at least one more disk.
fn extends(disks: &[DiskInfo], longer: &[DiskInfo]) -> bool {
    longer.len() > disks.len() && longer.starts_with(disks)
}

/// Disks as an administrator reads them: "a (1024 bytes), b (2048 bytes)".
fn describe(disks: &[DiskInfo]) -> String {
    disks
        .iter()
        .map(|d| format!("{} ({} bytes)", d.name, d.size))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sizes of `disks`, added up.
fn total_size(disks: &[DiskInfo]) -> u64 {
    disks.iter().fold(0u64, |sum, d| sum.saturating_add(d.size))
}

/// Fails unless the peer's storage can take `asked` more bytes of disks: its free
/// space above the reserve, and its quota with every replica of the storage counted.
fn check_room(context: &Context, peer: &Peer, asked: u64) -> Result<(), Refusal> {
    let needed: u64 = context.settings.reserve;
    let free = crate::store::free_space(&peer.storage).map_err(|e| store_refusal(&e))?;
    if free < needed {
        return Err(refuse(
            ErrorCode::InsufficientStorage,
            format!("{free} bytes free, {needed} kept in reserve"),
        ));
    }
    if let Some(quota) = peer.quota {
        let used = provisioned(context, &peer.storage);
        if used.saturating_add(asked) > quota {
            return Err(refuse(
                ErrorCode::InsufficientStorage,
                format!(
                    "The quota of this primary's storage is {quota} bytes of disks; its replicas have {used} and these disks need {asked} more"
                ),
            ));
        }
    }
    Ok(())
}

/// The disk sizes of every replica in `storage`, added up.
fn provisioned(context: &Context, storage: &Path) -> u64 {
    let Ok(dirs) = std::fs::read_dir(storage) else {
        return 0;
    };
    dirs.flatten()
        .filter(|dir| Replica::exists(&dir.path()))
        .filter_map(|dir| load(context, &dir.path()).ok())
        .flat_map(|replica| {
            let sizes: Vec<u64> = lock(&replica)
                .state()
                .disks
                .iter()
                .map(|d| d.size)
                .collect();
            sizes
        })
        .fold(0u64, u64::saturating_add)
}

/// Gives a seeded existing copy to the enabling primary, if it asked for one and the
/// disks match.
fn claim_existing_copy(
    mut replica: std::sync::MutexGuard<'_, Replica>,
    peer: &Peer,
    enable: &EnableRequest,
    claim: Claim,
) -> Result<Answer, Refusal> {
    let state = replica.state();
    if extends(&state.disks, &enable.disks) {
        replica
            .check_add_disks(&enable.disks[state.disks.len()..])
            .map_err(|e| store_refusal(&e))?;
    }
    if enable.initial != InitialMethod::Existing {
        return Err(refuse(
            ErrorCode::OtherRelationship,
            format!(
                "Replica {} is an existing copy seeded on the replica server; enable with initial_replication = \"existing\" to use it, or remove it there",
                state.name
            ),
        ));
    }
    if state.disks != enable.disks {
        return Err(refuse(
            ErrorCode::OtherRelationship,
            format!(
                "The existing copy {} has disks {}; the primary has {}",
                state.name,
                describe(&state.disks),
                describe(&enable.disks)
            ),
        ));
    }
    replica
        .claim(claim, &enable.primary_host, &peer.identity)
        .map_err(|e| store_refusal(&e))?;
    info!(replica = %enable.name, identity = %peer.identity, "Existing copy claimed; blocks are compared before any is sent");
    Ok(json(StatusCode::OK, &replica.info()))
}

fn remove_replica(
    context: &Context,
    dir: &Path,
    replica: &Arc<Mutex<Replica>>,
) -> Result<Answer, Refusal> {
    let mut guard = lock(replica);
    // Out of the map first: whoever looks the name up from now on gets a new
    // replica or none, never this one.
    lock(&context.replicas).remove(dir);
    guard.remove().map_err(|e| store_refusal(&e))?;
    info!(replica = %guard.state().name, "Replica removed");
    Ok(json(StatusCode::OK, &serde_json::json!({})))
}
