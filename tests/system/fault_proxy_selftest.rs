//! Self-tests of the fault-injecting TCP proxy used by the whole-system tests
//! (`testkit::fault_proxy`), against tiny in-process echo and sink servers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use testkit::fault_proxy::FaultProxy;

const WAIT: Duration = Duration::from_secs(2);

/// An echo server; returns its address and a counter of accepted connections.
fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().expect("echo addr");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A server that reads each connection to its end and reports how many bytes it got
/// (one message per connection, in the order the connections end).
fn sink_server() -> (SocketAddr, Receiver<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let addr = l.local_addr().expect("sink addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut total = 0u64;
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    total += u64::try_from(n).expect("usize fits u64");
                }
                let _ = tx.send(total);
            });
        }
    });
    (addr, rx)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to proxy");
    s.set_read_timeout(Some(WAIT)).expect("set_read_timeout");
    s.set_write_timeout(Some(WAIT)).expect("set_write_timeout");
    s
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).expect("fits u8"))
        .collect()
}

/// Sends `msg` and reads the echo back.
fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write through proxy");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("read echo through proxy");
    assert_eq!(back, msg, "echo differs");
}

/// Asserts that the stream has ended (EOF or an error other than a timeout) within
/// a couple of seconds.
fn assert_closed(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(WAIT)).expect("set_read_timeout");
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            // Bytes already in flight before the close are fine; keep reading.
            Ok(_) if Instant::now() < deadline => {}
            Ok(n) => panic!("{what}: connection still delivers data ({n} bytes)"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: connection still open after {WAIT:?}")
            }
            Err(_) => return,
        }
    }
}

/// Polls `cond` until it holds or a couple of seconds pass.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forwards_bytes_both_ways() {
    let (echo, accepted) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut s = connect(proxy.addr());
    let data = pattern(300 * 1024);
    let mut w = s.try_clone().expect("clone");
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent).expect("write 300 KiB"));
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).expect("read 300 KiB echo");
    writer.join().expect("writer thread");
    assert!(back == data, "echoed bytes differ");
    let len = u64::try_from(data.len()).expect("fits u64");
    eventually("byte counters", || {
        proxy.upstream_bytes() == len && proxy.downstream_bytes() == len
    });
    assert_eq!(proxy.connections(), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Half-close passes through: the echo server sees EOF and closes its side.
    s.shutdown(std::net::Shutdown::Write)
        .expect("shutdown write");
    assert_closed(&mut s, "after client half-close");
    eventually("connection removed", || proxy.open_connections() == 0);
}

#[test]
fn reset_all_closes_open_connections() {
    let (echo, _) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut a = connect(proxy.addr());
    let mut b = connect(proxy.addr());
    round_trip(&mut a, b"hello a");
    round_trip(&mut b, b"hello b");
    assert_eq!(proxy.open_connections(), 2);
    proxy.reset_all();
    assert_closed(&mut a, "a after reset_all");
    assert_closed(&mut b, "b after reset_all");
    assert_eq!(proxy.open_connections(), 0);

    // The proxy keeps serving new connections.
    let mut c = connect(proxy.addr());
    round_trip(&mut c, b"hello c");
    assert_eq!(proxy.connections(), 3);
}

#[test]
fn reset_after_upstream_bytes_cuts_exactly() {
    let (sink, got) = sink_server();
    let proxy = FaultProxy::start(sink);
    proxy.reset_after_upstream_bytes(1000);
    let mut s = connect(proxy.addr());
    // Several writes in one go; whatever the read sizes, exactly 1000 bytes pass.
    for _ in 0..5 {
        if s.write_all(&pattern(1000)).is_err() {
            break;
        }
    }
    assert_closed(&mut s, "client after the budget ran out");
    let n = got.recv_timeout(WAIT).expect("sink saw the connection end");
    assert_eq!(n, 1000, "upstream must see exactly the budget");
    assert_eq!(proxy.upstream_bytes(), 1000);

    // One-shot: the next connection is not cut.
    let mut s = connect(proxy.addr());
    s.write_all(&pattern(5000))
        .expect("write after the one-shot fired");
    s.shutdown(std::net::Shutdown::Write)
        .expect("shutdown write");
    let n = got
        .recv_timeout(WAIT)
        .expect("sink saw the second connection end");
    assert_eq!(n, 5000);
}

