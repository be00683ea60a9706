//! Hostile and misbehaving clients of a replica server: idle TCP connections from a
//! chosen source address, and a real TLS client (`openssl s_client`, mutual TLS with a
//! lab certificate) that sends requests byte for byte, so a test can stall a body
//! half-way and watch what the server answers and when it closes.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `sockaddr_in` for `address`.
fn sockaddr(address: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*address.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An idle TCP connection from `source` (any 127.0.0.0/8 address works on loopback)
/// to `127.0.0.1:port`; it sends nothing.
pub fn idle_connection(source: Ipv4Addr, port: u16) -> TcpStream {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a socket this function owns; the stream closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).expect("fits");
    let local = sockaddr(SocketAddrV4::new(source, 0));
    // SAFETY: `local` is a valid sockaddr_in of `len` bytes, only read.
    let bound = unsafe { libc::bind(fd, std::ptr::addr_of!(local).cast(), len) };
    assert_eq!(
        bound,
        0,
        "bind {source}: {}",
        std::io::Error::last_os_error()
    );
    let remote = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    // SAFETY: `remote` is a valid sockaddr_in of `len` bytes, only read.
    let connected = unsafe { libc::connect(fd, std::ptr::addr_of!(remote).cast(), len) };
    assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
    stream
}

/// Whether the server closed (or reset) `stream`, without waiting.
pub fn closed_by_server(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

/// Runs `f` with this process's soft limit of open files set to `soft` (children
/// spawned meanwhile inherit it), then restores the limit. The limit is the whole
/// test process's: tests of other modules of the binary run meanwhile, so keep `f`
/// short (a daemon's start) and `soft` above what they hold open (a few dozen files;
/// the daemons they spawn raise their own limit).
pub fn with_open_files_limit<T>(soft: u64, f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid rlimit for the call to fill.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let lowered = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: `lowered` is a valid rlimit, only read.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
    let out = f();
    // SAFETY: `old` is the valid rlimit read above, only read.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    out
}

/// Where a mutual-TLS client's certificate, key and CA are.
#[derive(Debug, Clone, Copy)]
pub struct ClientCert<'a> {
    /// The client's certificate.
    pub cert: &'a Path,
    /// The client's private key.
    pub key: &'a Path,
    /// The CA the server's certificate is checked against.
    pub ca: &'a Path,
}

/// One `openssl s_client` connection: what is written goes to the server as is; what
/// the server sends is collected.
#[derive(Debug)]
pub struct TlsClient {
    child: Child,
    stdin: Option<ChildStdin>,
    received: Arc<Mutex<(Vec<u8>, bool)>>,
}

impl TlsClient {
    /// Connects to `127.0.0.1:port` with `cert`.
    pub fn connect(port: u16, cert: ClientCert<'_>) -> TlsClient {
        let mut child = Command::new(crate::require_tool("openssl"))
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert.cert)
            .arg("-key")
            .arg(cert.key)
            .arg("-CAfile")
            .arg(cert.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("stdout");
        let received = Arc::new(Mutex::new((Vec::new(), false)));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().expect("lock").0.extend_from_slice(&buf[..n]),
                }
            }
            sink.lock().expect("lock").1 = true;
        });
        TlsClient {
            child,
            stdin,
            received,
        }
    }

    /// Sends `bytes` (the handshake happens on the first).
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to s_client");
        stdin.flush().expect("flush");
    }

    /// The HTTP answer received so far (from its status line on), if any.
    pub fn answer(&self) -> Option<String> {
        let received = self.received.lock().expect("lock");
        let text = String::from_utf8_lossy(&received.0).into_owned();
        let at = text.find("HTTP/1.1 ")?;
        let answer = &text[at..];
        answer.contains("\r\n\r\n").then(|| answer.to_string())
    }

    /// Waits up to `limit` for an answer.
    pub fn answer_within(&self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if self.answer().is_some() {
                // The body follows the head at once.
                std::thread::sleep(Duration::from_millis(100));
                return self.answer();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server closed the connection (the client saw its end of stream).
    pub fn closed(&self) -> bool {
        self.received.lock().expect("lock").1
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
