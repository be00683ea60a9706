//! Making the log and the images durable together.
//!
//! FLUSH and FUA need both the ring file and the image on stable storage. The two
//! `fdatasync`s are submitted to one io_uring and run in parallel, so a flush costs
//! one device round trip instead of two. FSYNC operations carry no buffers, so the
//! in-flight table is just the count of submitted operations, all reaped before
//! [`Durability::datasync`] returns (and by `Drop` of the ring if a wait fails).
//!
//! Concurrent flushes share syncs ([`GroupCommit`]): a flush that arrives while a
//! sync is running cannot count on it (the sync may have passed its writes already),
//! so it waits for the next one, which starts when the running one ends and covers
//! every flush that arrived meanwhile. A flush therefore costs at most two sync
//! round trips however many are in flight, and N concurrent flushes cost about one.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use io_uring::{opcode, types, IoUring};
use tracing::warn;

/// Entries in the submission queue; more fds than this are synced in batches.
const QUEUE_DEPTH: u32 = 8;

/// Parallel `fdatasync` of several files.
pub struct Durability {
    ring: Mutex<IoUring>,
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability").finish_non_exhaustive()
    }
}

impl Durability {
    /// Sets up the ring.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            ring: Mutex::new(IoUring::new(QUEUE_DEPTH)?),
        })
    }

    /// `fdatasync`s every fd; returns the first error after all have completed.
    pub fn datasync(&self, fds: &[RawFd]) -> io::Result<()> {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let mut first_error = None;
        for batch in fds.chunks(QUEUE_DEPTH as usize) {
            let mut submitted = 0usize;
            {
                let mut queue = ring.submission();
                for (index, fd) in batch.iter().enumerate() {
                    let entry = opcode::Fsync::new(types::Fd(*fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(index as u64);
                    // SAFETY: an FSYNC entry references no memory, only the fd, which the
                    // caller keeps open until this function returns (it waits for every
                    // completion below).
                    if unsafe { queue.push(&entry) }.is_err() {
                        break;
                    }
                    submitted += 1;
                }
            }
            let mut reaped = 0usize;
            while reaped < submitted {
                match ring.submit_and_wait(submitted - reaped) {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        // The ring cannot be trusted: sync the whole batch with plain
                        // syscalls, and replace the ring so completions still owed by
                        // the old one can never be counted for a later call.
                        warn!(%error, "io_uring fsync failed; syncing synchronously");
                        for fd in batch {
                            if let Err(error) = nix::unistd::fdatasync(*fd) {
                                first_error.get_or_insert(error.into());
                            }
                        }
                        if let Ok(fresh) = IoUring::new(QUEUE_DEPTH) {
                            *ring = fresh;
                        }
                        submitted = batch.len();
                        break;
                    }
                }
                for completion in ring.completion() {
                    reaped += 1;
                    if completion.result() < 0 {
                        first_error
                            .get_or_insert(io::Error::from_raw_os_error(-completion.result()));
                    }
                }
            }
            // Anything not run through the ring (queue full, or the ring failed) is synced
            // synchronously, so durability never depends on io_uring working.
            for fd in &batch[submitted..] {
                if let Err(error) = nix::unistd::fdatasync(*fd) {
                    first_error.get_or_insert(error.into());
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Joins concurrent requests for a sync into shared syncs (group commit).
///
/// Callers name an item to sync (a disk); the sync run for them covers every item
/// named by a caller that joined before it started. The contract: [`GroupCommit::sync`]
/// returns only after a sync that *started after the call* has completed for its
/// item, and returns that sync's error if it failed.
#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<CommitState>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct CommitState {
    /// Syncs started so far; while one runs, it is number `started`.
    started: u64,
    /// Syncs finished so far (they finish in order: one runs at a time).
    finished: u64,
    running: bool,
    /// What the callers waiting for sync `started + 1` asked for.
    wanted: Vec<usize>,
    /// How many callers wait for sync `started + 1`.
    joined: usize,
    /// Failed syncs whose error some waiting callers have not read yet.
    failures: Vec<Failure>,
}

#[derive(Debug)]
struct Failure {
    sync: u64,
    kind: io::ErrorKind,
    os_error: Option<i32>,
    message: String,
    unread: usize,
}

impl Failure {
    fn error(&self) -> io::Error {
        match self.os_error {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.message.clone()),
        }
    }

    /// `io::Error` is not `Clone`: the same errno, or the same kind and message.
    fn copy(error: &io::Error) -> io::Error {
        match error.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(error.kind(), error.to_string()),
        }
    }
}

impl GroupCommit {
    /// Returns once `item` has been made durable by a sync that started after this
    /// call. Runs the sync itself (`run`, given every item wanted) when none is
    /// running; otherwise waits for the running one to end and then either leads the
    /// next or finds it already done by another caller.
    pub fn sync(
        &self,
        item: usize,
        run: impl FnOnce(&[usize]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut state = self.lock();
        // A sync running now may have passed this caller's writes: only the next counts.
        let wanted = state.started + 1;
        if !state.wanted.contains(&item) {
            state.wanted.push(item);
        }
        state.joined += 1;
        loop {
            if state.finished >= wanted {
                return state.result_of(wanted);
            }
            if !state.running {
                // Nothing runs and `wanted` has not finished, so it is the next to start
                // (`started == wanted - 1`): this caller leads it.
                return self.lead(state, wanted, run);
            }
            state = self
                .finished
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lead(
        &self,
        mut state: MutexGuard<'_, CommitState>,
        number: u64,
        run: impl FnOnce(&[usize]) -> io::Result<()>,
    ) -> io::Result<()> {
        debug_assert_eq!(state.started + 1, number);
        state.running = true;
        state.started = number;
        let items = std::mem::take(&mut state.wanted);
        let followers = std::mem::take(&mut state.joined).saturating_sub(1);
        drop(state);
        // Ends the sync even if `run` panics, so followers are never left waiting.
        let mut ending = Ending {
            commit: self,
            number,
            followers,
            result: Some(Err(io::Error::other("The sync panicked"))),
        };
        let result = run(&items);
        ending.result = Some(match &result {
            Ok(()) => Ok(()),
            Err(error) => Err(Failure::copy(error)),
        });
        drop(ending);
        result
    }

    fn lock(&self) -> MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks a led sync finished (with its result for the followers) when dropped.
struct Ending<'a> {
    commit: &'a GroupCommit,
    number: u64,
    followers: usize,
    result: Option<io::Result<()>>,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let mut state = self.commit.lock();
        state.running = false;
        state.finished = self.number;
        if let Some(Err(error)) = self.result.take() {
            if self.followers > 0 {
                state.failures.push(Failure {
                    sync: self.number,
                    kind: error.kind(),
                    os_error: error.raw_os_error(),
                    message: error.to_string(),
                    unread: self.followers,
                });
            }
        }
        drop(state);
        self.commit.finished.notify_all();
    }
}

impl CommitState {
    /// The result of finished sync `number` for a follower (each reads it once).
    fn result_of(&mut self, number: u64) -> io::Result<()> {
        let Some(index) = self.failures.iter().position(|f| f.sync == number) else {
            return Ok(());
        };
        let failure = &mut self.failures[index];
        let error = failure.error();
        failure.unread -= 1;
        if failure.unread == 0 {
            self.failures.swap_remove(index);
        }
        Err(error)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn syncs_several_files() {
        let mut a = tempfile::tempfile().unwrap();
        let mut b = tempfile::tempfile().unwrap();
        a.write_all(b"a").unwrap();
        b.write_all(b"b").unwrap();
        let fds: Vec<RawFd> = (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    a.as_raw_fd()
                } else {
                    b.as_raw_fd()
                }
            })
            .collect();
        Durability::new().unwrap().datasync(&fds).unwrap();
    }

    /// A group commit whose syncs block until released, recording what each covered.
    struct Harness {
        commit: GroupCommit,
        syncs: Mutex<Vec<Vec<usize>>>,
        release: Mutex<std::sync::mpsc::Receiver<io::Result<()>>>,
        started: std::sync::mpsc::Sender<usize>,
    }

    impl Harness {
        fn sync(&self, item: usize) -> io::Result<()> {
            self.commit.sync(item, |items| {
                let number = {
                    let mut syncs = self.syncs.lock().unwrap();
                    syncs.push(items.to_vec());
                    syncs.len()
                };
                self.started.send(number).unwrap();
                self.release.lock().unwrap().recv().unwrap()
            })
        }

        fn joined(&self) -> usize {
            self.commit.lock().joined
        }
    }

    fn harness() -> (
        Harness,
        std::sync::mpsc::Sender<io::Result<()>>,
        std::sync::mpsc::Receiver<usize>,
    ) {
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let harness = Harness {
            commit: GroupCommit::default(),
            syncs: Mutex::new(Vec::new()),
            release: Mutex::new(release_rx),
            started: started_tx,
        };
        (harness, release_tx, started_rx)
    }

    fn wait_until(what: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !what() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn a_sync_running_at_the_call_does_not_count() {
        let (h, release, started) = harness();
        std::thread::scope(|scope| {
            let first = scope.spawn(|| h.sync(0));
            assert_eq!(started.recv().unwrap(), 1);
            // Joins while sync 1 runs: sync 1 may have passed its writes.
            let second = scope.spawn(|| {
                h.sync(1).unwrap();
                h.syncs.lock().unwrap().clone()
            });
            wait_until(|| h.joined() == 1);
            release.send(Ok(())).unwrap();
            first.join().unwrap().unwrap();
            // The second caller leads sync 2, and returns only once it completed.
            assert_eq!(started.recv().unwrap(), 2);
            assert!(!second.is_finished());
            release.send(Ok(())).unwrap();
            assert_eq!(second.join().unwrap(), vec![vec![0], vec![1]]);
        });
    }

    #[test]
    fn callers_arriving_during_a_sync_share_the_next_one() {
        let (h, release, started) = harness();
        std::thread::scope(|scope| {
            let first = scope.spawn(|| h.sync(0));
            assert_eq!(started.recv().unwrap(), 1);
            let waiters: Vec<_> = (0..8)
                .map(|i| {
                    let h = &h;
                    scope.spawn(move || h.sync(i % 3))
                })
                .collect();
            wait_until(|| h.joined() == 8);
            release.send(Ok(())).unwrap();
            assert_eq!(started.recv().unwrap(), 2);
            release.send(Ok(())).unwrap();
            first.join().unwrap().unwrap();
            for waiter in waiters {
                waiter.join().unwrap().unwrap();
            }
        });
        let syncs = h.syncs.into_inner().unwrap();
        assert_eq!(syncs.len(), 2, "{syncs:?}");
        let mut second = syncs[1].clone();
        second.sort_unstable();
        assert_eq!(second, vec![0, 1, 2]);
    }

    #[test]
    fn a_failed_sync_fails_every_caller_that_shared_it_and_not_later_ones() {
        let (h, release, started) = harness();
        std::thread::scope(|scope| {
            let first = scope.spawn(|| h.sync(0));
            assert_eq!(started.recv().unwrap(), 1);
            let waiters: Vec<_> = (0..4).map(|_| scope.spawn(|| h.sync(1))).collect();
            wait_until(|| h.joined() == 4);
            release.send(Ok(())).unwrap();
            assert_eq!(started.recv().unwrap(), 2);
            release
                .send(Err(io::Error::from_raw_os_error(libc::EIO)))
                .unwrap();
            first.join().unwrap().unwrap();
            for waiter in waiters {
                let error = waiter.join().unwrap().unwrap_err();
                assert_eq!(error.raw_os_error(), Some(libc::EIO));
            }
        });
        assert!(h.commit.lock().failures.is_empty());
        release.send(Ok(())).unwrap();
        h.sync(2).unwrap();
        assert_eq!(started.recv().unwrap(), 3);
    }

    #[test]
    fn a_panicking_sync_fails_its_followers_and_the_next_sync_runs() {
        let commit = GroupCommit::default();
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(0);
        let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<()>(0);
        let go_rx = Mutex::new(go_rx);
        std::thread::scope(|scope| {
            let leader = scope.spawn(|| {
                commit.sync(0, |_| {
                    entered_tx.send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                    panic!("injected");
                })
            });
            entered_rx.recv().unwrap();
            let follower = scope.spawn(|| commit.sync(0, |_| Ok(())));
            wait_until(|| commit.lock().joined == 1);
            go_tx.send(()).unwrap();
            assert!(leader.join().is_err());
            // The follower joined during the panicking sync: it leads the next one.
            follower.join().unwrap().unwrap();
        });
        assert!(!commit.lock().running);
        commit.sync(1, |_| Ok(())).unwrap();
    }

    #[test]
    fn bad_fd_is_an_error() {
        assert!(Durability::new().unwrap().datasync(&[-1]).is_err());
    }
}
