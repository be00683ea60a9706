//! Fixed newstyle handshake: greeting, client flags, options and option replies.
//!
//! ```text
//! S: 64 bits NBDMAGIC, 64 bits IHAVEOPT, 16 bits handshake flags
//! C: 32 bits client flags
//! C: 64 bits IHAVEOPT, 32 bits option, 32 bits length, *length* bytes of data   (repeated)
//! S: 64 bits 0x3e889045565a9, 32 bits option, 32 bits reply type, 32 bits length, data
//! ```
//!
//! [`OptionHeader::parse`] reads the 16-byte option header; the caller checks
//! [`OptionHeader::length`] against its own cap *before* reading or allocating the data,
//! then [`parse_option`] decodes the data of known options. Every length field inside
//! option data is checked against the bytes actually present, so a malformed option is an
//! [`OptionError`] (answered with `NBD_REP_ERR_INVALID`), never a panic or an allocation
//! sized by the peer.

use super::consts::*;
use super::reply::ReplySink;
use super::{truncate_message, wire_str};
use crate::backend::BlockSizeLimits;

/// Length of the server's initial greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of the reply to `NBD_OPT_EXPORT_NAME` with the 124 reserved zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 8 + 2 + 124;

/// Why handshake bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Fewer bytes than the structure needs.
    #[error("Option data truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// An option header without `IHAVEOPT`: the stream is desynchronised.
    #[error("Bad option magic {0:#018x}")]
    BadMagic(u64),
    /// "the server MUST drop the TCP connection if the client sets an unknown flag".
    #[error("Unknown client flags {0:#010x}")]
    UnknownClientFlags(u32),
    /// An option that takes no data came with some.
    #[error("Option {option} takes no data, got {len} bytes")]
    UnexpectedData {
        /// The option.
        option: u32,
        /// Bytes sent.
        len: usize,
    },
    /// A name, query or description that is not a valid NBD string.
    #[error("Invalid string in option {option}: not UTF-8, contains NUL or longer than {MAX_STRING_LEN} bytes")]
    InvalidString {
        /// The option.
        option: u32,
    },
    /// Length fields that disagree with the option length.
    #[error("Malformed option {option}: {reason}")]
    Malformed {
        /// The option.
        option: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

impl OptionError {
    /// Whether the connection must be dropped rather than answered with an error reply.
    pub const fn is_fatal(&self) -> bool {
        matches!(
            self,
            OptionError::BadMagic(_) | OptionError::UnknownClientFlags(_)
        )
    }
}

/// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// The client flags the client may answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Decodes the client's 32-bit flags against what the server advertised; unknown or
    /// unadvertised bits are fatal.
    pub fn parse(raw: u32, server_handshake_flags: u16) -> Result<Self, OptionError> {
        let mut allowed = 0;
        if server_handshake_flags & NBD_FLAG_FIXED_NEWSTYLE != 0 {
            allowed |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if server_handshake_flags & NBD_FLAG_NO_ZEROES != 0 {
            allowed |= NBD_FLAG_C_NO_ZEROES;
        }
        if raw & !allowed != 0 {
            return Err(OptionError::UnknownClientFlags(raw));
        }
        Ok(ClientFlags {
            fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0,
        })
    }

    /// The wire value.
    pub fn to_wire(self) -> u32 {
        let mut raw = 0;
        if self.fixed_newstyle {
            raw |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            raw |= NBD_FLAG_C_NO_ZEROES;
        }
        raw
    }
}

/// The 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses the first [`OPTION_HEADER_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, OptionError> {
        let mut reader = Reader { bytes, option: 0 };
        let magic = reader
            .u64()
            .map_err(|_| truncated(OPTION_HEADER_LEN, bytes.len()))?;
        if magic != IHAVEOPT {
            return Err(OptionError::BadMagic(magic));
        }
        let option = reader
            .u32()
            .map_err(|_| truncated(OPTION_HEADER_LEN, bytes.len()))?;
        let length = reader
            .u32()
            .map_err(|_| truncated(OPTION_HEADER_LEN, bytes.len()))?;
        Ok(OptionHeader { option, length })
    }

    /// Encodes the header as a client sends it.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

