//! `blkrep libvirt disk-xml`: the `<disk>` element it prints for a primary's disk is
//! valid libvirt domain XML (checked against the installed libvirt's own schema with
//! `virt-xml-validate`), and names the export and socket a real NBD client reaches.
//!
//! Booting a domain under libvirtd is not tested here: these CI machines run no
//! system libvirtd (no systemd as PID 1, no KVM), and the guest-boot tests already
//! boot QEMU on the same NBD source with the same options.

use std::fs;
use std::process::Command;

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
    let mut conn = Conn::connect_unix(std::path::Path::new(socket_of(&xml)), "web-root")
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
