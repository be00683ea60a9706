//! The status page and the Grafana dashboard, against a real replicating pair: a
//! `blkrep primary` and a `blkrep replica` on loopback with mutual TLS, both serving
//! metrics and the page.
//!
//! The page is loaded by headless Chromium (Debian's `chromium`), whose DOM is
//! checked and whose screenshot is kept under `target/test-artifacts/`. Where
//! Chromium cannot run, the test says why and checks the HTML fetched over HTTP.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::daemon_log::METRICS;
use testkit::replica::{dc1, lab_certs, Replica, PRIMARY_HOST, REPLICA_HOST};
use testkit::*;

/// A replica server and a primary replicating group vm1 every second, both with
/// metrics on loopback; the initial copy of 24 MiB of random data is held to
/// 4 MiB/s so that it runs for seconds; failed attempts are retried within
/// seconds.
fn replicating_pair() -> (tempfile::TempDir, Replica, Primary) {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let replica = Replica::start(
        &certs,
        REPLICA_HOST,
        &dc1(),
        "reserve = \"0\"\nmetrics = \"127.0.0.1:0\"",
    );
    let mut spec = Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 24 * MIB).init(Init::Random(18))],
    )
    .interval("1s")
    .ring_size("64MiB")
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "bandwidth_limit = \"4MiB\"\nretry_scale = 0.01",
    )))]);
    spec.unix = true;
    let primary = Primary::prepare(spec);
    primary.enable_metrics();
    let mut primary = primary;
    primary.restart();
    (dir, replica, primary)
}

/// The body of `GET path` on `addr`, or a panic naming the status.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics address");
    stream.set_read_timeout(Some(SHORT)).expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "GET {path}: {head}");
    body.to_string()
}

/// The names of the samples in a Prometheus text page.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The number of points of the lag chart(s) in `html`: the coordinate pairs of
/// their lines and their lone dots.
fn lag_chart_points(html: &str) -> usize {
    html.split("<svg class=\"chart lag\"")
        .skip(1)
        .map(|chart| {
            let chart = chart.split("</svg>").next().unwrap_or("");
            let line_points: usize = chart
                .split(" points=\"")
                .skip(1)
                .map(|rest| {
                    rest.split('"')
                        .next()
                        .unwrap_or("")
                        .split_whitespace()
                        .count()
                })
                .sum();
            line_points + chart.matches("class=\"dot\"").count()
        })
        .max()
        .unwrap_or(0)
}

/// The sizes the cycle-size chart(s) of `html` draw that are not zero.
fn cycle_bars_above_zero(html: &str) -> usize {
    html.split("<svg class=\"chart cycle-sizes\"")
        .skip(1)
        .map(|chart| {
            let chart = chart.split("</svg>").next().unwrap_or("");
            chart
                .split("class=\"bar\"")
                .skip(1)
                .filter(|bar| !bar.contains("<title>0 B</title>"))
                .count()
        })
        .sum()
}

