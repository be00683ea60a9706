#![allow(clippy::unwrap_used)]

use super::*;
use crate::freeze::AppConsistentOptions;
use crate::resync::Cursor;
use crate::LocalCopySink;
use std::os::unix::fs::FileExt;
use tracker::{Change, ChangeData, DiskSpec, ResyncReason, TrackerConfig, TrackingMode};
use wire::api::TransferKind;

const SIZE: u64 = 8 << 20;

fn options() -> ShipperOptions {
    ShipperOptions {
        interval: Duration::from_secs(3600),
        retry: RetryPolicy::default(),
        replication: None,
        app_consistent: None,
    }
}

/// Writes through the tracker to a real image file, as the NBD export does.
fn write(tracker: &tracker::DiskTracker, image: &File, offset: u64, data: &[u8]) {
    let guard = tracker.log_write(offset, data).unwrap();
    image.write_all_at(data, offset).unwrap();
    drop(guard);
}

/// A one-disk group on a real 8 MiB image, with its local copy made.
struct Fixture {
    dir: tempfile::TempDir,
    image_path: PathBuf,
    image: File,
    group: Group,
    copies: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image_path = dir.path().join("disk0.raw");
        let image = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&image_path)
            .unwrap();
        image.set_len(SIZE).unwrap();
        let (group, _) = Group::open(&TrackerConfig {
            name: "g".into(),
            ring_path: dir.path().join("g.ring"),
            ring_size: tracker::group::MIN_RING_SIZE,
            block_size: 4096,
            disks: vec![DiskSpec {
                name: "disk0".into(),
                size: SIZE,
            }],
        })
        .unwrap();
        let copies = dir.path().join("copy");
        LocalCopySink::seed(&copies, &[("disk0".into(), image_path.clone())]).unwrap();
        Self {
            dir,
            image_path,
            image,
            group,
            copies,
        }
    }
}

#[test]
fn delivers_cycles_and_resyncs_after_overflow() {
    let Fixture {
        dir: _dir,
        image_path,
        image,
        group,
        copies,
    } = Fixture::new();
    let sink = LocalCopySink::open(&copies, &[("disk0".into(), SIZE)]).unwrap();
    let shipper = Shipper::spawn(
        group.clone(),
        vec![image_path.clone()],
        4096,
        options(),
        Box::new(sink),
    )
    .unwrap();
    let disk = group.disk(0).unwrap();
    write(&disk, &image, 4096, &[1; 10000]);
    assert_eq!(shipper.close_now(Duration::from_secs(10)).unwrap(), 1);
    let copy = copies.join("disk0.img");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&image_path).unwrap()
    );

    // 8 MiB into a 4 MiB ring: overflow, then the next attempt resyncs.
    for i in 0..128u64 {
        write(
            &disk,
            &image,
            (i * 65536) % (SIZE - 65536),
            &[u8::try_from(i % 250).unwrap() + 2; 65536],
        );
    }
    assert_eq!(group.status().mode, TrackingMode::DirtyMap);
    shipper.close_now(Duration::from_secs(10)).unwrap();
    assert_eq!(group.status().resync, None);
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&image_path).unwrap()
    );
    let status = shipper.status();
    assert_eq!((status.resyncs, status.failures), (1, 0));
    shipper.stop();
}

/// Fails the commits numbered in `failing` (from 1) with `error()`, then behaves.
struct FlakySink {
    inner: LocalCopySink,
    commits: Arc<std::sync::atomic::AtomicU32>,
    failing: std::ops::RangeInclusive<u32>,
    error: fn() -> SinkError,
}

impl FlakySink {
    fn new(
        copies: &std::path::Path,
        failing: std::ops::RangeInclusive<u32>,
        error: fn() -> SinkError,
    ) -> Self {
        Self {
            inner: LocalCopySink::open(copies, &[("disk0".into(), SIZE)]).unwrap(),
            commits: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            failing,
            error,
        }
    }
}

