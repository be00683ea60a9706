//! Transmission requests: parse the 28-byte header, then validate it against the export.
//!
//! ```text
//! C: 32 bits, 0x25609513, magic (`NBD_REQUEST_MAGIC`)
//! C: 16 bits, command flags
//! C: 16 bits, type
//! C: 64 bits, cookie
//! C: 64 bits, offset (unsigned)
//! C: 32 bits, length (unsigned)
//! C: (*length* bytes of data if the request is of type `NBD_CMD_WRITE`)
//! ```
//!
//! Parsing fails only on a short buffer or a wrong magic; a wrong magic means the stream
//! is desynchronised and the connection must close. Everything else (unknown command,
//! unknown or misplaced flags, range, size, alignment, read-only) is found by
//! [`RequestHeader::validate`], which runs before any I/O or allocation and whose error
//! maps to the reply's errno with [`RequestError::errno`]. Whatever validation says, a
//! `NBD_CMD_WRITE` header is followed by *length* payload bytes
//! ([`RequestHeader::payload_len`]), which the server must consume to stay in sync.

use super::consts::*;
use super::Errno;
use crate::backend::BlockSizeLimits;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A request header as sent, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the payload for a write).
    pub length: u32,
}

/// A transmission command this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_DISC`
    Disc,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_CACHE`
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`
    BlockStatus,
}

impl Command {
    /// The command for a wire type, if known.
    pub const fn from_wire(command: u16) -> Option<Self> {
        Some(match command {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    /// The wire type.
    pub const fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
        }
    }

    /// Flags the spec documents for this command. FUA is "valid for all commands, provided
    /// `NBD_FLAG_SEND_FUA` has been negotiated, in which case the server MUST accept all
    /// commands with this bit set (even by ignoring the bit)".
    pub const fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
            Command::WriteZeroes => {
                NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
            }
            Command::BlockStatus => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
            Command::Write | Command::Disc | Command::Flush | Command::Trim | Command::Cache => {
                NBD_CMD_FLAG_FUA
            }
        }
    }

    /// Whether the command changes the export (refused on a read-only export).
    pub const fn writes(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disc => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::Cache => "NBD_CMD_CACHE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        };
        f.write_str(name)
    }
}

/// Every command flag this server understands.
pub const KNOWN_COMMAND_FLAGS: u16 = NBD_CMD_FLAG_FUA
    | NBD_CMD_FLAG_NO_HOLE
    | NBD_CMD_FLAG_DF
    | NBD_CMD_FLAG_REQ_ONE
    | NBD_CMD_FLAG_FAST_ZERO;

/// What a request is validated against: the export as negotiated on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportShape {
    /// Export size in bytes.
    pub size: u64,
    /// Advertised block size limits.
    pub limits: BlockSizeLimits,
    /// Transmission flags sent to the client; commands and flags it exposes are allowed.
    pub transmission_flags: u16,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was negotiated.
    pub structured_replies: bool,
    /// How many metadata contexts `NBD_OPT_SET_META_CONTEXT` selected.
    pub meta_contexts: usize,
}

impl ExportShape {
    fn minimum_block(&self) -> u64 {
        u64::from(self.limits.minimum.max(1))
    }

    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Opaque cookie to echo.
    pub cookie: u64,
    /// Byte offset; `offset + length` is within the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
    /// What to do.
    pub op: Op,
}

