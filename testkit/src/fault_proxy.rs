//! A fault-injecting TCP proxy for whole-system tests: it sits between a client (the
//! primary daemon's HTTPS shipper) and a server (the replica), forwards raw bytes
//! both ways (TLS stays end-to-end through it) and, on request, cuts, stalls or
//! refuses connections so tests can exercise reconnects, resumes and timeouts.
//!
//! Threads: one accept thread, plus two pump threads per connection (client→upstream
//! and upstream→client) copying through a 64 KiB buffer. Sockets carry 50 ms read and
//! write timeouts so every pump notices the stall, reset and stop flags promptly.
//! Dropping the [`FaultProxy`] closes every connection and joins every thread (with
//! a bounded wait).
//!
//! "Reset" here means `shutdown(Both)` on both sockets of a connection: each peer
//! sees its stream end (read returns 0, or an error on the next write), and nothing
//! more is forwarded on it.

use std::collections::HashMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Size of each pump's copy buffer.
const BUF_SIZE: usize = 64 * 1024;
/// Read/write timeout on proxied sockets: how often pumps look at the flags.
const IO_TICK: Duration = Duration::from_millis(50);
/// Sleep between polls of the nonblocking listener, and while stalled.
const POLL: Duration = Duration::from_millis(10);
/// How long to wait for the upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `Drop` waits for the threads before leaving the stragglers detached.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);

/// A running fault-injecting proxy. Clients connect to [`FaultProxy::addr`]; each
/// accepted connection gets its own connection to the upstream address.
///
/// Dropping it stops accepting, closes every open connection (both sides) and joins
/// its threads.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

/// State shared by the handle, the accept thread and the pumps.
struct Inner {
    stop: AtomicBool,
    stall: AtomicBool,
    refuse: AtomicBool,
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    accepted: AtomicU64,
    /// Remaining client→upstream bytes before a one-shot fault, if armed.
    budget: Mutex<Option<Budget>>,
    /// Open connections by id.
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Pump threads (finished ones are pruned as new connections come in).
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

/// One proxied connection: the accepted client socket and its upstream socket.
struct Conn {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
    /// Set once the connection has been reset; pumps drop whatever they hold.
    dead: AtomicBool,
    /// Pumps still running; the last one out removes the connection.
    live: AtomicU8,
}

/// A one-shot fault armed to fire after a number of client→upstream bytes.
#[derive(Debug, Clone, Copy)]
struct Budget {
    remaining: u64,
    then: Fault,
}

/// What an exhausted [`Budget`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every open connection is reset.
    Reset,
    /// The proxy stalls, as by [`FaultProxy::stall`].
    Stall,
}

