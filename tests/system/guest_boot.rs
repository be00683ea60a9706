//! A real Linux guest on a blkrep export: Debian 12's kernel booted by QEMU under
//! TCG from the kit `scripts/guest-kit.sh` builds, its initramfs
//! (`tests/guest/init`) writing files to an ext4 file system through virtio-blk and
//! a real `blkrep primary` over NBD, a second guest verifying them, and the host
//! checking the image file with e2fsprogs once the daemon has stopped.
#![allow(clippy::cast_possible_truncation)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use testkit::*;

const GROUP: &str = "vm1";
const DISK: &str = "disk0";
const DISK_SIZE: u64 = 64 * MIB;
/// Size of the guest's /blkrep/data: big enough to span many ext4 extents and log
/// records, small enough for a TCG guest to write in a few seconds.
pub(crate) const DATA_KIB: u64 = 8192;
/// One guest boot (about 10 s on 2 cores under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The first kit build downloads about 85 MB and unpacks a kernel.
const KIT_TIMEOUT: Duration = Duration::from_secs(900);

/// What `scripts/guest-kit.sh` built.
pub(crate) struct GuestKit {
    dir: PathBuf,
}

impl GuestKit {
    /// Runs the kit script (quick when the kit exists); its failure fails the test.
    pub(crate) fn build() -> GuestKit {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest-kit.sh");
        let o = match run_with_timeout(&mut Command::new(&script), KIT_TIMEOUT) {
            Ok(o) => o,
            Err(o) => panic!(
                "scripts/guest-kit.sh timed out after {KIT_TIMEOUT:?}\n{}",
                o.report()
            ),
        };
        assert!(
            o.success(),
            "scripts/guest-kit.sh failed: the guest-boot test needs its kit\n{}",
            o.report()
        );
        let dir = o
            .stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("guest-kit: "))
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "scripts/guest-kit.sh did not end with `guest-kit: DIR`\n{}",
                    o.report()
                )
            });
        let kit = GuestKit { dir };
        for p in [kit.qemu(), kit.kernel(), kit.initramfs()] {
            assert!(
                p.is_file(),
                "the guest kit lacks {}\n{}",
                p.display(),
                o.report()
            );
        }
        kit
    }
    pub(crate) fn qemu(&self) -> PathBuf {
        self.dir.join("bin/qemu-system-x86_64")
    }
    pub(crate) fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub(crate) fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.img")
    }
}

#[derive(Debug, Clone, Copy)]
enum GuestMode {
    /// Write /blkrep/{token,data,SHA256SUMS} and unmount.
    Write,
    /// Write the same files, /blkrep/data in synced 64 KiB pieces with a progress
    /// line after each, and fail on any I/O error the kernel logged.
    Churn,
    /// Mount read-only and verify them.
    Check,
}

impl GuestMode {
    fn arg(self) -> &'static str {
        match self {
            GuestMode::Write => "write",
            GuestMode::Churn => "churn",
            GuestMode::Check => "check",
        }
    }
}

/// QEMU's `-drive` for an NBD URI of a primary's or a replica's export.
fn uri_drive(uri: &str) -> String {
    // A comma inside an option value is written twice.
    format!(
        "file={},format=raw,if=virtio,cache=none",
        uri.replace(',', ",,")
    )
}

/// QEMU's `-drive` for an export on a unix socket, with the options that let a guest
/// ride out a restart of `blkrep primary` (the README's): QEMU's NBD client
/// reconnects for up to `reconnect_delay_secs` and retries the guest's requests
/// meanwhile instead of failing them.
fn reconnecting_drive(socket: &Path, export: &str, reconnect_delay_secs: u32) -> String {
    format!(
        "if=virtio,format=raw,cache=none,file.driver=nbd,file.server.type=unix,\
         file.server.path={},file.export={export},file.reconnect-delay={reconnect_delay_secs}",
        socket.display().to_string().replace(',', ",,")
    )
}

/// The serial console file of a guest booted by [`boot_guest`].
fn console_file(log_dir: &Path, mode: GuestMode, token: &str) -> PathBuf {
    log_dir.join(format!("guest-{}-{token}.log", mode.arg()))
}

