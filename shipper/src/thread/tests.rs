#![allow(clippy::unwrap_used)]

use super::*;
use crate::LocalCopySink;
use std::os::unix::fs::FileExt;
use tracker::{Change, DiskSpec, GroupConfig, TrackingMode};
use wire::api::TransferKind;

const SIZE: u64 = 8 << 20;

fn options() -> ShipperOptions {
    ShipperOptions {
        interval: Duration::from_secs(3600),
        retry: RetryPolicy::default(),
        replication: None,
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
        let (group, _) = Group::open(&GroupConfig {
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

/// Fails the `fail_at`-th commit, then behaves.
struct FlakySink {
    inner: LocalCopySink,
    commits: Arc<std::sync::atomic::AtomicU32>,
    fail_at: u32,
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
        if n == self.fail_at {
            return Err(SinkError::Copy {
                path: PathBuf::from("flaky"),
                source: std::io::Error::other("injected"),
            });
        }
        self.inner.commit()
    }
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
    let sink = FlakySink {
        inner: LocalCopySink::open(&copies, &[("disk0".into(), SIZE)]).unwrap(),
        commits: Arc::new(std::sync::atomic::AtomicU32::new(0)),
        fail_at: 2,
    };
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