impl CycleSink for FlakySink {
    fn describe(&self) -> String {
        "flaky".into()
    }
    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        self.inner.apply(change)
    }
    fn commit(&mut self) -> Result<(), SinkError> {
        let n = self
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if self.failing.contains(&n) {
            return Err((self.error)());
        }
        self.inner.commit()
    }
}

/// A local failure, as a full disk gives.
fn injected() -> SinkError {
    SinkError::Copy {
        path: PathBuf::from("flaky"),
        source: std::io::Error::other("injected"),
    }
}

/// What a replica applying what it received answers.
fn busy() -> SinkError {
    SinkError::Remote {
        url: "https://replica.test".into(),
        source: crate::remote::ClientError::Refused {
            what: "commit".into(),
            status: 503,
            code: Some(ErrorCode::Busy),
            message: "Busy applying".into(),
        },
    }
}

/// A busy replica is retried within seconds, not at the next (hour-long) interval:
/// the second Busy answer doubles the wait, and a later attempt delivers.
#[test]
fn a_busy_replica_is_retried_before_the_next_interval() {
    let Fixture {
        dir: _dir,
        image_path,
        image,
        group,
        copies,
    } = Fixture::new();
    let sink = FlakySink::new(&copies, 1..=2, busy);
    let commits = Arc::clone(&sink.commits);
    let options = ShipperOptions {
        // Busy waits of 50 ms, then 100 ms.
        retry: RetryPolicy { scale: 0.005 },
        ..options()
    };
    let shipper = Shipper::spawn(
        group.clone(),
        vec![image_path.clone()],
        4096,
        options,
        Box::new(sink),
    )
    .unwrap();
    write(&group.disk(0).unwrap(), &image, 8192, &[9; 4096]);
    assert!(shipper.close_now(Duration::from_secs(10)).is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    while shipper.status().last_error.is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        shipper.status().last_error.is_none(),
        "not retried: {:?}",
        shipper.status().last_error
    );
    assert!(commits.load(std::sync::atomic::Ordering::SeqCst) > 2);
    assert_eq!(
        std::fs::read(copies.join("disk0.img")).unwrap(),
        std::fs::read(&image_path).unwrap()
    );
    shipper.stop();
}

/// The first delivery after a resync's copy fails: the next attempt must finish the
/// resync (and the copy must end equal to the image).
#[test]
fn a_failed_delivery_after_the_resync_copy_is_finished_later() {
    let Fixture {
        dir: _dir,
        image_path,
        image,
        group,
        copies,
    } = Fixture::new();
    // Commit 1: the resync copy; commit 2: the cycle after it (fails).
    let sink = FlakySink::new(&copies, 2..=2, injected);
    let shipper = Shipper::spawn(
        group.clone(),
        vec![image_path.clone()],
        4096,
        options(),
        Box::new(sink),
    )
    .unwrap();
    let disk = group.disk(0).unwrap();
    for i in 0..128u64 {
        write(
            &disk,
            &image,
            (i * 65536) % (SIZE - 65536),
            &[u8::try_from(i % 250).unwrap() + 2; 65536],
        );
    }
    assert!(shipper.close_now(Duration::from_secs(10)).is_err());
    assert_eq!(shipper.status().resyncs, 0);
    write(&disk, &image, 4096, &[77; 4096]);
    shipper.close_now(Duration::from_secs(10)).unwrap();
    assert_eq!(shipper.status().resyncs, 1);
    assert_eq!(
        std::fs::read(copies.join("disk0.img")).unwrap(),
        std::fs::read(&image_path).unwrap()
    );
    shipper.stop();
}

/// A consumer that stores chunks as a replica does: a chunk counts once `cut` (or the
/// commit) stores it; `begin` of the transfer being received answers how many chunks
/// are stored. Cut number `fail_at` fails (the connection breaks mid-transfer).
struct ChunkingSink {
    inner: LocalCopySink,
    receiving: Option<u64>,
    stored: u32,
    pending: Vec<(usize, u64, u64, Option<Vec<u8>>)>,
    pending_bytes: usize,
    /// Where the last stored record ends.
    end: Option<Cursor>,
    cuts: u32,
    fail_at: u32,
    applied_bytes: Arc<std::sync::atomic::AtomicU64>,
}

