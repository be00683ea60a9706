//! Applying committed transfers to replica disks, for every tenant at once.
//!
//! Contract:
//! - [`Applier::request`] asks for every committed transfer of the replica in a
//!   directory to be applied; asking again while it is pending or being applied is
//!   remembered, never lost, and never applies one replica on two threads at once.
//! - A few workers share the pending replicas, earliest due first, so one tenant's
//!   slow or failing apply never holds up another's.
//! - A replica whose apply fails is retried after a backoff of its own (1 s,
//!   doubling up to a minute); the others are not delayed. A replica that no longer
//!   exists (removed) is dropped from the schedule.
//! - [`Applier::stop`] lets the applies in progress finish, then joins the workers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use wire::error_chain;

use crate::store::StoreError;

/// Threads applying transfers: enough that a stuck or failing replica never holds
/// up the others, few enough not to compete with receiving.
const WORKERS: usize = 2;
/// First pause before a failed replica is tried again.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between two tries of a failing replica.
const LAST_RETRY: Duration = Duration::from_secs(60);

/// How a replica's apply went.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Everything committed is applied.
    Done,
    /// The replica is gone (removed, or its directory no longer holds one).
    Gone,
    /// It failed; try again later.
    Failed(StoreError),
}

/// Applies the transfers of one replica directory until none is left.
pub(super) type ApplyAll = dyn Fn(&Path) -> Outcome + Send + Sync;

/// One replica in the schedule.
#[derive(Debug)]
struct Entry {
    /// Not before this instant (a backoff after failures).
    due: Instant,
    /// Failures in a row.
    failures: u32,
    /// Being applied by a worker now.
    running: bool,
    /// Asked for again while running: apply again once it ends.
    again: bool,
}

#[derive(Debug, Default)]
struct Schedule {
    entries: HashMap<PathBuf, Entry>,
    stopping: bool,
}

impl Schedule {
    /// The pending replica due first, and when it is due.
    fn next(&self) -> Option<(&PathBuf, Instant)> {
        self.entries
            .iter()
            .filter(|(_, entry)| !entry.running)
            .map(|(dir, entry)| (dir, entry.due))
            .min_by_key(|(_, due)| *due)
    }
}

struct Shared {
    schedule: Mutex<Schedule>,
    changed: Condvar,
}

