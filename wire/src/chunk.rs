//! Transfer chunks: how changes travel to the replica and rest in its staging files.
//!
//! A transfer (one delta cycle, or one batch of a resync) is a sequence of chunks,
//! numbered from 0. A chunk holds whole change records, at most [`MAX_CHUNK_RAW`] bytes
//! of them (2 MiB, the chunk size of Hyper-V Replica's network layer), so each chunk can
//! be checked, stored and applied on its own and an interrupted transfer resumes at a
//! chunk boundary. Writes larger than the room left in a chunk are split.
//!
//! Frame (all integers little endian):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `BRXC` |
//! | 4 | 1 | version, 1 |
//! | 5 | 1 | flags: bit 0 = body is a raw DEFLATE stream (RFC 1951); bit 1 = body is one zstd frame (RFC 8878); never both; other bits 0 |
//! | 6 | 2 | 0 |
//! | 8 | 8 | transfer id |
//! | 16 | 4 | chunk index |
//! | 20 | 4 | record bytes (after decompression), 1..=[`MAX_CHUNK_RAW`] |
//! | 24 | 4 | body bytes following this header, at most [`MAX_CHUNK_BODY`] |
//! | 28 | 4 | CRC32C of bytes 0..28 and of the body |
//!
//! Record (in the decompressed body, back to back):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | kind: 1 write, 2 zero, 3 trim |
//! | 1 | 1 | 0 |
//! | 2 | 2 | disk index in the group |
//! | 4 | 4 | 0 |
//! | 8 | 8 | byte offset on the disk |
//! | 16 | 8 | length in bytes (> 0) |
//! | 24 | length | data, for writes only |
//!
//! A compressed body must decompress to exactly the record bytes. A replica
//! announces which compressed bodies it decodes ([`crate::api::TransferAnswer`]); a
//! primary sends zstd only to one that announced it (older replicas know only
//! DEFLATE).
//!
//! Decoding trusts nothing: the header is checked before the body is read, the body's
//! size before anything is allocated, and decompression never produces more than the
//! declared record bytes ([`codec`]). Ranges are checked against the disks by the
//! applier.

pub mod codec;

use thiserror::Error;
use tracker::{Change, ChangeData};

pub use codec::{BodyCodec, Codec, DECODED_CODECS};

/// Frame magic.
pub const CHUNK_MAGIC: [u8; 4] = *b"BRXC";
/// Frame format version.
pub const CHUNK_VERSION: u8 = 1;
/// Frame header length.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Most record bytes in one chunk: 2 MiB.
pub const MAX_CHUNK_RAW: u32 = 2 << 20;
/// Most body bytes: a compressed body is smaller than its records, or not sent
/// compressed; the margin is that of older primaries, whose DEFLATE could come out 5
/// bytes per 16 KiB larger.
pub const MAX_CHUNK_BODY: u32 = MAX_CHUNK_RAW + (64 << 10);
/// Record header length.
pub const RECORD_HEADER_LEN: usize = 24;
/// Flag: the body is DEFLATE-compressed.
pub const FLAG_DEFLATE: u8 = 1;
/// Flag: the body is zstd-compressed.
pub const FLAG_ZSTD: u8 = 2;

impl BodyCodec {
    /// The header's flags byte for a body of this codec.
    pub fn flags(self) -> u8 {
        match self {
            Self::Stored => 0,
            Self::Deflate => FLAG_DEFLATE,
            Self::Zstd => FLAG_ZSTD,
        }
    }

    /// The codec a header's flags byte names; `None` for unknown bits, or both.
    pub fn from_flags(flags: u8) -> Option<Self> {
        [Self::Stored, Self::Deflate, Self::Zstd]
            .into_iter()
            .find(|codec| codec.flags() == flags)
    }
}

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_TRIM: u8 = 3;