fn truncated(needed: usize, got: usize) -> OptionError {
    OptionError::Truncated { needed, got }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; empty means the default export.
    pub name: String,
    /// Requested `NBD_INFO_*` items, as sent.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Whether the client asked for `info`.
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Query strings ("MUST start with a namespace and a colon").
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` with the export name.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`
    List,
    /// `NBD_OPT_STARTTLS`
    StartTls,
    /// `NBD_OPT_INFO`
    Info(InfoRequest),
    /// `NBD_OPT_GO`
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`
    ListMetaContext(MetaContextRequest),
    /// `NBD_OPT_SET_META_CONTEXT`
    SetMetaContext(MetaContextRequest),
    /// Anything else: answered with `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

impl ClientOption {
    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => NBD_OPT_EXPORT_NAME,
            ClientOption::Abort => NBD_OPT_ABORT,
            ClientOption::List => NBD_OPT_LIST,
            ClientOption::StartTls => NBD_OPT_STARTTLS,
            ClientOption::Info(_) => NBD_OPT_INFO,
            ClientOption::Go(_) => NBD_OPT_GO,
            ClientOption::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => NBD_OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => NBD_OPT_SET_META_CONTEXT,
            ClientOption::Unsupported(code) => *code,
        }
    }

    /// Encodes the option data as a client sends it (for tests and clients).
    pub fn encode_data(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ClientOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            ClientOption::Info(info) | ClientOption::Go(info) => {
                put_len_prefixed(&mut out, info.name.as_bytes());
                let count = u16::try_from(info.requests.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&count.to_be_bytes());
                for request in info.requests.iter().take(usize::from(count)) {
                    out.extend_from_slice(&request.to_be_bytes());
                }
            }
            ClientOption::ListMetaContext(meta) | ClientOption::SetMetaContext(meta) => {
                put_len_prefixed(&mut out, meta.export.as_bytes());
                let count = u32::try_from(meta.queries.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&count.to_be_bytes());
                for query in &meta.queries {
                    put_len_prefixed(&mut out, query.as_bytes());
                }
            }
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply
            | ClientOption::Unsupported(_) => {}
        }
        out
    }
}

fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Bounds-checked big-endian reader over option data.
struct Reader<'a> {
    bytes: &'a [u8],
    option: u32,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if n > self.bytes.len() {
            return Err(OptionError::Malformed {
                option: self.option,
                reason: "a length field runs past the option data",
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], OptionError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, OptionError> {
        self.array().map(u64::from_be_bytes)
    }

    fn string(&mut self, len: usize) -> Result<String, OptionError> {
        let bytes = self.take(len)?;
        wire_str(bytes)
            .map(str::to_owned)
            .ok_or(OptionError::InvalidString {
                option: self.option,
            })
    }

    fn len_prefixed_string(&mut self) -> Result<String, OptionError> {
        let len = self.u32()?;
        // A length past the data is refused by take(); it is never allocated.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.string(len)
    }

    fn finish(&self) -> Result<(), OptionError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(OptionError::Malformed {
                option: self.option,
                reason: "trailing bytes after the last field",
            })
        }
    }
}

/// Decodes the data of option `option`. Unknown options decode to
/// [`ClientOption::Unsupported`] whatever their data.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let mut reader = Reader {
        bytes: data,
        option,
    };
    let no_data = |opt: ClientOption| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(OptionError::UnexpectedData {
                option,
                len: data.len(),
            })
        }
    };
    match option {
        NBD_OPT_EXPORT_NAME => reader.string(data.len()).map(ClientOption::ExportName),
        // "a server SHOULD ignore any data sent by the client rather than rejecting the
        // request as invalid."
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST => no_data(ClientOption::List),
        NBD_OPT_STARTTLS => no_data(ClientOption::StartTls),
        NBD_OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        NBD_OPT_INFO | NBD_OPT_GO => {
            // "32 bits, length of name (unsigned); MUST be no larger than the option data
            // length - 6"
            let name = reader.len_prefixed_string()?;
            let count = reader.u16()?;
            if reader.bytes.len() != usize::from(count) * 2 {
                return Err(OptionError::Malformed {
                    option,
                    reason: "the number of information requests disagrees with the option length",
                });
            }
            let mut requests = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                requests.push(reader.u16()?);
            }
            reader.finish()?;
            let info = InfoRequest { name, requests };
            Ok(if option == NBD_OPT_GO {
                ClientOption::Go(info)
            } else {
                ClientOption::Info(info)
            })
        }
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
            let export = reader.len_prefixed_string()?;
            let count = reader.u32()?;
            // Each query needs at least its 4-byte length, so a count the data cannot hold
            // is refused before anything is allocated for it.
            if u64::from(count) * 4 > u64::try_from(reader.bytes.len()).unwrap_or(u64::MAX) {
                return Err(OptionError::Malformed {
                    option,
                    reason: "more queries than the option data can hold",
                });
            }
            let mut queries = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for _ in 0..count {
                queries.push(reader.len_prefixed_string()?);
            }
            reader.finish()?;
            let meta = MetaContextRequest { export, queries };
            Ok(if option == NBD_OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext(meta)
            } else {
                ClientOption::ListMetaContext(meta)
            })
        }
        other => Ok(ClientOption::Unsupported(other)),
    }
}

// ---------------------------------------------------------------------------
// Server → client
// ---------------------------------------------------------------------------

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client set
/// `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes. Returns the buffer and how much of it to send.
pub fn export_name_reply(
    size: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) -> ([u8; EXPORT_NAME_REPLY_LEN], usize) {
    let mut out = [0u8; EXPORT_NAME_REPLY_LEN];
    out[0..8].copy_from_slice(&size.to_be_bytes());
    out[8..10].copy_from_slice(&transmission_flags.to_be_bytes());
    (out, if no_zeroes { 10 } else { EXPORT_NAME_REPLY_LEN })
}

