//! The fixed newstyle handshake, over any `Read + Write` stream.
//!
//! The server greets, reads the client flags, then answers options one at a time until
//! the client enters transmission (`NBD_OPT_EXPORT_NAME`, or `NBD_OPT_GO` answered with
//! `NBD_REP_ACK`) or aborts. Option data is capped (see [`MAX_OPTION_DATA`]) before
//! anything is read into memory; unknown options get `NBD_REP_ERR_UNSUP` and negotiation
//! goes on; malformed known options get `NBD_REP_ERR_INVALID`. Only a broken framing
//! (bad magic, unknown client flags, an oversized or unanswerable `NBD_OPT_EXPORT_NAME`)
//! ends the connection.
//!
//! Each option's replies are built in memory and sent with one write.
//!
//! TLS ([`super::tls`]): before any option is handled, [`super::tls::gate`] decides
//! from the listener's [`TlsMode`] whether TLS must come first. `NBD_OPT_STARTTLS` that
//! the gate lets through is acknowledged and ends [`Negotiation::options`] with
//! [`Outcome::StartTls`]; the caller runs the TLS handshake, calls
//! [`Negotiation::tls_started`], and goes on with the same negotiation over the
//! encrypted stream. Everything negotiated in plaintext before that is forgotten, so a
//! man in the middle cannot inject options into the protected session.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::export::{ContextSource, Export, ExportTable};
use super::tls::{gate, Gate, TlsMode};
use super::Inner;
use crate::proto::option::*;
use crate::proto::*;

/// Largest option data read into memory (names and queries are at most 4096 bytes each;
/// 64 KiB leaves room for many queries). Larger options are skipped and answered with
/// `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Largest option data skipped before the client is deemed hostile and dropped ("if a
/// server believes a client's behaviour constitutes a denial of service, it MAY initiate
/// a hard disconnect").
pub const MAX_OPTION_SKIP: u32 = 16 << 20;

/// What the server sends as handshake flags.
pub(crate) const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the stream failed (the client went away, or timed out).
    #[error("Handshake I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The client broke the framing (bad magic or unknown client flags).
    #[error("Client broke the handshake: {0}")]
    Protocol(OptionError),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; that option cannot be
    /// answered with an error, so "the server MUST terminate the session".
    #[error("Client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` that could not be honoured (oversized, invalid name, or sent
    /// during shutdown).
    #[error("Refused NBD_OPT_EXPORT_NAME: {0}")]
    ExportNameRefused(&'static str),
    /// `NBD_OPT_EXPORT_NAME` before TLS on a listener that requires TLS: "as this
    /// request cannot error, it MUST terminate the session".
    #[error("Client asked for export {0:?} with NBD_OPT_EXPORT_NAME before starting TLS, which this listener requires")]
    TlsRequired(String),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (bad or missing client
    /// certificate, garbage instead of a TLS record, a cut connection).
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// Option data too large to even skip.
    #[error("Option {option} carries {length} bytes of data, more than {MAX_OPTION_SKIP}")]
    OptionTooLarge {
        /// The option.
        option: u32,
        /// Its declared length.
        length: u32,
    },
}

/// A negotiated connection, ready for transmission.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) export: Arc<Export>,
    pub(crate) structured: bool,
    /// Selected contexts: wire id and source.
    pub(crate) contexts: Vec<(u32, ContextSource)>,
    pub(crate) transmission_flags: u16,
    pub(crate) size: u64,
}

/// How a handshake ended successfully.
#[derive(Debug)]
pub(crate) enum Outcome {
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: "the server MUST be prepared for a TLS
    /// handshake, and all further data MUST be sent and received over TLS".
    StartTls,
}

/// What a handshake agreed on, as reported by [`crate::Server::negotiate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Canonical name of the export chosen.
    pub export: String,
    /// Export size sent to the client.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
    /// Names of the metadata contexts selected for block status.
    pub meta_contexts: Vec<String>,
}

impl Session {
    pub(crate) fn summary(&self) -> Negotiated {
        Negotiated {
            export: self.export.name.clone(),
            size: self.size,
            transmission_flags: self.transmission_flags,
            structured_replies: self.structured,
            meta_contexts: self
                .contexts
                .iter()
                .filter_map(|(id, _)| self.export.context(*id).map(|c| c.name.clone()))
                .collect(),
        }
    }
}

struct State {
    table: ExportTable,
    structured: bool,
    /// Contexts chosen by the last `NBD_OPT_SET_META_CONTEXT`, for that export.
    meta: Option<(Arc<Export>, Vec<u32>)>,
    no_zeroes: bool,
}

