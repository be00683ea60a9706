//! The replica server's HTTP API: paths, messages and error codes.
//!
//! Every request is authenticated (mutual TLS) and
//! authorised against the server's list of allowed primaries; a primary sees only the
//! replicas of its own trust group. Bodies are JSON except chunk uploads, which carry
//! frames of [`crate::chunk`].
//!
//! Control requests (short connections, 120 s timeout, no retry of their own):
//! - `POST /v1/replicas`: [`EnableRequest`] → [`ReplicaInfo`]; creates the replica
//!   (or returns it if it exists with the same disks). Disks appended to an existing
//!   replica's list (the group's disks then new ones, none removed, renamed, resized
//!   or reordered) are added to it as zeroes; a resync then copies them.
//! - `GET /v1/replicas/{name}` → [`ReplicaInfo`]. `DELETE` removes it.
//! - `POST /v1/replicas/{name}/transfers`: [`TransferOffer`] → [`TransferAnswer`]; before
//!   any data: which chunks of this transfer the replica already holds, and which
//!   compressed chunk bodies it decodes.
//! - `POST /v1/replicas/{name}/transfers/{id}/commit`: [`CommitRequest`] →
//!   [`ReplicaInfo`]; answered once the transfer is durable on the replica.
//! - `POST /v1/replicas/{name}/failover`: [`FailoverRequest`] → [`ReplicaInfo`];
//!   planned failover, once the replica applied that last cycle: the replica becomes
//!   the live copy and refuses its primary from then on.
//! - `POST /v1/replicas/{name}/hashes`: [`HashRequest`] → [`HashAnswer`]; BLAKE3
//!   hashes of ranges of a replica disk, for a comparison with the primary's (an
//!   existing copy as the initial replication, a resync). Answered once every
//!   received transfer is applied, so the hashes describe what later batches build on.
//!
//! Data requests (one persistent connection, an echo every 90 s):
//! - `PUT /v1/replicas/{name}/transfers/{id}/chunks/{index}`: the frames of chunks
//!   `index`, `index + 1`, ... back to back, streamed (chunked) for as long as the
//!   transfer lasts; each is checked and stored as it arrives → `{"have_chunks": n}`,
//!   the chunks of the transfer the replica holds. Stored, not yet durable: the
//!   commit makes the transfer durable.
//! - `GET /v1/echo`: keep-alive.

use serde::{Deserialize, Serialize};

use crate::chunk::{BodyCodec, DECODED_CODECS};

/// Path prefix of every API request.
pub const API_PREFIX: &str = "/v1";
/// Header naming the replication relationship (hex) on every request about one replica.
pub const RELATIONSHIP_HEADER: &str = "x-blkrep-relationship";
/// Header carrying the failover epoch the sender speaks for (decimal; absent means
/// [`FIRST_EPOCH`]). Every failover raises the replica's epoch, and a replica refuses
/// any request of an older epoch: a former primary can never write to it again.
pub const EPOCH_HEADER: &str = "x-blkrep-epoch";
/// The epoch of a relationship that never failed over.
pub const FIRST_EPOCH: u64 = 1;

/// The highest failover epoch: a request naming a later one is refused, and a
/// failover that would pass it fails. Four billion failovers is no real limit; the
/// bound keeps every `epoch + 1` far from overflowing.
pub const MAX_EPOCH: u64 = 0xFFFF_FFFF;

/// [`FIRST_EPOCH`], as a serde default for records written before epochs existed.
pub fn first_epoch() -> u64 {
    FIRST_EPOCH
}

/// What a side of a relationship is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Receives and applies cycles.
    #[default]
    Replica,
    /// Serves the live disks (a replica after its failover).
    Primary,
}
/// Lab mode only (plain HTTP): the identity the primary claims, matched against the
/// authorisation entries as a certificate DNS name would be.
pub const IDENTITY_HEADER: &str = "x-blkrep-identity";
/// Lab mode only (plain HTTP): the pre-shared key that authenticates the claim.
pub const PSK_HEADER: &str = "x-blkrep-psk";
/// Largest JSON body either side accepts.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Longest replica or disk name.
pub const MAX_NAME: usize = 64;
/// Most ranges one [`HashRequest`] names.
pub const MAX_HASH_RANGES: usize = 4096;
/// Most bytes one [`HashRequest`] has hashed (a few seconds of reading).
pub const MAX_HASH_BYTES: u64 = 4 << 30;

