//! The server over real sockets, with a tempfile image and a minimal client built on the
//! crate's own wire parsers.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nbd_shim::backend::{ImageFile, ImageFileOptions};
use nbd_shim::proto::option::*;
use nbd_shim::proto::reply::*;
use nbd_shim::proto::request::RequestHeader;
use nbd_shim::proto::*;
use nbd_shim::{BlockDevice, Server, ServerConfig};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    server: Server,
}

fn fixture_with(config: ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let dev = ImageFile::open(&image, ImageFileOptions::default()).unwrap();
    let ro = ImageFile::open(
        &image,
        ImageFileOptions {
            read_only: true,
            direct: false,
        },
    )
    .unwrap();
    let server = Server::new(config);
    server
        .add_export("disk", Some("test disk".into()), Arc::new(dev))
        .unwrap();
    server.add_export("ro", None, Arc::new(ro)).unwrap();
    let socket = dir.path().join("nbd.sock");
    server.listen_unix(&socket).unwrap();
    Fixture {
        _dir: dir,
        socket,
        server,
    }
}

fn fixture() -> Fixture {
    fixture_with(ServerConfig::default())
}

/// A reply as the test client sees it.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple { error: u32, data: Vec<u8> },
    Chunks(Vec<OwnedChunk>),
}

#[derive(Debug, PartialEq, Eq, Clone)]
enum OwnedChunk {
    Data(u64, Vec<u8>),
    Hole(u64, u32),
    Status(u32, Vec<Descriptor>),
    Error(u32, String),
    None,
}

impl Reply {
    fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunks(chunks) => chunks
                .iter()
                .find_map(|c| {
                    if let OwnedChunk::Error(e, _) = c {
                        Some(*e)
                    } else {
                        None
                    }
                })
                .unwrap_or(0),
        }
    }

    /// Reassembles read data from `offset` of `len` bytes.
    fn data(&self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Reply::Simple { data, .. } => data.clone(),
            Reply::Chunks(chunks) => {
                let mut out = vec![0xee; len];
                for chunk in chunks {
                    match chunk {
                        OwnedChunk::Data(at, data) => {
                            let start = usize::try_from(at - offset).unwrap();
                            out[start..start + data.len()].copy_from_slice(data);
                        }
                        OwnedChunk::Hole(at, hole) => {
                            let start = usize::try_from(at - offset).unwrap();
                            out[start..start + usize::try_from(*hole).unwrap()].fill(0);
                        }
                        _ => {}
                    }
                }
                out
            }
        }
    }
}

struct Client<S> {
    stream: S,
    flags: u16,
    size: u64,
    next_cookie: u64,
}