/// Why bytes are not a valid chunk.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    /// Fewer bytes than a header or than the header announces.
    #[error("Chunk truncated: {have} of {need} bytes")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a chunk.
    #[error("Bad chunk magic")]
    Magic,
    /// A version or flag this build does not know.
    #[error("Unsupported chunk version {version} or flags {flags:#x}")]
    Unsupported {
        /// The version byte.
        version: u8,
        /// The flags byte.
        flags: u8,
    },
    /// A size field out of bounds.
    #[error("Chunk sizes out of bounds: {raw} record bytes, {body} body bytes")]
    Size {
        /// Declared record bytes.
        raw: u32,
        /// Declared body bytes.
        body: u32,
    },
    /// The CRC does not match: corrupted in transit or on disk.
    #[error("Chunk checksum mismatch")]
    Checksum,
    /// The chunk belongs to another transfer or position.
    #[error("Chunk {found_index} of transfer {found_transfer:#x} where {index} of {transfer:#x} was expected")]
    Misplaced {
        /// Expected transfer.
        transfer: u64,
        /// Expected index.
        index: u32,
        /// Transfer in the header.
        found_transfer: u64,
        /// Index in the header.
        found_index: u32,
    },
    /// The body does not decompress to exactly the declared record bytes.
    #[error("Chunk body does not decompress to {0} bytes")]
    Decompress(u32),
    /// A record is malformed.
    #[error("Bad record at byte {at}: {why}")]
    Record {
        /// Offset in the record bytes.
        at: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// A parsed and bounds-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Transfer id.
    pub transfer: u64,
    /// Index within the transfer.
    pub index: u32,
    /// What the body is.
    pub codec: BodyCodec,
    /// Record bytes after decompression.
    pub raw_len: u32,
    /// Body bytes after the header.
    pub body_len: u32,
    /// Declared CRC32C.
    pub crc: u32,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl ChunkHeader {
    /// Parses and checks the first [`CHUNK_HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ChunkError> {
        if bytes.len() < CHUNK_HEADER_LEN {
            return Err(ChunkError::Truncated {
                have: bytes.len(),
                need: CHUNK_HEADER_LEN,
            });
        }
        if bytes[..4] != CHUNK_MAGIC {
            return Err(ChunkError::Magic);
        }
        let (version, flags) = (bytes[4], bytes[5]);
        let Some(codec) = BodyCodec::from_flags(flags) else {
            return Err(ChunkError::Unsupported { version, flags });
        };
        if version != CHUNK_VERSION || le_u16(bytes, 6) != 0 {
            return Err(ChunkError::Unsupported { version, flags });
        }
        let raw_len = le_u32(bytes, 20);
        let body_len = le_u32(bytes, 24);
        let sizes_ok = (1..=MAX_CHUNK_RAW).contains(&raw_len)
            && body_len <= MAX_CHUNK_BODY
            && (codec != BodyCodec::Stored || body_len == raw_len);
        if !sizes_ok {
            return Err(ChunkError::Size {
                raw: raw_len,
                body: body_len,
            });
        }
        Ok(ChunkHeader {
            transfer: le_u64(bytes, 8),
            index: le_u32(bytes, 16),
            codec,
            raw_len,
            body_len,
            crc: le_u32(bytes, 28),
        })
    }

    /// The whole frame's length.
    pub fn frame_len(&self) -> usize {
        CHUNK_HEADER_LEN + self.body_len as usize
    }

    /// Checks that this is chunk `index` of `transfer`.
    pub fn expect(&self, transfer: u64, index: u32) -> Result<(), ChunkError> {
        if self.transfer == transfer && self.index == index {
            return Ok(());
        }
        Err(ChunkError::Misplaced {
            transfer,
            index,
            found_transfer: self.transfer,
            found_index: self.index,
        })
    }
}

/// A whole frame, checked: header bounds, length and CRC.
#[derive(Debug, Clone, Copy)]
pub struct CheckedFrame<'a> {
    /// The header.
    pub header: ChunkHeader,
    body: &'a [u8],
}

impl<'a> CheckedFrame<'a> {
    /// Checks the frame at the start of `bytes`; the rest of `bytes` is ignored.
    pub fn check(bytes: &'a [u8]) -> Result<Self, ChunkError> {
        let header = ChunkHeader::parse(bytes)?;
        let need = header.frame_len();
        if bytes.len() < need {
            return Err(ChunkError::Truncated {
                have: bytes.len(),
                need,
            });
        }
        let crc =
            crc32c::crc32c_append(crc32c::crc32c(&bytes[..28]), &bytes[CHUNK_HEADER_LEN..need]);
        if crc != header.crc {
            return Err(ChunkError::Checksum);
        }
        Ok(CheckedFrame {
            header,
            body: &bytes[CHUNK_HEADER_LEN..need],
        })
    }

