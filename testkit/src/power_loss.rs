//! Power-loss helpers: daemon state on a `powerloss-fs` mount (tools/powerloss-fs,
//! our LazyFS-style filesystem) that the tests cut, a writer that FLUSHes every few
//! writes and records which writes a completed FLUSH made durable, and the check of
//! an image after a power loss.
//!
//! Oracle (one connection, so writes are totally ordered): writes 1..=d were
//! acknowledged before the last completed FLUSH and must have their effect; any later
//! write (acknowledged or in flight) may or may not have landed. So each 512-byte
//! sector must hold the last durable write covering it (or what it held before the
//! round if none did) or any later write covering it.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use powerloss_fs::{Dropped, Mounted};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nbd::Conn;
use crate::writer::{describe_sector, pattern, BLOCK, SECTOR};
use crate::Primary;

/// The seed of a randomised test: `BLKREP_TEST_SEED`, else the clock. Printed so a
/// failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("BLKREP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            now.as_secs() ^ u64::from(now.subsec_nanos())
        });
    println!("seed {seed} (rerun with BLKREP_TEST_SEED={seed})");
    seed
}

/// False (after printing why) when FUSE mounts are impossible here.
pub fn fuse_available() -> bool {
    match powerloss_fs::unavailable() {
        None => true,
        Some(why) => {
            println!("SKIPPED: power-loss tests need FUSE: {why}");
            false
        }
    }
}

/// A backing directory and its power-loss mount, cut and remounted by the test.
#[derive(Debug)]
pub struct PowerLossDir {
    /// Where the files really are (what survives a cut).
    pub backing: PathBuf,
    /// The powerloss-fs mount over it, which the daemon uses.
    pub mnt: PathBuf,
    fs: Option<Mounted>,
    /// Power cuts so far.
    pub cuts: u32,
    /// What all cuts so far dropped.
    pub dropped: Dropped,
}

impl PowerLossDir {
    /// Creates `root/powerloss-backing` and `root/powerloss` and mounts.
    pub fn mount_in(root: &Path) -> PowerLossDir {
        let backing = root.join("powerloss-backing");
        let mnt = root.join("powerloss");
        fs::create_dir_all(&backing).expect("mkdir backing");
        fs::create_dir_all(&mnt).expect("mkdir mountpoint");
        let mut dir = PowerLossDir {
            backing,
            mnt,
            fs: None,
            cuts: 0,
            dropped: Dropped::default(),
        };
        dir.mount();
        dir
    }

    fn mount(&mut self) {
        assert!(self.fs.is_none(), "already mounted");
        self.fs = Some(
            Mounted::mount(&self.backing, &self.mnt)
                .unwrap_or_else(|e| panic!("mount powerloss-fs on {}: {e:?}", self.mnt.display())),
        );
    }

    /// Cuts the power (the daemon on it must be killed next); returns what the fs
    /// dropped.
    pub fn cut(&mut self) -> Dropped {
        let dropped = self.fs.take().expect("mounted").power_cut();
        self.cuts += 1;
        self.dropped.bytes += dropped.bytes;
        self.dropped.files += dropped.files;
        dropped
    }

    /// Mounts the backing directory again: what was synced, nothing else.
    pub fn remount(&mut self) {
        self.mount();
    }
}

/// Moves a prepared (not started) primary's images and ring onto `dir`: the images
/// into its backing directory (before anything runs, so they count as synced), the
/// configuration's image and ring paths to the mount, and a symlink left at each
/// image's old path so the fixture's helpers read through the mount.
pub fn place_primary_on(p: &Primary, dir: &PowerLossDir) {
    let mut config = fs::read_to_string(p.config()).expect("read config");
    let mut moves: Vec<(PathBuf, PathBuf)> = p
        .spec
        .disks()
        .map(|d| (p.image(&d.name), dir.mnt.join(format!("{}.img", d.name))))
        .collect();
    for g in &p.spec.groups {
        moves.push((
            p.layout.ring(&g.name),
            dir.mnt.join(format!("{}.ring", g.name)),
        ));
    }
    for (old, new) in &moves {
        let quoted = |p: &Path| format!("{:?}", p.display().to_string());
        assert!(
            config.contains(&quoted(old)),
            "config names {}",
            old.display()
        );
        config = config.replace(&quoted(old), &quoted(new));
        if old.exists() {
            let name = new.file_name().expect("file name");
            fs::rename(old, dir.backing.join(name)).expect("move image to backing dir");
            std::os::unix::fs::symlink(new, old).expect("symlink to the mount");
        }
    }
    fs::write(p.config(), config).expect("write config");
}

