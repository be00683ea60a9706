//! The status page both daemons serve at `/` on their metrics address: plain HTML
//! with inline SVG charts, no script, refreshed by the browser every
//! [`REFRESH_SECS`].
//!
//! A sampler thread looks at the daemon's status every [`SAMPLE_INTERVAL`] and keeps
//! the last hour of it ([`history`]: at most [`SAMPLES`] samples per group or
//! replica). The page ([`render`]) shows the status of the moment with that history.
//!
//! Contract: every string that comes from configuration or from peers (group and
//! replica names, reasons, errors) is escaped with [`escape`] before it reaches the
//! page, which is also served with a content security policy that allows no script.
//! Dropping the [`Dashboard`] stops its sampler.

pub mod history;
pub mod render;
pub mod svg;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base::sync::lock;
use thiserror::Error;
use wire::api::ReplicaInfo;

use crate::status::GroupReport;
use history::{Delivery, History, Observation, Sample, Totals};

/// How often the sampler looks.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept per series: one hour at [`SAMPLE_INTERVAL`].
pub const SAMPLES: usize = 720;
/// How often the browser reloads the page.
pub const REFRESH_SECS: u32 = 10;

/// Errors starting the dashboard.
#[derive(Debug, Error)]
pub enum DashboardError {
    /// The sampler thread cannot start.
    #[error("Cannot start the dashboard sampler thread")]
    Thread(#[source] std::io::Error),
}

/// Which daemon serves the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    /// `blkrep primary`.
    Primary,
    /// `blkrep replica run`.
    Replica,
}

/// What a daemon reports at one moment.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Its groups (a replica daemon's live groups).
    pub groups: Vec<GroupReport>,
    /// Its replicas (the replica daemon only).
    pub replicas: Vec<ReplicaInfo>,
}

/// Gathers the daemon's figures of the moment.
pub type Source = Arc<dyn Fn() -> Figures + Send + Sync>;

struct Shared {
    kind: DaemonKind,
    source: Source,
    history: Mutex<History>,
}

/// The sampler and the page; the sampler stops when this is dropped.
pub struct Dashboard {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("kind", &self.shared.kind)
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// Starts sampling `source` now and every [`SAMPLE_INTERVAL`].
    pub fn start(kind: DaemonKind, source: Source) -> Result<Dashboard, DashboardError> {
        let shared = Arc::new(Shared {
            kind,
            source,
            history: Mutex::new(History::new(SAMPLES)),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let sampling = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("dashboard".into())
            .spawn(move || loop {
                sampling.sample();
                match stopped.recv_timeout(SAMPLE_INTERVAL) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })
            .map_err(DashboardError::Thread)?;
        Ok(Dashboard {
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The page of the moment.
    pub fn page(&self) -> String {
        let figures = (self.shared.source)();
        let history = lock(&self.shared.history).clone();
        render::page(
            self.shared.kind,
            base::time::unix_millis(),
            &figures,
            &history,
        )
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn sample(&self) {
        let figures = (self.source)();
        let now_ms = base::time::unix_millis();
        lock(&self.history).record(now_ms, observe(&figures, now_ms));
    }
}

/// The history key of a group.
pub fn group_key(name: &str) -> String {
    format!("group/{name}")
}

/// The history key of a replica.
pub fn replica_key(trust_group: &str, name: &str) -> String {
    format!("replica/{trust_group}/{name}")
}

/// What the history keeps of `figures` seen at `now_ms`.
pub fn observe(figures: &Figures, now_ms: u64) -> Vec<Observation> {
    let groups = figures.groups.iter().map(|group| {
        let consumer = group.consumer.as_ref();
        Observation {
            key: group_key(&group.name),
            sample: Sample {
                at_ms: now_ms,
                lag_ms: consumer.and_then(|c| c.lag_ms),
                totals: consumer.map(|c| Totals {
                    cycles: c.cycles_delivered,
                    bytes: c.bytes_delivered,
                }),
            },
            delivery: consumer.and_then(|c| {
                Some(Delivery {
                    cycle: c.last_delivered?,
                    at_ms: c.last_success_unix?.saturating_mul(1000),
                    closed_ms: c.last_delivered_close_unix_ms,
                    duration_ms: c.last_duration_ms,
                })
            }),
        }
    });
    let replicas = figures.replicas.iter().map(|info| {
        let latest = info.recovery_points.iter().find(|point| point.latest);
        Observation {
            key: replica_key(&info.trust_group, &info.name),
            sample: Sample {
                at_ms: now_ms,
                lag_ms: latest.map(|point| now_ms.saturating_sub(point.time_unix_ms)),
                totals: Some(Totals {
                    cycles: info.applied_transfers,
                    bytes: info.applied_bytes,
                }),
            },
            delivery: info.last_applied_cycle.map(|cycle| Delivery {
                cycle,
                at_ms: info
                    .last_applied_unix
                    .map_or(now_ms, |at| at.saturating_mul(1000)),
                closed_ms: latest
                    .filter(|point| point.cycle == cycle)
                    .map(|point| point.time_unix_ms),
                duration_ms: info.last_apply_micros.map(|micros| micros / 1000),
            }),
        }
    });
    groups.chain(replicas).collect()
}

/// `text` made safe inside HTML text and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_character_that_could_open_markup() {
        assert_eq!(
            escape("vm1\"><script>alert('x')</script>&amp;"),
            "vm1&quot;&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;amp;"
        );
        assert_eq!(escape("plain vm-1_ä"), "plain vm-1_ä");
    }

    #[test]
    fn the_sampler_records_at_start_and_stops_when_dropped() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = Arc::clone(&calls);
        let source: Source = Arc::new(move || {
            counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Figures::default()
        });
        let dashboard = Dashboard::start(DaemonKind::Primary, source).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no sample taken");
            std::thread::sleep(Duration::from_millis(10));
        }
        let page = dashboard.page();
        assert!(page.contains("No groups"), "{page}");
        let started = std::time::Instant::now();
        drop(dashboard);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the sampler did not stop"
        );
    }
}
