//! `blkrep libvirt disk-xml`: the `<disk>` element it prints for a primary's disk is
//! valid libvirt domain XML (checked against the installed libvirt's own schema with
//! `virt-xml-validate`), and names the export and socket a real NBD client reaches.
//!
//! A real libvirtd boots a domain whose disk is that element: Debian's libvirt 9.0 in
//! session mode (an unprivileged instance of its own, as `nobody`, with its
//! configuration and sockets in the test's directory: these machines run no system
//! libvirtd and no systemd), the guest-boot kit's QEMU as the domain's emulator under
//! TCG, and the kit's guest writing its files through blkrep.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::guest_boot::{fresh_token, host_check_image, mkfs, GuestKit, DATA_KIB};

use testkit::nbd::Conn;
use testkit::*;

/// A minimal domain around `disk`, for the schema check.
fn domain_with(disk: &str) -> String {
    format!(
        "<domain type='qemu'>\n<name>blkrep-test</name>\n<memory unit='MiB'>256</memory>\n\
         <os><type arch='x86_64'>hvm</type></os>\n<devices>\n{disk}</devices>\n</domain>\n"
    )
}

/// The socket path in `<host transport='unix' socket='...'/>`.
fn socket_of(xml: &str) -> &str {
    let start = xml.find("socket='").expect("a unix host") + "socket='".len();
    let end = xml[start..].find('\'').expect("closing quote") + start;
    &xml[start..end]
}

#[test]
fn disk_xml_is_valid_libvirt_and_points_at_the_export() {
    require_tool("virt-xml-validate");
    let p = Primary::start(Spec::new(vec![GroupSpec::new(
        "web",
        vec![DiskSpec::new("web-root", 4 * MIB)],
    )]));
    let o = run_ok(
        p.cmd()
            .args(["libvirt", "disk-xml", "--disk", "web-root", "--config"])
            .arg(p.config()),
        SHORT,
    );
    let xml = o.stdout;
    assert!(
        xml.contains("<source protocol='nbd' name='web-root'>"),
        "{xml}"
    );
    assert!(xml.contains("cache='none'"), "{xml}");
    let domain = p.layout.root.join("domain.xml");
    fs::write(&domain, domain_with(&xml)).expect("write domain");
    let check = run(
        Command::new("virt-xml-validate").arg(&domain).arg("domain"),
        SHORT,
    );
    assert!(
        check.success(),
        "libvirt's schema refuses the printed disk\n{xml}\n{}",
        check.report()
    );
    // The element names what a client reaches: the primary's socket and export.
    let mut conn = Conn::connect_unix(Path::new(socket_of(&xml)), "web-root")
        .expect("the socket and export of the printed disk serve");
    conn.write(0, &[7; 4096], true).expect("write through it");
    conn.disconnect();

    // Unknown disks are refused with a clear message.
    let o = run(
        p.cmd()
            .args(["libvirt", "disk-xml", "--disk", "nope", "--config"])
            .arg(p.config()),
        SHORT,
    );
    assert!(
        !o.success() && o.stderr.contains("No disk \"nope\""),
        "{}",
        o.report()
    );
}

/// An unprivileged libvirtd of the test's own, killed when dropped.
struct SessionLibvirtd {
    dir: PathBuf,
    daemon: Child,
}

/// `nobody`: libvirtd in session mode, and the QEMU it starts, run as this user.
const NOBODY: &str = "65534";