/// Rewrites a ring's boot id (in both superblock copies) so the next start sees a
/// host crash, as after a real power loss; `ring` is the file in the backing
/// directory, written while nothing has it mounted. (The same as
/// `tests/system/replication.rs` does for a ring on normal disk.)
pub fn pretend_host_crash(ring: &Path) {
    use tracker::superblock::{Superblock, SUPERBLOCK_LEN};
    let mut bytes = fs::read(ring).expect("ring");
    for at in [0, SUPERBLOCK_LEN] {
        if let Ok(mut superblock) = Superblock::decode(&bytes[at..at + SUPERBLOCK_LEN]) {
            superblock.boot_id = [0x5a; 16];
            bytes[at..at + SUPERBLOCK_LEN].copy_from_slice(&superblock.encode().expect("encode"));
        }
    }
    let file = fs::OpenOptions::new().write(true).open(ring).expect("ring");
    file.write_all_at(&bytes[..2 * SUPERBLOCK_LEN], 0)
        .expect("write superblocks");
    file.sync_all().expect("sync ring");
}

/// One write of a [`FlushingWriter`].
#[derive(Debug, Clone, Copy)]
pub struct FlushedWrite {
    /// Its sequence number (the pattern's tag).
    pub seq: u64,
    /// Its offset in bytes.
    pub off: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Whether the server acknowledged it.
    pub acked: bool,
}

/// What a [`FlushingWriter`] did: its writes in order, and how many of the first
/// were made durable by a completed FLUSH.
#[derive(Debug, Default)]
pub struct FlushLog {
    /// Every write, in the order sent.
    pub writes: Vec<FlushedWrite>,
    /// How many of the first writes a completed FLUSH made durable.
    pub durable: usize,
    /// FLUSHes completed.
    pub flushes: u64,
}

impl FlushLog {
    /// How many writes were acknowledged.
    pub fn acked(&self) -> usize {
        self.writes.iter().filter(|w| w.acked).count()
    }
}

#[derive(Debug, Default)]
struct FlushShared {
    stop: AtomicBool,
    log: Mutex<FlushLog>,
}

/// One connection writing 1..=8 blocks at random in `[0, region)` of one export,
/// sending FLUSH after every `flush_every` writes, at `rate` bytes/s at most.
#[derive(Debug)]
pub struct FlushingWriter {
    shared: Arc<FlushShared>,
    handle: JoinHandle<()>,
}

impl FlushingWriter {
    /// Connects to `export` on `sock` and starts writing; sequence numbers come from
    /// `seqs` (unique across rounds), `seed` makes the run reproducible.
    pub fn start(
        sock: &Path,
        export: &str,
        region: u64,
        flush_every: usize,
        rate: u64,
        seqs: Arc<AtomicU64>,
        seed: u64,
    ) -> FlushingWriter {
        let mut conn = Conn::connect_unix(sock, export).expect("connect");
        let shared = Arc::new(FlushShared::default());
        let sh = shared.clone();
        let handle = thread::Builder::new()
            .name("flushing-writer".into())
            .spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let start = Instant::now();
                let mut bytes = 0u64;
                while !sh.stop.load(Ordering::SeqCst) {
                    let blocks = rng.gen_range(1..=8u64);
                    let off = rng.gen_range(0..=region / BLOCK - blocks) * BLOCK;
                    let len = blocks * BLOCK;
                    let seq = seqs.fetch_add(1, Ordering::SeqCst);
                    let index = {
                        let mut log = sh.log.lock().expect("log");
                        log.writes.push(FlushedWrite {
                            seq,
                            off,
                            len,
                            acked: false,
                        });
                        log.writes.len() - 1
                    };
                    let data = pattern(seq, off, usize::try_from(len).expect("len"));
                    if conn.write(off, &data, false).is_err() {
                        return; // the power went
                    }
                    let mut log = sh.log.lock().expect("log");
                    log.writes[index].acked = true;
                    let written = log.writes.len();
                    drop(log);
                    if written % flush_every == 0 {
                        if conn.flush().is_err() {
                            return;
                        }
                        let mut log = sh.log.lock().expect("log");
                        log.durable = written;
                        log.flushes += 1;
                    }
                    bytes += len;
                    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        thread::sleep(wait);
                    }
                }
            })
            .expect("spawn writer");
        FlushingWriter { shared, handle }
    }

    /// How many writes were acknowledged so far.
    pub fn acked_so_far(&self) -> usize {
        self.shared.log.lock().expect("log").acked()
    }

    /// Stops (the daemon may be dead already) and returns the log.
    pub fn finish(self) -> FlushLog {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("writer thread");
        std::mem::take(&mut *self.shared.log.lock().expect("log"))
    }
}