/// Boots one guest with `drive` as QEMU's `-drive` ([`uri_drive`],
/// [`reconnecting_drive`]) and returns its serial console once it powered off. The
/// console is kept in `log_dir`; a QEMU failure, a timeout or a guest that never
/// reached its end marker fails the test with the console's tail.
fn boot_guest(kit: &GuestKit, drive: &str, mode: GuestMode, token: &str, log_dir: &Path) -> String {
    boot_guest_with(kit, drive, mode, token, log_dir, &GuestExtras::default())
}

/// More for a guest than its disk.
#[derive(Debug, Default)]
struct GuestExtras {
    /// Run qemu-guest-agent in the guest, its channel on this host socket.
    agent_socket: Option<PathBuf>,
}

/// [`boot_guest`] with `extras`.
fn boot_guest_with(
    kit: &GuestKit,
    drive: &str,
    mode: GuestMode,
    token: &str,
    log_dir: &Path,
    extras: &GuestExtras,
) -> String {
    let console = console_file(log_dir, mode, token);
    let _ = fs::remove_file(&console);
    let mut append = format!(
        "console=ttyS0 panic=-1 blkrep.mode={} blkrep.token={token} blkrep.data_kib={DATA_KIB}",
        mode.arg()
    );
    if extras.agent_socket.is_some() {
        append.push_str(" blkrep.agent=1");
    }
    let mut cmd = Command::new(kit.qemu());
    cmd.args(["-accel", "tcg", "-m", "256", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // panic=-1 plus -no-reboot: a guest that panics exits QEMU at once.
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kit.kernel())
        .arg("-initrd")
        .arg(kit.initramfs())
        .args(["-append", &append])
        .arg("-drive")
        .arg(drive);
    if let Some(socket) = &extras.agent_socket {
        cmd.arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                socket.display().to_string().replace(',', ",,")
            ))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
    }
    let result = run_with_timeout(&mut cmd, BOOT_TIMEOUT);
    let log = fs::read_to_string(&console).unwrap_or_default();
    let context = |o: &Output| {
        format!(
            "{}\n--- guest console ({}) ---\n{}",
            o.report(),
            console.display(),
            tail(&log, 80)
        )
    };
    match &result {
        Err(o) => panic!(
            "{} guest did not power off within {BOOT_TIMEOUT:?}\n{}",
            mode.arg(),
            context(o)
        ),
        Ok(o) if !o.success() => panic!("QEMU failed ({} guest)\n{}", mode.arg(), context(o)),
        Ok(o) if !log.lines().any(|l| l.trim_end() == "BLKREP-GUEST-DONE") => panic!(
            "{} guest powered off without BLKREP-GUEST-DONE\n{}",
            mode.arg(),
            context(o)
        ),
        Ok(_) => log,
    }
}

/// The console line starting with `prefix`, or a failure quoting the console.
fn console_line<'a>(console: &'a str, prefix: &str, what: &str) -> &'a str {
    console
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "{what}: no `{prefix}` line on the guest console\n{}",
                tail(console, 80)
            )
        })
}

/// A write guest stores token `token`'s files on `drive` (an NBD URI).
fn guest_write_files(kit: &GuestKit, drive: &str, token: &str, log_dir: &Path) {
    let console = boot_guest(kit, &uri_drive(drive), GuestMode::Write, token, log_dir);
    console_line(
        &console,
        &format!("BLKREP-WRITE-OK token={token} "),
        "write guest",
    );
}

/// A check guest finds token `token`'s files on `drive` (an NBD URI), intact.
fn guest_check_files(kit: &GuestKit, drive: &str, token: &str, log_dir: &Path) {
    let console = boot_guest(kit, &uri_drive(drive), GuestMode::Check, token, log_dir);
    let line = console_line(&console, "BLKREP-CHECK-", "check guest");
    assert_eq!(
        line,
        format!("BLKREP-CHECK-OK token={token}"),
        "check guest\n{}",
        tail(&console, 80)
    );
}

/// The bytes of /blkrep/data as tests/guest/init generates them: 512-byte records
/// "<token> <10-digit number>", dots, newline.
fn expected_data(token: &str) -> Vec<u8> {
    let records = DATA_KIB * 2;
    let mut v = Vec::with_capacity((DATA_KIB * KIB) as usize);
    for i in 0..records {
        let head = format!("{token} {i:010}");
        v.extend_from_slice(head.as_bytes());
        v.resize(v.len() + 511 - head.len(), b'.');
        v.push(b'\n');
    }
    v
}

