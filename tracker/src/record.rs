//! The on-disk record format of the log ring.
//!
//! Every record starts with a 64-byte header, little-endian:
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..4 | magic | [`RECORD_MAGIC`] |
//! | 4 | kind | [`RecordKind`] |
//! | 5 | flags | reserved, 0 |
//! | 6..8 | disk | index of the disk in the group |
//! | 8..16 | seq | group-wide sequence number; consecutive records differ by one |
//! | 16..24 | cycle | cycle the record belongs to |
//! | 24..32 | offset | byte offset on the disk |
//! | 32..40 | length | bytes covered on the disk (for a pad: bytes skipped, header included) |
//! | 40..44 | payload_len | bytes of payload following the header (writes only) |
//! | 44..48 | header_crc | CRC32C of bytes 0..44 |
//! | 48..52 | commit_crc | CRC32C of `seq` and the payload; 0 while the record is being written |
//! | 52..64 | reserved | 0 |
//!
//! The header is written while the group lock is held, so headers are always in
//! sequence order. The commit word (bytes 48..52) says whether the record is complete,
//! in one of two ways:
//! - a small record (payload up to 64 KiB) is written whole in one `pwritev` under the
//!   lock, header first: its commit word is [`commit_crc`], the CRC of its sequence
//!   number and payload, so a write cut short leaves a CRC that does not match;
//! - a large record gets its header (commit word 0) under the lock, then its payload
//!   and, in a second write once the payload is in the file, [`commit_marker`], which
//!   depends on the sequence number only: checksumming a megabyte on every write would
//!   cost more than the write's copy into the ring (benches/RESULTS.md, session 16).
//!
//! Either way a committed record is one whose commit word is its marker or its CRC;
//! any other is a write that was never acknowledged (it was in flight at a crash, cut
//! short, or its image write failed and it was cancelled): recovery steps over it, as
//! it knows the length, and stores 0 in its commit word, so that afterwards a nonzero
//! commit word always means a committed record.
//!
//! The marker is only as good as the order of the two writes, which the page cache
//! keeps: it proves a complete payload after a daemon crash. After a host crash the
//! ring's payloads are not used at all (the group resynchronises from the images; the
//! headers only mark ranges), so neither form has to survive unordered writeback.

use thiserror::Error;

use crate::le::{u32_at, u64_at};

/// Size of a record header.
pub const HEADER_LEN: usize = 64;
/// Records start on multiples of this.
pub const RECORD_ALIGN: u64 = 8;
/// "BLRC", little-endian.
pub const RECORD_MAGIC: u32 = 0x4352_4c42;

/// What a record says about its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// New data for `offset..offset + length`; the payload follows.
    Write = 1,
    /// The range reads as zeroes (WRITE_ZEROES).
    Zero = 2,
    /// The range was discarded and reads as zeroes (TRIM).
    Trim = 3,
    /// Filler up to the end of the ring; the next record starts at its beginning.
    Pad = 4,
    /// Cycle `cycle` closed here; every later record belongs to a later cycle.
    CycleClose = 5,
}

impl RecordKind {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Trim,
            4 => Self::Pad,
            5 => Self::CycleClose,
            _ => return None,
        })
    }
}

/// A record header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Record kind.
    pub kind: RecordKind,
    /// Disk index within the group.
    pub disk: u16,
    /// Group-wide sequence number.
    pub seq: u64,
    /// Cycle number.
    pub cycle: u64,
    /// Disk offset.
    pub offset: u64,
    /// Bytes covered on the disk (pads: bytes of ring skipped).
    pub length: u64,
    /// Payload bytes following the header.
    pub payload_len: u32,
}

/// Why bytes are not a valid record header.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("Record header truncated")]
    Truncated,
    /// Magic number missing: not a record, or a torn one.
    #[error("Bad record magic {0:#x}")]
    BadMagic(u32),
    /// The header's own checksum does not match.
    #[error("Record header checksum mismatch")]
    BadHeaderCrc,
    /// Kind byte unknown.
    #[error("Unknown record kind {0}")]
    BadKind(u8),
    /// Payload length inconsistent with kind and length.
    #[error("Inconsistent record lengths")]
    BadLength,
}

impl RecordHeader {
    /// Bytes this record takes in the ring, header and aligned payload included.
    pub fn ring_len(&self) -> u64 {
        match self.kind {
            RecordKind::Pad => self.length,
            _ => record_len(self.payload_len),
        }
    }

