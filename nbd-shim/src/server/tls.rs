//! NBD over TLS (doc/proto.md, "TLS support"): the listener's policy, the gate that
//! decides which options may run before TLS, the TLS handshake, and the pump that
//! carries an upgraded connection.
//!
//! Modes, in the spec's words:
//! - [`TlsPolicy::Off`] is NOTLS: "If the server receives `NBD_OPT_STARTTLS` it MUST
//!   respond with `NBD_REP_ERR_POLICY` (if it does not support TLS for policy reasons)
//!   ... The server MUST NOT respond to any option request with
//!   `NBD_REP_ERR_TLS_REQD`."
//! - [`TlsPolicy::Optional`] is the degenerate SELECTIVETLS with no TLS-only export:
//!   "it permits the client to upgrade as and when it chooses".
//! - [`TlsPolicy::Required`] is FORCEDTLS: "forces the client to upgrade by erroring any
//!   NBD options other than `NBD_OPT_STARTTLS` or `NBD_OPT_ABORT` with
//!   `NBD_REP_ERR_TLS_REQD`", so no export is listed, described or opened in plaintext.
//!
//! Contracts:
//! - The gate is consulted before an option is parsed or acted on.
//! - After `NBD_REP_ACK` to `NBD_OPT_STARTTLS` the connection is TLS or nothing: a failed
//!   handshake ends it ("the server MUST terminate the session") with a log line.
//! - The transmission phase answers out of order from worker threads, so a rustls
//!   connection cannot be shared between them. Instead the connection's code gets one
//!   end of a `socketpair` and [`pump`] moves bytes between the other end and the TLS
//!   socket, on its own thread scoped to the connection (it cannot outlive it). Plain
//!   connections never touch this module's I/O.
//! - The pump ends when either side ends: the client's EOF (or close_notify, or
//!   [`crate::Server::shutdown`]'s `shutdown(2)` of the socket) becomes EOF on the
//!   socketpair once the decrypted bytes are delivered; the connection closing its end
//!   sends close_notify; a TLS error (garbage records) or a socket error ends both.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::{ServerConfig, ServerConnection};

use crate::proto::*;

/// How a TCP listener treats TLS.
#[derive(Debug, Clone, Default)]
pub enum TlsPolicy {
    /// No TLS (NOTLS): `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// The client may upgrade with `NBD_OPT_STARTTLS`; plaintext clients are served too.
    Optional(Arc<ServerConfig>),
    /// Every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up; `NBD_OPT_EXPORT_NAME` closes the
    /// connection.
    Required(Arc<ServerConfig>),
}

impl TlsPolicy {
    pub(crate) fn mode(&self) -> TlsMode {
        match self {
            TlsPolicy::Off => TlsMode::Off,
            TlsPolicy::Optional(_) => TlsMode::Optional,
            TlsPolicy::Required(_) => TlsMode::Required,
        }
    }

    pub(crate) fn config(&self) -> Option<&Arc<ServerConfig>> {
        match self {
            TlsPolicy::Off => None,
            TlsPolicy::Optional(config) | TlsPolicy::Required(config) => Some(config),
        }
    }
}

/// [`TlsPolicy`] without the certificates: what the option gate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    Off,
    Optional,
    Required,
}

/// What the gate says about one option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Handle the option as usual (for `NBD_OPT_STARTTLS`: acknowledge and upgrade).
    Proceed,
    /// Answer with this error reply and go on negotiating.
    Refuse(u32, &'static str),
    /// End the session: the option cannot be answered with an error.
    Close,
}