const FAKE_CHUNK: usize = 256 << 10;

impl ChunkingSink {
    fn store(&mut self) -> Result<bool, SinkError> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        self.cuts += 1;
        if self.cuts == self.fail_at {
            self.pending.clear();
            self.pending_bytes = 0;
            return Err(SinkError::Copy {
                path: PathBuf::from("chunking"),
                source: std::io::Error::other("injected"),
            });
        }
        for (disk, offset, length, data) in self.pending.drain(..) {
            self.end = Some(Cursor {
                disk,
                offset: offset + length,
            });
            let change = match &data {
                Some(bytes) => Change {
                    disk,
                    offset,
                    length: bytes.len() as u64,
                    data: ChangeData::Write(bytes),
                },
                None => continue,
            };
            self.applied_bytes
                .fetch_add(change.length, std::sync::atomic::Ordering::SeqCst);
            self.inner.apply(&change)?;
        }
        self.stored += 1;
        self.pending_bytes = 0;
        Ok(true)
    }
}

impl CycleSink for ChunkingSink {
    fn describe(&self) -> String {
        "chunking".into()
    }
    fn begin(
        &mut self,
        id: u64,
        _kind: TransferKind,
        _bytes: u64,
    ) -> Result<crate::Resume, SinkError> {
        if self.receiving != Some(id) {
            self.receiving = Some(id);
            self.stored = 0;
            self.end = None;
        }
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(crate::Resume {
            have_chunks: self.stored,
            committed: false,
            resume_from: self.end,
        })
    }
    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        let data = match change.data {
            ChangeData::Write(bytes) => Some(bytes.to_vec()),
            // Zero records are applied through the copy at once (they are idempotent).
            ChangeData::Zero | ChangeData::Trim => {
                self.inner.apply(change)?;
                None
            }
        };
        self.pending_bytes += 24 + data.as_ref().map_or(0, Vec::len);
        self.pending
            .push((change.disk, change.offset, change.length, data));
        Ok(())
    }
    fn room(&self) -> usize {
        FAKE_CHUNK.saturating_sub(self.pending_bytes)
    }
    fn cut(&mut self) -> Result<bool, SinkError> {
        self.store()
    }
    fn commit(&mut self) -> Result<(), SinkError> {
        self.store()?;
        self.receiving = None;
        self.inner.commit()
    }
}

/// A resync batch interrupted mid-chunk resumes at the chunk the consumer lacks: the
/// copy ends equal to the image, and at most one chunk is sent twice.
#[test]
fn an_interrupted_resync_resumes_at_the_missing_chunk() {
    let Fixture {
        dir: _dir,
        image_path,
        image,
        group,
        copies,
    } = Fixture::new();
    // Data everywhere (random-ish), so every block is sent as data.
    let data: Vec<u8> = (0..SIZE)
        .map(|i| u8::try_from(i % 251).unwrap() | 1)
        .collect();
    image.write_all_at(&data, 0).unwrap();
    group
        .request_full_resync(ResyncReason::InitialReplication)
        .unwrap();
    let applied = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = ChunkingSink {
        inner: LocalCopySink::open(&copies, &[("disk0".into(), SIZE)]).unwrap(),
        receiving: None,
        stored: 0,
        pending: Vec::new(),
        pending_bytes: 0,
        end: None,
        cuts: 0,
        fail_at: 6,
        applied_bytes: Arc::clone(&applied),
    };
    let shipper = Shipper::spawn(
        group.clone(),
        vec![image_path.clone()],
        4096,
        options(),
        Box::new(sink),
    )
    .unwrap();
    assert!(shipper.close_now(Duration::from_secs(10)).is_err());
    let status = shipper.status();
    assert_eq!(status.state, ReplicationState::InitialReplication);
    let progress = status.resync.unwrap();
    assert!(progress.done_bytes < progress.total_bytes);
    shipper.close_now(Duration::from_secs(10)).unwrap();
    assert_eq!(shipper.status().resyncs, 1);
    assert_eq!(shipper.status().state, ReplicationState::Replicating);
    assert_eq!(
        std::fs::read(copies.join("disk0.img")).unwrap(),
        std::fs::read(&image_path).unwrap()
    );
    // Every byte applied once, except the chunk lost in flight (never applied).
    assert_eq!(applied.load(std::sync::atomic::Ordering::SeqCst), SIZE);
    shipper.stop();
}

