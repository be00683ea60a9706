//! Chunk body codecs: how a chunk's records are compressed, and decompressed without
//! trusting the body.
//!
//! - DEFLATE (RFC 1951), a raw stream, through flate2.
//! - zstd (RFC 8878): one frame, through libzstd's single-shot API. Compression
//!   reuses one context per thread (a context is a few hundred KiB of tables, set up
//!   again for every chunk otherwise). Decompression writes straight into a buffer of
//!   exactly the declared record bytes, which is also its only window: nothing is
//!   allocated for what the frame header claims, and a body that would decode further
//!   fails as soon as the buffer is full.
//!
//! Either way a chunk is compressed only when probes of it shrink and the whole comes
//! out smaller than the records; otherwise it is stored.

use std::cell::RefCell;
use std::io::{Cursor, Read, Write};

use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};

/// What a chunk's body is, as its header's flags say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyCodec {
    /// The record bytes themselves.
    Stored,
    /// A raw DEFLATE stream (RFC 1951).
    Deflate,
    /// One zstd frame (RFC 8878).
    Zstd,
}

impl BodyCodec {
    /// The name a replica announces it by (`wire::api::TransferAnswer::codecs`), and
    /// status shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Deflate => "deflate",
            Self::Zstd => "zstd",
        }
    }
}

/// The compressed body codecs this build decodes, as a replica announces them.
pub const DECODED_CODECS: [BodyCodec; 2] = [BodyCodec::Deflate, BodyCodec::Zstd];

/// How to compress chunks when framing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// DEFLATE at this level, 1 (fastest) to 9 (smallest).
    Deflate {
        /// The level.
        level: u32,
    },
    /// zstd at this level: 1 to 19, or a negative "fast" level.
    Zstd {
        /// The level.
        level: i32,
    },
}

impl Codec {
    /// The body codec of the frames it makes (when it compresses them).
    pub fn body(self) -> BodyCodec {
        match self {
            Self::Deflate { .. } => BodyCodec::Deflate,
            Self::Zstd { .. } => BodyCodec::Zstd,
        }
    }

    /// Its level, as configured.
    pub fn level(self) -> i32 {
        match self {
            Self::Deflate { level } => i32::try_from(level).unwrap_or(i32::MAX),
            Self::Zstd { level } => level,
        }
    }

    /// Appends `input` compressed to `out` and returns `true` when the result is
    /// smaller than `input`; otherwise leaves `out` as it was and returns `false`.
    fn compress_into(self, input: &[u8], out: &mut Vec<u8>) -> bool {
        let start = out.len();
        let compressed = match self {
            Self::Deflate { level } => {
                let mut encoder = DeflateEncoder::new(&mut *out, Compression::new(level.min(9)));
                encoder
                    .write_all(input)
                    .and_then(|()| encoder.finish())
                    .is_ok()
            }
            Self::Zstd { level } => zstd_into(input, level, out),
        };
        if compressed && out.len() - start < input.len() {
            return true;
        }
        out.truncate(start);
        false
    }
}

thread_local! {
    /// This thread's zstd compression context and the level it is set to, made on
    /// first use.
    static ZSTD_COMPRESSOR: RefCell<Option<(zstd::bulk::Compressor<'static>, i32)>> =
        const { RefCell::new(None) };
    /// This thread's zstd decompression context, made on first use.
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Appends `input` as one zstd frame to `out`, given no more room than `input`'s
/// length: a frame that would not be smaller stops there. Returns whether it fit.
fn zstd_into(input: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.reserve_exact(input.len());
    let mut cursor = Cursor::new(&mut *out);
    cursor.set_position(start as u64);
    ZSTD_COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match slot.as_mut() {
            Some((compressor, set)) if *set == level => Ok(compressor),
            Some((compressor, set)) => compressor.set_compression_level(level).map(|()| {
                *set = level;
                compressor
            }),
            None => {
                zstd::bulk::Compressor::new(level).map(|made| &mut slot.insert((made, level)).0)
            }
        };
        compressor
            .and_then(|compressor| compressor.compress_to_buffer(input, &mut cursor))
            .is_ok()
    })
}

/// Bytes of a chunk compressed as a probe before the whole of it.
const PROBE: usize = 64 << 10;
/// A probe must shrink to this share (in percent) for the chunk to be compressed.
const PROBE_WORTH: usize = 97;

/// Whether compressing `records` with `codec` is likely to pay: a probe at its start
/// and one in its middle, and one of them must save 3%. Compressing data that does
/// not compress (already compressed or encrypted guest data) costs more CPU than any
/// other step of shipping, for nothing.
fn worth_compressing(records: &[u8], codec: Codec) -> bool {
    if records.len() <= 2 * PROBE {
        return true;
    }
    let middle = records.len() / 2;
    let mut out = Vec::with_capacity(PROBE);
    [&records[..PROBE], &records[middle..middle + PROBE]]
        .into_iter()
        .any(|probe| {
            out.clear();
            codec.compress_into(probe, &mut out) && out.len() * 100 <= probe.len() * PROBE_WORTH
        })
}

/// Appends `records` compressed with `codec` to `out`, when probes of them compress
/// and the whole comes out smaller. Returns whether it did; on `false`, `out` is as
/// it was.
pub(super) fn compress_into(records: &[u8], codec: Codec, out: &mut Vec<u8>) -> bool {
    worth_compressing(records, codec) && codec.compress_into(records, out)
}

/// Decompresses `body` into `scratch` (cleared first), producing at most `raw_len`
/// bytes. Returns `false` unless it decodes to exactly `raw_len` bytes.
pub(super) fn decompress(
    codec: BodyCodec,
    body: &[u8],
    raw_len: u32,
    scratch: &mut Vec<u8>,
) -> bool {
    let want = raw_len as usize;
    scratch.clear();
    match codec {
        BodyCodec::Stored => return false,
        BodyCodec::Deflate => {
            scratch.reserve(want);
            // One byte more than declared is read to detect a body that inflates further.
            let limit = u64::from(raw_len) + 1;
            if DeflateDecoder::new(body)
                .take(limit)
                .read_to_end(scratch)
                .is_err()
            {
                return false;
            }
        }
        BodyCodec::Zstd => {
            // The capacity bounds what zstd writes: exactly the declared bytes
            // (`with_capacity` allocates exactly that much for bytes).
            if scratch.capacity() != want {
                *scratch = Vec::with_capacity(want);
            }
            let decoded = ZSTD_DECOMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                let decompressor = match slot.as_mut() {
                    Some(decompressor) => Ok(decompressor),
                    None => zstd::bulk::Decompressor::new().map(|made| slot.insert(made)),
                };
                decompressor.and_then(|d| d.decompress_to_buffer(body, &mut *scratch))
            });
            if decoded.is_err() {
                scratch.clear();
                return false;
            }
        }
    }
    scratch.len() == want
}