    /// The record bytes: the body itself, or decompressed into `scratch`.
    pub fn records<'s>(&self, scratch: &'s mut Vec<u8>) -> Result<Records<'s>, ChunkError>
    where
        'a: 's,
    {
        let header = &self.header;
        let raw: &'s [u8] = match header.codec {
            BodyCodec::Stored => self.body,
            compressed => {
                if !codec::decompress(compressed, self.body, header.raw_len, scratch) {
                    return Err(ChunkError::Decompress(header.raw_len));
                }
                scratch
            }
        };
        Ok(Records { raw, at: 0 })
    }
}

/// Iterates the change records of a chunk, checking each.
#[derive(Debug)]
pub struct Records<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Change<'a>, ChunkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.raw.len() {
            return None;
        }
        let at = self.at;
        let rest = &self.raw[at..];
        let bad = |why| Some(Err(ChunkError::Record { at, why }));
        if rest.len() < RECORD_HEADER_LEN {
            self.at = self.raw.len();
            return bad("truncated header");
        }
        let (kind, disk) = (rest[0], le_u16(rest, 2));
        let (offset, length) = (le_u64(rest, 8), le_u64(rest, 16));
        if rest[1] != 0 || le_u32(rest, 4) != 0 {
            self.at = self.raw.len();
            return bad("reserved bytes set");
        }
        if length == 0 || offset.checked_add(length).is_none() {
            self.at = self.raw.len();
            return bad("empty or overflowing range");
        }
        let data = match kind {
            KIND_WRITE => {
                let available = rest.len() - RECORD_HEADER_LEN;
                let Some(length) = usize::try_from(length).ok().filter(|l| *l <= available) else {
                    self.at = self.raw.len();
                    return bad("write data truncated");
                };
                let end = RECORD_HEADER_LEN + length;
                self.at += end;
                ChangeData::Write(&rest[RECORD_HEADER_LEN..end])
            }
            KIND_ZERO | KIND_TRIM => {
                self.at += RECORD_HEADER_LEN;
                if kind == KIND_ZERO {
                    ChangeData::Zero
                } else {
                    ChangeData::Trim
                }
            }
            _ => {
                self.at = self.raw.len();
                return bad("unknown kind");
            }
        };
        Some(Ok(Change {
            disk: usize::from(disk),
            offset,
            length,
            data,
        }))
    }
}

/// The record bytes of one chunk, ready to be framed. Framing (and compressing) is a
/// separate step so a resumed transfer skips it for chunks the replica already has.
///
/// Buffer ownership: the records live in the encoder's buffer, after room for the
/// frame header. [`RawChunk::frame_into`] copies them; [`RawChunk::into_owned`] takes
/// the buffer itself, so a stored chunk is framed where it was encoded, without a
/// copy, and the encoder starts a new buffer.
#[derive(Debug)]
pub struct RawChunk<'a> {
    /// Transfer id.
    pub transfer: u64,
    /// Index within the transfer.
    pub index: u32,
    /// Header room, then the record bytes.
    buf: &'a mut Vec<u8>,
}

/// Fills in the header of the frame `frame` (header, then `body_len` body bytes),
/// CRC included.
fn seal(frame: &mut [u8], transfer: u64, index: u32, raw_len: usize, codec: BodyCodec) {
    let body_len = frame.len() - CHUNK_HEADER_LEN;
    let header = &mut frame[..CHUNK_HEADER_LEN];
    header[..4].copy_from_slice(&CHUNK_MAGIC);
    header[4] = CHUNK_VERSION;
    header[5] = codec.flags();
    header[6..8].fill(0);
    header[8..16].copy_from_slice(&transfer.to_le_bytes());
    header[16..20].copy_from_slice(&index.to_le_bytes());
    let raw = u32::try_from(raw_len).unwrap_or(u32::MAX);
    header[20..24].copy_from_slice(&raw.to_le_bytes());
    header[24..28].copy_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..28]), &frame[CHUNK_HEADER_LEN..]);
    frame[28..32].copy_from_slice(&crc.to_le_bytes());
}