impl Shared {
    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The workers applying committed transfers.
pub(super) struct Applier {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Asks an [`Applier`] for applies; cheap to clone.
#[derive(Clone)]
pub(super) struct ApplyRequests {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ApplyRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyRequests").finish_non_exhaustive()
    }
}

impl ApplyRequests {
    /// A schedule no worker serves yet (see [`Applier::start`]).
    pub(super) fn new() -> ApplyRequests {
        ApplyRequests {
            shared: Arc::new(Shared {
                schedule: Mutex::new(Schedule::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// Asks for every committed transfer of the replica in `dir` to be applied. A
    /// replica backing off after failures keeps its backoff.
    pub(super) fn request(&self, dir: &Path) {
        let mut schedule = self.shared.schedule();
        match schedule.entries.get_mut(dir) {
            Some(entry) if entry.running => entry.again = true,
            Some(_) => {}
            None => {
                schedule.entries.insert(
                    dir.to_path_buf(),
                    Entry {
                        due: Instant::now(),
                        failures: 0,
                        running: false,
                        again: false,
                    },
                );
            }
        }
        drop(schedule);
        self.shared.changed.notify_one();
    }

    /// Whether the replica in `dir` has applies pending or running.
    #[cfg(test)]
    fn is_pending(&self, dir: &Path) -> bool {
        self.shared.schedule().entries.contains_key(dir)
    }
}

impl Applier {
    /// Starts the workers serving `requests`; each apply runs `apply_all`.
    pub(super) fn start(
        requests: &ApplyRequests,
        apply_all: Arc<ApplyAll>,
    ) -> std::io::Result<Applier> {
        let shared = &requests.shared;
        let mut applier = Applier {
            shared: Arc::clone(shared),
            workers: Vec::new(),
        };
        for index in 0..WORKERS {
            let (shared, apply_all) = (Arc::clone(shared), Arc::clone(&apply_all));
            let worker = std::thread::Builder::new()
                .name(format!("replica-apply-{index}"))
                .spawn(move || {
                    // The undo writer and the transfer read-ahead inherit it.
                    base::priority::enter_background();
                    work(&shared, &*apply_all)
                });
            match worker {
                Ok(worker) => applier.workers.push(worker),
                Err(error) => {
                    applier.stop();
                    return Err(error);
                }
            }
        }
        Ok(applier)
    }

    /// Lets the applies in progress end, then stops the workers.
    pub(super) fn stop(&mut self) {
        self.shared.schedule().stopping = true;
        self.shared.changed.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pause after `failures` failures in a row.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(LAST_RETRY)
}

fn work(shared: &Shared, apply_all: &ApplyAll) {
    loop {
        let dir = {
            let mut schedule = shared.schedule();
            loop {
                if schedule.stopping {
                    return;
                }
                let now = Instant::now();
                match schedule.next().map(|(dir, due)| (dir.clone(), due)) {
                    Some((dir, due)) if due <= now => {
                        if let Some(entry) = schedule.entries.get_mut(&dir) {
                            entry.running = true;
                            entry.again = false;
                        }
                        break dir;
                    }
                    Some((_, due)) => {
                        schedule = shared
                            .changed
                            .wait_timeout(schedule, due - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    None => {
                        schedule = shared
                            .changed
                            .wait(schedule)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        };
        let outcome = apply_all(&dir);
        let mut schedule = shared.schedule();
        let Some(entry) = schedule.entries.get_mut(&dir) else {
            continue;
        };
        entry.running = false;
        match outcome {
            Outcome::Done if entry.again => {
                entry.due = Instant::now();
                entry.failures = 0;
            }
            Outcome::Done => {
                schedule.entries.remove(&dir);
            }
            Outcome::Gone => {
                info!(replica = %dir.display(), "The replica is gone; its pending applies are dropped");
                schedule.entries.remove(&dir);
            }
            Outcome::Failed(error) => {
                entry.failures = entry.failures.saturating_add(1);
                let pause = backoff(entry.failures);
                entry.due = Instant::now() + pause;
                warn!(replica = %dir.display(), error = %error_chain(&error), failures = entry.failures, retry_in_ms = pause.as_millis(), "Applying a received transfer failed; retrying later");
            }
        }
        drop(schedule);
        // Another worker may wait for this entry to be free.
        shared.changed.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn a_failing_replica_backs_off_alone_and_others_apply_at_once() {
        let failing_tries = Arc::new(AtomicU32::new(0));
        let healthy_applies = Arc::new(AtomicU32::new(0));
        let (tries, applies) = (Arc::clone(&failing_tries), Arc::clone(&healthy_applies));
        let apply_all: Arc<ApplyAll> = Arc::new(move |dir: &Path| {
            if dir.starts_with("/failing") {
                tries.fetch_add(1, Ordering::SeqCst);
                Outcome::Failed(StoreError::Busy("disk is broken".into()))
            } else {
                applies.fetch_add(1, Ordering::SeqCst);
                Outcome::Done
            }
        });
        let requests = ApplyRequests::new();
        let mut applier = Applier::start(&requests, apply_all).unwrap();
        for index in 0..3 {
            requests.request(Path::new(&format!("/failing/{index}")));
        }
        wait_for("three failures", || {
            failing_tries.load(Ordering::SeqCst) >= 3
        });
        let started = Instant::now();
        requests.request(Path::new("/healthy"));
        wait_for("the healthy apply", || {
            healthy_applies.load(Ordering::SeqCst) == 1
        });
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a healthy replica waited {:?} behind failing ones",
            started.elapsed()
        );
        assert!(!requests.is_pending(Path::new("/healthy")));
        // Failing replicas stay scheduled, each backing off: within a second after
        // the first failures none was tried more than twice.
        std::thread::sleep(Duration::from_millis(900));
        assert!(failing_tries.load(Ordering::SeqCst) <= 6);
        assert!(requests.is_pending(Path::new("/failing/0")));
        applier.stop();
    }

    #[test]
    fn a_gone_replica_is_dropped_and_a_request_while_running_applies_again() {
        let calls = Arc::new(AtomicU32::new(0));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (counted, gate) = (Arc::clone(&calls), Arc::clone(&release));
        let apply_all: Arc<ApplyAll> = Arc::new(move |dir: &Path| {
            if dir.starts_with("/gone") {
                return Outcome::Gone;
            }
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                let (open, opened) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = opened.wait(open).unwrap();
                }
            }
            Outcome::Done
        });
        let requests = ApplyRequests::new();
        let mut applier = Applier::start(&requests, apply_all).unwrap();
        requests.request(Path::new("/gone"));
        wait_for("the gone replica to be dropped", || {
            !requests.is_pending(Path::new("/gone"))
        });
        requests.request(Path::new("/busy"));
        wait_for("the first apply", || calls.load(Ordering::SeqCst) == 1);
        requests.request(Path::new("/busy"));
        {
            let (open, opened) = &*release;
            *open.lock().unwrap() = true;
            opened.notify_all();
        }
        wait_for("the second apply", || calls.load(Ordering::SeqCst) == 2);
        wait_for("an empty schedule", || {
            !requests.is_pending(Path::new("/busy"))
        });
        applier.stop();
    }
}
