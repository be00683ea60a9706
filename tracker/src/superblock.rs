//! The ring file's superblock: where the unacknowledged log starts, which cycle was
//! acknowledged last, whether the group shut down cleanly, and what it tracks.
//!
//! Two copies live in the first two 4 KiB pages; each write goes to the copy not
//! holding the newest generation, so a torn superblock write leaves the previous one
//! readable. The newest copy with a valid CRC wins.

use thiserror::Error;

use crate::le::{u32_at, u64_at};

/// Size of one superblock copy.
pub const SUPERBLOCK_LEN: usize = 4096;
/// Where the record area starts in the ring file.
pub const DATA_START: u64 = 2 * SUPERBLOCK_LEN as u64;
/// Longest disk name the superblock records.
pub const MAX_DISK_NAME: usize = 63;
/// Most disks in one group.
pub const MAX_DISKS: usize = 32;
/// Most extents the activity log records.
pub const MAX_ACTIVE_EXTENTS: usize = 192;

const MAGIC: &[u8; 8] = b"BLKRING1";
const VERSION: u32 = 1;
const FLAG_CLEAN: u32 = 1;
/// A resync copy is running with logging on: every write since it began is in the log.
const FLAG_COPY_LOGGED: u32 = 2;
/// The activity log is kept (rings written before it existed lack this flag).
const FLAG_ACTIVITY: u32 = 4;
const DISKS_AT: usize = 96;
const DISK_ENTRY: usize = 8 + 1 + MAX_DISK_NAME;
/// Activity log: extent shift (u32), count (u32), whole disks (u32 bitmask), 4 bytes
/// reserved, then one u64 key per extent.
const ACTIVITY_AT: usize = DISKS_AT + MAX_DISKS * DISK_ENTRY;
const ACTIVE_EXTENTS_AT: usize = ACTIVITY_AT + 16;
const _: () = assert!(ACTIVE_EXTENTS_AT + MAX_ACTIVE_EXTENTS * 8 <= CRC_AT);
const CRC_AT: usize = SUPERBLOCK_LEN - 4;

/// Why a group must be resynchronised instead of shipped from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The ring filled up (its consumer was behind or gone); writes since went to the
    /// dirty map only.
    RingOverflow = 1,
    /// The host went down (power loss or crash) with unsynced writes: the log may miss
    /// writes that reached the image.
    UncleanHostShutdown = 2,
    /// An image write failed after it was logged, so image and log may differ.
    ImageWriteError = 3,
    /// The daemon died while tracking by dirty map only, so the map is lost.
    DirtyMapLost = 4,
    /// Replication was enabled: the replica needs a first full copy.
    InitialReplication = 5,
    /// An administrator asked for a resync (for example after the replica's chain of
    /// cycles broke).
    Requested = 6,
    /// A write to the log ring itself failed (an I/O error on the ring's disk), so the
    /// log may miss writes that reached the image.
    RingWriteError = 7,
    /// Disks were added to the group: they need their initial copy (and the group a
    /// consistent point that includes them).
    DiskAdded = 8,
}

impl std::fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RingOverflow => "the log ring filled up while the consumer was behind",
            Self::UncleanHostShutdown => "the host shut down uncleanly with unsynced writes",
            Self::ImageWriteError => "an image write failed after it was logged",
            Self::DirtyMapLost => "the daemon stopped uncleanly while tracking by dirty map",
            Self::InitialReplication => "replication was enabled and needs its initial copy",
            Self::Requested => "an administrator requested it",
            Self::RingWriteError => "a write to the log ring failed",
            Self::DiskAdded => "a disk was added to the group and needs its initial copy",
        })
    }
}

impl ResyncReason {
    fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::RingOverflow,
            2 => Self::UncleanHostShutdown,
            3 => Self::ImageWriteError,
            4 => Self::DirtyMapLost,
            5 => Self::InitialReplication,
            6 => Self::Requested,
            7 => Self::RingWriteError,
            8 => Self::DiskAdded,
            _ => return None,
        })
    }
}

/// A disk as the ring recorded it when tracking started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    /// Export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// The activity log as persisted (see `crate::activity`): the extents that may hold
/// writes not yet durable in log and image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityRecord {
    /// Whether the ring keeps an activity log; rings written before it existed do
    /// not, and a host crash resynchronises their whole disks.
    pub valid: bool,
    /// Extent size as a shift.
    pub extent_shift: u32,
    /// Disks (bit per index) with writes the extents do not cover: a host crash
    /// resynchronises them whole.
    pub whole_disks: u32,
    /// Extent keys: disk index in the top 16 bits, extent index below.
    pub extents: Vec<u64>,
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every write; the newest valid copy wins.
    pub generation: u64,
    /// Set on clean shutdown, cleared while the daemon runs.
    pub clean: bool,
    /// Bytes in the record area.
    pub ring_size: u64,
    /// Logical position of the oldest unacknowledged record.
    pub head_pos: u64,
    /// Sequence number of the record at `head_pos`.
    pub head_seq: u64,
    /// Last acknowledged cycle (0: none).
    pub acked_cycle: u64,
    /// Set while the group needs a resync rather than log shipping.
    pub resync: Option<ResyncReason>,
    /// While a resync copy runs with logging on: the position (disk, offset) below
    /// which its consumer has the copy, so after a daemon crash the copy resumes there
    /// and the log supplies every write since the copy began.
    pub copy_position: Option<(u32, u64)>,
    /// `/proc/sys/kernel/random/boot_id` of the boot that last opened the ring.
    pub boot_id: [u8; 16],
    /// Dirty-map granularity.
    pub block_shift: u32,
    /// The disks of the group, in index order.
    pub disks: Vec<DiskRecord>,
    /// The activity log.
    pub activity: ActivityRecord,
}

