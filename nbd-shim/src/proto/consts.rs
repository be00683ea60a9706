//! Wire constants of doc/proto.md, each with the words of the spec that define it.
//!
//! All numbers travel in network byte order (big-endian).

// ---------------------------------------------------------------------------
// Handshake magics
// ---------------------------------------------------------------------------

/// "S: 64 bits, `0x4e42444d41474943` (ASCII '`NBDMAGIC`') (also known as the `INIT_PASSWD`)"
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "S: 64 bits, `0x49484156454F5054` (ASCII '`IHAVEOPT`')"; the client repeats it before
/// every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// "S: 64 bits, `0x3e889045565a9` (magic number for replies)" to options.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// ---------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits)
// ---------------------------------------------------------------------------

/// "bit 0, `NBD_FLAG_FIXED_NEWSTYLE`; MUST be set by servers that support the fixed
/// newstyle protocol"
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// "bit 1, `NBD_FLAG_NO_ZEROES`; if set, and if the client replies with
/// `NBD_FLAG_C_NO_ZEROES` in the client flags field, the server MUST NOT send the 124
/// bytes of zero when the client ends negotiation with `NBD_OPT_EXPORT_NAME`."
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// "bit 0, `NBD_FLAG_C_FIXED_NEWSTYLE`; SHOULD be set by clients that support the fixed
/// newstyle protocol."
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// "bit 1, `NBD_FLAG_C_NO_ZEROES`; ... If set, the server MUST NOT send the 124 bytes of
/// zeroes when the client ends negotiation with `NBD_OPT_EXPORT_NAME`."
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// "Clients MUST NOT set any other flags; the server MUST drop the TCP connection if the
/// client sets an unknown flag".
pub const KNOWN_CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits)
// ---------------------------------------------------------------------------

/// "bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1."
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// "bit 1, `NBD_FLAG_READ_ONLY`: ... If this flag is set, the server MUST error subsequent
/// write operations to the export."
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// "bit 2, `NBD_FLAG_SEND_FLUSH`: exposes support for `NBD_CMD_FLUSH`."
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// "bit 3, `NBD_FLAG_SEND_FUA`: exposes support for `NBD_CMD_FLAG_FUA`."
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// "bit 4, `NBD_FLAG_ROTATIONAL`: the server MAY set this flag to 1 to inform the client
/// that the export has the characteristics of a rotational medium"
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// "bit 5, `NBD_FLAG_SEND_TRIM`: exposes support for `NBD_CMD_TRIM`."
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// "bit 6, `NBD_FLAG_SEND_WRITE_ZEROES`: exposes support for `NBD_CMD_WRITE_ZEROES` and
/// `NBD_CMD_FLAG_NO_HOLE`."
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// "bit 7, `NBD_FLAG_SEND_DF`: ... MUST leave this flag clear if structured replies have
/// not been negotiated."
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// "bit 8, `NBD_FLAG_CAN_MULTI_CONN`: ... the effects of `NBD_CMD_FLUSH` and
/// `NBD_CMD_FLAG_FUA` MUST be visible across all connections when the server sends its
/// reply to that command to the client."
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// "bit 10, `NBD_FLAG_SEND_CACHE`: documents that the server understands `NBD_CMD_CACHE`"
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// "bit 11, `NBD_FLAG_SEND_FAST_ZERO`: ... MUST set this transmission flag to 0 if
/// `NBD_FLAG_SEND_WRITE_ZEROES` is not set."
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/// "`NBD_OPT_EXPORT_NAME` (1) Choose the export which the client would like to use, end
/// option haggling, and proceed to the transmission phase."
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// "`NBD_OPT_ABORT` (2) The client desires to abort the negotiation and terminate the
/// session. The server MUST reply with `NBD_REP_ACK`."
pub const NBD_OPT_ABORT: u32 = 2;
/// "`NBD_OPT_LIST` (3) Return zero or more `NBD_REP_SERVER` replies, one for each export,
/// followed by `NBD_REP_ACK`"
pub const NBD_OPT_LIST: u32 = 3;
/// "`NBD_OPT_STARTTLS` (5) The client wishes to initiate TLS." "The client MUST NOT send
/// any additional data with the option"; after the server's `NBD_REP_ACK` "all further
/// data MUST be sent and received over TLS" (see `server::tls` for the three modes).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// "`NBD_OPT_INFO` (6)": details about an export without entering transmission.
pub const NBD_OPT_INFO: u32 = 6;
/// "`NBD_OPT_GO` (7)": like `NBD_OPT_INFO`, then "transmission mode is entered
/// immediately".
pub const NBD_OPT_GO: u32 = 7;
/// "`NBD_OPT_STRUCTURED_REPLY` (8) The client wishes to use structured replies during the
/// transmission phase."
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// "`NBD_OPT_LIST_META_CONTEXT` (9) Return a list of `NBD_REP_META_CONTEXT` replies, one per
/// context, followed by an `NBD_REP_ACK` or an error."
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// "`NBD_OPT_SET_META_CONTEXT` (10) Change the set of active metadata contexts."
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// ---------------------------------------------------------------------------
// Option replies
// ---------------------------------------------------------------------------

