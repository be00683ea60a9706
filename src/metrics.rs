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
mod tests;