/// Whether `name` may name a replica or a disk: 1 to 64 of `[A-Za-z0-9._-]`, not
/// starting with a dot. Such a name is safe as one path component.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One protected disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disk name within the group.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// Creates a replica of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnableRequest {
    /// The group's name; the replica's name.
    pub name: String,
    /// The group's disks, in group order.
    pub disks: Vec<DiskInfo>,
    /// The primary host's name, for the replica's records.
    pub primary_host: String,
    /// The relationship: chosen by the primary when replication is enabled, sent with
    /// every later request so a replica is never fed by two primaries.
    pub relationship: u64,
    /// Where the initial copy comes from.
    #[serde(default)]
    pub initial: InitialMethod,
    /// Recovery history to keep (none asked: the replica's current policy stays).
    #[serde(default)]
    pub recovery: Option<RecoveryPolicy>,
}

/// How many earlier states a replica keeps besides the latest, and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPolicy {
    /// Additional recovery points kept (0 to [`MAX_RECOVERY_POINTS`]); 0 keeps only
    /// the latest.
    pub points: u32,
    /// Least time between two additional points, in seconds (an application-consistent
    /// cycle always becomes a point).
    pub spacing_secs: u64,
}

/// Most additional recovery points a replica keeps.
pub const MAX_RECOVERY_POINTS: u32 = 24;

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            points: 0,
            spacing_secs: 3600,
        }
    }
}

impl RecoveryPolicy {
    /// Why the policy cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.points > MAX_RECOVERY_POINTS {
            return Some(format!(
                "{} additional recovery points asked; at most {MAX_RECOVERY_POINTS}",
                self.points
            ));
        }
        if self.spacing_secs == 0 {
            return Some("recovery point spacing must be at least one second".into());
        }
        None
    }
}

/// A state of the replica's disks that a failover can use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointInfo {
    /// Identifies the point on this replica (`latest` for the newest state).
    pub id: u64,
    /// The delta cycle after which the disks had this state.
    pub cycle: u64,
    /// When the primary closed that cycle (milliseconds since the epoch).
    pub time_unix_ms: u64,
    /// Taken while the guest's filesystems were frozen.
    pub app_consistent: bool,
    /// The latest point: the replica disks as they are.
    pub latest: bool,
    /// Undo bytes the point keeps (0 for the latest).
    pub size: u64,
}

/// Where a replica's initial copy comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialMethod {
    /// Every allocated block is sent over the network.
    #[default]
    Network,
    /// A copy placed on the replica server beforehand (`blkrep replica seed`: a
    /// restored backup, an old replica) is compared block by block; only differing
    /// blocks are sent. Enabling claims that copy.
    Existing,
    /// The primary exports the copy to a directory (`blkrep replication export`),
    /// which is carried to the replica server and imported there (`blkrep replica
    /// import`); until then the replica refuses cycles as busy.
    Media,
}

/// A range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// Asks for the hashes of ranges of one replica disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashRequest {
    /// Disk index, in group order.
    pub disk: u32,
    /// At most [`MAX_HASH_RANGES`] ranges of at most [`MAX_HASH_BYTES`] in all.
    pub ranges: Vec<ByteRange>,
}

/// BLAKE3 hashes (hex) of the requested ranges' contents, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashAnswer {
    /// One per range.
    pub hashes: Vec<String>,
}