/// Checks `now` (the image's first bytes, as long as the writer's region) against
/// `before` (the same bytes when the round started) and the round's log. Returns a
/// description of every violation, at most `max`.
pub fn check_after_power_loss(
    now: &[u8],
    before: &[u8],
    log: &FlushLog,
    max: usize,
) -> Vec<String> {
    let mut errors = Vec::new();
    let sectors = now.len() / SECTOR;
    // Per sector: the last durable write covering it, and the later ones.
    let mut durable: Vec<Option<u64>> = vec![None; sectors];
    let mut later: Vec<Vec<u64>> = vec![Vec::new(); sectors];
    for (index, w) in log.writes.iter().enumerate() {
        let first = usize::try_from(w.off).expect("off") / SECTOR;
        let count = usize::try_from(w.len).expect("len") / SECTOR;
        for sector in first..first + count {
            if index < log.durable {
                durable[sector] = Some(w.seq);
            } else {
                later[sector].push(w.seq);
            }
        }
    }
    for sector in 0..sectors {
        let at = sector * SECTOR;
        let got = &now[at..at + SECTOR];
        let expected = |seq: u64| pattern(seq, at as u64, SECTOR);
        let durable_ok = match durable[sector] {
            Some(seq) => got == expected(seq).as_slice(),
            None => got == &before[at..at + SECTOR],
        };
        if durable_ok
            || later[sector]
                .iter()
                .any(|&seq| got == expected(seq).as_slice())
        {
            continue;
        }
        errors.push(format!(
            "sector at {at} holds {}; it must hold {} or one of the writes after the last FLUSH {:?}",
            describe_sector(got),
            durable[sector].map_or("what it held before the round".to_string(), |s| format!(
                "durable write seq {s}"
            )),
            later[sector]
        ));
        if errors.len() >= max {
            break;
        }
    }
    errors
}

/// The first `len` bytes of `path`.
pub fn read_prefix(path: &Path, len: u64) -> Vec<u8> {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut bytes = vec![0; usize::try_from(len).expect("len")];
    file.read_exact_at(&mut bytes, 0)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes
}

/// Moves a running replica's storage for trust group `trust_group` onto `dir`: stops
/// it, moves the storage directory into the backing directory, leaves a symlink to
/// the mount in its place (so the fixture's paths read through the mount), restarts.
pub fn place_replica_storage_on(
    replica: &mut crate::replica::Replica,
    trust_group: &str,
    dir: &PowerLossDir,
) {
    replica.terminate();
    let storage = replica.storage(trust_group);
    let name = storage.file_name().expect("storage dir name").to_owned();
    if storage.exists() {
        fs::rename(&storage, dir.backing.join(&name)).expect("move storage");
    } else {
        fs::create_dir(dir.backing.join(&name)).expect("mkdir storage");
    }
    std::os::unix::fs::symlink(dir.mnt.join(&name), &storage).expect("symlink storage");
    replica.spawn();
}