/// "`NBD_REP_ACK` (1) Will be sent by the server when it accepts the option and no further
/// information is available"
pub const NBD_REP_ACK: u32 = 1;
/// "`NBD_REP_SERVER` (2) A description of an export."
pub const NBD_REP_SERVER: u32 = 2;
/// "`NBD_REP_INFO` (3) A detailed description about an aspect of an export."
pub const NBD_REP_INFO: u32 = 3;
/// "`NBD_REP_META_CONTEXT` (4) A description of a metadata context."
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// "There are a number of error reply types, all of which are denoted by having bit 31 set."
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// "`NBD_REP_ERR_UNSUP` (2^31 + 1) The option sent by the client is unknown by this server"
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// "`NBD_REP_ERR_POLICY` (2^31 + 2) ... server-side policy forbids the server to allow the
/// option"
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// "`NBD_REP_ERR_INVALID` (2^31 + 3) The option sent by the client is known by this server,
/// but was determined by the server to be syntactically or semantically invalid."
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// "`NBD_REP_ERR_PLATFORM` (2^31 + 4) The option sent by the client is not supported on the
/// platform on which the server is running"
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// "`NBD_REP_ERR_TLS_REQD` (2^31 + 5) The server is unwilling to continue negotiation unless
/// TLS is initiated first." Sent in FORCEDTLS mode for every option but `NBD_OPT_STARTTLS`
/// and `NBD_OPT_ABORT`; "The server MUST NOT send `NBD_REP_ERR_TLS_REQD` in reply to any
/// option if TLS has already been initiated."
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// "`NBD_REP_ERR_UNKNOWN` (2^31 + 6) The requested export is not available."
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// "`NBD_REP_ERR_SHUTDOWN` (2^31 + 7) The server is unwilling to continue negotiation as it
/// is in the process of being shut down."
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// "`NBD_REP_ERR_BLOCK_SIZE_REQD` (2^31 + 8) The server is unwilling to enter transmission
/// phase for a given export unless the client first acknowledges (via
/// `NBD_INFO_BLOCK_SIZE`) that it will obey non-default block sizing requirements."
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// "`NBD_REP_ERR_TOO_BIG` (2^31 + 9) The request or the reply is too large to process."
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------
// NBD_REP_INFO types
// ---------------------------------------------------------------------------

/// "`NBD_INFO_EXPORT` (0) Mandatory information before a successful completion of
/// `NBD_OPT_INFO` or `NBD_OPT_GO`. ... *length* MUST be 12"
pub const NBD_INFO_EXPORT: u16 = 0;
/// "`NBD_INFO_NAME` (1) Represents the server's canonical name of the export."
pub const NBD_INFO_NAME: u16 = 1;
/// "`NBD_INFO_DESCRIPTION` (2) A description of the export, suitable for direct display to
/// the human being."
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// "`NBD_INFO_BLOCK_SIZE` (3) Represents the server's advertised size constraints ... The
/// *length* MUST be 14"
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------

/// "C: 32 bits, 0x25609513, magic (`NBD_REQUEST_MAGIC`)"
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// "0x21e41c71 - `NBD_EXTENDED_REQUEST_MAGIC`": reserved for the experimental extended
/// headers, which this server does not negotiate.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;