/// A local copy that records every transfer it is offered.
struct RecordingSink {
    inner: LocalCopySink,
    kinds: Arc<Mutex<Vec<TransferKind>>>,
}

impl CycleSink for RecordingSink {
    fn describe(&self) -> String {
        "recording".into()
    }
    fn begin(
        &mut self,
        id: u64,
        kind: TransferKind,
        bytes: u64,
    ) -> Result<crate::Resume, SinkError> {
        self.kinds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(kind);
        self.inner.begin(id, kind, bytes)
    }
    fn apply(&mut self, change: &Change<'_>) -> Result<(), SinkError> {
        self.inner.apply(change)
    }
    fn commit(&mut self) -> Result<(), SinkError> {
        self.inner.commit()
    }
}

/// A `sh -c` command that appends `PHASE CYCLE GROUP DISKS` to `log`, then runs `then`.
fn recording_command(log: &std::path::Path, then: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            r#"echo "$BLKREP_PHASE $BLKREP_CYCLE $BLKREP_GROUP $BLKREP_DISKS" >> '{}'; {then}"#,
            log.display()
        ),
    ]
}

/// The deltas offered, as (cycle, app_consistent).
fn deltas(kinds: &Mutex<Vec<TransferKind>>) -> Vec<(u64, bool)> {
    kinds
        .lock()
        .unwrap()
        .iter()
        .filter_map(|kind| match *kind {
            TransferKind::Delta {
                cycle,
                app_consistent,
                ..
            } => Some((cycle, app_consistent)),
            _ => None,
        })
        .collect()
}

fn app_shipper(
    fixture: &Fixture,
    app: AppConsistentOptions,
) -> (Shipper, Arc<Mutex<Vec<TransferKind>>>) {
    let kinds = Arc::new(Mutex::new(Vec::new()));
    let sink = RecordingSink {
        inner: LocalCopySink::open(&fixture.copies, &[("disk0".into(), SIZE)]).unwrap(),
        kinds: Arc::clone(&kinds),
    };
    let shipper = Shipper::spawn(
        fixture.group.clone(),
        vec![fixture.image_path.clone()],
        4096,
        ShipperOptions {
            app_consistent: Some(app),
            ..options()
        },
        Box::new(sink),
    )
    .unwrap();
    (shipper, kinds)
}