/// Waits until the page at `addr` has a lag chart of at least two points and a
/// cycle-size bar above zero.
fn wait_for_charts(addr: SocketAddr, what: &str) -> String {
    let deadline = Instant::now() + LONG;
    loop {
        let html = http_get(addr, "/");
        if lag_chart_points(&html) >= 2 && cycle_bars_above_zero(&html) > 0 {
            return html;
        }
        assert!(
            Instant::now() < deadline,
            "the {what} page has no lag chart of two points and cycle sizes after {LONG:?}:\n{html}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Where test artifacts go: `target/test-artifacts/`, beside the binary's profile
/// directory.
fn artifacts_dir() -> PathBuf {
    let target = bin()
        .parent()
        .and_then(Path::parent)
        .expect("the binary is under target/PROFILE");
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// The DOM of `url` as headless Chromium sees it, with a screenshot saved as
/// `screenshot`; or why Chromium cannot run here.
fn chromium_dom(url: &str, screenshot: &Path) -> Result<String, String> {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(|name| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
        .ok_or("no chromium on PATH (scripts/install-test-deps.sh installs it)")?;
    let profile = tempfile::tempdir().map_err(|e| format!("no profile directory: {e}"))?;
    let browser = |extra: &[String]| {
        let mut command = Command::new(&chromium);
        // As root Chromium refuses its sandbox; the page is our own, on loopback.
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url);
        run_with_timeout(&mut command, Duration::from_secs(60))
            .map_err(|output| format!("chromium timed out: {}", output.report()))
    };
    let dumped = browser(&["--dump-dom".to_string()])?;
    if !dumped.success() || !dumped.stdout.contains("<html") {
        return Err(format!("chromium --dump-dom failed: {}", dumped.report()));
    }
    let shot = browser(&[
        format!("--screenshot={}", screenshot.display()),
        "--window-size=1000,2200".to_string(),
    ])?;
    let size = std::fs::metadata(screenshot).map_or(0, |m| m.len());
    if !shot.success() || size == 0 {
        return Err(format!("chromium --screenshot failed: {}", shot.report()));
    }
    println!("screenshot kept: {} ({size} bytes)", screenshot.display());
    Ok(dumped.stdout)
}

/// The page as a browser shows it, or, where Chromium cannot run, as HTTP gives it.
fn page_dom(addr: SocketAddr, name: &str, fetched: String) -> String {
    let screenshot = artifacts_dir().join(format!("dashboard-{name}.png"));
    match chromium_dom(&format!("http://{addr}/"), &screenshot) {
        Ok(dom) => dom,
        Err(reason) => {
            println!(
                "NOT checked in a browser: {reason}; checking the HTML fetched over HTTP instead"
            );
            fetched
        }
    }
}

/// How the replica's page shows a replica with a consistent state: "Consistent", or
/// "Consistent at cycle N, applying" while it applies a cycle (one a second here).
const REPLICA_CONSISTENT: &str = "<span class=\"health health-normal\">Consistent";

#[test]
fn both_daemons_serve_a_status_page_a_headless_browser_shows_with_lag_charts() {
    let (_dir, replica, primary) = replicating_pair();
    let delivered = primary.wait_consumer("vm1", "cycles after the initial copy", LONG, |s| {
        s["state"] == "replicating" && s["cycles_delivered"].as_u64() >= Some(3)
    });
    assert_eq!(delivered["health"], "Normal", "{delivered:#}");

    let primary_addr = primary.reported_address(METRICS);
    // A cycle with data between two samples shows in the cycle sizes.
    let qemu_io = require_tool("qemu-io");
    run_ok(
        Command::new(qemu_io).args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 2M",
            &primary.uri("disk0"),
        ]),
        LONG,
    );
    let fetched = wait_for_charts(primary_addr, "primary");
    let dom = page_dom(primary_addr, "primary", fetched);
    for expected in [
        "<h1>blkrep primary</h1>",
        "<span class=\"name\">vm1</span>",
        "<span class=\"health health-normal\">Normal</span>",
        "<dd class=\"tracking\">logging</dd>",
        "<svg class=\"chart cycle-sizes\"",
        "<svg class=\"chart points\"",
    ] {
        assert!(
            dom.contains(expected),
            "{expected} not on the primary's page:\n{dom}"
        );
    }
    assert!(
        lag_chart_points(&dom) >= 2,
        "no lag chart of two points:\n{dom}"
    );
    assert!(cycle_bars_above_zero(&dom) > 0, "no cycle sizes:\n{dom}");

    let replica_addr = replica.reported_address(METRICS);
    let fetched = wait_for_charts(replica_addr, "replica");
    let dom = page_dom(replica_addr, "replica", fetched);
    for expected in [
        "<h1>blkrep replica server</h1>",
        "<span class=\"name\">vm1</span>",
        REPLICA_CONSISTENT,
        "<h4>Recovery points</h4>",
        "<td>latest</td>",
    ] {
        assert!(
            dom.contains(expected),
            "{expected} not on the replica's page:\n{dom}"
        );
    }
    assert!(
        lag_chart_points(&dom) >= 2,
        "no lag chart of two points:\n{dom}"
    );
    assert!(cycle_bars_above_zero(&dom) > 0, "no cycle sizes:\n{dom}");
}

/// Every `blkrep_...` name in `text`.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("blkrep_"))
        .map(str::to_string)
        .collect()
}

/// The PromQL of every panel target and template query in the dashboard.
fn queries(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target without expr");
            assert!(!expr.trim().is_empty(), "empty expr in {panel:#}");
            found.push(expr.to_string());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            found.push(query.to_string());
        }
    }
    found
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_exported_by_a_replicating_pair() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/blkrep.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64()),
            "duplicate panel id: {panel:#}"
        );
        if panel["type"] != "row" {
            assert!(
                panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{panel:#}"
            );
        }
    }
    let wanted: BTreeSet<String> = queries(&dashboard)
        .iter()
        .flat_map(|query| metric_names_in(query))
        .collect();
    assert!(wanted.len() >= 20, "few metrics queried: {wanted:?}");

    let (_dir, mut replica, primary) = replicating_pair();
    let primary_addr = primary.reported_address(METRICS);
    // The copy's progress is published between attempts: the replica stops in the
    // middle of the initial copy, so the attempt fails and the copy waits, shown.
    let deadline = Instant::now() + LONG;
    while !primary.log().contains("Resync copy starts") {
        assert!(
            Instant::now() < deadline,
            "no copy started:\n{}",
            primary.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    replica.kill();
    let mut primary_names = BTreeSet::new();
    let deadline = Instant::now() + LONG;
    while !primary_names.contains("blkrep_replication_copy_done_bytes") {
        assert!(
            Instant::now() < deadline,
            "no copy progress exported while the initial copy waits: {primary_names:?}"
        );
        primary_names.extend(sample_names(&http_get(primary_addr, "/metrics")));
        std::thread::sleep(Duration::from_millis(200));
    }
    // The status page shows the waiting copy's progress too.
    let page = http_get(primary_addr, "/");
    assert!(
        page.contains("<p class=\"copy\">Initial replication (") && page.contains("of 24.0 MiB ("),
        "no copy progress on the page:\n{page}"
    );
    replica.spawn();
    let replica_addr = replica.reported_address(METRICS);
    primary.wait_consumer("vm1", "cycles after the initial copy", LONG, |s| {
        s["state"] == "replicating" && s["cycles_delivered"].as_u64() >= Some(3)
    });
    primary_names.extend(sample_names(&http_get(primary_addr, "/metrics")));
    let replica_names = sample_names(&http_get(replica_addr, "/metrics"));

    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| !primary_names.contains(*name) && !replica_names.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics neither daemon exports: {missing:?}\nprimary: {primary_names:?}\nreplica: {replica_names:?}"
    );
    // Both daemons' metrics are on it.
    assert!(
        wanted.iter().any(|name| replica_names.contains(name)),
        "{wanted:?}"
    );
    assert!(
        wanted.iter().any(|name| primary_names.contains(name)),
        "{wanted:?}"
    );
}