/// "`NBD_CMD_READ` (0)"
pub const NBD_CMD_READ: u16 = 0;
/// "`NBD_CMD_WRITE` (1) ... The client MUST follow the request header with *length* number
/// of bytes to be written to the device."
pub const NBD_CMD_WRITE: u16 = 1;
/// "`NBD_CMD_DISC` (2) A disconnect request. ... There is no reply to an `NBD_CMD_DISC`."
pub const NBD_CMD_DISC: u16 = 2;
/// "`NBD_CMD_FLUSH` (3) ... For a flush request, *length* and *offset* are reserved, and
/// MUST be set to all-zero."
pub const NBD_CMD_FLUSH: u16 = 3;
/// "`NBD_CMD_TRIM` (4) A hint to the server that the data defined by length and offset is
/// no longer needed."
pub const NBD_CMD_TRIM: u16 = 4;
/// "`NBD_CMD_CACHE` (5) ... The client is informing the server that it plans to access the
/// area specified by *offset* and *length*."
pub const NBD_CMD_CACHE: u16 = 5;
/// "`NBD_CMD_WRITE_ZEROES` (6) A write request with no payload."
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// "`NBD_CMD_BLOCK_STATUS` (7) A block status query request."
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// "bit 0, `NBD_CMD_FLAG_FUA`; This flag is valid for all commands, provided
/// `NBD_FLAG_SEND_FUA` has been negotiated, in which case the server MUST accept all
/// commands with this bit set (even by ignoring the bit)."
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// "bit 1, `NBD_CMD_FLAG_NO_HOLE`; valid during `NBD_CMD_WRITE_ZEROES`."
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// "bit 2, `NBD_CMD_FLAG_DF`; the "don't fragment" flag, valid during `NBD_CMD_READ`."
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// "bit 3, `NBD_CMD_FLAG_REQ_ONE`; valid during `NBD_CMD_BLOCK_STATUS`."
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// "bit 4, `NBD_CMD_FLAG_FAST_ZERO`; valid during `NBD_CMD_WRITE_ZEROES`."
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------

/// "S: 32 bits, 0x67446698, magic (`NBD_SIMPLE_REPLY_MAGIC`; used to be `NBD_REPLY_MAGIC`)"
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// "S: 32 bits, 0x668e33ef, magic (`NBD_STRUCTURED_REPLY_MAGIC`)"
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// "bit 0, `NBD_REPLY_FLAG_DONE`; the server MUST clear this bit if more structured reply
/// chunks will be sent for the same client request, and MUST set this bit if this is the
/// final reply."
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// "`NBD_REPLY_TYPE_NONE` (0) *length* MUST be 0 ... This chunk type MUST always be used
/// with the `NBD_REPLY_FLAG_DONE` bit set"
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// "`NBD_REPLY_TYPE_OFFSET_DATA` (1) ... *length* MUST be at least 9. It represents the
/// contents of *length - 8* bytes of the export, starting at the absolute *offset*"
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// "`NBD_REPLY_TYPE_OFFSET_HOLE` (2) ... *length* MUST be exactly 12. It represents that the
/// contents of *hole size* bytes, starting at the absolute *offset* from the start of the
/// export, read as all zeroes."
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// "`NBD_REPLY_TYPE_BLOCK_STATUS` (5) *length* MUST be 4 + (a positive integer multiple of
/// 8)."
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// "All error chunk types have bit 15 set"
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// "`NBD_REPLY_TYPE_ERROR` (2^15 + 1) ... *length* MUST be at least 6."
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
/// "`NBD_REPLY_TYPE_ERROR_OFFSET` (2^15 + 2) ... *length* MUST be at least 14."
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------
// base:allocation
// ---------------------------------------------------------------------------

/// "`NBD_STATE_HOLE` (bit 0): if set, the block represents a hole"
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// "`NBD_STATE_ZERO` (bit 1): if set, the block contents read as all zeroes"
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Name of the one context the spec defines: "it is called `base:allocation`".
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Strings "SHOULD be no longer than 256 bytes and MUST be no longer than 4096 bytes".
pub const MAX_STRING_LEN: usize = 4096;
/// "any payload not exceeding 2^25 (33,554,432) bytes SHOULD NOT be considered a denial of
/// service attack"
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// The minimum block size "MUST be a power of 2, MUST NOT be larger than 2^16 (65,536)".
pub const MAX_MINIMUM_BLOCK_SIZE: u32 = 1 << 16;
/// "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk".
pub const MAX_EXTENTS_PER_CHUNK: usize = 1 << 20;