impl State {
    fn enter(&mut self, export: Arc<Export>) -> Session {
        // "where the final time it was sent, it referred to the same export name that was
        // ultimately selected"
        let contexts = match self.meta.take() {
            Some((meta_export, ids)) if Arc::ptr_eq(&meta_export, &export) => ids
                .into_iter()
                .filter_map(|id| export.context(id).map(|c| (id, c.source)))
                .collect(),
            _ => Vec::new(),
        };
        Session {
            transmission_flags: export.transmission_flags(self.structured),
            size: export.dev.size(),
            structured: self.structured,
            contexts,
            export,
        }
    }
}

fn send(stream: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes)?;
    stream.flush()
}

/// A handshake in progress: the greeting is sent and the client flags read.
pub(crate) struct Negotiation {
    state: State,
    tls: TlsMode,
    tls_active: bool,
}

impl Negotiation {
    /// Greets the client and reads its flags. `tls` is the listener's mode; "the server
    /// MUST operate in NOTLS mode unless ... the client replied with
    /// NBD_FLAG_C_FIXED_NEWSTYLE", so an optional upgrade is not offered to such a client
    /// (a required one still refuses everything).
    pub(crate) fn start<S: Read + Write>(
        stream: &mut S,
        inner: &Inner,
        tls: TlsMode,
    ) -> Result<Self, HandshakeError> {
        send(stream, &greeting(HANDSHAKE_FLAGS))?;
        let mut raw_flags = [0u8; 4];
        stream.read_exact(&mut raw_flags)?;
        let client = ClientFlags::parse(u32::from_be_bytes(raw_flags), HANDSHAKE_FLAGS)
            .map_err(HandshakeError::Protocol)?;
        if !client.fixed_newstyle {
            tracing::debug!(
                "client did not set NBD_FLAG_C_FIXED_NEWSTYLE; answering in fixed newstyle anyway"
            );
        }
        let tls = match tls {
            TlsMode::Optional if !client.fixed_newstyle => TlsMode::Off,
            other => other,
        };
        Ok(Negotiation {
            state: State {
                table: inner.export_table(),
                structured: false,
                meta: None,
                no_zeroes: client.no_zeroes,
            },
            tls,
            tls_active: false,
        })
    }

    /// Records that TLS is now up and forgets what was negotiated in plaintext: "When
    /// this command succeeds, the server MUST NOT preserve any negotiation state (such
    /// as a request for `NBD_OPT_STRUCTURED_REPLY`, or metadata contexts from
    /// `NBD_OPT_SET_META_CONTEXT`) issued before this command", since a man in the
    /// middle could have sent those.
    pub(crate) fn tls_started(&mut self) {
        self.tls_active = true;
        self.state.structured = false;
        self.state.meta = None;
    }

    /// Answers options on `stream` until the client enters transmission, aborts, or
    /// starts TLS.
    pub(crate) fn options<S: Read + Write>(
        &mut self,
        stream: &mut S,
        inner: &Inner,
    ) -> Result<Outcome, HandshakeError> {
        negotiate_options(stream, inner, &mut self.state, self.tls, self.tls_active)
    }
}

/// Runs the whole handshake on `stream` against the server's exports, without TLS.
pub(crate) fn negotiate<S: Read + Write>(
    stream: &mut S,
    inner: &Inner,
) -> Result<Outcome, HandshakeError> {
    Negotiation::start(stream, inner, TlsMode::Off)?.options(stream, inner)
}

/// Answers options until the client enters transmission, aborts, or starts TLS. Each
/// option is read whole (or skipped when too large), screened, parsed and answered.
fn negotiate_options<S: Read + Write>(
    stream: &mut S,
    inner: &Inner,
    state: &mut State,
    tls: TlsMode,
    tls_active: bool,
) -> Result<Outcome, HandshakeError> {
    let mut data = Vec::new();
    let mut replies = Vec::new();
    loop {
        let mut raw_header = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut raw_header)?;
        let header = OptionHeader::parse(&raw_header).map_err(HandshakeError::Protocol)?;
        let option = header.option;
        replies.clear();

        if header.length > MAX_OPTION_DATA {
            skip_oversized_option(stream, state, option, header.length, &mut replies)?;
            send(stream, &replies)?;
            continue;
        }
        // Bounded by MAX_OPTION_DATA above.
        data.resize(usize::try_from(header.length).unwrap_or(0), 0);
        stream.read_exact(&mut data)?;

        if refuse_option(inner, tls, tls_active, option, &data, &mut replies)? {
            send(stream, &replies)?;
            continue;
        }
        let Some(parsed) = parse_or_refuse(state, option, &data, &mut replies)? else {
            send(stream, &replies)?;
            continue;
        };
        tracing::trace!(?parsed, "option");

        if let Some(outcome) = answer_option(stream, state, option, parsed, &mut replies)? {
            return Ok(outcome);
        }
        send(stream, &replies)?;
    }
}