/// What a transfer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransferKind {
    /// The changes of one closed cycle.
    Delta {
        /// Cycle number.
        cycle: u64,
        /// When the primary closed the cycle, in milliseconds since the epoch: the
        /// instant of the state the cycle completes (the recovery point's time).
        #[serde(default)]
        closed_unix_ms: u64,
        /// The cycle was closed while the guest's filesystems were frozen by the
        /// group's freeze command: an application-consistent point.
        #[serde(default)]
        app_consistent: bool,
    },
    /// A batch of a resync (or of the initial replication): blocks read from the
    /// images while writes went on. The replica is not consistent until the delta that
    /// follows the last batch is applied.
    Resync {
        /// Identifies the resync; a new one abandons an unfinished one.
        epoch: u64,
        /// Batch number within the resync, from 0.
        batch: u32,
        /// Whether this is the last batch.
        last: bool,
    },
}

impl TransferKind {
    /// A delta of `cycle` with no point metadata (its time unknown, crash-consistent).
    pub fn delta(cycle: u64) -> Self {
        TransferKind::Delta {
            cycle,
            closed_unix_ms: 0,
            app_consistent: false,
        }
    }
}

/// Announces a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferOffer {
    /// Transfer id: the same for every attempt to send the same transfer.
    pub id: u64,
    /// What it carries.
    pub kind: TransferKind,
    /// Record bytes it will carry at most (before compression), for the space check.
    pub bytes: u64,
}

/// A place in a group's disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// Disk index, in group order.
    pub disk: u32,
    /// Byte offset in that disk.
    pub offset: u64,
}

/// The replica's answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferAnswer {
    /// Chunks of this transfer already stored: send from this index on.
    pub have_chunks: u32,
    /// The transfer was committed before (a retry after a lost answer): nothing to send.
    pub committed: bool,
    /// For a resync batch: where the data the replica holds of it ends (the end of
    /// the last record of the stored chunks; of the whole batch once committed). A
    /// primary that lost its own account (it restarted) continues from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<Position>,
    /// The compressed chunk bodies the replica decodes, by name
    /// ([`BodyCodec::name`]): what the primary may send in this transfer. Names it
    /// does not know are ignored; older replicas leave the list out, and every
    /// replica decodes DEFLATE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codecs: Vec<String>,
}

impl TransferAnswer {
    /// The answer announcing every body codec this build decodes.
    pub fn announcing_codecs(self) -> Self {
        TransferAnswer {
            codecs: DECODED_CODECS
                .iter()
                .map(|codec| codec.name().to_string())
                .collect(),
            ..self
        }
    }

    /// Whether the replica decodes chunk bodies of `codec`.
    pub fn decodes(&self, codec: BodyCodec) -> bool {
        match codec {
            BodyCodec::Stored | BodyCodec::Deflate => true,
            BodyCodec::Zstd => self.codecs.iter().any(|name| name == codec.name()),
        }
    }
}

/// Planned failover: the primary shipped every change up to `cycle`, refuses writes,
/// and hands the group over to the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    /// The last cycle, which the replica must have applied.
    pub cycle: u64,
}

/// Ends a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    /// How many chunks the transfer has.
    pub chunks: u32,
}