/// e2fsprogs live in /usr/sbin, which a non-root PATH may lack.
fn e2fs_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` not found (e2fsprogs); scripts/guest-kit.sh installs it")
        })
}

/// From the host, on an image no one serves: the file system is clean and holds
/// token `token`'s files byte for byte.
pub(crate) fn host_check_image(image: &Path, token: &str, scratch: &Path) {
    let fsck = run(
        Command::new(e2fs_tool("e2fsck")).arg("-fn").arg(image),
        LONG,
    );
    assert!(
        fsck.success(),
        "e2fsck -fn finds {} unclean\n{}",
        image.display(),
        fsck.report()
    );
    let debugfs = e2fs_tool("debugfs");
    let cat = run_ok(
        Command::new(&debugfs)
            .args(["-R", "cat /blkrep/token"])
            .arg(image),
        LONG,
    );
    assert_eq!(
        cat.stdout,
        format!("{token}\n"),
        "/blkrep/token on the image\n{}",
        cat.report()
    );
    let dumped = scratch.join("data.dumped");
    let _ = fs::remove_file(&dumped);
    let dump = run_ok(
        Command::new(&debugfs)
            .arg("-R")
            .arg(format!("dump /blkrep/data {}", dumped.display()))
            .arg(image),
        LONG,
    );
    let data = fs::read(&dumped)
        .unwrap_or_else(|e| panic!("debugfs did not dump /blkrep/data ({e})\n{}", dump.report()));
    assert_bytes_equal(&data, &expected_data(token), "/blkrep/data on the image");
}

/// Letters and digits only (the kernel command line and the init script take it
/// as is), different on every run so nothing stale can pass.
/// Makes `image` an empty ext4 file system.
pub(crate) fn mkfs(image: &Path) {
    run_ok(
        Command::new(e2fs_tool("mkfs.ext4"))
            .args(["-F", "-q", "-L", "blkrep-guest"])
            .arg(image),
        LONG,
    );
}

pub(crate) fn fresh_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("t{}x{nanos}", std::process::id())
}

#[test]
fn a_guest_writes_an_ext4_file_system_through_the_primary_and_a_second_guest_reads_it() {
    let kit = GuestKit::build();

    let mut p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        GROUP,
        vec![DiskSpec::new(DISK, DISK_SIZE)],
    )
    .tracking(true)]));
    // Formatted before the daemon starts: the local copy starts from it.
    mkfs(&p.image(DISK));
    p.restart();
    let logs = p.layout.root.clone();
    let drive = p.uri(DISK);
    let token = fresh_token();

    guest_write_files(&kit, &drive, &token, &logs);
    let dirty = p.disk_status(GROUP, DISK)["dirty_bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(dirty > 0, "the guest's writes left no dirty bytes tracked");
    // What the tracker saw of a real guest's I/O reproduces the image exactly.
    p.cycles_close(GROUP);
    assert_files_equal(
        &p.image(DISK),
        &p.copy_image(GROUP, DISK),
        "local copy after the write guest",
    );

    guest_check_files(&kit, &drive, &token, &logs);

    p.terminate();
    host_check_image(&p.image(DISK), &token, &logs);
}

/// The disaster: a guest writes through a replicating primary, the primary dies, the
/// replica is failed over, and a guest booted from the replica's live disks finds
/// every file.
#[test]
fn a_guest_boots_from_the_failed_over_replica_and_finds_its_files() {
    use testkit::replica::{dc1, lab_certs, Replica, PRIMARY_HOST, REPLICA_HOST};
    let kit = GuestKit::build();
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = lab_certs(dir.path());
    let mut replica = Replica::start(&certs, REPLICA_HOST, &dc1(), "reserve = \"0\"");
    let mut p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        GROUP,
        vec![DiskSpec::new(DISK, DISK_SIZE)],
    )
    .consumer(Consumer::Raw(certs.consumer(
        &replica.url(REPLICA_HOST),
        PRIMARY_HOST,
        "",
    )))
    .ring_size("64MiB")]));
    mkfs(&p.image(DISK));
    p.restart();
    let logs = p.layout.root.clone();
    let token = fresh_token();
    guest_write_files(&kit, &p.uri(DISK), &token, &logs);
    let cycle = p.cycles_close(GROUP);
    replica.wait_applied(GROUP, cycle, LONG);
    p.kill();

    let failover = run_ok(
        Command::new(bin())
            .args(["replica", "failover", "--name", GROUP, "--config"])
            .arg(replica.config()),
        LONG,
    );
    let live = format!(
        "nbd+unix:///{GROUP}/{DISK}?socket={}",
        replica.nbd_socket().display()
    );
    assert!(failover.stdout.contains(&live), "{}", failover.all());
    guest_check_files(&kit, &live, &token, &logs);

    replica.terminate();
    host_check_image(&replica.disk("dc1", GROUP, DISK), &token, &logs);
}

/// Waits until the guest console at `console` shows `line`; `None` if the guest
/// finished first.
fn wait_for_console_line(console: &Path, line: &str, guest_done: impl Fn() -> bool) -> Option<()> {
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = fs::read_to_string(console).unwrap_or_default();
        if text.lines().any(|l| l.trim_end() == line) {
            return Some(());
        }
        if guest_done() || std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Seconds from each "Shutting down" in the daemon's log to the next "Primary
/// ready": how long a restart kept the disks unserved.
fn restart_gaps(log: &str) -> Vec<f64> {
    let stamp = |line: &str| line.split_whitespace().next().and_then(seconds_of_day);
    let mut gaps = Vec::new();
    let mut down = None;
    for line in log.lines() {
        if line.contains("Shutting down") {
            down = stamp(line);
        } else if line.contains("Primary ready") {
            if let (Some(from), Some(to)) = (down.take(), stamp(line)) {
                gaps.push(to - from);
            }
        }
    }
    gaps
}

/// Seconds since midnight of an RFC 3339 UTC timestamp as the daemon logs it
/// (`2026-12-07T08:30:05.946718Z`).
fn seconds_of_day(stamp: &str) -> Option<f64> {
    let time = stamp.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// An upgrade or a crash-free restart of `blkrep primary` under a running guest: the
/// guest writes through QEMU's reconnecting NBD client while the daemon is stopped
/// (SIGTERM) and started again, twice. No I/O error reaches the guest's file system,
/// every file is intact, and the group's log still rebuilds the image exactly. The
/// ring is 1 GiB, as the issue asks, and the restart gaps are printed.
#[test]
fn a_guest_keeps_writing_while_the_primary_restarts() {
    let kit = GuestKit::build();
    let mut p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        GROUP,
        vec![DiskSpec::new(DISK, DISK_SIZE)],
    )
    .ring_size("1GiB")]));
    mkfs(&p.image(DISK));
    p.restart();
    let logs = p.layout.root.clone();
    let token = fresh_token();
    let drive = reconnecting_drive(&p.nbd_sock(), DISK, 60);
    let console = console_file(&logs, GuestMode::Churn, &token);
    let mut restarts_mid_write = 0;
    let churned = std::thread::scope(|scope| {
        let guest = scope.spawn(|| boot_guest(&kit, &drive, GuestMode::Churn, &token, &logs));
        // 128 pieces in all: restart after a quarter and after about two thirds.
        for at in [32, 80] {
            let line = format!("BLKREP-PROGRESS {at}");
            if wait_for_console_line(&console, &line, || guest.is_finished()).is_none() {
                break;
            }
            p.terminate();
            p.restart();
            let text = fs::read_to_string(&console).unwrap_or_default();
            if !text.contains("BLKREP-GUEST-DONE") {
                restarts_mid_write += 1;
            }
        }
        guest
            .join()
            .unwrap_or_else(|_| panic!("the churn guest failed\n{}", p.log()))
    });
    console_line(
        &churned,
        &format!("BLKREP-WRITE-OK token={token} "),
        "churn guest",
    );
    assert!(
        restarts_mid_write >= 1,
        "no restart happened while the guest was writing\n{}",
        tail(&churned, 40)
    );
    let gaps = restart_gaps(&p.log());
    println!(
        "restarts while the guest wrote: {restarts_mid_write}; primary down for (s): {gaps:?}"
    );
    p.cycles_close(GROUP);
    assert_files_equal(
        &p.image(DISK),
        &p.copy_image(GROUP, DISK),
        "local copy after the restarts",
    );
    guest_check_files(&kit, &p.uri(DISK), &token, &logs);
    p.terminate();
    host_check_image(&p.image(DISK), &token, &logs);
}

/// An application-consistent point through a real qemu-guest-agent: the guest writes
/// (fsynced 64 KiB pieces) while the first cycle closes between the agent's
/// guest-fsfreeze-freeze and guest-fsfreeze-thaw (`tests/guest/qga.py` as the freeze
/// and thaw commands). The point holds a file system ext4 itself calls clean: the
/// freeze flushed its journal, so it mounts without recovery, which a crash-consistent
/// point taken mid-write would need.
#[test]
fn an_application_consistent_point_through_the_guest_agent_is_a_clean_file_system() {
    let kit = GuestKit::build();
    let qga_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/qga.py");
    let mut p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        GROUP,
        vec![DiskSpec::new(DISK, DISK_SIZE)],
    )]));
    let agent = p.layout.root.join("qga.sock");
    let hook = |action: &str| {
        format!(
            "[\"/usr/bin/python3\", {:?}, {:?}, {action:?}]",
            qga_script.display().to_string(),
            agent.display().to_string()
        )
    };
    let consumer = format!(
        "type = \"local-copy\"\ndir = {:?}\n\n[group.app_consistent]\nevery = \"1h\"\n\
         freeze_command = {}\nthaw_command = {}\ntimeout = \"30s\"\n",
        p.copy_dir(GROUP).display().to_string(),
        hook("freeze"),
        hook("thaw")
    );
    p.spec.groups[0].consumer = Consumer::Raw(consumer);
    fs::write(p.config(), p.layout.config_text(&p.spec, None)).expect("config");
    fs::create_dir_all(p.copy_dir(GROUP)).expect("copy dir");
    mkfs(&p.image(DISK));
    p.restart();
    let logs = p.layout.root.clone();
    let token = fresh_token();
    let console = console_file(&logs, GuestMode::Churn, &token);
    let extras = GuestExtras {
        agent_socket: Some(agent.clone()),
    };
    let drive = uri_drive(&p.uri(DISK));
    let churned = std::thread::scope(|scope| {
        let guest =
            scope.spawn(|| boot_guest_with(&kit, &drive, GuestMode::Churn, &token, &logs, &extras));
        let started = wait_for_console_line(&console, "BLKREP-PROGRESS 32", || guest.is_finished());
        assert!(started.is_some(), "the guest finished before the point");
        // The first cycle is a point: freeze, close, thaw.
        p.cycles_close(GROUP);
        guest
            .join()
            .unwrap_or_else(|_| panic!("the guest failed\n{}", p.log()))
    });
    console_line(
        &churned,
        &format!("BLKREP-WRITE-OK token={token} "),
        "guest",
    );
    let app = p.group_status(GROUP)["consumer"]["app_consistent"].clone();
    assert_eq!(app["freeze_failures"], 0, "{app:#}\n{}", p.log());
    assert_eq!(app["thaw_failures"], 0, "{app:#}\n{}", p.log());
    assert_eq!(app["points"], 1, "the first cycle was not a point: {app:#}");
    // The local copy holds the point (no cycle closed since): a clean ext4.
    let point = logs.join("point.img");
    fs::copy(p.copy_image(GROUP, DISK), &point).expect("copy the point");
    let header = run_ok(
        Command::new(e2fs_tool("dumpe2fs")).arg("-h").arg(&point),
        LONG,
    );
    assert!(
        !header.stdout.contains("needs_recovery"),
        "the point's ext4 needs journal recovery: the freeze did not hold\n{}",
        header.stdout
    );
    let fsck = run(
        Command::new(e2fs_tool("e2fsck")).arg("-fn").arg(&point),
        LONG,
    );
    assert!(
        fsck.success(),
        "e2fsck finds the point unclean\n{}",
        fsck.report()
    );
    p.terminate();
    host_check_image(&p.image(DISK), &token, &logs);
}