/// Skips the data of an option larger than [`MAX_OPTION_DATA`] and puts its error reply
/// in `replies`. Such an `NBD_OPT_EXPORT_NAME`, or data too large even to skip, ends
/// the handshake.
fn skip_oversized_option(
    stream: &mut impl Read,
    state: &mut State,
    option: u32,
    length: u32,
    replies: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    if option == NBD_OPT_EXPORT_NAME {
        return Err(HandshakeError::ExportNameRefused("option data too large"));
    }
    if length > MAX_OPTION_SKIP {
        return Err(HandshakeError::OptionTooLarge { option, length });
    }
    io::copy(
        &mut Read::by_ref(stream).take(u64::from(length)),
        &mut io::sink(),
    )
    .and_then(|n| {
        if n == u64::from(length) {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    })?;
    if option == NBD_OPT_SET_META_CONTEXT {
        state.meta = None;
    }
    put_option_error(
        replies,
        option,
        NBD_REP_ERR_TOO_BIG,
        "Option data is too large",
    );
    Ok(())
}

/// Whether an option read whole is refused before it is parsed (the server is shutting
/// down, or TLS must come first): then its error reply is in `replies`. Such an
/// `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, ends the handshake.
fn refuse_option(
    inner: &Inner,
    tls: TlsMode,
    tls_active: bool,
    option: u32,
    data: &[u8],
    replies: &mut Vec<u8>,
) -> Result<bool, HandshakeError> {
    if inner.shutting_down.load(Ordering::Acquire) && option != NBD_OPT_ABORT {
        if option == NBD_OPT_EXPORT_NAME {
            return Err(HandshakeError::ExportNameRefused(
                "the server is shutting down",
            ));
        }
        put_option_error(
            replies,
            option,
            NBD_REP_ERR_SHUTDOWN,
            "The server is shutting down",
        );
        return Ok(true);
    }

    match gate(tls, tls_active, option) {
        Gate::Proceed => Ok(false),
        Gate::Refuse(reply, message) => {
            put_option_error(replies, option, reply, message);
            Ok(true)
        }
        Gate::Close => Err(HandshakeError::TlsRequired(
            String::from_utf8_lossy(data).into_owned(),
        )),
    }
}

/// Parses an option's data; a malformed option gets its error reply in `replies`
/// (`None`), except `NBD_OPT_EXPORT_NAME`, which ends the handshake.
fn parse_or_refuse(
    state: &mut State,
    option: u32,
    data: &[u8],
    replies: &mut Vec<u8>,
) -> Result<Option<ClientOption>, HandshakeError> {
    match parse_option(option, data) {
        Ok(parsed) => Ok(Some(parsed)),
        Err(err) => {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameRefused("invalid export name"));
            }
            if option == NBD_OPT_SET_META_CONTEXT {
                // "Issuing this command replaces all previously-set metadata contexts
                // (including when this command fails)"
                state.meta = None;
            }
            tracing::debug!(option, %err, "malformed option");
            put_option_error(replies, option, NBD_REP_ERR_INVALID, &err.to_string());
            Ok(None)
        }
    }
}

