//! Harness shared by the whole-system tests (`tests/system`): a `Primary` fixture that
//! runs a real `blkrep primary` daemon in a temp dir ([`primary`], its configuration
//! described by [`spec`]), a `Replica` fixture for `blkrep replica run` ([`replica`]),
//! helpers to run external clients with a timeout ([`command`]), and a minimal NBD
//! client ([`nbd`]) for writers whose every acknowledgement the tests must observe.
//!
//! Every external command runs with a timeout; a hung client or daemon fails the
//! test with its output instead of hanging CI. On a panic the daemon's log is
//! printed (set `BLKREP_TEST_KEEP=1` to also keep the temp dir).
//!
//! Daemons listen on port 0 and the harness learns the bound address from what they
//! report ([`daemon_log`]), so tests running in parallel never race for a port.
#![warn(missing_docs)]

pub mod command;
pub mod daemon_log;
pub mod fault_proxy;
pub mod hostile;
pub mod nbd;
pub mod ordered;
pub mod power_loss;
pub mod primary;
pub mod replica;
pub mod soak;
pub mod spec;
pub mod writer;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

pub use command::{run, run_ok, run_with_timeout, tail, Output};
pub use primary::{assert_group_shape, Primary};
pub use spec::{Consumer, DiskSpec, GroupSpec, Init, Layout, Spec};

/// The binary under test: `CARGO_BIN_EXE_blkrep` where cargo sets it when running
/// the tests, else `blkrep` in the profile directory of the running test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/blkrep`), where cargo builds
/// it before any integration test of the root package runs. The test binary checks
/// this against the `CARGO_BIN_EXE_blkrep` it was compiled with.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("CARGO_BIN_EXE_blkrep") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("path of the running test binary");
        let mut dir = exe.parent().expect("test binary has a directory").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let path = dir.join("blkrep");
        assert!(
            path.is_file(),
            "the blkrep binary is not at {} (next to the test binary {}); run the tests with cargo test",
            path.display(),
            exe.display()
        );
        path
    })
}

/// /usr/bin/python3 is the interpreter that can import Debian's libnbd bindings.
pub const PYTHON: &str = "/usr/bin/python3";

/// Default timeout for short CLI calls (status, --help, ...).
pub const SHORT: Duration = Duration::from_secs(20);
/// Timeout for calls that move data (cycles close/apply, qemu-img convert, fio...).
pub const LONG: Duration = Duration::from_secs(120);

/// One kibibyte.
pub const KIB: u64 = 1024;
/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------

/// Panics with an actionable message if `tool` is not on PATH.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required NBD client `{tool}` is not installed (not found in PATH); \
         install with scripts/install-test-deps.sh"
    );
}

/// Panics unless /usr/bin/python3 can `import nbd` (python3-libnbd).
pub fn require_python_libnbd() {
    let out = Command::new(PYTHON)
        .args(["-c", "import nbd; print(nbd.NBD().get_version())"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{PYTHON} cannot import the libnbd bindings (python3-libnbd): {}; \
             install with scripts/install-test-deps.sh",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => {
            panic!("{PYTHON} is not runnable ({e}); install with scripts/install-test-deps.sh")
        }
    }
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), cheap enough for 64 MiB.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The whole content of `p` (panics naming the file if it cannot be read).
pub fn read_file(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// `len` bytes of `p` at offset `off` (panics naming the file on a short read).
pub fn read_range(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut v = vec![0u8; len];
    f.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("read {} @{off}+{len}: {e}", p.display()));
    v
}

/// Writes back `p`'s dirty pages, drops it from the page cache
/// (`posix_fadvise(DONTNEED)`) and returns how many of its bytes `fincore` still finds
/// cached, so a test can check its reads really go to the disk.
pub fn evict_from_page_cache(p: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    file.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap_or_else(|e| panic!("posix_fadvise {}: {e}", p.display()));
    let out = run_ok(
        Command::new(require_tool("fincore"))
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(p),
        SHORT,
    );
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("fincore printed {:?}: {e}", out.stdout))
}

/// Asserts two files are byte-identical, naming the first difference.
pub fn assert_files_equal(a: &Path, b: &Path, what: &str) {
    let da = read_file(a);
    let db = read_file(b);
    assert_bytes_equal(
        &da,
        &db,
        &format!("{what}: {} vs {}", a.display(), b.display()),
    );
}

/// Asserts two buffers are equal, naming the first difference and how many 4 KiB
/// blocks differ.
pub fn assert_bytes_equal(a: &[u8], b: &[u8], what: &str) {
    if a == b {
        return;
    }
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: sizes differ ({} vs {})",
        a.len(),
        b.len()
    );
    let first = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .expect("some byte differs");
    let differing_4k: usize = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    let s = first.saturating_sub(first % 16);
    let e = (s + 32).min(a.len());
    panic!(
        "{what}: contents differ; first difference at byte {first} (4 KiB block {}), \
         {differing_4k} differing 4 KiB blocks in all\n  left  [{s}..{e}]: {:02x?}\n  right [{s}..{e}]: {:02x?}",
        first / 4096,
        &a[s..e],
        &b[s..e]
    );
}