/// Where a replica stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// Replica name.
    pub name: String,
    /// Trust group it belongs to.
    pub trust_group: String,
    /// Its disks.
    pub disks: Vec<DiskInfo>,
    /// Whether the disks hold a state the primary had (the last delta is applied and
    /// no resync is unfinished).
    pub consistent: bool,
    /// Newest cycle received durably.
    pub last_received_cycle: Option<u64>,
    /// Newest cycle applied to the disks.
    pub last_applied_cycle: Option<u64>,
    /// When it was applied (seconds since the epoch).
    pub last_applied_unix: Option<u64>,
    /// Transfers received and not yet applied.
    pub pending_transfers: u32,
    /// Transfers applied whose writes the replica disks have not synced yet: their
    /// files are kept as a redo log until then.
    #[serde(default)]
    pub unsynced_transfers: u32,
    /// The resync in progress, if any.
    pub resync_epoch: Option<u64>,
    /// Whether an administrator paused replication on the replica side.
    pub paused: bool,
    /// The initial copy comes by external media and was not imported yet.
    #[serde(default)]
    pub awaiting_import: bool,
    /// Transfers applied so far.
    #[serde(default)]
    pub applied_transfers: u64,
    /// Data bytes they wrote to the replica disks.
    #[serde(default)]
    pub applied_bytes: u64,
    /// Microseconds applying them took (the apply rate is bytes over time).
    #[serde(default)]
    pub apply_micros: u64,
    /// Microseconds the latest apply took.
    #[serde(default)]
    pub last_apply_micros: Option<u64>,
    /// The recovery history kept.
    #[serde(default)]
    pub recovery: RecoveryPolicy,
    /// Recovery points, oldest first; the latest last.
    #[serde(default)]
    pub recovery_points: Vec<RecoveryPointInfo>,
    /// The test failover in progress.
    #[serde(default)]
    pub test_failover: Option<TestFailoverInfo>,
    /// When the last test failover started (seconds since the epoch).
    #[serde(default)]
    pub last_test_unix: Option<u64>,
    /// Set once the replica was failed over to.
    #[serde(default)]
    pub failover: Option<FailoverInfo>,
    /// Its role: `primary` once failed over to.
    #[serde(default)]
    pub role: Role,
    /// The failover epoch (see [`EPOCH_HEADER`]).
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// An existing copy no relationship has claimed yet (seeded, or live disks a
    /// failback handed over): the next primary of the trust group that replicates
    /// this group with an existing copy claims it.
    #[serde(default)]
    pub unclaimed: bool,
}

/// What a replica's disks can be brought to, as status shows it. [`ReplicaInfo::consistent`]
/// is false during every apply (the disks are mid-change for that long); what an
/// administrator needs is whether a consistent state is kept to fail over to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// The disks hold the latest point's state.
    Consistent,
    /// The disks are mid-change: received transfers are being applied. The latest
    /// point, at this cycle, is kept; a failover reaches it once they are applied.
    Applying {
        /// The cycle of the latest consistent state.
        cycle: u64,
    },
    /// No consistent state: the initial replication or a resync is unfinished
    /// (earlier recovery points may still be kept).
    NotConsistent,
}

impl Consistency {
    /// Whether a consistent latest state is kept (now, or once the applies end).
    pub fn is_recoverable(self) -> bool {
        !matches!(self, Consistency::NotConsistent)
    }
}

impl ReplicaInfo {
    /// Where the replica stands for a failover to its latest state.
    pub fn consistency(&self) -> Consistency {
        let latest = self.recovery_points.iter().rev().find(|point| point.latest);
        match (self.consistent, latest) {
            (true, _) => Consistency::Consistent,
            (false, Some(point)) => Consistency::Applying { cycle: point.cycle },
            (false, None) => Consistency::NotConsistent,
        }
    }
}

/// A failover to a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverInfo {
    /// When it happened (seconds since the epoch).
    pub at_unix: u64,
    /// The point the disks were brought to: its cycle.
    pub cycle: u64,
    /// When the primary closed that cycle (milliseconds since the epoch).
    pub time_unix_ms: u64,
    /// Whether that point is application-consistent.
    pub app_consistent: bool,
    /// Started by the primary after shipping everything.
    pub planned: bool,
    /// Completed by the administrator: the other points are gone.
    pub completed: bool,
}

/// A test failover in progress: a recovery point served as writable disks whose writes
/// go to throwaway overlays, while replication goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverInfo {
    /// The point served (its cycle and time).
    pub cycle: u64,
    /// When the primary closed that cycle (milliseconds since the epoch).
    pub time_unix_ms: u64,
    /// Whether the point is application-consistent.
    pub app_consistent: bool,
    /// When the test started (seconds since the epoch).
    pub started_unix: u64,
    /// The NBD export of each disk, in group order.
    pub exports: Vec<String>,
}