/// The first cycle is a point: frozen before it closes, thawed after, flagged in its
/// transfer. The next cycle, within `every`, is not; nor after a restart.
#[test]
fn an_application_consistent_point_freezes_closes_and_thaws() {
    let fixture = Fixture::new();
    let log = fixture.dir.path().join("hooks.log");
    let state = fixture.dir.path().join("g.ring.app-consistent.json");
    let app = AppConsistentOptions {
        every: Duration::from_secs(3600),
        freeze_command: recording_command(&log, "true"),
        thaw_command: recording_command(&log, "true"),
        timeout: Duration::from_secs(10),
        state_path: Some(state),
    };
    let (shipper, kinds) = app_shipper(&fixture, app.clone());
    let disk = fixture.group.disk(0).unwrap();
    write(&disk, &fixture.image, 0, &[5; 4096]);
    assert_eq!(shipper.close_now(Duration::from_secs(10)).unwrap(), 1);
    write(&disk, &fixture.image, 8192, &[6; 4096]);
    assert_eq!(shipper.close_now(Duration::from_secs(10)).unwrap(), 2);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "freeze 1 g disk0\nthaw 1 g disk0\n"
    );
    assert_eq!(deltas(&kinds), [(1, true), (2, false)]);
    let report = shipper.status().app_consistent.unwrap();
    assert_eq!(
        (report.points, report.points_delivered, report.last_cycle),
        (1, 1, Some(1))
    );
    assert_eq!(report.last_delivered_cycle, Some(1));
    assert_eq!((report.freeze_failures, report.thaw_failures), (0, 0));
    assert_eq!(report.every_secs, 3600);
    // Due half an interval (30 minutes here) before the hour is up.
    assert!(report
        .next_due_unix
        .is_some_and(|due| (unix_now() + 1790..=unix_now() + 1800).contains(&due)));
    assert_eq!(report.last_failure, None);
    shipper.stop();

    // A restart remembers the attempt: no freeze at its first cycle.
    let (shipper, kinds) = app_shipper(&fixture, app);
    assert!(shipper
        .status()
        .app_consistent
        .unwrap()
        .last_attempt_unix
        .is_some());
    assert_eq!(shipper.close_now(Duration::from_secs(10)).unwrap(), 3);
    assert_eq!(deltas(&kinds), [(3, false)]);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2);
    assert_eq!(
        std::fs::read(fixture.copies.join("disk0.img")).unwrap(),
        std::fs::read(&fixture.image_path).unwrap()
    );
    shipper.stop();
}

/// A failing freeze: the cycle still closes and ships, crash-consistent; the thaw still
/// runs. A failing thaw is counted apart.
#[test]
fn a_failed_freeze_still_ships_and_thaws() {
    let fixture = Fixture::new();
    let log = fixture.dir.path().join("hooks.log");
    let app = AppConsistentOptions {
        every: Duration::from_secs(3600),
        freeze_command: recording_command(&log, "echo 'agent not responding' >&2; exit 1"),
        thaw_command: recording_command(&log, "exit 2"),
        timeout: Duration::from_secs(10),
        state_path: None,
    };
    let (shipper, kinds) = app_shipper(&fixture, app);
    write(
        &fixture.group.disk(0).unwrap(),
        &fixture.image,
        0,
        &[9; 4096],
    );
    assert_eq!(shipper.close_now(Duration::from_secs(10)).unwrap(), 1);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "freeze 1 g disk0\nthaw 1 g disk0\n"
    );
    assert_eq!(deltas(&kinds), [(1, false)]);
    let status = shipper.status();
    assert_eq!(status.cycles_delivered, 1);
    let report = status.app_consistent.unwrap();
    assert_eq!((report.points, report.points_delivered), (0, 0));
    assert_eq!((report.freeze_failures, report.thaw_failures), (1, 1));
    let failure = report.last_failure.unwrap();
    for expected in ["exit status: 1", "agent not responding", "exit status: 2"] {
        assert!(failure.contains(expected), "{expected}: {failure}");
    }
    assert_eq!(
        std::fs::read(fixture.copies.join("disk0.img")).unwrap(),
        std::fs::read(&fixture.image_path).unwrap()
    );
    shipper.stop();
}

/// A freeze command that cannot start froze nothing: no thaw runs.
#[test]
fn a_freeze_that_never_started_needs_no_thaw() {
    let fixture = Fixture::new();
    let log = fixture.dir.path().join("hooks.log");
    let app = AppConsistentOptions {
        every: Duration::from_secs(3600),
        freeze_command: vec!["/nonexistent/freeze".into()],
        thaw_command: recording_command(&log, "true"),
        timeout: Duration::from_secs(10),
        state_path: None,
    };
    let (shipper, kinds) = app_shipper(&fixture, app);
    assert_eq!(shipper.close_now(Duration::from_secs(10)).unwrap(), 1);
    assert!(!log.exists());
    assert_eq!(deltas(&kinds), [(1, false)]);
    let report = shipper.status().app_consistent.unwrap();
    assert_eq!((report.freeze_failures, report.thaw_failures), (1, 0));
    assert!(report
        .last_failure
        .is_some_and(|f| f.contains("Cannot start `/nonexistent/freeze`")));
    shipper.stop();
}