/// Answers a parsed option. Returns the outcome when it ends the handshake (its
/// replies already sent); otherwise its replies are in `replies`, to be sent.
fn answer_option(
    stream: &mut impl Write,
    state: &mut State,
    option: u32,
    parsed: ClientOption,
    replies: &mut Vec<u8>,
) -> Result<Option<Outcome>, HandshakeError> {
    match parsed {
        ClientOption::ExportName(name) => {
            let Some(export) = state.table.resolve(&name) else {
                return Err(HandshakeError::UnknownExport(name));
            };
            let session = state.enter(export);
            let (reply, len) =
                export_name_reply(session.size, session.transmission_flags, state.no_zeroes);
            send(stream, &reply[..len])?;
            return Ok(Some(Outcome::Transmission(session)));
        }
        ClientOption::Abort => {
            put_ack(replies, option);
            // The client may already have closed: a failed ACK changes nothing.
            let _ = send(stream, replies);
            return Ok(Some(Outcome::Aborted));
        }
        ClientOption::List => {
            for export in state.table.by_name.values() {
                put_rep_server(replies, option, &export.name, export.description.as_deref());
            }
            put_ack(replies, option);
        }
        ClientOption::StartTls => {
            // Only reached when the gate allows an upgrade.
            put_ack(replies, option);
            send(stream, replies)?;
            return Ok(Some(Outcome::StartTls));
        }
        ClientOption::Info(ref info) | ClientOption::Go(ref info) => {
            let go = matches!(parsed, ClientOption::Go(_));
            if let Some(export) = answer_info(state, option, info, go, replies) {
                send(stream, replies)?;
                return Ok(Some(Outcome::Transmission(state.enter(export))));
            }
        }
        ClientOption::StructuredReply => {
            state.structured = true;
            put_ack(replies, option);
        }
        ClientOption::ListMetaContext(ref request) | ClientOption::SetMetaContext(ref request) => {
            let set = matches!(parsed, ClientOption::SetMetaContext(_));
            answer_meta_context(state, option, request, set, replies);
        }
        ClientOption::Unsupported(code) => {
            let message = format!("Option {code} is not supported");
            put_option_error(replies, option, NBD_REP_ERR_UNSUP, &message);
        }
    }
    Ok(None)
}

/// Puts the replies to `NBD_OPT_INFO` or, with `go`, `NBD_OPT_GO` in `replies`.
/// Returns the export to enter when `NBD_OPT_GO` was acknowledged.
fn answer_info(
    state: &State,
    option: u32,
    info: &InfoRequest,
    go: bool,
    replies: &mut Vec<u8>,
) -> Option<Arc<Export>> {
    match state.table.resolve(&info.name) {
        None => {
            let message = format!("No export named {:?}", info.name);
            put_option_error(replies, option, NBD_REP_ERR_UNKNOWN, &message);
            None
        }
        Some(export) => {
            let flags = export.transmission_flags(state.structured);
            put_info_export(replies, option, export.dev.size(), flags);
            // Always sent: the spec says a server with non-default constraints
            // SHOULD advertise them, and clients ignore what they did not ask.
            put_info_block_size(replies, option, export.limits);
            if info.wants(NBD_INFO_NAME) {
                put_info_name(replies, option, &export.name);
            }
            if let (true, Some(description)) =
                (info.wants(NBD_INFO_DESCRIPTION), &export.description)
            {
                put_info_description(replies, option, description);
            }
            if go && export.limits.minimum > 1 && !info.wants(NBD_INFO_BLOCK_SIZE) {
                // Unaligned requests would fail; refuse up front as the spec
                // allows ("via an error reply of NBD_REP_ERR_BLOCK_SIZE_REQD").
                put_option_error(
                    replies,
                    option,
                    NBD_REP_ERR_BLOCK_SIZE_REQD,
                    "This export needs aligned requests: ask for NBD_INFO_BLOCK_SIZE",
                );
                None
            } else {
                put_ack(replies, option);
                go.then_some(export)
            }
        }
    }
}

/// Puts the replies to `NBD_OPT_LIST_META_CONTEXT` or, with `set`,
/// `NBD_OPT_SET_META_CONTEXT` in `replies`; setting replaces the contexts chosen.
fn answer_meta_context(
    state: &mut State,
    option: u32,
    request: &MetaContextRequest,
    set: bool,
    replies: &mut Vec<u8>,
) {
    if set {
        state.meta = None;
    }
    if set && !state.structured {
        // "This option MUST NOT be requested unless structured replies have
        // been negotiated first. ... a server SHOULD send NBD_REP_ERR_INVALID."
        put_option_error(
            replies,
            option,
            NBD_REP_ERR_INVALID,
            "Negotiate structured replies first",
        );
    } else if let Some(export) = state.table.resolve(&request.export) {
        if set {
            let ids = export.select_contexts(&request.queries);
            for &id in &ids {
                if let Some(context) = export.context(id) {
                    put_meta_context(replies, option, id, &context.name);
                }
            }
            state.meta = Some((Arc::clone(&export), ids));
        } else {
            for id in export.list_contexts(&request.queries) {
                if let Some(context) = export.context(id) {
                    // "The metadata context ID in these replies is reserved and
                    // SHOULD be set to zero"
                    put_meta_context(replies, option, 0, &context.name);
                }
            }
        }
        put_ack(replies, option);
    } else {
        let message = format!("No export named {:?}", request.export);
        put_option_error(replies, option, NBD_REP_ERR_UNKNOWN, &message);
    }
}

#[cfg(test)]
mod tests;