/// Appends an option reply: magic, option, reply type, length, data.
///
/// Data longer than `u32::MAX` cannot occur for the replies this server builds (names and
/// messages are at most 4096 bytes); it would be cut to fit.
pub fn put_option_reply(out: &mut impl ReplySink, option: u32, reply_type: u32, data: &[&[u8]]) {
    let total: usize = data.iter().map(|d| d.len()).sum();
    let len = u32::try_from(total).unwrap_or(u32::MAX);
    let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
    header[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    header[8..12].copy_from_slice(&option.to_be_bytes());
    header[12..16].copy_from_slice(&reply_type.to_be_bytes());
    header[16..20].copy_from_slice(&len.to_be_bytes());
    out.put(&header);
    for part in data {
        out.put(part);
    }
}

/// `NBD_REP_ACK`
pub fn put_ack(out: &mut impl ReplySink, option: u32) {
    put_option_reply(out, option, NBD_REP_ACK, &[]);
}

/// An error reply (`NBD_REP_ERR_*`) with a human-readable message.
pub fn put_option_error(out: &mut impl ReplySink, option: u32, error: u32, message: &str) {
    put_option_reply(out, option, error, &[truncate_message(message).as_bytes()]);
}

/// `NBD_REP_SERVER`: "32 bits, length of name ... String, name of the export ... the rest
/// of the data contains some implementation-specific details about the export".
pub fn put_rep_server(
    out: &mut impl ReplySink,
    option: u32,
    name: &str,
    description: Option<&str>,
) {
    let name = truncate_message(name).as_bytes();
    let len = u32::try_from(name.len()).unwrap_or(0).to_be_bytes();
    let description = truncate_message(description.unwrap_or("")).as_bytes();
    put_option_reply(out, option, NBD_REP_SERVER, &[&len, name, description]);
}

/// `NBD_REP_INFO` with `NBD_INFO_EXPORT`: size and transmission flags.
pub fn put_info_export(out: &mut impl ReplySink, option: u32, size: u64, transmission_flags: u16) {
    put_option_reply(
        out,
        option,
        NBD_REP_INFO,
        &[
            &NBD_INFO_EXPORT.to_be_bytes(),
            &size.to_be_bytes(),
            &transmission_flags.to_be_bytes(),
        ],
    );
}

/// `NBD_REP_INFO` with `NBD_INFO_NAME`.
pub fn put_info_name(out: &mut impl ReplySink, option: u32, name: &str) {
    put_option_reply(
        out,
        option,
        NBD_REP_INFO,
        &[
            &NBD_INFO_NAME.to_be_bytes(),
            truncate_message(name).as_bytes(),
        ],
    );
}

/// `NBD_REP_INFO` with `NBD_INFO_DESCRIPTION`.
pub fn put_info_description(out: &mut impl ReplySink, option: u32, description: &str) {
    put_option_reply(
        out,
        option,
        NBD_REP_INFO,
        &[
            &NBD_INFO_DESCRIPTION.to_be_bytes(),
            truncate_message(description).as_bytes(),
        ],
    );
}

/// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload.
pub fn put_info_block_size(out: &mut impl ReplySink, option: u32, limits: BlockSizeLimits) {
    put_option_reply(
        out,
        option,
        NBD_REP_INFO,
        &[
            &NBD_INFO_BLOCK_SIZE.to_be_bytes(),
            &limits.minimum.to_be_bytes(),
            &limits.preferred.to_be_bytes(),
            &limits.maximum.to_be_bytes(),
        ],
    );
}

/// `NBD_REP_META_CONTEXT`: "32 bits, NBD metadata context ID. String, name of the metadata
/// context."
pub fn put_meta_context(out: &mut impl ReplySink, option: u32, id: u32, name: &str) {
    put_option_reply(
        out,
        option,
        NBD_REP_META_CONTEXT,
        &[&id.to_be_bytes(), truncate_message(name).as_bytes()],
    );
}

/// One option reply as a client sees it (for tests and clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply<'a> {
    /// The option answered.
    pub option: u32,
    /// `NBD_REP_*`
    pub reply_type: u32,
    /// Reply data.
    pub data: &'a [u8],
}

/// Parses one option reply from the front of `bytes`; returns it and the bytes consumed.
pub fn parse_option_reply(bytes: &[u8]) -> Result<(OptionReply<'_>, usize), OptionError> {
    let mut reader = Reader { bytes, option: 0 };
    let needed = OPTION_REPLY_HEADER_LEN;
    let magic = reader.u64().map_err(|_| truncated(needed, bytes.len()))?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(OptionError::BadMagic(magic));
    }
    let option = reader.u32().map_err(|_| truncated(needed, bytes.len()))?;
    let reply_type = reader.u32().map_err(|_| truncated(needed, bytes.len()))?;
    let len = reader.u32().map_err(|_| truncated(needed, bytes.len()))?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let data = reader
        .take(len)
        .map_err(|_| truncated(needed.saturating_add(len), bytes.len()))?;
    Ok((
        OptionReply {
            option,
            reply_type,
            data,
        },
        needed + len,
    ))
}

#[cfg(test)]
mod tests;