/// Whether `option` may run in `mode`, with TLS already up or not.
pub(crate) fn gate(mode: TlsMode, tls_active: bool, option: u32) -> Gate {
    match (option, mode, tls_active) {
        (NBD_OPT_STARTTLS, TlsMode::Off, _) => {
            Gate::Refuse(NBD_REP_ERR_POLICY, "TLS is not enabled on this listener")
        }
        // "If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated,
        // it MUST reply with NBD_REP_ERR_INVALID."
        (NBD_OPT_STARTTLS, _, true) => Gate::Refuse(NBD_REP_ERR_INVALID, "TLS is already active"),
        (NBD_OPT_STARTTLS | NBD_OPT_ABORT, ..) => Gate::Proceed,
        // "If the server receives a request to enter transmission mode via
        // NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request
        // cannot error, it MUST terminate the session."
        (NBD_OPT_EXPORT_NAME, TlsMode::Required, false) => Gate::Close,
        // "If the server receives any other option, it MUST reply with
        // NBD_REP_ERR_TLS_REQD if TLS has not been initiated."
        (_, TlsMode::Required, false) => Gate::Refuse(
            NBD_REP_ERR_TLS_REQD,
            "This server requires TLS: send NBD_OPT_STARTTLS first",
        ),
        _ => Gate::Proceed,
    }
}

/// Runs the server side of the TLS handshake on a blocking `socket`, until
/// `deadline`. On failure rustls has already tried to send the alert.
pub(crate) fn accept<S: Read + Write>(
    socket: &mut S,
    config: &Arc<ServerConfig>,
    deadline: Option<Instant>,
) -> io::Result<ServerConnection> {
    let mut tls = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "The TLS handshake took too long",
            ));
        }
        let (read, written) = tls.complete_io(socket)?;
        if read == 0 && written == 0 && tls.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(tls)
}

/// Plaintext read from the connection per turn of the pump.
const CHUNK: usize = 64 << 10;

/// Moves bytes between the TLS `socket` and `plain`, the socketpair end whose peer the
/// connection serves, until both directions are done or one fails. Returns how it
/// ended, for the log.
pub(crate) fn pump<S: Read + Write + AsFd>(
    mut socket: S,
    mut tls: ServerConnection,
    mut plain: UnixStream,
) -> io::Result<()> {
    super::listener::set_blocking(socket.as_fd().as_raw_fd(), false)?;
    plain.set_nonblocking(true)?;
    // Decrypted bytes not yet taken by the connection.
    let mut inbound = Vec::new();
    let mut inbound_at = 0;
    let mut chunk = vec![0u8; CHUNK];
    let mut client_done = false;
    let mut connection_done = false;
    let mut plain_write_closed = false;
    // The handshake may have left application data behind.
    client_done |= drain_plaintext(&mut tls, &mut inbound)?;
    loop {
        while tls.wants_write() {
            match tls.write_tls(&mut socket) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if connection_done => {
                    // The client left before our close_notify: nothing more to say.
                    tracing::debug!(%err, "could not send the last TLS records");
                    return Ok(());
                }
                Err(err) => return Err(err),
            }
        }
        while inbound_at < inbound.len() {
            match plain.write(&inbound[inbound_at..]) {
                Ok(n) => inbound_at += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                // The connection is gone; what it would have read no longer matters.
                Err(_) => {
                    inbound.clear();
                    inbound_at = 0;
                    connection_done = true;
                }
            }
        }
        if inbound_at == inbound.len() {
            inbound.clear();
            inbound_at = 0;
            if client_done && !plain_write_closed {
                // Everything the client sent is delivered: the connection sees EOF.
                let _ = plain.shutdown(std::net::Shutdown::Write);
                plain_write_closed = true;
            }
        }
        if connection_done && !tls.wants_write() {
            return Ok(());
        }

        let mut socket_events = PollFlags::empty();
        if !client_done && inbound.is_empty() {
            socket_events |= PollFlags::POLLIN;
        }
        if tls.wants_write() {
            socket_events |= PollFlags::POLLOUT;
        }
        let mut plain_events = PollFlags::empty();
        if !connection_done && !tls.wants_write() {
            plain_events |= PollFlags::POLLIN;
        }
        if !inbound.is_empty() {
            plain_events |= PollFlags::POLLOUT;
        }
        let (socket_ready, plain_ready) = {
            let mut fds = [
                PollFd::new(socket.as_fd(), socket_events),
                PollFd::new(plain.as_fd(), plain_events),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(err) => return Err(err.into()),
            }
            let broken = fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
            if broken && !socket_events.contains(PollFlags::POLLIN) {
                // poll reports these whatever was asked; without reading there is no EOF
                // to see, so stop here rather than spin.
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };

        if socket_ready && socket_events.contains(PollFlags::POLLIN) {
            match tls.read_tls(&mut socket) {
                Ok(0) => client_done = true,
                Ok(_) => {
                    if let Err(err) = tls.process_new_packets() {
                        // Send the alert rustls queued, best effort, then give up.
                        let _ = tls.write_tls(&mut socket);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, err));
                    }
                    client_done |= drain_plaintext(&mut tls, &mut inbound)?;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        if plain_ready && plain_events.contains(PollFlags::POLLIN) {
            match plain.read(&mut chunk) {
                Ok(0) => {
                    connection_done = true;
                    tls.send_close_notify();
                }
                Ok(n) => tls.writer().write_all(&chunk[..n])?,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    connection_done = true;
                    tls.send_close_notify();
                }
            }
        }
    }
}