fn read_exact_vec(stream: &mut impl Read, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn send_option(stream: &mut impl Write, option: &ClientOption) {
    let data = option.encode_data();
    stream
        .write_all(
            &OptionHeader {
                option: option.code(),
                length: u32::try_from(data.len()).unwrap(),
            }
            .encode(),
        )
        .unwrap();
    stream.write_all(&data).unwrap();
}

fn read_option_reply(stream: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let header = read_exact_vec(stream, OPTION_REPLY_HEADER_LEN);
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
    let mut whole = header;
    whole.extend(read_exact_vec(stream, usize::try_from(len).unwrap()));
    let (reply, _) = parse_option_reply(&whole).unwrap();
    (reply.option, reply.reply_type, reply.data.to_vec())
}

impl<S: Read + Write> Client<S> {
    /// Handshake with GO; `contexts` are selected with SET_META_CONTEXT when structured.
    fn connect(mut stream: S, export: &str, structured: bool, contexts: &[&str]) -> Self {
        let greeting = read_exact_vec(&mut stream, GREETING_LEN);
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            send_option(&mut stream, &ClientOption::StructuredReply);
            assert_eq!(read_option_reply(&mut stream).1, NBD_REP_ACK);
            if !contexts.is_empty() {
                let request = MetaContextRequest {
                    export: export.into(),
                    queries: contexts.iter().map(|c| (*c).to_owned()).collect(),
                };
                send_option(&mut stream, &ClientOption::SetMetaContext(request));
                loop {
                    let (_, reply_type, _) = read_option_reply(&mut stream);
                    if reply_type == NBD_REP_ACK {
                        break;
                    }
                    assert_eq!(reply_type, NBD_REP_META_CONTEXT);
                }
            }
        }
        send_option(
            &mut stream,
            &ClientOption::Go(InfoRequest {
                name: export.into(),
                requests: vec![NBD_INFO_BLOCK_SIZE],
            }),
        );
        let (mut flags, mut size) = (0, 0);
        loop {
            let (_, reply_type, data) = read_option_reply(&mut stream);
            match reply_type {
                NBD_REP_ACK => break,
                NBD_REP_INFO if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                NBD_REP_INFO => {}
                other => panic!("unexpected GO reply {other:#x}"),
            }
        }
        Client {
            stream,
            flags,
            size,
            next_cookie: 1,
        }
    }

    fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.stream.write_all(&header.encode()).unwrap();
        self.stream.write_all(payload).unwrap();
        cookie
    }

    /// Reads the reply to `cookie` (replies come in request order); `read_len` is the
    /// data length of a simple read reply.
    fn reply(&mut self, cookie: u64, read_len: Option<usize>) -> Reply {
        let mut magic = read_exact_vec(&mut self.stream, 4);
        if magic == NBD_SIMPLE_REPLY_MAGIC.to_be_bytes() {
            magic.extend(read_exact_vec(&mut self.stream, SIMPLE_REPLY_LEN - 4));
            let simple = parse_simple_reply(&magic).unwrap();
            assert_eq!(simple.cookie, cookie);
            let data = match read_len {
                Some(len) if simple.error == 0 => read_exact_vec(&mut self.stream, len),
                _ => Vec::new(),
            };
            return Reply::Simple {
                error: simple.error,
                data,
            };
        }
        let mut chunks = Vec::new();
        loop {
            if magic.is_empty() {
                magic = read_exact_vec(&mut self.stream, 4);
            }
            magic.extend(read_exact_vec(&mut self.stream, CHUNK_HEADER_LEN - 4));
            let len = u32::from_be_bytes(magic[16..20].try_into().unwrap());
            magic.extend(read_exact_vec(
                &mut self.stream,
                usize::try_from(len).unwrap(),
            ));
            let (chunk, _) = parse_chunk(&magic).unwrap();
            assert_eq!(chunk.cookie, cookie);
            chunks.push(match chunk.payload {
                ChunkPayload::OffsetData { offset, data } => {
                    OwnedChunk::Data(offset, data.to_vec())
                }
                ChunkPayload::OffsetHole { offset, length } => OwnedChunk::Hole(offset, length),
                ChunkPayload::BlockStatus {
                    context_id,
                    descriptors,
                } => OwnedChunk::Status(context_id, descriptors),
                ChunkPayload::Error { error, message } => {
                    OwnedChunk::Error(error, String::from_utf8_lossy(message).into_owned())
                }
                ChunkPayload::None => OwnedChunk::None,
                other => panic!("unexpected chunk {other:?}"),
            });
            let done = chunk.flags & NBD_REPLY_FLAG_DONE != 0;
            magic.clear();
            if done {
                return Reply::Chunks(chunks);
            }
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Reply {
        let cookie = self.send(NBD_CMD_READ, 0, offset, len, &[]);
        self.reply(cookie, Some(usize::try_from(len).unwrap()))
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        let cookie = self.send(
            NBD_CMD_WRITE,
            flags,
            offset,
            u32::try_from(data.len()).unwrap(),
            data,
        );
        self.reply(cookie, None).error()
    }

    fn simple(&mut self, command: u16, flags: u16, offset: u64, len: u32) -> Reply {
        let cookie = self.send(command, flags, offset, len, &[]);
        self.reply(cookie, None)
    }

    fn disconnect(mut self) {
        self.send(NBD_CMD_DISC, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

fn connect(socket: &Path, export: &str, structured: bool, contexts: &[&str]) -> Client<UnixStream> {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    Client::connect(stream, export, structured, contexts)
}

#[test]
fn structured_session_does_every_command() {
    let f = fixture();
    let mut c = connect(&f.socket, "disk", true, &["base:allocation"]);
    assert_eq!(c.size, SIZE);
    for flag in [
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
        NBD_FLAG_SEND_DF,
        NBD_FLAG_CAN_MULTI_CONN,
        NBD_FLAG_SEND_CACHE,
        NBD_FLAG_SEND_FAST_ZERO,
    ] {
        assert_ne!(c.flags & flag, 0, "flag {flag:#x}");
    }
    assert_eq!(c.flags & NBD_FLAG_READ_ONLY, 0);

    let pattern: Vec<u8> = (0..MIB).map(|i| u8::try_from(i % 251).unwrap()).collect();
    assert_eq!(c.write(MIB, &pattern, 0), 0);
    assert_eq!(c.write(4 * MIB, &pattern[..4096], NBD_CMD_FLAG_FUA), 0);
    let reply = c.read(MIB, u32::try_from(MIB).unwrap());
    assert_eq!(reply.error(), 0);
    assert_eq!(reply.data(MIB, pattern.len()), pattern);
    // DF: exactly one content chunk.
    let cookie = c.send(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 4 << 20, &[]);
    let Reply::Chunks(chunks) = c.reply(cookie, None) else {
        panic!()
    };
    assert_eq!(chunks.len(), 1);
    assert!(matches!(&chunks[0], OwnedChunk::Data(0, d) if d.len() == 4 << 20));

    // A large read over a hole and data: holes come back as OFFSET_HOLE.
    let reply = c.read(0, 8 << 20);
    let Reply::Chunks(chunks) = &reply else {
        panic!()
    };
    assert!(
        chunks.iter().any(|c| matches!(c, OwnedChunk::Hole(0, _))),
        "{chunks:?}"
    );
    let data = reply.data(0, 8 << 20);
    assert_eq!(&data[usize::try_from(MIB).unwrap()..2 << 20], &pattern[..]);
    assert!(data[..1 << 20].iter().all(|&b| b == 0));

    assert_eq!(c.simple(NBD_CMD_FLUSH, 0, 0, 0).error(), 0);
    assert_eq!(c.simple(NBD_CMD_CACHE, 0, 0, 1 << 20).error(), 0);

    // Block status: hole, data, hole.
    let Reply::Chunks(chunks) = c.simple(NBD_CMD_BLOCK_STATUS, 0, 0, 3 << 20) else {
        panic!()
    };
    let OwnedChunk::Status(0, descriptors) = &chunks[0] else {
        panic!("{chunks:?}")
    };
    let total: u64 = descriptors.iter().map(|d| u64::from(d.length)).sum();
    assert_eq!(total, 3 << 20);
    assert_eq!(descriptors[0].flags, NBD_STATE_HOLE | NBD_STATE_ZERO);
    assert!(descriptors.iter().any(|d| d.flags == 0));
    let Reply::Chunks(chunks) = c.simple(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 3 << 20)
    else {
        panic!()
    };
    assert!(
        matches!(&chunks[0], OwnedChunk::Status(0, d) if d.len() == 1 && d[0].length <= 3 << 20)
    );

    // Trim and zeroing read back as zeroes.
    assert_eq!(c.simple(NBD_CMD_TRIM, 0, MIB, 64 << 10).error(), 0);
    assert_eq!(
        c.simple(
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE,
            MIB + (64 << 10),
            4096
        )
        .error(),
        0
    );
    assert_eq!(
        c.simple(
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA,
            MIB + (128 << 10),
            4096
        )
        .error(),
        0
    );
    let data = c.read(MIB, 132 << 10).data(MIB, 132 << 10);
    let zeroed = |r: std::ops::Range<usize>| data[r].iter().all(|&b| b == 0);
    assert!(zeroed(0..(64 << 10) + 4096));
    assert!(zeroed(128 << 10..132 << 10));
    assert_eq!(data[(64 << 10) + 4096], pattern[(64 << 10) + 4096]);
    c.disconnect();

    let stats = f.server.export_stats("disk").unwrap();
    assert_eq!(stats.connections_total, 1);
    assert!(stats.bytes_written >= MIB);
    assert!(stats.bytes_read >= 8 * MIB);
    assert_eq!(stats.errors, 0);
}

#[test]
fn bad_requests_get_errors_and_the_connection_stays_usable() {
    let f = fixture();
    let mut c = connect(&f.socket, "disk", true, &[]);
    // Out of range read: EINVAL; write: ENOSPC.
    assert_eq!(c.read(SIZE - 512, 1024).error(), Errno::Inval.code());
    assert_eq!(c.write(SIZE - 512, &[1u8; 1024], 0), Errno::NoSpc.code());
    // Unknown command and unknown flag.
    assert_eq!(c.simple(42, 0, 0, 0).error(), Errno::Inval.code());
    assert_eq!(c.write(0, &[7u8; 4096], 1 << 9), Errno::Inval.code());
    // Misplaced flag; too large a read; block status without contexts.
    assert_eq!(
        c.simple(NBD_CMD_TRIM, NBD_CMD_FLAG_DF, 0, 4096).error(),
        Errno::Inval.code()
    );
    assert_eq!(c.read(0, (32 << 20) + 1).error(), Errno::Inval.code());
    assert_eq!(
        c.simple(NBD_CMD_BLOCK_STATUS, 0, 0, 4096).error(),
        Errno::Inval.code()
    );
    assert_eq!(
        c.simple(NBD_CMD_FLUSH, 0, 1, 0).error(),
        Errno::Inval.code()
    );
    // The refused write's payload was skipped: the stream is in sync.
    assert_eq!(c.write(0, &[9u8; 4096], 0), 0);
    assert_eq!(c.read(0, 4096).data(0, 4096), vec![9u8; 4096]);
    // A refused write larger than the receive buffer is skipped too.
    let big = vec![1u8; 6 << 20];
    assert_eq!(c.write(SIZE - 4096, &big, 0), Errno::NoSpc.code());
    assert_eq!(c.read(0, 4096).data(0, 4096), vec![9u8; 4096]);

    // Bad magic: desynchronised, the server closes.
    c.stream.write_all(&[0u8; 28]).unwrap();
    let mut rest = Vec::new();
    c.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    let stats = f.server.export_stats("disk").unwrap();
    assert_eq!(stats.protocol_errors, 1);
    assert_eq!(stats.errors, 9);
}

#[test]
fn simple_replies_and_read_only_exports() {
    let f = fixture();
    let mut c = connect(&f.socket, "disk", false, &[]);
    assert_eq!(c.flags & NBD_FLAG_SEND_DF, 0);
    assert_eq!(c.write(8192, b"simple", 0), 0);
    assert_eq!(
        c.read(8192, 6),
        Reply::Simple {
            error: 0,
            data: b"simple".to_vec()
        }
    );
    assert_eq!(
        c.read(SIZE, 1),
        Reply::Simple {
            error: Errno::Inval.code(),
            data: Vec::new()
        }
    );
    // Zero-length read: success, no data.
    assert_eq!(
        c.read(0, 0),
        Reply::Simple {
            error: 0,
            data: Vec::new()
        }
    );
    c.disconnect();

    let mut ro = connect(&f.socket, "ro", false, &[]);
    assert_ne!(ro.flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(
        ro.flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES),
        0
    );
    assert_eq!(ro.write(0, b"nope", 0), Errno::Perm.code());
    assert_eq!(
        ro.simple(NBD_CMD_TRIM, 0, 0, 512).error(),
        Errno::Perm.code()
    );
    assert_eq!(
        ro.simple(NBD_CMD_WRITE_ZEROES, 0, 0, 512).error(),
        Errno::Perm.code()
    );
    assert_eq!(ro.read(8192, 6).data(8192, 6), b"simple");
    ro.disconnect();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let f = fixture();
    let mut c = connect(&f.socket, "disk", true, &[]);
    let mut cookies = Vec::new();
    let mut batch = Vec::new();
    for i in 0..64u64 {
        let header = RequestHeader {
            flags: 0,
            command: NBD_CMD_WRITE,
            cookie: 1000 + i,
            offset: i * 4096,
            length: 4096,
        };
        batch.extend_from_slice(&header.encode());
        batch.extend(std::iter::repeat_n(u8::try_from(i).unwrap(), 4096));
        cookies.push(1000 + i);
    }
    for i in 0..64u64 {
        let header = RequestHeader {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 2000 + i,
            offset: i * 4096,
            length: 4096,
        };
        batch.extend_from_slice(&header.encode());
    }
    // Send in uneven pieces so requests straddle reads.
    for piece in batch.chunks(1000) {
        c.stream.write_all(piece).unwrap();
    }
    for cookie in cookies {
        assert_eq!(c.reply(cookie, None).error(), 0);
    }
    for i in 0..64u64 {
        let data = c.reply(2000 + i, None).data(i * 4096, 4096);
        assert!(data.iter().all(|&b| u64::from(b) == i), "block {i}");
    }
    c.disconnect();
}

#[test]
fn writes_larger_than_the_receive_buffer() {
    let f = fixture_with(ServerConfig {
        recv_buffer_size: 64 << 10,
        ..ServerConfig::default()
    });
    let mut c = connect(&f.socket, "disk", true, &[]);
    let data: Vec<u8> = (0..(3 << 20))
        .map(|i: u32| u8::try_from(i % 253).unwrap())
        .collect();
    assert_eq!(c.write(4096, &data, 0), 0);
    assert_eq!(c.write(4096 + (3 << 20), &data[..100_000], 0), 0);
    let back = c.read(4096, 3 << 20).data(4096, 3 << 20);
    assert!(back == data);
    c.disconnect();
}

#[test]
fn tcp_listener_and_default_export() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("one.img");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let server = Server::new(ServerConfig::default());
    server
        .add_export(
            "only",
            None,
            Arc::new(ImageFile::open(&image, ImageFileOptions::default()).unwrap()),
        )
        .unwrap();
    let addr = server.listen_tcp("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(addr).unwrap();
    let mut c = Client::connect(stream, "", true, &["base:allocation"]);
    assert_eq!(c.size, MIB);
    assert_eq!(c.write(0, b"tcp", NBD_CMD_FLAG_FUA), 0);
    assert_eq!(c.read(0, 3).data(0, 3), b"tcp");
    c.disconnect();
    server.shutdown();
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn shutdown_answers_queued_requests_then_closes() {
    let f = fixture();
    let mut idle = connect(&f.socket, "disk", true, &[]);
    let mut busy = connect(&f.socket, "disk", true, &[]);
    let cookies: Vec<_> = (0..16u64)
        .map(|i| busy.send(NBD_CMD_WRITE, 0, i * 4096, 4096, &[3u8; 4096]))
        .collect();
    // Shut down while they may still sit in the socket: every request the client sent
    // before the shutdown is answered.
    f.server.shutdown();
    for &cookie in &cookies {
        assert_eq!(busy.reply(cookie, None).error(), 0);
    }
    let mut rest = Vec::new();
    busy.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    idle.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(!f.socket.exists(), "the socket file is removed");
    assert_eq!(f.server.export_stats("disk").unwrap().connections, 0);
    assert!(f.server.listen_unix(&f.socket).is_err());
    // Idempotent.
    f.server.shutdown();
    let _ = &mut idle;
}

/// Retiring one export closes its connections after answering what they sent, refuses
/// new ones, and leaves the other exports' connections serving.
#[test]
fn retiring_an_export_closes_only_its_connections() {
    let f = fixture();
    let mut other = connect(&f.socket, "ro", true, &[]);
    let mut idle = connect(&f.socket, "disk", true, &[]);
    let mut busy = connect(&f.socket, "disk", true, &[]);
    // The handshake's last reply goes out before the server counts the connection as
    // the export's: one answered request each says both are in transmission.
    for client in [&mut idle, &mut busy] {
        let cookie = client.send(NBD_CMD_FLUSH, 0, 0, 0, &[]);
        assert_eq!(client.reply(cookie, None).error(), 0);
    }
    let cookies: Vec<_> = (0..16u64)
        .map(|i| busy.send(NBD_CMD_WRITE, 0, i * 4096, 4096, &[5u8; 4096]))
        .collect();
    assert_eq!(f.server.retire_export("disk"), Some(2));
    for &cookie in &cookies {
        assert_eq!(busy.reply(cookie, None).error(), 0, "sent before: answered");
    }
    let mut rest = Vec::new();
    busy.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    idle.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // The other export serves on, and sees the writes.
    let read = other.read(0, 4096);
    assert_eq!(read.data(0, 4096), vec![5u8; 4096]);
    // The export is gone for new clients, and only once.
    assert_eq!(f.server.export_names(), ["ro"]);
    assert_eq!(f.server.retire_export("disk"), None);
    let mut stream = UnixStream::connect(&f.socket).unwrap();
    read_exact_vec(&mut stream, GREETING_LEN);
    stream.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(
        &mut stream,
        &ClientOption::Go(InfoRequest {
            name: "disk".into(),
            requests: vec![],
        }),
    );
    assert_eq!(read_option_reply(&mut stream).1, NBD_REP_ERR_UNKNOWN);
    other.disconnect();
}

#[test]
fn stale_socket_files_are_replaced_and_live_ones_refused() {
    let f = fixture();
    let other = Server::new(ServerConfig::default());
    assert!(matches!(
        other.listen_unix(&f.socket),
        Err(nbd_shim::ServerError::AddressInUse(_))
    ));
    f.server.shutdown();
    // Leave a stale socket file behind and listen over it.
    let stale = std::os::unix::net::UnixListener::bind(&f.socket).unwrap();
    drop(stale);
    other.listen_unix(&f.socket).unwrap();
    other.shutdown();
}

#[test]
fn vanishing_clients_are_counted() {
    let f = fixture();
    let mut c = connect(&f.socket, "disk", false, &[]);
    // Half a write, then gone.
    let header = RequestHeader {
        flags: 0,
        command: NBD_CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 4096,
    };
    c.stream.write_all(&header.encode()).unwrap();
    c.stream.write_all(&[0u8; 100]).unwrap();
    drop(c);
    for _ in 0..100 {
        if f.server.export_stats("disk").unwrap().dropped_connections == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = f.server.export_stats("disk").unwrap();
    assert_eq!((stats.dropped_connections, stats.connections), (1, 0));
}

#[test]
fn device_is_usable_after_shutdown() {
    // The export's device outlives the server handle.
    let f = fixture();
    let dev: Arc<dyn BlockDevice> = Arc::new(
        ImageFile::open(f._dir.path().join("disk.img"), ImageFileOptions::default()).unwrap(),
    );
    f.server.shutdown();
    assert_eq!(dev.size(), SIZE);
}

#[test]
fn slow_handshakes_time_out() {
    let f = fixture_with(ServerConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    });
    let mut stream = UnixStream::connect(&f.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let greeting = read_exact_vec(&mut stream, GREETING_LEN);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Say nothing: the server hangs up after the timeout.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // A client that completes in time is unaffected, even once idle for longer.
    let mut c = connect(&f.socket, "disk", true, &[]);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(c.write(0, b"late", 0), 0);
    c.disconnect();
}

#[test]
fn list_and_unknown_exports_over_a_socket() {
    let f = fixture();
    let mut stream = UnixStream::connect(&f.socket).unwrap();
    read_exact_vec(&mut stream, GREETING_LEN);
    stream.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut stream, &ClientOption::List);
    let mut names = Vec::new();
    loop {
        let (_, reply_type, data) = read_option_reply(&mut stream);
        if reply_type == NBD_REP_ACK {
            break;
        }
        let len = usize::try_from(u32::from_be_bytes(data[..4].try_into().unwrap())).unwrap();
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "ro"]);
    // With two exports there is no default export.
    send_option(
        &mut stream,
        &ClientOption::Go(InfoRequest {
            name: String::new(),
            requests: vec![],
        }),
    );
    assert_eq!(read_option_reply(&mut stream).1, NBD_REP_ERR_UNKNOWN);
    send_option(&mut stream, &ClientOption::Abort);
    assert_eq!(read_option_reply(&mut stream).1, NBD_REP_ACK);
}

/// An image that fails reads at one offset, cannot zero fast without holes, and offers
/// `x-blkrep:dirty` (first 64 KiB dirty, the rest clean).
struct Quirky(ImageFile);

const BAD_OFFSET: u64 = 5 * MIB;

impl BlockDevice for Quirky {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> nbd_shim::backend::BlockSizeLimits {
        self.0.block_size()
    }
    fn can_trim(&self) -> bool {
        false
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == BAD_OFFSET {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.0.write_at(buf, offset, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: nbd_shim::ZeroMode,
        fua: bool,
    ) -> std::io::Result<()> {
        if mode.fast_only && !mode.may_trim {
            return Err(std::io::ErrorKind::Unsupported.into());
        }
        self.0.write_zeroes(offset, len, mode, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.0.trim(offset, len, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.cache(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> std::io::Result<Vec<nbd_shim::Extent>> {
        self.0.allocation(offset, len)
    }
    fn meta_contexts(&self) -> Vec<String> {
        vec!["x-blkrep:dirty".into()]
    }
    fn context_extents(
        &self,
        index: usize,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Vec<nbd_shim::Extent>> {
        assert_eq!(index, 0);
        let dirty_end = 64 << 10;
        Ok(if offset < dirty_end {
            vec![
                nbd_shim::Extent {
                    length: dirty_end - offset,
                    flags: 1,
                },
                nbd_shim::Extent {
                    length: SIZE - dirty_end,
                    flags: 0,
                },
            ]
        } else {
            vec![nbd_shim::Extent {
                length: len,
                flags: 0,
            }]
        })
    }
}

#[test]
fn device_errors_fast_zero_and_backend_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("q.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let server = Server::new(ServerConfig::default());
    let dev = Quirky(ImageFile::open(&image, ImageFileOptions::default()).unwrap());
    server.add_export("q", None, Arc::new(dev)).unwrap();
    let socket = dir.path().join("q.sock");
    server.listen_unix(&socket).unwrap();

    let mut c = connect(
        &socket,
        "q",
        true,
        &[
            "qemu:dirty-bitmap:blkrep",
            "base:allocation",
            "x-blkrep:dirty",
        ],
    );
    assert_eq!(c.flags & (NBD_FLAG_SEND_TRIM | NBD_FLAG_CAN_MULTI_CONN), 0);
    // EIO from the device, as an error chunk with a message; the connection goes on.
    let reply = c.read(BAD_OFFSET, 4096);
    let Reply::Chunks(chunks) = &reply else {
        panic!()
    };
    assert!(
        matches!(&chunks[..], [OwnedChunk::Error(5, message)] if message.contains("NBD_CMD_READ"))
    );
    // Unsupported fast zero: ENOTSUP, and without FAST_ZERO it works.
    let fast_no_hole = NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE;
    assert_eq!(
        c.simple(NBD_CMD_WRITE_ZEROES, fast_no_hole, 0, 4096)
            .error(),
        Errno::NotSup.code()
    );
    assert_eq!(
        c.simple(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 4096)
            .error(),
        0
    );
    // TRIM was not advertised.
    assert_eq!(
        c.simple(NBD_CMD_TRIM, 0, 0, 4096).error(),
        Errno::Inval.code()
    );
    // Three contexts, one chunk each, the alias and the original agreeing.
    let Reply::Chunks(chunks) = c.simple(NBD_CMD_BLOCK_STATUS, 0, 0, 1 << 20) else {
        panic!()
    };
    assert_eq!(chunks.len(), 3);
    let by_id: Vec<_> = chunks
        .iter()
        .map(|c| match c {
            OwnedChunk::Status(id, d) => (*id, d.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    let dirty = vec![
        Descriptor {
            length: 64 << 10,
            flags: 1,
        },
        Descriptor {
            length: (1 << 20) - (64 << 10),
            flags: 0,
        },
    ];
    assert_eq!(by_id.iter().filter(|(_, d)| *d == dirty).count(), 2);
    let mut ids: Vec<_> = by_id.iter().map(|(id, _)| *id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    let Reply::Chunks(chunks) = c.simple(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 4096, 1 << 20)
    else {
        panic!()
    };
    assert!(chunks
        .iter()
        .all(|c| matches!(c, OwnedChunk::Status(_, d) if d.len() == 1)));
    c.disconnect();
    let stats = server.export_stats("q").unwrap();
    assert_eq!(stats.errors, 3);
}

/// A gate that blocked device calls wait on; it opens by itself after 10 s so a server
/// that wrongly serialises requests fails the test instead of hanging it.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        let _unused = self
            .opened
            .wait_timeout_while(open, Duration::from_secs(10), |open| !*open)
            .unwrap();
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// An image whose FLUSH, and reads at [`BAD_OFFSET`], wait for a gate; optionally it
/// says it waits on the device, so reads and writes run on workers too.
struct Gated {
    image: ImageFile,
    gate: Arc<Gate>,
    waits: bool,
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn block_size(&self) -> nbd_shim::backend::BlockSizeLimits {
        self.image.block_size()
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_fast_zero(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn waits_on_device(&self) -> bool {
        self.waits
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == BAD_OFFSET {
            self.gate.wait();
        }
        self.image.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.image.write_at(buf, offset, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        mode: nbd_shim::ZeroMode,
        fua: bool,
    ) -> std::io::Result<()> {
        self.image.write_zeroes(offset, len, mode, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.image.trim(offset, len, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.gate.wait();
        self.image.flush()
    }
    fn cache(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.image.cache(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> std::io::Result<Vec<nbd_shim::Extent>> {
        self.image.allocation(offset, len)
    }
}

struct GatedFixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    gate: Arc<Gate>,
    _server: Server,
}

fn gated(waits: bool, config: ServerConfig) -> GatedFixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let gate = Arc::new(Gate::default());
    let dev = Gated {
        image: ImageFile::open(&path, ImageFileOptions::default()).unwrap(),
        gate: Arc::clone(&gate),
        waits,
    };
    let server = Server::new(config);
    server.add_export("g", None, Arc::new(dev)).unwrap();
    let socket = dir.path().join("g.sock");
    server.listen_unix(&socket).unwrap();
    GatedFixture {
        _dir: dir,
        socket,
        gate,
        _server: server,
    }
}

/// Reads one simple reply without data: (cookie, error).
fn next_simple_reply(stream: &mut impl Read) -> (u64, u32) {
    let bytes = read_exact_vec(stream, SIMPLE_REPLY_LEN);
    let reply = parse_simple_reply(&bytes).unwrap();
    (reply.cookie, reply.error)
}

#[test]
fn a_slow_flush_does_not_hold_back_later_requests() {
    let f = gated(false, ServerConfig::default());
    let mut c = connect(&f.socket, "g", false, &[]);
    let flush = c.send(NBD_CMD_FLUSH, 0, 0, 0, &[]);
    let write = c.send(NBD_CMD_WRITE, 0, 0, 4096, &[7u8; 4096]);
    let fua = c.send(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 8192, 4096, &[8u8; 4096]);
    // The plain write is answered while the flush waits (the FUA write may be too).
    assert_eq!(next_simple_reply(&mut c.stream), (write, 0));
    f.gate.open();
    let mut rest = vec![
        next_simple_reply(&mut c.stream),
        next_simple_reply(&mut c.stream),
    ];
    rest.sort_unstable();
    assert_eq!(rest, vec![(flush, 0), (fua, 0)]);
    assert_eq!(c.read(0, 4096).data(0, 4096), vec![7u8; 4096]);
    c.disconnect();
}

#[test]
fn a_device_that_waits_gets_requests_in_parallel() {
    let f = gated(true, ServerConfig::default());
    let mut c = connect(&f.socket, "g", false, &[]);
    let slow = c.send(NBD_CMD_READ, 0, BAD_OFFSET, 4096, &[]);
    let write = c.send(NBD_CMD_WRITE, 0, 0, 4096, &[9u8; 4096]);
    // The write overtakes the read that waits on the device.
    assert_eq!(next_simple_reply(&mut c.stream), (write, 0));
    f.gate.open();
    assert_eq!(next_simple_reply(&mut c.stream), (slow, 0));
    assert_eq!(read_exact_vec(&mut c.stream, 4096), vec![0u8; 4096]);
    c.disconnect();
}

#[test]
fn serial_mode_answers_in_request_order() {
    let f = gated(
        true,
        ServerConfig {
            parallel_requests: 0,
            ..ServerConfig::default()
        },
    );
    let mut c = connect(&f.socket, "g", false, &[]);
    let flush = c.send(NBD_CMD_FLUSH, 0, 0, 0, &[]);
    let write = c.send(NBD_CMD_WRITE, 0, 0, 4096, &[1u8; 4096]);
    let opener = {
        let gate = Arc::clone(&f.gate);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            gate.open();
        })
    };
    assert_eq!(next_simple_reply(&mut c.stream), (flush, 0));
    assert_eq!(next_simple_reply(&mut c.stream), (write, 0));
    opener.join().unwrap();
    c.disconnect();
}

#[test]
fn disconnect_waits_for_requests_still_running() {
    let f = gated(false, ServerConfig::default());
    let mut c = connect(&f.socket, "g", false, &[]);
    let flush = c.send(NBD_CMD_FLUSH, 0, 0, 0, &[]);
    c.send(NBD_CMD_DISC, 0, 0, 0, &[]);
    std::thread::sleep(Duration::from_millis(100));
    f.gate.open();
    let mut rest = Vec::new();
    c.stream.read_to_end(&mut rest).unwrap();
    assert_eq!(
        rest.len(),
        SIMPLE_REPLY_LEN,
        "exactly the flush's reply, then EOF"
    );
    assert_eq!(next_simple_reply(&mut rest.as_slice()), (flush, 0));
}

#[test]
fn many_parallel_writes_are_all_answered_and_stored() {
    // Small limits so the connection often waits for room.
    let f = gated(
        true,
        ServerConfig {
            parallel_requests: 3,
            max_in_flight_bytes: 64 << 10,
            recv_buffer_size: 64 << 10,
            ..ServerConfig::default()
        },
    );
    f.gate.open();
    let mut c = connect(&f.socket, "g", false, &[]);
    let mut expected = std::collections::BTreeMap::new();
    let mut batch = Vec::new();
    for i in 0..60u64 {
        // Sizes from 4 KiB to 196 KiB, some larger than the receive buffer.
        let len = 4096 * (1 + i % 49);
        let offset = i * 256 * 1024;
        let fill = u8::try_from(i + 1).unwrap();
        let header = RequestHeader {
            flags: if i % 7 == 0 { NBD_CMD_FLAG_FUA } else { 0 },
            command: NBD_CMD_WRITE,
            cookie: 10_000 + i,
            offset,
            length: u32::try_from(len).unwrap(),
        };
        batch.extend_from_slice(&header.encode());
        batch.extend(std::iter::repeat_n(fill, usize::try_from(len).unwrap()));
        expected.insert(10_000 + i, (offset, len, fill));
    }
    let mut writer = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&batch).unwrap());
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (cookie, error) = next_simple_reply(&mut c.stream);
        assert_eq!(error, 0);
        assert!(expected.contains_key(&cookie), "unknown cookie {cookie}");
        assert!(answered.insert(cookie), "cookie {cookie} answered twice");
    }
    sender.join().unwrap();
    for (offset, len, fill) in expected.into_values() {
        let data = c.read(offset, u32::try_from(len).unwrap()).data(offset, 0);
        assert!(data.iter().all(|&b| b == fill), "write at {offset}");
    }
    c.disconnect();
}
