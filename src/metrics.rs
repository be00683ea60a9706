//! A tiny Prometheus endpoint for the daemons: `GET /metrics` answers the text
//! exposition format (version 0.0.4), rendered afresh by the caller's function on every
//! scrape. With a page (a `page` given to [`serve`]), `GET /` answers it as HTML (the status
//! page of [`crate::dashboard`]), under a content security policy that runs no script.
//!
//! One thread accepts over a std `TcpListener` and gives each connection a thread of its
//! own, at most [`MAX_CONNECTIONS`] at once (more are closed as they arrive), so a
//! client that sends slowly or not at all delays no other scrape. A request may be at
//! most [`MAX_REQUEST`] bytes and must arrive within [`READ_TIMEOUT`]; anything else
//! gets an error status and the connection is closed; writing the answer and taking
//! what the client still sends are bounded by timeouts too, so every connection thread
//! ends within seconds. Nothing a client sends can panic a thread. Dropping the
//! [`MetricsServer`] stops accepting.
//!
//! [`MetricsText`] builds the text: each metric's `HELP` and `TYPE` once, its samples
//! grouped after them however the caller interleaves them, label values escaped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};

/// Longest request accepted (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a whole request may take to arrive, and the answer to be written.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client's leftover input is taken after the answer, at most.
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Headers of the text exposition format.
const METRICS_HEADERS: &str = "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n";
/// Headers of the HTML page: no script runs, styles only inline, no framing.
const PAGE_HEADERS: &str = "Content-Type: text/html; charset=utf-8\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n";

/// Renders the current metrics (or page).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoint answers.
struct Routes {
    metrics: Render,
    page: Option<Render>,
}

/// Errors starting the endpoint.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The address cannot be bound.
    #[error("Cannot listen for metrics on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The serving thread cannot start.
    #[error("Cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// A running metrics endpoint; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Serves `render()`'s text at `http://listen/metrics`, and with a `page` its HTML at
/// `http://listen/`, until the server is dropped.
pub fn serve(
    listen: SocketAddr,
    render: Render,
    page: Option<Render>,
) -> Result<MetricsServer, MetricsError> {
    let routes = Routes {
        metrics: render,
        page,
    };
    let routes_page = routes.page.is_some();
    let routes = Arc::new(routes);
    let listen_error = |source| MetricsError::Listen {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).map_err(listen_error)?;
    let local_addr = listener.local_addr().map_err(listen_error)?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(&listener, &stop, &routes))
            .map_err(MetricsError::Thread)?
    };
    info!(%local_addr, "Serving metrics at /metrics");
    if routes_page {
        info!(url = %format!("http://{local_addr}/"), "Serving the status page");
    }
    Ok(MetricsServer {
        local_addr,
        stop,
        thread: Some(thread),
    })
}

impl MetricsServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A connection of our own wakes the blocking accept, which then sees the flag.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let woken = TcpStream::connect_timeout(&wake, Duration::from_secs(2)).is_ok();
        if let Some(thread) = self.thread.take() {
            // Without the wake-up the thread may block in accept for good: leave it.
            if woken {
                let _ = thread.join();
            }
        }
    }
}

/// A place among the [`MAX_CONNECTIONS`] served at once, given back when dropped.
struct ConnectionPlace(Arc<AtomicUsize>);

