//! The server's time limits over real sockets in lab mode (plain HTTP, where no TLS
//! handshake bounds a connection's start): a connection must send its first request's
//! headers within the handshake timeout; a body that stops is cut, while a body that
//! keeps moving, however slowly, is read to its end.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use replica::limits::Limits;
use replica::server::{
    AuthEntry, PreSharedKey, ReplicaServer, ServerSettings, Transport, DEFAULT_MAX_DISK_SIZE,
};
use wire::api::{IDENTITY_HEADER, PSK_HEADER};
use wire::tls::NamePattern;

const PSK: &str = "lab-key-0123456789abcdef";
const FIRST_REQUEST: Duration = Duration::from_secs(1);
const BODY_IDLE: Duration = Duration::from_secs(1);

fn server(dir: &std::path::Path) -> ReplicaServer {
    ReplicaServer::start(ServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        transport: Transport::PlainWithPsk {
            allow_non_loopback: false,
        },
        authorization: vec![AuthEntry {
            primary: Some(NamePattern::parse("p.lab.test").unwrap()),
            storage: dir.join("store"),
            trust_group: "lab".into(),
            quota: None,
            psk: PreSharedKey::new(PSK.into()),
        }],
        reserve: 0,
        max_disk_size: DEFAULT_MAX_DISK_SIZE,
        limits: Limits {
            handshake_timeout: FIRST_REQUEST,
            body_timeout: BODY_IDLE,
            ..Limits::default()
        },
    })
    .unwrap()
}

/// Everything the server sends until it closes, and when it closed.
fn until_closed(mut stream: TcpStream, limit: Duration) -> (String, Instant) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    (
        String::from_utf8_lossy(&answer).into_owned(),
        Instant::now(),
    )
}

fn enable_head(length: usize) -> String {
    format!(
        "POST /v1/replicas HTTP/1.1\r\nHost: x\r\n{PSK_HEADER}: {PSK}\r\n{IDENTITY_HEADER}: p.lab.test\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n"
    )
}

#[test]
fn a_connection_without_a_request_is_closed_after_the_first_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let started = Instant::now();
    let silent = TcpStream::connect(server.local_addr()).unwrap();
    let mut partial = TcpStream::connect(server.local_addr()).unwrap();
    partial
        .write_all(b"GET /v1/echo HTTP/1.1\r\nHost:")
        .unwrap();
    for stream in [silent, partial] {
        let (_, closed) = until_closed(stream, FIRST_REQUEST * 10);
        let after = closed - started;
        assert!(
            after >= FIRST_REQUEST && after < FIRST_REQUEST + Duration::from_secs(3),
            "closed after {after:?}"
        );
    }
}

#[test]
fn a_slow_body_that_keeps_moving_is_read_and_a_stopped_one_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    // Not JSON: answered "Invalid JSON" only once the whole body was read.
    let body = [b'x'; 40];
    let mut slow = TcpStream::connect(server.local_addr()).unwrap();
    slow.write_all(enable_head(body.len()).as_bytes()).unwrap();
    let started = Instant::now();
    for piece in body.chunks(4) {
        std::thread::sleep(BODY_IDLE / 3);
        slow.write_all(piece).unwrap();
    }
    assert!(started.elapsed() > BODY_IDLE * 3, "not slow enough to tell");
    let (answer, _) = until_closed(slow, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("Invalid JSON"), "{answer}");

    let mut stopped = TcpStream::connect(server.local_addr()).unwrap();
    stopped
        .write_all(format!("{}xxxx", enable_head(body.len())).as_bytes())
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = until_closed(stopped, Duration::from_secs(10));
    assert!(answer.contains("The body stalled"), "{answer}");
    let after = closed - started;
    assert!(
        after >= BODY_IDLE && after < BODY_IDLE + Duration::from_secs(3),
        "cut after {after:?}"
    );
}