/// Appends the plaintext rustls has decrypted to `inbound`; returns whether the client
/// closed its side (close_notify, or EOF without it).
fn drain_plaintext(tls: &mut ServerConnection, inbound: &mut Vec<u8>) -> io::Result<bool> {
    let mut buffer = [0u8; 16 << 10];
    loop {
        match tls.reader().read(&mut buffer) {
            Ok(0) => return Ok(true),
            Ok(n) => inbound.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: [u32; 10] = [
        NBD_OPT_EXPORT_NAME,
        NBD_OPT_ABORT,
        NBD_OPT_LIST,
        NBD_OPT_STARTTLS,
        NBD_OPT_INFO,
        NBD_OPT_GO,
        NBD_OPT_STRUCTURED_REPLY,
        NBD_OPT_LIST_META_CONTEXT,
        NBD_OPT_SET_META_CONTEXT,
        4242,
    ];
    /// Proceed.
    const GO: u32 = NBD_REP_ACK;
    /// Close the session.
    const END: u32 = 0;
    const POLICY: u32 = NBD_REP_ERR_POLICY;
    const INVALID: u32 = NBD_REP_ERR_INVALID;
    const TLS: u32 = NBD_REP_ERR_TLS_REQD;

    /// Every mode × before/after TLS × option (in the order of `OPTIONS`), as the spec
    /// has it. TLS never starts on an `Off` listener.
    #[test]
    fn the_gate_follows_the_three_modes() {
        let table = [
            (
                TlsMode::Off,
                false,
                [GO, GO, GO, POLICY, GO, GO, GO, GO, GO, GO],
            ),
            (TlsMode::Optional, false, [GO; 10]),
            (
                TlsMode::Optional,
                true,
                [GO, GO, GO, INVALID, GO, GO, GO, GO, GO, GO],
            ),
            (
                TlsMode::Required,
                false,
                [END, GO, TLS, GO, TLS, TLS, TLS, TLS, TLS, TLS],
            ),
            (
                TlsMode::Required,
                true,
                [GO, GO, GO, INVALID, GO, GO, GO, GO, GO, GO],
            ),
        ];
        for (mode, tls_active, expected) in table {
            for (option, expected) in OPTIONS.into_iter().zip(expected) {
                let got = match gate(mode, tls_active, option) {
                    Gate::Proceed => GO,
                    Gate::Refuse(reply, _) => reply,
                    Gate::Close => END,
                };
                assert_eq!(
                    got, expected,
                    "{mode:?}, TLS active {tls_active}, option {option}"
                );
            }
        }
    }

    mod sockets {
        #![allow(clippy::unwrap_used)]
        use std::net::TcpStream;
        use std::time::Duration;

        use super::super::*;
        use crate::backend::{ImageFile, ImageFileOptions};
        use crate::proto::option::{ClientOption, InfoRequest, OptionHeader, GREETING_LEN};
        use crate::proto::request::RequestHeader;
        use crate::server::{Server, ServerConfig};

        /// A server with one 1 MiB export "disk" on a TCP listener requiring TLS.
        fn serve() -> (
            Server,
            std::net::SocketAddr,
            rustls::pki_types::CertificateDer<'static>,
            tempfile::NamedTempFile,
        ) {
            serve_with(TlsPolicy::Required)
        }

        fn serve_with(
            policy: fn(Arc<rustls::ServerConfig>) -> TlsPolicy,
        ) -> (
            Server,
            std::net::SocketAddr,
            rustls::pki_types::CertificateDer<'static>,
            tempfile::NamedTempFile,
        ) {
            let (config, cert) = crate::test_support::tls_config();
            let image = tempfile::NamedTempFile::new().unwrap();
            image.as_file().set_len(1 << 20).unwrap();
            let server = Server::new(ServerConfig {
                handshake_timeout: Some(Duration::from_secs(5)),
                ..ServerConfig::default()
            });
            let device = ImageFile::open(image.path(), ImageFileOptions::default()).unwrap();
            server.add_export("disk", None, Arc::new(device)).unwrap();
            let addr = server
                .listen_tcp_tls("127.0.0.1:0", policy(config))
                .unwrap();
            (server, addr, cert, image)
        }

        fn send_option(stream: &mut impl Write, option: &ClientOption) {
            let data = option.encode_data();
            let header = OptionHeader {
                option: option.code(),
                length: u32::try_from(data.len()).unwrap(),
            };
            stream.write_all(&header.encode()).unwrap();
            stream.write_all(&data).unwrap();
            stream.flush().unwrap();
        }

        /// Reads option replies up to and including the first that is not
        /// NBD_REP_INFO/SERVER; returns their types.
        fn read_replies(stream: &mut impl Read) -> Vec<u32> {
            read_replies_with_data(stream)
                .into_iter()
                .map(|(reply, _)| reply)
                .collect()
        }

        fn read_replies_with_data(stream: &mut impl Read) -> Vec<(u32, Vec<u8>)> {
            let mut types = Vec::new();
            loop {
                let mut header = [0u8; 20];
                stream.read_exact(&mut header).unwrap();
                let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
                let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
                let mut data = vec![0u8; usize::try_from(len).unwrap()];
                stream.read_exact(&mut data).unwrap();
                types.push((reply, data));
                if reply != NBD_REP_INFO && reply != NBD_REP_SERVER {
                    return types;
                }
            }
        }

        /// Connects, sends the client flags and NBD_OPT_STARTTLS; returns the socket
        /// after the server acknowledged.
        fn start_tls(addr: std::net::SocketAddr) -> TcpStream {
            start_tls_after(addr, &[])
        }

        /// [`start_tls`] after sending `plaintext` options, each acknowledged.
        fn start_tls_after(addr: std::net::SocketAddr, plaintext: &[ClientOption]) -> TcpStream {
            let mut socket = TcpStream::connect(addr).unwrap();
            let mut greeting = [0u8; GREETING_LEN];
            socket.read_exact(&mut greeting).unwrap();
            socket.write_all(&3u32.to_be_bytes()).unwrap();
            for option in plaintext.iter().chain([&ClientOption::StartTls]) {
                send_option(&mut socket, option);
                assert_eq!(read_replies(&mut socket), [NBD_REP_ACK], "{option:?}");
            }
            socket
        }

        fn client(cert: &rustls::pki_types::CertificateDer<'static>) -> rustls::ClientConnection {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.clone()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap())
                .unwrap()
        }

        /// Waits until the server has no connection thread left (each joined its pump).
        fn wait_for_no_connections(server: &Server) {
            for _ in 0..500 {
                if server.inner.lock_connections().is_empty() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("a connection thread is still running");
        }

        fn request(command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
            RequestHeader {
                flags: 0,
                command,
                cookie,
                offset,
                length,
            }
            .encode()
        }

        fn go_disk() -> ClientOption {
            ClientOption::Go(InfoRequest {
                name: "disk".into(),
                requests: vec![],
            })
        }

        #[test]
        fn writes_and_reads_cross_the_pump_and_the_connection_ends_cleanly() {
            let (server, addr, cert, image) = serve();
            let socket = start_tls(addr);
            let mut tls = rustls::StreamOwned::new(client(&cert), socket);
            send_option(&mut tls, &go_disk());
            assert_eq!(read_replies(&mut tls).last(), Some(&NBD_REP_ACK));
            // Larger than a TLS record and than the pump's chunk, so both directions
            // take several turns.
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let length = u32::try_from(payload.len()).unwrap();
            tls.write_all(&request(NBD_CMD_WRITE, 1, 4096, length))
                .unwrap();
            tls.write_all(&payload).unwrap();
            tls.write_all(&request(NBD_CMD_READ, 2, 4096, length))
                .unwrap();
            tls.flush().unwrap();
            let mut reply = [0u8; 16];
            tls.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[4..8], &[0; 4], "write failed");
            tls.read_exact(&mut reply).unwrap();
            assert_eq!(&reply[4..8], &[0; 4], "read failed");
            let mut read = vec![0u8; payload.len()];
            tls.read_exact(&mut read).unwrap();
            assert!(read == payload, "read back different bytes");
            let on_disk = std::fs::read(image.path()).unwrap();
            assert!(on_disk[4096..4096 + payload.len()] == payload[..]);
            tls.write_all(&request(NBD_CMD_DISC, 3, 0, 0)).unwrap();
            tls.conn.send_close_notify();
            tls.flush().unwrap();
            // The server answers DISC by closing: close_notify, then EOF.
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest);
            assert!(rest.is_empty());
            wait_for_no_connections(&server);
        }

        /// Structured replies asked for in plaintext do not survive the upgrade.
        #[test]
        fn plaintext_negotiation_is_forgotten_at_the_upgrade() {
            let (_server, addr, cert, _image) = serve_with(TlsPolicy::Optional);
            let socket = start_tls_after(addr, &[ClientOption::StructuredReply]);
            let mut tls = rustls::StreamOwned::new(client(&cert), socket);
            send_option(&mut tls, &go_disk());
            let replies = read_replies_with_data(&mut tls);
            let (_, export) = &replies[0];
            // NBD_INFO_EXPORT: type, size, transmission flags.
            let flags = u16::from_be_bytes([export[10], export[11]]);
            assert_eq!(
                flags & NBD_FLAG_SEND_DF,
                0,
                "structured replies leaked through"
            );
            assert_eq!(replies.last().unwrap().0, NBD_REP_ACK);
        }

        #[test]
        fn garbage_after_starttls_and_cut_connections_end_the_connection() {
            let (server, addr, cert, _image) = serve();
            let mut socket = start_tls(addr);
            socket
                .write_all(b"GET / HTTP/1.1\r\nHost: not-a-tls-client\r\n\r\n")
                .unwrap();
            let mut answer = Vec::new();
            let _ = socket.read_to_end(&mut answer);
            // At most a TLS alert record (content type 21), never NBD data.
            assert!(answer.is_empty() || answer[0] == 21, "{answer:?}");
            wait_for_no_connections(&server);

            // Cut in the middle of the TLS handshake.
            drop(start_tls(addr));
            wait_for_no_connections(&server);

            // Cut during transmission, with a write half sent.
            let socket = start_tls(addr);
            let mut tls = rustls::StreamOwned::new(client(&cert), socket);
            send_option(&mut tls, &ClientOption::ExportName("disk".into()));
            let mut reply = [0u8; 10];
            tls.read_exact(&mut reply).unwrap();
            tls.write_all(&request(NBD_CMD_WRITE, 1, 0, 65536)).unwrap();
            tls.write_all(&[7u8; 1000]).unwrap();
            tls.flush().unwrap();
            tls.sock.shutdown(std::net::Shutdown::Both).unwrap();
            drop(tls);
            wait_for_no_connections(&server);
            assert_eq!(server.export_stats("disk").unwrap().dropped_connections, 1);
        }

        #[test]
        fn shutdown_ends_tls_connections() {
            let (server, addr, cert, _image) = serve();
            let socket = start_tls(addr);
            let mut tls = rustls::StreamOwned::new(client(&cert), socket);
            send_option(&mut tls, &ClientOption::ExportName("disk".into()));
            let mut reply = [0u8; 10];
            tls.read_exact(&mut reply).unwrap();
            let started = Instant::now();
            server.shutdown();
            assert!(started.elapsed() < Duration::from_secs(10));
            assert!(server.inner.lock_connections().is_empty());
        }
    }
}