impl ConnectionPlace {
    fn take(active: &Arc<AtomicUsize>) -> Option<Self> {
        active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionPlace(Arc::clone(active)))
    }
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, routes: &Arc<Routes>) {
    let active = Arc::new(AtomicUsize::new(0));
    let refusals = replica::limits::RefusalLog::new(Duration::from_secs(10));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match stream {
            Ok(stream) => {
                let Some(place) = ConnectionPlace::take(&active) else {
                    if let Some(refused) = refusals.note() {
                        warn!(
                            limit = MAX_CONNECTIONS,
                            refused,
                            "Closing new metrics connections: too many are open; this count since the last such line"
                        );
                    }
                    continue;
                };
                let routes = Arc::clone(routes);
                let spawned = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        let _place = place;
                        if let Err(error) = answer(stream, &routes) {
                            info!(%error, "Metrics request failed");
                        }
                    });
                if let Err(error) = spawned {
                    warn!(%error, "Cannot start a metrics connection thread");
                }
            }
            Err(error) => {
                warn!(%error, "Metrics accept failed");
                // Such as too many open files: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// How reading a request's head ended.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Up to its blank line.
    Complete(Vec<u8>),
    /// [`MAX_REQUEST`] bytes without the blank line.
    TooLarge,
    /// The client stopped sending before the blank line.
    Cut,
    /// [`READ_TIMEOUT`] passed.
    TimedOut,
}

fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::TimedOut);
        }
        stream.set_read_timeout(Some(left))?;
        let want = buf.len().min(MAX_REQUEST - head.len());
        let n = match stream.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Head::TimedOut)
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Head::Cut);
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Head::Complete(head));
        }
    }
    Ok(Head::TooLarge)
}

/// Status, headers and body for a complete request head.
fn route(head: &[u8], routes: &Routes) -> (&'static str, &'static str, String) {
    let request_line = head
        .split(|&b| b == b'\n')
        .next()
        .and_then(|line| std::str::from_utf8(line).ok())
        .unwrap_or("");
    let mut parts = request_line.split_ascii_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    const TEXT: &str = "Content-Type: text/plain; charset=utf-8\r\n";
    if !version.is_some_and(|v| v.starts_with("HTTP/")) {
        return ("400 Bad Request", TEXT, String::new());
    }
    let path = target.map(|t| t.split_once('?').map_or(t, |(path, _)| path));
    match (method, path, &routes.page) {
        (Some("GET"), Some("/metrics"), _) => ("200 OK", METRICS_HEADERS, (routes.metrics)()),
        (Some("GET"), Some("/"), Some(page)) => ("200 OK", PAGE_HEADERS, page()),
        (_, Some("/metrics"), _) | (_, Some("/"), Some(_)) => {
            ("405 Method Not Allowed", TEXT, String::new())
        }
        (_, _, Some(_)) => (
            "404 Not Found",
            TEXT,
            "Metrics are at /metrics, the status page at /\n".into(),
        ),
        (_, _, None) => ("404 Not Found", TEXT, "Metrics are at /metrics\n".into()),
    }
}

fn answer(mut stream: TcpStream, routes: &Routes) -> std::io::Result<()> {
    const TEXT: &str = "Content-Type: text/plain; charset=utf-8\r\n";
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let (status, headers, body) = match read_head(&mut stream)? {
        Head::Complete(head) => route(&head, routes),
        Head::TooLarge => ("431 Request Header Fields Too Large", TEXT, String::new()),
        Head::Cut => ("400 Bad Request", TEXT, String::new()),
        Head::TimedOut => ("408 Request Timeout", TEXT, String::new()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    let _ = stream.shutdown(Shutdown::Write);
    // Closing with unread input would reset the connection and could destroy the
    // answer before the client reads it: take what the client still sends, briefly.
    let deadline = Instant::now() + DRAIN_TIME;
    let mut buf = [0u8; 4096];
    let mut taken = 0;
    while taken < 1 << 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => taken += n,
        }
    }
    Ok(())
}

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
    Histogram,
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    samples: String,
}

/// Builds a page of the text exposition format. Metric and label names are the
/// caller's constants and must be valid Prometheus names; label values and help texts
/// may hold anything and are escaped.
#[derive(Debug, Default)]
pub struct MetricsText {
    families: Vec<Family>,
    index: HashMap<String, usize>,
}