impl RawChunk<'_> {
    /// The record bytes.
    pub fn records(&self) -> &[u8] {
        &self.buf[CHUNK_HEADER_LEN..]
    }

    /// Appends the framed chunk to `out`, compressed with `codec`, or stored when
    /// `codec` is `None`, when probes of it do not compress, or when compressing would
    /// not make it smaller.
    pub fn frame_into(&self, codec: Option<Codec>, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + CHUNK_HEADER_LEN, 0);
        let body = match codec {
            Some(codec) if codec::compress_into(self.records(), codec, out) => codec.body(),
            _ => {
                out.extend_from_slice(self.records());
                BodyCodec::Stored
            }
        };
        seal(
            &mut out[start..],
            self.transfer,
            self.index,
            self.records().len(),
            body,
        );
    }

    /// The chunk with its buffer, taken from the encoder (which starts a new one).
    pub fn into_owned(self) -> OwnedChunk {
        OwnedChunk {
            transfer: self.transfer,
            index: self.index,
            buf: std::mem::take(self.buf),
        }
    }
}

/// A chunk that owns its buffer (header room, then the record bytes), to be framed
/// elsewhere.
#[derive(Debug)]
pub struct OwnedChunk {
    /// Transfer id.
    pub transfer: u64,
    /// Index within the transfer.
    pub index: u32,
    buf: Vec<u8>,
}

impl OwnedChunk {
    /// The record bytes.
    pub fn records(&self) -> &[u8] {
        &self.buf[CHUNK_HEADER_LEN..]
    }

    /// The framed chunk, as [`RawChunk::frame_into`] makes it: in this chunk's own
    /// buffer when it is stored (no copy), in a new one when it is compressed.
    pub fn into_frame(self, codec: Option<Codec>) -> Vec<u8> {
        let raw_len = self.buf.len() - CHUNK_HEADER_LEN;
        if let Some(codec) = codec {
            let mut compressed = Vec::with_capacity(CHUNK_HEADER_LEN + raw_len / 2);
            compressed.resize(CHUNK_HEADER_LEN, 0);
            if codec::compress_into(self.records(), codec, &mut compressed) {
                let body = codec.body();
                seal(&mut compressed, self.transfer, self.index, raw_len, body);
                return compressed;
            }
        }
        let mut frame = self.buf;
        let stored = BodyCodec::Stored;
        seal(&mut frame, self.transfer, self.index, raw_len, stored);
        frame
    }
}

/// The most record bytes `changes` changes holding `data_bytes` bytes of write data
/// take once a [`ChunkEncoder`] packed them: a header per change, and one more for
/// each write split across a chunk's end. What a transfer offers the replica, which
/// refuses chunks beyond it.
///
/// Splits happen only at the end of a chunk filled to within a header of
/// [`MAX_CHUNK_RAW`]; with `t` the total and `f` such chunks, `f · (MAX − 24) ≤ t ≤
/// unsplit + 24 · f`, so `f ≤ unsplit / (MAX − 48)`.
pub fn max_record_bytes(changes: u64, data_bytes: u64) -> u64 {
    let header = RECORD_HEADER_LEN as u64;
    let unsplit = data_bytes.saturating_add(changes.saturating_mul(header));
    let splits = unsplit / (u64::from(MAX_CHUNK_RAW) - 2 * header);
    unsplit.saturating_add(splits.saturating_add(1).saturating_mul(header))
}

/// Packs changes into chunks of at most [`MAX_CHUNK_RAW`] record bytes.
#[derive(Debug)]
pub struct ChunkEncoder {
    transfer: u64,
    next_index: u32,
    /// Room for a frame header, then the current chunk's records.
    buf: Vec<u8>,
}

