//! Tests of the metrics endpoint: the exposition (figures, labels, escaping) and the server (routes, the status page, slow clients).
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn the_throttle_figures_appear_only_under_throttle() {
    let mut status = tracker::GroupStatus {
        mode: tracker::TrackingMode::Logging,
        resync: None,
        open_cycle: 1,
        last_closed: 0,
        last_acked: 0,
        ring_size: 4 << 20,
        ring_used: 0,
        records_logged: 0,
        on_ring_full: tracker::OnRingFull::Bitmap,
        throttle: tracker::ThrottleStats::default(),
        disks: Vec::new(),
        writes_refused: false,
    };
    let labels = [("group", "vm1")];
    let mut text = MetricsText::new();
    ring_full_samples(&mut text, &labels, &status);
    let page = text.finish();
    assert!(
        page.contains("blkrep_ring_full_throttle{group=\"vm1\"} 0\n"),
        "{page}"
    );
    assert!(!page.contains("blkrep_throttled_writes_total"), "{page}");
    status.on_ring_full = tracker::OnRingFull::Throttle {
        max_delay: Duration::from_secs(2),
    };
    status.throttle = tracker::ThrottleStats {
        writes: 7,
        total_delay: Duration::from_millis(1500),
        max_delay: Duration::from_millis(600),
        expired: 1,
    };
    let mut text = MetricsText::new();
    ring_full_samples(&mut text, &labels, &status);
    let page = text.finish();
    for line in [
        "blkrep_ring_full_throttle{group=\"vm1\"} 1",
        "blkrep_throttle_bound_seconds{group=\"vm1\"} 2",
        "blkrep_throttled_writes_total{group=\"vm1\"} 7",
        "blkrep_throttle_delay_seconds_total{group=\"vm1\"} 1.5",
        "blkrep_throttle_max_delay_seconds{group=\"vm1\"} 0.6",
        "blkrep_throttle_expired_total{group=\"vm1\"} 1",
    ] {
        assert!(
            page.lines().any(|l| l == line),
            "missing {line:?} in\n{page}"
        );
    }
}

#[test]
fn groups_samples_under_one_help_and_type() {
    let mut text = MetricsText::new();
    for (name, value) in [("vm1", 1.0), ("vm2", 0.0)] {
        text.gauge(
            "blkrep_x_consistent",
            "Whether it is consistent.",
            &[("replica", name), ("trust_group", "dc1")],
            value,
        );
        text.counter(
            "blkrep_x_bytes_total",
            "Bytes.",
            &[("replica", name)],
            4096.0,
        );
    }
    text.gauge("blkrep_x_up", "Up.", &[], 1.0);
    assert_eq!(
        text.finish(),
        "# HELP blkrep_x_consistent Whether it is consistent.\n\
         # TYPE blkrep_x_consistent gauge\n\
         blkrep_x_consistent{replica=\"vm1\",trust_group=\"dc1\"} 1\n\
         blkrep_x_consistent{replica=\"vm2\",trust_group=\"dc1\"} 0\n\
         # HELP blkrep_x_bytes_total Bytes.\n\
         # TYPE blkrep_x_bytes_total counter\n\
         blkrep_x_bytes_total{replica=\"vm1\"} 4096\n\
         blkrep_x_bytes_total{replica=\"vm2\"} 4096\n\
         # HELP blkrep_x_up Up.\n\
         # TYPE blkrep_x_up gauge\n\
         blkrep_x_up 1\n"
    );
}

#[test]
fn histograms_have_cumulative_buckets_an_infinite_one_a_sum_and_a_count() {
    let mut text = MetricsText::new();
    text.histogram(
        "blkrep_x_seconds",
        "Seconds.",
        &[("group", "vm1")],
        &[(0.5, 1), (1.0, 3)],
        4,
        7.25,
    );
    assert_eq!(
        text.finish(),
        "# HELP blkrep_x_seconds Seconds.\n\
         # TYPE blkrep_x_seconds histogram\n\
         blkrep_x_seconds_bucket{group=\"vm1\",le=\"0.5\"} 1\n\
         blkrep_x_seconds_bucket{group=\"vm1\",le=\"1\"} 3\n\
         blkrep_x_seconds_bucket{group=\"vm1\",le=\"+Inf\"} 4\n\
         blkrep_x_seconds_sum{group=\"vm1\"} 7.25\n\
         blkrep_x_seconds_count{group=\"vm1\"} 4\n"
    );
}