#[test]
fn reset_budget_counts_across_connections() {
    let (sink, got) = sink_server();
    let proxy = FaultProxy::start(sink);
    let mut a = connect(proxy.addr());
    a.write_all(&pattern(100)).expect("write before arming");
    eventually("100 bytes forwarded", || proxy.upstream_bytes() == 100);
    proxy.reset_after_upstream_bytes(1000);
    a.write_all(&pattern(600)).expect("write 600 on a");
    eventually("600 more bytes forwarded", || proxy.upstream_bytes() == 700);
    let mut b = connect(proxy.addr());
    let _ = b.write_all(&pattern(5000));
    assert_closed(&mut a, "a after the budget ran out");
    assert_closed(&mut b, "b after the budget ran out");
    let mut totals = [
        got.recv_timeout(WAIT).expect("first connection end"),
        got.recv_timeout(WAIT).expect("second connection end"),
    ];
    totals.sort_unstable();
    assert_eq!(
        totals,
        [400, 700],
        "a: 100 + 600 bytes, b: the remaining 400"
    );
    assert_eq!(proxy.upstream_bytes(), 1100);
}

#[test]
fn stall_holds_bytes_then_releases_them() {
    let (echo, accepted) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut s = connect(proxy.addr());
    round_trip(&mut s, b"before stall");
    // The proxy counts a chunk just after writing it: let the counters settle.
    eventually("counters settle", || {
        proxy.upstream_bytes() == 12 && proxy.downstream_bytes() == 12
    });
    let (up0, down0) = (proxy.upstream_bytes(), proxy.downstream_bytes());

    proxy.stall(true);
    let data = pattern(10 * 1024);
    s.write_all(&data).expect("write while stalled");
    // A new connection during the stall waits in the backlog. (Give an accept-loop
    // pass that began before the stall time to finish first.)
    thread::sleep(Duration::from_millis(50));
    let mut late = connect(proxy.addr());
    late.write_all(b"late").expect("write on late connection");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("set_read_timeout");
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("read while stalled must time out, got {other:?}"),
    }
    assert_eq!(
        proxy.upstream_bytes(),
        up0,
        "nothing forwarded while stalled"
    );
    assert_eq!(proxy.downstream_bytes(), down0);
    assert_eq!(proxy.connections(), 1, "no accept while stalled");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    proxy.stall(false);
    s.set_read_timeout(Some(WAIT)).expect("set_read_timeout");
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)
        .expect("held bytes arrive after the stall");
    assert!(back == data, "held bytes differ");
    let mut back = [0u8; 4];
    late.read_exact(&mut back)
        .expect("late connection served after the stall");
    assert_eq!(&back, b"late");
    assert_eq!(proxy.connections(), 2);
}

#[test]
fn refuse_closes_new_connections() {
    let (echo, accepted) = echo_server();
    let proxy = FaultProxy::start(echo);
    let mut open = connect(proxy.addr());
    round_trip(&mut open, b"open");

    proxy.refuse(true);
    let mut s = connect(proxy.addr());
    assert_closed(&mut s, "connection while refusing");
    assert_eq!(proxy.connections(), 2);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "upstream never contacted"
    );
    // Already open connections are not affected.
    round_trip(&mut open, b"still open");

    proxy.refuse(false);
    let mut s = connect(proxy.addr());
    round_trip(&mut s, b"back up");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[test]
fn drop_closes_connections_promptly() {
    let (echo, _) = echo_server();
    let proxy = FaultProxy::start(echo);
    let addr = proxy.addr();
    let mut s = connect(addr);
    round_trip(&mut s, b"hello");
    proxy.stall(true);
    s.write_all(b"held").expect("write while stalled");
    let t = Instant::now();
    drop(proxy);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        t.elapsed()
    );
    assert_closed(&mut s, "client after drop");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
        "listener still accepting after drop"
    );
}