/// A buffer for one chunk: header room, and capacity for a full chunk.
fn chunk_buffer() -> Vec<u8> {
    let mut buf = Vec::with_capacity(CHUNK_HEADER_LEN + MAX_CHUNK_RAW as usize);
    buf.resize(CHUNK_HEADER_LEN, 0);
    buf
}

impl ChunkEncoder {
    /// An encoder for transfer `transfer`, starting at chunk 0.
    pub fn new(transfer: u64) -> Self {
        ChunkEncoder {
            transfer,
            next_index: 0,
            buf: chunk_buffer(),
        }
    }

    /// Chunks emitted so far.
    pub fn chunks(&self) -> u32 {
        self.next_index
    }

    /// Adds `change`, calling `emit` for every chunk it fills. Disk indexes above
    /// `u16::MAX` are refused by the group configuration long before this.
    pub fn push<E>(
        &mut self,
        change: &Change<'_>,
        emit: &mut impl FnMut(RawChunk<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let disk = u16::try_from(change.disk).unwrap_or(u16::MAX);
        match change.data {
            ChangeData::Write(bytes) => {
                let mut offset = change.offset;
                let mut bytes = bytes;
                while !bytes.is_empty() {
                    if self.room() <= RECORD_HEADER_LEN {
                        self.flush(emit)?;
                    }
                    let take = bytes.len().min(self.room() - RECORD_HEADER_LEN);
                    self.put_header(KIND_WRITE, disk, offset, take as u64);
                    self.buf.extend_from_slice(&bytes[..take]);
                    offset += take as u64;
                    bytes = &bytes[take..];
                }
            }
            ChangeData::Zero | ChangeData::Trim if change.length > 0 => {
                if self.room() < RECORD_HEADER_LEN {
                    self.flush(emit)?;
                }
                let kind = if matches!(change.data, ChangeData::Zero) {
                    KIND_ZERO
                } else {
                    KIND_TRIM
                };
                self.put_header(kind, disk, change.offset, change.length);
            }
            ChangeData::Zero | ChangeData::Trim => {}
        }
        Ok(())
    }

    /// An encoder for transfer `transfer` whose chunks `0..next_index` exist already.
    pub fn resume(transfer: u64, next_index: u32) -> Self {
        ChunkEncoder {
            next_index,
            ..Self::new(transfer)
        }
    }

    /// Emits the last, partly filled chunk. Returns how many chunks the transfer has.
    pub fn finish<E>(
        mut self,
        emit: &mut impl FnMut(RawChunk<'_>) -> Result<(), E>,
    ) -> Result<u32, E> {
        self.flush(emit)?;
        Ok(self.next_index)
    }

    /// Record bytes the current chunk can still take.
    pub fn room(&self) -> usize {
        CHUNK_HEADER_LEN + MAX_CHUNK_RAW as usize - self.buf.len()
    }

    /// Ends the current chunk here (if it holds anything), so the next change starts a
    /// new one: a resync cuts where it can resume from.
    pub fn cut<E>(
        &mut self,
        emit: &mut impl FnMut(RawChunk<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.flush(emit)
    }

    /// Bytes `change` takes in a chunk when it is not split.
    pub fn encoded_len(change: &Change<'_>) -> usize {
        match change.data {
            ChangeData::Write(bytes) => RECORD_HEADER_LEN + bytes.len(),
            ChangeData::Zero | ChangeData::Trim => RECORD_HEADER_LEN,
        }
    }

    fn put_header(&mut self, kind: u8, disk: u16, offset: u64, length: u64) {
        self.buf.push(kind);
        self.buf.push(0);
        self.buf.extend_from_slice(&disk.to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&length.to_le_bytes());
    }

    fn flush<E>(&mut self, emit: &mut impl FnMut(RawChunk<'_>) -> Result<(), E>) -> Result<(), E> {
        if self.buf.len() == CHUNK_HEADER_LEN {
            return Ok(());
        }
        let emitted = emit(RawChunk {
            transfer: self.transfer,
            index: self.next_index,
            buf: &mut self.buf,
        });
        if self.buf.capacity() == 0 {
            // Taken by `into_owned`.
            self.buf = chunk_buffer();
        }
        emitted?;
        self.next_index += 1;
        self.buf.truncate(CHUNK_HEADER_LEN);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