/// Why a superblock cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SuperblockError {
    /// Neither copy carries the magic: not a blkrep ring.
    #[error("Not a blkrep ring file (no superblock magic)")]
    NotARing,
    /// Magic present but both copies fail their checksum or version.
    #[error("Both superblock copies are damaged")]
    Damaged,
    /// Too many disks, or a name too long, to record.
    #[error(
        "A group records at most {MAX_DISKS} disks with names of at most {MAX_DISK_NAME} bytes"
    )]
    TooManyDisks,
    /// More active extents than the superblock holds.
    #[error("The activity log holds at most {MAX_ACTIVE_EXTENTS} extents")]
    TooManyExtents,
}

impl Superblock {
    /// Encodes into one 4 KiB copy.
    pub fn encode(&self) -> Result<[u8; SUPERBLOCK_LEN], SuperblockError> {
        if self.disks.len() > MAX_DISKS || self.disks.iter().any(|d| d.name.len() > MAX_DISK_NAME) {
            return Err(SuperblockError::TooManyDisks);
        }
        if self.activity.extents.len() > MAX_ACTIVE_EXTENTS {
            return Err(SuperblockError::TooManyExtents);
        }
        let mut out = [0u8; SUPERBLOCK_LEN];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 }
            | if self.copy_position.is_some() {
                FLAG_COPY_LOGGED
            } else {
                0
            }
            | if self.activity.valid {
                FLAG_ACTIVITY
            } else {
                0
            };
        out[12..16].copy_from_slice(&flags.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..32].copy_from_slice(&self.ring_size.to_le_bytes());
        out[32..40].copy_from_slice(&self.head_pos.to_le_bytes());
        out[40..48].copy_from_slice(&self.head_seq.to_le_bytes());
        out[48..56].copy_from_slice(&self.acked_cycle.to_le_bytes());
        out[56..60].copy_from_slice(&self.resync.map_or(0, |r| r as u32).to_le_bytes());
        out[60..76].copy_from_slice(&self.boot_id);
        out[76..80].copy_from_slice(&self.block_shift.to_le_bytes());
        // Bounded by MAX_DISKS above.
        out[80..84].copy_from_slice(&u32::try_from(self.disks.len()).unwrap_or(0).to_le_bytes());
        let (copy_disk, copy_offset) = self.copy_position.unwrap_or_default();
        out[84..88].copy_from_slice(&copy_disk.to_le_bytes());
        out[88..96].copy_from_slice(&copy_offset.to_le_bytes());
        for (index, disk) in self.disks.iter().enumerate() {
            let at = DISKS_AT + index * DISK_ENTRY;
            out[at..at + 8].copy_from_slice(&disk.size.to_le_bytes());
            out[at + 8] = u8::try_from(disk.name.len()).unwrap_or(0);
            out[at + 9..at + 9 + disk.name.len()].copy_from_slice(disk.name.as_bytes());
        }
        out[ACTIVITY_AT..ACTIVITY_AT + 4]
            .copy_from_slice(&self.activity.extent_shift.to_le_bytes());
        // Bounded by MAX_ACTIVE_EXTENTS above.
        let count = u32::try_from(self.activity.extents.len()).unwrap_or(0);
        out[ACTIVITY_AT + 4..ACTIVITY_AT + 8].copy_from_slice(&count.to_le_bytes());
        out[ACTIVITY_AT + 8..ACTIVITY_AT + 12]
            .copy_from_slice(&self.activity.whole_disks.to_le_bytes());
        for (index, extent) in self.activity.extents.iter().enumerate() {
            let at = ACTIVE_EXTENTS_AT + index * 8;
            out[at..at + 8].copy_from_slice(&extent.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out[..CRC_AT]);
        out[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes one copy.
    pub fn decode(bytes: &[u8]) -> Result<Self, SuperblockError> {
        if bytes.len() < SUPERBLOCK_LEN || &bytes[0..8] != MAGIC {
            return Err(SuperblockError::NotARing);
        }
        if u32_at(bytes, 8) != VERSION || crc32c::crc32c(&bytes[..CRC_AT]) != u32_at(bytes, CRC_AT)
        {
            return Err(SuperblockError::Damaged);
        }
        let disk_count =
            usize::try_from(u32_at(bytes, 80)).map_err(|_| SuperblockError::Damaged)?;
        if disk_count > MAX_DISKS {
            return Err(SuperblockError::Damaged);
        }
        let mut disks = Vec::with_capacity(disk_count);
        for index in 0..disk_count {
            let at = DISKS_AT + index * DISK_ENTRY;
            let name_len = usize::from(bytes[at + 8]).min(MAX_DISK_NAME);
            let name = String::from_utf8_lossy(&bytes[at + 9..at + 9 + name_len]).into_owned();
            disks.push(DiskRecord {
                name,
                size: u64_at(bytes, at),
            });
        }
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&bytes[60..76]);
        let extent_count = usize::try_from(u32_at(bytes, ACTIVITY_AT + 4))
            .map_err(|_| SuperblockError::Damaged)?;
        if extent_count > MAX_ACTIVE_EXTENTS {
            return Err(SuperblockError::Damaged);
        }
        let activity = ActivityRecord {
            valid: u32_at(bytes, 12) & FLAG_ACTIVITY != 0,
            extent_shift: u32_at(bytes, ACTIVITY_AT),
            whole_disks: u32_at(bytes, ACTIVITY_AT + 8),
            extents: (0..extent_count)
                .map(|index| u64_at(bytes, ACTIVE_EXTENTS_AT + index * 8))
                .collect(),
        };
        Ok(Self {
            generation: u64_at(bytes, 16),
            clean: u32_at(bytes, 12) & FLAG_CLEAN != 0,
            ring_size: u64_at(bytes, 24),
            head_pos: u64_at(bytes, 32),
            head_seq: u64_at(bytes, 40),
            acked_cycle: u64_at(bytes, 48),
            resync: ResyncReason::from_u32(u32_at(bytes, 56)),
            copy_position: (u32_at(bytes, 12) & FLAG_COPY_LOGGED != 0)
                .then(|| (u32_at(bytes, 84), u64_at(bytes, 88))),
            boot_id,
            block_shift: u32_at(bytes, 76),
            disks,
            activity,
        })
    }

    /// Picks the newest valid of the two copies.
    pub fn decode_pair(first: &[u8], second: &[u8]) -> Result<Self, SuperblockError> {
        match (Self::decode(first), Self::decode(second)) {
            (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(SuperblockError::NotARing), Err(SuperblockError::NotARing)) => {
                Err(SuperblockError::NotARing)
            }
            (Err(_), Err(_)) => Err(SuperblockError::Damaged),
        }
    }

    /// Which copy (0 or 1) the next write goes to: never the one holding `generation`.
    pub fn slot_for(generation: u64) -> usize {
        usize::from(generation % 2 == 1)
    }
}

/// This boot's id, so a restart can tell a daemon crash (page cache intact) from a host
/// crash (unsynced writes lost).
pub fn current_boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        for (index, pair) in hex.chunks(2).take(16).enumerate() {
            let digits = std::str::from_utf8(pair).unwrap_or("0");
            id[index] = u8::from_str_radix(digits, 16).unwrap_or(0);
        }
    }
    id
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            generation: 5,
            clean: true,
            ring_size: 64 << 20,
            head_pos: 12345,
            head_seq: 99,
            acked_cycle: 17,
            resync: Some(ResyncReason::RingOverflow),
            copy_position: Some((1, 1 << 33)),
            boot_id: current_boot_id(),
            block_shift: 12,
            disks: vec![
                DiskRecord {
                    name: "disk0".into(),
                    size: 1 << 30,
                },
                DiskRecord {
                    name: "d1".into(),
                    size: 7,
                },
            ],
            activity: ActivityRecord {
                valid: true,
                extent_shift: 26,
                whole_disks: 0b10,
                extents: vec![3, (1 << 48) | 9],
            },
        }
    }

    #[test]
    fn round_trip_and_newest_wins() {
        let a = sample();
        let mut b = sample();
        b.generation = 6;
        b.clean = false;
        b.copy_position = None;
        b.activity = ActivityRecord::default();
        let (ea, eb) = (a.encode().unwrap(), b.encode().unwrap());
        assert_eq!(Superblock::decode(&ea).unwrap(), a);
        assert_eq!(Superblock::decode_pair(&ea, &eb).unwrap(), b);
        let mut torn = eb;
        torn[100] ^= 0xff;
        assert_eq!(Superblock::decode_pair(&ea, &torn).unwrap(), a);
        assert_eq!(
            Superblock::decode_pair(&[0; 4096], &[0; 4096]),
            Err(SuperblockError::NotARing)
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 4096..4097), magic: bool) {
            let mut bytes = bytes;
            if magic {
                bytes[0..8].copy_from_slice(MAGIC);
                bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
                let crc = crc32c::crc32c(&bytes[..CRC_AT]);
                bytes[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = Superblock::decode(&bytes);
        }
    }
}