#[test]
fn escapes_label_values_help_and_special_values() {
    let mut text = MetricsText::new();
    text.gauge(
        "m",
        "Line one\nback\\slash",
        &[("l", "a\"b\\c\nd")],
        f64::INFINITY,
    );
    text.gauge("m", "ignored", &[("l", "x")], f64::NAN);
    text.gauge("m", "ignored", &[("l", "y")], f64::NEG_INFINITY);
    text.gauge("m", "ignored", &[("l", "z")], 1_700_000_000.5);
    assert_eq!(
        text.finish(),
        "# HELP m Line one\\nback\\\\slash\n\
         # TYPE m gauge\n\
         m{l=\"a\\\"b\\\\c\\nd\"} +Inf\n\
         m{l=\"x\"} NaN\n\
         m{l=\"y\"} -Inf\n\
         m{l=\"z\"} 1700000000.5\n"
    );
}

fn request(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(raw).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn serves_over_tcp_and_refuses_the_rest() {
    let render: Render = Arc::new(|| {
        let mut text = MetricsText::new();
        text.gauge("blkrep_test_up", "Up.", &[], 1.0);
        text.finish()
    });
    let server = serve("127.0.0.1:0".parse().unwrap(), render, None).unwrap();
    let addr = server.local_addr();

    let ok = request(
        addr,
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{ok}"
    );
    let body = "# HELP blkrep_test_up Up.\n# TYPE blkrep_test_up gauge\nblkrep_test_up 1\n";
    assert!(
        ok.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{ok}"
    );
    assert!(ok.ends_with(&format!("\r\n\r\n{body}")), "{ok}");

    let other = request(addr, b"GET / HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    let post = request(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    let garbage = request(addr, b"\xff\xfe\x00\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let garbage = request(addr, b"GET\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let cut = request(addr, b"GET /metr");
    assert!(cut.starts_with("HTTP/1.1 400 "), "{cut}");
    let huge = request(addr, &vec![b'A'; 3 * MAX_REQUEST]);
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
    // Still serving after all that.
    assert!(request(addr, b"GET /metrics HTTP/1.0\r\n\r\n").contains(body));

    drop(server);
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}

#[test]
fn serves_the_page_at_the_root_as_html_that_may_run_no_script() {
    let render: Render = Arc::new(|| "blkrep_test_up 1\n".into());
    let page: Render = Arc::new(|| "<!DOCTYPE html><p>status</p>".into());
    let server = serve("127.0.0.1:0".parse().unwrap(), render, Some(page)).unwrap();
    let addr = server.local_addr();
    let html = request(addr, b"GET /?refresh=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(html.starts_with("HTTP/1.1 200 OK\r\n"), "{html}");
    assert!(
        html.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{html}"
    );
    assert!(
        html.contains(
            "\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline';"
        ),
        "{html}"
    );
    assert!(
        html.ends_with("\r\n\r\n<!DOCTYPE html><p>status</p>"),
        "{html}"
    );
    let metrics = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(metrics.ends_with("\r\n\r\nblkrep_test_up 1\n"), "{metrics}");
    let post = request(addr, b"POST / HTTP/1.1\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    let other = request(addr, b"GET /index.html HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    assert!(other.contains("the status page at /"), "{other}");
}

#[test]
fn a_silent_client_delays_no_scrape_and_is_closed_after_the_timeout() {
    let render: Render = Arc::new(|| "blkrep_test_up 1\n".into());
    let server = serve("127.0.0.1:0".parse().unwrap(), render, None).unwrap();
    let addr = server.local_addr();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /metr").unwrap();
    // Both are accepted before the scrape.
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let scrape = request(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(scrape.contains("blkrep_test_up 1"), "{scrape}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the scrape waited {:?} behind silent clients",
        started.elapsed()
    );

    for stream in [&mut silent, &mut half] {
        stream
            .set_read_timeout(Some(READ_TIMEOUT + Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= READ_TIMEOUT - Duration::from_millis(500)
            && waited < READ_TIMEOUT + Duration::from_secs(3),
        "closed after {waited:?}"
    );
}