/// Direction a pump copies in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client → upstream (counted in `upstream_bytes`, subject to the armed budget).
    Up,
    /// Upstream → client (counted in `downstream_bytes`).
    Down,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_timeout(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1:0` that forwards every accepted
    /// connection to `upstream`. Panics if the listener cannot be set up.
    ///
    /// Nothing is injected until one of the fault methods is called.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fault proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("fault proxy: local_addr");
        listener
            .set_nonblocking(true)
            .expect("fault proxy: set_nonblocking");
        let inner = Arc::new(Inner {
            stop: AtomicBool::new(false),
            stall: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            budget: Mutex::new(None),
            conns: Mutex::new(HashMap::new()),
            pumps: Mutex::new(Vec::new()),
        });
        let accept = {
            let inner = Arc::clone(&inner);
            thread::Builder::new()
                .name("fault-proxy-accept".into())
                .spawn(move || accept_loop(&inner, &listener, upstream))
                .expect("fault proxy: spawn accept thread")
        };
        FaultProxy {
            addr,
            upstream,
            inner,
            accept: Some(accept),
        }
    }

    /// The address clients should connect to (127.0.0.1 and an ephemeral port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Abruptly closes every open connection now: `shutdown(Both)` on both the
    /// client and the upstream socket, and any bytes held (e.g. while stalled) are
    /// dropped. New connections are accepted as usual afterwards.
    pub fn reset_all(&self) {
        self.inner.reset_all();
    }

    /// Arms a one-shot reset: once `n` more bytes have been forwarded client→upstream
    /// (counted across all connections from this call on), every open connection is
    /// reset as by [`FaultProxy::reset_all`]. The cut is exact: of the read that
    /// crosses the budget only the remaining budget is forwarded, so the upstream
    /// receives at most `n` bytes from now before the reset. `n == 0` resets now.
    /// A later call replaces a budget that has not fired yet.
    pub fn reset_after_upstream_bytes(&self, n: u64) {
        if n == 0 {
            *lock(&self.inner.budget) = None;
            self.inner.reset_all();
        } else {
            *lock(&self.inner.budget) = Some(Budget {
                remaining: n,
                then: Fault::Reset,
            });
        }
    }

    /// Arms a one-shot stall: once `n` more bytes have been forwarded
    /// client→upstream (counted across all connections from this call on), the proxy
    /// stalls as by [`FaultProxy::stall`]`(true)`. The stall lands exactly there
    /// whatever the peers' socket buffers hold: of the read that crosses the budget
    /// the rest is held until the stall is lifted. `n == 0` stalls now. A later call
    /// replaces a budget that has not fired yet.
    pub fn stall_after_upstream_bytes(&self, n: u64) {
        if n == 0 {
            *lock(&self.inner.budget) = None;
            self.stall(true);
        } else {
            *lock(&self.inner.budget) = Some(Budget {
                remaining: n,
                then: Fault::Stall,
            });
        }
    }

    /// While `on`, forwards nothing in either direction, like a black-holed link:
    /// pumps stop reading (so TCP backpressure builds up at the senders), bytes
    /// already read are held, connections stay open, and new connections wait in
    /// the listen backlog without being accepted (the upstream sees nothing; one
    /// connecting at the very moment of the call may still be accepted). When
    /// turned off, forwarding resumes with the held bytes and pending connections
    /// are accepted.
    pub fn stall(&self, on: bool) {
        self.inner.stall.store(on, Ordering::SeqCst);
    }

    /// Whether the proxy is stalled now (by [`FaultProxy::stall`] or an armed
    /// budget that fired).
    pub fn is_stalled(&self) -> bool {
        self.inner.stalled()
    }

    /// While `on`, new connections are accepted and immediately closed without
    /// contacting the upstream (the replica looks down). Open connections are not
    /// affected; combine with [`FaultProxy::reset_all`] to drop those too.
    pub fn refuse(&self, on: bool) {
        self.inner.refuse.store(on, Ordering::SeqCst);
    }

    /// Total bytes forwarded client→upstream so far (written to upstream sockets).
    pub fn upstream_bytes(&self) -> u64 {
        self.inner.up_bytes.load(Ordering::SeqCst)
    }

    /// Total bytes forwarded upstream→client so far (written to client sockets).
    pub fn downstream_bytes(&self) -> u64 {
        self.inner.down_bytes.load(Ordering::SeqCst)
    }

    /// Connections accepted so far, including ones closed at once because of
    /// [`FaultProxy::refuse`] or because the upstream could not be reached.
    pub fn connections(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open (accepted, upstream connected, not yet closed).
    pub fn open_connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("stalled", &self.inner.stall.load(Ordering::SeqCst))
            .field("refusing", &self.inner.refuse.load(Ordering::SeqCst))
            .field("budget", &*lock(&self.inner.budget))
            .field("connections", &self.connections())
            .field("open_connections", &self.open_connections())
            .field("upstream_bytes", &self.upstream_bytes())
            .field("downstream_bytes", &self.downstream_bytes())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.reset_all();
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut handles: Vec<JoinHandle<()>> = self.accept.take().into_iter().collect();
        // The accept thread polls `stop` every POLL; once it is gone no new pump
        // threads can appear, so collect the pumps after it.
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        handles.append(&mut lock(&self.inner.pumps));
        // A connection accepted just before `stop` may have been registered after
        // the reset above.
        self.inner.reset_all();
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        for h in handles {
            if h.is_finished() {
                let _ = h.join();
            }
            // Stragglers (none expected) are left detached rather than hanging the test.
        }
    }
}

impl Inner {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn stalled(&self) -> bool {
        self.stall.load(Ordering::SeqCst)
    }

    fn reset_all(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.conns).drain().map(|(_, c)| c).collect();
        for c in conns {
            c.kill();
        }
    }

    /// Takes up to `n` bytes from the armed budget: returns how many of them may be
    /// forwarded and the fault that must fire once they have been.
    fn take_budget(&self, n: usize) -> (usize, Option<Fault>) {
        let mut budget = lock(&self.budget);
        match *budget {
            None => (n, None),
            Some(Budget { remaining, then }) => {
                let n64 = u64::try_from(n).unwrap_or(u64::MAX);
                if n64 >= remaining {
                    *budget = None;
                    (usize::try_from(remaining).unwrap_or(n), Some(then))
                } else {
                    *budget = Some(Budget {
                        remaining: remaining - n64,
                        then,
                    });
                    (n, None)
                }
            }
        }
    }

    /// Called by each pump as it ends; the last one removes the connection (which
    /// closes both sockets once the pumps' references are gone).
    fn pump_done(&self, conn: &Conn) {
        if conn.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            lock(&self.conns).remove(&conn.id);
        }
    }
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: &TcpListener, upstream: SocketAddr) {
    let mut next_id: u64 = 0;
    while !inner.stopped() {
        if inner.stalled() {
            thread::sleep(POLL);
            continue;
        }
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if is_timeout(e.kind()) => {
                thread::sleep(POLL);
                continue;
            }
            Err(_) => {
                // e.g. EMFILE or ECONNABORTED: keep serving.
                thread::sleep(POLL);
                continue;
            }
        };
        inner.accepted.fetch_add(1, Ordering::SeqCst);
        if inner.refuse.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream_sock) = TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        if configure(&client).is_err() || configure(&upstream_sock).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream_sock.shutdown(Shutdown::Both);
            continue;
        }
        next_id += 1;
        let conn = Arc::new(Conn {
            id: next_id,
            client,
            upstream: upstream_sock,
            dead: AtomicBool::new(false),
            live: AtomicU8::new(2),
        });
        lock(&inner.conns).insert(conn.id, Arc::clone(&conn));

        let mut pumps = lock(&inner.pumps);
        pumps.retain(|h| !h.is_finished());
        for dir in [Dir::Up, Dir::Down] {
            let name = match dir {
                Dir::Up => format!("fault-proxy-up-{}", conn.id),
                Dir::Down => format!("fault-proxy-down-{}", conn.id),
            };
            let (pump_inner, pump_conn) = (Arc::clone(inner), Arc::clone(&conn));
            let spawned = thread::Builder::new().name(name).spawn(move || {
                pump(&pump_inner, &pump_conn, dir);
                pump_inner.pump_done(&pump_conn);
            });
            match spawned {
                Ok(h) => pumps.push(h),
                Err(_) => {
                    // Could not start a pump: drop the connection.
                    conn.kill();
                    inner.pump_done(&conn);
                }
            }
        }
    }
}

fn configure(s: &TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TICK))?;
    s.set_write_timeout(Some(IO_TICK))
}

/// Copies one direction of `conn` until EOF, error, reset or stop.
fn pump(inner: &Inner, conn: &Conn, dir: Dir) {
    let (mut src, dst, counter) = match dir {
        Dir::Up => (&conn.client, &conn.upstream, &inner.up_bytes),
        Dir::Down => (&conn.upstream, &conn.client, &inner.down_bytes),
    };
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        if conn.is_dead() || inner.stopped() {
            return;
        }
        if inner.stalled() {
            thread::sleep(POLL);
            continue;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => {
                // Orderly end of this direction: pass the half-close on.
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if is_timeout(e.kind()) => continue,
            Err(_) => {
                // Peer reset or similar: tear the whole connection down.
                conn.kill();
                return;
            }
        };
        let (len, fault) = if dir == Dir::Up {
            inner.take_budget(n)
        } else {
            (n, None)
        };
        let mut ok = forward(inner, conn, dst, &buf[..len], counter);
        match fault {
            Some(Fault::Reset) => {
                inner.reset_all();
                return;
            }
            Some(Fault::Stall) => {
                inner.stall.store(true, Ordering::SeqCst);
                // The rest of this read waits for the stall to be lifted.
                ok = ok && forward(inner, conn, dst, &buf[len..n], counter);
            }
            None => {}
        }
        if !ok {
            conn.kill();
            return;
        }
    }
}

/// Writes all of `data` to `dst`, holding it while stalled; gives up (false) if the
/// connection is reset, the proxy stops, or the write fails.
fn forward(
    inner: &Inner,
    conn: &Conn,
    mut dst: &TcpStream,
    mut data: &[u8],
    counter: &AtomicU64,
) -> bool {
    while !data.is_empty() {
        if conn.is_dead() || inner.stopped() {
            return false;
        }
        if inner.stalled() {
            thread::sleep(POLL);
            continue;
        }
        match dst.write(data) {
            Ok(0) => return false,
            Ok(k) => {
                counter.fetch_add(u64::try_from(k).unwrap_or(u64::MAX), Ordering::SeqCst);
                data = &data[k..];
            }
            Err(e) if is_timeout(e.kind()) => {}
            Err(_) => return false,
        }
    }
    true
}
