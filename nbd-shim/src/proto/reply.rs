//! Transmission replies: simple replies and structured reply chunks.
//!
//! ```text
//! simple:      32 bits 0x67446698, 32 bits error, 64 bits cookie, (read data)
//! structured:  32 bits 0x668e33ef, 16 bits flags, 16 bits type, 64 bits cookie,
//!              32 bits payload length, payload
//! ```
//!
//! Encoders append to a [`ReplySink`] so the server can build a whole batch of replies in
//! one buffer and send it with one write. For a read, the server appends the header with
//! [`put_simple_reply`] or [`put_offset_data_header`] and then reads the data straight
//! into the sink's buffer behind it. The parsers ([`parse_simple_reply`],
//! [`parse_chunk`]) are the client's side, for tests and tools.

use super::consts::*;
use super::{truncate_message, Errno};
use crate::backend::Extent;

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of the `NBD_REPLY_TYPE_OFFSET_DATA` header including its 8-byte offset.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;

/// Where encoded replies go.
pub trait ReplySink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);
}

impl ReplySink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Why reply bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Fewer bytes than the reply needs.
    #[error("Reply truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// Neither reply magic.
    #[error("Bad reply magic {0:#010x}")]
    BadMagic(u32),
    /// A chunk whose payload does not fit its type.
    #[error("Malformed {kind} chunk: {reason}")]
    Malformed {
        /// The chunk type.
        kind: u16,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Appends a simple reply header; for a successful read the data follows.
pub fn put_simple_reply(out: &mut impl ReplySink, cookie: u64, error: u32) {
    let mut header = [0u8; SIMPLE_REPLY_LEN];
    header[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&error.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    out.put(&header);
}

/// Appends a structured chunk header.
pub fn put_chunk_header(out: &mut impl ReplySink, flags: u16, kind: u16, cookie: u64, length: u32) {
    let mut header = [0u8; CHUNK_HEADER_LEN];
    header[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&kind.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..20].copy_from_slice(&length.to_be_bytes());
    out.put(&header);
}

fn done_flag(done: bool) -> u16 {
    if done {
        NBD_REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Appends the header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk for `data_len` bytes at
/// `offset`; the caller appends exactly `data_len` bytes of data after it.
///
/// `data_len` is at most `u32::MAX - 8` (the server never reads more than its maximum
/// payload in one chunk).
pub fn put_offset_data_header(
    out: &mut impl ReplySink,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    let length = data_len.saturating_add(8);
    put_chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        length,
    );
    out.put(&offset.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` (nonzero) bytes of zeroes
/// at `offset`.
pub fn put_offset_hole(
    out: &mut impl ReplySink,
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) {
    put_chunk_header(out, done_flag(done), NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.put(&offset.to_be_bytes());
    out.put(&hole_len.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_NONE` chunk, always with `NBD_REPLY_FLAG_DONE`.
pub fn put_none(out: &mut impl ReplySink, cookie: u64) {
    put_chunk_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/// One block-status descriptor as sent: a nonzero 32-bit length and status flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Extent length (nonzero).
    pub length: u32,
    /// Context-defined status flags.
    pub flags: u32,
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `context_id` with `descriptors`
/// (at least one; the caller clamps lengths to u32 and the count to
/// [`MAX_EXTENTS_PER_CHUNK`]).
pub fn put_block_status(
    out: &mut impl ReplySink,
    cookie: u64,
    context_id: u32,
    descriptors: &[Descriptor],
    done: bool,
) {
    let count = descriptors.len().min(MAX_EXTENTS_PER_CHUNK);
    // 4 + 8 * 2^20 fits in u32.
    let length = u32::try_from(4 + 8 * count).unwrap_or(u32::MAX);
    put_chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        length,
    );
    out.put(&context_id.to_be_bytes());
    for d in &descriptors[..count] {
        let mut raw = [0u8; 8];
        raw[0..4].copy_from_slice(&d.length.to_be_bytes());
        raw[4..8].copy_from_slice(&d.flags.to_be_bytes());
        out.put(&raw);
    }
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk (always final here) with a message.
pub fn put_error(out: &mut impl ReplySink, cookie: u64, errno: Errno, message: &str) {
    let message = truncate_message(message).as_bytes();
    // Message is at most 4096 bytes, so these fit.
    let message_len = u16::try_from(message.len()).unwrap_or(0);
    let length = 6 + u32::from(message_len);
    put_chunk_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        length,
    );
    out.put(&errno.code().to_be_bytes());
    out.put(&message_len.to_be_bytes());
    out.put(&message[..usize::from(message_len)]);
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: an error at `offset`.
pub fn put_error_offset(
    out: &mut impl ReplySink,
    cookie: u64,
    errno: Errno,
    message: &str,
    offset: u64,
    done: bool,
) {
    let message = truncate_message(message).as_bytes();
    let message_len = u16::try_from(message.len()).unwrap_or(0);
    let length = 14 + u32::from(message_len);
    put_chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_ERROR_OFFSET,
        cookie,
        length,
    );
    out.put(&errno.code().to_be_bytes());
    out.put(&message_len.to_be_bytes());
    out.put(&message[..usize::from(message_len)]);
    out.put(&offset.to_be_bytes());
}

/// Turns backend extents for `offset..offset + length` into descriptors: lengths clamped
/// to `u32` (keeping `alignment`, a power of two) and to the request, zero lengths and
/// anything past the request dropped, at most `max_count` of them, and never fewer than
/// one unless `extents` had no usable extent. With `req_one` exactly one is kept.
pub fn descriptors_for(
    extents: &[Extent],
    length: u32,
    alignment: u32,
    req_one: bool,
    max_count: usize,
) -> Vec<Descriptor> {
    let alignment = alignment.max(1);
    // Largest u32 that keeps descriptors aligned ("SHOULD use descriptor lengths that are
    // an integer multiple of any advertised minimum block size").
    let cap = if alignment.is_power_of_two() {
        !(alignment - 1)
    } else {
        u32::MAX
    };
    let max_count = if req_one {
        1
    } else {
        max_count.clamp(1, MAX_EXTENTS_PER_CHUNK)
    };
    let mut remaining = u64::from(length);
    let mut out: Vec<Descriptor> = Vec::new();
    for extent in extents {
        if extent.length == 0 {
            // A backend breaking its contract: stop rather than loop or mislead.
            break;
        }
        // An extent longer than a descriptor can say takes several descriptors, so the
        // reply stays contiguous.
        let mut left = extent.length;
        while left > 0 {
            if remaining == 0 {
                return out;
            }
            let piece = left.min(remaining).min(u64::from(cap));
            let Ok(piece32) = u32::try_from(piece) else {
                return out;
            };
            let count = out.len();
            match out.last_mut() {
                // Merge equal neighbours ("SHOULD use different *status* values between
                // consecutive descriptors where feasible") while the sum still fits.
                Some(last)
                    if last.flags == extent.flags
                        && last.length.checked_add(piece32).is_some_and(|s| s <= cap) =>
                {
                    last.length += piece32;
                }
                _ if count == max_count => return out,
                _ => out.push(Descriptor {
                    length: piece32,
                    flags: extent.flags,
                }),
            }
            left -= piece;
            remaining -= piece;
        }
    }
    out
}

/// A simple reply as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error field (0 = success).
    pub error: u32,
    /// Cookie.
    pub cookie: u64,
}

/// Parses a simple reply header (not its read data).
pub fn parse_simple_reply(bytes: &[u8]) -> Result<SimpleReply, ReplyError> {
    let header = bytes.get(..SIMPLE_REPLY_LEN).ok_or(ReplyError::Truncated {
        needed: SIMPLE_REPLY_LEN,
        got: bytes.len(),
    })?;
    let magic = be_u32(&header[0..4]);
    if magic != NBD_SIMPLE_REPLY_MAGIC {
        return Err(ReplyError::BadMagic(magic));
    }
    Ok(SimpleReply {
        error: be_u32(&header[4..8]),
        cookie: be_u64(&header[8..16]),
    })
}

/// A structured chunk as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Chunk flags (`NBD_REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Cookie.
    pub cookie: u64,
    /// Decoded payload.
    pub payload: ChunkPayload<'a>,
}

/// The payload of a chunk, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    /// `NBD_REPLY_TYPE_NONE`
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`
    OffsetData {
        /// Export offset of the data.
        offset: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`
    OffsetHole {
        /// Export offset of the hole.
        offset: u64,
        /// Hole length.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`
    BlockStatus {
        /// Context id.
        context_id: u32,
        /// Descriptors.
        descriptors: Vec<Descriptor>,
    },
    /// `NBD_REPLY_TYPE_ERROR`
    Error {
        /// Error value.
        error: u32,
        /// Message.
        message: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`
    ErrorOffset {
        /// Error value.
        error: u32,
        /// Message.
        message: &'a [u8],
        /// Offset of the error.
        offset: u64,
    },
    /// Any other type, undecoded.
    Unknown {
        /// The type.
        kind: u16,
        /// Raw payload.
        payload: &'a [u8],
    },
}

fn be_u16(b: &[u8]) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&b[..2]);
    u16::from_be_bytes(raw)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&b[..4]);
    u32::from_be_bytes(raw)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[..8]);
    u64::from_be_bytes(raw)
}

/// Parses one structured chunk from the front of `bytes`; returns it and the bytes used.
pub fn parse_chunk(bytes: &[u8]) -> Result<(Chunk<'_>, usize), ReplyError> {
    let header = bytes.get(..CHUNK_HEADER_LEN).ok_or(ReplyError::Truncated {
        needed: CHUNK_HEADER_LEN,
        got: bytes.len(),
    })?;
    let magic = be_u32(&header[0..4]);
    if magic != NBD_STRUCTURED_REPLY_MAGIC {
        return Err(ReplyError::BadMagic(magic));
    }
    let flags = be_u16(&header[4..6]);
    let kind = be_u16(&header[6..8]);
    let cookie = be_u64(&header[8..16]);
    let length = usize::try_from(be_u32(&header[16..20])).unwrap_or(usize::MAX);
    let total = CHUNK_HEADER_LEN.saturating_add(length);
    let payload = bytes
        .get(CHUNK_HEADER_LEN..total)
        .ok_or(ReplyError::Truncated {
            needed: total,
            got: bytes.len(),
        })?;
    let malformed = |reason| ReplyError::Malformed { kind, reason };
    let payload = match kind {
        NBD_REPLY_TYPE_NONE => {
            if !payload.is_empty() {
                return Err(malformed("NONE must have no payload"));
            }
            ChunkPayload::None
        }
        NBD_REPLY_TYPE_OFFSET_DATA => {
            if payload.len() < 9 {
                return Err(malformed("OFFSET_DATA needs at least 9 bytes"));
            }
            ChunkPayload::OffsetData {
                offset: be_u64(&payload[0..8]),
                data: &payload[8..],
            }
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(malformed("OFFSET_HOLE must be 12 bytes"));
            }
            ChunkPayload::OffsetHole {
                offset: be_u64(&payload[0..8]),
                length: be_u32(&payload[8..12]),
            }
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
                return Err(malformed(
                    "BLOCK_STATUS must be 4 + a positive multiple of 8 bytes",
                ));
            }
            let descriptors = payload[4..]
                .chunks_exact(8)
                .map(|d| Descriptor {
                    length: be_u32(&d[0..4]),
                    flags: be_u32(&d[4..8]),
                })
                .collect();
            ChunkPayload::BlockStatus {
                context_id: be_u32(&payload[0..4]),
                descriptors,
            }
        }
        NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
            let fixed = if kind == NBD_REPLY_TYPE_ERROR { 6 } else { 14 };
            if payload.len() < fixed {
                return Err(malformed("error chunk too short"));
            }
            let error = be_u32(&payload[0..4]);
            let message_len = usize::from(be_u16(&payload[4..6]));
            if message_len > payload.len() - fixed {
                return Err(malformed("error message longer than the chunk"));
            }
            let message = &payload[6..6 + message_len];
            if kind == NBD_REPLY_TYPE_ERROR {
                ChunkPayload::Error { error, message }
            } else {
                let at = 6 + message_len;
                ChunkPayload::ErrorOffset {
                    error,
                    message,
                    offset: be_u64(&payload[at..at + 8]),
                }
            }
        }
        _ => ChunkPayload::Unknown { kind, payload },
    };
    Ok((
        Chunk {
            flags,
            cookie,
            payload,
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_reply_layout() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, 0x0102_0304_0506_0708, Errno::Inval.code());
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            parse_simple_reply(&out).unwrap(),
            SimpleReply {
                error: 22,
                cookie: 0x0102_0304_0506_0708
            }
        );
        assert!(parse_simple_reply(&out[..15]).is_err());
    }

    #[test]
    fn offset_data_layout() {
        let mut out = Vec::new();
        put_offset_data_header(&mut out, 9, 4096, 3, true);
        out.extend_from_slice(b"abc");
        assert_eq!(&out[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&out[4..8], &[0, 1, 0, 1]); // DONE, OFFSET_DATA
        assert_eq!(&out[16..20], &[0, 0, 0, 11]);
        let (chunk, used) = parse_chunk(&out).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(chunk.flags, NBD_REPLY_FLAG_DONE);
        assert_eq!(
            chunk.payload,
            ChunkPayload::OffsetData {
                offset: 4096,
                data: b"abc"
            }
        );
    }

    #[test]
    fn hole_none_and_errors() {
        let mut out = Vec::new();
        put_offset_hole(&mut out, 1, 512, 1024, false);
        put_error_offset(&mut out, 1, Errno::Io, "Bad sector", 1536, false);
        put_error(&mut out, 1, Errno::NoSpc, "Disk full");
        put_none(&mut out, 1);
        let mut at = 0;
        let mut chunks = Vec::new();
        while at < out.len() {
            let (chunk, used) = parse_chunk(&out[at..]).unwrap();
            chunks.push(chunk);
            at += used;
        }
        assert_eq!(
            chunks[0].payload,
            ChunkPayload::OffsetHole {
                offset: 512,
                length: 1024
            }
        );
        assert_eq!(
            chunks[1].payload,
            ChunkPayload::ErrorOffset {
                error: 5,
                message: b"Bad sector",
                offset: 1536
            }
        );
        assert_eq!(
            chunks[2].payload,
            ChunkPayload::Error {
                error: 28,
                message: b"Disk full"
            }
        );
        assert_eq!(chunks[2].flags, NBD_REPLY_FLAG_DONE);
        assert_eq!(chunks[3].payload, ChunkPayload::None);
        assert_eq!(chunks[3].flags, NBD_REPLY_FLAG_DONE);
    }

    #[test]
    fn block_status_layout() {
        let mut out = Vec::new();
        let d = [
            Descriptor {
                length: 4096,
                flags: 3,
            },
            Descriptor {
                length: 512,
                flags: 0,
            },
        ];
        put_block_status(&mut out, 5, 1, &d, true);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 4 + 16);
        let (chunk, _) = parse_chunk(&out).unwrap();
        assert_eq!(
            chunk.payload,
            ChunkPayload::BlockStatus {
                context_id: 1,
                descriptors: d.to_vec()
            }
        );
    }

    #[test]
    fn long_error_messages_are_cut_to_the_string_limit() {
        let mut out = Vec::new();
        put_error(&mut out, 1, Errno::Io, &"e".repeat(5000));
        let (chunk, _) = parse_chunk(&out).unwrap();
        let ChunkPayload::Error { message, .. } = chunk.payload else {
            panic!("expected error")
        };
        assert_eq!(message.len(), MAX_STRING_LEN);
    }

    fn ext(length: u64, flags: u32) -> Extent {
        Extent { length, flags }
    }

    #[test]
    fn descriptors_are_clamped_to_the_request() {
        let d = descriptors_for(
            &[ext(1 << 20, 0), ext(1 << 20, 3)],
            1536 << 10,
            1,
            false,
            100,
        );
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: 1 << 20,
                    flags: 0
                },
                Descriptor {
                    length: 512 << 10,
                    flags: 3
                }
            ]
        );
        let d = descriptors_for(&[ext(1 << 20, 0), ext(1 << 20, 3)], 4096, 1, true, 100);
        assert_eq!(
            d,
            vec![Descriptor {
                length: 4096,
                flags: 0
            }]
        );
        let d = descriptors_for(&[ext(100, 0), ext(100, 3)], 1000, 1, true, 100);
        assert_eq!(
            d,
            vec![Descriptor {
                length: 100,
                flags: 0
            }]
        );
    }

    #[test]
    fn descriptors_are_clamped_to_u32_keeping_alignment() {
        let d = descriptors_for(&[ext(1 << 40, 0)], u32::MAX, 512, true, 100);
        assert_eq!(
            d,
            vec![Descriptor {
                length: !511,
                flags: 0
            }]
        );
        let d = descriptors_for(&[ext(1 << 40, 0), ext(4096, 1)], u32::MAX, 1, false, 100);
        assert_eq!(
            d,
            vec![Descriptor {
                length: u32::MAX,
                flags: 0
            }]
        );
        // With alignment a long extent takes an aligned piece and then the rest.
        let d = descriptors_for(&[ext(1 << 40, 0)], u32::MAX, 4096, false, 100);
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: !4095,
                    flags: 0
                },
                Descriptor {
                    length: 4095,
                    flags: 0
                }
            ]
        );
    }

    #[test]
    fn descriptors_merge_equal_neighbours_and_drop_bad_extents() {
        let d = descriptors_for(
            &[ext(512, 1), ext(512, 1), ext(512, 0)],
            4096,
            1,
            false,
            100,
        );
        assert_eq!(
            d,
            vec![
                Descriptor {
                    length: 1024,
                    flags: 1
                },
                Descriptor {
                    length: 512,
                    flags: 0
                }
            ]
        );
        assert!(descriptors_for(&[ext(0, 1), ext(512, 0)], 4096, 1, false, 100).is_empty());
        assert!(descriptors_for(&[], 4096, 1, false, 100).is_empty());
        let many: Vec<_> = (0..10).map(|i| ext(512, i % 2)).collect();
        assert_eq!(descriptors_for(&many, 1 << 20, 1, false, 3).len(), 3);
    }

    proptest! {
        #[test]
        fn arbitrary_reply_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_simple_reply(&bytes);
            let _ = parse_chunk(&bytes);
        }

        #[test]
        fn chunks_round_trip(cookie in any::<u64>(), offset in any::<u64>(), len in 1u32.., errno in 0usize..8,
                             data in proptest::collection::vec(any::<u8>(), 1..64), msg in "[ -~]{0,64}") {
            let errnos = [Errno::Perm, Errno::Io, Errno::NoMem, Errno::Inval, Errno::NoSpc, Errno::Overflow, Errno::NotSup, Errno::Shutdown];
            let errno = errnos[errno];
            let mut out = Vec::new();
            put_offset_data_header(&mut out, cookie, offset, u32::try_from(data.len()).unwrap(), false);
            out.extend_from_slice(&data);
            put_offset_hole(&mut out, cookie, offset, len, false);
            put_error_offset(&mut out, cookie, errno, &msg, offset, false);
            put_error(&mut out, cookie, errno, &msg);
            let expected = [
                ChunkPayload::OffsetData { offset, data: &data },
                ChunkPayload::OffsetHole { offset, length: len },
                ChunkPayload::ErrorOffset { error: errno.code(), message: msg.as_bytes(), offset },
                ChunkPayload::Error { error: errno.code(), message: msg.as_bytes() },
            ];
            let mut at = 0;
            for want in expected {
                let (chunk, used) = parse_chunk(&out[at..]).unwrap();
                prop_assert_eq!(chunk.cookie, cookie);
                prop_assert_eq!(chunk.payload, want);
                at += used;
            }
            prop_assert_eq!(at, out.len());
        }

        #[test]
        fn descriptors_respect_their_bounds(lengths in proptest::collection::vec((0u64..(1 << 34), 0u32..4), 0..20),
                                            length in 1u32.., align_shift in 0u32..13, req_one in any::<bool>()) {
            let extents: Vec<_> = lengths.iter().map(|&(l, f)| ext(l, f)).collect();
            let d = descriptors_for(&extents, length, 1 << align_shift, req_one, 8);
            if req_one { prop_assert!(d.len() <= 1); }
            prop_assert!(d.len() <= 8);
            let total: u64 = d.iter().map(|d| u64::from(d.length)).sum();
            prop_assert!(total <= u64::from(length));
            prop_assert!(d.iter().all(|d| d.length > 0));
            if extents.first().is_some_and(|e| e.length > 0) { prop_assert!(!d.is_empty()); }
            // Contiguous and complete unless the count limit cut it short.
            if !req_one && d.len() < 8 {
                let available: u64 = extents.iter().map(|e| e.length).take_while(|&l| l > 0).sum();
                prop_assert_eq!(total, available.min(u64::from(length)));
            }
        }
    }
}