/// Why the replica refused a request; the HTTP status says the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed.
    BadRequest,
    /// 401: no valid credentials.
    Unauthenticated,
    /// 403: the peer may not do this.
    Forbidden,
    /// 404: no such replica (for this peer).
    NotFound,
    /// 409: the request conflicts with the replica's state (a different replica of the
    /// same name, a chunk out of order, a cycle that breaks the chain).
    Conflict,
    /// 409 with this code: the chain of cycles is broken; only a resync repairs it.
    ChainBroken,
    /// 409 with this code: the replica belongs to another replication relationship
    /// (another primary, or replication enabled again); an administrator must choose.
    OtherRelationship,
    /// 409 with this code: the replica was failed over to and is the live copy; the
    /// primary asking is superseded and must not ship to it again.
    Superseded,
    /// 423: replication is paused on the replica.
    Paused,
    /// 503: the replica is busy (applying received transfers); try again later.
    Busy,
    /// 507: not enough free space for the transfer.
    InsufficientStorage,
    /// 500: the replica failed.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that carries this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict
            | ErrorCode::ChainBroken
            | ErrorCode::OtherRelationship
            | ErrorCode::Superseded => 409,
            ErrorCode::Paused => 423,
            ErrorCode::Busy => 503,
            ErrorCode::InsufficientStorage => 507,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_safe_path_components() {
        for good in ["vm1", "web-01.disk_a", "A", &"x".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_replica_mid_apply_keeps_its_latest_point_and_one_without_a_point_is_not_consistent() {
        let mut info: ReplicaInfo = serde_json::from_value(serde_json::json!({
            "name": "vm1", "trust_group": "dc1", "disks": [], "consistent": true,
            "pending_transfers": 1, "paused": false,
        }))
        .unwrap();
        assert_eq!(info.consistency(), Consistency::Consistent);
        info.consistent = false;
        assert_eq!(info.consistency(), Consistency::NotConsistent);
        assert!(!info.consistency().is_recoverable());
        let point = |cycle, latest| RecoveryPointInfo {
            id: if latest { 0 } else { cycle },
            cycle,
            time_unix_ms: 0,
            app_consistent: false,
            latest,
            size: 0,
        };
        // Earlier points alone are no latest state.
        info.recovery_points = vec![point(3, false)];
        assert_eq!(info.consistency(), Consistency::NotConsistent);
        info.recovery_points.push(point(7, true));
        assert_eq!(info.consistency(), Consistency::Applying { cycle: 7 });
        assert!(info.consistency().is_recoverable());
    }

    #[test]
    fn an_answer_announces_zstd_and_one_without_the_list_gets_deflate() {
        let store = TransferAnswer {
            have_chunks: 3,
            committed: false,
            resume_from: None,
            codecs: Vec::new(),
        };
        let sent = serde_json::to_string(&store.clone().announcing_codecs()).unwrap();
        let read: TransferAnswer = serde_json::from_str(&sent).unwrap();
        assert!(read.decodes(BodyCodec::Zstd) && read.decodes(BodyCodec::Deflate));
        assert_eq!(read.have_chunks, 3);
        // An older replica's answer has no list: DEFLATE only.
        let older: TransferAnswer =
            serde_json::from_str(r#"{"have_chunks":0,"committed":false}"#).unwrap();
        assert!(older.decodes(BodyCodec::Deflate) && !older.decodes(BodyCodec::Zstd));
        // Names from later versions are ignored, not refused.
        let later: TransferAnswer = serde_json::from_str(
            r#"{"have_chunks":0,"committed":false,"codecs":["deflate","lz9"]}"#,
        )
        .unwrap();
        assert!(!later.decodes(BodyCodec::Zstd));
        // An older primary reads the new answer: the list is one field more.
        #[derive(Deserialize)]
        struct OlderAnswer {
            have_chunks: u32,
            committed: bool,
        }
        let older_reader: OlderAnswer = serde_json::from_str(&sent).unwrap();
        assert_eq!(
            (older_reader.have_chunks, older_reader.committed),
            (3, false)
        );
        // Without codecs to announce, the field stays off the wire as before.
        assert!(!serde_json::to_string(&store).unwrap().contains("codecs"));
    }
}