impl MetricsText {
    /// An empty page.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sample of gauge `name`.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample(Kind::Gauge, name, help, labels, value);
    }

    /// A sample of counter `name` (by convention ending in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample(Kind::Counter, name, help, labels, value);
    }

    /// The samples of histogram `name`: `buckets` are `(upper bound, observations at
    /// or below it)`, cumulative and ascending; `count` and `sum` cover every
    /// observation, the `+Inf` bucket's count included.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) {
        let bucket_name = format!("{name}_bucket");
        let infinity = [(f64::INFINITY, count)];
        for (bound, observations) in buckets.iter().chain(&infinity) {
            let le = format_value(*bound);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample_of(
                Kind::Histogram,
                name,
                help,
                &bucket_name,
                &with_le,
                count_f64(*observations),
            );
        }
        self.sample_of(
            Kind::Histogram,
            name,
            help,
            &format!("{name}_sum"),
            labels,
            sum,
        );
        self.sample_of(
            Kind::Histogram,
            name,
            help,
            &format!("{name}_count"),
            labels,
            count_f64(count),
        );
    }

    /// The page: every metric's help and type, then its samples in the order given.
    pub fn finish(self) -> String {
        let mut out = String::new();
        for family in self.families {
            let kind = match family.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {} {kind}", family.name);
            out.push_str(&family.samples);
        }
        out
    }

    /// Adds a sample; a metric's first sample sets its help and kind.
    fn sample(&mut self, kind: Kind, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.sample_of(kind, name, help, name, labels, value);
    }

    /// Adds a sample named `sample` to the family `name` (they differ for a
    /// histogram's `_bucket`, `_sum` and `_count` series).
    fn sample_of(
        &mut self,
        kind: Kind,
        name: &str,
        help: &str,
        sample: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let at = match self.index.get(name) {
            Some(&at) => at,
            None => {
                self.families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    samples: String::new(),
                });
                self.index.insert(name.to_owned(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        let samples = &mut self.families[at].samples;
        samples.push_str(sample);
        if !labels.is_empty() {
            samples.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    samples.push(',');
                }
                let _ = write!(samples, "{label}=\"{}\"", escape_label(value));
            }
            samples.push('}');
        }
        let _ = writeln!(samples, " {}", format_value(value));
    }
}

/// A count as a sample value: exact up to 2^53, beyond which only low digits go.
#[allow(clippy::cast_precision_loss)]
pub fn count_f64(count: u64) -> f64 {
    count as f64
}

/// A group's policy for a full ring and, under `throttle`, what slowing writers cost.
pub fn ring_full_samples(
    text: &mut MetricsText,
    labels: &[(&str, &str)],
    status: &tracker::GroupStatus,
) {
    let bound = status.on_ring_full.max_delay();
    text.gauge(
        "blkrep_ring_full_throttle",
        "1 if writers are throttled when the ring is full, 0 if the group falls back to dirty maps",
        labels,
        f64::from(u8::from(bound.is_some())),
    );
    let Some(max_delay) = bound else {
        return;
    };
    let throttle = &status.throttle;
    text.gauge(
        "blkrep_throttle_bound_seconds",
        "The most a write may be delayed waiting for ring space",
        labels,
        max_delay.as_secs_f64(),
    );
    let (writes, expired) = (count_f64(throttle.writes), count_f64(throttle.expired));
    text.counter(
        "blkrep_throttled_writes_total",
        "Writes delayed to keep the log since start",
        labels,
        writes,
    );
    text.counter(
        "blkrep_throttle_delay_seconds_total",
        "Delay added to throttled writes since start",
        labels,
        throttle.total_delay.as_secs_f64(),
    );
    text.gauge(
        "blkrep_throttle_max_delay_seconds",
        "The longest delay added to one write since start",
        labels,
        throttle.max_delay.as_secs_f64(),
    );
    text.counter(
        "blkrep_throttle_expired_total",
        "Times the delay bound passed with the ring still full, so the group fell back to dirty maps",
        labels,
        expired,
    );
}

/// A label value as the format wants it: `\`, `"` and line feeds escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A help text as the format wants it: `\` and line feeds escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value: Go's float syntax for the special values.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
}