/// A validated command with its flags decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read `length` bytes.
    Read {
        /// `NBD_CMD_FLAG_DF`: answer with at most one content chunk.
        df: bool,
    },
    /// Write the `length`-byte payload that follows the header.
    Write {
        /// `NBD_CMD_FLAG_FUA`
        fua: bool,
    },
    /// Finish outstanding requests and close.
    Disc,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// `NBD_CMD_FLAG_FUA`
        fua: bool,
    },
    /// Prefetch a range.
    Cache,
    /// Zero a range.
    WriteZeroes {
        /// `NBD_CMD_FLAG_FUA`
        fua: bool,
        /// `NBD_CMD_FLAG_NO_HOLE`: the range must stay allocated.
        no_hole: bool,
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` rather than zero slowly.
        fast: bool,
    },
    /// Report metadata for a range.
    BlockStatus {
        /// `NBD_CMD_FLAG_REQ_ONE`: exactly one extent per context.
        req_one: bool,
    },
}

impl Op {
    /// The command this op came from.
    pub const fn command(&self) -> Command {
        match self {
            Op::Read { .. } => Command::Read,
            Op::Write { .. } => Command::Write,
            Op::Disc => Command::Disc,
            Op::Flush => Command::Flush,
            Op::Trim { .. } => Command::Trim,
            Op::Cache => Command::Cache,
            Op::WriteZeroes { .. } => Command::WriteZeroes,
            Op::BlockStatus { .. } => Command::BlockStatus,
        }
    }

    /// Whether the op changes the export's data (write, trim, write-zeroes).
    pub const fn changes_data(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
        )
    }
}

/// Why a request header could not be parsed or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than 28 bytes.
    #[error("Request header needs {REQUEST_HEADER_LEN} bytes, got {0}")]
    Truncated(usize),
    /// Not `NBD_REQUEST_MAGIC`: the stream is desynchronised.
    #[error("Bad request magic {0:#010x}")]
    BadMagic(u32),
    /// "The server SHOULD return `NBD_EINVAL` if it receives an unknown command."
    #[error("Unknown command {0}")]
    UnknownCommand(u16),
    /// "The server SHOULD return `NBD_EINVAL` if it receives an unknown command flag. It
    /// also SHOULD return `NBD_EINVAL` if it receives a request with a flag not explicitly
    /// documented as applicable to the given request."
    #[error("Command flags {flags:#06x} are not valid for {command}")]
    InvalidFlags {
        /// The command.
        command: Command,
        /// The offending bits.
        flags: u16,
    },
    /// A command or flag whose transmission flag was not sent (e.g. `NBD_CMD_TRIM` without
    /// `NBD_FLAG_SEND_TRIM`, `NBD_CMD_BLOCK_STATUS` without a selected metadata context).
    #[error("{0} was not negotiated on this connection")]
    NotNegotiated(&'static str),
    /// "it SHOULD return `NBD_EPERM` if it receives a write or trim request on a read-only
    /// export."
    #[error("{0} refused: the export is read-only")]
    ReadOnly(Command),
    /// The range runs past the end of the export (or overflows 64 bits).
    #[error("{command} range {offset}+{length} exceeds the export size {size}")]
    OutOfRange {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u32,
        /// Export size.
        size: u64,
    },
    /// A read or write payload above the advertised maximum.
    #[error("{command} length {length} exceeds the maximum payload {maximum}")]
    TooLarge {
        /// The command.
        command: Command,
        /// Requested length.
        length: u32,
        /// Advertised maximum payload.
        maximum: u32,
        /// Whether `NBD_CMD_FLAG_DF` was set (then the answer is `EOVERFLOW`).
        df: bool,
    },
    /// Offset or length not a multiple of the minimum block size.
    #[error(
        "{command} range {offset}+{length} is not aligned to the minimum block size {minimum}"
    )]
    Misaligned {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u32,
        /// Advertised minimum block size.
        minimum: u32,
    },
    /// "For a flush request, *length* and *offset* are reserved, and MUST be set to
    /// all-zero."
    #[error("NBD_CMD_FLUSH offset and length must be zero")]
    FlushWithRange,
    /// A block status query of length zero: no extent could satisfy it.
    #[error("NBD_CMD_BLOCK_STATUS length must not be zero")]
    EmptyBlockStatus,
}

impl RequestError {
    /// The errno to reply with.
    pub const fn errno(&self) -> Errno {
        match self {
            RequestError::ReadOnly(_) => Errno::Perm,
            // "The server SHOULD return `NBD_ENOSPC` if it receives a write request
            // including one or more sectors beyond the size of the device." (and likewise
            // for write zeroes); "It SHOULD return `NBD_EINVAL` if it receives a read or
            // trim request including one or more sectors beyond the size of the device".
            RequestError::OutOfRange {
                command: Command::Write | Command::WriteZeroes,
                ..
            } => Errno::NoSpc,
            // "Use of this flag MAY trigger an `NBD_EOVERFLOW` error chunk, if the request
            // length is too large."
            RequestError::TooLarge { df: true, .. } => Errno::Overflow,
            RequestError::Truncated(_)
            | RequestError::BadMagic(_)
            | RequestError::UnknownCommand(_)
            | RequestError::InvalidFlags { .. }
            | RequestError::NotNegotiated(_)
            | RequestError::OutOfRange { .. }
            | RequestError::TooLarge { .. }
            | RequestError::Misaligned { .. }
            | RequestError::FlushWithRange
            | RequestError::EmptyBlockStatus => Errno::Inval,
        }
    }

    /// Whether the byte stream can no longer be trusted: the connection must close.
    pub const fn is_fatal(&self) -> bool {
        matches!(self, RequestError::Truncated(_) | RequestError::BadMagic(_))
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    if let Some(src) = bytes.get(at..at + 2) {
        raw.copy_from_slice(src);
    }
    u16::from_be_bytes(raw)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        raw.copy_from_slice(src);
    }
    u32::from_be_bytes(raw)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        raw.copy_from_slice(src);
    }
    u64::from_be_bytes(raw)
}

impl RequestHeader {
    /// Parses the first [`REQUEST_HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        let Some(header) = bytes.get(..REQUEST_HEADER_LEN) else {
            return Err(RequestError::Truncated(bytes.len()));
        };
        let magic = be_u32(header, 0);
        if magic != NBD_REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(header, 4),
            command: be_u16(header, 6),
            cookie: be_u64(header, 8),
            offset: be_u64(header, 16),
            length: be_u32(header, 24),
        })
    }

    /// Encodes the header as a client would send it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire, valid or not: *length* for
    /// `NBD_CMD_WRITE`, else 0.
    pub const fn payload_len(&self) -> u32 {
        if self.command == NBD_CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    /// Checks the request against the export; nothing is executed or allocated.
    ///
    /// Rules, in order: known command; only flags documented for the command, and DF /
    /// FAST_ZERO only if their transmission flags were sent (`NBD_CMD_DISC` ignores flags
    /// and range: it gets no reply either way); FLUSH with zero offset and length; no
    /// write, trim or zeroing on a read-only export (`EPERM`); TRIM / WRITE_ZEROES /
    /// BLOCK_STATUS only if negotiated; `offset + length` within the export (checked,
    /// `ENOSPC` for writes and zeroing, else `EINVAL`); READ and WRITE no longer than the
    /// maximum payload; offset and length multiples of the minimum block size, except
    /// that a range may end at an unaligned export end; BLOCK_STATUS not empty.
    ///
    /// Length 0 is accepted for READ, WRITE, TRIM, WRITE_ZEROES and CACHE (the spec leaves
    /// it unspecified but says the server "SHOULD NOT disconnect"); they do nothing.
    pub fn validate(&self, shape: &ExportShape) -> Result<Request, RequestError> {
        let command =
            Command::from_wire(self.command).ok_or(RequestError::UnknownCommand(self.command))?;
        let request = |op| Request {
            cookie: self.cookie,
            offset: self.offset,
            length: self.length,
            op,
        };
        if command == Command::Disc {
            return Ok(request(Op::Disc));
        }

        let bad_flags = self.flags & !command.allowed_flags();
        if bad_flags != 0 {
            return Err(RequestError::InvalidFlags {
                command,
                flags: bad_flags,
            });
        }
        let flag = |bit: u16| self.flags & bit != 0;
        let fua = flag(NBD_CMD_FLAG_FUA);
        let op = match command {
            Command::Read => {
                let df = flag(NBD_CMD_FLAG_DF);
                if df && !shape.has(NBD_FLAG_SEND_DF) {
                    return Err(RequestError::NotNegotiated("NBD_CMD_FLAG_DF"));
                }
                Op::Read { df }
            }
            Command::Write => Op::Write { fua },
            Command::Flush => {
                if self.offset != 0 || self.length != 0 {
                    return Err(RequestError::FlushWithRange);
                }
                return Ok(request(Op::Flush));
            }
            Command::Trim => Op::Trim { fua },
            Command::Cache => Op::Cache,
            Command::WriteZeroes => {
                let fast = flag(NBD_CMD_FLAG_FAST_ZERO);
                if fast && !shape.has(NBD_FLAG_SEND_FAST_ZERO) && !shape.has(NBD_FLAG_READ_ONLY) {
                    return Err(RequestError::NotNegotiated("NBD_CMD_FLAG_FAST_ZERO"));
                }
                Op::WriteZeroes {
                    fua,
                    no_hole: flag(NBD_CMD_FLAG_NO_HOLE),
                    fast,
                }
            }
            Command::BlockStatus => Op::BlockStatus {
                req_one: flag(NBD_CMD_FLAG_REQ_ONE),
            },
            Command::Disc => Op::Disc,
        };

        if command.writes() && shape.has(NBD_FLAG_READ_ONLY) {
            return Err(RequestError::ReadOnly(command));
        }
        match command {
            Command::Trim if !shape.has(NBD_FLAG_SEND_TRIM) => {
                return Err(RequestError::NotNegotiated("NBD_CMD_TRIM"));
            }
            Command::WriteZeroes if !shape.has(NBD_FLAG_SEND_WRITE_ZEROES) => {
                return Err(RequestError::NotNegotiated("NBD_CMD_WRITE_ZEROES"));
            }
            Command::BlockStatus if !shape.structured_replies || shape.meta_contexts == 0 => {
                return Err(RequestError::NotNegotiated("NBD_CMD_BLOCK_STATUS"));
            }
            _ => {}
        }

        let end = self.offset.checked_add(u64::from(self.length));
        if end.is_none_or(|end| end > shape.size) {
            return Err(RequestError::OutOfRange {
                command,
                offset: self.offset,
                length: self.length,
                size: shape.size,
            });
        }
        if matches!(command, Command::Read | Command::Write) && self.length > shape.limits.maximum {
            return Err(RequestError::TooLarge {
                command,
                length: self.length,
                maximum: shape.limits.maximum,
                df: matches!(op, Op::Read { df: true }),
            });
        }
        let minimum = shape.minimum_block();
        let ends_at_export_end = end == Some(shape.size);
        if self.offset % minimum != 0
            || (u64::from(self.length) % minimum != 0 && !ends_at_export_end)
        {
            return Err(RequestError::Misaligned {
                command,
                offset: self.offset,
                length: self.length,
                minimum: shape.limits.minimum,
            });
        }
        if command == Command::BlockStatus && self.length == 0 {
            return Err(RequestError::EmptyBlockStatus);
        }
        Ok(request(op))
    }
}

#[cfg(test)]
mod tests;