    /// Encodes the header with a zero commit CRC (an uncommitted record).
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out.fill(0);
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4] = self.kind as u8;
        out[6..8].copy_from_slice(&self.disk.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.cycle.to_le_bytes());
        out[24..32].copy_from_slice(&self.offset.to_le_bytes());
        out[32..40].copy_from_slice(&self.length.to_le_bytes());
        out[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crc32c::crc32c(&out[0..44]);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a header (not its payload).
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER_LEN {
            return Err(RecordError::Truncated);
        }
        let magic = u32_at(bytes, 0);
        if magic != RECORD_MAGIC {
            return Err(RecordError::BadMagic(magic));
        }
        if crc32c::crc32c(&bytes[0..44]) != u32_at(bytes, 44) {
            return Err(RecordError::BadHeaderCrc);
        }
        let kind = RecordKind::from_u8(bytes[4]).ok_or(RecordError::BadKind(bytes[4]))?;
        let header = Self {
            kind,
            disk: u16::from_le_bytes([bytes[6], bytes[7]]),
            seq: u64_at(bytes, 8),
            cycle: u64_at(bytes, 16),
            offset: u64_at(bytes, 24),
            length: u64_at(bytes, 32),
            payload_len: u32_at(bytes, 40),
        };
        let consistent = match kind {
            RecordKind::Write => {
                header.length == u64::from(header.payload_len) && header.length > 0
            }
            RecordKind::Zero | RecordKind::Trim => header.payload_len == 0 && header.length > 0,
            RecordKind::CycleClose => header.payload_len == 0,
            RecordKind::Pad => {
                header.payload_len == 0
                    && header.length >= HEADER_LEN as u64
                    && header.length % RECORD_ALIGN == 0
            }
        };
        if !consistent || header.offset.checked_add(header.length).is_none() {
            return Err(RecordError::BadLength);
        }
        Ok(header)
    }
}

/// Ring bytes taken by a record with `payload_len` bytes of payload.
pub fn record_len(payload_len: u32) -> u64 {
    HEADER_LEN as u64 + u64::from(payload_len).next_multiple_of(RECORD_ALIGN)
}

/// The commit CRC of a record: binds the payload to its sequence number, so a stale
/// payload from an earlier lap of the ring can never pass for this record's.
/// Never 0, which marks an uncommitted record.
pub fn commit_crc(seq: u64, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), payload);
    if crc == 0 {
        1
    } else {
        crc
    }
}

/// The commit word of a large record whose payload was written before it (module
/// docs): a function of the sequence number only, distinct from the records of other
/// laps of the ring, and never 0.
pub fn commit_marker(seq: u64) -> u32 {
    // A domain separator keeps the marker from being the CRC of an empty payload.
    let marker = crc32c::crc32c_append(crc32c::crc32c(b"blkrep commit marker"), &seq.to_le_bytes());
    marker.max(1)
}

/// Whether `stored`, the commit word of the record with sequence number `seq` and
/// `payload`, says the record was committed.
pub fn is_commit_word(stored: u32, seq: u64, payload: &[u8]) -> bool {
    stored != 0 && (stored == commit_marker(seq) || stored == commit_crc(seq, payload))
}

/// Offset of the commit CRC within a header.
pub const COMMIT_CRC_AT: usize = 48;

/// Reads the commit CRC stored in a header.
pub fn stored_commit_crc(header: &[u8]) -> u32 {
    u32_at(header, COMMIT_CRC_AT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RecordHeader {
        RecordHeader {
            kind: RecordKind::Write,
            disk: 3,
            seq: 42,
            cycle: 7,
            offset: 1 << 20,
            length: 4096,
            payload_len: 4096,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = [0u8; HEADER_LEN];
        sample().encode(&mut buf);
        assert_eq!(RecordHeader::decode(&buf).unwrap(), sample());
        assert_eq!(stored_commit_crc(&buf), 0);
        assert_eq!(sample().ring_len(), 64 + 4096);
    }

    #[test]
    fn flipped_bit_is_detected() {
        let mut buf = [0u8; HEADER_LEN];
        sample().encode(&mut buf);
        buf[20] ^= 1;
        assert_eq!(RecordHeader::decode(&buf), Err(RecordError::BadHeaderCrc));
    }

    #[test]
    fn commit_crc_depends_on_seq() {
        assert_ne!(commit_crc(1, b"abc"), commit_crc(2, b"abc"));
        assert_ne!(commit_crc(1, b""), 0);
        assert_ne!(commit_marker(1), commit_marker(2));
        assert_ne!(commit_marker(1), commit_crc(1, b""));
        assert!(is_commit_word(commit_marker(7), 7, b"payload"));
        assert!(is_commit_word(commit_crc(7, b"payload"), 7, b"payload"));
        assert!(!is_commit_word(commit_marker(8), 7, b"payload"));
        assert!(!is_commit_word(commit_crc(7, b"payloaD"), 7, b"payload"));
        assert!(!is_commit_word(0, 7, b"payload"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = RecordHeader::decode(&bytes);
        }

        #[test]
        fn encode_decode(kind in 1u8..=5, disk: u16, seq: u64, cycle: u64, offset in 0u64..(1 << 50), len in 1u32..(1 << 26)) {
            let kind = RecordKind::from_u8(kind).unwrap();
            let (length, payload_len) = match kind {
                RecordKind::Write => (u64::from(len), len),
                RecordKind::Pad => (u64::from(len).next_multiple_of(8) + 64, 0),
                _ => (u64::from(len), 0),
            };
            let header = RecordHeader { kind, disk, seq, cycle, offset, length, payload_len };
            let mut buf = [0u8; HEADER_LEN];
            header.encode(&mut buf);
            prop_assert_eq!(RecordHeader::decode(&buf), Ok(header));
        }
    }
}