impl SessionLibvirtd {
    fn start(dir: &Path) -> SessionLibvirtd {
        for sub in ["config/libvirt", "run", "cache", "home"] {
            fs::create_dir_all(dir.join(sub)).expect("libvirt dirs");
        }
        // Serial output to a file without virtlogd.
        fs::write(
            dir.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )
        .expect("qemu.conf");
        run_ok(
            Command::new("chown").args(["-R", "65534:65534"]).arg(dir),
            SHORT,
        );
        let log = fs::File::create(dir.join("libvirtd.log")).expect("libvirtd log");
        let daemon = Self::as_nobody(dir, "libvirtd")
            .args(["--timeout", "600"])
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start libvirtd");
        let lv = SessionLibvirtd {
            dir: dir.to_path_buf(),
            daemon,
        };
        let deadline = Instant::now() + LONG;
        loop {
            let o = run(&mut lv.virsh(&["list", "--all"]), SHORT);
            if o.success() {
                return lv;
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd (session mode) never answered\n{}\n{}",
                o.report(),
                fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn as_nobody(dir: &Path, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            program,
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", dir.join("home"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .env("XDG_CACHE_HOME", dir.join("cache"));
        cmd
    }

    fn virsh(&self, args: &[&str]) -> Command {
        let mut cmd = Self::as_nobody(&self.dir, "virsh");
        cmd.args(["-c", "qemu:///session"]).args(args);
        cmd
    }
}

impl Drop for SessionLibvirtd {
    fn drop(&mut self) {
        let _ = run(&mut self.virsh(&["destroy", "blkrep-libvirt"]), SHORT);
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

#[test]
fn libvirtd_boots_a_domain_whose_disk_is_the_printed_element() {
    for tool in ["libvirtd", "virsh", "setpriv"] {
        require_tool(tool);
    }
    let kit = GuestKit::build();
    let mut p = Primary::prepare(Spec::new(vec![GroupSpec::new(
        "vm1",
        vec![DiskSpec::new("disk0", 64 * MIB)],
    )]));
    mkfs(&p.image("disk0"));
    // The domain's QEMU runs as nobody: it needs the way to the socket, and the socket.
    p.add_nbd_settings("socket_mode = \"0666\"");
    fs::set_permissions(&p.layout.root, fs::Permissions::from_mode(0o755)).expect("chmod");
    p.restart();
    let disk = run_ok(
        p.cmd()
            .args(["libvirt", "disk-xml", "--disk", "disk0", "--config"])
            .arg(p.config()),
        SHORT,
    )
    .stdout;
    let lv_dir = p.layout.root.join("libvirt");
    let lv = SessionLibvirtd::start(&lv_dir);
    let console = lv_dir.join("console.log");
    let token = fresh_token();
    let domain = format!(
        "<domain type='qemu'>\n<name>blkrep-libvirt</name>\n<memory unit='MiB'>256</memory>\n\
         <vcpu>1</vcpu>\n<os><type arch='x86_64' machine='pc'>hvm</type>\n\
         <kernel>{}</kernel><initrd>{}</initrd>\n\
         <cmdline>console=ttyS0 panic=-1 blkrep.mode=write blkrep.token={token} blkrep.data_kib={DATA_KIB}</cmdline></os>\n\
         <features><acpi/></features>\n\
         <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\n\
         <devices><emulator>{}</emulator>\n{disk}\
         <serial type='file'><source path='{}'/><target port='0'/></serial>\n</devices>\n</domain>\n",
        kit.kernel().display(),
        kit.initramfs().display(),
        kit.qemu().display(),
        console.display()
    );
    let domain_file = lv_dir.join("domain.xml");
    fs::write(&domain_file, &domain).expect("domain xml");
    let created = run(
        &mut lv.virsh(&["create", domain_file.to_str().expect("utf-8 path")]),
        LONG,
    );
    assert!(
        created.success(),
        "libvirtd refused the domain\n{domain}\n{}\n{}",
        created.report(),
        fs::read_to_string(lv_dir.join("libvirtd.log")).unwrap_or_default()
    );
    // The guest powers off when done; on_poweroff destroys the domain.
    let deadline = Instant::now() + Duration::from_secs(180);
    let text = loop {
        let text = fs::read_to_string(&console).unwrap_or_default();
        let listed = run(&mut lv.virsh(&["list", "--name"]), SHORT).stdout;
        if !listed.contains("blkrep-libvirt") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the domain did not power off\n{}",
            tail(&text, 40)
        );
        thread::sleep(Duration::from_millis(250));
    };
    assert!(
        text.contains(&format!("BLKREP-WRITE-OK token={token} ")),
        "the guest under libvirt did not write its files\n{}",
        tail(&text, 60)
    );
    drop(lv);
    p.cycles_close("vm1");
    assert_files_equal(
        &p.copy_image("vm1", "disk0"),
        &p.image("disk0"),
        "local copy",
    );
    p.terminate();
    host_check_image(&p.image("disk0"), &token, &p.layout.root);
}
