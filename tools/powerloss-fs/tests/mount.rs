//! The contract of the power-loss filesystem, checked on real mounts: what was
//! synced survives a power cut, nothing else does.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use powerloss_fs::{Mounted, PAGE};

/// A backing dir and a mountpoint in one temp dir.
struct Rig {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
}

impl Rig {
    /// None (after saying why) when FUSE mounts are impossible here.
    fn new() -> Option<Rig> {
        if let Some(why) = powerloss_fs::unavailable() {
            eprintln!("SKIPPED: FUSE is unavailable: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        Some(Rig {
            _dir: dir,
            backing,
            mnt,
        })
    }
    fn mount(&self) -> Mounted {
        Mounted::mount(&self.backing, &self.mnt).unwrap()
    }
    fn at(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }
}

fn create(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

#[test]
fn unsynced_writes_are_lost_at_a_power_cut_and_synced_ones_kept() {
    let Some(rig) = Rig::new() else { return };
    let fs = rig.mount();
    let synced = create(&rig.at("synced"));
    synced.write_all_at(&[1; 10_000], 0).unwrap();
    synced.sync_data().unwrap();
    synced.write_all_at(&[2; 100], 50).unwrap();
    let unsynced = create(&rig.at("unsynced"));
    unsynced.write_all_at(&[3; 5000], 0).unwrap();
    drop(unsynced); // close is not a sync
    assert_eq!(fs::read(rig.at("unsynced")).unwrap(), vec![3; 5000]);
    assert_eq!(
        fs::read(rig.backing.join("unsynced")).unwrap().len(),
        0,
        "nothing reaches the backing file before a sync"
    );
    let dropped = fs.power_cut();
    assert_eq!(dropped.files, 2, "{dropped:?}");
    assert_eq!(dropped.bytes, 3 * PAGE, "{dropped:?}");
    // Writes and syncs to a file open across the cut fail; the remount shows what
    // was synced.
    let err = synced.write_all_at(&[4; 10], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let err = synced.sync_data().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(synced);
    let _fs = rig.mount();
    assert_eq!(fs::read(rig.at("synced")).unwrap(), vec![1; 10_000]);
    assert_eq!(fs::read(rig.at("unsynced")).unwrap(), Vec::<u8>::new());
}

#[test]
fn a_file_renamed_before_its_data_is_synced_is_empty_after_a_cut() {
    let Some(rig) = Rig::new() else { return };
    let fs = rig.mount();
    let mut careless = File::create(rig.at("careless.tmp")).unwrap();
    careless.write_all(b"state v2").unwrap();
    drop(careless);
    fs::rename(rig.at("careless.tmp"), rig.at("careless")).unwrap();
    let mut careful = File::create(rig.at("careful.tmp")).unwrap();
    careful.write_all(b"state v2").unwrap();
    careful.sync_data().unwrap();
    drop(careful);
    fs::rename(rig.at("careful.tmp"), rig.at("careful")).unwrap();
    File::open(&rig.mnt).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(rig.at("careless")).unwrap(), b"state v2");
    fs.power_cut();
    let _fs = rig.mount();
    assert_eq!(fs::read(rig.at("careless")).unwrap(), b"");
    assert_eq!(fs::read(rig.at("careful")).unwrap(), b"state v2");
}

/// The filesystem served by the `powerloss-fs` binary, in a process of its own.
///
/// A test that faults pages of a mapped file in must not serve the mount itself: the
/// faulting thread waits on the FUSE read while holding this process's memory map,
/// and the server's threads, in the same process, wait for that map (for `munmap`
/// and `mprotect` in their allocator) before they can answer. Seen as a hang under
/// load.
struct Served(Child);

impl Served {
    fn start(rig: &Rig) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_powerloss-fs"))
            .args([&rig.backing, &rig.mnt])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(ready.starts_with("mounted "), "powerloss-fs said {ready:?}");
        Served(child)
    }

    /// Cuts the power: the server drops what was not synced and exits.
    fn power_cut(mut self) {
        let pid = Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        kill(pid, Signal::SIGUSR1).unwrap();
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A test that failed before its power cut: unmount (SIGTERM) and reap.
        if let Ok(None) = self.0.try_wait() {
            let pid = Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
            let _ = kill(pid, Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
}

#[test]
fn mapped_writes_persist_only_through_msync() {
    let Some(rig) = Rig::new() else { return };
    let fs = Served::start(&rig);
    for name in ["msynced", "not-msynced"] {
        let file = create(&rig.at(name));
        file.set_len(4 * PAGE).unwrap();
        file.sync_all().unwrap();
        // SAFETY: the file is private to this test and stays open while mapped.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        map[100..200].fill(0xab);
        map[3 * 4096..3 * 4096 + 10].fill(0xcd);
        if name == "msynced" {
            map.flush().unwrap();
        }
        // Unmapping hands the dirty pages to the filesystem (as a killed daemon's
        // exit does), which is still not a sync.
        drop(map);
        drop(file);
    }
    fs.power_cut();
    let _fs = rig.mount();
    let synced = fs::read(rig.at("msynced")).unwrap();
    assert_eq!(synced.len(), 4 * 4096);
    assert!(synced[100..200].iter().all(|&b| b == 0xab));
    assert!(synced[3 * 4096..3 * 4096 + 10].iter().all(|&b| b == 0xcd));
    assert_eq!(synced.iter().filter(|&&b| b != 0).count(), 110);
    let lost = fs::read(rig.at("not-msynced")).unwrap();
    assert_eq!(lost, vec![0; 4 * 4096]);
}

#[test]
fn sizes_follow_the_cache_and_persist_only_when_synced() {
    let Some(rig) = Rig::new() else { return };
    let fs = rig.mount();
    let grown = create(&rig.at("grown"));
    grown.set_len(1 << 30).unwrap();
    assert_eq!(fs::metadata(rig.at("grown")).unwrap().len(), 1 << 30);
    let shrunk = create(&rig.at("shrunk"));
    shrunk.write_all_at(&[7; 3 * 4096], 0).unwrap();
    shrunk.sync_data().unwrap();
    shrunk.set_len(5000).unwrap();
    shrunk.set_len(8192).unwrap();
    let mut read = vec![0; 8192];
    shrunk.read_exact_at(&mut read, 0).unwrap();
    assert!(read[..5000].iter().all(|&b| b == 7));
    assert!(
        read[5000..].iter().all(|&b| b == 0),
        "a shrink hides what was beyond"
    );
    let kept = create(&rig.at("kept"));
    kept.write_all_at(&[7; 3 * 4096], 0).unwrap();
    kept.set_len(5000).unwrap();
    kept.set_len(8192).unwrap();
    kept.sync_data().unwrap();
    fs.power_cut();
    let _fs = rig.mount();
    assert_eq!(fs::metadata(rig.at("grown")).unwrap().len(), 0);
    assert_eq!(fs::read(rig.at("shrunk")).unwrap(), vec![7; 3 * 4096]);
    let kept = fs::read(rig.at("kept")).unwrap();
    assert_eq!(kept.len(), 8192);
    assert!(kept[..5000].iter().all(|&b| b == 7));
    assert!(kept[5000..].iter().all(|&b| b == 0));
}

#[test]
fn fallocate_grows_and_punches_through_the_cache() {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    let Some(rig) = Rig::new() else { return };
    let fs = rig.mount();
    let file = create(&rig.at("f"));
    fallocate(file.as_raw_fd(), FallocateFlags::empty(), 0, 1 << 20).unwrap();
    file.write_all_at(&[9; 3 * 4096], 0).unwrap();
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file.as_raw_fd(), punch, 100, 8192).unwrap();
    let collapse = FallocateFlags::FALLOC_FL_COLLAPSE_RANGE;
    let err = fallocate(file.as_raw_fd(), collapse, 0, 4096).unwrap_err();
    assert_eq!(err, nix::errno::Errno::EOPNOTSUPP);
    file.sync_data().unwrap();
    fs.power_cut();
    let _fs = rig.mount();
    let data = fs::read(rig.at("f")).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert!(data[..100].iter().all(|&b| b == 9));
    assert!(data[100..8292].iter().all(|&b| b == 0));
    assert!(data[8292..3 * 4096].iter().all(|&b| b == 9));
}

#[test]
fn a_clean_unmount_syncs_everything() {
    let Some(rig) = Rig::new() else { return };
    let fs = rig.mount();
    fs::create_dir(rig.at("dir")).unwrap();
    fs::write(rig.at("dir/f"), b"hello").unwrap();
    assert_eq!(fs.unsynced().files, 1);
    fs.unmount().unwrap();
    assert_eq!(fs::read(rig.backing.join("dir/f")).unwrap(), b"hello");
}
